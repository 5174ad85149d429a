"""The floor under a miss: a bare Celery task's round trip with sdgate's own Celery settings.

A task that does nothing but return a result the size of a miss's (a base64 string as long as the
miss's PNG would be), on a solo `celery worker` built as sdgate's is (celery_bridge.app's settings
and result backend, celery_bridge.worker's command line), over the same Redis. The sender
subscribes to the result's channel first and sends with `send_task`, as the gateway does. What a
miss costs above this round trip is sdgate's own: its frames, cache, claim, leases, fair share,
start check and PNG. `python -m bench miss` runs it on its stack's Redis, in the same run.

    python -m bench.celery_floor --redis-url redis://127.0.0.1:6379/0 [--requests 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import redis

from bench._common import log, summary_ms
from celery_bridge.config import load_celery_config

TASK = "sdgate.bench.floor"
MODEL = "bench-floor"  # its queue is queue_for(base queue, MODEL): no sdgate worker consumes it
READY_TIMEOUT_S = 60.0


def serve(redis_url: str) -> None:
    """The floor's worker (blocks): sdgate's Celery app and command line, a task that only answers."""
    from celery_bridge.app import WorkerRedisBackend, make_celery_app
    from celery_bridge.worker import worker_argv

    config = load_celery_config(redis_url=redis_url)
    app = make_celery_app(config, name="sdgate-bench-floor", backend=WorkerRedisBackend)

    @app.task(name=TASK)
    def floor(result_chars: int) -> Dict[str, Any]:
        return {"ok": True, "started": time.time(), "png": "A" * result_chars}

    app.worker_main(worker_argv(config, f"bench-floor-{os.getpid()}@{socket.gethostname()}", "INFO", MODEL))


@contextlib.contextmanager
def floor_worker(redis_url: str) -> Iterator[subprocess.Popen]:
    """The floor's worker as a process of its own, ready to take tasks; stopped by PID after."""
    logs = Path(tempfile.mkdtemp(prefix="sdgate-bench-floor-"))
    with open(logs / "worker.log", "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "bench.celery_floor", "--serve", "--redis-url", redis_url],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"ready." not in (logs / "worker.log").read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor's Celery worker did not start: {(logs / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def timed_round_trips(redis_url: str, count: int, result_chars: int) -> List[Dict[str, float]]:
    """`count` sequential floor tasks: ms from `send_task` to the body's start and to the result's PUBLISH."""
    from celery_bridge.app import SendOnlyRedisBackend, make_celery_app
    from celery_bridge.models import queue_for

    config = load_celery_config(redis_url=redis_url)
    app = make_celery_app(config, name="sdgate-bench-floor-sender", backend=SendOnlyRedisBackend)
    queue = queue_for(config.queue, MODEL)
    prefix = app.backend.task_keyprefix
    prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
    listener = redis.Redis.from_url(redis_url, socket_timeout=30).pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(f"{prefix}floor-*")  # confirmed below, before the first send
    while not listener.subscribed:
        listener.get_message(timeout=5)
    rows = []
    try:
        for _ in range(count):
            task_id = f"floor-{uuid.uuid4().hex}"
            wall_sent, started = time.time(), time.perf_counter()
            app.send_task(TASK, args=[result_chars], task_id=task_id, queue=queue)
            while True:
                message = listener.get_message(timeout=1)
                if message is not None and message["channel"].decode() == prefix + task_id:
                    break
                if time.perf_counter() - started > 30:
                    raise RuntimeError(f"no result for floor task {task_id} within 30 s")
            seen = (time.perf_counter() - started) * 1000
            result = json.loads(message["data"])["result"]
            rows.append({"task_id": task_id, "send_to_result_ms": seen,
                         "send_to_body_ms": (result["started"] - wall_sent) * 1000})
    finally:
        listener.close()
    return rows


def measure(redis_url: str, requests: int = 60, result_chars: int = 4096) -> Dict[str, Any]:
    """The floor's figures on `redis_url`: 3 unmeasured round trips, then `requests` measured."""
    with floor_worker(redis_url):
        timed_round_trips(redis_url, 3, result_chars)
        rows = timed_round_trips(redis_url, requests, result_chars)
    figures = {"requests": len(rows), "result_chars": result_chars,
               "send_to_result_ms": summary_ms([row["send_to_result_ms"] for row in rows]),
               "send_to_body_ms": summary_ms([row["send_to_body_ms"] for row in rows])}
    log(f"celery floor: send -> result p50 {figures['send_to_result_ms']['p50']} ms, "
        f"send -> task body p50 {figures['send_to_body_ms']['p50']} ms")
    return figures


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--result-chars", type=int, default=4096, help="the result's base64 image, in characters")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the worker process itself
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.redis_url)
        return {}
    return measure(args.redis_url, args.requests, args.result_chars)


if __name__ == "__main__":
    figures = main()
    if figures:
        print(json.dumps(figures), flush=True)
