"""Hostile and malformed input on the socket and HTTP fronts of a real stack: every bad input is
answered with a clear error code and message, or its connection is closed within a bounded time,
while a well-behaved client on another connection keeps getting images the whole time."""

from __future__ import annotations

import http.client
import json
import random
import select
import socket
import threading
import time
from typing import List, Optional

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from tests.resolve import key_of
from tests.integration.harness import GATEWAY_REPLICA, ask, cached_pngs, connect, healthz, replica_pids, \
    rss_bytes, slow_request, wait_for

pytestmark = pytest.mark.integration
FRAME_TIMEOUT_S = 2
IDLE_TIMEOUT_S = 8
ANSWER_WITHIN_S = 5  # every bad input is answered (or cut off) within this, frame timeouts aside


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack.with_gateway(frame_timeout_s=FRAME_TIMEOUT_S, idle_timeout_s=IDLE_TIMEOUT_S,
                                     request_timeout_s=120)


class GoodClient:
    """A well-behaved client on its own connection, asking for cached images back to back."""

    def __init__(self, stack):
        self.stack = stack
        self.requests = [GenerationRequest(f"a well behaved client {i}", seed=i) for i in range(3)]
        for request in self.requests:
            ask(stack, request)
        self.served: List[float] = []  # when each answer arrived
        self.errors: List[BaseException] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "GoodClient":
        self._thread.start()
        return self

    def _run(self) -> None:
        conn: Optional[socket.socket] = None
        index = 0
        while not self._stop.is_set():
            try:
                conn = conn or connect(self.stack)
                started = time.monotonic()
                reply = protocol.exchange(conn, self.requests[index % 3], timeout=30)
                assert reply.png.startswith(b"\x89PNG")
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.served.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - reported by the tests
                self.errors.append(exc)
                if conn is not None:
                    conn.close()
                conn = None
            index += 1
            self._stop.wait(0.05)
        if conn is not None:
            conn.close()

    def assert_served_since(self, since: float) -> None:
        wait_for(lambda: self.served and self.served[-1] > since, 10, "the well-behaved client being served")
        assert not self.errors, f"the well-behaved client got errors: {self.errors[:3]}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module", autouse=True)
def good_client(stack):
    client = GoodClient(stack).start()
    yield client
    client.stop()


def raw_exchange(stack, data: bytes, shutdown: bool = False):
    """Send raw bytes on a new connection; return (error, seconds to answer, conn still open)."""
    conn = connect(stack)
    try:
        started = time.monotonic()
        conn.sendall(data)
        if shutdown:
            conn.shutdown(socket.SHUT_WR)
        frame = protocol.read_frame(conn, frame_timeout=10, idle_timeout=FRAME_TIMEOUT_S + 10)
        while frame.kind == protocol.STATUS:  # a request the workers refuse is queued first
            frame = protocol.read_frame(conn, frame_timeout=10, idle_timeout=ANSWER_WITHIN_S)
        took = time.monotonic() - started
        assert frame.kind == protocol.ERROR, f"expected an ERROR frame, got {protocol.FRAME_NAMES[frame.kind]}"
        error = protocol.decode_error(frame)
        return error, took, _still_usable(conn)
    finally:
        conn.close()


def _still_usable(conn: socket.socket) -> bool:
    """True when the connection goes on to serve a good request; False when the server closed it."""
    try:
        return bool(protocol.exchange(conn, GenerationRequest("a well behaved client 0", seed=0), timeout=20).png)
    except (ConnectionError, OSError, ProtocolError):
        return False


def frame(kind: int, payload: bytes, version: int = protocol.PROTOCOL_VERSION, magic: bytes = protocol.MAGIC,
          length: Optional[int] = None) -> bytes:
    return protocol.HEADER.pack(magic, version, kind, len(payload) if length is None else length) + payload


def request_body(**fields) -> bytes:
    return frame(protocol.REQUEST, json.dumps({"request": fields}).encode())


# -- the socket front -----------------------------------------------------------------------------

# (input, code, field, the connection stays usable). Errors in the framing close the connection
# (the byte stream cannot be trusted); errors in a complete frame's content leave it usable.
SOCKET_CASES = {
    "random bytes": (random.Random(5).randbytes(64), protocol.E_BAD_FRAME, None, False),
    "an HTTP request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", protocol.E_BAD_FRAME, None, False),
    "wrong magic": (frame(protocol.REQUEST, b"{}", magic=b"XYZ"), protocol.E_BAD_FRAME, None, False),
    "version 2": (frame(protocol.REQUEST, b"{}", version=2), protocol.E_UNSUPPORTED_VERSION, None, False),
    "version 0": (frame(protocol.REQUEST, b"{}", version=0), protocol.E_UNSUPPORTED_VERSION, None, False),
    "unknown frame type": (frame(9, b"{}"), protocol.E_BAD_FRAME, None, False),
    "an IMAGE frame from a client": (frame(protocol.IMAGE, b"x" * 10), protocol.E_FRAME_TOO_LARGE, None, False),
    "length 2**31": (frame(protocol.REQUEST, b"", length=2**31), protocol.E_FRAME_TOO_LARGE, None, False),
    "length 2**32-1": (frame(protocol.REQUEST, b"", length=2**32 - 1), protocol.E_FRAME_TOO_LARGE, None, False),
    "length one over the cap": (frame(protocol.REQUEST, b"", length=protocol.MAX_PAYLOAD[protocol.REQUEST] + 1),
                                protocol.E_FRAME_TOO_LARGE, None, False),
    "a 20 KiB prompt": (request_body(prompt="x" * 20000), protocol.E_INVALID_REQUEST, "prompt", True),
    "a STATUS frame instead of a REQUEST": (frame(protocol.STATUS, b""), protocol.E_BAD_FRAME, None, True),
    "non-UTF-8 payload": (frame(protocol.REQUEST, b"\xff\xfe\xfd{}"), protocol.E_BAD_FRAME, None, True),
    "not JSON": (frame(protocol.REQUEST, b"draw me a fox"), protocol.E_BAD_FRAME, None, True),
    "JSON nested 15000 deep": (frame(protocol.REQUEST, b"[" * 15000), protocol.E_BAD_FRAME, None, True),
    "a 5000-digit integer": (frame(protocol.REQUEST, b'{"request": {"prompt": "x", "steps": ' + b"9" * 5000 + b"}}"),
                             protocol.E_BAD_FRAME, None, True),
    "JSON list body": (frame(protocol.REQUEST, b'["a fox"]'), protocol.E_INVALID_REQUEST, None, True),
    "request is a string": (frame(protocol.REQUEST, b'{"request": "a fox"}'), protocol.E_INVALID_REQUEST, None, True),
    "no prompt": (request_body(), protocol.E_INVALID_REQUEST, "prompt", True),
    "prompt is a number": (request_body(prompt=5), protocol.E_INVALID_REQUEST, "prompt", True),
    "prompt is null": (request_body(prompt=None), protocol.E_INVALID_REQUEST, "prompt", True),
    "empty prompt": (request_body(prompt=""), protocol.E_INVALID_REQUEST, "prompt", True),
    "whitespace prompt": (request_body(prompt=" \t\n  "), protocol.E_INVALID_REQUEST, "prompt", True),
    "prompt over the limit": (request_body(prompt="x" * 1001), protocol.E_INVALID_REQUEST, "prompt", True),
    "NUL in the prompt": (request_body(prompt="a\x00b"), protocol.E_INVALID_REQUEST, "prompt", True),
    "unknown field": (request_body(prompt="x", colour="red"), protocol.E_INVALID_REQUEST, "colour", True),
    "token is a number": (frame(protocol.REQUEST, b'{"request": {"prompt": "x"}, "token": 5}'),
                          protocol.E_INVALID_REQUEST, "token", True),
    "width 10**6": (request_body(prompt="x", width=10**6), protocol.E_INVALID_REQUEST, "width", True),
    "width as a string": (request_body(prompt="x", width="64"), protocol.E_INVALID_REQUEST, "width", True),
    "width as a float": (request_body(prompt="x", width=64.0), protocol.E_INVALID_REQUEST, "width", True),
    "width not a multiple of 8": (request_body(prompt="x", width=100), protocol.E_INVALID_REQUEST, "width", True),
    "negative height": (request_body(prompt="x", height=-64), protocol.E_INVALID_REQUEST, "height", True),
    "negative steps": (request_body(prompt="x", steps=-1), protocol.E_INVALID_REQUEST, "steps", True),
    "zero steps": (request_body(prompt="x", steps=0), protocol.E_INVALID_REQUEST, "steps", True),
    "steps 151": (request_body(prompt="x", steps=151), protocol.E_INVALID_REQUEST, "steps", True),
    "steps 10**9": (request_body(prompt="x", steps=10**9), protocol.E_INVALID_REQUEST, "steps", True),
    "steps 2**64": (request_body(prompt="x", steps=2**64), protocol.E_INVALID_REQUEST, "steps", True),
    "steps true": (request_body(prompt="x", steps=True), protocol.E_INVALID_REQUEST, "steps", True),
    "guidance NaN": (frame(protocol.REQUEST, b'{"request": {"prompt": "x", "guidance_scale": NaN}}'),
                     protocol.E_INVALID_REQUEST, "guidance_scale", True),
    "guidance 1e400": (frame(protocol.REQUEST, b'{"request": {"prompt": "x", "guidance_scale": 1e400}}'),
                       protocol.E_INVALID_REQUEST, "guidance_scale", True),
    "negative seed": (request_body(prompt="x", seed=-1), protocol.E_INVALID_REQUEST, "seed", True),
    "seed 2**32": (request_body(prompt="x", seed=2**32), protocol.E_INVALID_REQUEST, "seed", True),
    "unknown scheduler": (request_body(prompt="x", scheduler="nope"), protocol.E_INVALID_REQUEST, "scheduler", True),
    "scheduler is a list": (request_body(prompt="x", scheduler=["euler"]), protocol.E_INVALID_REQUEST, "scheduler",
                            True),
    "model with spaces": (request_body(prompt="x", model="a b"), protocol.E_INVALID_REQUEST, "model", True),
    "a model the workers do not run": (request_body(prompt="x", model="../../etc/passwd"),
                                       protocol.E_INVALID_REQUEST, "model", True),
}


@pytest.mark.parametrize("name", list(SOCKET_CASES))
def test_bad_socket_input_gets_a_clear_error(stack, good_client, name):
    data, code, field, usable = SOCKET_CASES[name]
    since = time.monotonic()
    error, took, still_usable = raw_exchange(stack, data)
    assert (error.code, error.field) == (code, field), error.message
    assert len(error.message) > 10, "the message says what was wrong"
    assert took < ANSWER_WITHIN_S
    assert still_usable is usable, "framing errors close the connection; content errors leave it usable"
    good_client.assert_served_since(since)


def test_invalid_values_name_the_limit(stack):
    cases = {"width": (10**6, "64..2048"), "steps": (10**9, "1..150"), "seed": (-1, "0..4294967295")}
    for field, (value, limit) in cases.items():
        error, _, _ = raw_exchange(stack, request_body(prompt="x", **{field: value}))
        assert str(value) in error.message and limit in error.message, error.message
    error, _, _ = raw_exchange(stack, request_body(prompt="x" * 1001))
    assert "1001" in error.message and "1000" in error.message


@pytest.mark.parametrize("cut", ["in the header", "in the payload"])
def test_truncated_frame_is_cut_off_after_the_frame_timeout(stack, good_client, cut):
    whole = protocol.encode_request(GenerationRequest("a frame that never finishes"))
    part = whole[:4] if cut == "in the header" else whole[:len(whole) // 2]
    since = time.monotonic()
    error, took, usable = raw_exchange(stack, part)
    assert error.code == protocol.E_TIMEOUT and "within" in error.message
    assert FRAME_TIMEOUT_S - 0.5 < took < FRAME_TIMEOUT_S + 3 and not usable
    good_client.assert_served_since(since)


def test_truncated_frame_then_close_is_answered(stack):
    whole = protocol.encode_request(GenerationRequest("a frame cut by a close"))
    error, took, _ = raw_exchange(stack, whole[:len(whole) // 2], shutdown=True)
    assert error.code == protocol.E_BAD_FRAME and "closed after" in error.message and took < ANSWER_WITHIN_S


def test_a_peer_sending_one_byte_a_second_is_cut_off(stack, good_client):
    conn = connect(stack)
    started = time.monotonic()
    error, cut_off_after = None, None
    try:
        for byte in protocol.encode_request(GenerationRequest("one byte a second")):
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([conn], [], [], 1.0)  # also the pace: one byte a second
            if readable:
                cut_off_after = time.monotonic() - started
                error = protocol.decode_error(protocol.read_frame(conn, 5))
                assert conn.recv(1) == b"", "then closed"
                break
    finally:
        conn.close()
    assert error is not None and error.code == protocol.E_TIMEOUT, error
    assert cut_off_after < FRAME_TIMEOUT_S + 2, f"cut off after {cut_off_after:.1f} s"
    good_client.assert_served_since(started)


def test_huge_length_headers_allocate_nothing(stack, good_client):
    [replica] = replica_pids(stack, GATEWAY_REPLICA)
    before = rss_bytes(replica)
    since = time.monotonic()
    for _ in range(50):
        error, took, _ = raw_exchange(stack, frame(protocol.REQUEST, b"\0" * 100, length=2**32 - 1))
        assert error.code == protocol.E_FRAME_TOO_LARGE and took < ANSWER_WITHIN_S
    grown = rss_bytes(replica) - before
    assert grown < 32 * 2**20, f"the gateway grew by {grown / 2**20:.0f} MiB for 50 headers of 4 GiB each"
    good_client.assert_served_since(since)


def test_a_thousand_idle_connections_do_not_starve_anyone(stack, good_client):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    baseline = healthz(stack)["open_connections"]
    [replica] = replica_pids(stack, GATEWAY_REPLICA)
    idle = [connect(stack) for _ in range(1000)]
    try:
        wait_for(lambda: healthz(stack)["open_connections"] >= baseline + 1000, 10, "the gateway holding 1000 idle")
        since = time.monotonic()
        started = time.monotonic()
        assert ask(stack, GenerationRequest(f"a new image while a thousand are idle {time.time()}")).png
        assert time.monotonic() - started < 20, "a new miss is served promptly"
        good_client.assert_served_since(since)
        assert good_client.slowest < 5
        # The server closes them after idle_timeout_s, without an ERROR frame.
        for conn in idle[:5]:
            conn.settimeout(IDLE_TIMEOUT_S + 5)
            assert conn.recv(1) == b""
        wait_for(lambda: healthz(stack)["open_connections"] <= baseline + 1, 10, "idle connections released")
        # Closing idle connections must not hurt the server: the well-behaved client goes on being
        # served (40 answers, over 2 s at its pace: past the next idle sweeps).
        released = time.monotonic()
        wait_for(lambda: sum(t > released for t in good_client.served) >= 40, 60, "40 answers after the release")
        assert not good_client.errors, good_client.errors[:3]
        assert healthz(stack)["ok"] is True and replica_pids(stack, GATEWAY_REPLICA) == [replica]
        assert ask(stack, GenerationRequest("served after the idle sweep", seed=11)).png
    finally:
        for conn in idle:
            conn.close()


def test_a_client_gone_mid_generation_still_gets_its_image_cached(stack, good_client):
    request = slow_request(stack, "nobody waits for this image", seconds=3)
    baseline = healthz(stack)["open_connections"]
    since = time.monotonic()
    leaving = []
    for _ in range(2):  # a leader and a joiner, both gone before the image is ready
        conn = connect(stack)
        conn.sendall(protocol.encode_request(request))
        # Gone once the render runs: a task whose waiters all left before its start is skipped.
        while (frame := protocol.read_frame(conn, 30)).json().get("state") != protocol.STATUS_GENERATING:
            assert frame.kind == protocol.STATUS, frame
        leaving.append(conn)
    assert healthz(stack)["pending_misses"] == 1
    for conn in leaving:
        conn.close()
    wait_for(lambda: len(cached_pngs(stack, key_of(request))) == 1, 90, "the image being cached")
    health = wait_for(lambda: (lambda h: h if h["pending_misses"] == 0 else None)(healthz(stack)), 10,
                      "pending misses back to 0")
    wait_for(lambda: healthz(stack)["open_connections"] <= baseline, 10, "the dead connections released")
    assert health["ok"] is True
    assert ask(stack, request).statuses[0]["state"] == protocol.STATUS_CACHED
    good_client.assert_served_since(since)


# -- the HTTP front -------------------------------------------------------------------------------

def http_post(stack, body: bytes, headers: Optional[dict] = None, chunked: bool = False):
    """POST to the images route; returns (status, decoded JSON body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.http_port, timeout=30)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request("POST", "/v1/images/generations", body=iter([body[i:i + 4096] for i in
                                                                       range(0, len(body), 4096)]),
                         headers=all_headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/images/generations", body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null"), dict(response.getheaders())
    finally:
        conn.close()


HTTP_CASES = {
    "malformed JSON": (b"{not json", 400, None),
    "non-UTF-8 body": (b"\xff\xfe\xfd", 400, None),
    "empty body": (b"", 400, None),
    "JSON list": (b'["a fox"]', 400, "body"),
    "prompt is a number": (b'{"prompt": 5}', 400, "prompt"),
    "no prompt": (b'{"size": "64x64"}', 400, "prompt"),
    "whitespace prompt": (b'{"prompt": "   "}', 400, "prompt"),
    "prompt over the limit": (json.dumps({"prompt": "x" * 1001}).encode(), 400, "prompt"),
    "steps as a string": (b'{"prompt": "x", "steps": "many"}', 400, "steps"),
    "negative steps": (b'{"prompt": "x", "steps": -5}', 400, "steps"),
    "huge steps": (b'{"prompt": "x", "steps": 1000000000}', 400, "steps"),
    "width as a float": (b'{"prompt": "x", "width": 64.5}', 400, "width"),
    "unknown field": (b'{"prompt": "x", "colour": "red"}', 400, "colour"),
    "size huge": (b'{"prompt": "x", "size": "huge"}', 400, "size"),
    "size one number": (b'{"prompt": "x", "size": "64"}', 400, "size"),
    "size three numbers": (b'{"prompt": "x", "size": "64x64x64"}', 400, "size"),
    "size as a number": (b'{"prompt": "x", "size": 512}', 400, "size"),
    "size 0x0": (b'{"prompt": "x", "size": "0x0"}', 400, "width"),
    "size 1000000x64": (b'{"prompt": "x", "size": "1000000x64"}', 400, "width"),
    "size 64x1000000": (b'{"prompt": "x", "size": "64x1000000"}', 400, "height"),
    "n=11": (b'{"prompt": "x", "n": 11}', 400, "n"),
    "n=0": (b'{"prompt": "x", "n": 0}', 400, "n"),
    "n a string": (b'{"prompt": "x", "n": "2"}', 400, "n"),
    "response_format png": (b'{"prompt": "x", "response_format": "png"}', 400, "response_format"),
    "a 20 KiB prompt": (json.dumps({"prompt": "x" * 20000}).encode(), 400, "prompt"),
}


@pytest.mark.parametrize("name", list(HTTP_CASES))
def test_bad_http_input_gets_a_clear_error(stack, good_client, name):
    body, status, param = HTTP_CASES[name]
    since = time.monotonic()
    started = time.monotonic()
    code, payload, _ = http_post(stack, body)
    assert time.monotonic() - started < ANSWER_WITHIN_S
    assert code == status, payload
    error = payload["error"]
    assert error["code"] == error["type"] and error["code"] in protocol.ERROR_CODES
    assert error["param"] == param and len(error["message"]) > 10
    good_client.assert_served_since(since)


def test_too_large_http_body_is_refused_by_its_declared_length(stack):
    """Refused from the header, before a byte of the body is read (only a few are sent)."""
    status, payload, _ = http_post(stack, b'{"prompt": "x"}',
                                   headers={"Content-Length": str(protocol.MAX_PAYLOAD[protocol.REQUEST] + 1)})
    assert status == 413 and payload["error"]["code"] == protocol.E_FRAME_TOO_LARGE


def test_too_large_http_body_without_a_length_is_refused(stack):
    body = json.dumps({"prompt": "x" * (protocol.MAX_PAYLOAD[protocol.REQUEST] + 20000)}).encode()
    status, payload, _ = http_post(stack, body, chunked=True)
    assert status == 413 and payload["error"]["code"] == protocol.E_FRAME_TOO_LARGE


def test_http_body_claiming_a_gigabyte_is_refused_without_waiting_for_it(stack):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.gateway.http_port), timeout=15) as conn:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{\"prompt\": \"x\"")
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except socket.timeout:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < ANSWER_WITHIN_S


def test_a_valid_http_request_after_all_that(stack):
    status, payload, _ = http_post(stack, b'{"prompt": "a valid request after the bad ones", "size": "64x64"}')
    assert status == 200 and payload["data"][0]["b64_json"]


def test_the_well_behaved_client_was_served_throughout(good_client):
    assert not good_client.errors, good_client.errors[:3]
    assert len(good_client.served) > 50
    print(f"\nwell-behaved client: {len(good_client.served)} images, 0 errors, "
          f"slowest {good_client.slowest * 1000:.0f} ms")
