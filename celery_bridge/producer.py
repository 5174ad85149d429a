"""The producer side the gateway calls: submit a generation, watch for its result.

Imports no torch or diffusers. Results arrive through Celery's Redis result backend, which
stores each task's state under a key and publishes it on a channel of the same name; one
watcher thread per process listens on the pattern for sdgate's task ids and wakes the waiter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

import redis

from client.protocol import E_INTERNAL, GenerationRequest
from celery_bridge.app import make_celery_app
from celery_bridge.config import CeleryConfig
from celery_bridge.contract import TASK_NAME, GenerationResult, task_payload

log = logging.getLogger(__name__)
TASK_ID_PREFIX = "sdgate-"
STATE_STARTED, STATE_SUCCESS, STATE_FAILURE = "STARTED", "SUCCESS", "FAILURE"


def new_task_id(key: str) -> str:
    """Task ids name the cache key they render, plus a nonce so a retry never sees a stale result."""
    return f"{TASK_ID_PREFIX}{key}-{uuid.uuid4().hex[:12]}"


class GenerationProducer:
    """Sends sdgate.generate tasks and resolves their results (one per gateway process)."""

    def __init__(self, config: CeleryConfig):
        self.config = config
        self.app = make_celery_app(config, name="sdgate-gateway")
        self.redis = redis.Redis.from_url(config.broker_url(), socket_timeout=5, socket_connect_timeout=3,
                                          health_check_interval=10)
        prefix = self.app.backend.task_keyprefix
        self._result_prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
        self._watches: Dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="sdgate-results", daemon=True)
        self._listener.start()
        self._poller = threading.Thread(target=self._poll_pending, name="sdgate-results-poll", daemon=True)
        self._poller.start()

    def submit(self, request: GenerationRequest, task_id: str) -> None:
        """Queue one generation under `task_id` (call watch() first so no result is missed)."""
        self.app.send_task(TASK_NAME, args=[task_payload(request)], task_id=task_id, queue=self.config.queue)

    def watch(self, task_id: str, on_started: Optional[Callable[[], None]] = None) -> "Future[GenerationResult]":
        """A future for `task_id`'s result; `on_started` runs once when a worker picks it up."""
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is None:
                watch = self._watches[task_id] = _Watch()
            if on_started:
                watch.on_started.append(on_started)
        self._check(task_id)  # the result may already be there (a joined or finished task)
        return watch.future

    def unwatch(self, task_id: str) -> None:
        with self._lock:
            self._watches.pop(task_id, None)

    def queue_length(self) -> int:
        return int(self.redis.llen(self.config.queue))

    def close(self) -> None:
        self._stop.set()

    # -- result delivery -------------------------------------------------------------------------

    def _deliver(self, task_id: str, raw: Optional[bytes]) -> None:
        if raw is None:
            return
        try:
            meta = json.loads(raw)
            state = meta.get("status")
        except (ValueError, AttributeError):
            state, meta = STATE_FAILURE, {"result": {"exc_message": "unreadable result in the backend"}}
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is None:
                return
            if state == STATE_STARTED:
                callbacks, watch.on_started = watch.on_started, []
            elif state in (STATE_SUCCESS, STATE_FAILURE, "REVOKED"):
                self._watches.pop(task_id, None)
                callbacks = []
            else:
                return
        for callback in callbacks:
            callback()
        if state == STATE_STARTED:
            return
        if state == STATE_SUCCESS:
            result = GenerationResult.from_json(meta.get("result"))
        else:
            result = GenerationResult.failure(E_INTERNAL, f"the worker failed: {_failure_text(meta)}")
        if not watch.future.done():
            watch.future.set_result(result)

    def _check(self, task_id: str) -> None:
        try:
            self._deliver(task_id, self.redis.get(self._result_prefix + task_id))
        except redis.RedisError as exc:
            log.debug("result check for %s failed: %s", task_id, exc)

    def _listen(self) -> None:
        """Pattern-subscribe to sdgate result channels; reconnect with backoff when Redis drops."""
        pattern = f"{self._result_prefix}{TASK_ID_PREFIX}*"
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(pattern)
                backoff = 0.1
                self._poll_once()  # anything published while we were disconnected
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "pmessage":
                        channel = message["channel"].decode()
                        self._deliver(channel[len(self._result_prefix):], message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("result listener lost Redis (%s); reconnecting in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass

    def _poll_once(self) -> None:
        with self._lock:
            pending: List[str] = list(self._watches)
        if not pending:
            return
        raws = self.redis.mget([self._result_prefix + task_id for task_id in pending])
        for task_id, raw in zip(pending, raws):
            self._deliver(task_id, raw)

    def _poll_pending(self) -> None:
        """Safety net for a missed publish: look up every pending result every second."""
        while not self._stop.wait(1.0):
            try:
                self._poll_once()
            except redis.RedisError:
                pass


class _Watch:
    def __init__(self) -> None:
        self.future: "Future[GenerationResult]" = Future()
        self.on_started: List[Callable[[], None]] = []


def _failure_text(meta: Dict[str, Any]) -> str:
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', 'error')}: {result.get('exc_message', '')}"
    return str(result)[:300]
