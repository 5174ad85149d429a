"""The wire contract: framing over real sockets, caps from the header alone, every malformed frame's
code, timeouts, fuzzing of the decoders, and the request model's validation and cache key."""

import base64
import dataclasses
import hashlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import protocol
from client.protocol import (
    MAX_PAYLOAD,
    MAX_PROMPT_CHARS,
    ConnectionClosed,
    Frame,
    GenerationRequest,
    InvalidRequest,
    ProtocolError,
)
from tests.resolve import key_of, resolved

REPO = Path(__file__).resolve().parents[2]
KINDS = sorted(MAX_PAYLOAD)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def header(kind: int, length: int, magic: bytes = protocol.MAGIC, version: int = protocol.PROTOCOL_VERSION) -> bytes:
    return protocol.HEADER.pack(magic, version, kind, length)


def read(sock: socket.socket, timeout: float = 2.0) -> Frame:
    return protocol.read_frame(sock, frame_timeout=timeout)


def raises_code(code: str, call, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value.message
    return caught.value


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def test_header_is_nine_bytes_magic_version_type_length():
    raw = protocol.encode_frame(protocol.STATUS, b"{}")
    assert raw == b"SDG" + bytes([1, protocol.STATUS]) + (2).to_bytes(4, "big") + b"{}"
    assert protocol.HEADER.size == 9


def test_every_frame_kind_round_trips_over_one_socket(pair):
    a, b = pair
    request = GenerationRequest("a red fox ü 🦊", negative_prompt="blur", width=128, height=72, steps=3,
                                guidance_scale=5.5, seed=3, scheduler="ddim", model="org/model-v1.5")
    png = bytes(range(256)) * 40
    a.sendall(protocol.encode_request(request, token="t0k")
              + protocol.encode_request(GenerationRequest("no token"))
              + protocol.encode_status(protocol.STATUS_QUEUED, position=2)
              + protocol.encode_image({"key": "ab" * 32, "seed": 3}, png)
              + protocol.encode_image({}, b"")
              + protocol.encode_error(protocol.E_INVALID_REQUEST, "width: too wide", field="width")
              + protocol.encode_error(protocol.E_BUSY, "later"))
    assert protocol.decode_request(read(b)) == (request, "t0k")
    assert protocol.decode_request(read(b)) == (GenerationRequest("no token"), None)
    status = read(b)
    assert status.kind == protocol.STATUS and status.json() == {"state": "queued", "position": 2}
    assert protocol.decode_image(read(b)) == ({"key": "ab" * 32, "seed": 3}, png)
    assert protocol.decode_image(read(b)) == ({}, b"")
    error = protocol.decode_error(read(b))
    assert (error.code, error.message, error.field) == ("invalid_request", "width: too wide", "width")
    error = protocol.decode_error(read(b))
    assert (error.code, error.message, error.field) == ("busy", "later", None)


def test_encoder_refuses_unknown_kinds_and_oversized_payloads():
    with pytest.raises(ValueError):
        protocol.encode_frame(9, b"")
    for kind in KINDS:
        raises_code(protocol.E_FRAME_TOO_LARGE, protocol.encode_frame, kind, b"x" * (MAX_PAYLOAD[kind] + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_a_payload_exactly_at_the_cap_is_accepted(pair, kind):
    a, b = pair
    payload = b"\x07" * MAX_PAYLOAD[kind]
    writer = threading.Thread(target=a.sendall, args=(protocol.encode_frame(kind, payload),), daemon=True)
    writer.start()
    frame = read(b, timeout=10)
    writer.join(10)
    assert frame.kind == kind and frame.payload == payload


# ---------------------------------------------------------------------------------------------
# Size caps: decided from the header alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("excess", ["cap+1", "2**31", "2**32-1"])
def test_length_over_the_cap_is_refused_from_the_header_alone(pair, kind, excess):
    a, b = pair
    length = {"cap+1": MAX_PAYLOAD[kind] + 1, "2**31": 2**31, "2**32-1": 2**32 - 1}[excess]
    a.sendall(header(kind, length) + b"MARK")  # the peer stays open: a reader waiting for the payload would hang
    started = time.monotonic()
    raises_code(protocol.E_FRAME_TOO_LARGE, protocol.read_frame, b, frame_timeout=5)
    assert time.monotonic() - started < 1.0
    b.settimeout(1)
    assert b.recv(16) == b"MARK"  # not one payload byte was consumed


def test_a_two_gib_request_header_allocates_nothing(pair):
    a, b = pair
    a.sendall(header(protocol.REQUEST, 2**31))
    tracemalloc.start()
    try:
        raises_code(protocol.E_FRAME_TOO_LARGE, protocol.read_frame, b, frame_timeout=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_receiver_side_cap_refuses_kinds_it_does_not_accept(pair):
    a, b = pair
    a.sendall(protocol.encode_image({}, b"x" * 100) + protocol.encode_request(GenerationRequest("ok")))
    accepted = {protocol.REQUEST: MAX_PAYLOAD[protocol.REQUEST]}
    raises_code(protocol.E_FRAME_TOO_LARGE, protocol.read_frame, b, 2, max_payload=accepted)


# ---------------------------------------------------------------------------------------------
# Malformed frames
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, code", [
    (header(protocol.REQUEST, 0, magic=b"GET"), protocol.E_BAD_FRAME),
    (b"GET / HTTP/1.1\r\n\r\n", protocol.E_BAD_FRAME),
    (header(protocol.REQUEST, 0, magic=b"sdg"), protocol.E_BAD_FRAME),
    (header(protocol.REQUEST, 0, version=0), protocol.E_UNSUPPORTED_VERSION),
    (header(protocol.REQUEST, 0, version=2), protocol.E_UNSUPPORTED_VERSION),
    (header(protocol.REQUEST, 0, version=255), protocol.E_UNSUPPORTED_VERSION),
    (header(0, 0), protocol.E_BAD_FRAME),
    (header(9, 0), protocol.E_BAD_FRAME),
    (header(255, 2**32 - 1), protocol.E_BAD_FRAME),
])
def test_bad_header_gives_its_code(pair, raw, code):
    a, b = pair
    a.sendall(raw)
    raises_code(code, read, b)


@pytest.mark.parametrize("raw", [
    b"S",
    b"SDG\x01",
    header(protocol.REQUEST, 100),
    header(protocol.REQUEST, 100) + b"{" * 99,
    protocol.encode_image({"key": "k"}, b"png")[:-1],
])
def test_peer_closing_mid_frame_is_bad_frame(pair, raw):
    a, b = pair
    a.sendall(raw)
    a.close()
    raises_code(protocol.E_BAD_FRAME, read, b)


@pytest.mark.parametrize("payload", [b"\xff\xfe\xfa", b"\xc3(", b"not json", b"{", b"", b"[" * 4000])
@pytest.mark.parametrize("kind", KINDS)
def test_payload_that_is_not_utf8_json_is_bad_frame(pair, kind, payload):
    a, b = pair
    if kind == protocol.IMAGE:  # the metadata is the JSON part
        payload = protocol.IMAGE_META_LEN.pack(len(payload)) + payload + b"png"
    payload = payload[:MAX_PAYLOAD[kind]]
    a.sendall(protocol.encode_frame(kind, payload))
    frame = read(b)
    decode = {protocol.REQUEST: protocol.decode_request, protocol.STATUS: Frame.json,
              protocol.IMAGE: protocol.decode_image, protocol.ERROR: Frame.json, protocol.LIST_MODELS: Frame.json,
              protocol.MODELS: Frame.json, protocol.PREVIEW: Frame.json, protocol.CANCEL: Frame.json}[kind]
    raises_code(protocol.E_BAD_FRAME, decode, frame)


def test_image_metadata_length_must_fit_the_frame():
    raises_code(protocol.E_BAD_FRAME, protocol.decode_image, Frame(protocol.IMAGE, b"\x00\x00"))
    raises_code(protocol.E_BAD_FRAME, protocol.decode_image, Frame(protocol.IMAGE, b"\x00\x00\x00\x09{}"))
    raises_code(protocol.E_BAD_FRAME, protocol.decode_image, Frame(protocol.IMAGE, b"\xff\xff\xff\xff"))


def test_error_frame_that_is_not_an_object_decodes_to_bad_frame():
    assert protocol.decode_error(Frame(protocol.ERROR, b"[1]")).code == protocol.E_BAD_FRAME


def test_decode_request_refuses_other_frame_kinds():
    raises_code(protocol.E_BAD_FRAME, protocol.decode_request, Frame(protocol.STATUS, b'{"state":"queued"}'))


@pytest.mark.parametrize("body, field", [
    ([1, 2], None),
    ("a fox", None),
    (None, None),
    ({}, None),
    ({"prompt": "a fox"}, None),
    ({"request": "a fox"}, None),
    ({"request": ["a fox"]}, None),
    ({"request": {"prompt": "x"}, "token": 5}, "token"),
    ({"request": {"prompt": "x", "width": "wide"}}, "width"),
    ({"request": {"prompt": "x", "colour": "red"}}, "colour"),
    ({"request": {"width": 64}}, "prompt"),
])
def test_wrong_json_shape_is_invalid_request(body, field):
    frame = Frame(protocol.REQUEST, json.dumps(body).encode())
    error = raises_code(protocol.E_INVALID_REQUEST, protocol.decode_request, frame)
    assert error.field == field


# ---------------------------------------------------------------------------------------------
# Timeouts and closing
# ---------------------------------------------------------------------------------------------

def test_trickling_peer_is_cut_off_at_the_frame_deadline(pair):
    a, b = pair
    frame = protocol.encode_request(GenerationRequest("slow"))
    stop = threading.Event()

    def trickle():
        for byte in frame:
            if stop.is_set():
                return
            try:
                a.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(socket.timeout):
            # The idle allowance is long: only the whole-frame deadline can end this early.
            protocol.read_frame(b, frame_timeout=0.5, idle_timeout=30)
    finally:
        stop.set()
    assert 0.4 < time.monotonic() - started < 2.0


def test_idle_timeout_bounds_the_wait_for_the_first_byte(pair):
    _, b = pair
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        protocol.read_frame(b, frame_timeout=30, idle_timeout=0.2)
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(socket.timeout):  # without idle_timeout the frame timeout bounds it
        protocol.read_frame(b, frame_timeout=0.2)
    assert time.monotonic() - started < 1.5


def test_clean_close_between_frames_is_connection_closed(pair):
    a, b = pair
    a.sendall(protocol.encode_status(protocol.STATUS_CACHED))
    a.close()
    assert read(b).json() == {"state": "cached"}
    with pytest.raises(ConnectionClosed):
        read(b)


# ---------------------------------------------------------------------------------------------
# Fuzzing the decoders
# ---------------------------------------------------------------------------------------------

frame_like = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda magic, version, kind, length, body: protocol.HEADER.pack(magic, version, kind, length) + body,
        st.sampled_from([protocol.MAGIC, protocol.MAGIC, b"SDH", b"\x00\x00\x00"]),
        st.sampled_from([protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION, 0, 2, 255]),
        st.one_of(st.sampled_from(KINDS), st.integers(0, 255)),
        st.one_of(st.integers(0, 80), st.sampled_from([MAX_PAYLOAD[k] + d for k in KINDS for d in (0, 1)]),
                  st.integers(0, 2**32 - 1)),
        st.binary(max_size=80),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frame_like, max_size=4).map(b"".join), st.booleans())
def test_fuzz_frame_decoder_only_raises_protocol_errors_and_never_hangs(raw, close):
    a, b = socket.socketpair()
    started = time.monotonic()
    try:
        a.sendall(raw)
        if close:
            a.shutdown(socket.SHUT_WR)
        # A closed peer never makes the reader wait, so only an open one may end in a timeout.
        timeout = 2.0 if close else 0.01
        for _ in range(len(raw) + 1):
            try:
                frame = protocol.read_frame(b, frame_timeout=timeout, idle_timeout=timeout)
            except (ProtocolError, ConnectionClosed):
                break
            except socket.timeout:
                assert not close, "read_frame waited on a peer that had closed"
                break
            assert frame.kind in MAX_PAYLOAD and len(frame.payload) <= MAX_PAYLOAD[frame.kind]
    finally:
        a.close()
        b.close()
    assert time.monotonic() - started < 2.0


FIELD_NAMES = [f.name for f in dataclasses.fields(GenerationRequest)]
scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.sampled_from([64, 72, 512, 2**32, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(list(protocol.SCHEDULERS) + ["tiny", "org/model", "", " "]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=12)
request_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"request": json_values}),
    st.fixed_dictionaries({"request": st.dictionaries(st.sampled_from(FIELD_NAMES), scalars, max_size=9)},
                          optional={"token": scalars}),
)


@settings(max_examples=500, deadline=None)
@given(request_bodies)
def test_fuzz_request_decoder_gives_a_valid_request_or_a_protocol_error(body):
    frame = Frame(protocol.REQUEST, json.dumps(body).encode())
    try:
        request, token = protocol.decode_request(frame)
    except ProtocolError as exc:
        assert exc.code in (protocol.E_INVALID_REQUEST, protocol.E_BAD_FRAME)
        return
    request.validate()
    assert token is None or isinstance(token, str)
    assert GenerationRequest.from_dict(request.to_dict()) == request
    assert len(request.with_defaults("tiny", 64, 64, 2, 7.5, "default").cache_key()) == 64


# ---------------------------------------------------------------------------------------------
# Request model: validation names the field
# ---------------------------------------------------------------------------------------------

BASE = GenerationRequest("a red fox", negative_prompt="blurry", width=64, height=64, steps=2, guidance_scale=7.5,
                         seed=1, scheduler="default", model="tiny")

BAD_FIELDS = [
    ("prompt", "", "empty"),
    ("prompt", "   \n\t ", "empty"),
    ("prompt", "x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
    ("prompt", "a\x00b", "NUL"),
    ("prompt", 42, "string"),
    ("prompt", None, "string"),
    ("negative_prompt", "x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
    ("negative_prompt", None, "string"),
    ("width", 100, "multiple of 8"),
    ("width", 10**6, "64..2048"),
    ("width", -64, "64..2048"),
    ("width", "512", "integer"),
    ("width", 512.0, "integer"),
    ("width", True, "integer"),
    ("height", 8, "64..2048"),
    ("height", 1001, "multiple of 8"),
    ("steps", -1, "1..150"),
    ("steps", 0, "1..150"),
    ("steps", 10**9, "1..150"),
    ("steps", 2.5, "integer"),
    ("guidance_scale", math.nan, "outside"),
    ("guidance_scale", math.inf, "outside"),
    ("guidance_scale", -0.5, "outside"),
    ("guidance_scale", 31.0, "outside"),
    ("guidance_scale", True, "number"),
    ("guidance_scale", "7.5", "number"),
    ("seed", -1, "0..4294967295"),
    ("seed", 2**32, "0..4294967295"),
    ("seed", "1", "integer"),
    ("seed", False, "integer"),
    ("scheduler", "warp", "not one of"),
    ("scheduler", "DDIM", "not one of"),
    ("scheduler", 5, "not one of"),
    ("model", "", "non-empty"),
    ("model", 5, "non-empty"),
    ("model", "../../etc passwd", "A-Z"),
    ("model", "m" * 201, "200"),
]


@pytest.mark.parametrize("field, value, words", BAD_FIELDS)
def test_bad_field_is_named_locally_and_on_the_wire(field, value, words):
    with pytest.raises(InvalidRequest) as caught:
        dataclasses.replace(BASE, **{field: value}).validate()
    assert caught.value.field == field and words in str(caught.value)
    body = {"request": dict(BASE.to_dict(), **{field: value})}
    error = raises_code(protocol.E_INVALID_REQUEST, protocol.decode_request,
                        Frame(protocol.REQUEST, json.dumps(body).encode()))
    assert error.field == field and words in error.message


def test_unknown_and_missing_fields_are_named():
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})
    assert caught.value.field == "colour" and "allowed fields" in str(caught.value)
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest.from_dict({"width": 64})
    assert caught.value.field == "prompt"


def test_every_valid_edge_value_is_accepted():
    for changes in ({"width": 64, "height": 2048}, {"steps": 1}, {"steps": 150}, {"guidance_scale": 0},
                    {"guidance_scale": 30.0}, {"seed": 0}, {"seed": 2**32 - 1}, {"prompt": "x" * MAX_PROMPT_CHARS},
                    {"width": None, "height": None, "steps": None, "seed": None}):
        dataclasses.replace(BASE, **changes).validate()


# ---------------------------------------------------------------------------------------------
# Request model: the cache key covers every field
# ---------------------------------------------------------------------------------------------

def changed_value(field: dataclasses.Field, value):
    """A different, valid value for any field, chosen from its name and type."""
    if field.name == "scheduler":
        return next(s for s in protocol.SCHEDULERS if s != value)
    if field.name == "model":
        return "someone/another-model"
    if field.type == "str":
        return value + " under a full moon"
    if field.type in ("int", "Optional[int]"):
        return value + (8 if field.name in ("width", "height") else 1)
    if field.name == "loras":
        return (("ink", 0.5),) if value != (("ink", 0.5),) else (("ink", 0.8),)
    if field.name == "strength":
        return 0.75 if value != 0.75 else 0.5
    if field.type in ("float", "Optional[float]"):
        return value + 0.5
    if field.type == "Optional[bytes]":
        return value + b"-changed"  # still a PNG by its signature, which is all validate() reads
    pytest.fail(f"no rule to change GenerationRequest.{field.name} ({field.type}): add one here, and make sure "
                "the field is part of cache_key()")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_IMG2IMG = dataclasses.replace(BASE, init_image=PNG_SIGNATURE + b"init", mask=PNG_SIGNATURE + b"mask", strength=0.5)


@pytest.mark.parametrize("base", [BASE_IMG2IMG, resolved(GenerationRequest("a red fox", init_image=BASE_IMG2IMG.init_image,
                                                                           mask=BASE_IMG2IMG.mask))],
                         ids=["explicit", "defaults"])
def test_changing_any_field_changes_the_cache_key(base):
    explicit = BASE_IMG2IMG  # values to change from when `base` leaves a field to its default
    keys = {"base": base.cache_key()}
    for field in dataclasses.fields(GenerationRequest):
        current = getattr(base, field.name)
        changed = dataclasses.replace(base, **{field.name: changed_value(field, current if current is not None
                                                                          else getattr(explicit, field.name))})
        changed.validate()
        keys[field.name] = changed.cache_key()
    assert len(set(keys.values())) == len(keys), f"fields sharing a key: {keys}"


def test_a_text_request_keys_as_before_the_img2img_fields_existed():
    """The img2img and LoRA fields are left out of a plain text request's key: caches made before them still hit."""
    fields = {"prompt": "a red fox", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 2,
              "guidance_scale": 7.5, "seed": 1, "scheduler": "default", "model": "tiny"}
    before = hashlib.sha256((protocol.KEY_VERSION + json.dumps(fields, sort_keys=True, separators=(",", ":")))
                            .encode()).hexdigest()
    assert BASE.cache_key() == before
    assert BASE_IMG2IMG.cache_key() != before
    assert dataclasses.replace(BASE, loras=(("ink", 0.0),)).cache_key() == before  # weight 0: no LoRA
    assert dataclasses.replace(BASE, loras=(("ink", 1.0),)).cache_key() != before


def test_an_image_is_keyed_by_its_content_and_travels_as_base64():
    request = BASE_IMG2IMG
    wire = json.loads(json.dumps(request.to_dict()))
    assert wire["init_image"] == base64.b64encode(request.init_image).decode()
    again = GenerationRequest.from_dict(wire)
    assert again == request and again.cache_key() == request.cache_key()
    assert "init_image" not in request.summary() and request.summary()["init_image_sha256"] == \
        hashlib.sha256(request.init_image).hexdigest()
    other = dataclasses.replace(request, init_image=request.init_image + b"x")
    assert other.cache_key() != request.cache_key()


@pytest.mark.parametrize("change, field, words", [
    ({"strength": 0.5, "init_image": None, "mask": None}, "strength", "needs an init_image"),
    ({"mask": PNG_SIGNATURE, "init_image": None, "strength": None}, "mask", "needs an init_image"),
    ({"init_image": b"GIF89a...."}, "init_image", "not a PNG, JPEG or WebP"),
    ({"init_image": b""}, "init_image", "empty"),
    ({"init_image": PNG_SIGNATURE + b"x" * protocol.MAX_IMAGE_BYTES}, "init_image", "the limit is"),
    ({"strength": 0.0}, "strength", "outside (0, 1]"),
    ({"strength": 1.5}, "strength", "outside (0, 1]"),
    ({"strength": 0.2, "steps": 2}, "strength", "leaves no denoising step"),
])
def test_bad_img2img_fields_are_refused_naming_the_field(change, field, words):
    with pytest.raises(InvalidRequest) as caught:
        dataclasses.replace(BASE_IMG2IMG, **change).validate()
    assert caught.value.field == field and words in caught.value.message


def test_an_init_image_on_the_wire_must_be_base64_within_the_cap():
    for value, words in [("@@@", "not valid base64"), (12, "base64 text"),
                         ("A" * (protocol.MAX_IMAGE_BYTES * 2), "limit")]:
        with pytest.raises(InvalidRequest, match=words):
            GenerationRequest.from_dict({"prompt": "x", "init_image": value})
    data_url = "data:image/png;base64," + base64.b64encode(PNG_SIGNATURE + b"x").decode()
    assert GenerationRequest.from_dict({"prompt": "x", "init_image": data_url}).init_image == PNG_SIGNATURE + b"x"


def test_normalisation_does_not_change_the_key():
    key = key_of(GenerationRequest("a red fox", negative_prompt="blurry", seed=1))
    assert key_of(GenerationRequest("  A   Red\tFOX\n", negative_prompt=" BLURRY ", seed=1)) == key
    assert key_of(GenerationRequest("a red fox", guidance_scale=7)) == \
        key_of(GenerationRequest("a red fox", guidance_scale=7.0))
    assert key_of(GenerationRequest("a red fox", guidance_scale=-0.0)) == \
        key_of(GenerationRequest("a red fox", guidance_scale=0))


def test_defaults_and_the_derived_seed_give_the_same_key_as_explicit_values():
    implicit = resolved(GenerationRequest("a red fox"))
    normalized = implicit.normalized()
    assert (normalized.width, normalized.height, normalized.steps, normalized.model) == (64, 64, 2, "tiny")
    explicit = GenerationRequest("a red fox", width=64, height=64, steps=2, seed=normalized.seed, model="tiny",
                                 guidance_scale=7.5, scheduler="default")
    assert explicit.cache_key() == implicit.cache_key() == normalized.cache_key()
    assert normalized.normalized() == normalized
    assert key_of(GenerationRequest("a red fox", seed=(normalized.seed + 1) % 2**32)) != implicit.cache_key()


def test_the_key_never_depends_on_what_the_client_left_out():
    """The client sends no model and no defaults; only the filled request is keyed."""
    bare = GenerationRequest("a red fox")
    assert bare.model is None and bare.to_dict()["model"] is None  # nothing hard-coded on the client side
    for name in protocol.RESOLVED_FIELDS:
        left_out = dataclasses.replace(resolved(bare), **{name: None})
        with pytest.raises(InvalidRequest) as caught:
            left_out.cache_key()
        assert caught.value.field == name and "fill" in caught.value.message
    spelled_out = GenerationRequest("a red fox", model="tiny", width=64, height=64, steps=2, guidance_scale=7.5,
                                    scheduler="default")
    assert key_of(bare) == key_of(spelled_out) == spelled_out.cache_key()
    assert bare.with_defaults("other", 512, 512, 25, 7.0, "ddim").cache_key() != key_of(bare)


def test_key_and_seed_follow_the_documented_definition():
    request = resolved(GenerationRequest("  A Red  Fox ", guidance_scale=7))
    fields = {"prompt": "a red fox", "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
              "guidance_scale": 7.0, "scheduler": "default", "model": "tiny"}

    def canonical(obj):
        return (protocol.KEY_VERSION + json.dumps(obj, sort_keys=True, separators=(",", ":"))).encode()

    seed = int.from_bytes(hashlib.sha256(canonical(fields)).digest()[:4], "big")
    assert request.normalized().seed == seed
    assert request.cache_key() == hashlib.sha256(canonical(dict(fields, seed=seed))).hexdigest()


def test_derived_seed_is_stable_across_calls_and_processes():
    prompts = ["stable seed", "another prompt", "ünïcödé prompt"]
    here = [resolved(GenerationRequest(p)).normalized().seed for p in prompts]
    assert here == [resolved(GenerationRequest(p)).normalized().seed for p in prompts]
    assert len(set(here)) == len(here) and all(0 <= seed <= protocol.MAX_SEED for seed in here)
    code = ("import sys; from client.protocol import GenerationRequest as G; "
            "print([G(p).with_defaults('tiny', 64, 64, 2, 7.5, 'default').normalized().seed for p in sys.argv[1:]])")
    there = subprocess.run([sys.executable, "-c", code, *prompts], cwd=REPO, capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)})
    assert json.loads(there.stdout) == here


# -- the sans-IO decoder both sides drive (protocol.FrameDecoder) -----------------------------------

def _stream() -> List[bytes]:
    from client.protocol import GenerationRequest

    return [protocol.encode_request(GenerationRequest("a split fox", seed=3), token="t"), protocol.encode_cancel(),
            protocol.encode_status("generating", step=1, steps=4), protocol.encode_image({"key": "k"}, b"\x89PNG" * 9),
            protocol.encode_error("busy", "try later"), protocol.encode_list_models()]


def _decode(chunks) -> List[protocol.Frame]:
    decoder, frames = protocol.FrameDecoder(), []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert not decoder.started, "bytes left over"
    return frames


def test_the_decoder_gives_the_same_frames_split_at_every_byte_boundary():
    data = b"".join(_stream())
    whole = _decode([data])
    assert [f.kind for f in whole] == [protocol.REQUEST, protocol.CANCEL, protocol.STATUS, protocol.IMAGE,
                                       protocol.ERROR, protocol.LIST_MODELS]
    for cut in range(1, len(data)):
        assert _decode([data[:cut], data[cut:]]) == whole, f"split at byte {cut}"
    assert _decode([data[i:i + 1] for i in range(len(data))]) == whole  # one byte at a time


def test_the_decoder_checks_a_header_before_its_payload_arrives():
    decoder = protocol.FrameDecoder({protocol.REQUEST: 100})
    frame = protocol.encode_frame(protocol.REQUEST, b"x" * 101)
    decoder.feed(frame[:protocol.HEADER.size])  # the header alone
    with pytest.raises(protocol.ProtocolError) as raised:
        decoder.next_frame()
    assert raised.value.code == protocol.E_FRAME_TOO_LARGE and "not accepted here" in raised.value.message
    assert protocol.FrameDecoder().needed() == protocol.HEADER.size
