"""A flight: one generation in one gateway replica that every identical request there waits on.

The flight owns its state and its lock: who waits on it, who listens to its progress, whether a
worker started it, and its outcome (a future, completed once). Nothing outside reaches into it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set

from celery_bridge.lifecycle import State, advance, ended
from client.protocol import E_INTERNAL, GenerationRequest, ProtocolError

log = logging.getLogger(__name__)
StatusCallback = Callable[[str], None]
EventCallback = Callable[[Dict[str, Any]], None]


@dataclass
class Answer:
    """An image for the client: metadata, PNG bytes, and whether it came from the cache."""

    meta: Dict[str, Any]
    png: bytes
    cached: bool


class Flight:
    """One generation in this replica that every identical request waits on, as a future."""

    def __init__(self, key: str, request: GenerationRequest, leader_status: Optional[StatusCallback] = None):
        self.key, self.request = key, request
        self.future: "Future[Answer]" = Future()
        self.born = time.monotonic()
        self.task_id: Optional[str] = None  # set once the claim is known
        self.owner = False  # this replica holds the cluster claim and renews it
        self.leader_status = leader_status
        self.previews = 0  # the leader's preview interval, sent with the task
        self.tenant: Optional[str] = None  # the leader's tenant: whose fair share and usage the task is
        self.last_event: Optional[Dict[str, Any]] = None
        self.queue_position: Optional[int] = None
        self._lock = threading.Lock()
        self._state = State.QUEUED
        self._started_listeners: List[Callable[[], None]] = []
        self._waiters: Set[str] = set()  # ids of the waiters here (their leases renewed in Redis)
        self._listeners: List[EventCallback] = []  # progress listeners of every waiter of this flight

    # -- waiters -------------------------------------------------------------------------------------

    def join(self, waiter_id: str, listener: Optional[EventCallback]) -> Optional[str]:
        """`waiter_id` waits here (and `listener` hears progress, the latest event at once); returns
        the task id when it is known already, so the caller registers the waiter's lease."""
        with self._lock:
            self._waiters.add(waiter_id)
            if listener:
                self._listeners.append(listener)
            task_id = self.task_id
        if listener and self.last_event:
            listener(self.last_event)
        return task_id

    def leave(self, waiter_id: str, listener: Optional[EventCallback], left: bool) -> Optional[str]:
        """The waiter stops listening; with `left` (it went away, rather than timed out) it stops
        waiting too. Returns the task id whose lease it should drop, if any."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            if not left:
                return None  # it timed out: its interest stays until the flight ends, so the image is made
            self._waiters.discard(waiter_id)
            task_id = self.task_id
        return task_id if task_id and not self.future.done() else None

    def drop(self, waiter_id: str) -> Optional[str]:
        """The waiter cancelled: it no longer waits. Returns the task id to cancel it on."""
        with self._lock:
            self._waiters.discard(waiter_id)
            return self.task_id

    def waiter_ids(self) -> List[str]:
        with self._lock:
            return list(self._waiters)

    @property
    def listened(self) -> bool:
        """Some waiter listens to progress (queue positions are worth publishing)."""
        return bool(self._listeners)

    # -- progress ------------------------------------------------------------------------------------

    def emit(self, event: Dict[str, Any]) -> None:
        """Hand a progress event to every waiter's listener (each one hops onto its own loop)."""
        self.last_event = event
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            _quietly(lambda: listener(event))

    @property
    def state(self) -> State:
        """Where the generation is, as this replica has heard: moved only by lifecycle's table."""
        return self._state

    def on_started(self, listener: Callable[[], None]) -> None:
        """Call `listener` once when a worker picks the task up (at once if it already has)."""
        with self._lock:
            if self._state is State.QUEUED:
                self._started_listeners.append(listener)
                return
            if self._state is not State.GENERATING:
                return  # it ended: nobody will hear `generating` now
        listener()

    def mark_started(self) -> None:
        with self._lock:
            if self._state is not State.QUEUED:
                return  # started already, or a late start event after the end
            self._state = advance(self._state, State.GENERATING)
            listeners, self._started_listeners = self._started_listeners, []
        for listener in listeners:
            _quietly(listener)

    # -- the end -------------------------------------------------------------------------------------

    def finish(self, outcome: object) -> bool:
        """Complete the flight with an Answer or a ProtocolError; False if it was already complete."""
        with self._lock:
            if self.future.done():
                return False
            code = outcome.code if isinstance(outcome, ProtocolError) else \
                E_INTERNAL if isinstance(outcome, BaseException) else None
            self._state = advance(self._state, ended(code))  # queued or generating: either may end
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)  # type: ignore[arg-type]
            self._started_listeners = []
        return True


def _quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - one listener must not stop the others
        log.exception("a flight listener failed")
