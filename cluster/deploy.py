"""Deploys sdgate's Serve applications onto a running Ray cluster, waiting a bounded time.

Run as a short-lived driver (`python -m cluster.deploy SPEC_JSON`) so the caller never holds a
Ray connection. `serve.run` would wait forever for replicas that cannot be placed; this polls
the application status instead and fails with what Serve reports.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import yaml

import ray
from ray import serve
from ray.serve.api import RunTarget

from celery_bridge import consumer
from celery_bridge.config import load_celery_config, read_env_file, secrets_file
from celery_bridge.models import load_catalogue
from serve_app import gateway

GATEWAY_APP, WORKERS_APP = "gateway", "workers"


def workers_app_name(model: str) -> str:
    """The Serve application of `model`'s workers: `workers-<model>` ('/' is not allowed in app names)."""
    return f"{WORKERS_APP}-{model.replace('/', '--')}"


def deploy(spec: Dict[str, Any]) -> Dict[str, str]:
    """spec: ray_address, http {host, port}, gateway (overrides, or None for no gateway), celery,
    workers ({model: Ray-managed worker replicas}, one application per model), worker
    (WorkerConfig overrides), timeout_s, on_ingress_node (gateway replicas only on nodes with
    serve_app.placement's resource)."""
    ray.init(address=spec["ray_address"], logging_level="ERROR", log_to_driver=False)
    serve.start(http_options=spec.get("http") or {})
    targets = []
    if spec.get("gateway") is not None:
        targets.append(RunTarget(gateway.build_app({"gateway": spec["gateway"], "celery": spec.get("celery"),
                                                    "on_ingress_node": spec.get("on_ingress_node", False)}),
                                 name=GATEWAY_APP, route_prefix="/"))
    workers = spec.get("workers") or {}
    if isinstance(workers, int):  # a bare count: that many for the worker config's (or the default) model
        workers = {(spec.get("worker") or {}).get("model") or load_catalogue().default: workers}
    for model, replicas in workers.items():
        if not replicas:
            continue
        app = consumer.build_app({"celery": spec.get("celery") or {},
                                  "worker": dict(spec.get("worker") or {}, model=model), "num_replicas": replicas})
        targets.append(RunTarget(app, name=workers_app_name(model), route_prefix=None))
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return wait_running([t.name for t in targets], spec.get("timeout_s", 240))


def wait_running(names, timeout_s: float) -> Dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications
        states = {name: str(getattr(applications.get(name), "status", "MISSING")) for name in names}
        if all(state.endswith("RUNNING") for state in states.values()):
            return states
        failed = {n: applications[n].message for n, s in states.items() if s.endswith("DEPLOY_FAILED")}
        if failed:
            raise RuntimeError(f"Serve could not deploy: {failed}")
        if time.monotonic() > deadline:
            messages = {n: getattr(applications.get(n), "message", "") for n in names}
            raise TimeoutError(f"applications not running after {timeout_s:.0f} s: {states} {messages} "
                               "(often: not enough CPUs/GPUs in the cluster for the replicas asked for)")
        time.sleep(0.5)


AUTH_SWITCH = "SDGATE_AUTH"  # `off` deploys without a token, on purpose
_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


def serve_config_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The variables configs/serve.yaml may use, with sdgate's defaults filled in."""
    env = dict(environ if environ is not None else os.environ)
    celery = load_celery_config(redis_url=env.get("SDGATE_REDIS_URL"))
    env.setdefault("SDGATE_REDIS_URL", celery.redis_url)
    env.setdefault("SDGATE_BIND_HOST", "127.0.0.1")
    if env.get(AUTH_SWITCH, "").lower() != "off" and not _deploy_token(env):  # "off": no token, on purpose
        raise ValueError("SDGATE_TOKEN is unset or empty: anyone who reaches the gateway could use it. Set "
                         f"SDGATE_TOKEN (configs/secrets.env), or set {AUTH_SWITCH}=off to deploy without auth")
    if env.get("SDGATE_AUTH_TOKEN") is not None:
        raise ValueError("SDGATE_AUTH_TOKEN is not read: the shared token is SDGATE_TOKEN everywhere")
    return env


def _deploy_token(env: Mapping[str, str]) -> str:
    """The token the replicas will read: from their environment, else configs/secrets.env (never the Serve config)."""
    if env.get("SDGATE_TOKEN"):
        return env["SDGATE_TOKEN"]
    path = secrets_file()
    return read_env_file(path).get("SDGATE_TOKEN", "") if path.exists() else ""


def render_serve_config(path: Path, environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """configs/serve.yaml with ${VAR}s filled in, validated against Ray's ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    env = serve_config_env(environ)
    text = Path(path).read_text()
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in env})
    if missing:
        raise KeyError(f"{path} uses unset variables {missing}; export them before `sdgate deploy`")
    config = yaml.safe_load(_PLACEHOLDER.sub(lambda m: json.dumps(env[m.group(1)]), text))
    ServeDeploySchema.model_validate(config)
    return config


def submit_serve_config(config: Dict[str, Any], dashboard_address: str) -> None:
    """What `serve deploy` does: hand the applications to the cluster's Serve controller."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(dashboard_address).deploy_applications(config)


if __name__ == "__main__":
    print(json.dumps(deploy(json.loads(sys.argv[1]))))
