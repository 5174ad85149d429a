"""The threaded front server for the boot client's framed TCP protocol.

One selector thread owns every idle connection and the listening socket; a connection with
bytes waiting is handed to the handler pool for exactly one request, then comes back. So a
thousand idle clients cost a thousand sockets, not a thousand threads. Several replicas on
one node share the port with SO_REUSEPORT and the kernel spreads connections among them.
"""

from __future__ import annotations

import hmac
import logging
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

from client import protocol
from client.protocol import ConnectionClosed, ProtocolError
from serve_app.config import GatewayConfig
from serve_app.front import FrontService

log = logging.getLogger(__name__)
# Clients send requests and model listings only.
ACCEPTED_PAYLOADS = {kind: protocol.MAX_PAYLOAD[kind] for kind in (protocol.REQUEST, protocol.LIST_MODELS)}
SEND_TIMEOUT_S = 30.0


class RateLimiter:
    """Token bucket per client address; `allow` is False once the bucket is empty."""

    def __init__(self, per_s: float, burst: int):
        self.per_s, self.burst = per_s, burst
        self._buckets: Dict[str, list] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        if self.per_s <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.per_s)
            if len(self._buckets) > 100_000:  # bounded memory under address churn
                self._buckets.clear()
            allowed = tokens >= 1
            self._buckets[client] = [tokens - 1 if allowed else tokens, now]
            return allowed


def check_token(expected: Optional[str], given: Optional[str]) -> None:
    """Constant-time shared-token check; raises `unauthorized`."""
    if expected and not hmac.compare_digest((given or "").encode(), expected.encode()):
        raise ProtocolError(protocol.E_UNAUTHORIZED, "missing or wrong token; pass --token or set SDGATE_TOKEN")


class SocketFrontServer:
    """Accepts boot-client connections and answers their requests through a FrontService."""

    def __init__(self, front: FrontService, config: GatewayConfig):
        self.front = front
        self.config = config
        self.rate_limiter = RateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        self._listener = self._bind(config.host, config.socket_port)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(config.handler_threads, thread_name_prefix="sdgate-conn")
        self._returned: "queue.SimpleQueue[socket.socket]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._idle_since: Dict[socket.socket, float] = {}
        self._open = 0
        self._active = 0
        self._count_lock = threading.Lock()
        # Integral of requests-in-flight over time, for a time-averaged load between reports.
        self._load_integral, self._load_since = 0.0, time.monotonic()
        self._last_report = (self._load_since, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdgate-socket", daemon=True)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(1024)
        listener.setblocking(False)
        return listener

    @property
    def active_requests(self) -> int:
        """Requests being answered right now (the load autoscaling sees)."""
        return self._active

    @property
    def open_connections(self) -> int:
        return self._open

    def average_load(self) -> float:
        """Mean requests in flight since the previous call (what autoscaling should see)."""
        with self._count_lock:
            self._account_load()
            since, integral = self._last_report
            elapsed = self._load_since - since
            self._last_report = (self._load_since, self._load_integral)
            return (self._load_integral - integral) / elapsed if elapsed > 0 else float(self._active)

    def _account_load(self) -> None:
        now = time.monotonic()
        self._load_integral += self._active * (now - self._load_since)
        self._load_since = now

    def start(self) -> "SocketFrontServer":
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- selector thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._wake_r.recv(4096)
                else:
                    conn = key.fileobj
                    self._unwatch(conn)
                    self._pool.submit(self._serve_one, conn)
            while True:
                try:
                    conn = self._returned.get_nowait()
                except queue.Empty:
                    break
                self._watch(conn)
            if time.monotonic() - last_sweep >= 1.0:
                last_sweep = time.monotonic()
                self._close_idle()
        for conn in list(self._idle_since):
            self._close(conn)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._open >= self.config.max_connections:
                self._reject(conn, protocol.E_BUSY, f"too many connections (limit {self.config.max_connections})")
                continue
            with self._count_lock:
                self._open += 1
            self._watch(conn)

    def _close_idle(self) -> None:
        cutoff = time.monotonic() - self.config.idle_timeout_s
        for conn, since in list(self._idle_since.items()):
            if since < cutoff:
                self._unwatch(conn)
                self._close(conn)

    def _watch(self, conn: socket.socket) -> None:
        """Wait for `conn`'s next request in the selector, idle from now on."""
        self._idle_since[conn] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _unwatch(self, conn: socket.socket) -> None:
        """Stop waiting for `conn`, in the selector and in the idle table alike: a socket left in
        either after it is closed (fd -1) would make the next select or sweep raise and end the
        selector thread, and with it every socket client of the replica."""
        self._selector.unregister(conn)
        self._idle_since.pop(conn, None)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- handler threads -------------------------------------------------------------------------

    def _serve_one(self, conn: socket.socket) -> None:
        """Read and answer one request, then give the connection back to the selector."""
        keep = False
        with self._count_lock:
            self._account_load()
            self._active += 1
        try:
            keep = self._answer(conn)
        except Exception:  # noqa: BLE001 - one broken connection must not take the server down
            log.exception("unexpected error on a client connection")
        finally:
            with self._count_lock:
                self._account_load()
                self._active -= 1
        if keep and not self._stop.is_set():
            self._returned.put(conn)
            self._wake()
        else:
            self._close(conn)

    def _answer(self, conn: socket.socket) -> bool:
        """Returns True when the connection may carry another request."""
        try:
            frame = protocol.read_frame(conn, self.config.frame_timeout_s, idle_timeout=self.config.frame_timeout_s,
                                        max_payload=ACCEPTED_PAYLOADS)
        except ConnectionClosed:
            return False
        except (socket.timeout, TimeoutError):
            self._send_quietly(conn, protocol.encode_error(
                protocol.E_TIMEOUT, f"a frame must arrive within {self.config.frame_timeout_s:.0f} s"))
            return False
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            self._send_quietly(conn, protocol.encode_error(exc.code, exc.message, exc.field))
            return False  # the byte stream can no longer be trusted
        except OSError:
            return False
        conn.settimeout(SEND_TIMEOUT_S)
        if frame.kind == protocol.LIST_MODELS:
            return self._list_models(conn, frame)
        try:
            if self.config.auth_token:  # before validation, so strangers learn nothing about the fields
                body = frame.json()
                check_token(self.config.auth_token, body.get("token") if isinstance(body, dict) else None)
            request, _ = protocol.decode_request(frame)
            if not self.rate_limiter.allow(_peer(conn)):
                raise ProtocolError(protocol.E_RATE_LIMITED, "too many requests from this address; slow down")
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            return self._send_quietly(conn, protocol.encode_error(exc.code, exc.message, exc.field))
        try:
            answer = self.front.generate(request, on_status=lambda state: conn.sendall(protocol.encode_status(state)))
            conn.sendall(protocol.encode_image(answer.meta, answer.png))
            return True
        except ProtocolError as exc:  # counted by FrontService
            return self._send_quietly(conn, protocol.encode_error(exc.code, exc.message, exc.field))
        except OSError:
            return False  # the client went away; a generation it started still completes and is cached

    def _list_models(self, conn: socket.socket, frame: protocol.Frame) -> bool:
        """Answer LIST_MODELS with the catalogue listing (what GET /v1/models answers)."""
        try:
            body = frame.json()
            check_token(self.config.auth_token, body.get("token") if isinstance(body, dict) else None)
            listing = protocol.encode_models(self.front.catalogue.listing())
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            return self._send_quietly(conn, protocol.encode_error(exc.code, exc.message, exc.field))
        return self._send_quietly(conn, listing)

    def _send_quietly(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            conn.sendall(data)
            return True
        except OSError:
            return False

    def _reject(self, conn: socket.socket, code: str, message: str) -> None:
        conn.settimeout(1.0)
        self._send_quietly(conn, protocol.encode_error(code, message))
        conn.close()

    def _close(self, conn: socket.socket) -> None:
        with self._count_lock:
            self._open -= 1
        try:
            conn.close()
        except OSError:
            pass


def _peer(conn: socket.socket) -> str:
    try:
        return conn.getpeername()[0]
    except OSError:
        return "?"
