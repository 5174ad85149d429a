"""Shared-token authentication and the per-client rate limit (socket and HTTP), on a stack started
with both turned on. Bad HTTP input is in test_bad_input.py."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from tests.integration.harness import ask, local_stack

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def stack():
    with local_stack("celery", workers=1, auth_token=TOKEN, rate_limit_per_s=2, rate_limit_burst=20) as stack:
        yield stack


def post(stack, body: bytes, token=TOKEN):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.http_port}/v1/images/generations",
                                     data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


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
