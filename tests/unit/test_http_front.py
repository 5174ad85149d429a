"""The replica-owned HTTP listener (serve_app/http_front.py), without Ray: its port is shared by
replicas, it answers through the routes it is given, it speaks only TLS when a certificate is
configured, and it reports its load for autoscaling."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
import time

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_app.config import GatewayConfig
from serve_app.http_front import GENERATIONS_PATH, HttpFrontServer
from tests.services import free_port
from tests.tls import make_certificate


def _server(config: GatewayConfig, name: str = "a", release: threading.Event = None) -> HttpFrontServer:
    async def generations(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        while release is not None and not release.is_set():
            await asyncio.sleep(0.01)
        return JSONResponse({"echo": body["prompt"], "replica": name})

    return HttpFrontServer(config, [(GENERATIONS_PATH, generations, ["POST"]),
                                    ("/healthz", lambda request: {"ok": True, "replica": name}, ["GET"])])


def _post(conn: http.client.HTTPConnection, prompt: str) -> dict:
    conn.request("POST", GENERATIONS_PATH, body=json.dumps({"prompt": prompt}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


def test_replicas_share_the_port_and_answer_through_their_routes():
    config = GatewayConfig(fast_http_port=free_port())
    first, second = _server(config, "a").start(), _server(config, "b").start()
    try:
        assert first.port == second.port == config.fast_http_port and not first.tls
        seen = set()
        deadline = time.monotonic() + 60
        while seen != {"a", "b"} and time.monotonic() < deadline:  # the kernel spreads new connections
            conn = http.client.HTTPConnection("127.0.0.1", config.fast_http_port, timeout=10)
            answer = _post(conn, "a fox")
            assert answer["echo"] == "a fox"
            seen.add(answer["replica"])
            conn.close()
        assert seen == {"a", "b"}, "both replicas on the shared port answer"
        conn = http.client.HTTPConnection("127.0.0.1", config.fast_http_port, timeout=10)
        conn.request("GET", "/healthz")
        assert json.loads(conn.getresponse().read())["ok"] is True
    finally:
        first.stop()
        second.stop()
    assert not first.alive() and not second.alive()


def test_with_a_certificate_the_port_speaks_only_tls(tmp_path):
    certfile, keyfile = make_certificate(tmp_path)
    config = GatewayConfig(fast_http_port=free_port(), tls_certfile=str(certfile), tls_keyfile=str(keyfile))
    server = _server(config).start()
    try:
        assert server.tls
        context = ssl.create_default_context(cafile=str(certfile))
        secure = http.client.HTTPSConnection("127.0.0.1", config.fast_http_port, timeout=10, context=context)
        assert _post(secure, "over tls")["echo"] == "over tls"
        plain = http.client.HTTPConnection("127.0.0.1", config.fast_http_port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("POST", GENERATIONS_PATH, body=b'{"prompt": "in clear"}')
            plain.getresponse().read()
        assert _post(secure, "still served")["echo"] == "still served"
    finally:
        server.stop()


def test_a_certificate_without_its_key_is_refused(tmp_path):
    certfile, _ = make_certificate(tmp_path)
    with pytest.raises(ValueError, match="tls_keyfile"):
        _server(GatewayConfig(fast_http_port=free_port(), tls_certfile=str(certfile)))


def test_requests_in_flight_are_reported_for_autoscaling():
    release = threading.Event()
    config = GatewayConfig(fast_http_port=free_port())
    server = _server(config, release=release).start()
    answers = []
    try:
        server.average_load()
        clients = [threading.Thread(target=lambda: answers.append(_post(
            http.client.HTTPConnection("127.0.0.1", config.fast_http_port, timeout=30), "wait"))) for _ in range(3)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while server.load.active < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.load.active == 3
        assert server.average_load() > 0
        release.set()
        for client in clients:
            client.join(30)
        assert len(answers) == 3
        server.average_load()
        assert server.average_load() == 0.0, "nothing in flight since the last report"
    finally:
        release.set()
        server.stop()


def test_auth_without_tls_off_loopback_is_warned_about(caplog):
    port = free_port()
    server = _server(GatewayConfig(host="0.0.0.0", fast_http_port=port, auth_token="secret")).start()
    server.stop()
    assert any("clear text" in record.getMessage() for record in caplog.records)
    caplog.clear()
    server = _server(GatewayConfig(fast_http_port=free_port(), auth_token="secret")).start()
    server.stop()
    assert not any("clear text" in record.getMessage() for record in caplog.records), "loopback needs no TLS"
