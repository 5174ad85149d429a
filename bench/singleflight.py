"""Single-flight: 32 clients ask for the same new prompt at once; it must be rendered once.

Each client is its own process with its own connection, released together from a barrier.
Figures per round: generations submitted (the delta of sdgate's cluster-wide counters in Redis;
must be 1), and when the last of the 32 got its image, against a lone miss of another fresh
prompt of the same size measured just before; also both net of the worker's pipeline time,
which swings with CPU contention and would otherwise drown the cost of the fan-out.

    python -m bench singleflight [--clients 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
import uuid
from typing import Any, Dict

from bench import _clients
from bench._common import load_average, log, running_stack, settled_stats
from client import protocol
from client.protocol import GenerationRequest
from cluster.local import LocalStack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="each with a new prompt and a new lone miss")


def _delta(after: Dict[str, Any], before: Dict[str, Any], name: str) -> int:
    return int(after[name]) - int(before[name])


def one_round(stack: LocalStack, clients: int, tag: str) -> Dict[str, Any]:
    port = stack.gateway.socket_port
    # 1. The baseline: a lone miss of a fresh prompt, timed like the crowd's (connected first).
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        lone = protocol.exchange(conn, GenerationRequest(f"bench singleflight lone {tag}: an owl at night"),
                                 timeout=300)
        lone_ms = (time.monotonic() - started) * 1000
    lone_pipeline_ms = float(lone.meta["pipeline_ms"])
    # 2. The crowd: the same new prompt from every client at once.
    before = settled_stats(stack)
    replies = _clients.simultaneous(port, GenerationRequest(f"bench singleflight crowd {tag}: an owl at night"),
                                    clients)
    after = settled_stats(stack)
    errors = [reply["error"] for reply in replies if "error" in reply]
    good = [reply for reply in replies if "error" not in reply]
    first_sent = min(reply["sent"] for reply in good)
    last_ms = max(reply["done"] - reply["sent"] for reply in good) * 1000
    span_ms = (max(reply["done"] for reply in good) - first_sent) * 1000
    states = [state for reply in good for state in reply["states"]]
    crowd_pipeline_ms = max(reply["pipeline_ms"] for reply in good)  # one generation: all report the same
    return {
        "generations": _delta(after, before, "generations"),
        "cache_misses": _delta(after, before, "cache_misses"),
        "cache_hits": _delta(after, before, "cache_hits"),
        "singleflight_joins": _delta(after, before, "singleflight_joins"),
        "errors": len(errors) + _delta(after, before, "errors"),
        "distinct_images": len({reply["png_sha"] for reply in good}),
        "replies": len(good),
        "status_counts": {state: states.count(state) for state in sorted(set(states))},
        "lone_miss_ms": round(lone_ms, 1),
        "last_waiter_ms": round(last_ms, 1),
        "first_send_to_last_image_ms": round(span_ms, 1),
        "send_spread_ms": round((max(reply["sent"] for reply in good) - first_sent) * 1000, 1),
        "last_waiter_vs_lone_miss": round(last_ms / lone_ms, 2),
        # The worker's pipeline time swings with CPU contention on a shared machine; net of it,
        # what is left is the cost of the fan-out itself (32 waiters woken, 32 images sent).
        "lone_miss_pipeline_ms": round(lone_pipeline_ms, 1),
        "crowd_pipeline_ms": round(crowd_pipeline_ms, 1),
        "lone_miss_net_ms": round(lone_ms - lone_pipeline_ms, 1),
        "last_waiter_net_ms": round(last_ms - crowd_pipeline_ms, 1),
        **({"error_sample": errors[:3]} if errors else {}),
    }


def measure(stack: LocalStack, args: argparse.Namespace) -> Dict[str, Any]:
    load_before = load_average()
    rounds = []
    for index in range(args.rounds):
        result = one_round(stack, args.clients, f"{uuid.uuid4().hex[:8]}-{index}")
        log(f"round {index}: generations {result['generations']}, last waiter {result['last_waiter_ms']} ms, "
            f"lone miss {result['lone_miss_ms']} ms, errors {result['errors']}")
        rounds.append(result)
    ratios = [r["last_waiter_vs_lone_miss"] for r in rounds]
    return {
        "clients": args.clients, "rounds": rounds,
        "generations_per_round": [r["generations"] for r in rounds],
        "last_waiter_ms_median": statistics.median(r["last_waiter_ms"] for r in rounds),
        "lone_miss_ms_median": statistics.median(r["lone_miss_ms"] for r in rounds),
        "last_waiter_vs_lone_miss_median": statistics.median(ratios),
        "lone_miss_net_ms_median": statistics.median(r["lone_miss_net_ms"] for r in rounds),
        "last_waiter_net_ms_median": statistics.median(r["last_waiter_net_ms"] for r in rounds),
        "targets": {"one_generation_per_round": all(r["generations"] == 1 for r in rounds),
                    "no_errors": all(r["errors"] == 0 for r in rounds)},
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench singleflight", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with running_stack() as stack:
        return measure(stack, args)
