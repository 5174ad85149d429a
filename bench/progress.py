"""Progress overhead: render time with per-step progress off, on, and on with previews every k
steps, interleaved in one process against a real redis-server. Prints one JSON object.

    python -m bench progress [--images 6] [--size 64] [--steps 20] [--every 5] [--device auto]

Targets (issue 10): progress <= 2 % and previews at k=5 <= 5 % over the bare render.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid

import redis

from bench._common import free_port, log
from celery_bridge.config import WorkerConfig
from celery_bridge.progress import ProgressReporter
from client.protocol import GenerationRequest


def start_redis():
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sdgb-redis-")
    process = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                "127.0.0.1", "--save", "", "--dir", workdir], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def main(argv=None) -> dict:
    from celery_bridge.pipeline import PipelineRunner

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="a preview every k steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)

    process, client = start_redis()
    try:
        runner = PipelineRunner(WorkerConfig(model=args.model, device=args.device))
        modes = {"off": None, "progress": 0, "previews": args.every}
        times = {mode: [] for mode in modes}
        request = GenerationRequest("bench progress overhead", width=args.size, height=args.size, steps=args.steps)
        runner.render(request)  # warm-up
        for i in range(args.images):
            for mode, previews in modes.items():  # interleaved, so drift hits every mode alike
                reporter = None if previews is None else ProgressReporter(client, f"bench-{uuid.uuid4().hex}",
                                                                          args.steps, previews)
                started = time.perf_counter()
                runner.render(request, on_step=reporter.on_step if reporter else None)
                times[mode].append((time.perf_counter() - started) * 1000)
            log(f"round {i + 1}/{args.images}: " + ", ".join(f"{m} {t[-1]:.0f} ms" for m, t in times.items()))
        median = {mode: statistics.median(values) for mode, values in times.items()}
        return {
            "benchmark": "progress", "device": runner.device, "model": args.model, "images": args.images,
            "size": args.size, "steps": args.steps, "preview_every": args.every,
            "render_ms_p50": {mode: round(value, 2) for mode, value in median.items()},
            "progress_overhead_pct": round(100 * (median["progress"] / median["off"] - 1), 2),
            "previews_overhead_pct": round(100 * (median["previews"] / median["off"] - 1), 2),
            "targets_pct": {"progress": 2.0, "previews": 5.0},
        }
    finally:
        process.kill()
        process.wait(5)
