"""What every benchmark shares: a throwaway local stack on free ports, figures, progress on stderr.

A benchmark's stdout is one JSON object; everything else (progress, the stack's own chatter)
goes to stderr, so `python -m bench hit | jq` works.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import redis

from client import protocol
from client.protocol import GenerationRequest
from cluster.local import LocalStack, StackConfig
from serve_app.config import GatewayConfig
from serve_app.stats import read_stats
from serve_app.store import SQLiteImageStore

REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    """Progress for the person watching; never on stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_average() -> List[float]:
    """1, 5 and 15 minute load averages of this machine (what `uptime` shows)."""
    with open("/proc/loadavg") as loadavg:
        return [float(part) for part in loadavg.read().split()[:3]]


def machine() -> Dict[str, Any]:
    """CPU model and count, for the figures' context."""
    fields: Dict[str, str] = {}
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return {"cpu": fields.get("model name", "?"),
            "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "cpu_mhz": fields.get("cpu MHz"), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "load_avg": load_average()}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation), e.g. fraction=0.99."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def summary_ms(values_ms: Sequence[float]) -> Dict[str, float]:
    """p50/p99/mean/max of a list of milliseconds, rounded for printing."""
    if not values_ms:
        return {"n": 0}
    return {"n": len(values_ms), "p50": round(statistics.median(values_ms), 3),
            "p99": round(percentile(values_ms, 0.99), 3), "mean": round(statistics.fmean(values_ms), 3),
            "max": round(max(values_ms), 3)}


def short_home(prefix: str = "sdgb-") -> Path:
    # Short on purpose: Ray's unix sockets live under $SDGATE_HOME/ray and their paths must stay
    # short, or LocalStack falls back to the shared /tmp/ray of whatever else runs on the machine.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def new_stack(home: Path, worker_mode: str = "celery", stats_flush_s: float = 0.1) -> LocalStack:
    """A LocalStack on free ports under `home` (nothing shared with another stack on this machine)."""
    return LocalStack(
        home=home,
        stack=StackConfig(redis_port=free_port(), ray_port=free_port(), dashboard_port=free_port(),
                          worker_mode=worker_mode),
        gateway=GatewayConfig(socket_port=free_port(), http_port=free_port(), fast_http_port=free_port(),
                              stats_flush_s=stats_flush_s),
    )


@contextlib.contextmanager
def sdgate_home(home: Path) -> Iterator[None]:
    previous = os.environ.get("SDGATE_HOME")
    os.environ["SDGATE_HOME"] = str(home)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SDGATE_HOME", None)
        else:
            os.environ["SDGATE_HOME"] = previous


@contextlib.contextmanager
def running_stack(worker_mode: str = "celery", home: Optional[Path] = None,
                  keep_home: bool = False) -> Iterator[LocalStack]:
    """`sdgate up` on free ports in a throwaway home; always `down` (and the home removed) after."""
    home = home or short_home()
    stack = new_stack(home, worker_mode)
    with sdgate_home(home):
        try:
            started = time.monotonic()
            log(f"starting a {worker_mode} stack in {home}")
            stack.up(log=lambda line: log(f"  {line}"))
            stack.up_seconds = time.monotonic() - started  # type: ignore[attr-defined]
            log(f"stack up in {stack.up_seconds:.1f} s (socket {stack.gateway.socket_port}, "  # type: ignore
                f"http {stack.gateway.http_port})")
            yield stack
        finally:
            stack.down(log=lambda line: log(f"  {line}"))
            if not keep_home:
                shutil.rmtree(home, ignore_errors=True)


def ask(port: int, request: GenerationRequest, timeout: float = 120.0) -> protocol.ImageReply:
    """One request on a new connection (a render or a hit)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol.exchange(conn, request, timeout=timeout)


def redis_client(stack: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, socket_timeout=5)


def settled_stats(stack: LocalStack, quiet_s: float = 0.5, timeout: float = 15.0) -> Dict[str, Any]:
    """The cluster-wide counters once the gateways' batched flushes have stopped moving them."""
    client = redis_client(stack)
    previous = read_stats(client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        current = read_stats(client)
        if current == previous:
            return current
        previous = current
    return previous


def floor_server_args(description: str, argv: Optional[Sequence[str]] = None):
    """A floor server's command line (--db, --port, --max-bytes): (the port to bind, the gateway's
    cache opened read-write as the gateway opens it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--db", required=True, help="the gateway's SQLite cache file")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="the store's budget (the gateway's)")
    args = parser.parse_args(argv)
    return args.port, SQLiteImageStore(Path(args.db), args.max_bytes)
