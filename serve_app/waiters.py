"""Waiter relay: what the cluster knows of this replica's waiters, and what they hear.

- Leases: each waiter of a flight holds a lease in Redis (celery_bridge/progress.py, in Redis
  server time), so a worker skips a queued task nobody waits for any more, and the last waiter's
  cancel stops the task. Bookkeeping runs off the event loops and is best effort: a lease that
  is never renewed lapses by itself.
- Progress: a worker's step events reach every waiter of the flight.
- Queue positions: each queued flight's place in its model's queue and an ETA, on a timer of its
  own, so nothing cosmetic can delay or skip a lease renewal.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Any, Callable, Dict, List, Optional

import redis

from client import protocol
from celery_bridge import progress
from celery_bridge.fair_share import FairShare
from celery_bridge.lifecycle import State
from celery_bridge.models import queue_for
from serve_app.flight import Flight

log = logging.getLogger(__name__)
QUEUE_SCAN_LIMIT = 1000  # queue positions are looked for this far from the head; beyond, None
POSITIONS_PERIOD_S = 1.0


class WaiterRelay:
    """Waiter leases, progress and queue positions for one replica's flights."""

    def __init__(self, client: redis.Redis, lease_s: float, pool: Executor, base_queue: str,
                 live_workers: Callable[[str], Optional[int]], fair: FairShare):
        self._redis = client
        self.lease_s = lease_s
        self._pool = pool
        self._base_queue = base_queue
        self._live_workers = live_workers
        self._fair = fair  # the producer's: where held tasks' places in line come from
        self._closed = False

    def close(self) -> None:
        self._closed = True

    # -- leases --------------------------------------------------------------------------------------

    def lease(self, task_id: str, waiter_ids: List[str]) -> None:
        """Lease `waiter_ids` on `task_id` now (the claim leases the waiters known when it is made:
        serve_app/claims.py); with none, nothing is sent."""
        progress.add_waiters(self._redis, task_id, waiter_ids, self.lease_s)

    def renew(self, flights: List[Flight], pipe: Any) -> None:
        """Queue on `pipe` a fresh lease for each waiter of each flight (one that left meanwhile stays gone)."""
        for flight in flights:
            progress.add_waiters(self._redis, flight.task_id, flight.waiter_ids(), self.lease_s, pipe=pipe, renew=True)

    def joined(self, task_id: str, waiter_id: str) -> None:
        """A waiter joined a flight whose task was known already: lease it now (off the loop)."""
        self._bookkeep(progress.add_waiters, self._redis, task_id, [waiter_id], self.lease_s)

    def left(self, task_id: str, waiter_id: str) -> None:
        """A waiter went away: its lease goes (a running render goes on and is cached)."""
        self._bookkeep(progress.remove_waiter, self._redis, task_id, waiter_id)

    def cancel(self, task_id: str, waiter_id: str) -> int:
        """`waiter_id` leaves `task_id`, cancelling it when it was the last live waiter; returns waiters left."""
        try:
            return progress.cancel(self._redis, task_id, waiter_id)
        except redis.RedisError as exc:
            log.warning("cancel of %s failed: %s", task_id, exc)
            return -1

    def _bookkeep(self, fn: Callable[..., Any], *args: Any) -> None:
        """Off the loop and best effort; dropped once the replica is going away (leases lapse)."""
        if self._closed:
            return
        try:
            self._pool.submit(_quiet_redis, fn, *args)
        except RuntimeError:  # the pool was shut down
            pass

    # -- progress and queue positions ------------------------------------------------------------------

    @staticmethod
    def relay_progress(flight: Flight, event: Dict[str, Any]) -> None:
        """A step event from the worker (listener thread): to every waiter of the flight."""
        flight.mark_started()
        relayed = {"state": protocol.STATUS_GENERATING, "step": event.get("step"), "steps": event.get("steps"),
                   "queue_position": None, "eta_s": progress.step_eta_s(event)}
        if isinstance(event.get("preview"), str):
            relayed["preview"] = event["preview"]
        flight.emit(relayed)

    def publish_queue_positions(self, flights: List[Flight]) -> None:
        """Each queued flight's place in its model's queue, and an ETA, to its waiters."""
        by_queue: Dict[str, List[Flight]] = {}
        for flight in flights:
            if flight.state is State.QUEUED and flight.listened:
                by_queue.setdefault(queue_for(self._base_queue, flight.request.model), []).append(flight)
        for queue, queued in by_queue.items():
            positions = progress.queue_positions(self._redis, queue, [f.task_id for f in queued], QUEUE_SCAN_LIMIT)
            # Not in the Celery queue yet: waiting in its tenant's fair-share backlog.
            positions.update(self._fair.positions(queue, [task_id for task_id, at in positions.items() if at is None]))
            model = queued[0].request.model
            per_image = progress.recent_render_s(self._redis, model)
            workers = max(1, self._live_workers(model) or 1)
            for flight in queued:
                position = positions.get(flight.task_id)
                if flight.state is not State.QUEUED or (position == flight.queue_position and flight.last_event):
                    continue
                flight.queue_position = position
                eta = None
                if per_image is not None and position is not None:
                    eta = round((position // workers + 1) * per_image, 1)
                flight.emit({"state": protocol.STATUS_QUEUED, "step": None, "steps": flight.request.steps,
                             "queue_position": position, "eta_s": eta})

    def keep_publishing(self, flights: Callable[[], List[Flight]], stop: threading.Event) -> threading.Thread:
        """Publish queue positions every POSITIONS_PERIOD_S until `stop`, on a thread of their own."""
        def run() -> None:
            while not stop.wait(POSITIONS_PERIOD_S):
                try:
                    self.publish_queue_positions(flights())
                except Exception as exc:  # noqa: BLE001 - a missing position is not worth more than a debug line
                    log.debug("queue positions failed: %s", exc)

        thread = threading.Thread(target=run, name="sdgate-positions", daemon=True)
        thread.start()
        return thread


def _quiet_redis(call: Callable[..., Any], *args: Any) -> None:
    try:
        call(*args)
    except redis.RedisError as exc:  # the lease keeper retries; a leave lapses by itself
        log.warning("waiter bookkeeping failed: %s", exc)
