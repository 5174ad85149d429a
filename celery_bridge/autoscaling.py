"""Worker autoscaling on the work there is: tasks queued plus tasks being rendered.

With late acks and prefetch 1, a task a worker is rendering has left the queue list: kombu's
Redis transport keeps it in its `unacked` hash until the worker acks it. A policy that counts
only the queue sees a fully busy fleet with an empty queue as idle and stops busy GPUs. This one
counts, for its own queue only (one Celery queue per model gets one policy per deployment):

    work = LLEN(queue and its priority lists) + unacked messages routed to that queue

and asks for work / target_ongoing_requests replicas, so an idle fleet still goes to zero.
Serve wraps it with min/max bounds and the upscale/downscale delays of the deployment's config.
It runs in the Serve controller; it imports redis and kombu only (no torch, no celery worker).

Which replica Serve stops is Serve's choice; a stopped replica drains (celery_bridge.consumer):
it stops consuming, finishes its render, then exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import redis
from kombu.transport.redis import Channel as KombuRedisChannel
from celery_bridge.fair_share import queue_held_key

log = logging.getLogger(__name__)
DEFAULT_POLL_INTERVAL_S = 2.0
# With no successful count for this many poll intervals (Redis unreachable), hold the replica
# count: an unknown load is no reason to stop GPUs that may be rendering.
STALE_AFTER_POLLS = 5


@dataclass(frozen=True)
class QueueWork:
    """Tasks of one queue: waiting in the queue, and delivered to a worker but not yet acked."""

    queued: int
    in_progress: int

    @property
    def total(self) -> int:
        return self.queued + self.in_progress


def queue_keys(queue: str) -> list:
    """The Redis lists kombu keeps for `queue`: one per priority step."""
    return [queue] + [f"{queue}{KombuRedisChannel.sep}{step}" for step in KombuRedisChannel.priority_steps if step]


def unacked_for_queue(raw_entries: Iterable[bytes], queue: str) -> int:
    """How many entries of kombu's unacked hash were delivered from `queue`.

    Each entry is JSON [message, exchange, routing_key]; Celery routes a task to a queue with a
    routing key equal to the queue's name (sdgate never configures it otherwise).
    """
    count = 0
    for raw in raw_entries:
        try:
            _, _, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue  # not kombu's format: not ours to count
        if routing_key == queue:
            count += 1
    return count


def count_queue_work(client: redis.Redis, queue: str) -> QueueWork:
    """One consistent snapshot (MULTI/EXEC) of `queue`'s queued (fair-share backlogs included) and
    in-progress tasks."""
    keys = queue_keys(queue)
    with client.pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.llen(key)
        pipe.scard(queue_held_key(queue))  # waiting in tenants' fair-share backlogs: work all the same
        pipe.hvals(KombuRedisChannel.unacked_key)
        replies = pipe.execute()
    return QueueWork(queued=int(sum(replies[:len(keys) + 1])), in_progress=unacked_for_queue(replies[-1], queue))


class WorkerLoadPolicy:
    """Serve autoscaling policy for a Celery task-consumer deployment: one replica per task
    queued or in progress on its queue (times 1 / target_ongoing_requests).

    Use it in a Serve config as
        policy: {policy_function: celery_bridge.autoscaling:WorkerLoadPolicy,
                 policy_kwargs: {queue_name: sdgate, poll_interval_s: 2}}
    Without broker_url it connects as sdgate's Celery config says (configs/celery.yaml, secrets.env,
    SDGATE_* variables), so no password has to be in the Serve config.
    """

    def __init__(self, queue_name: Optional[str] = None, broker_url: Optional[str] = None,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 counter: Optional[Callable[[], QueueWork]] = None, clock: Callable[[], float] = time.monotonic):
        self._celery = None
        if queue_name is None or (broker_url is None and counter is None):
            from celery_bridge.config import load_celery_config

            self._celery = load_celery_config()  # the password comes from secrets.env, never the Serve config
            queue_name = queue_name or self._celery.queue
        self.queue_name = queue_name
        self.poll_interval_s = float(poll_interval_s)
        self._broker_url = broker_url
        self._client: Optional[redis.Redis] = None
        self._counter = counter or self._count
        self._clock = clock
        self._work: Optional[QueueWork] = None
        self._counted_at = -math.inf
        self._polled_at = -math.inf
        self._poll: Optional["asyncio.Future"] = None

    # -- counting (off the controller's event loop) ----------------------------------------------

    def _count(self) -> QueueWork:
        if self._client is None:
            self._client = (redis.Redis.from_url(self._broker_url, socket_timeout=3, socket_connect_timeout=3)
                            if self._broker_url else self._celery.redis_client(socket_timeout=3, socket_connect_timeout=3))
        return count_queue_work(self._client, self.queue_name)

    def refresh(self) -> None:
        """Count now, in this thread (what each background poll runs)."""
        try:
            work = self._counter()
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: keep the last count
            log.warning("could not count the work on queue %r: %s", self.queue_name, exc)
            return
        self._work, self._counted_at = work, self._clock()

    def _maybe_poll(self) -> None:
        now = self._clock()
        if now - self._polled_at < self.poll_interval_s or (self._poll is not None and not self._poll.done()):
            return
        self._polled_at = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop (tests, tools): count inline
            self.refresh()
            return
        # One short-lived job per poll, no loop holding `self`: a replaced policy is simply dropped.
        self._poll = loop.run_in_executor(None, self.refresh)

    # -- the policy -------------------------------------------------------------------------------

    def __call__(self, ctx) -> Tuple[float, Dict[str, Any]]:
        self._maybe_poll()
        work = self._work
        stale = self._clock() - self._counted_at > STALE_AFTER_POLLS * self.poll_interval_s
        if work is None or stale:
            return ctx.target_num_replicas, {"queue": self.queue_name, "work": "unknown"}
        state = {"queue": self.queue_name, "queued": work.queued, "in_progress": work.in_progress}
        return work.total / ctx.config.get_target_ongoing_requests(), state
