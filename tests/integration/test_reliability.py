"""Faults and hostile input on the real local stack (two plain workers): nothing accepted is lost,
every bad input is answered or cut off in bounded time, and well-behaved clients keep being served.

Runs in file order on one stack; the Redis restart comes last.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from cluster.local import LocalStack, StackConfig, _stop_group
from serve_app.config import GatewayConfig
from serve_app.stats import read_stats
from tests.services import free_port

pytestmark = pytest.mark.integration
VISIBILITY_S = 4
SLOW = dict(width=512, height=512, steps=30)  # several seconds on the tiny model here


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("reliability")
    saved = dict(os.environ)
    os.environ.update(SDGATE_HOME=str(home), SDGATE_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S), SDGATE_LEASE_RENEW_S="1")
    local = LocalStack(home=home, stack=StackConfig(redis_port=free_port(), ray_port=free_port(),
                                                    dashboard_port=free_port(), workers=2),
                       gateway=GatewayConfig(socket_port=free_port(), http_port=free_port(), stats_flush_s=0.1,
                                             frame_timeout_s=2, max_pending_misses=3, request_timeout_s=90))
    try:
        local.up(log=lambda *_: None)
        yield local
    finally:
        local.down(log=lambda *_: None)
        os.environ.clear()
        os.environ.update(saved)


def connect(stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=10)


def ask(stack, request, timeout=120):
    with connect(stack) as conn:
        return protocol.exchange(conn, request, timeout=timeout)


def worker_logs(stack) -> str:
    return "".join((stack.paths.logs / f"worker-{i}.log").read_text(errors="replace") for i in range(2))


def worker_holding(stack, key: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("worker-0", "worker-1"):
            if f"sdgate-{key}" in (stack.paths.logs / f"{name}.log").read_text(errors="replace"):
                return name
        time.sleep(0.1)
    raise AssertionError("no worker received the task")


def cached_rows(stack, key: str) -> int:
    with sqlite3.connect(stack.paths.cache_db) as db:
        return db.execute("SELECT COUNT(*) FROM images WHERE key=?", (key,)).fetchone()[0]


def test_a_task_longer_than_the_visibility_timeout_runs_once(stack):
    request = GenerationRequest("one long render, run once", **SLOW)
    key = request.cache_key()
    started = time.monotonic()
    reply = ask(stack, request)
    assert time.monotonic() - started > VISIBILITY_S, "the task must outlive the visibility timeout"
    assert reply.meta["key"] == key
    time.sleep(VISIBILITY_S + 2)  # a lost lease would have redelivered it by now
    assert worker_logs(stack).count(f"sdgate.generate[sdgate-{key}") == 2, "received and succeeded, once each"


def test_worker_killed_mid_generation_loses_nothing(stack):
    request = GenerationRequest("the worker dies under me", **SLOW)
    key = request.cache_key()
    outcome = {}
    client = threading.Thread(target=lambda: outcome.setdefault("reply", ask(stack, request, timeout=120)))
    client.start()
    victim = worker_holding(stack, key)
    time.sleep(1)
    _stop_group(stack._load()["processes"][victim], timeout=0)  # SIGKILL at once
    client.join(150)
    assert "reply" in outcome, "the client got its image"
    assert outcome["reply"].meta["key"] == key
    assert cached_rows(stack, key) == 1
    survivor = "worker-1" if victim == "worker-0" else "worker-0"
    assert f"sdgate-{key}" in (stack.paths.logs / f"{survivor}.log").read_text(errors="replace")


def test_client_disconnecting_mid_generation_still_caches(stack):
    request = GenerationRequest("nobody waits for me", **dict(SLOW, steps=10))
    key = request.cache_key()
    conn = connect(stack)
    conn.sendall(protocol.encode_request(request))
    protocol.read_frame(conn, 10)  # queued
    conn.close()
    deadline = time.monotonic() + 90
    while cached_rows(stack, key) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cached_rows(stack, key) == 1
    assert ask(stack, request).statuses[0]["state"] == protocol.STATUS_CACHED


@pytest.mark.parametrize("raw, code", [
    (os.urandom(64), protocol.E_BAD_FRAME),
    (b"GET / HTTP/1.1\r\n\r\n", protocol.E_BAD_FRAME),
    (struct.pack(">3sBBI", b"SDG", 9, 1, 10), protocol.E_UNSUPPORTED_VERSION),
    (struct.pack(">3sBBI", b"SDG", 1, 1, 2**31), protocol.E_FRAME_TOO_LARGE),
    (struct.pack(">3sBBI", b"SDG", 1, 3, 10), protocol.E_FRAME_TOO_LARGE),  # clients may not send IMAGE
    (protocol.encode_frame(protocol.REQUEST, b"\xff\xfe"), protocol.E_BAD_FRAME),
    (protocol.encode_frame(protocol.REQUEST, b'{"request": {"prompt": "  "}}'), protocol.E_INVALID_REQUEST),
    (protocol.encode_frame(protocol.REQUEST, b'{"request": {"prompt": "x", "steps": -3}}'), protocol.E_INVALID_REQUEST),
    (protocol.encode_frame(protocol.REQUEST, b'{"request": {"prompt": "x", "width": "big"}}'),
     protocol.E_INVALID_REQUEST),
])
def test_bad_input_gets_its_error_code(stack, raw, code):
    with connect(stack) as conn:
        conn.sendall(raw)
        error = protocol.decode_error(protocol.read_frame(conn, 10))
    assert error.code == code and error.message


def test_truncated_frame_and_trickler_are_cut_off_while_others_are_served(stack):
    good = GenerationRequest("served while others misbehave", seed=2)
    ask(stack, good)
    trickler, truncated = connect(stack), connect(stack)
    truncated.sendall(protocol.encode_request(good)[:12])
    started = time.monotonic()
    for byte in protocol.encode_request(good):  # one byte every half second, until cut off
        try:
            trickler.sendall(bytes([byte]))
        except OSError:
            break
        assert ask(stack, good).png  # a well-behaved client meanwhile
        time.sleep(0.5)
        if time.monotonic() - started > stack.gateway.frame_timeout_s + 5:
            break
    for conn in (trickler, truncated):
        conn.settimeout(10)
        try:
            error = protocol.decode_error(protocol.read_frame(conn, 10))
            assert error.code == protocol.E_TIMEOUT
            assert conn.recv(1) == b""  # then closed
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with our unread bytes still queued: also cut off
        conn.close()
    assert time.monotonic() - started < stack.gateway.frame_timeout_s + 8


def test_a_thousand_idle_connections_do_not_starve_anyone(stack):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    idle = [connect(stack) for _ in range(1000)]
    try:
        started = time.monotonic()
        assert ask(stack, GenerationRequest("served while a thousand idle", seed=3)).png
        assert time.monotonic() - started < 30
    finally:
        for conn in idle:
            conn.close()


def test_two_hundred_concurrent_clients_on_cached_images(stack):
    prompts = [GenerationRequest(f"popular image {i}", seed=i) for i in range(10)]
    for request in prompts:
        ask(stack, request)
    errors, latencies = [], []

    def client(index: int):
        try:
            with connect(stack) as conn:
                for n in range(5):
                    t0 = time.perf_counter()
                    protocol.exchange(conn, prompts[(index + n) % len(prompts)], timeout=60)
                    latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(exc)

    with ThreadPoolExecutor(200) as pool:
        list(pool.map(client, range(200)))
    assert errors == [] and len(latencies) == 1000
    latencies.sort()
    print(f"\n200 clients x 5 cached requests: 0 errors, p50 {latencies[500] * 1000:.1f} ms, "
          f"p99 {latencies[990] * 1000:.1f} ms")


def test_pending_misses_over_the_bound_get_busy_at_once_while_hits_continue(stack):
    hit = GenerationRequest("a hit during overload", seed=4)
    ask(stack, hit)
    replies, errors = [], []

    def miss(i):
        try:
            replies.append(ask(stack, GenerationRequest(f"overload {i}", **dict(SLOW, steps=6))))
        except ProtocolError as exc:
            errors.append((exc.code, time.monotonic()))

    threads = [threading.Thread(target=miss, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1)
    assert ask(stack, hit).statuses[0]["state"] == protocol.STATUS_CACHED
    for thread in threads:
        thread.join(240)
    assert {code for code, _ in errors} == {protocol.E_BUSY} and len(errors) >= 8 - stack.gateway.max_pending_misses
    assert all(at - started < 3 for _, at in errors), "busy is answered at once"
    assert len(replies) + len(errors) == 8


def test_redis_restart_mid_flight(stack):
    in_flight = {}

    def slow_client():
        try:
            in_flight["reply"] = ask(stack, GenerationRequest("redis goes away", **dict(SLOW, steps=10)), timeout=120)
        except ProtocolError as exc:
            in_flight["error"] = exc.code
        except OSError as exc:
            in_flight["error"] = f"connection: {exc}"

    client = threading.Thread(target=slow_client)
    client.start()
    time.sleep(1)
    cached_before = sqlite3.connect(stack.paths.cache_db).execute("SELECT COUNT(*) FROM images").fetchone()[0]
    _stop_group(stack._load()["processes"]["redis"], timeout=0)
    time.sleep(2)
    stack._start_redis()  # same port, same data dir (append-only file)
    back = time.monotonic()
    client.join(130)
    assert not client.is_alive(), "never a hang"
    assert "reply" in in_flight or in_flight["error"] in protocol.RETRYABLE_CODES, in_flight
    deadline = back + 10
    while True:
        try:
            assert ask(stack, GenerationRequest(f"after redis came back {time.time()}"), timeout=15).png
            break
        except (ProtocolError, OSError):
            assert time.monotonic() < deadline, "a new miss is served within 10 s of Redis coming back"
            time.sleep(0.5)
    print(f"\nnew miss served {time.monotonic() - back:.1f} s after Redis came back; in flight: "
          f"{'image' if 'reply' in in_flight else in_flight['error']}")
    with sqlite3.connect(stack.paths.cache_db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] >= cached_before
    assert read_stats(redis.Redis.from_url(stack.redis_url))["cache_hits"] >= 0
