"""Fairness: a light tenant's wait while a heavy one floods, with fair share on and off.

Sleep-model workers (celery_bridge/sleep_model.py: a render is a fixed sleep, no CPU) stand in
for N GPUs, N = 1 and 8. For each N and each setting of the gateway's `fair_share`, the heavy
tenant sends `--flood` * N distinct prompts at once (more than the light run lasts), then the
light tenant asks at a steady rate, a quarter
of what the workers can render (one image every 4 render times / N; `--light` of them), each on
its own connection. The light tenant's wait is its latency less one render. The scheduler's own
cost: sequential misses on an idle stack, fair share on against off, p50 difference.

Weights: tenants of weight 2 and 1 both keep `--outstanding` requests in flight for
`--weights-s` seconds on the last N; their images per second, fair share on and off.

    python -m bench fairness [--workers 1,8] [--render-ms 200] [--light 10] [--flood 50] [--misses 30]
                             [--weights-s 60] [--outstanding 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from bench._common import free_port, log, percentile, redis_client, summary_ms
from cluster.local import port_in_use
from bench.scale import scale_stack, wait_workers
from client import protocol
from client.protocol import GenerationRequest
from celery_bridge.sleep_model import SLEEP_MODEL, sleep_catalogue
from serve_app.tenants import Tenant, TenantRegistry

OPERATOR_TOKEN = "bench-fairness-operator"
TARGET_ADDED_P50_MS = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,8")
    parser.add_argument("--render-ms", type=int, default=200)
    parser.add_argument("--light", type=int, default=10, help="light-tenant requests per run")
    parser.add_argument("--flood", type=int, default=50, help="heavy-tenant requests per worker, sent at once")
    parser.add_argument("--misses", type=int, default=30, help="sequential misses per setting for the cost")
    parser.add_argument("--model", default=SLEEP_MODEL)
    parser.add_argument("--weights-s", type=float, default=60.0, help="length of the weights run (0: skip it)")
    parser.add_argument("--outstanding", type=int, default=8, help="requests each tenant keeps in flight then")


def ask_ms(port: int, prompt: str, key: str) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
        reply = protocol.exchange(conn, GenerationRequest(prompt), token=key, timeout=600)
    if not reply.png:
        raise RuntimeError(f"{prompt}: empty image")
    return (time.perf_counter() - started) * 1000


def flood_and_trickle(port: int, heavy_key: str, light_key: str, heavy: int, light: int, render_ms: int,
                      interval_s: float, tag: str) -> List[float]:
    """The light tenant's waits (ms) while the heavy tenant's `heavy` requests are in."""
    errors: List[str] = []

    def flood_one(i: int) -> None:
        try:
            ask_ms(port, f"fairness heavy {tag} {i}", heavy_key)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(str(exc))

    flood = [threading.Thread(target=flood_one, args=(i,), daemon=True) for i in range(heavy)]
    for thread in flood:
        thread.start()
    time.sleep(render_ms / 1000)  # the flood is queued before the light tenant asks
    waits: List[float] = []
    lights = []

    def light_one(i: int) -> None:
        try:
            waits.append(ask_ms(port, f"fairness light {tag} {i}", light_key) - render_ms)
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))

    for i in range(light):  # a steady rate
        thread = threading.Thread(target=light_one, args=(i,), daemon=True)
        thread.start()
        lights.append(thread)
        time.sleep(interval_s)
    for thread in lights + flood:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return waits


def waits_summary(waits_ms: List[float]) -> Dict[str, float]:
    return dict(summary_ms(waits_ms), p95=round(percentile(waits_ms, 0.95), 3))


def redeploy(stack, **settings: Any) -> None:
    """The gateway again with `settings`, on fresh ports, once the old replicas are gone."""
    old = stack.gateway.socket_port
    stack.gateway = dataclasses.replace(stack.gateway, socket_port=free_port(), fast_http_port=free_port(), **settings)
    stack._deploy()
    deadline = time.monotonic() + 120
    while port_in_use(old) or not port_in_use(stack.gateway.socket_port):
        if time.monotonic() > deadline:
            raise RuntimeError("the redeployed gateway did not replace the old one within 120 s")
        time.sleep(0.2)


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    counts = [int(n) for n in args.workers.split(",")]
    os.environ["SDGATE_MODELS_FILE"] = str(sleep_catalogue(Path(tempfile.mkdtemp(prefix="sdgate-fair-"))
                                                           / "models.yaml", args.render_ms, args.model))
    os.environ.setdefault("SDGATE_CPU_THREADS", "1")
    results: Dict[str, Any] = {"render_ms": args.render_ms, "runs": [], "target_added_p50_ms": TARGET_ADDED_P50_MS}
    with scale_stack(max(64, args.flood * max(counts) + args.light + 16)) as stack:
        client = redis_client(stack)
        registry = TenantRegistry(client)
        suffix = str(int(time.time()))
        heavy_key = registry.add(Tenant(f"heavy-{suffix}"))
        light_key = registry.add(Tenant(f"light-{suffix}"))
        started_workers = 1
        cost: Dict[str, Any] = {}
        for fair in (True, False):
            redeploy(stack, auth_token=OPERATOR_TOKEN, fair_share=fair)
            setting = "fair_share_on" if fair else "fair_share_off"
            wait_workers(client, args.model, 1)
            misses = [ask_ms(stack.gateway.socket_port, f"fairness cost {setting} {i} {suffix}", light_key)
                      for i in range(args.misses + 3)][3:]
            cost[setting] = summary_ms([ms - args.render_ms for ms in misses])
            log(f"{setting}: a lone miss costs {cost[setting]['p50']:.2f} ms above its render at p50")
        results["scheduler_cost_per_miss_ms"] = dict(cost, added_p50=round(
            cost["fair_share_on"]["p50"] - cost["fair_share_off"]["p50"], 3))
        for workers in counts:
            for index in range(started_workers, workers):
                stack.spawn_worker(f"worker-fair-{index}", args.model)
            started_workers = max(started_workers, workers)
            wait_workers(client, args.model, workers)
            run: Dict[str, Any] = {"workers": workers, "heavy_requests": args.flood * workers,
                                   "light_requests": args.light,
                                   "light_interval_ms": round(4 * args.render_ms / workers, 1)}
            for fair in (True, False):
                redeploy(stack, fair_share=fair)
                setting = "fair_share_on" if fair else "fair_share_off"
                waits = flood_and_trickle(stack.gateway.socket_port, heavy_key, light_key, args.flood * workers, args.light,
                                          args.render_ms, 4 * args.render_ms / 1000 / workers,
                                          f"{setting} n{workers} {suffix}")
                run[setting] = {"light_wait_ms": waits_summary(waits)}
                log(f"N={workers} {setting}: light p50 {run[setting]['light_wait_ms']['p50']:.0f} ms, "
                    f"p95 {run[setting]['light_wait_ms']['p95']:.0f} ms")
            results["runs"].append(run)
        if args.weights_s > 0:
            double, single = registry.add(Tenant(f"weight2-{suffix}", weight=2)), registry.add(
                Tenant(f"weight1-{suffix}", weight=1))
            weights: Dict[str, Any] = {"workers": max(counts), "seconds": args.weights_s,
                                       "outstanding_each": args.outstanding}
            for fair in (True, False):
                redeploy(stack, fair_share=fair)
                setting = "fair_share_on" if fair else "fair_share_off"
                rates = saturate(stack.gateway.socket_port, {"weight2": double, "weight1": single},
                                 args.outstanding, args.weights_s, f"{setting} {suffix}")
                weights[setting] = dict(images_per_s=rates, ratio=round(rates["weight2"] / max(rates["weight1"], 1e-9), 3))
                log(f"weights {setting}: {rates}, ratio {weights[setting]['ratio']}")
            weights["target_ratio"] = 2.0
            results["weights"] = weights
    return results


def saturate(port: int, keys: Dict[str, str], outstanding: int, seconds: float, tag: str) -> Dict[str, float]:
    """Each tenant keeps `outstanding` requests in flight; images per second each finished in the
    window after a warm-up of a tenth of it."""
    started = time.monotonic()
    window = (started + seconds / 10, started + seconds)
    finished: Dict[str, int] = {name: 0 for name in keys}
    lock = threading.Lock()
    errors: List[str] = []

    def loop(name: str, key: str, lane: int) -> None:
        n = 0
        while time.monotonic() < window[1]:
            try:
                ask_ms(port, f"fairness weights {tag} {name} {lane} {n}", key)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(str(exc))
                return
            n += 1
            if window[0] <= time.monotonic() <= window[1]:
                with lock:
                    finished[name] += 1

    threads = [threading.Thread(target=loop, args=(name, key, lane), daemon=True)
               for name, key in keys.items() for lane in range(outstanding)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    span = window[1] - window[0]
    return {name: round(count / span, 3) for name, count in finished.items()}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench fairness", description=__doc__)
    add_arguments(parser)
    return measure(parser.parse_args(argv))
