"""Keeps the Redis visibility lease of running tasks fresh.

kombu's Redis transport hands an unacknowledged task to another worker once it has been
unacknowledged for `visibility_timeout`. sdgate keeps that timeout short so a task whose worker
died is redelivered in seconds; a live worker renews the lease of each task it holds, so a long
generation is never handed out twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Optional, Union

import redis
from celery.signals import task_postrun, task_received

from celery_bridge import redis_keys

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Tracks the delivery tags this process holds and renews their lease every `interval` s."""

    def __init__(self, broker: Union[str, redis.Redis], interval: float):
        # A redis.Redis (CeleryConfig.redis_client) or, for older callers, a URL.
        self._client = (redis.Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=5)
                        if isinstance(broker, str) else broker)
        self._interval = interval
        self._tags: Dict[str, str] = {}  # task id -> delivery tag
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LeaseKeeper":
        task_received.connect(self._on_received, weak=False)
        task_postrun.connect(self._on_postrun, weak=False)
        self._thread = threading.Thread(target=self._run, name="sdgate-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        task_received.disconnect(self._on_received)
        task_postrun.disconnect(self._on_postrun)

    def held(self) -> Dict[str, str]:
        with self._lock:
            return dict(self._tags)

    def _on_received(self, request=None, **_):
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            with self._lock:
                self._tags[request.id] = tag

    def _on_postrun(self, task_id=None, **_):
        with self._lock:
            self._tags.pop(task_id, None)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            tags = list(self.held().values())
            if not tags:
                continue
            try:
                # XX: only renew entries kombu still holds; an acked tag must not come back.
                self._client.zadd(redis_keys.KOMBU_UNACKED_INDEX, {tag: time.time() for tag in tags}, xx=True)
            except redis.RedisError as exc:
                log.warning("could not renew task leases (%s); will retry in %.0f s", exc, self._interval)
