"""Socket progress without services: STATUS frames with step fields, PREVIEW only when asked, and a
CANCEL frame that cancels exactly the request of its connection (a fake front stands in)."""

from __future__ import annotations

import asyncio
import base64
import socket
from typing import Dict, List

import pytest
import torch

from client import boot, protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.progress import MAX_PREVIEW_BYTES, latent_preview
from serve_app.admission import Admission
from serve_app.config import GatewayConfig
from serve_app.socket_server import SocketFrontServer
from tests.unit.test_socket_front import Counters

PREVIEW = base64.b64encode(b"\x89PNG\r\n\x1a\npreview").decode()


class WaitingFront:
    """Sends one progress event (with a preview), then waits until its waiter is cancelled."""

    def __init__(self, config: GatewayConfig):
        self.admission = Admission(config)
        self.counters = Counters()
        self.cancelled: List[str] = []
        self.waiting: Dict[str, asyncio.Event] = {}
        self.loop = None

    async def generate_async(self, request, on_status=None, client="?", on_event=None, waiter_id=None, **_):
        self.loop = asyncio.get_running_loop()
        event = self.waiting[waiter_id] = asyncio.Event()
        on_status(protocol.STATUS_QUEUED)
        on_event({"state": "generating", "step": 3, "steps": 10, "queue_position": None, "eta_s": 1.5,
                  "preview": PREVIEW})
        await event.wait()
        raise ProtocolError(protocol.E_CANCELLED, "cancelled at the client's request")

    def cancel(self, waiter_id: str) -> bool:
        self.cancelled.append(waiter_id)
        self.loop.call_soon_threadsafe(self.waiting[waiter_id].set)
        return True


@pytest.fixture
def server():
    config = GatewayConfig(socket_port=0, frame_timeout_s=30.0)
    front = WaitingFront(config)
    started = SocketFrontServer(front, config).start()
    yield started, front
    started.stop()


def read_until(sock, kind):
    frames = []
    while True:
        frame = protocol.read_frame(sock, frame_timeout=10)
        frames.append(frame)
        if frame.kind == kind:
            return frames


@pytest.mark.parametrize("previews", [0, 2])
def test_status_carries_step_fields_and_preview_only_when_asked(server, previews):
    srv, front = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(protocol.encode_request(GenerationRequest("a fox"), previews=previews))
        frames = read_until(sock, protocol.STATUS)  # queued
        frames += read_until(sock, protocol.STATUS)  # the progress event
        status = frames[-1].json()
        assert status == {"state": "generating", "step": 3, "steps": 10, "queue_position": None, "eta_s": 1.5}
        sock.sendall(protocol.encode_cancel())
        frames = read_until(sock, protocol.ERROR)
        assert protocol.decode_error(frames[-1]).code == protocol.E_CANCELLED
        previews_seen = [f.json() for f in frames if f.kind == protocol.PREVIEW]
        assert previews_seen == ([{"step": 3, "steps": 10, "png_b64": PREVIEW}] if previews else [])
    assert len(front.cancelled) == 1


def test_cancel_hits_only_the_request_of_its_own_connection(server):
    srv, front = server
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(protocol.encode_request(GenerationRequest("same prompt")))
            read_until(sock, protocol.STATUS)
            read_until(sock, protocol.STATUS)
        socks[0].sendall(protocol.encode_cancel())
        assert protocol.decode_error(read_until(socks[0], protocol.ERROR)[-1]).code == protocol.E_CANCELLED
        assert len(front.cancelled) == 1
        other = [w for w in front.waiting if w not in front.cancelled]
        assert len(other) == 1 and not front.waiting[other[0]].is_set()  # the other request still waits
    finally:
        for sock in socks:
            sock.close()


def test_boot_progress_line_shows_bar_queue_and_eta():
    assert boot._detail({"step": 5, "steps": 10, "eta_s": 4.2}) == "[##########..........] 5/10  ETA 4 s"
    assert boot._detail({"queue_position": 2, "eta_s": 30}) == "queue 3  ETA 30 s"
    assert boot._detail({"step": "x", "queue_position": True}) == ""


def test_latent_preview_is_a_small_png():
    png = latent_preview(torch.randn(1, 4, 128, 128))
    assert png.startswith(b"\x89PNG") and len(png) <= MAX_PREVIEW_BYTES
