"""Server-Sent Events for the jobs API and OpenAI's image streaming, framed by sse-starlette:
`event: <kind>` and one line of compact JSON, and a comment every PING_S so proxies keep the stream."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Dict

from sse_starlette import EventSourceResponse, ServerSentEvent

PING_S = 15


def event(kind: str, data: Dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, separators=(",", ":")), event=kind, sep="\n")


def response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """The stream as a response; when the client leaves, the generator is closed (its `finally` runs)."""
    return EventSourceResponse(events, sep="\n", ping=PING_S, headers={"Cache-Control": "no-cache"})
