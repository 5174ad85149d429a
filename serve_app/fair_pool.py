"""A thread pool that takes its next job round robin across tenants, so one tenant's burst of new
misses (hundreds of leads at once) does not queue another tenant's lead behind it in this replica,
before fair share in Redis even sees it (celery_bridge/fair_share.py)."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, Dict, Tuple

log = logging.getLogger(__name__)
Job = Tuple[Callable[..., Any], Tuple[Any, ...]]


class FairPool:
    """`threads` daemon threads; submit(tenant, fn, *args) runs fn(*args), first in first out
    within a tenant and one job per tenant in turn across tenants."""

    def __init__(self, threads: int, name: str = "sdgate-lead"):
        self._queues: Dict[str, Deque[Job]] = collections.OrderedDict()
        self._ready = threading.Condition()
        self._closed = False
        for index in range(threads):
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True).start()

    def submit(self, tenant: str, fn: Callable[..., Any], *args: Any) -> None:
        with self._ready:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._queues.setdefault(tenant, collections.deque()).append((fn, args))
            self._ready.notify()

    def shutdown(self) -> None:
        with self._ready:
            self._closed = True
            self._queues.clear()
            self._ready.notify_all()

    def _next(self) -> Job:
        with self._ready:
            while not self._queues and not self._closed:
                self._ready.wait()
            if self._closed:
                raise RuntimeError("closed")
            tenant, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            del self._queues[tenant]
            if queue:  # to the back of the line: the other tenants go first
                self._queues[tenant] = queue
            return job

    def _run(self) -> None:
        while True:
            try:
                fn, args = self._next()
            except RuntimeError:
                return
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's own failure is its own; the pool goes on
                log.exception("a pooled job failed")
