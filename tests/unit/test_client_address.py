"""Addresses behind proxies: per-address limits key on X-Forwarded-For's right-most untrusted entry,
but only for requests whose TCP peer is one of `trusted_proxies`; from anyone else the header is
ignored, so a client cannot pick its own rate-limit bucket."""

from __future__ import annotations

import http.client
import json

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from client.protocol import ProtocolError
from serve_app.admission import MAX_FORWARDED_CHARS, MAX_FORWARDED_ENTRIES, Admission, client_address
from serve_app.config import GatewayConfig, load_gateway_config, parse_networks
from serve_app.http_front import GENERATIONS_PATH, HttpFrontServer
from serve_app.images_api import client_of, read_generation
from serve_app.openai_errors import http_error
from tests.services import free_port

TRUSTED = parse_networks(["10.0.0.0/8", "192.168.1.7", "fd00::/8"])


@pytest.mark.parametrize("peer, header, expected", [
    ("10.0.0.1", "203.0.113.7", "203.0.113.7"),  # a trusted proxy names its client
    ("10.0.0.1", " 203.0.113.7 ", "203.0.113.7"),
    ("10.0.0.1", None, "10.0.0.1"),  # a proxy's own request (a health check)
    ("10.0.0.1", "", "10.0.0.1"),
    ("198.51.100.2", "203.0.113.7", "198.51.100.2"),  # not a proxy: the header is someone's wish
    ("192.168.1.8", "203.0.113.7", "192.168.1.8"),  # a bare address trusts that address only
    ("192.168.1.7", "203.0.113.7", "203.0.113.7"),
    ("?", "203.0.113.7", "?"),  # no peer at all
], ids=["trusted", "spaces", "no-header", "empty", "untrusted", "neighbour", "single-address", "no-peer"])
def test_only_a_trusted_peer_is_believed(peer, header, expected):
    assert client_address(peer, header, TRUSTED) == expected


def test_nothing_is_believed_without_trusted_proxies():
    assert client_address("10.0.0.1", "203.0.113.7", ()) == "10.0.0.1"
    assert Admission(GatewayConfig()).client_address("10.0.0.1", "203.0.113.7") == "10.0.0.1"


@pytest.mark.parametrize("header, expected", [
    ("203.0.113.7, 10.0.0.2, 10.9.9.9", "203.0.113.7"),  # two more trusted hops inside
    ("6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),  # 6.6.6.6 is what the client wrote: not believed
    ("spoofed, 203.0.113.7", "203.0.113.7"),  # garbage left of the real client is never read
    ("10.0.0.3, 10.0.0.2", "10.0.0.3"),  # every hop a proxy: the one farthest back
], ids=["chain", "client-prefix", "garbage-beyond", "all-trusted"])
def test_a_chain_gives_the_right_most_untrusted_entry(header, expected):
    assert client_address("10.0.0.1", header, TRUSTED) == expected


@pytest.mark.parametrize("header", [
    "not-an-address", "203.0.113.7:4711", "unknown", "203.0.113.7,", ",", "203.0.113.7, 10.0.0.2, nonsense",
    "203.0.113.7;10.0.0.2", "1" * (MAX_FORWARDED_CHARS + 1),
    ", ".join(["203.0.113.7"] + ["10.0.0.2"] * MAX_FORWARDED_ENTRIES),
], ids=["name", "port", "unknown", "trailing-comma", "only-comma", "garbage-between", "semicolon", "too-long",
        "too-many"])
def test_a_malformed_or_oversized_header_leaves_the_peer(header):
    assert client_address("10.0.0.1", header, TRUSTED) == "10.0.0.1"


def test_the_bounds_are_inclusive():
    header = ", ".join(["203.0.113.7"] + ["10.0.0.2"] * (MAX_FORWARDED_ENTRIES - 1))
    assert header.count(",") + 1 == MAX_FORWARDED_ENTRIES and len(header) <= MAX_FORWARDED_CHARS
    assert client_address("10.0.0.1", header, TRUSTED) == "203.0.113.7"
    padded = "203.0.113.7".rjust(MAX_FORWARDED_CHARS)
    assert client_address("10.0.0.1", padded, TRUSTED) == "203.0.113.7"


def test_ipv6_networks_and_canonical_addresses():
    assert client_address("fd00::1", "2001:DB8:0:0::7", TRUSTED) == "2001:db8::7", "one spelling, one bucket"
    assert client_address("fd00::1", "2001:db8::7, fd12::3", TRUSTED) == "2001:db8::7"
    assert client_address("fe80::1", "2001:db8::7", TRUSTED) == "fe80::1"
    assert client_address("::ffff:10.0.0.1", "203.0.113.7", TRUSTED) == "203.0.113.7", "dual-stack IPv4 peer"
    assert client_address("10.0.0.1", "[2001:db8::7]", TRUSTED) == "10.0.0.1", "brackets are not an address"


def _request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 40000)})


def test_several_header_lines_are_one_list():
    """A proxy that adds its own line keeps the client's line in front of it: the client's is not believed."""
    admission = Admission(GatewayConfig(trusted_proxies=["10.0.0.0/8"]))
    assert client_of(admission, _request("10.0.0.1", "6.6.6.6", "203.0.113.7")) == "203.0.113.7"
    assert client_of(admission, _request("10.0.0.1")) == "10.0.0.1"
    assert client_of(admission, _request("198.51.100.2", "203.0.113.7")) == "198.51.100.2"


# -- configuration ---------------------------------------------------------------------------------



def test_trusted_proxies_load_from_yaml_and_from_a_comma_separated_variable(configs, monkeypatch):
    assert load_gateway_config().trusted_proxies == []
    (configs / "gateway.yaml").write_text("trusted_proxies: [10.0.0.0/8, 'fd00::/8']\n")
    assert load_gateway_config().trusted_proxies == ["10.0.0.0/8", "fd00::/8"]
    monkeypatch.setenv("SDGATE_TRUSTED_PROXIES", "172.16.0.0/12, 192.168.1.7,")
    assert load_gateway_config().trusted_proxies == ["172.16.0.0/12", "192.168.1.7"]
    monkeypatch.setenv("SDGATE_TRUSTED_PROXIES", "")
    assert load_gateway_config().trusted_proxies == []


@pytest.mark.parametrize("cidr, advice", [
    ("10.0.0.300/8", "write a CIDR such as 10.0.0.0/8"),
    ("proxy.internal", "write a CIDR such as 10.0.0.0/8"),
    ("10.0.0.0/33", "write a CIDR such as 10.0.0.0/8"),
    ("10.0.0.1/8", "host bits set; write its network, 10.0.0.0/8, or the one address 10.0.0.1"),
])
def test_a_bad_cidr_is_a_config_error_that_says_what_to_write(configs, cidr, advice):
    (configs / "gateway.yaml").write_text(f"trusted_proxies: ['{cidr}']\n")
    with pytest.raises(ValueError) as caught:
        load_gateway_config()
    message = str(caught.value)
    assert "gateway.yaml" in message and "trusted_proxies" in message and repr(cidr) in message
    assert advice in message
    with pytest.raises(ValueError, match="trusted_proxies entry"):
        GatewayConfig(trusted_proxies=[cidr])  # constructing directly validates too


def test_a_bad_cidr_from_the_environment_names_the_variable(configs, monkeypatch):
    monkeypatch.setenv("SDGATE_TRUSTED_PROXIES", "10.0.0.0/8,nope")
    with pytest.raises(ValueError, match="SDGATE_TRUSTED_PROXIES.*'nope' is not an IP network"):
        load_gateway_config()


# -- over HTTP -------------------------------------------------------------------------------------

def _limited_server(trusted: list) -> HttpFrontServer:
    """The fast port with a generations route that admits as Gateway.generations does (client_of,
    then read_generation's token and rate checks), one request per address, never refilled."""
    config = GatewayConfig(fast_http_port=free_port(), rate_limit_per_s=1e-6, rate_limit_burst=1,
                           trusted_proxies=trusted)
    admission = Admission(config)

    async def generations(request: Request) -> JSONResponse:
        client = client_of(admission, request)
        try:
            await read_generation(admission, request, client)
        except ProtocolError as exc:
            return http_error(exc)
        return JSONResponse({"client": client})

    return HttpFrontServer(config, [(GENERATIONS_PATH, generations, ["POST"])])


def _post(port: int, forwarded_for: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", GENERATIONS_PATH, body=json.dumps({"prompt": "a fox"}),
                     headers={"Content-Type": "application/json", "X-Forwarded-For": forwarded_for})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("trusted, statuses", [
    (["127.0.0.0/8"], [200, 429, 200, 429]),  # behind the proxy on loopback: a bucket per forwarded client
    ([], [200, 429, 429, 429]),  # no proxy trusted: every request is loopback's, whatever it claims
], ids=["trusted-peer", "untrusted-peer"])
def test_the_rate_limit_keys_on_the_forwarded_client_of_a_trusted_peer(trusted, statuses):
    server = _limited_server(trusted).start()
    try:
        sent = [_post(server.port, forwarded) for forwarded in
                ("203.0.113.7", "203.0.113.7", "203.0.113.8", "198.51.100.1, 203.0.113.8")]
    finally:
        server.stop()
    assert sent == statuses
