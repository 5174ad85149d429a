"""The OpenAI Images API at sdgate's edge: a request body read within bounds and mapped to a
GenerationRequest (errors: serve_app/openai_errors.py). Used by every HTTP route that
takes an Images API body (gateway.py's generations, jobs_api.py's jobs and streaming)."""

from __future__ import annotations

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


def request_from_openai(body: Any) -> GenerationRequest:
    """Map an Images API body (prompt, size "WxH", n=1, response_format b64_json, sdgate extras)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object with at least a prompt")
    fields = dict(body)
    n = fields.pop("n", 1)
    if n != 1:
        raise InvalidRequest("n", f"{n!r}: sdgate renders one image per request; send n=1")
    response_format = fields.pop("response_format", "b64_json")
    if response_format != "b64_json":
        raise InvalidRequest("response_format", f"{response_format!r}: only b64_json is supported")
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


def bearer(request: Request) -> Optional[str]:
    """The token of an `Authorization: Bearer` header, or None."""
    header = request.headers.get("authorization", "")
    return header[7:] if header.lower().startswith("bearer ") else None


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
    tenant = admission.authenticate(bearer(request))
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
