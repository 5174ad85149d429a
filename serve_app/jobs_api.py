"""HTTP for jobs (/v1/jobs*) and OpenAI image streaming, shared by the Serve ingress and the fast port.

The handlers take the gateway replica (its admission, front and JobService) and a Starlette
request, so gateway.py's route methods and serve_app/http_front.py serve the same answers.
Contract: JOBS_CONTRACT in the README (`Job` objects, SSE events progress/preview/done/error).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, AsyncIterator, Dict

from starlette.requests import Request
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from serve_app import sse
from serve_app.images_api import client_of, public_meta, read_generation
from serve_app.openai_errors import E_NOT_FOUND, error_body, error_response, http_error
from serve_app.jobs import job_body
from serve_app.tenants import ANONYMOUS, Tenant

MAX_PARTIAL_IMAGES = 3


def _error(gateway: Any, exc: ProtocolError) -> JSONResponse:
    gateway.front.counters.error(exc.code)
    return http_error(exc)


def _not_found(job_id: str) -> JSONResponse:
    return error_response(E_NOT_FOUND, f"no job {job_id[:80]!r}: unknown, or expired (jobs are kept for an hour); "
                          "submit it again with POST /v1/jobs", "id")


async def create_job(gateway: Any, request: Request) -> Response:
    """POST /v1/jobs: 202 Job (queued/generating), or 200 Job (done) on a cache hit."""
    try:
        client = client_of(gateway.admission, request)
        generation, extras, tenant = await read_generation(gateway.admission, request, client, ("previews",))
        record = await gateway.jobs.submit(generation, extras.get("previews", 0) or 0, client=client, tenant=tenant)
    except ProtocolError as exc:
        return _error(gateway, exc)
    return JSONResponse(job_body(record), status_code=200 if record["state"] == "done" else 202)


async def _job_or_refusal(gateway: Any, request: Request):
    """The job, if the caller's tenant owns it; another tenant's job is not found (404, so ids are
    not confirmed)."""
    tenant, refused = gateway.authenticate(request)
    if refused is not None:
        return None, refused
    job_id = request.path_params.get("job_id", "")
    record = await gateway.jobs.read(job_id)
    if record is None or record.get("tenant", ANONYMOUS.name) != tenant.name:
        return None, _not_found(job_id)
    return record, None


async def get_job(gateway: Any, request: Request) -> Response:
    """GET /v1/jobs/{id}."""
    record, refusal = await _job_or_refusal(gateway, request)
    return refusal or JSONResponse(job_body(record))


async def job_events(gateway: Any, request: Request) -> Response:
    """GET /v1/jobs/{id}/events: Server-Sent Events until done or error."""
    record, refusal = await _job_or_refusal(gateway, request)
    if refusal:
        return refusal
    return sse.response(gateway.jobs.events(record["id"], record))


async def job_image(gateway: Any, request: Request) -> Response:
    """GET /v1/jobs/{id}/image: the PNG once done, else 404."""
    record, refusal = await _job_or_refusal(gateway, request)
    if refusal:
        return refusal
    cached = None
    if record.get("state") == "done":
        cached = await asyncio.get_running_loop().run_in_executor(None, gateway.front.cached, record["key"])
    if cached is None:
        return error_response(E_NOT_FOUND, f"job {record['id']} is {record.get('state')}: no image yet; follow "
                              "/events or poll the job", "id")
    return Response(cached.png, media_type="image/png", headers={"ETag": f'"{record["key"]}"'})


async def delete_job(gateway: Any, request: Request) -> Response:
    """DELETE /v1/jobs/{id}: cancels that job only."""
    record, refusal = await _job_or_refusal(gateway, request)
    if refusal:
        return refusal
    record = await gateway.jobs.cancel(record["id"])
    return JSONResponse(job_body(record))


# -- OpenAI image streaming ------------------------------------------------------------------------

async def stream_generation(gateway: Any, generation: GenerationRequest, partial_images: Any, client: str,
                            tenant: Tenant = ANONYMOUS) -> Response:
    """`stream: true`: SSE with image_generation.partial_image (up to `partial_images`) and
    image_generation.completed, as OpenAI's Images API sends them."""
    if not isinstance(partial_images, int) or isinstance(partial_images, bool) or \
            not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        return _error(gateway, ProtocolError(protocol.E_INVALID_REQUEST, f"partial_images {partial_images!r} must be "
                                             f"an integer 0..{MAX_PARTIAL_IMAGES}", field="partial_images"))
    steps = generation.steps or 0
    try:
        steps = steps or gateway.front.catalogue.resolve(generation).steps or 0
    except InvalidRequest as exc:
        return _error(gateway, ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field))
    # A preview every k steps gives `partial_images` of them before the last step.
    every = max(1, steps // (partial_images + 1)) if partial_images else 0
    size = f"{generation.width}x{generation.height}" if generation.width and generation.height else "auto"
    return sse.response(_stream(gateway, generation, partial_images, every, size, client, tenant))


async def _stream(gateway: Any, generation: GenerationRequest, partial_images: int, every: int, size: str,
                  client: str, tenant: Tenant) -> AsyncIterator[ServerSentEvent]:
    queue: "asyncio.Queue[Dict[str, Any]]" = asyncio.Queue()
    common = {"size": size, "quality": "auto", "background": "opaque", "output_format": "png"}

    def on_event(event: Dict[str, Any]) -> None:
        if event.get("preview"):
            queue.put_nowait(event)

    task = asyncio.ensure_future(gateway.front.generate_async(generation, client=client, on_event=on_event,
                                                              previews=every, tenant=tenant))
    sent = 0
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                event = getter.result()
                if sent < partial_images:
                    yield _event("image_generation.partial_image", dict(
                        common, b64_json=event["preview"], created_at=int(time.time()), partial_image_index=sent))
                    sent += 1
                continue
            getter.cancel()
            break
        try:
            answer = task.result()
        except ProtocolError as exc:
            yield sse.event("error", error_body(exc.code, exc.message, exc.field))
            return
        yield _event("image_generation.completed", dict(
            common, b64_json=base64.b64encode(answer.png).decode("ascii"), created_at=int(time.time()),
            usage={"total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
                   "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}},
            sdgate=dict(public_meta(answer.meta), cached=answer.cached)))
    finally:
        if not task.done():
            task.cancel()  # the client left: this waiter leaves; the render goes on and is cached


def _event(kind: str, data: Dict[str, Any]) -> ServerSentEvent:
    """One of OpenAI's image streaming events: its kind is also its `type` field."""
    return sse.event(kind, dict(data, type=kind))
