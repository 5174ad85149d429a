"""Deploys sdgate's Serve applications onto a running Ray cluster, waiting a bounded time.

Run as a short-lived driver (`python -m cluster.deploy SPEC_JSON`) so the caller never holds a
Ray connection. `serve.run` would wait forever for replicas that cannot be placed; this polls
the application status instead and fails with what Serve reports.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict

import ray
from ray import serve
from ray.serve.api import RunTarget

from celery_bridge import consumer
from serve_app import gateway

GATEWAY_APP, WORKERS_APP = "gateway", "workers"


def deploy(spec: Dict[str, Any]) -> Dict[str, str]:
    """spec: ray_address, http {host, port}, gateway (overrides, or None for no gateway), celery,
    workers (Ray-managed worker replicas), worker (WorkerConfig overrides), timeout_s."""
    ray.init(address=spec["ray_address"], logging_level="ERROR", log_to_driver=False)
    serve.start(http_options=spec.get("http") or {})
    targets = []
    if spec.get("gateway") is not None:
        targets.append(RunTarget(gateway.build_app({"gateway": spec["gateway"], "celery": spec.get("celery")}),
                                 name=GATEWAY_APP, route_prefix="/"))
    if spec.get("workers"):
        workers = consumer.build_app({"celery": spec.get("celery") or {}, "worker": spec.get("worker") or {},
                                      "num_replicas": spec["workers"]})
        targets.append(RunTarget(workers, name=WORKERS_APP, route_prefix=None))
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


if __name__ == "__main__":
    print(json.dumps(deploy(json.loads(sys.argv[1]))))
