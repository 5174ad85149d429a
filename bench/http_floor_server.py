"""The floor for an HTTP cache hit: a bare uvicorn + Starlette app over sdgate's image cache.

Per request it reads the JSON body, builds the GenerationRequest, computes the cache key, reads
the entry from the same SQLiteImageStore the gateway uses and answers in the same OpenAI Images
shape (data[0].b64_json). One process, uvloop and httptools, no auth, no counters, no
single-flight: what sdgate's HTTP hit costs above this is its features and its plumbing.

    python -m bench.http_floor_server --db $SDGATE_HOME/cache/images.db --port 0
"""

from __future__ import annotations

import base64
import json
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from client.protocol import GenerationRequest
from celery_bridge.models import load_catalogue
from bench._common import floor_server_args
from serve_app.http_front import bind_shared
from serve_app.store import SQLiteImageStore

PATH = "/v1/images/generations"


def build_app(store: SQLiteImageStore) -> Starlette:
    """The one route: a hit answers 200 with the stored PNG, anything else 404 (the floor only serves hits)."""
    catalogue = load_catalogue()  # keys requests as the gateway does

    async def generations(request: Request) -> JSONResponse:
        try:
            generation = catalogue.fill(GenerationRequest.from_dict(json.loads(await request.body())))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": {"message": f"bad request: {exc}"}}, status_code=400)
        cached = store.get(generation.cache_key())
        if cached is None:
            return JSONResponse({"error": {"message": "not cached: the floor only serves hits"}}, status_code=404)
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(cached.png).decode("ascii"),
                      "revised_prompt": generation.normalized().prompt}],
            "sdgate": dict(cached.meta, cached=True),
        })

    return Starlette(routes=[Route(PATH, generations, methods=["POST"])])


def main(argv=None) -> None:
    port, store = floor_server_args(__doc__.splitlines()[0], argv)
    sock = bind_shared("127.0.0.1", port)  # bound as the gateway's fast port is
    print(f"http floor server listening on {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(build_app(store), loop="uvloop", http="httptools", lifespan="off", access_log=False,
                            log_level="warning")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
