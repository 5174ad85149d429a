"""The OpenAI Images API at sdgate's edge: a request body read within bounds and mapped to a
GenerationRequest (errors: serve_app/openai_errors.py). Used by every HTTP route that
takes an Images API body (gateway.py's generations, jobs_api.py's jobs and streaming)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, Optional, Tuple

from starlette.requests import Request

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from serve_app.admission import Admission, check_json_depth
from serve_app.tenants import Tenant

PRIVATE_META = ("worker",)  # host names stay inside the cluster


def public_meta(meta: Dict[str, Any]) -> Dict[str, Any]:
    """An image's metadata as clients may see it (no worker host names)."""
    return {k: v for k, v in meta.items() if k not in PRIVATE_META}


MAX_N = 10  # images per Images API call, as OpenAI allows
RESPONSE_FORMATS = ("b64_json", "url")
# Edits form fields OpenAI defines that change nothing here (sdgate answers PNG, opaque, one quality).
IGNORED_EDIT_FIELDS = ("user", "quality", "background", "input_fidelity", "output_format", "output_compression")
EDIT_NUMBERS = {"steps": int, "seed": int, "guidance_scale": float, "strength": float}


def images_options(extras: Dict[str, Any]) -> Tuple[int, str]:
    """(n, response_format) of an Images API call; `invalid_request` naming the field."""
    n, response_format = extras.get("n", 1), extras.get("response_format", "b64_json")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ProtocolError(protocol.E_INVALID_REQUEST, f"n {n!r} must be an integer 1..{MAX_N}", field="n")
    if response_format not in RESPONSE_FORMATS:
        raise ProtocolError(protocol.E_INVALID_REQUEST, f"response_format {response_format!r} must be one of "
                            f"{', '.join(RESPONSE_FORMATS)}", field="response_format")
    return n, response_format


def request_from_openai(body: Any) -> GenerationRequest:
    """Map an Images API body (prompt, size "WxH", n=1, response_format b64_json, sdgate extras)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object with at least a prompt")
    fields = dict(body)
    n = fields.pop("n", 1)
    if n != 1:
        raise InvalidRequest("n", f"{n!r}: a job or a stream is one image; send n=1, or POST "
                             "/v1/images/generations for up to 10")
    response_format = fields.pop("response_format", "b64_json")
    if response_format != "b64_json":
        raise InvalidRequest("response_format", f"{response_format!r}: only b64_json is supported here")
    fields.pop("user", None)
    size = fields.pop("size", None)
    if size is not None:
        try:
            width, height = (int(part) for part in str(size).lower().split("x"))
        except ValueError:
            raise InvalidRequest("size", f"{size!r} must look like 512x512") from None
        fields.setdefault("width", width)
        fields.setdefault("height", height)
    return GenerationRequest.from_dict(fields)


def credential(request: Request) -> Optional[str]:
    """The key a request carries: an `Authorization: Bearer` token, or the password of HTTP basic auth
    (as A1111 clients send it; the user name is not read); None for none or an empty one."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ProtocolError(protocol.E_UNAUTHORIZED, "the basic auth header is not base64 of user:key") from None
        return decoded.partition(":")[2] or None
    return None


def client_of(admission: Admission, request: Request) -> str:
    """The address this request's per-address limits key on: its TCP peer, or behind a trusted
    proxy the client X-Forwarded-For names (Admission.client_address)."""
    peer = request.client.host if request.client else "?"
    # Several X-Forwarded-For lines are one list (RFC 9110, 5.3): a proxy that adds its own line
    # after the client's would otherwise leave us the client's forgery.
    forwarded = request.headers.getlist("x-forwarded-for")
    return admission.client_address(peer, ",".join(forwarded) if forwarded else None)


async def bounded_body(request: Request) -> bytes:
    """The request body, refused (frame_too_large) as soon as it passes the size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        Admission.check_size(int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        Admission.check_size(len(body))
    return bytes(body)


async def read_generation(admission: Admission, request: Request, client: str, extras: Tuple[str, ...] = ()
                          ) -> Tuple[GenerationRequest, Dict[str, Any], Tenant]:
    """Key, rate (of `client`, from client_of, or of the tenant), bounded body, then the Images API
    body as a request plus those of the `extras` fields it has (taken out before the request is
    checked, as they are not part of it), and the tenant asking."""
    tenant = admission.authenticate(credential(request))
    admission.check_rate(client, tenant)
    body = await bounded_body(request)
    try:
        check_json_depth(body)
        fields = json.loads(body)
        taken = {name: fields.pop(name) for name in extras if isinstance(fields, dict) and name in fields}
        return request_from_openai(fields), taken, tenant
    except RecursionError:
        raise ProtocolError(protocol.E_INVALID_REQUEST, "body nests too deep; send a flat JSON object") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InvalidRequest):
            raise ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field) from None
        raise ProtocolError(protocol.E_INVALID_REQUEST, f"body is not valid JSON: {exc}") from None
    except TypeError as exc:
        raise ProtocolError(protocol.E_INVALID_REQUEST, f"wrong shape: {exc}") from None


async def read_edit(admission: Admission, request: Request, client: str
                    ) -> Tuple[GenerationRequest, int, str, Tenant]:
    """`POST /v1/images/edits` (multipart, as OpenAI's SDK sends it): the request (image, optional
    mask, prompt, size, sdgate's extras), n, response_format and the tenant asking."""
    tenant = admission.authenticate(credential(request))
    admission.check_rate(client, tenant)
    body = await bounded_body(request)

    async def replay() -> Dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32,
                                                          max_part_size=protocol.MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - python-multipart's and starlette's parse errors alike
        raise ProtocolError(protocol.E_INVALID_REQUEST, f"body is not a multipart form OpenAI's edits take: "
                            f"{getattr(exc, 'detail', None) or exc}") from None
    try:
        fields: Dict[str, Any] = {}
        images = form.getlist("image") + form.getlist("image[]")
        if len(images) != 1 or isinstance(images[0], str):
            raise InvalidRequest("image", f"send exactly one image file (got {len(images)}); sdgate edits one "
                                 "init image per call")
        fields["init_image"] = await images[0].read()
        mask = form.get("mask")
        if mask is not None:
            if isinstance(mask, str):
                raise InvalidRequest("mask", "must be an image file")
            fields["mask"] = openai_mask(await mask.read())
        options: Dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in ("image", "image[]", "mask") or name in IGNORED_EDIT_FIELDS:
                continue
            if not isinstance(value, str):
                raise InvalidRequest(name, "must be a text field, not a file")
            if name == "n":
                options["n"] = int(value) if value.strip().lstrip("-").isdigit() else value
            elif name == "response_format":
                options["response_format"] = value
            elif name in EDIT_NUMBERS:
                try:
                    fields[name] = EDIT_NUMBERS[name](value)
                except ValueError:
                    raise InvalidRequest(name, f"{value[:40]!r} is not a number") from None
            elif name in ("stream", "partial_images"):
                raise InvalidRequest(name, "edits are not streamed here; leave it out (generations stream)")
            else:
                fields[name] = value
        n, response_format = images_options(options)
        return request_from_openai(fields), n, response_format, tenant
    except InvalidRequest as exc:
        raise ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field) from None
    finally:
        await form.close()


def openai_mask(data: bytes) -> bytes:
    """OpenAI's mask (repaint where it is fully transparent) as sdgate's (white repaints, black keeps).
    A mask without transparency is taken as it is."""
    import io

    from PIL import Image

    from serve_app.init_images import image_size

    image_size("mask", data)  # a whole image within the caps before it is decoded here
    with Image.open(io.BytesIO(data)) as image:
        if "A" not in image.getbands() and "transparency" not in image.info:
            return data
        alpha = image.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    out = io.BytesIO()
    repaint.save(out, format="PNG")
    return out.getvalue()
