"""sdgate's errors in OpenAI's error shape, for every HTTP route: one body, one status table."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from starlette.responses import JSONResponse

from client import protocol
from client.protocol import ProtocolError

E_NOT_FOUND = "not_found"  # HTTP only: no such job, image or file (the socket protocol has no such answer)
HTTP_STATUS = {
    protocol.E_INVALID_REQUEST: 400, protocol.E_BAD_FRAME: 400, protocol.E_FRAME_TOO_LARGE: 413,
    protocol.E_UNAUTHORIZED: 401, protocol.E_RATE_LIMITED: 429, protocol.E_BUSY: 503,
    protocol.E_UNAVAILABLE: 503, protocol.E_TIMEOUT: 504, protocol.E_INTERNAL: 500, E_NOT_FOUND: 404,
}


def error_body(code: str, message: str, param: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error object, carrying sdgate's stable code as both `type` and `code`."""
    return {"error": {"message": message, "type": code, "code": code, "param": param}}


def error_response(code: str, message: str, param: Optional[str] = None,
                   headers: Optional[Mapping[str, str]] = None, status: Optional[int] = None) -> JSONResponse:
    """The error answer with the HTTP status for `code` (or `status`); retryable codes say when to retry."""
    if code in protocol.RETRYABLE_CODES:
        headers = dict(headers or {}, **{"Retry-After": "5"})
    return JSONResponse(error_body(code, message, param), status_code=status or HTTP_STATUS.get(code, 500),
                        headers=headers)


def http_error(exc: ProtocolError) -> JSONResponse:
    retry_after = getattr(exc, "retry_after_s", None)  # serve_app.tenants.OverLimit: a tenant's limit
    if retry_after is not None:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=429,
                            headers={"Retry-After": str(retry_after)})
    return error_response(exc.code, exc.message, exc.field)
