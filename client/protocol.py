"""The sdgate wire contract: request model, cache key, framing, message kinds and error codes.

Standard library only, Python 3.9+. The boot client, the gateway and the workers all import this
module; nobody re-implements any part of it. See docs/protocol.md for the byte layout.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

# ---------------------------------------------------------------------------------------------
# Request model
# ---------------------------------------------------------------------------------------------

# No model and no per-model defaults here: the server's model catalogue (configs/models.yaml) owns
# them. A client sends only what its user chose; the gateway fills in the default model and that
# model's defaults before it computes the cache key (see `with_defaults`).
SCHEDULERS = ("default", "ddim", "pndm", "euler", "euler_a", "dpm++", "lms")

MAX_PROMPT_CHARS = 1000
MIN_SIDE, MAX_SIDE = 64, 2048
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_SEED = 2**32 - 1
MAX_MODEL_CHARS = 200
_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9._/\-]+$")
KEY_VERSION = "sdgate-key-v1"
# An init image (img2img) or mask (inpainting) travels by content: PNG, JPEG or WebP bytes, base64
# on the wire. The gateway also checks the pixel count from the header before decoding (bombs).
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
IMAGE_FIELDS = ("init_image", "mask")
MIN_STRENGTH, MAX_STRENGTH = 0.0, 1.0
# LoRAs named per request, from the model's catalogue entry: [{"name", "weight"}] on the wire.
MAX_LORAS = 4
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -2.0, 2.0
DEFAULT_STRENGTH, DEFAULT_INPAINT_STRENGTH = 0.75, 1.0  # A1111's img2img default; inpainting repaints the mask


class InvalidRequest(ValueError):
    """A request field is outside what sdgate accepts; `field` names it for the user."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    """What to render. Fields left as None are filled by the gateway from its model catalogue
    (`with_defaults`) before the request is normalised and keyed."""

    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    scheduler: Optional[str] = None
    model: Optional[str] = None
    # img2img: start from `init_image` (bytes) and keep `strength` of the way to noise; with a
    # `mask` (white repaints, black keeps), inpainting. All three stay None for text to image.
    init_image: Optional[bytes] = None
    mask: Optional[bytes] = None
    strength: Optional[float] = None
    # ((name, weight), ...): LoRAs of the model's catalogue entry, applied on top of its weights.
    loras: Optional[Tuple[Tuple[str, float], ...]] = None

    @classmethod
    def from_dict(cls, data: Any) -> "GenerationRequest":
        """Build a request from decoded JSON, rejecting unknown fields and wrong types."""
        if not isinstance(data, dict):
            raise InvalidRequest("request", f"must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(unknown[0], f"unknown field; allowed fields are {sorted(known)}")
        if "prompt" not in data:
            raise InvalidRequest("prompt", "is required")
        data = dict(data)
        for name in IMAGE_FIELDS:
            if data.get(name) is not None:
                data[name] = decode_image_field(name, data[name])
        if data.get("loras") is not None:
            data["loras"] = decode_loras(data["loras"])
        request = cls(**data)
        request.validate()
        return request

    def to_dict(self) -> Dict[str, Any]:
        """The request as a JSON-ready dict (the task payload and the wire body): images in base64,
        and the img2img fields left out when unset, so a text request reads as it always did."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in IMAGE_FIELDS + ("strength", "loras"):
            if fields[name] is None:
                del fields[name]
            elif name in IMAGE_FIELDS:
                fields[name] = base64.b64encode(fields[name]).decode("ascii")
        if "loras" in fields:
            fields["loras"] = [{"name": name, "weight": weight} for name, weight in fields["loras"]]
        return fields

    def summary(self) -> Dict[str, Any]:
        """to_dict with each image replaced by its sha256 (`init_image_sha256`): what an image's
        metadata, a job's params and logs carry instead of megabytes of base64."""
        fields = self.to_dict()
        for name in IMAGE_FIELDS:
            if fields.pop(name, None) is not None:
                fields[name + "_sha256"] = hashlib.sha256(getattr(self, name)).hexdigest()
        return fields

    @property
    def kind(self) -> str:
        """txt2img, img2img or inpaint: which pipeline renders it."""
        return "txt2img" if self.init_image is None else ("img2img" if self.mask is None else "inpaint")

    def validate(self) -> None:
        """Raise InvalidRequest naming the first field that is wrong, its value and the limit."""
        _check_text("prompt", self.prompt, allow_empty=False)
        _check_text("negative_prompt", self.negative_prompt, allow_empty=True)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value, MIN_SIDE, MAX_SIDE)
            if value % 8:
                raise InvalidRequest(name, f"{value} is not a multiple of 8; use e.g. {value - value % 8 or 64}")
        if self.steps is not None:
            _check_int("steps", self.steps, MIN_STEPS, MAX_STEPS)
        if self.guidance_scale is not None:
            if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
                raise InvalidRequest("guidance_scale", f"must be a number, got {self.guidance_scale!r}")
            if not (MIN_GUIDANCE <= self.guidance_scale <= MAX_GUIDANCE):  # NaN fails this too
                raise InvalidRequest(
                    "guidance_scale", f"{self.guidance_scale} is outside {MIN_GUIDANCE}..{MAX_GUIDANCE}"
                )
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise InvalidRequest("scheduler", f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.model is not None:
            check_model_name(self.model)
        for name in IMAGE_FIELDS:
            if getattr(self, name) is not None:
                check_image_bytes(name, getattr(self, name))
        if self.init_image is None:
            for name in ("mask", "strength"):
                if getattr(self, name) is not None:
                    raise InvalidRequest(name, "needs an init_image to apply to; send one, or leave it out")
        if self.loras is not None:
            check_loras(self.loras)
        if self.strength is not None:
            if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
                raise InvalidRequest("strength", f"must be a number, got {self.strength!r}")
            if not (MIN_STRENGTH < self.strength <= MAX_STRENGTH):
                raise InvalidRequest("strength", f"{self.strength} is outside (0, 1]: 0.1 keeps the init image "
                                     "nearly as it is, 1.0 keeps only its layout")
            if self.steps is not None and int(self.steps * self.strength) < 1:
                raise InvalidRequest("strength", f"{self.strength} of {self.steps} steps leaves no denoising step; "
                                     f"use at least {1 / self.steps:.3g} or more steps")

    def with_defaults(self, model: str, width: int, height: int, steps: int, guidance_scale: float,
                      scheduler: str) -> "GenerationRequest":
        """This request with `model` named and each field it left out (None) set to the value given.

        The gateway calls it with its catalogue's default model and that model's defaults; the
        result, not the request as sent, is what gets normalised and keyed.
        """
        return dataclasses.replace(
            self, model=pick(self.model, model), width=pick(self.width, width), height=pick(self.height, height),
            steps=pick(self.steps, steps), guidance_scale=pick(self.guidance_scale, guidance_scale),
            scheduler=pick(self.scheduler, scheduler))

    def normalized(self) -> "GenerationRequest":
        """The canonical form: validated, defaults filled, prompt normalised, seed resolved.

        Two requests that render the same image have the same normalized form, and the worker
        renders exactly this form, so a cached image is the image a regeneration would give.
        """
        self.validate()
        unfilled = [name for name in RESOLVED_FIELDS if getattr(self, name) is None]
        if unfilled:
            raise InvalidRequest(unfilled[0], "was left for the server to fill, and nothing filled it: the gateway "
                                 "applies its model catalogue's defaults (with_defaults) before keying a request")
        resolved = dataclasses.replace(
            self,
            prompt=normalize_prompt(self.prompt),
            negative_prompt=normalize_prompt(self.negative_prompt),
            guidance_scale=float(self.guidance_scale) + 0.0,  # + 0.0 turns -0.0 into 0.0
        )
        if resolved.loras is not None:  # order does not matter, and a LoRA at weight 0 changes nothing
            loras = tuple(sorted((name, float(weight) + 0.0) for name, weight in resolved.loras if weight != 0))
            resolved = dataclasses.replace(resolved, loras=loras or None)
        if resolved.init_image is not None:
            strength = DEFAULT_STRENGTH if resolved.mask is None else DEFAULT_INPAINT_STRENGTH
            resolved = dataclasses.replace(resolved, strength=float(pick(resolved.strength, strength)))
            resolved.validate()
        if resolved.seed is None:
            digest = hashlib.sha256(_canonical_bytes(resolved, include_seed=False)).digest()
            resolved = dataclasses.replace(resolved, seed=int.from_bytes(digest[:4], "big"))
        return resolved

    def cache_key(self) -> str:
        """sha256 over every field that changes the image, after normalisation (64 hex chars)."""
        return hashlib.sha256(_canonical_bytes(self.normalized(), include_seed=True)).hexdigest()


# Fields a request may leave out for the server's catalogue to fill (the seed is derived instead).
RESOLVED_FIELDS = ("model", "width", "height", "steps", "guidance_scale", "scheduler")


def check_model_name(name: Any) -> None:
    """Raise InvalidRequest unless `name` can be a model name on the wire."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model", "must be a non-empty string naming a model the server lists")
    if len(name) > MAX_MODEL_CHARS or not _MODEL_PATTERN.match(name):
        raise InvalidRequest("model", f"{name[:40]!r} must be at most {MAX_MODEL_CHARS} of A-Z a-z 0-9 . _ / -")


def normalize_prompt(text: str) -> str:
    """Collapse whitespace and lowercase: CLIP's tokenizer does both, so the image cannot change."""
    return " ".join(text.split()).lower()


def pick(mine: Any, default: Any) -> Any:
    return default if mine is None else mine


def sniff_image(data: bytes) -> Optional[str]:
    """"png", "jpeg" or "webp" from the file's signature; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_image_bytes(name: str, data: Any) -> None:
    """Raise InvalidRequest unless `data` is bytes of a PNG, JPEG or WebP within MAX_IMAGE_BYTES."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest(name, f"must be image bytes (base64 on the wire), got {type(data).__name__}")
    if not data:
        raise InvalidRequest(name, "is empty; send a PNG, JPEG or WebP image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequest(name, f"is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES} (scale the image down "
                             "or send it as JPEG)")
    if sniff_image(bytes(data[:16])) is None:
        raise InvalidRequest(name, "is not a PNG, JPEG or WebP image (its first bytes match none of them)")


def decode_loras(value: Any) -> Tuple[Tuple[str, float], ...]:
    """((name, weight), ...) from the wire's [{"name": ..., "weight": ...}] (weight defaults to 1)."""
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest("loras", f'must be a list of {{"name": ..., "weight": ...}}, got {type(value).__name__}')
    loras = []
    for item in value:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            item = {"name": item[0], "weight": item[1]}
        if not isinstance(item, dict) or set(item) - {"name", "weight"} or "name" not in item:
            raise InvalidRequest("loras", f'each LoRA is {{"name": ..., "weight": ...}}, got {str(item)[:60]!r}')
        loras.append((item["name"], item.get("weight", 1.0)))
    return tuple(loras)


def check_loras(loras: Any) -> None:
    """Raise InvalidRequest unless `loras` is up to MAX_LORAS distinct (name, weight) pairs."""
    if len(loras) > MAX_LORAS:
        raise InvalidRequest("loras", f"names {len(loras)} LoRAs; the limit is {MAX_LORAS} per request")
    names = [name for name, _ in loras]
    for name, weight in loras:
        if not isinstance(name, str) or not name or len(name) > MAX_MODEL_CHARS or not _MODEL_PATTERN.match(name):
            raise InvalidRequest("loras", f"LoRA name {str(name)[:40]!r} must be a name from GET /v1/models")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not MIN_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
            raise InvalidRequest("loras", f"LoRA {name!r}: weight {weight!r} must be a number in "
                                 f"{MIN_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}")
    if len(set(names)) != len(names):
        raise InvalidRequest("loras", "names a LoRA twice; give each once, with its weight")


def decode_image_field(name: str, value: Any) -> bytes:
    """Image bytes from a wire value: base64 text, optionally a `data:image/...;base64,` URL (bytes
    given in-process pass as they are)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be base64 text of a PNG, JPEG or WebP image, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:
        raise InvalidRequest(name, f"is over the {MAX_IMAGE_BYTES}-byte limit for an image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(name, "is not valid base64") from None


def _canonical_bytes(request: GenerationRequest, include_seed: bool) -> bytes:
    fields = request.summary()
    if not include_seed:
        fields.pop("seed")
    return (KEY_VERSION + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode("utf-8")


def _check_text(name: str, value: Any, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRequest(name, "is empty; describe the image you want")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(name, f"has {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "\x00" in value:
        raise InvalidRequest(name, "contains a NUL character")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if not (low <= value <= high):
        raise InvalidRequest(name, f"{value} is outside {low}..{high}")


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------

MAGIC = b"SDG"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">3sBBI")  # magic, version, frame type, payload length

REQUEST, STATUS, IMAGE, ERROR = 1, 2, 3, 4
# The model listing: the client sends LIST_MODELS ({"token": optional}), the server answers MODELS
# (the JSON of GET /v1/models) or ERROR. Added later; clients that never send it are unaffected.
LIST_MODELS, MODELS = 5, 6
# Progress (added later; old clients never see them): the server sends PREVIEW ({"step", "steps",
# "png_b64"}) only when the REQUEST asked for "previews": k; the client may send CANCEL ({}) while
# its request waits, and gets ERROR `cancelled`.
PREVIEW, CANCEL = 7, 8
FRAME_NAMES = {REQUEST: "REQUEST", STATUS: "STATUS", IMAGE: "IMAGE", ERROR: "ERROR", LIST_MODELS: "LIST_MODELS",
               MODELS: "MODELS", PREVIEW: "PREVIEW", CANCEL: "CANCEL"}
# Checked against the header before a single payload byte is read or allocated.
MAX_TEXT_REQUEST = 16 * 1024  # a request without images
MAX_PAYLOAD = {REQUEST: MAX_TEXT_REQUEST + 2 * (MAX_IMAGE_BYTES * 4 // 3 + 4), STATUS: 4 * 1024, IMAGE: 32 * 1024 * 1024, ERROR: 16 * 1024,
               LIST_MODELS: 1024, MODELS: 256 * 1024, PREVIEW: 96 * 1024, CANCEL: 256}
MAX_PREVIEWS = 150  # "previews": k asks a preview every k denoising steps
IMAGE_META_LEN = struct.Struct(">I")

# STATUS states the server may send before the final IMAGE or ERROR frame.
STATUS_QUEUED = "queued"  # a new generation was submitted to the workers
STATUS_JOINED = "joined"  # an identical request is already being generated; waiting for it
STATUS_GENERATING = "generating"  # a worker picked the task up
STATUS_CACHED = "cached"  # answered from the cache

# Stable error codes carried by ERROR frames (and by the HTTP API's error body).
E_INVALID_REQUEST = "invalid_request"
E_BAD_FRAME = "bad_frame"
E_FRAME_TOO_LARGE = "frame_too_large"
E_UNSUPPORTED_VERSION = "unsupported_version"
E_BUSY = "busy"
E_TIMEOUT = "timeout"
E_UNAUTHORIZED = "unauthorized"
E_RATE_LIMITED = "rate_limited"
E_UNAVAILABLE = "unavailable"
E_INTERNAL = "internal"
E_CANCELLED = "cancelled"  # the request (or the last client waiting for its image) cancelled it
ERROR_CODES = (
    E_INVALID_REQUEST, E_BAD_FRAME, E_FRAME_TOO_LARGE, E_UNSUPPORTED_VERSION, E_BUSY,
    E_TIMEOUT, E_UNAUTHORIZED, E_RATE_LIMITED, E_UNAVAILABLE, E_INTERNAL, E_CANCELLED,
)
# Codes after which the same request may succeed if simply sent again later.
RETRYABLE_CODES = (E_BUSY, E_TIMEOUT, E_RATE_LIMITED, E_UNAVAILABLE)


class ProtocolError(Exception):
    """A peer broke the framing, or the server answered with an ERROR frame; `code` is stable."""

    def __init__(self, code: str, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def to_payload(self) -> Dict[str, Any]:
        payload = {"code": self.code, "message": self.message}
        if self.field:
            payload["field"] = self.field
        return payload


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly between frames."""


@dataclass
class Frame:
    """One decoded frame."""

    kind: int
    payload: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # 16 KiB of `[` nests too deep
            raise ProtocolError(E_BAD_FRAME, f"{FRAME_NAMES[self.kind]} payload is not UTF-8 JSON: {exc}")


def encode_frame(kind: int, payload: bytes) -> bytes:
    """Header plus payload; refuses payloads over the cap for their kind."""
    if kind not in MAX_PAYLOAD:
        raise ValueError(f"unknown frame kind {kind}")
    if len(payload) > MAX_PAYLOAD[kind]:
        raise ProtocolError(
            E_FRAME_TOO_LARGE, f"{FRAME_NAMES[kind]} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD[kind]}"
        )
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(payload)) + payload


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_request(request: GenerationRequest, token: Optional[str] = None, previews: int = 0) -> bytes:
    body: Dict[str, Any] = {"request": request.to_dict()}
    if token:
        body["token"] = token
    if previews:
        body["previews"] = int(previews)
    return encode_frame(REQUEST, _json_bytes(body))


def request_previews(frame: Frame) -> int:
    """The REQUEST's optional "previews": k (a PREVIEW frame every k steps; 0 for none)."""
    body = frame.json()
    return check_previews(body.get("previews", 0) if isinstance(body, dict) else 0)


def check_previews(previews: Any) -> int:
    """`previews` if it is a preview interval k in 0..MAX_PREVIEWS (0: none), else `invalid_request`."""
    if not isinstance(previews, int) or isinstance(previews, bool) or not 0 <= previews <= MAX_PREVIEWS:
        raise ProtocolError(E_INVALID_REQUEST, f"previews {previews!r} must be an integer 0..{MAX_PREVIEWS} "
                            "(a preview every k steps; 0 for none)", field="previews")
    return previews


def encode_preview(step: Optional[int], steps: Optional[int], png_b64: str) -> bytes:
    return encode_frame(PREVIEW, _json_bytes({"step": step, "steps": steps, "png_b64": png_b64}))


def encode_cancel() -> bytes:
    return encode_frame(CANCEL, b"{}")


def encode_list_models(token: Optional[str] = None) -> bytes:
    return encode_frame(LIST_MODELS, _json_bytes({"token": token} if token else {}))


def encode_models(listing: Dict[str, Any]) -> bytes:
    return encode_frame(MODELS, _json_bytes(listing))


def encode_status(state: str, **details: Any) -> bytes:
    return encode_frame(STATUS, _json_bytes(dict(details, state=state)))


def encode_error(code: str, message: str, field: Optional[str] = None) -> bytes:
    return encode_frame(ERROR, _json_bytes(ProtocolError(code, message, field).to_payload()))


def encode_image(meta: Dict[str, Any], png: bytes) -> bytes:
    meta_bytes = _json_bytes(meta)
    return encode_frame(IMAGE, IMAGE_META_LEN.pack(len(meta_bytes)) + meta_bytes + png)


def decode_header(header: bytes) -> Tuple[int, int]:
    """Check magic, version, kind and the size cap; return (kind, payload length)."""
    magic, version, kind, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(E_BAD_FRAME, f"bad magic {magic!r}; expected {MAGIC!r} (is this an sdgate server?)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            E_UNSUPPORTED_VERSION, f"protocol version {version} is not supported; this side speaks {PROTOCOL_VERSION}"
        )
    if kind not in MAX_PAYLOAD:
        raise ProtocolError(E_BAD_FRAME, f"unknown frame type {kind}")
    if length > MAX_PAYLOAD[kind]:
        raise ProtocolError(
            E_FRAME_TOO_LARGE, f"{FRAME_NAMES[kind]} frame of {length} bytes exceeds the {MAX_PAYLOAD[kind]}-byte limit"
        )
    return kind, length


def decode_request(frame: Frame) -> Tuple[GenerationRequest, Optional[str]]:
    """REQUEST payload -> (validated request, token). Raises ProtocolError with a stable code."""
    if frame.kind != REQUEST:
        raise ProtocolError(E_BAD_FRAME, f"expected a REQUEST frame, got {FRAME_NAMES[frame.kind]}")
    body = frame.json()
    if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
        raise ProtocolError(E_INVALID_REQUEST, 'body must be {"request": {...}, "token": optional string}')
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(E_INVALID_REQUEST, "token must be a string", field="token")
    try:
        request = GenerationRequest.from_dict(body["request"])
    except InvalidRequest as exc:
        raise ProtocolError(E_INVALID_REQUEST, str(exc), field=exc.field)
    except TypeError as exc:
        raise ProtocolError(E_INVALID_REQUEST, f"request has the wrong shape: {exc}")
    return request, token


def decode_image(frame: Frame) -> Tuple[Dict[str, Any], bytes]:
    """IMAGE payload -> (metadata, PNG bytes)."""
    payload = frame.payload
    if len(payload) < IMAGE_META_LEN.size:
        raise ProtocolError(E_BAD_FRAME, "IMAGE frame too short for its metadata length")
    (meta_len,) = IMAGE_META_LEN.unpack_from(payload)
    end = IMAGE_META_LEN.size + meta_len
    if end > len(payload):
        raise ProtocolError(E_BAD_FRAME, "IMAGE metadata length runs past the frame")
    meta = Frame(IMAGE, payload[IMAGE_META_LEN.size:end]).json()
    return meta, payload[end:]


def decode_error(frame: Frame) -> ProtocolError:
    body = frame.json()
    if not isinstance(body, dict):
        return ProtocolError(E_BAD_FRAME, "ERROR frame body is not an object")
    return ProtocolError(str(body.get("code", E_INTERNAL)), str(body.get("message", "")), body.get("field"))


class FrameDecoder:
    """Frames out of a byte stream, without I/O (sans-IO, as h11 is): feed() what the transport
    read, then take next_frame() until it is None. The blocking client and the asyncio server both
    drive this one decoder, so they share every cap and message.

    A header is checked (decode_header, then `accepted`: the kinds and sizes this side takes, e.g. a
    server takes only REQUEST and LIST_MODELS) as soon as its 9 bytes are in, before any payload is
    buffered. `needed()` says how many more bytes complete the current header or payload, so a
    reader never reads past one frame.
    """

    def __init__(self, accepted: Optional[Dict[int, int]] = None):
        self.accepted = accepted
        self._buffer = bytearray()
        self._header: Optional[Tuple[int, int]] = None  # (kind, length) of the frame being read

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def started(self) -> bool:
        """Some bytes of a frame are in: its deadline runs."""
        return bool(self._buffer) or self._header is not None

    def needed(self) -> int:
        """Bytes still missing from the current header, or else from the current payload (at least 1)."""
        if self._header is None:
            return max(1, HEADER.size - len(self._buffer))
        return max(1, self._header[1] - len(self._buffer))

    def next_frame(self) -> Optional[Frame]:
        """The next whole frame, or None until more bytes come; ProtocolError on bad framing."""
        if self._header is None:
            if len(self._buffer) < HEADER.size:
                return None
            kind, length = decode_header(bytes(self._buffer[:HEADER.size]))
            if self.accepted is not None and length > self.accepted.get(kind, 0):
                raise ProtocolError(E_FRAME_TOO_LARGE,
                                    f"{FRAME_NAMES[kind]} frame of {length} bytes is not accepted here")
            del self._buffer[:HEADER.size]
            self._header = (kind, length)
        kind, length = self._header
        if len(self._buffer) < length:
            return None
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._header = None
        return Frame(kind, payload)


def read_frame(sock: socket.socket, frame_timeout: float, idle_timeout: Optional[float] = None,
               max_payload: Optional[Dict[int, int]] = None) -> Frame:
    """Read one frame from a blocking socket (through FrameDecoder, never past the frame).

    idle_timeout bounds the wait for the first byte (None: same as frame_timeout); once it has
    arrived the whole frame must arrive within frame_timeout, so a peer trickling one byte a
    second is cut off. Raises ConnectionClosed on a clean close before the first byte, socket.timeout
    on either deadline, ProtocolError on bad framing.
    """
    decoder = FrameDecoder(max_payload)
    decoder.feed(_recv_exactly(sock, 1, time.monotonic() + (idle_timeout if idle_timeout is not None
                                                            else frame_timeout), allow_clean_close=True))
    deadline = time.monotonic() + frame_timeout
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        decoder.feed(_recv_exactly(sock, decoder.needed(), deadline))


def _recv_exactly(sock: socket.socket, size: int, deadline: float, allow_clean_close: bool = False) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(f"peer took too long to send {size} bytes")
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if allow_clean_close and not chunks:
                raise ConnectionClosed()
            raise ProtocolError(E_BAD_FRAME, f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


# ---------------------------------------------------------------------------------------------
# Client side of one exchange, shared by the boot client, tests and benchmarks
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageReply:
    """A finished generation as the client sees it."""

    meta: Dict[str, Any]
    png: bytes
    statuses: list = field(default_factory=list)


def exchange(sock: socket.socket, request: GenerationRequest, token: Optional[str] = None,
             timeout: float = 600.0, on_status: Optional[Callable[[Dict[str, Any]], None]] = None,
             poll: float = 1.0, previews: int = 0,
             on_preview: Optional[Callable[[Dict[str, Any]], None]] = None) -> ImageReply:
    """Send one REQUEST and read STATUS (and PREVIEW) frames until the IMAGE; raise ProtocolError on ERROR.

    `on_status` is also called with {"state": "waiting"} every `poll` seconds of silence, so a
    caller can show elapsed time. A KeyboardInterrupt while waiting sends CANCEL first.
    """
    sock.sendall(encode_request(request, token, previews))
    try:
        return _read_reply(sock, timeout, on_status, poll, on_preview)
    except KeyboardInterrupt:
        cancel(sock)
        raise


def cancel(sock: socket.socket, timeout: float = 5.0) -> None:
    """Send CANCEL for the request in flight and read up to its ERROR `cancelled` (or whatever ends it)."""
    try:
        sock.sendall(encode_cancel())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = read_frame(sock, frame_timeout=timeout, idle_timeout=max(0.1, deadline - time.monotonic()))
            if frame.kind in (IMAGE, ERROR):
                return
    except (OSError, ProtocolError, ConnectionClosed):
        return


def _read_reply(sock: socket.socket, timeout: float, on_status, poll: float, on_preview) -> ImageReply:
    deadline = time.monotonic() + timeout
    statuses = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(E_TIMEOUT, f"no answer within {timeout:.0f} s")
        try:
            frame = read_frame(sock, frame_timeout=max(remaining, 1.0), idle_timeout=min(poll, remaining))
        except socket.timeout:
            if on_status:
                on_status({"state": "waiting"})
            continue
        except ConnectionClosed:
            raise ConnectionError("the server closed the connection before answering")
        if frame.kind == STATUS:
            status = frame.json()
            statuses.append(status)
            if on_status:
                on_status(status)
        elif frame.kind == PREVIEW:
            if on_preview:
                on_preview(frame.json())
        elif frame.kind == IMAGE:
            meta, png = decode_image(frame)
            return ImageReply(meta, png, statuses)
        elif frame.kind == ERROR:
            raise decode_error(frame)
        else:
            raise ProtocolError(E_BAD_FRAME, f"unexpected {FRAME_NAMES[frame.kind]} frame from server")


def list_models(sock: socket.socket, token: Optional[str] = None, timeout: float = 30.0) -> Dict[str, Any]:
    """Ask the server which models it offers: {"object": "list", "data": [{"id": ..., ...}]}."""
    sock.sendall(encode_list_models(token))
    try:
        frame = read_frame(sock, frame_timeout=timeout)
    except ConnectionClosed:
        raise ConnectionError("the server closed the connection before answering")
    if frame.kind == ERROR:
        raise decode_error(frame)
    if frame.kind != MODELS:
        raise ProtocolError(E_BAD_FRAME, f"expected MODELS, got {FRAME_NAMES[frame.kind]} from server")
    listing = frame.json()
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise ProtocolError(E_BAD_FRAME, "MODELS payload is not a model list")
    return listing
