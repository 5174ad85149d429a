"""Throughput: images/s of a saturated worker at each batch size, against bare diffusers called
with the same batch in the same process, and how far batched images are from unbatched ones.

    python -m bench throughput [--batch-sizes 1,2,4,8] [--images 16] [--rounds 3] [--size 64] [--steps 2]

The worker side is GenerationService.handle called from B threads at once (what B Celery consumer
threads do), so it includes the batcher, PNG encoding and the result; Celery and Redis are not in
it (`bench miss` measures those). `speedup` = images/s at the best batch size / images/s at batch 1.
"""

from __future__ import annotations

import argparse

import io
import statistics
import threading
import time
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from bench._common import log
from client.protocol import GenerationRequest
from celery_bridge.batching import ShapeBatcher
from celery_bridge.config import WorkerConfig
from celery_bridge.worker import GenerationService

CPU_TARGET_AT_4 = 1.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--images", type=int, default=16, help="images per batch size and side")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (medians reported)")
    parser.add_argument("--device", default="cpu")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def worker_images_per_s(service: GenerationService, requests: List[GenerationRequest], batch: int) -> float:
    """`requests` through service.handle from `batch` threads at once (the worker saturated)."""
    service.batcher = (ShapeBatcher(lambda rs, on_step: service.runner.render_batch(rs, None, on_step), batch, 1.0)
                       if batch > 1 else None)
    failures: List[Any] = []

    def lane(mine: List[GenerationRequest]) -> None:
        for request in mine:
            result = service.handle(request.to_dict())
            if not result["ok"]:
                failures.append(result)

    threads = [threading.Thread(target=lane, args=(requests[i::batch],)) for i in range(batch)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"worker failed: {failures[0]}")
    return len(requests) / elapsed


def bare_images_per_s(service: GenerationService, requests: List[GenerationRequest], batch: int) -> float:
    """The same images as bare pipeline calls of `batch` prompts (no batcher, no PNG)."""
    runner = service.runner
    resolved = [runner.resolve(r) for r in requests]
    started = time.perf_counter()
    for i in range(0, len(resolved), batch):
        chunk = resolved[i:i + batch]
        with runner._lock:
            runner._call(chunk[0], batch=chunk)
    return len(requests) / (time.perf_counter() - started)


def max_pixel_difference(service: GenerationService, requests: List[GenerationRequest]) -> int:
    """Largest per-pixel difference between each image of one batch and the same request alone."""
    pngs, _ = service.runner.render_batch(requests)
    return max(int(np.abs(_pixels(png) - _pixels(service.runner.render(r))).max()) for png, r in zip(pngs, requests))


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    service = GenerationService(WorkerConfig(device=args.device, max_batch_size=1))
    shape = dict(width=args.size, height=args.size, steps=args.steps)
    # Warm every batch shape on both paths first, then measure in rounds (each round visits every
    # batch size, both paths), so load spikes of a shared machine hit every column alike; medians.
    samples: Dict[int, Dict[str, List[float]]] = {b: {"worker": [], "bare": []} for b in sizes}
    for round_ in range(-1, args.rounds):
        for batch in sizes:
            n = max(batch, args.images - args.images % batch)
            requests = [GenerationRequest(f"throughput r{round_} b{batch} prompt {i}", seed=1000 + i, **shape)
                        for i in range(n)]
            bare = bare_images_per_s(service, requests, batch)
            worker = worker_images_per_s(service, requests, batch)
            if round_ >= 0:
                samples[batch]["bare"].append(bare)
                samples[batch]["worker"].append(worker)
                log(f"round {round_} batch {batch}: worker {worker:.2f} images/s, bare diffusers {bare:.2f} images/s")
    runs = []
    for batch in sizes:
        worker, bare = statistics.median(samples[batch]["worker"]), statistics.median(samples[batch]["bare"])
        runs.append({"batch_size": batch, "images": max(batch, args.images - args.images % batch),
                     "rounds": args.rounds, "worker_images_per_s": round(worker, 3),
                     "bare_images_per_s": round(bare, 3), "worker_vs_bare": round(worker / bare, 3)})
    base = next(run for run in runs if run["batch_size"] == 1) if 1 in sizes else runs[0]
    best = max(runs, key=lambda run: run["worker_images_per_s"])
    at4 = next((run for run in runs if run["batch_size"] == 4), None)
    check = [GenerationRequest(f"pixel check {i}", seed=7 + i, **shape) for i in range(min(4, max(sizes)))]
    figures = {
        "device": service.runner.device, "size": args.size, "steps": args.steps, "runs": runs,
        "best_batch_size": best["batch_size"],
        "speedup": round(best["worker_images_per_s"] / base["worker_images_per_s"], 3),
        "max_pixel_difference_batched_vs_alone": max_pixel_difference(service, check),
    }
    if at4:
        figures["speedup_at_4"] = round(at4["worker_images_per_s"] / base["worker_images_per_s"], 3)
        figures["target_at_4"] = CPU_TARGET_AT_4
    return figures


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__)
    add_arguments(parser)
    return measure(parser.parse_args(argv))



