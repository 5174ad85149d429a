"""Progress overhead: render time with per-step progress off, on, and on with previews every k
steps, interleaved in one process against a real redis-server. Prints one JSON object.

    python -m bench progress [--images 6] [--size 64] [--steps 20] [--every 5] [--device auto]

Targets (issue 10): progress <= 2 % and previews at k=5 <= 5 % over the bare render. Two views of
the overhead: the medians' ratio (whole renders, noisy on a shared machine) and the time spent
inside the step callback itself, timed around each call, as a share of the bare render.
`python -m bench gpu` reports the same measurement on CUDA with SD 1.5's shapes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Optional

import redis

from bench._common import free_port, log
from celery_bridge.progress import ProgressReporter
from client.protocol import GenerationRequest

TARGETS_PCT = {"progress": 2.0, "previews": 5.0}


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


def measure_overhead(render: Callable[[GenerationRequest, Optional[Callable]], Any], client: redis.Redis,
                     request: GenerationRequest, rounds: int, every: int,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """`render(request, on_step)` timed `rounds` times per mode (off, progress, previews every
    `every` steps), interleaved so drift hits every mode alike; after one warm-up render."""
    modes = {"off": None, "progress": 0, "previews": every}
    times = {mode: [] for mode in modes}
    in_callback = {mode: [] for mode in modes if modes[mode] is not None}  # ms spent in on_step, per render
    render(request, None)  # warm-up
    for i in range(rounds):
        for mode, previews in modes.items():
            reporter = None if previews is None else ProgressReporter(client, f"bench-{uuid.uuid4().hex}",
                                                                      request.steps, previews)
            spent = [0.0]

            def timed_step(*step_args, _reporter=reporter, _spent=spent, **step_kwargs):
                begun = time.perf_counter()
                _reporter.on_step(*step_args, **step_kwargs)
                _spent[0] += time.perf_counter() - begun

            sync()
            started = time.perf_counter()
            render(request, timed_step if reporter else None)
            sync()
            times[mode].append((time.perf_counter() - started) * 1000)
            if reporter:
                in_callback[mode].append(spent[0] * 1000)
        log(f"round {i + 1}/{rounds}: " + ", ".join(f"{m} {t[-1]:.0f} ms" for m, t in times.items()))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    callback = {mode: statistics.median(values) for mode, values in in_callback.items()}
    return {
        "rounds": rounds, "preview_every": every,
        "render_ms_p50": {mode: round(value, 2) for mode, value in median.items()},
        "progress_overhead_pct": round(100 * (median["progress"] / median["off"] - 1), 2),
        "previews_overhead_pct": round(100 * (median["previews"] / median["off"] - 1), 2),
        # The callback's own cost, timed around each call: the overhead without the render's noise.
        "callback_ms_per_render_p50": {mode: round(value, 3) for mode, value in callback.items()},
        "callback_overhead_pct": {mode: round(100 * value / median["off"], 3) for mode, value in callback.items()},
        "targets_pct": TARGETS_PCT,
    }


def main(argv=None) -> dict:
    from celery_bridge.config import WorkerConfig
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
        request = GenerationRequest("bench progress overhead", width=args.size, height=args.size, steps=args.steps)
        measured = measure_overhead(lambda r, on_step: runner.render(r, on_step=on_step), client, request,
                                    args.images, args.every)
        return {"benchmark": "progress", "device": runner.device, "model": args.model, "images": args.images,
                "size": args.size, "steps": args.steps, **measured}
    finally:
        process.kill()
        process.wait(5)
