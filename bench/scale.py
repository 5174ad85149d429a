"""Scale: the whole system's throughput with N = 1, 2, 4, 8, 16 plain workers whose render is a
fixed sleep (celery_bridge/sleep_model.py: no CPU, no torch), so one machine stands in for N GPUs.

    python -m bench scale [--workers 1,2,4,8,16] [--render-ms 500] [--per-worker 10]

For each N, 10*N distinct prompts are sent at once through the gateway's socket front (one
connection each). `efficiency` = images/s / (N / render time). The gateway's CPU (its Serve replica
processes) and Redis's CPU (INFO cpu) are divided by the misses of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

from bench._common import ask, log, new_stack, redis_client, sdgate_home, short_home
from cluster.local import _group_tree
from client.protocol import GenerationRequest
from celery_bridge.presence import live_workers
from celery_bridge.sleep_model import SLEEP_MODEL, sleep_catalogue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--render-ms", type=int, default=500)
    parser.add_argument("--per-worker", type=int, default=10)
    parser.add_argument("--model", default=SLEEP_MODEL)


def efficiency(images: int, elapsed_s: float, workers: int, render_ms: float) -> Dict[str, float]:
    """images/s and its share of the ideal N / render time."""
    rate = images / elapsed_s
    return {"images_per_s": round(rate, 3), "efficiency": round(rate / (workers / (render_ms / 1000)), 3)}


def redis_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def gateway_processes(stack) -> List[psutil.Process]:
    """The Serve replica processes of this stack's Ray (celery mode: the gateway replicas only)."""
    found = []
    for name, pid in stack.processes.items():
        if "ray" not in name:
            continue
        for child in _group_tree(pid):
            try:
                process = psutil.Process(child)
                if "ServeReplica" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
    return found


def cpu_s(processes: List[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def send_at_once(port: int, prompts: List[str], token: Any = None) -> float:
    """Send every prompt on its own connection at the same moment; seconds until the last image."""
    errors: List[str] = []
    start = threading.Barrier(len(prompts) + 1)

    def one(prompt: str) -> None:
        start.wait()
        try:
            if not ask(port, GenerationRequest(prompt), timeout=600).png:
                errors.append(f"{prompt}: empty image")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{prompt}: {exc}")

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in prompts]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} requests failed, e.g. {errors[0]}")
    return elapsed


def wait_workers(client, model: str, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(live_workers(client, model)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(live_workers(client, model))} of {count} workers came up in {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def scale_stack(max_pending: int):
    """bench._common.running_stack, with room for every prompt of the biggest run in flight at once."""
    home = short_home()
    stack = new_stack(home)
    stack.gateway = dataclasses.replace(stack.gateway, max_pending_misses=max_pending)
    with sdgate_home(home):
        try:
            log(f"starting a celery stack in {home}")
            stack.up(log=lambda line: log(f"  {line}"))
            yield stack
        finally:
            stack.down(log=lambda line: log(f"  {line}"))
            shutil.rmtree(home, ignore_errors=True)


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    counts = [int(n) for n in args.workers.split(",")]
    # The stack's processes all read this catalogue: its one model is the sleep stand-in.
    os.environ["SDGATE_MODELS_FILE"] = str(sleep_catalogue(Path(tempfile.mkdtemp(prefix="sdgate-scale-"))
                                                           / "models.yaml", args.render_ms, args.model))
    os.environ.setdefault("SDGATE_CPU_THREADS", "1")
    runs = []
    with scale_stack(max(64, 2 * args.per_worker * max(counts))) as stack:
        client = redis_client(stack)
        gateway = gateway_processes(stack)
        started_workers = 1
        for workers in counts:
            for index in range(started_workers, workers):
                stack.spawn_worker(f"worker-scale-{index}", args.model)
            started_workers = max(started_workers, workers)
            wait_workers(client, args.model, workers)
            # Warm-up: every worker has taken a task (consuming, connections open) before timing.
            send_at_once(stack.gateway.socket_port, [f"scale warm-up n{workers} {i} {time.time()}"
                                                     for i in range(2 * workers)])
            prompts = [f"scale n{workers} prompt {i} {time.time()}" for i in range(args.per_worker * workers)]
            redis_before, gateway_before = redis_cpu_s(client), cpu_s(gateway)
            elapsed = send_at_once(stack.gateway.socket_port, prompts)
            redis_ms = (redis_cpu_s(client) - redis_before) * 1000 / len(prompts)
            gateway_ms = (cpu_s(gateway) - gateway_before) * 1000 / len(prompts)
            run = {"workers": workers, "images": len(prompts), "seconds": round(elapsed, 3),
                   **efficiency(len(prompts), elapsed, workers, args.render_ms),
                   "redis_cpu_ms_per_miss": round(redis_ms, 3), "gateway_cpu_ms_per_miss": round(gateway_ms, 3)}
            log(f"N={workers}: {run['images_per_s']} images/s, efficiency {run['efficiency']}, "
                f"redis {redis_ms:.2f} ms CPU/miss, gateway {gateway_ms:.2f} ms CPU/miss")
            runs.append(run)
    return {"render_ms": args.render_ms, "per_worker": args.per_worker, "gateway_replicas": len(gateway),
            "runs": runs, "target_efficiency": 0.9}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    add_arguments(parser)
    return measure(parser.parse_args(argv))
