"""The floor for a cache hit: the least a server can do to answer one from sdgate's image cache.

A stdlib thread-per-connection server that, per request, reads the REQUEST frame, decodes it,
computes the cache key, reads the entry from the same SQLiteImageStore the gateway uses and
sends it in an IMAGE frame. No admission, no counters, no single-flight, no STATUS frame: what
sdgate's hit path costs above this is the price of its features and its plumbing.

    python -m bench.floor_server --db $SDGATE_HOME/cache/images.db --port 0
"""

from __future__ import annotations

import socket
import socketserver
import sys

from client import protocol
from client.protocol import ConnectionClosed, ProtocolError
from bench._common import floor_server_args
from serve_app.store import SQLiteImageStore

ACCEPTED = {protocol.REQUEST: protocol.MAX_PAYLOAD[protocol.REQUEST]}


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        store: SQLiteImageStore = self.server.store  # type: ignore[attr-defined]
        while True:
            try:
                frame = protocol.read_frame(conn, 10.0, idle_timeout=300.0, max_payload=ACCEPTED)
                request, _ = protocol.decode_request(frame)
                cached = store.get(self.server.catalogue.fill(request).cache_key())  # type: ignore[attr-defined]
                if cached is None:
                    conn.sendall(protocol.encode_error(protocol.E_INTERNAL, "not cached: the floor only serves hits"))
                    continue
                conn.sendall(protocol.encode_image(cached.meta, cached.png))
            except (ConnectionClosed, ProtocolError, OSError):
                return


class FloorServer(socketserver.ThreadingTCPServer):
    """Thread per connection, blocking I/O, one SQLite connection per thread (the store's own)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, port: int, store: SQLiteImageStore):
        from celery_bridge.models import load_catalogue

        super().__init__(("127.0.0.1", port), _Handler)
        self.store = store
        self.catalogue = load_catalogue()  # keys requests as the gateway does


def main(argv=None) -> None:
    port, store = floor_server_args(__doc__.splitlines()[0], argv)
    server = FloorServer(port, store)
    print(f"floor server listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
