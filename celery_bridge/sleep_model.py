"""FOR BENCHMARKS AND TESTS ONLY: a pipeline stand-in whose render is a fixed sleep.

With SDGATE_TEST_SLEEP_RENDER_MS set, a worker loads no model (and no torch): each render sleeps
that long, using no CPU, and returns a small valid PNG whose colour comes from the request's cache
key. One machine can then stand in for many GPU workers (`python -m bench scale`).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import List, Optional, Tuple

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.models import ModelEntry, load_catalogue

SLEEP_VARIABLE = "SDGATE_TEST_SLEEP_RENDER_MS"


class SleepTimeout(RuntimeError):
    """Never raised: the sleep render has no time limit to pass."""


def sleep_runner_class() -> Optional[type]:
    """SleepRunner when SDGATE_TEST_SLEEP_RENDER_MS is set, else None (the real pipeline)."""
    return SleepRunner if os.environ.get(SLEEP_VARIABLE) else None


def solid_png(width: int, height: int, rgb: Tuple[int, int, int]) -> bytes:
    """A valid RGB PNG of one colour (no Pillow needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class SleepRunner:
    """PipelineRunner's interface; every call sleeps SDGATE_TEST_SLEEP_RENDER_MS and draws a colour."""

    loads = 0

    def __init__(self, config: WorkerConfig):
        self.config = config
        entry = load_catalogue().get(config.model)
        self.entry = entry if entry is not None else ModelEntry(name=config.model, source=config.model)
        self.device = "cpu"
        self.sleep_s = float(os.environ.get(SLEEP_VARIABLE, "0")) / 1000
        self.last_pipeline_ms = 0.0
        type(self).loads += 1

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        return self.entry.fill(request).normalized()

    def render_batch(self, requests: List[GenerationRequest], time_limit_s: Optional[float] = None,
                     on_step=None) -> Tuple[List[bytes], float]:
        requests = [self.resolve(request) for request in requests]
        started = time.perf_counter()
        time.sleep(self.sleep_s)
        self.last_pipeline_ms = (time.perf_counter() - started) * 1000
        pngs = []
        for request in requests:
            key = bytes.fromhex(request.cache_key()[:6])
            pngs.append(solid_png(8, 8, (key[0], key[1], key[2])))
        return pngs, self.last_pipeline_ms

    def render(self, request: GenerationRequest, time_limit_s: Optional[float] = None, on_step=None) -> bytes:
        return self.render_batch([request], time_limit_s)[0][0]
