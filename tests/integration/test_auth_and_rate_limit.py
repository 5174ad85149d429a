"""Shared-token authentication and the per-client rate limit (socket and HTTP), on a stack started
with both turned on. Bad HTTP input is in test_bad_input.py."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Optional

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from tests.integration.harness import ask, wait_for

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack.with_gateway(auth_token=TOKEN, rate_limit_per_s=2, rate_limit_burst=20)


def http(stack, path: str, body: Optional[bytes] = None, token=TOKEN, timeout: float = 120):
    """(status, JSON answer) of a GET, or of a POST when there is a body, on Serve's HTTP port."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.http_port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(stack, body: bytes, token=TOKEN):
    return http(stack, "/v1/images/generations", body, token)


def test_socket_needs_the_token(stack):
    with pytest.raises(ProtocolError) as caught:
        ask(stack, GenerationRequest("no token"))
    assert caught.value.code == protocol.E_UNAUTHORIZED
    with pytest.raises(ProtocolError) as caught:
        ask(stack, GenerationRequest("wrong token"), token="guess")
    assert caught.value.code == protocol.E_UNAUTHORIZED
    assert ask(stack, GenerationRequest("right token"), token=TOKEN).png


def test_unauthorized_learns_nothing_about_the_fields(stack):
    with pytest.raises(ProtocolError) as caught:
        ask(stack, GenerationRequest("x", width=None, steps=None), token=None)
    assert caught.value.code == protocol.E_UNAUTHORIZED and caught.value.field is None


def test_http_needs_the_token(stack):
    body = json.dumps({"prompt": "http with token"}).encode()
    assert post(stack, body, token=None)[0] == 401
    assert post(stack, body, token="guess")[0] == 401
    status, payload = post(stack, body)
    assert status == 200 and payload["data"][0]["b64_json"]


def get(stack, path: str, token=TOKEN):
    return http(stack, path, token=token, timeout=60)


def test_http_stats_need_the_token(stack):
    """Item 7: /v1/stats is not open to strangers."""
    assert get(stack, "/v1/stats", token=None)[0] == 401
    assert get(stack, "/v1/stats", token="guess")[0] == 401
    status, payload = get(stack, "/v1/stats")
    assert status == 200 and "cache_hits" in payload


def test_http_deeply_nested_body_is_a_400_not_a_500(stack):
    """Item 7: a body nested thousands deep is refused as a bad request, without a traceback."""
    for body in (b"[" * 16000, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        status, payload = post(stack, body)
        assert status == 400, payload
        assert payload["error"]["code"] == protocol.E_INVALID_REQUEST and "Traceback" not in json.dumps(payload)


def test_http_answers_carry_no_worker_host_name(stack):
    """Item 7: the worker's name (its host) stays inside the cluster."""
    status, payload = post(stack, json.dumps({"prompt": "where was I made", "seed": 5}).encode())
    assert status == 200 and "worker" not in payload["sdgate"] and payload["sdgate"]["key"]


def test_rate_limit_per_client(stack):
    request = GenerationRequest("rate limited prompt", seed=1)
    ask(stack, request, token=TOKEN)
    codes = []
    with socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=10) as conn:
        for _ in range(40):
            try:
                protocol.exchange(conn, request, token=TOKEN, timeout=30)
                codes.append("ok")
            except ProtocolError as exc:
                codes.append(exc.code)
    assert "ok" in codes and protocol.E_RATE_LIMITED in codes


def test_http_is_rate_limited_too(stack):
    """Item 7: HTTP goes through the same per-address limiter as the socket (keep this test last)."""
    body = json.dumps({"prompt": "http rate limited", "seed": 1}).encode()
    wait_for(lambda: post(stack, body)[0] == 200, 60, "the bucket refilled after the socket test")
    statuses = [post(stack, body)[0] for _ in range(40)]
    assert 429 in statuses, statuses
