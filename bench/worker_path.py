"""Worker path: per-image time inside the worker (render + PNG) against a bare pipeline call in the
same process, and the worker process's resident memory. Prints one JSON object.

    python -m bench worker_path [--images 50] [--size 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.worker import GenerationService


def percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    started = time.monotonic()
    service = GenerationService(WorkerConfig())
    load_s = time.monotonic() - started
    requests = [GenerationRequest(f"bench image {i}", width=args.size, height=args.size, steps=args.steps)
                for i in range(args.images)]
    service.handle(requests[0].to_dict())  # warm-up: first call allocates
    worker_ms, bare_ms = [], []
    for request in requests:  # interleaved, so drift hits both sides alike
        t0 = time.perf_counter()
        result = service.handle(service.runner.resolve(request).to_dict())
        worker_ms.append((time.perf_counter() - t0) * 1000)
        assert result["ok"], result
        t0 = time.perf_counter()
        service.runner.bare_call(request)
        bare_ms.append((time.perf_counter() - t0) * 1000)
    figures = {
        "images": args.images, "size": args.size, "steps": args.steps,
        "pipeline_load_s": round(load_s, 2),
        "worker_task_ms_p50": round(statistics.median(worker_ms), 2),
        "worker_task_ms_p99": round(percentile(worker_ms, 0.99), 2),
        "bare_pipeline_ms_p50": round(statistics.median(bare_ms), 2),
        "bare_pipeline_ms_p99": round(percentile(bare_ms, 0.99), 2),
        "worker_overhead_ms_p50": round(statistics.median(worker_ms) - statistics.median(bare_ms), 2),
        "worker_rss_mib": round(rss_mib(), 1),
    }
    return figures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
