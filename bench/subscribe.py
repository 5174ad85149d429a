"""Result delivery to a busy listener: how long a fast task's result takes to reach the gateway
when the gateway's result listener already reads other tasks' channels.

A new watch must be subscribed before its result is published, or the result is found only by the
key read that follows the subscription. The listener re-syncs its subscriptions between reads, and
a read waits up to SUBSCRIBE_LAG_S (50 ms) for a message; a new watch wakes it through the
process's wake channel (celery_bridge/producer.py). The baseline, in the same run, is the same
producer with the wake turned off (the listener's timeout alone, as before the wake channel).

    python -m bench subscribe [--tasks 40] [--render-ms 5]

Each task: watch it (another task stays watched throughout), store and publish its result
`--render-ms` later as a worker's backend does, and time from that publish to the result in hand.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any, Dict

from bench._common import log, summary_ms
from bench.progress import start_redis
from celery_bridge.config import CeleryConfig
from celery_bridge.contract import GenerationResult
from celery_bridge.models import load_catalogue
from celery_bridge.producer import GenerationProducer, new_task_id
from client.protocol import GenerationRequest


def delivery_ms(producer: GenerationProducer, tasks: int, render_ms: float) -> Dict[str, Any]:
    request = load_catalogue().fill(GenerationRequest("bench subscribe", width=64, height=64, steps=2)).normalized()
    result = GenerationResult.success(request, b"png", pipeline_ms=render_ms, worker="bench").to_json()
    producer.watch("sdgate-busy-" + uuid.uuid4().hex, unsent=True)  # keeps the listener reading
    time.sleep(0.2)
    samples = []
    for _ in range(tasks):
        task_id = new_task_id(request.cache_key())
        future = producer.watch(task_id, unsent=True)
        time.sleep(render_ms / 1000)
        sent = time.perf_counter()
        producer.app.backend.store_result(task_id, result, "SUCCESS")
        future.result(timeout=10)
        samples.append((time.perf_counter() - sent) * 1000)
        time.sleep(0.013)  # unaligned with the listener's 50 ms reads
    return summary_ms(samples)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench subscribe", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--render-ms", type=float, default=5.0, help="from the watch to the result's publish")
    args = parser.parse_args(argv)
    process, client = start_redis()
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    try:
        figures: Dict[str, Any] = {"tasks": args.tasks, "render_ms": args.render_ms}
        for mode in ("wake_off", "wake_on"):
            producer = GenerationProducer(CeleryConfig(redis_url=url, queue="bench-subscribe-" + mode))
            if mode == "wake_off":
                producer._wake_listener = lambda: None  # the baseline: the listener's read timeout alone
            try:
                figures[mode] = {"publish_to_result_ms": delivery_ms(producer, args.tasks, args.render_ms)}
            finally:
                producer.close()
            log(f"subscribe: {mode}: publish -> result p50 {figures[mode]['publish_to_result_ms']['p50']} ms")
        return figures
    finally:
        process.kill()
        process.wait(5)
