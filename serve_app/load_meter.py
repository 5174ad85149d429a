"""Requests in flight on one front, and their time average between reports: the load a gateway
replica reports for autoscaling (serve_app/autoscaling.py), which Serve cannot see on the socket
port or the fast HTTP port."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator


class LoadMeter:
    """Counts requests in flight and integrates that count over time, thread-safely."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._integral, self._since = 0.0, clock()
        self._last_report = (self._since, 0.0)

    @property
    def active(self) -> int:
        """Requests in flight now."""
        return self._active

    def add(self, delta: int) -> None:
        with self._lock:
            self._advance()
            self._active += delta

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """One request in flight for the duration of the block."""
        self.add(+1)
        try:
            yield
        finally:
            self.add(-1)

    def average(self) -> float:
        """Mean requests in flight since the previous call (the current count on the first instant)."""
        with self._lock:
            self._advance()
            since, integral = self._last_report
            self._last_report = (self._since, self._integral)
            elapsed = self._since - since
            return (self._integral - integral) / elapsed if elapsed > 0 else float(self._active)

    def _advance(self) -> None:
        now = self._clock()
        self._integral += self._active * (now - self._since)
        self._since = now
