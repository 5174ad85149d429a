"""The front service: cache lookup, single-flight, admission and deadlines for one replica.

Both the socket server and the HTTP ingress call `FrontService.generate`; it never imports
torch. A hit is answered from the store in-process; a miss becomes one Celery task per key
across the whole cluster: identical misses in this replica share a `Flight`, and replicas
share a claim in Redis that names the task everyone waits on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import redis

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from celery_bridge.contract import GenerationResult
from celery_bridge.producer import GenerationProducer, new_task_id
from serve_app import stats
from serve_app.catalogue import GatewayCatalogue
from serve_app.config import GatewayConfig
from serve_app.store import ImageStore

log = logging.getLogger(__name__)
CLAIM_PREFIX = "sdgate:claim:"
StatusCallback = Callable[[str], None]

# Deletes the claim only if it still names our task, so a late finisher never frees a newer claim.
_RELEASE_CLAIM = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass
class Answer:
    """An image for the client: metadata, PNG bytes, and whether it came from the cache."""

    meta: Dict[str, Any]
    png: bytes
    cached: bool


class Flight:
    """One generation in this replica that every identical request waits on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = False
        self._outcome: Optional[object] = None  # Answer or ProtocolError

    def mark_started(self) -> None:
        with self._cond:
            self._started = True
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def finish(self, outcome: object) -> None:
        with self._cond:
            self._outcome = outcome
            self._cond.notify_all()

    def wait(self, deadline: float, on_status: Optional[StatusCallback]) -> Answer:
        """A joiner's wait: the leader's outcome, or `timeout` at the deadline."""
        self.wait_until(lambda: self._outcome is not None, deadline, on_status)
        if isinstance(self._outcome, ProtocolError):
            raise self._outcome
        return self._outcome  # type: ignore[return-value]

    def wait_until(self, done: Callable[[], bool], deadline: float, on_status: Optional[StatusCallback]) -> None:
        """Block until done() or the deadline, reporting `generating` once when a worker starts.

        Statuses are sent from the waiting thread itself, so a slow client only slows itself.
        """
        reported = False
        while True:
            with self._cond:
                if not done() and not (self._started and not reported):
                    self._cond.wait(max(0.0, min(deadline - time.monotonic(), 1.0)))
                started = self._started
            if done():
                return
            if started and not reported:
                reported = True
                if on_status:
                    on_status(protocol.STATUS_GENERATING)
            if time.monotonic() >= deadline:
                raise ProtocolError(protocol.E_TIMEOUT, "no image within the request deadline; try again later")


class FrontService:
    """Answers generation requests for one gateway replica."""

    def __init__(self, config: GatewayConfig, producer: GenerationProducer, store: ImageStore,
                 counters: stats.Counters, on_generated: Optional[Callable[[float, float], None]] = None,
                 catalogue: Optional[GatewayCatalogue] = None):
        """on_generated(pipeline_ms, miss_ms) is called after each generation this replica led;
        `catalogue` defaults to configs/models.yaml ($SDGATE_MODELS_FILE)."""
        self.config = config
        self.on_generated = on_generated
        self.producer = producer
        self.store = store
        self.counters = counters
        self.catalogue = catalogue or GatewayCatalogue.load(producer.redis, counters)
        self._redis: redis.Redis = producer.redis
        self._release_claim = self._redis.register_script(_RELEASE_CLAIM)
        self._flights: Dict[str, Flight] = {}
        self._flights_lock = threading.Lock()

    @property
    def pending_misses(self) -> int:
        return len(self._flights)

    def generate(self, request: GenerationRequest, on_status: Optional[StatusCallback] = None) -> Answer:
        """The image for `request`, from the cache or a worker; raises ProtocolError with a code."""
        try:
            answer = self._generate(request, _never_raises(on_status))
        except ProtocolError as exc:
            self.counters.error(exc.code)
            raise
        return answer

    def _generate(self, request: GenerationRequest, on_status: Optional[StatusCallback]) -> Answer:
        # 1. Fill the model and its defaults from the catalogue, then normalise and key.
        try:
            normalized = self.catalogue.resolve(request).normalized()
        except InvalidRequest as exc:
            raise ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field) from None
        key = normalized.cache_key()
        deadline = time.monotonic() + self.config.request_timeout_s

        # 2. Cache hit: straight from the store.
        cached = self._cache_get(key)
        if cached is not None:
            self.counters.incr(stats.CACHE_HITS)
            if on_status:
                on_status(protocol.STATUS_CACHED)
            return cached
        self.counters.incr(stats.CACHE_MISSES)
        self.catalogue.check_served(normalized.model)  # fail fast: nobody would render it

        # 3. Miss: join this replica's flight for the key, or lead a new one.
        with self._flights_lock:
            flight = self._flights.get(key)
            leading = flight is None
            if leading:
                if len(self._flights) >= self.config.max_pending_misses:
                    raise ProtocolError(
                        protocol.E_BUSY,
                        f"{len(self._flights)} generations are already pending here (limit "
                        f"{self.config.max_pending_misses}); retry in a few seconds",
                    )
                flight = self._flights[key] = Flight()
        if not leading:
            self.counters.incr(stats.SINGLEFLIGHT_JOINS)
            if on_status:
                on_status(protocol.STATUS_JOINED)
            return flight.wait(deadline, on_status)
        try:
            outcome: object = self._lead(normalized, key, flight, deadline, on_status)
        except ProtocolError as exc:
            outcome = exc
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
        flight.finish(outcome)
        if isinstance(outcome, ProtocolError):
            raise outcome
        return outcome  # type: ignore[return-value]

    def _lead(self, request: GenerationRequest, key: str, flight: Flight, deadline: float,
              on_status: Optional[StatusCallback]) -> Answer:
        started = time.monotonic()
        # 1. Claim the key cluster-wide, or learn which task already renders it.
        try:
            task_id, claimed = self._claim(key)
        except redis.RedisError as exc:
            raise ProtocolError(protocol.E_UNAVAILABLE, f"the task queue (Redis) is unreachable: {exc}; "
                                "retry in a few seconds") from None
        if not claimed:
            self.counters.incr(stats.SINGLEFLIGHT_JOINS)

        # 2. Watch before submitting so the result cannot slip past.
        future = self.producer.watch(task_id, on_started=flight.mark_started)
        future.add_done_callback(lambda _: flight.poke())
        if claimed:
            try:
                self.producer.submit(request, task_id)
            except Exception as exc:  # noqa: BLE001 - kombu raises several families on a dead broker
                self.producer.unwatch(task_id)
                self._release(key, task_id)
                raise ProtocolError(protocol.E_UNAVAILABLE, f"could not queue the generation: {exc}; "
                                    "retry in a few seconds") from None
            self.counters.incr(stats.GENERATIONS)
        if on_status:
            on_status(protocol.STATUS_QUEUED if claimed else protocol.STATUS_JOINED)

        # 3. Wait, bounded by the request deadline.
        try:
            flight.wait_until(future.done, deadline, on_status)
        except ProtocolError:
            self.producer.unwatch(task_id)  # the task may still finish; its result stays claimable
            raise
        result = future.result()
        if not result.ok:
            self._release(key, task_id)
            raise ProtocolError(result.error_code or protocol.E_INTERNAL, result.error_message, result.error_field)

        # 4. Store, then let the next miss of this key start afresh.
        answer = self._store(key, result)
        self._release(key, task_id)
        if self.on_generated:
            self.on_generated(result.pipeline_ms, (time.monotonic() - started) * 1000)
        return answer

    def _claim(self, key: str):
        claim_key = CLAIM_PREFIX + key
        ttl = max(1, int(self.config.request_timeout_s))
        for _ in range(5):
            task_id = new_task_id(key)
            if self._redis.set(claim_key, task_id, nx=True, ex=ttl):
                return task_id, True
            existing = self._redis.get(claim_key)
            if existing is not None:
                return existing.decode(), False
        raise redis.RedisError("the claim for this key kept changing hands")

    def _release(self, key: str, task_id: str) -> None:
        try:
            self._release_claim(keys=[CLAIM_PREFIX + key], args=[task_id])
        except redis.RedisError as exc:
            log.warning("could not release claim %s (%s); it expires by itself", key[:12], exc)

    def _cache_get(self, key: str) -> Optional[Answer]:
        try:
            cached = self.store.get(key)
        except Exception:  # noqa: BLE001 - a broken cache degrades to a miss, never to an error
            log.exception("cache read failed for %s; treating as a miss", key[:12])
            return None
        return Answer(cached.meta, cached.png, cached=True) if cached is not None else None

    def _store(self, key: str, result: GenerationResult) -> Answer:
        png, meta = result.png, result.meta()
        if result.key != key:
            raise ProtocolError(protocol.E_INTERNAL, f"worker answered key {result.key[:12]} for {key[:12]}")
        try:
            self.store.put(key, png, meta)
        except Exception:  # noqa: BLE001 - the client still gets its image
            log.exception("cache write failed for %s", key[:12])
        return Answer(meta, png, cached=False)


def _never_raises(on_status: Optional[StatusCallback]) -> Optional[StatusCallback]:
    """A status callback that a vanished client cannot break: the generation goes on and is cached."""
    if on_status is None:
        return None
    broken = []

    def safe(state: str) -> None:
        if broken:
            return
        try:
            on_status(state)
        except Exception as exc:  # noqa: BLE001 - usually the client closed its socket
            broken.append(exc)

    return safe
