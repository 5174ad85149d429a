"""The front path under pressure, on the real stack (auth on): hundreds of waiting clients and slow
pre-auth peers must not slow cache hits nor cost threads, and a replica that dies right after
claiming a key must not strand the clients waiting for that key on another replica."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest
import redis

from client import protocol
from client.protocol import GenerationRequest
from celery_bridge import redis_keys
from tests.resolve import resolved
from tests.integration.harness import GATEWAY_REPLICA, TaskRuns, ask, healthz, replica_pids, wait_for
from tests.services import REPO, free_port

pytestmark = pytest.mark.integration
TOKEN = "pressure-token"
LEASE_S = 3.0
THREAD_SLACK = 16  # the replica may start a few threads (pools warming up), never one per waiter


@pytest.fixture(scope="module")
def stack(shared_stack):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    yield shared_stack.with_gateway(auth_token=TOKEN, max_pending_misses=300, max_waiters_per_client=2000,
                                    request_timeout_s=600, claim_lease_s=LEASE_S)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def workers_paused(stack):
    """SIGSTOP the stack's workers, so every miss waits (for as long as the test needs) at no CPU cost."""
    groups = [pid for name, pid in stack.processes.items() if name.startswith("worker")]
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        for group in groups:
            os.killpg(group, signal.SIGCONT)


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def hit_p99(stack, request: GenerationRequest, count: int = 200, rounds: int = 5) -> float:
    """A hit client's p99 latency: the median over `rounds` rounds of `count` hits, so one burst of
    another engineer's load on this shared machine does not decide the test."""
    p99s = []
    with socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=30) as conn:
        for _ in range(rounds):
            latencies = []
            for _ in range(count):
                started = time.perf_counter()
                reply = protocol.exchange(conn, request, token=TOKEN, timeout=30)
                latencies.append(time.perf_counter() - started)
                assert reply.statuses[0]["state"] == protocol.STATUS_CACHED
            latencies.sort()
            p99s.append(latencies[int(count * 0.99) - 1])
    return sorted(p99s)[rounds // 2]


def send_only(stack, request: GenerationRequest) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=60)
    conn.sendall(protocol.encode_request(request, TOKEN))
    return conn


def answer_of(conn: socket.socket) -> object:
    """The IMAGE reply or the ProtocolError that ends the exchange on `conn`."""
    try:
        while True:
            frame = protocol.read_frame(conn, 60, idle_timeout=650)
            if frame.kind == protocol.IMAGE:
                return protocol.ImageReply(*protocol.decode_image(frame), [])
            if frame.kind == protocol.ERROR:
                return protocol.decode_error(frame)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return exc
    finally:
        conn.close()


@pytest.mark.timeout(1800)  # 201 renders: about 15 s on an idle 2-core machine, 10 min on a loaded one
def test_seven_hundred_waiters_cost_no_thread_and_hits_stay_fast(stack):
    """Item 1: 500 clients on one new prompt and 200 on 200 new prompts wait while a hit client's
    p99 stays within 3x its p99 without them, and the replica's thread count stays bounded."""
    hit = GenerationRequest("pressure hit", seed=1)
    ask(stack, hit, token=TOKEN)
    [replica] = replica_pids(stack, GATEWAY_REPLICA)
    new = GenerationRequest(f"pressure new {time.time()}")
    with workers_paused(stack):
        # 1. Baseline: one lone miss waiting.
        first = send_only(stack, new)
        wait_for(lambda: healthz(stack)["waiting"] == 1, 30, "the lone miss waiting")
        quiet_p99 = hit_p99(stack, hit)
        threads_before = threads_of(replica)
        # 2. 499 more on the same prompt, 200 on 200 new prompts.
        waiters: List[socket.socket] = [first] + [send_only(stack, new) for _ in range(499)]
        # (one step, no guidance: the cheapest render, 19 ms against 51 ms, for the 200 the worker renders after)
        waiters += [send_only(stack, GenerationRequest(f"pressure new {i} {time.time()}", seed=i, steps=1,
                                                       guidance_scale=0.0)) for i in range(200)]
        wait_for(lambda: healthz(stack)["waiting"] == 700, 60, "700 waiting clients")
        # 3. Hits while they all wait: up to three tries, as a burst of the other test worker's load
        #    can slow one (ci27: 10.1 ms against 2.7 ms), while waiters that cost hits slow every try.
        busy_p99 = hit_p99(stack, hit)
        for _ in range(2):
            if busy_p99 <= 3 * quiet_p99:
                break
            busy_p99 = min(busy_p99, hit_p99(stack, hit))
        threads_during = threads_of(replica)
        assert healthz(stack)["waiting"] == 700
    print(f"\n[pressure] hit p99 {quiet_p99 * 1000:.2f} ms with 1 waiter, {busy_p99 * 1000:.2f} ms with 700; "
          f"replica threads {threads_before} -> {threads_during}")
    assert threads_during <= threads_before + THREAD_SLACK, "waiters cost threads"
    # 4. Every waiter gets its image.
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(answer_of, waiters))
    failed = [a for a in answers if not isinstance(a, protocol.ImageReply)]
    assert not failed, failed[:3]
    assert len({a.meta["key"] for a in answers[:500]}) == 1
    assert len({a.meta["key"] for a in answers[500:]}) == 200
    # 5. The waiters cost hits no more than 3x. When the busy hits look slower, the quiet p99 is
    #    measured again with the waiters gone: load the other test worker began meanwhile (project
    #    CI, 882919f: 1.6 ms quiet, 5.9 ms in every try while busy) slows that one too, waiters do not.
    if busy_p99 > 3 * quiet_p99:
        after_p99 = hit_p99(stack, hit)
        print(f"[pressure] hit p99 {after_p99 * 1000:.2f} ms once the waiters were answered")
        quiet_p99 = max(quiet_p99, after_p99)
    assert busy_p99 <= 3 * quiet_p99, (quiet_p99, busy_p99)


def test_two_hundred_slow_pre_auth_peers_while_hits_are_served(stack):
    """Item 2: peers dribbling a request header are parked on the event loop, not on threads."""
    hit = GenerationRequest("pressure hit", seed=1)
    ask(stack, hit, token=TOKEN)
    [replica] = replica_pids(stack, GATEWAY_REPLICA)
    quiet_p99 = hit_p99(stack, hit)
    threads_before = threads_of(replica)
    header = protocol.encode_request(GenerationRequest("never finished"))[:4]
    slow = [socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=30) for _ in range(200)]
    try:
        for index in range(len(header)):  # a byte at a time, round robin: all 200 mid-frame
            for conn in slow:
                conn.sendall(header[index:index + 1])
        busy_p99 = hit_p99(stack, hit)
        threads_during = threads_of(replica)
    finally:
        for conn in slow:
            conn.close()
    print(f"\n[slow peers] hit p99 {quiet_p99 * 1000:.2f} ms alone, {busy_p99 * 1000:.2f} ms with 200 slow peers; "
          f"replica threads {threads_before} -> {threads_during}")
    assert threads_during <= threads_before + THREAD_SLACK
    assert busy_p99 <= 3 * quiet_p99, (quiet_p99, busy_p99)


VICTIM = """
import json, os, signal, sys, threading
from celery_bridge.config import CeleryConfig
from celery_bridge.producer import GenerationProducer
from serve_app import stats
from serve_app.config import GatewayConfig
from serve_app.front import FrontService
from serve_app.socket_server import SocketFrontServer
from serve_app.store import open_store

config = GatewayConfig(**json.loads(sys.argv[1]))
producer = GenerationProducer(CeleryConfig(redis_url=sys.argv[2]))
store = open_store("sqlite", path=config.resolved_cache_path(), max_bytes=config.cache_max_bytes)
front = FrontService(config, producer, store, stats.Counters(producer.redis))
# SIGKILL right after winning a claim, before the task is queued: the worst moment to die.
front.hooks.after_claim = lambda key, task_id, claimed: claimed and os.kill(os.getpid(), signal.SIGKILL)
server = SocketFrontServer(front, config).start()
print("ready", server.port, flush=True)
threading.Event().wait()
"""


def test_a_replica_sigkilled_right_after_its_claim_strands_no_joiner(stack, tmp_path):
    """Item 5: the claimer dies before queueing; joiners on another replica take over within seconds."""
    port = free_port()
    config = {"socket_port": port, "auth_token": TOKEN, "claim_lease_s": LEASE_S,
              "cache_path": str(stack.paths.cache_db)}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, json.dumps(config), stack.redis_url], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "victim.log", "wb"), text=True)
    try:
        assert victim.stdout.readline().startswith("ready"), (tmp_path / "victim.log").read_text()
        request = resolved(GenerationRequest(f"claimer killed {time.time()}", seed=7))
        runs = TaskRuns(stack.redis_url, request.cache_key())
        try:
            doomed = socket.create_connection(("127.0.0.1", port), timeout=30)
            doomed.sendall(protocol.encode_request(request, TOKEN))
            victim.wait(30)
            assert victim.returncode == -signal.SIGKILL
            claim = redis.Redis.from_url(stack.redis_url).get(redis_keys.CLAIM + request.cache_key())
            assert claim is not None, "the dead replica's claim is left behind"
            assert isinstance(answer_of(doomed), (Exception, protocol.ProtocolError)), "its own client sees the end"
            killed = time.monotonic()
            with ThreadPoolExecutor(5) as pool:
                replies = list(pool.map(lambda _: ask(stack, request, token=TOKEN, timeout=120), range(5)))
            served = time.monotonic() - killed
            print(f"\n[claimer killed] 5 joiners on the surviving replica served {served:.1f} s after the kill "
                  f"(lease {LEASE_S:.0f} s)")
            assert {r.meta["key"] for r in replies} == {request.cache_key()}
            assert served < stack.gateway.request_timeout_s / 4, "joiners waited for their deadline"
            assert len(runs.started()) == 1, "rendered once"
            assert redis.Redis.from_url(stack.redis_url).exists(f"celery-task-meta-{claim.decode()}"), \
                "the survivor took over the dead replica's task id"
        finally:
            runs.close()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
