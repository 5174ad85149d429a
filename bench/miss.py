"""Miss overhead: end-to-end miss latency over the socket minus the worker's own pipeline time.

Sequential 64x64, 2-step requests with unique prompts on one connection, so each is a miss
rendered by the worker. The worker reports the denoising call's time in the IMAGE metadata
(`pipeline_ms`); everything else (gateway, Redis, Celery both ways, PNG encoding, the cache
write) is overhead. STATUS frames give a coarse split: send -> `queued` (claim + submit),
-> `generating` (the worker picked the task up), -> IMAGE; Celery's `date_done` in the result
backend splits the last leg into the worker's part and the return path.

Celery task events (on by default, for Flower and `celery events`) cost one small PUBLISH per
event: by default the run measures a stack with events on, then one with SDGATE_TASK_EVENTS=0,
and reports the difference (`--events on|off` measures one only).

Beside each, on the same Redis: the floor, a bare Celery task's round trip with sdgate's Celery
settings and a result of the same size (bench/celery_floor.py), and the overhead above it, which is
what sdgate itself adds to a miss.

    python -m bench miss [--requests 60] [--events both|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import uuid
from datetime import datetime
from typing import Any, Dict, List

import redis

from bench import celery_floor
from bench._common import load_average, log, running_stack, summary_ms
from client import protocol
from client.protocol import GenerationRequest
from cluster.local import LocalStack

TARGET_P50_MS = 6.0  # issue 17's target for the overhead at p50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=60, help="measured misses (after 3 unmeasured)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--events", choices=["both", "on", "off"], default="both",
                        help="Celery task events on the stack (`main` only; `all` uses the shared stack)")


def timed_misses(port: int, count: int, size: int, steps: int, tag: str) -> List[Dict[str, float]]:
    """`count` sequential misses on one connection: end to end, pipeline_ms, and status times."""
    rows = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count):
            request = GenerationRequest(f"bench miss {tag} {i}: a fox in the snow", width=size, height=size,
                                        steps=steps)
            marks: Dict[str, float] = {}
            wall_sent = time.time()
            t0 = time.perf_counter()

            def on_status(status: Dict[str, Any]) -> None:
                marks.setdefault(str(status.get("state")), (time.perf_counter() - t0) * 1000)

            reply = protocol.exchange(conn, request, timeout=120, on_status=on_status)
            e2e = (time.perf_counter() - t0) * 1000
            wall_done = time.time()
            if protocol.STATUS_CACHED in marks:
                raise RuntimeError(f"request {i} was a hit; prompts must be unique")
            rows.append({"e2e_ms": e2e, "pipeline_ms": float(reply.meta["pipeline_ms"]),
                         "queued_ms": marks.get(protocol.STATUS_QUEUED, float("nan")),
                         "generating_ms": marks.get(protocol.STATUS_GENERATING, float("nan")),
                         "key": reply.meta["key"], "wall_sent": wall_sent, "wall_done": wall_done,
                         "png_bytes": len(reply.png)})
    return rows


def worker_done_ms(stack: LocalStack, rows: List[Dict[str, Any]]) -> List[float]:
    """Per miss, ms from send until the worker stored its result (Celery's `date_done`, same clock)."""
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    done = []
    for row in rows:
        for name in client.scan_iter(match=f"celery-task-meta-sdgate-{row['key']}-*", count=1000):
            meta = json.loads(client.get(name) or b"{}")
            if meta.get("status") == "SUCCESS" and meta.get("date_done"):
                stored = datetime.fromisoformat(meta["date_done"]).timestamp()
                done.append((stored - row["wall_sent"]) * 1000)
                row["worker_done_ms"] = done[-1]
                break
    return done


def measure(stack: LocalStack, args: argparse.Namespace) -> Dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    timed_misses(stack.gateway.socket_port, 3, args.size, args.steps, tag + "-warm")
    load_before = load_average()
    rows = timed_misses(stack.gateway.socket_port, args.requests, args.size, args.steps, tag)
    overhead = [row["e2e_ms"] - row["pipeline_ms"] for row in rows]
    # From `generating` (the STARTED state reached the gateway) to the image: pipeline + result path.
    after_start = [row["e2e_ms"] - row["generating_ms"] - row["pipeline_ms"] for row in rows
                   if row["generating_ms"] == row["generating_ms"]]
    worker_done_ms(stack, rows)
    timed = [row for row in rows if "worker_done_ms" in row and row["generating_ms"] == row["generating_ms"]]
    figures = {
        "requests": len(rows), "size": args.size, "steps": args.steps,
        "overhead_ms": summary_ms(overhead),
        "e2e_ms": summary_ms([row["e2e_ms"] for row in rows]),
        "pipeline_ms": summary_ms([row["pipeline_ms"] for row in rows]),
        "split_ms": {
            "send_to_queued_p50": summary_ms([row["queued_ms"] for row in rows])["p50"],
            "send_to_generating_p50": summary_ms([row["generating_ms"] for row in rows
                                                  if row["generating_ms"] == row["generating_ms"]]).get("p50"),
            "generating_to_image_minus_pipeline_p50": summary_ms(after_start).get("p50"),
            # Celery's date_done: when the worker had rendered, encoded and stored the result.
            "generating_to_worker_stored_minus_pipeline_p50": summary_ms(
                [r["worker_done_ms"] - r["generating_ms"] - r["pipeline_ms"] for r in timed]).get("p50"),
            "worker_stored_to_image_p50": summary_ms([r["e2e_ms"] - r["worker_done_ms"] for r in timed]).get("p50"),
        },
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }
    result_chars = 4 * ((sorted(row["png_bytes"] for row in rows)[len(rows) // 2] + 2) // 3)  # base64 in the result
    figures["celery_floor"] = celery_floor.measure(stack.redis_url, args.requests, result_chars)
    figures["overhead_above_celery_floor_p50_ms"] = round(
        figures["overhead_ms"]["p50"] - figures["celery_floor"]["send_to_result_ms"]["p50"], 3)
    figures["targets"] = {"miss_overhead_p50_lt_6ms": figures["overhead_ms"]["p50"] < TARGET_P50_MS}
    log(f"miss: e2e p50 {figures['e2e_ms']['p50']} ms, pipeline p50 {figures['pipeline_ms']['p50']} ms, "
        f"overhead p50 {figures['overhead_ms']['p50']} ms p99 {figures['overhead_ms']['p99']} ms, "
        f"{figures['overhead_above_celery_floor_p50_ms']} ms of it above Celery's own round trip")
    return figures


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench miss", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    figures: Dict[str, Any] = {}
    for events in (("on", "off") if args.events == "both" else (args.events,)):
        previous = os.environ.get("SDGATE_TASK_EVENTS")
        os.environ["SDGATE_TASK_EVENTS"] = "1" if events == "on" else "0"  # every process of the stack
        try:
            log(f"miss with Celery task events {events}")
            with running_stack() as stack:
                figures[f"events_{events}"] = measure(stack, args)
        finally:
            if previous is None:
                os.environ.pop("SDGATE_TASK_EVENTS", None)
            else:
                os.environ["SDGATE_TASK_EVENTS"] = previous
    if len(figures) == 1:
        return next(iter(figures.values()))
    on, off = figures["events_on"]["overhead_ms"], figures["events_off"]["overhead_ms"]
    figures["task_events_cost_ms"] = {"overhead_p50": round(on["p50"] - off["p50"], 3),
                                      "overhead_mean": round(on["mean"] - off["mean"], 3)}
    log(f"miss: task events cost {figures['task_events_cost_ms']['overhead_p50']} ms of overhead p50")
    return figures
