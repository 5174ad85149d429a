"""Both HTTP ports of a gateway replica serve the one route table (serve_app.gateway.ROUTES): Serve's
proxy through FastAPI, the fast port through the replica's own listener. A hand-kept copy once
left /v1/stats off the fast port."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from serve_app.gateway import ROUTES, Gateway, api
from tests.services import free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__.* never awaited")]


def _table(routes, prefix: str = "") -> set:
    """(path, method) of every route, through routers FastAPI nests (Serve's ingress includes one)."""
    table = set()
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            table |= _table(nested.routes, prefix + route.include_context.prefix)
        else:
            table |= {(prefix + route.path, method) for method in route.methods if method != "HEAD"}
    return table


def test_both_ports_list_the_same_routes(redis_server, tmp_path):
    replica_class = Gateway.func_or_class  # what Serve constructs: its __init__ is a coroutine
    replica = replica_class.__new__(replica_class)
    asyncio.run(replica_class.__init__(replica, gateway={"socket_port": free_port(), "fast_http_port": free_port(),
                                                         "cache_path": str(tmp_path / "images.db")},
                                       celery={"redis_url": redis_server.url}))
    try:
        proxy, fast = _table(api.routes), _table(replica.http_front.app.routes)
        assert proxy == fast == {(path, method) for path, _, methods in ROUTES for method in methods}
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.http_front.port}/v1/stats", timeout=10) as answer:
            assert answer.status == 200 and "errors_by_code" in json.loads(answer.read())
    finally:
        replica.http_front.stop()
        replica.socket_server.stop()
        replica.jobs.close()
        replica.front.close()
        replica.front.counters.close()
