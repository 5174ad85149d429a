"""The fast HTTP path: an HTTP listener owned by each gateway replica, on a port its node shares.

Serve's proxy adds a process hop, a Ray call and its own ASGI stack to every request (about
6 ms of a 6.7 ms hit). Like the socket front, each replica here binds `fast_http_port` with
SO_REUSEPORT, so the kernel spreads connections among the replicas of a node, and serves it with
uvicorn (uvloop, httptools) on its own event loop thread. The routes delegate to the replica's
own Serve route methods, so both ports give the same answers, auth and limits included. With
`tls_certfile`/`tls_keyfile` set, the port speaks only TLS.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from typing import Any, Awaitable, Callable, List, Sequence, Tuple

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.admission import insecure_auth_warning, tls_files
from serve_app.config import GatewayConfig
from serve_app.load_meter import LoadMeter

log = logging.getLogger(__name__)
GENERATIONS_PATH = "/v1/images/generations"
START_TIMEOUT_S = 30.0


def bind_shared(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket that the other replicas of this node may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    listener.setblocking(False)
    return listener


Routes = Sequence[Tuple[str, Callable[[Request], Any], List[str]]]


class HttpFrontServer:
    """uvicorn on a thread of the replica, serving `routes` on a shared port."""

    def __init__(self, config: GatewayConfig, routes: Routes):
        """`routes`: (path, the gateway's route method, methods), as serve_app.gateway.ROUTES lists them;
        a method returns a Response, or a plain object answered as JSON."""
        self.config = config
        self._listener = bind_shared(config.host, config.fast_http_port)
        self.port = self._listener.getsockname()[1]
        certfile, keyfile = tls_files(config)
        self.tls = certfile is not None
        self.app = Starlette(routes=[Route(path, self._counted(route), methods=methods)
                                     for path, route, methods in routes])
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, loop="none", http="auto", lifespan="off", access_log=False, log_level="warning",
            ssl_certfile=certfile, ssl_keyfile=keyfile, timeout_keep_alive=int(config.idle_timeout_s),
            limit_concurrency=config.max_connections, server_header=False,
            # uvicorn would believe X-Forwarded-For from 127.0.0.1 whatever trusted_proxies says; the
            # peer stays the TCP peer, and images_api.client_of applies the one rule.
            proxy_headers=False))
        self._thread = threading.Thread(target=self._run, name="sdgate-http-front", daemon=True)
        self.load = LoadMeter()

    # -- routes ------------------------------------------------------------------------------------

    def _counted(self, route: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        blocking = not inspect.iscoroutinefunction(route)  # a plain def runs on a thread, as FastAPI runs it

        async def serve(request: Request) -> Response:
            with self.load.counting():
                answer = await asyncio.to_thread(route, request) if blocking else await route(request)
            return answer if isinstance(answer, Response) else JSONResponse(answer)  # as FastAPI answers a dict

        return serve

    # -- load, for autoscaling -----------------------------------------------------------------------

    def average_load(self) -> float:
        """Mean requests in flight on this port since the previous call (what autoscaling adds)."""
        return self.load.average()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "HttpFrontServer":
        """Serve on a thread; returns once uvicorn listens (or raises what stopped it)."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fast HTTP listener on port {self.port} did not start within "
                                   f"{START_TIMEOUT_S:.0f} s; see the replica's log")
            time.sleep(0.01)
        log.info("fast HTTP%s on %s:%s", "S" if self.tls else "", self.config.host, self.port)
        warning = insecure_auth_warning(self.config)
        if warning:
            log.warning("fast HTTP port %s: %s", self.port, warning)
        return self

    def _run(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # uvloop is optional: the stdlib loop works, a little slower
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._listener]))
        except Exception:  # noqa: BLE001 - the replica's health check reports the dead thread
            log.exception("the fast HTTP listener stopped")
        finally:
            loop.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._listener.close()
