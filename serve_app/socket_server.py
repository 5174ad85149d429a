"""The asyncio front server for the boot client's framed TCP protocol (optionally over TLS).

One event-loop thread per replica owns every connection: reading frames, the token check,
statuses and image sends are coroutines, and a request waiting on a miss awaits its flight's
future. So a slow peer or a waiting client costs a coroutine and a few KB, never a thread, and
cache hits are served however many clients wait. Several replicas on one node share the port
with SO_REUSEPORT and the kernel spreads connections among them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Optional

from client import protocol
from client.protocol import ProtocolError
from serve_app.admission import Admission, insecure_auth_warning, server_ssl_context
from serve_app.tenants import ANONYMOUS
from serve_app.config import GatewayConfig
from serve_app.load_meter import LoadMeter
from serve_app.front import FrontService

__all__ = ["SocketFrontServer"]
log = logging.getLogger(__name__)
# Clients send requests and model listings only.
ACCEPTED_PAYLOADS = {kind: protocol.MAX_PAYLOAD[kind] for kind in (protocol.REQUEST, protocol.LIST_MODELS)}
SEND_TIMEOUT_S = 30.0


class SocketFrontServer:
    """Accepts boot-client connections and answers their requests through a FrontService."""

    def __init__(self, front: FrontService, config: GatewayConfig):
        self.front = front
        self.config = config
        self.admission: Admission = front.admission
        self.ssl_context = server_ssl_context(config)
        warning = insecure_auth_warning(config)
        if warning:
            log.warning(warning)
        self.port: Optional[int] = None
        self._loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.AbstractServer] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.load = LoadMeter()
        self._thread = threading.Thread(target=self._run, name="sdgate-socket", daemon=True)

    @property
    def active_requests(self) -> int:
        """Requests being answered right now (the load autoscaling sees)."""
        return self.load.active

    @property
    def open_connections(self) -> int:
        return self.admission.open_connections

    def average_load(self) -> float:
        """Mean requests in flight since the previous call (what autoscaling should see)."""
        return self.load.average()

    def start(self) -> "SocketFrontServer":
        """Bind (so `port` is known on return) and serve on the loop thread."""
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def alive(self) -> bool:
        return self._thread.is_alive() and self._loop.is_running()

    def stop(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._handle, self.config.host, self.config.socket_port, reuse_address=True, reuse_port=True,
                backlog=1024, ssl=self.ssl_context,
                ssl_handshake_timeout=self.config.frame_timeout_s if self.ssl_context else None))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, start to end. Nothing raised here may reach the server: one bad
        connection (or a bug on the registration path) must never end socket service."""
        client = "?"
        counted = False
        try:
            peer = writer.get_extra_info("peername")
            client = peer[0] if peer else "?"
            try:
                self.admission.open_connection(client)
                counted = True
            except ProtocolError as exc:
                self.front.counters.error(exc.code)
                await self._send(writer, protocol.encode_error(exc.code, exc.message), timeout=1.0)
                return
            await self._serve(reader, writer, client)
        except Exception:  # noqa: BLE001 - logged; this connection ends, the server goes on
            log.exception("unexpected error on a client connection from %s", client)
        finally:
            if counted:
                self.admission.close_connection(client)
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a broken transport
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> None:
        """Requests one after another until the peer closes, idles too long, or breaks the framing."""
        while True:
            # 1. Wait for the first byte of a frame (idle between requests: no error frame). A
            #    timeout scope, not wait_for, which on Python 3.11 runs the read as a task of its own.
            try:
                async with asyncio.timeout(self.config.idle_timeout_s):
                    first = await reader.readexactly(1)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
                return
            # 2. The whole frame within the frame timeout, its header checked before any payload is read.
            decoder = protocol.FrameDecoder(ACCEPTED_PAYLOADS)  # an empty non-REQUEST is refused by decode_request
            decoder.feed(first)
            try:
                async with asyncio.timeout(self.config.frame_timeout_s):
                    while (frame := decoder.next_frame()) is None:
                        decoder.feed(await reader.readexactly(decoder.needed()))
            except TimeoutError:
                await self._send_error(writer, ProtocolError(
                    protocol.E_TIMEOUT, f"a frame must arrive within {self.config.frame_timeout_s:.0f} s"))
                return
            except asyncio.IncompleteReadError as exc:
                await self._send_error(writer, ProtocolError(protocol.E_BAD_FRAME, "connection closed after "
                                                             f"{len(exc.partial)} of {exc.expected} bytes"))
                return
            except ProtocolError as exc:
                await self._send_error(writer, exc)
                return  # the byte stream can no longer be trusted
            except (ConnectionError, OSError):
                return
            # 3. Answer it; the connection stays usable unless sending failed.
            if not await self._answer(frame, writer, client, reader):
                return

    async def _answer(self, frame: protocol.Frame, writer: asyncio.StreamWriter, client: str,
                      reader: asyncio.StreamReader) -> bool:
        """Returns True when the connection may carry another request."""
        try:
            tenant = ANONYMOUS
            if self.config.auth_token:  # before validation, so strangers learn nothing about the fields
                body = frame.json()
                token = body.get("token") if isinstance(body, dict) else None
                tenant = self.admission.authenticate(token if isinstance(token, str) else None)
            if frame.kind == protocol.LIST_MODELS:
                self.admission.check_rate(client, tenant)
                listing = await asyncio.to_thread(self.front.catalogue.listing)  # reads live workers in Redis
                return await self._send(writer, protocol.encode_models(listing))
            request, _ = protocol.decode_request(frame)
            previews = protocol.request_previews(frame)
            self.admission.check_rate(client, tenant)
        except ProtocolError as exc:
            return await self._send_error(writer, exc)
        self.load.add(+1)
        waiter_id = uuid.uuid4().hex

        def on_event(event: dict) -> None:
            # STATUS keeps `state` (old clients read only that) and gains step, steps, queue_position, eta_s.
            writer.write(protocol.encode_status(event.get("state", protocol.STATUS_GENERATING), **{
                k: event.get(k) for k in ("step", "steps", "queue_position", "eta_s")}))
            if previews and event.get("preview"):
                writer.write(protocol.encode_preview(event.get("step"), event.get("steps"), event["preview"]))

        generation = asyncio.ensure_future(self.front.generate_async(
            request, on_status=lambda state: writer.write(protocol.encode_status(state)), client=client,
            on_event=on_event, waiter_id=waiter_id, previews=previews, tenant=tenant))
        peer = asyncio.ensure_future(self._watch_peer(reader, waiter_id))
        try:
            await asyncio.wait({generation, peer}, return_when=asyncio.FIRST_COMPLETED)
            if not generation.done():  # the client left (or broke the framing) while its request waited
                generation.cancel()  # it stops waiting; a started render is still cached
                await asyncio.gather(generation, return_exceptions=True)
                return False
        finally:
            # The watcher must be gone before the answer is sent: once the client has its answer it may
            # send its next request, and that belongs to the frame loop, not to a leftover watcher.
            peer.cancel()
            await asyncio.gather(peer, return_exceptions=True)
            self.load.add(-1)
        try:
            answer = generation.result()
        except ProtocolError as exc:  # counted by FrontService
            return await self._send(writer, protocol.encode_error(exc.code, exc.message, exc.field))
        return await self._send(writer, protocol.encode_image(answer.meta, answer.png))

    async def _watch_peer(self, reader: asyncio.StreamReader, waiter_id: str) -> str:
        """While a request waits: a CANCEL frame cancels it (returns "cancel" once the wait ends);
        end of stream or a broken frame means the client left ("closed")."""
        decoder = protocol.FrameDecoder({protocol.CANCEL: protocol.MAX_PAYLOAD[protocol.CANCEL]})
        try:
            decoder.feed(await reader.readexactly(protocol.HEADER.size))  # no deadline: it waits with the request
            async with asyncio.timeout(self.config.frame_timeout_s):
                while (frame := decoder.next_frame()) is None:
                    decoder.feed(await reader.readexactly(decoder.needed()))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ProtocolError, TimeoutError):
            return "closed"
        if frame.kind != protocol.CANCEL:
            return "closed"  # only CANCEL may come while a request is in flight
        self.front.cancel(waiter_id)
        await asyncio.Event().wait()  # the generation ends with `cancelled`; this watcher is then cancelled
        return "cancel"

    async def _send_error(self, writer: asyncio.StreamWriter, exc: ProtocolError) -> bool:
        self.front.counters.error(exc.code)
        return await self._send(writer, protocol.encode_error(exc.code, exc.message, exc.field))

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes, timeout: float = SEND_TIMEOUT_S) -> bool:
        try:
            writer.write(data)
            async with asyncio.timeout(timeout):
                await writer.drain()
            return True
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            return False
