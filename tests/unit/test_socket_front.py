"""The asyncio socket front against a scripted FrontService: slow peers, the accept path, TLS and
the per-address caps. No services: the real stack is tested in tests/integration."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from serve_app.admission import Admission
from serve_app.config import GatewayConfig
from serve_app.front import Answer
from serve_app.socket_server import SocketFrontServer
from tests.resolve import key_of
from tests.tls import make_certificate

PNG = b"\x89PNG\r\n\x1a\nfake"
TOKEN = "s3cret"


class Counters:
    def __init__(self):
        self.errors: List[str] = []

    def error(self, code: str) -> None:
        self.errors.append(code)

    def incr(self, name: str, amount: int = 1) -> None:
        pass


class FakeFront:
    """Hits for every prompt, answered at once."""

    def __init__(self, config: GatewayConfig):
        self.admission = Admission(config)
        self.counters = Counters()

    async def generate_async(self, request, on_status=None, client="?", **_):
        if on_status:
            on_status(protocol.STATUS_CACHED)
        return Answer({"key": key_of(request)}, PNG, cached=True)


def serve(**overrides) -> SocketFrontServer:
    config = GatewayConfig(**dict({"socket_port": 0, "frame_timeout_s": 30.0}, **overrides))
    return SocketFrontServer(FakeFront(config), config).start()


@pytest.fixture
def servers():
    started: List[SocketFrontServer] = []

    def start(**overrides) -> SocketFrontServer:
        started.append(serve(**overrides))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def hit(server: SocketFrontServer, token=TOKEN, timeout=10.0, wrap=None) -> protocol.ImageReply:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw:
        conn = wrap(raw) if wrap else raw
        return protocol.exchange(conn, GenerationRequest("a hit", seed=1), token=token, timeout=timeout)


def hit_latencies(server: SocketFrontServer, count: int) -> List[float]:
    latencies = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        for _ in range(count):
            started = time.perf_counter()
            reply = protocol.exchange(conn, GenerationRequest("a hit", seed=1), token=TOKEN, timeout=10)
            latencies.append(time.perf_counter() - started)
            assert reply.png == PNG
    return sorted(latencies)


def test_two_hundred_slow_pre_auth_peers_cost_no_thread_and_hits_go_on(servers):
    """Item 2: peers dribbling a header are parked on the loop; hits are answered meanwhile."""
    server = servers(auth_token=TOKEN)
    quiet = hit_latencies(server, 50)
    threads_before = threading.active_count()
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(200)]
    deadline = time.monotonic() + 30
    while server.open_connections < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        header = protocol.encode_request(GenerationRequest("never finished"))[:5]
        for byte in range(3):  # a few bytes each, then nothing: all 200 are mid-frame
            for conn in slow:
                conn.sendall(header[byte:byte + 1])
        busy = hit_latencies(server, 50)
        assert threading.active_count() <= threads_before, "a slow peer costs a thread"
    finally:
        for conn in slow:
            conn.close()
    # The p99 comparison lives in tests/integration/test_front_pressure.py; here the medians, which
    # stay meaningful on a loaded test machine.
    p50_quiet, p50_busy = quiet[len(quiet) // 2], busy[len(busy) // 2]
    print(f"\n[slow peers] hit p50 {p50_quiet * 1000:.2f} ms alone, {p50_busy * 1000:.2f} ms with 200 slow peers")
    assert p50_busy <= 3 * p50_quiet, (p50_quiet, p50_busy)


def test_one_exception_on_the_accept_path_never_ends_socket_service(servers):
    """Item 6: the registration of a connection raising must cost that connection only."""
    server = servers()
    calls = []
    original = server.admission.open_connection

    def flaky(client):
        calls.append(client)
        if len(calls) == 1:
            raise RuntimeError("a bug while registering a connection")
        original(client)

    server.admission.open_connection = flaky
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(1) == b"", "the broken connection is closed"
    assert hit(server).png == PNG
    assert server.alive()


def test_connections_over_the_per_address_cap_get_busy(servers):
    server = servers(max_connections_per_client=3)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while server.open_connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            with pytest.raises(ProtocolError) as refused:
                protocol.exchange(extra, GenerationRequest("one too many"), timeout=5)
        assert refused.value.code == protocol.E_BUSY and "3" in refused.value.message
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hit(server).png == PNG, "closed connections no longer count"


def test_tls_on_the_socket_protocol(servers, tmp_path):
    cert, key = make_certificate(tmp_path)
    server = servers(tls_certfile=str(cert), tls_keyfile=str(key))
    client = ssl.create_default_context(cafile=str(cert))
    reply = hit(server, wrap=lambda raw: client.wrap_socket(raw, server_hostname="127.0.0.1"))
    assert reply.png == PNG
    # A plain-text client gets no answer in clear text.
    with pytest.raises((ProtocolError, OSError)):
        hit(server, timeout=5)


def test_the_boot_client_over_tls(servers, tmp_path):
    from client.boot import BootClient

    cert, key = make_certificate(tmp_path)
    server = servers(tls_certfile=str(cert), tls_keyfile=str(key), auth_token=TOKEN)
    boot = BootClient(port=server.port, token=TOKEN, timeout=10, tls=True, cacert=str(cert))
    try:
        assert boot.generate(GenerationRequest("over tls", seed=2)).png == PNG
        assert boot.generate(GenerationRequest("same connection", seed=2)).png == PNG
    finally:
        boot.close()


def test_many_hits_in_parallel(servers):
    server = servers()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: hit(server), range(64)))
    assert all(reply.png == PNG for reply in replies)


def test_slow_peer_is_cut_off_at_the_frame_timeout(servers):
    server = servers(frame_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"SD")
        frame = protocol.read_frame(conn, 10)
        assert frame.kind == protocol.ERROR and frame.json()["code"] == protocol.E_TIMEOUT
        assert conn.recv(1) == b"", "then closed"



class RefusingFront(FakeFront):
    """Refuses one prompt with a content error (as an unknown model is), hits for the rest."""

    async def generate_async(self, request, on_status=None, client="?", **kwargs):
        if request.prompt == "refuse me":
            raise ProtocolError(protocol.E_INVALID_REQUEST, "model 'nope' is not offered here", field="model")
        return await super().generate_async(request, on_status, client, **kwargs)


def test_the_request_after_a_refused_one_reaches_the_frame_loop(monkeypatch):
    """A refusal from the front comes while the in-flight watcher reads the socket. Sending lingers
    here after writing, as a slow drain does, so the client's next request arrives meanwhile: it
    must be read by the frame loop as a whole request, not half-eaten by a leftover watcher."""
    original_send = SocketFrontServer._send

    async def lingering_send(writer, data, timeout=5.0):
        writer.write(data)
        await asyncio.sleep(0.3)
        return await original_send(writer, b"", timeout)

    monkeypatch.setattr(SocketFrontServer, "_send", staticmethod(lingering_send))
    config = GatewayConfig(socket_port=0, frame_timeout_s=30.0)
    server = SocketFrontServer(RefusingFront(config), config).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            for _ in range(3):
                with pytest.raises(ProtocolError) as refused:
                    protocol.exchange(conn, GenerationRequest("refuse me"), timeout=10)
                assert refused.value.field == "model"
                assert protocol.exchange(conn, GenerationRequest("a hit", seed=1), timeout=10).png == PNG
    finally:
        server.stop()
