"""Which workers serve which model right now: a heartbeat per worker in one sorted set per model.

Each worker adds itself to `sdgate:workers:<model>` with an expiry score every PERIOD_S; the
gateway counts members whose expiry is still ahead. Both sides read the time from Redis, so
clocks of different machines never matter, and counting is one ZCOUNT, not a scan or a Celery
broadcast.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List

import redis

from celery_bridge import redis_keys
from celery_bridge.models import model_counter

log = logging.getLogger(__name__)
PERIOD_S = 2.0
TTL_S = 6.0  # three missed heartbeats and a worker no longer counts

# KEYS[1] set, KEYS[2] slots hash; ARGV: member, ttl, slots. Drops expired members on the way.
_BEAT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 10))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[2]) * 10))
return 1
"""
_LIVE = """
local now = tonumber(redis.call('TIME')[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


def presence_key(model: str) -> str:
    return f"{redis_keys.PRESENCE}{model}"


def batching_modes(client: redis.Redis, model: str) -> List[str]:
    """The batching modes of `model`'s live workers (solo, window, continuous), sorted, once each."""
    live = set(live_workers(client, model))
    modes = client.hgetall(redis_keys.WORKER_BATCHING + model)
    return sorted({mode.decode() for worker, mode in modes.items() if worker.decode() in live})


def live_workers(client: redis.Redis, model: str) -> List[str]:
    """Names of the workers whose heartbeat for `model` has not expired."""
    return [m.decode() if isinstance(m, bytes) else m for m in client.eval(_LIVE, 1, presence_key(model))]


class Heartbeat:
    """Announces one worker of one model until stopped (a daemon thread)."""

    def __init__(self, client: redis.Redis, model: str, worker: str, period_s: float = PERIOD_S,
                 ttl_s: float = TTL_S, slots: int = 1, batching: str = "solo"):
        """`slots`: tasks the worker takes at once (its batch size); fair share fills that many.
        `batching`: its mode (solo, window or continuous), listed by /v1/models."""
        self.client, self.model, self.worker, self.slots = client, model, worker, max(1, int(slots))
        self.batching = batching
        self.period_s, self.ttl_s = period_s, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdgate-presence", daemon=True)

    def start(self) -> "Heartbeat":
        try:
            self.client.hset(redis_keys.WORKER_BATCHING + self.model, self.worker, self.batching)
        except redis.RedisError as exc:
            log.debug("could not announce the batching mode: %s", exc)
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            self.client.eval(_BEAT, 2, presence_key(self.model), redis_keys.WORKER_SLOTS + self.model,
                             self.worker, self.ttl_s, self.slots)
        except redis.RedisError as exc:  # the broker is down: nobody can route to us anyway
            log.debug("presence heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Leave at once, so the gateway stops counting this worker before its heartbeat expires."""
        self._stop.set()
        try:
            self.client.zrem(presence_key(self.model), self.worker)
            self.client.hdel(redis_keys.WORKER_SLOTS + self.model, self.worker)
            self.client.hdel(redis_keys.WORKER_BATCHING + self.model, self.worker)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.beat()


RENDERED = "rendered"


def count_rendered(pipe: Any, model: str) -> None:
    """Queue on `pipe` one more image rendered by a worker of `model` (per-model figures in `sdgate stats`)."""
    pipe.hincrby(redis_keys.STATS, model_counter(model, RENDERED), 1)
