"""The one admission module: token, rate, sizes, JSON depth, connection and waiter caps, TLS."""

from __future__ import annotations

import json
import logging

import pytest

from client import protocol
from client.protocol import ProtocolError
from serve_app.admission import (MAX_JSON_DEPTH, Admission, check_json_depth, insecure_auth_warning,
                                 server_ssl_context)
from serve_app.config import GatewayConfig, load_gateway_config
from tests.tls import make_certificate


def code_of(call) -> str:
    with pytest.raises(ProtocolError) as refused:
        call()
    return refused.value.code


def test_token_rate_and_size():
    admission = Admission(GatewayConfig(auth_token="t0k", rate_limit_per_s=0.001, rate_limit_burst=2))
    admission.authenticate("t0k")
    assert code_of(lambda: admission.authenticate("nope")) == protocol.E_UNAUTHORIZED
    assert code_of(lambda: admission.authenticate(None)) == protocol.E_UNAUTHORIZED
    admission.check_rate("10.0.0.1")
    admission.check_rate("10.0.0.1")
    assert code_of(lambda: admission.check_rate("10.0.0.1")) == protocol.E_RATE_LIMITED
    admission.check_rate("10.0.0.2")  # per address
    Admission.check_size(protocol.MAX_PAYLOAD[protocol.REQUEST])
    assert code_of(lambda: Admission.check_size(protocol.MAX_PAYLOAD[protocol.REQUEST] + 1)) == \
        protocol.E_FRAME_TOO_LARGE


@pytest.mark.parametrize("limits, enter, leave, in_use", [
    (dict(max_waiters=3, max_waiters_per_client=2), "enter_wait", "leave_wait", "waiting"),
    (dict(max_connections=3, max_connections_per_client=2), "open_connection", "close_connection", "open_connections"),
], ids=["waiters", "connections"])
def test_capped_per_replica_and_per_address(limits, enter, leave, in_use):
    admission = Admission(GatewayConfig(**limits))
    enter_, leave_ = getattr(admission, enter), getattr(admission, leave)
    enter_("a")
    enter_("a")
    assert code_of(lambda: enter_("a")) == protocol.E_BUSY
    enter_("b")
    assert code_of(lambda: enter_("c")) == protocol.E_BUSY
    leave_("a")
    enter_("c")
    assert getattr(admission, in_use) == 3


@pytest.mark.parametrize("body", [b"[" * 20000, b'{"a":' * 5000, b'{"prompt": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_deep_json_is_refused_before_parsing(body):
    assert code_of(lambda: check_json_depth(body)) == protocol.E_INVALID_REQUEST


def test_brackets_inside_strings_do_not_count():
    body = json.dumps({"prompt": "[[[{{{" * 100 + '\\"]]]', "n": 1}).encode()
    check_json_depth(body)
    check_json_depth(json.dumps({"a": [[1]] * 3}).encode())
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    check_json_depth(nested)


def test_warning_when_auth_is_on_without_tls_on_a_public_address(tmp_path):
    assert insecure_auth_warning(GatewayConfig(host="0.0.0.0", auth_token="t")) is not None
    assert insecure_auth_warning(GatewayConfig(host="10.1.2.3", auth_token="t")) is not None
    assert insecure_auth_warning(GatewayConfig(host="127.0.0.1", auth_token="t")) is None
    assert insecure_auth_warning(GatewayConfig(host="0.0.0.0")) is None
    cert, key = make_certificate(tmp_path)
    assert insecure_auth_warning(GatewayConfig(host="0.0.0.0", auth_token="t", tls_certfile=str(cert),
                                               tls_keyfile=str(key))) is None
    assert server_ssl_context(GatewayConfig(tls_certfile=str(cert), tls_keyfile=str(key))) is not None
    assert server_ssl_context(GatewayConfig()) is None
    with pytest.raises(ValueError, match="tls_keyfile"):
        server_ssl_context(GatewayConfig(tls_certfile=str(cert)))


def test_the_socket_server_logs_the_warning(caplog):
    from tests.unit.test_socket_front import FakeFront
    from serve_app.socket_server import SocketFrontServer

    config = GatewayConfig(host="0.0.0.0", socket_port=0, auth_token="t")
    with caplog.at_level(logging.WARNING):
        server = SocketFrontServer(FakeFront(config), config)
    assert "clear text" in caplog.text
    assert server.port is None  # never started


def test_the_gateway_reads_the_token_from_sdgate_token_only(monkeypatch):
    monkeypatch.setenv("SDGATE_TOKEN", "from-env")
    assert load_gateway_config().auth_token == "from-env"
    assert load_gateway_config(auth_token="explicit").auth_token == "explicit"
    monkeypatch.setenv("SDGATE_AUTH_TOKEN", "old-name")
    with pytest.raises(ValueError, match="SDGATE_TOKEN"):
        load_gateway_config()
