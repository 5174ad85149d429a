"""Continuous against window batching on one resident pipeline, in one run. Prints one JSON object.

    python -m bench continuous [--slots 4] [--requests 48] [--size 64] [--poisson-requests 40]

The workload mixes what users send: three step counts, two schedulers and two guidance values
(twelve shapes), prompts and seeds all different. Both schedulers get the same `slots` (the
tasks a worker holds at once: window batching's max_batch_size, the loop's max_active) and the
same pipeline:
- saturated: `slots` clients each keep one request in flight; images per second;
- Poisson arrivals at 50 % and 80 % of window batching's saturated rate; p50 and p95 latency;
- one request alone: the loop's time against a bare pipeline call (`solo_ratio`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from typing import Callable, Dict, List

from client.protocol import GenerationRequest
from celery_bridge.batching import ShapeBatcher
from celery_bridge.config import WorkerConfig
from celery_bridge.continuous import ContinuousLoop, DiffusersStepper
from celery_bridge.pipeline import PipelineRunner

STEPS = (4, 8, 12)
SCHEDULERS = ("ddim", "euler")
GUIDANCE = (7.5, 1.0)


def percentile(values: List[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def mixed(runner: PipelineRunner, count: int, size: int, tag: str, step_counts=STEPS) -> List[GenerationRequest]:
    shapes = [(steps, scheduler, guidance) for steps in step_counts for scheduler in SCHEDULERS for guidance in GUIDANCE]
    chooser = random.Random(7)
    return [runner.resolve(GenerationRequest(f"{tag} {i}", width=size, height=size, steps=steps, scheduler=scheduler,
                                             guidance_scale=guidance, seed=i))
            for i, (steps, scheduler, guidance) in enumerate(chooser.choice(shapes) for _ in range(count))]


def saturated(submit: Callable[[GenerationRequest], object], requests: List[GenerationRequest], slots: int) -> float:
    """Images per second with `slots` clients each keeping one request in flight."""
    queue = list(requests)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                request = queue.pop()
            submit(request)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(requests) / (time.perf_counter() - started)


def poisson(submit: Callable[[GenerationRequest], object], requests: List[GenerationRequest], rate: float,
            slots: int) -> Dict[str, float]:
    """Latency of requests arriving at `rate` per second (exponential gaps), at most `slots` held at
    once as a worker holds them (the rest wait in the queue, and their wait counts)."""
    gaps = random.Random(11)
    held = threading.Semaphore(slots)
    latencies: List[float] = []
    threads = []

    def one(request: GenerationRequest, arrived: float) -> None:
        with held:
            submit(request)
        latencies.append(time.perf_counter() - arrived)

    for request in requests:
        thread = threading.Thread(target=one, args=(request, time.perf_counter()))
        thread.start()
        threads.append(thread)
        time.sleep(gaps.expovariate(rate))  # the arrival process itself, not a wait for a result
    for thread in threads:
        thread.join()
    return {"p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(percentile(latencies, 0.95) * 1000, 1)}


def compare(runner: PipelineRunner, slots: int, size: int, requests: int, poisson_requests: int,
            steps=STEPS, sync: Callable[[], None] = lambda: None) -> Dict[str, object]:
    """Window against continuous batching on `runner`'s pipeline (bench continuous, bench gpu)."""
    window = ShapeBatcher(lambda batch, on_step: runner.render_batch(batch, None, on_step), slots, 0.05)
    loop = ContinuousLoop(DiffusersStepper(runner), slots, lock=runner._lock)
    systems = {"window": window.submit, "continuous": loop.submit}
    for name, submit in systems.items():  # warm-up: allocations, scheduler classes
        saturated(submit, mixed(runner, slots, size, f"warm {name}", steps), slots)

    figures: Dict[str, object] = {"slots": slots, "size": size, "steps": list(steps),
                                  "schedulers": list(SCHEDULERS), "guidance": list(GUIDANCE)}
    rates = {name: saturated(submit, mixed(runner, requests, size, f"saturate {name}", steps), slots)
             for name, submit in systems.items()}
    figures["saturated_images_per_s"] = {name: round(rate, 3) for name, rate in rates.items()}
    figures["window_batch_sizes_mean"] = round(statistics.mean(window.batches), 2) if window.batches else None
    figures["continuous_active_mean"] = round(statistics.mean(loop.iterations), 2) if loop.iterations else None
    for load in (0.5, 0.8):
        figures[f"poisson_{int(load * 100)}"] = {
            name: poisson(submit, mixed(runner, poisson_requests, size, f"poisson {load} {name}", steps),
                          load * rates["window"], slots) for name, submit in systems.items()}

    alone = runner.resolve(GenerationRequest("alone", width=size, height=size, steps=max(steps), seed=5))
    loop_s, bare_s = [], []
    for _ in range(5):  # interleaved
        started = time.perf_counter()
        loop.submit(alone)
        sync()
        loop_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        runner.bare_call(alone)
        sync()
        bare_s.append(time.perf_counter() - started)
    figures["solo_ms"] = {"loop": round(statistics.median(loop_s) * 1000, 1),
                          "bare_pipeline": round(statistics.median(bare_s) * 1000, 1)}
    return {
        "saturated_speedup": round(rates["continuous"] / rates["window"], 3),
        "p95_ratio_at_80": round(figures["poisson_80"]["continuous"]["p95_ms"] /
                                 figures["poisson_80"]["window"]["p95_ms"], 3),
        "solo_ratio": round(statistics.median(loop_s) / statistics.median(bare_s), 3),
        **figures,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--poisson-requests", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    return compare(PipelineRunner(WorkerConfig()), args.slots, args.size, args.requests, args.poisson_requests)
