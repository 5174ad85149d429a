"""Tools shared by the fault, bad-input and load suites: a whole local stack on free ports in a
short throwaway home, clients, and probes that see what a user (or an operator) would see."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import shutil
import socket
import ssl
import sqlite3
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import redis

from celery_bridge import progress, redis_keys
from client import protocol
from client.protocol import MAX_STEPS, GenerationRequest
from cluster.local import LocalStack, StackConfig, _group_tree, port_in_use
from serve_app.config import GatewayConfig
from serve_app.stats import read_stats
from tests.services import free_port

RESULT_PREFIX = "celery-task-meta-"  # Celery's Redis result backend: key and channel of each task's state
GATEWAY_REPLICA = "ServeReplica:gateway:Gateway"
WORKER_REPLICA = "ServeReplica:workers-"  # workers-<model>:GenerationConsumer
# A test stack keeps nothing, and its Redis goes with it: SIGKILL at once. Waiting buys nothing:
# Ray's processes with Serve running sit out SIGTERM (they drain for up to 30 s) and a Celery worker's
# warm shutdown takes 2 to 3 s, so every stack's teardown cost 5 to 8 s.
DOWN_TIMEOUT_S = 0.0


def _new_stack(mode: str, workers: int, **gateway: object) -> LocalStack:
    """A LocalStack on free ports in a short new home: Ray keeps its sockets and logs inside it
    rather than in a /tmp/ray that other stacks on this machine share. No dashboard: no test reads it."""
    home = Path(tempfile.mkdtemp(prefix="sdg-", dir="/tmp"))
    return LocalStack(home=home, gateway=_gateway_config(**gateway),
                      stack=StackConfig(redis_port=free_port(), ray_port=free_port(), dashboard_port=free_port(),
                                        dashboard=False, worker_mode=mode, workers=workers))


def _gateway_config(http_port: Optional[int] = None, **gateway: object) -> GatewayConfig:
    return GatewayConfig(socket_port=free_port(), http_port=http_port or free_port(), fast_http_port=free_port(),
                         **dict({"stats_flush_s": 0.1}, **gateway))


def _remove_home(stack: LocalStack) -> None:
    if not os.environ.get("SDGATE_TEST_KEEP_HOME"):  # set it to read the stack's logs after a failure
        shutil.rmtree(stack.paths.home, ignore_errors=True)


@contextmanager
def local_stack(mode: str = "celery", workers: int = 1, env: Optional[Dict[str, str]] = None,
                **gateway: object) -> Iterator[LocalStack]:
    """`sdgate up` on free ports; `env` (SDGATE_* overrides) reaches every process of the stack.

    A stack of its own is for a module that kills processes or changes what workers, Redis or
    Serve's proxy run with; gateway settings alone share SharedStack's.
    """
    stack = _new_stack(mode, workers, **gateway)
    saved = dict(os.environ)
    os.environ.update(dict(env or {}, SDGATE_HOME=str(stack.paths.home)))
    try:
        stack.up(log=lambda *_: None)
        yield stack
    except BaseException:
        print(log_tails(stack))  # the failure report carries the stack's own account; its home goes next
        raise
    finally:
        stack.down(log=lambda *_: None, timeout=DOWN_TIMEOUT_S)
        os.environ.clear()
        os.environ.update(saved)
        _remove_home(stack)


def log_tails(stack: LocalStack, lines: int = 40) -> str:
    """The last `lines` lines of each of the stack's logs, headed by the file's name."""
    parts = []
    for log_file in sorted(stack.paths.logs.glob("*.log")) if stack.paths.logs.is_dir() else []:
        tail = log_file.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log_file.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no logs under {stack.paths.logs})"


class SharedStack:
    """The session's one local stack (celery mode, one worker), started on first use, for every
    module whose settings are gateway settings.

    with_gateway(**settings) redeploys the gateway application with those settings, on fresh socket
    and fast-HTTP ports, over the same Redis, Ray head, worker and Serve proxy port, and returns the
    stack as that gateway sees it; the old replicas are gone (their socket port closed) before it
    returns, so nothing answers with the previous settings. Redis (cache, counters) is shared.
    """

    def __init__(self) -> None:
        self._base: Optional[LocalStack] = None
        self._current: Optional[LocalStack] = None
        self._settings: Optional[Dict[str, object]] = None

    def with_gateway(self, **settings: object) -> LocalStack:
        if self._current is not None and settings == self._settings:
            return self._current
        if self._base is not None and not self._base.running():
            raise RuntimeError("the shared stack was stopped by a test; a test that stops its stack needs its own "
                               "(harness.local_stack)")
        if self._base is None:
            self._base = _new_stack("celery", 1, **settings)
            self._base.up(log=lambda *_: None)
            self._current = self._base
        else:
            previous = self._current
            variant = copy.copy(self._base)
            variant.gateway = _gateway_config(http_port=self._base.gateway.http_port, **settings)
            variant._deploy()
            wait_for(lambda: not port_in_use(previous.gateway.socket_port), 60, "the previous gateway replicas gone")
            self._current = variant
        self._settings = settings
        return self._current

    def close(self) -> None:
        if self._base is not None:
            self._base.down(log=lambda *_: None, timeout=DOWN_TIMEOUT_S)
            _remove_home(self._base)


def connect(stack: LocalStack, source: Optional[str] = None, timeout: float = 10) -> socket.socket:
    """A socket to the gateway, optionally from another loopback address (the rate limit is per address);
    TLS, trusting the stack's own certificate, when the stack has one."""
    conn = socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    if not stack.gateway.tls_certfile:
        return conn
    return ssl.create_default_context(cafile=stack.gateway.tls_certfile).wrap_socket(conn, server_hostname="127.0.0.1")


def ask(stack: LocalStack, request: GenerationRequest, token: Optional[str] = None, timeout: float = 120,
        source: Optional[str] = None) -> protocol.ImageReply:
    with connect(stack, source) as conn:
        return protocol.exchange(conn, request, token=token, timeout=timeout)


def healthz(stack: LocalStack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.http_port}/healthz", timeout=10) as response:
        return json.loads(response.read())


def task_results(client: redis.Redis, key: str) -> List[Dict[str, Any]]:
    """The stored Celery result (the task body's return) of every task that rendered `key`."""
    metas = [json.loads(client.get(name) or b"{}") for name in client.scan_iter(match=f"{RESULT_PREFIX}sdgate-{key}-*")]
    return [meta["result"] for meta in metas if isinstance(meta.get("result"), dict)]


def finished_task(client: redis.Redis, task_id: str, timeout: float = 120, interval: float = 0.1) -> Dict[str, Any]:
    """`task_id`'s stored Celery state once it is SUCCESS or FAILURE (its whole meta), polled."""
    def finished():
        raw = client.get(RESULT_PREFIX + task_id)
        meta = json.loads(raw) if raw else None
        return meta if meta and meta.get("status") in ("SUCCESS", "FAILURE") else None

    return wait_for(finished, timeout, f"the result of {task_id}", interval)


def wait_for(check: Callable[[], object], timeout: float = 15.0, what: str = "condition", interval: float = 0.1):
    """check()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - e.g. a port not listening yet; reported below
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def replica_pids(stack: LocalStack, title: str) -> List[int]:
    """PIDs of this stack's Ray actors whose process title contains `title` (never another stack's)."""
    pids = []
    for pid in _group_tree(stack._load()["processes"]["ray"]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if title.encode() in cmdline.read():
                    pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def counters(stack: LocalStack) -> dict:
    return read_stats(redis.Redis.from_url(stack.redis_url))


def settled_counters(stack: LocalStack) -> dict:
    """Counters once the gateways' batched flushes have caught up (no change for a while)."""
    previous = counters(stack)
    while True:
        time.sleep(0.5)
        current = counters(stack)
        if current == previous:
            return current
        previous = current


def cached_pngs(stack: LocalStack, key: str) -> List[bytes]:
    """The PNGs the stack's SQLite cache holds under `key`, read straight from the file."""
    with sqlite3.connect(stack.paths.cache_db) as db:
        return [row[0] for row in db.execute("SELECT png FROM images WHERE key = ?", (key,))]


def cache_entries(stack: LocalStack) -> int:
    with sqlite3.connect(stack.paths.cache_db) as db:
        return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


def cache_integrity(stack: LocalStack) -> str:
    """SQLite's verdict on the cache file, opened afresh: "ok" when sound."""
    with sqlite3.connect(stack.paths.cache_db) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TaskRuns:
    """Every start and finish of the Celery tasks that render `key`, as the result backend publishes
    them (the STARTED state its worker's start check stores): a run of the task on any worker shows up here, with its pid."""

    def __init__(self, redis_url: str, key: str):
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"{RESULT_PREFIX}sdgate-{key}-*")
        self.events: List[Tuple[str, Optional[int]]] = []  # (state, pid of the worker for STARTED)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except (redis.RedisError, OSError):
                return
            if message and message["type"] == "pmessage":
                meta = json.loads(message["data"])
                result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
                self.events.append((meta.get("status"), result.get("pid")))

    def started(self) -> List[int]:
        return [pid for state, pid in list(self.events) if state == "STARTED"]

    def succeeded(self) -> int:
        return sum(1 for state, _ in list(self.events) if state == "SUCCESS")

    def wait_started(self, timeout: float = 60) -> int:
        """The pid of the first worker that started the task."""
        return wait_for(lambda: self.started() and self.started()[0], timeout, "a worker starting the task")

    def wait_succeeded(self, timeout: float = 30) -> int:
        """How many runs succeeded, once the first success is read: the image reaches its client on
        the gateway's connection, maybe before this subscriber reads the same publish."""
        wait_for(lambda: self.succeeded() >= 1, timeout, "the success event")
        return self.succeeded()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        try:
            self._pubsub.close()
            self._client.close()
        except Exception:  # noqa: BLE001 - closing after Redis went away
            pass


def steps_done(stack: LocalStack, key: str) -> int:
    """The most denoising steps any run of the task rendering `key` has reported (0 before its first)."""
    prefix = redis_keys.PROGRESS_LAST
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5, decode_responses=True)
    try:
        events = [progress.last_event(client, name[len(prefix):])
                  for name in client.scan_iter(match=f"{prefix}sdgate-{key}-*")]
    finally:
        client.close()
    return max((event.get("step", 0) for event in events if event), default=0)


_SECONDS_PER_STEP: Dict[str, float] = {}


def slow_request(stack: LocalStack, prompt: str, seconds: float) -> GenerationRequest:
    """A new request whose generation takes about `seconds` (at least) on this stack's workers.

    Timed once per stack on two step counts, so the denoising cost per step is measured without
    the fixed text-encoder and VAE cost, on whatever hardware runs the suite. A step is taken to
    cost at least a quarter of the 24-step render's average: a 4-step render slowed by a
    neighbour's load can make the difference almost nil, and the "3 s" request then a 2048x2048 one
    of 150 steps that holds the worker for minutes (the likely cause of ci25, where the tests that
    use this ran 10 to 80 times longer than alone). Each count is timed once: keeping the faster of
    two timings gave 0.07 s a step where one gave 0.11 s, so its requests had 1.6x the steps and
    the tests using them ran up to 21 s longer under the suite's load.
    """
    home = str(stack.paths.home)
    if home not in _SECONDS_PER_STEP:
        timings = [ask(stack, GenerationRequest(f"calibration {steps} {time.time()}", width=512, height=512,
                                                steps=steps)).meta["pipeline_ms"] / 1000 for steps in (4, 24)]
        _SECONDS_PER_STEP[home] = max((timings[1] - timings[0]) / 20, timings[1] / 24 / 4)
    per_step = _SECONDS_PER_STEP[home]
    for side in (512, 768, 1024, 1536, 2048):
        steps = math.ceil(seconds * 1.2 / (per_step * (side / 512) ** 2))
        if steps <= MAX_STEPS:
            return GenerationRequest(prompt, width=side, height=side, steps=max(steps, 2))
    return GenerationRequest(prompt, width=2048, height=2048, steps=MAX_STEPS)


class Loop:
    """An event loop on a thread, as each replica's front runs its waiters on one."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def gather(self, *coroutines, timeout: float = 180) -> List[Any]:
        """Each coroutine's result (or the exception it raised), all running at once."""
        async def together():
            return await asyncio.gather(*coroutines, return_exceptions=True)

        return self.run(together(), timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
