"""Framing: round trips, caps checked from the header alone, every malformed frame's code."""

import json
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import protocol
from client.protocol import ConnectionClosed, GenerationRequest, ProtocolError


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def header(kind: int, length: int, magic: bytes = protocol.MAGIC, version: int = protocol.PROTOCOL_VERSION):
    return protocol.HEADER.pack(magic, version, kind, length)


def read(sock, timeout=2.0):
    return protocol.read_frame(sock, frame_timeout=timeout)


def test_round_trip_of_every_frame_kind(pair):
    a, b = pair
    request = GenerationRequest("a red fox", width=128, seed=3)
    a.sendall(protocol.encode_request(request, token="t0k"))
    assert protocol.decode_request(read(b)) == (request, "t0k")
    a.sendall(protocol.encode_status(protocol.STATUS_QUEUED, position=2))
    assert read(b).json() == {"state": "queued", "position": 2}
    png = bytes(range(256)) * 10
    a.sendall(protocol.encode_image({"key": "k" * 64, "seed": 3}, png))
    assert protocol.decode_image(read(b)) == ({"key": "k" * 64, "seed": 3}, png)
    a.sendall(protocol.encode_error(protocol.E_INVALID_REQUEST, "width: too wide", field="width"))
    error = protocol.decode_error(read(b))
    assert (error.code, error.message, error.field) == ("invalid_request", "width: too wide", "width")


@pytest.mark.parametrize("kind", sorted(protocol.MAX_PAYLOAD))
def test_oversized_length_is_refused_from_the_header_alone(pair, kind):
    a, b = pair
    a.sendall(header(kind, protocol.MAX_PAYLOAD[kind] + 1))  # no payload follows: nothing may wait for it
    started = time.monotonic()
    with pytest.raises(ProtocolError) as caught:
        read(b, timeout=5)
    assert caught.value.code == protocol.E_FRAME_TOO_LARGE and time.monotonic() - started < 1


def test_length_of_two_to_the_31_allocates_nothing(pair):
    a, b = pair
    a.sendall(header(protocol.REQUEST, 2**31))
    with pytest.raises(ProtocolError) as caught:
        read(b)
    assert caught.value.code == protocol.E_FRAME_TOO_LARGE


def test_server_side_cap_refuses_kinds_a_client_never_sends(pair):
    a, b = pair
    a.sendall(protocol.encode_image({}, b"x" * 100))
    with pytest.raises(ProtocolError) as caught:
        protocol.read_frame(b, 2, max_payload={protocol.REQUEST: 1000})
    assert caught.value.code == protocol.E_FRAME_TOO_LARGE


@pytest.mark.parametrize("raw, code", [
    (header(protocol.REQUEST, 0, magic=b"GET"), protocol.E_BAD_FRAME),
    (header(protocol.REQUEST, 0, version=9), protocol.E_UNSUPPORTED_VERSION),
    (header(77, 0), protocol.E_BAD_FRAME),
])
def test_bad_header_codes(pair, raw, code):
    a, b = pair
    a.sendall(raw)
    with pytest.raises(ProtocolError) as caught:
        read(b)
    assert caught.value.code == code


def test_truncated_frame_is_bad_frame(pair):
    a, b = pair
    a.sendall(header(protocol.REQUEST, 100) + b"{" * 10)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError) as caught:
        read(b)
    assert caught.value.code == protocol.E_BAD_FRAME


@pytest.mark.parametrize("payload, code", [
    (b"\xff\xfe\xfa", protocol.E_BAD_FRAME),
    (b"not json", protocol.E_BAD_FRAME),
    (b"[1, 2]", protocol.E_INVALID_REQUEST),
    (b'{"request": "a fox"}', protocol.E_INVALID_REQUEST),
    (b'{"request": {"prompt": "x"}, "token": 5}', protocol.E_INVALID_REQUEST),
    (b'{"request": {"prompt": "x", "width": "wide"}}', protocol.E_INVALID_REQUEST),
])
def test_bad_request_payloads(pair, payload, code):
    a, b = pair
    a.sendall(protocol.encode_frame(protocol.REQUEST, payload))
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(read(b))
    assert caught.value.code == code


def test_invalid_field_error_names_the_field(pair):
    a, b = pair
    a.sendall(protocol.encode_frame(protocol.REQUEST, json.dumps({"request": {"prompt": "x", "steps": -4}}).encode()))
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(read(b))
    assert caught.value.field == "steps"


def test_trickling_peer_is_cut_off_at_the_frame_deadline(pair):
    a, b = pair
    frame = protocol.encode_request(GenerationRequest("slow"))

    def trickle():
        for byte in frame:
            try:
                a.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        protocol.read_frame(b, frame_timeout=1.0)
    assert time.monotonic() - started < 2.0


def test_idle_timeout_and_clean_close(pair):
    a, b = pair
    with pytest.raises(socket.timeout):
        protocol.read_frame(b, frame_timeout=5, idle_timeout=0.2)
    a.close()
    with pytest.raises(ConnectionClosed):
        read(b)


def test_encoder_refuses_oversized_payload():
    with pytest.raises(ProtocolError):
        protocol.encode_frame(protocol.STATUS, b"x" * (protocol.MAX_PAYLOAD[protocol.STATUS] + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzz_frame_decoder_only_raises_protocol_errors(raw):
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        while True:
            try:
                frame = protocol.read_frame(b, frame_timeout=0.5)
            except (ProtocolError, ConnectionClosed, socket.timeout):
                return
            assert len(frame.payload) <= protocol.MAX_PAYLOAD[frame.kind]
    finally:
        a.close()
        b.close()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(
                               st.sampled_from(["prompt", "width", "steps", "seed", "model", "x"]) | st.text(max_size=5),
                               children, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"request": json_values})))
def test_fuzz_request_decoder_gives_a_valid_request_or_a_protocol_error(body):
    frame = protocol.Frame(protocol.REQUEST, json.dumps(body).encode())
    try:
        request, _ = protocol.decode_request(frame)
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
        return
    request.validate()
