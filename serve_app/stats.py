"""Cluster-wide counters: counted in-process, added to one Redis hash in batches.

Counting on the hot path is a dict increment; a background thread adds the batch to
`sdgate:stats` every `flush_s` seconds, so `sdgate stats` lags by at most that.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, Dict, List

import redis

from celery_bridge import redis_keys
from celery_bridge.models import model_counter  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)
CACHE_HITS, CACHE_MISSES = "cache_hits", "cache_misses"
GENERATIONS, SINGLEFLIGHT_JOINS, ERRORS = "generations", "singleflight_joins", "errors"
COUNTER_NAMES = (CACHE_HITS, CACHE_MISSES, GENERATIONS, SINGLEFLIGHT_JOINS, ERRORS)
# Per-model counters live in the same hash as `models:<model>:<counter>` (model names have no ':').
MODEL_REQUESTS = "requests"  # accepted by a gateway for this model (after the catalogue filled it)
MODEL_UNAVAILABLE = "unavailable"  # refused: no worker serves the model
MODEL_RENDERED = "rendered"  # images a worker of this model rendered (counted by the worker)


def split_model_counter(name: str):
    """(model, counter) for a per-model counter name, else None."""
    if not name.startswith(redis_keys.MODEL_COUNTER) or ":" not in name[len(redis_keys.MODEL_COUNTER):]:
        return None
    model, _, counter = name[len(redis_keys.MODEL_COUNTER):].rpartition(":")
    return model, counter


class Counters:
    """Increments kept locally and flushed to Redis; failed flushes are retried, never lost."""

    def __init__(self, client: redis.Redis, flush_s: float = 0.5):
        self._client = client
        self._pending: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.listeners: List[Callable[[str, int], None]] = []  # e.g. Prometheus exporters
        self._thread = threading.Thread(target=self._run, args=(flush_s,), name="sdgate-stats", daemon=True)
        self._thread.start()

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._pending[name] += amount
        for listener in self.listeners:
            listener(name, amount)

    def error(self, code: str) -> None:
        with self._lock:
            self._pending[ERRORS] += 1
            self._pending[f"{ERRORS}.{code}"] += 1
        for listener in self.listeners:
            listener(f"{ERRORS}.{code}", 1)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, Counter()
        if not batch:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for name, amount in batch.items():
                pipe.hincrby(redis_keys.STATS, name, amount)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not flush counters to Redis (%s); keeping them for the next flush", exc)
            with self._lock:
                self._pending.update(batch)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _run(self, flush_s: float) -> None:
        while not self._stop.wait(flush_s):
            self.flush()


def read_stats(client: redis.Redis) -> Dict[str, object]:
    """The cluster-wide totals: the COUNTER_NAMES as ints, `errors_by_code`, and per model
    `models: {model: {requests, unavailable, rendered}}`."""
    raw = {k.decode(): int(v) for k, v in client.hgetall(redis_keys.STATS).items()}
    stats: Dict[str, object] = {name: raw.get(name, 0) for name in COUNTER_NAMES}
    stats["errors_by_code"] = {k.split(".", 1)[1]: v for k, v in sorted(raw.items()) if k.startswith(f"{ERRORS}.")}
    models: Dict[str, Dict[str, int]] = {}
    for name, value in sorted(raw.items()):
        split = split_model_counter(name)
        if split:
            counts = models.setdefault(split[0], {MODEL_REQUESTS: 0, MODEL_UNAVAILABLE: 0, MODEL_RENDERED: 0})
            counts[split[1]] = value
    stats["models"] = models
    return stats
