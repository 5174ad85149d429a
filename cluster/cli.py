"""`sdgate`: run a worker, bring the local stack up or down, show its status and counters."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _worker(args: argparse.Namespace) -> int:
    from celery_bridge.models import ModelLoadError
    from celery_bridge.worker import run_worker

    celery = {"redis_url": args.broker, "queue": args.queue}
    worker = {"model": args.model, "device": args.device}
    try:
        run_worker(celery, worker, gpu=args.gpu, loglevel=args.loglevel)
    except ModelLoadError as exc:
        print(f"sdgate worker: {exc}", file=sys.stderr)
        return 2
    return 0


def _stack(args: argparse.Namespace):
    from cluster.local import LocalStack, load_stack_config
    from serve_app.config import load_gateway_config

    stack = load_stack_config(worker_mode=getattr(args, "worker_mode", None), workers=getattr(args, "workers", None))
    return LocalStack(stack=stack, gateway=load_gateway_config())


def _up(args: argparse.Namespace) -> int:
    from cluster.local import StackError

    stack = _stack(args)
    if stack.running():
        print(f"sdgate is already running from {stack.paths.home}: {json.dumps(stack.status()['addresses'])}")
        return 0
    try:
        addresses = stack.up(log=lambda line: print(f"  {line}", flush=True))
    except (StackError, ValueError) as exc:  # ValueError: the model catalogue is invalid
        print(f"sdgate up failed: {exc}\nlogs: {stack.paths.logs}", file=sys.stderr)
        return 1
    print(f"sdgate is up in {addresses['startup_s']} s\n"
          f"  socket:    {addresses['socket']}   (python client/boot.py \"a red fox\")\n"
          f"  http:      {addresses['http_fast']}/v1/images/generations   (fast: served by the gateway replicas)\n"
          f"             {addresses['http']}/v1/images/generations   (through Serve's proxy)\n"
          f"  dashboard: {addresses['dashboard']}\n"
          f"  data:      {addresses['home']}\n"
          f"open {addresses['http_fast']}/ for the web page (also on {addresses['http']}/)\n"
          f"stop it with `sdgate down`")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = _stack(args).down()
    print("nothing was running" if not stopped else f"stopped: {', '.join(stopped)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(_stack(args).status(), indent=2))
    return 0


def _redis_config(args: argparse.Namespace):
    """The Celery config of --broker, else the local stack's Redis if one ran here, else configs/celery.yaml."""
    from celery_bridge.config import load_celery_config

    broker = args.broker
    if broker is None and "SDGATE_REDIS_URL" not in os.environ:
        broker = _stack(args).status()["addresses"].get("redis")
    return load_celery_config(redis_url=broker)


def _stats(args: argparse.Namespace) -> int:
    import redis

    from serve_app.stats import read_stats

    config = _redis_config(args)
    try:
        print(json.dumps(read_stats(config.redis_client(socket_timeout=5))))
    except redis.RedisError as exc:
        print(f"sdgate stats: cannot read counters from {config.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _tenant(args: argparse.Namespace) -> int:
    """`sdgate tenant add|key|list|revoke|usage`; keys are printed alone on the last line, once."""
    import redis

    from serve_app.tenants import LIMITS, Tenant, TenantRegistry

    config = _redis_config(args)
    registry = TenantRegistry(config.redis_client(socket_timeout=5, socket_connect_timeout=5))
    try:
        if args.action == "add":
            limits = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
            key = registry.add(Tenant(args.name, weight=args.weight, **limits))
            print(f"tenant {args.name!r} added; its key is shown once, here:")
            print(key)
        elif args.action == "key":
            key = registry.add_key(args.name)
            print(f"a new key for tenant {args.name!r}, shown once, here:")
            print(key)
        elif args.action == "revoke":
            count = registry.revoke(args.name, args.key_id)
            print(f"revoked {count} key(s) of tenant {args.name!r}")
            if not count:
                return 1
        elif args.action == "list":
            print(json.dumps([dict(vars(tenant), key_ids=ids) for tenant, ids in registry.listing()], indent=2))
        else:
            print(json.dumps(registry.usage(), indent=2))
    except ValueError as exc:
        print(f"sdgate tenant {args.action}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"sdgate tenant {args.action}: cannot reach Redis at {config.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from cluster.deploy import render_serve_config, submit_serve_config

    try:
        config = render_serve_config(args.serve_config)
    except (KeyError, ValueError) as exc:
        print(f"sdgate deploy: {args.serve_config} is not deployable: {exc}", file=sys.stderr)
        return 1
    submit_serve_config(config, args.address)
    print(f"submitted {', '.join(app['name'] for app in config['applications'])} to {args.address}; "
          "watch them with `serve status`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdgate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="join the network as a Celery worker with a resident pipeline")
    worker.add_argument("--broker", help="Redis URL of the broker (default: configs/celery.yaml, SDGATE_REDIS_URL); "
                                         "the password may come from SDGATE_REDIS_PASSWORD")
    worker.add_argument("--queue", help="queue to consume (default: configs/celery.yaml)")
    worker.add_argument("--model", help="the catalogued model to serve (configs/models.yaml; default: "
                                        "configs/worker.yaml's `model`); the worker consumes only its queue")
    worker.add_argument("--device", choices=["auto", "cuda", "cpu"])
    worker.add_argument("--gpu", help="pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(run=_worker)

    up = commands.add_parser("up", help="start redis, Ray, the gateway and a worker on this machine")
    up.add_argument("--worker-mode", choices=["celery", "ray"], help="plain worker process or Ray task consumer")
    up.add_argument("--workers", type=int, help="workers per catalogued model (default: configs/local.yaml); "
                                                "a model's own `workers` in configs/models.yaml wins")
    up.set_defaults(run=_up)
    commands.add_parser("down", help="stop exactly what `sdgate up` started").set_defaults(run=_down)
    deploy = commands.add_parser("deploy", help="deploy configs/serve.yaml onto a running Ray cluster")
    deploy.add_argument("--serve-config", default="configs/serve.yaml")
    deploy.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard address")
    deploy.set_defaults(run=_deploy)
    commands.add_parser("status", help="what the local stack runs").set_defaults(run=_status)
    stats = commands.add_parser("stats", help="cluster-wide counters as one JSON object")
    stats.add_argument("--broker", help="Redis URL (default: the local stack's, else configs/celery.yaml or "
                                        "SDGATE_REDIS_URL)")
    stats.set_defaults(run=_stats)

    tenant = commands.add_parser("tenant", help="tenants: their keys, weights, limits and usage")
    actions = tenant.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a tenant and print its first key (shown once)")
    add.add_argument("name")
    add.add_argument("--weight", type=float, default=1.0, help="its share of busy workers (default 1)")
    add.add_argument("--rate-per-s", dest="rate_per_s", type=float, help="requests a second, all replicas together")
    add.add_argument("--max-queued", dest="max_queued", type=int, help="misses waiting for a worker at once")
    add.add_argument("--max-running", dest="max_running", type=int, help="renders at once; more wait their turn")
    add.add_argument("--max-size", dest="max_size", type=int, help="largest width or height, in pixels")
    add.add_argument("--max-steps", dest="max_steps", type=int, help="most denoising steps")
    actions.add_parser("key", help="print a new key for a tenant (shown once)").add_argument("name")
    revoke = actions.add_parser("revoke", help="revoke one key of a tenant (--key ID), or all of them")
    revoke.add_argument("name")
    revoke.add_argument("--key", dest="key_id", help="the key id `sdgate tenant list` shows")
    actions.add_parser("list", help="tenants, weights, limits and key ids as JSON")
    actions.add_parser("usage", help="per tenant: images served, images rendered, GPU milliseconds")
    for action in actions.choices.values():
        action.add_argument("--broker", help="Redis URL (default: the local stack's, else configs/celery.yaml or "
                                             "SDGATE_REDIS_URL)")
    tenant.set_defaults(run=_tenant)
    return parser


def _warn_unknown_variables() -> None:
    from celery_bridge.config import CeleryConfig, WorkerConfig, unknown_variables
    from cluster.local import StackConfig
    from serve_app.config import GatewayConfig

    for line in unknown_variables((CeleryConfig, WorkerConfig, GatewayConfig, StackConfig)):
        print(f"sdgate: warning: {line}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    from celery_bridge.config import ConfigError
    from celery_bridge.redis_check import RedisVersionError

    args = build_parser().parse_args(argv)
    _warn_unknown_variables()
    try:
        return args.run(args)
    except (ConfigError, RedisVersionError) as exc:  # the message says what to fix; no traceback
        print(f"sdgate {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
