"""FOR BENCHMARKS AND TESTS ONLY: a pipeline stand-in whose render is a fixed sleep.

Chosen only by a catalogue entry whose source is `sleep:<ms>` (sleep_catalogue writes one for a
bench or test stack), never by an environment variable: a production worker of a real model always
renders it. A sleep worker loads no model (and no torch): each render sleeps that long, using no
CPU, and returns a small valid PNG whose colour comes from the request's cache key. One machine can
then stand in for many GPU workers (`python -m bench scale`).
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.models import SLEEP_SOURCE, ModelEntry, load_catalogue

SLEEP_MODEL = "sleep"


class SleepTimeout(RuntimeError):
    """Never raised: the sleep render has no time limit to pass."""


def sleep_catalogue(path: Path, render_ms: float, name: str = SLEEP_MODEL, max_batch_size: int = 1) -> Path:
    """Write a catalogue whose one (default) model is the sleep stand-in; point SDGATE_MODELS_FILE
    at it for every process of a bench or test stack."""
    entry = {"name": name, "source": f"{SLEEP_SOURCE}{render_ms:g}", "max_batch_size": max_batch_size,
             "defaults": {"width": 64, "height": 64, "steps": 2}, "limits": {"max_side": 512, "max_steps": 50}}
    path.write_text(yaml.safe_dump({"default": name, "models": [entry]}))
    return path


def solid_png(width: int, height: int, rgb: Tuple[int, int, int]) -> bytes:
    """A valid RGB PNG of one colour (no Pillow needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class SleepRunner:
    """PipelineRunner's interface; every call sleeps the entry's `sleep:<ms>` and draws a colour."""

    loads = 0

    def __init__(self, config: WorkerConfig):
        self.config = config
        entry = load_catalogue().get(config.model)
        if entry is None or entry.sleep_ms is None:
            raise ValueError(f"model {config.model!r} is not a `sleep:<ms>` entry of the catalogue")
        self.entry: ModelEntry = entry
        self.device = "cpu"
        self.sleep_s = entry.sleep_ms / 1000
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

    def render(self, request: GenerationRequest, time_limit_s: Optional[float] = None, on_step=None,
               on_start=None) -> bytes:
        if on_start is not None:
            on_start()
        return self.render_batch([request], time_limit_s)[0][0]
