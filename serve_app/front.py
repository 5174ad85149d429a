"""The front service: a request's steps in one replica, from the cache to a worker and back.

It keeps the steps, readable top to bottom in `_generate` and `_start`; the parts they use have
their own modules: `Flight` (serve_app/flight.py: one generation here, its waiters and outcome),
`ClusterClaims` (claims.py: one task per key across replicas, renewals, take-overs) and
`WaiterRelay` (waiters.py: waiter leases in Redis, progress, queue positions on their own timer).

Both the socket server and the HTTP ingress await `FrontService.generate_async` on their event
loops; it never imports torch. A hit is read from the store: a small SQLite entry right on the
loop (store.read_now: no lock waits), any other on a small pool. A miss becomes one
Celery task per key across the whole cluster: identical misses in this replica share a `Flight`,
and replicas share a claim in Redis (a short lease, renewed while its flight lives) that names
the task everyone waits on.

Waiting costs no thread: a waiter is a coroutine awaiting the flight's future. The leader's work
(claim, re-check the cache, watch, submit) runs briefly on a bounded pool, and the flight is
finished from the producer future's done-callback (store the image, release the claim), on every
exit path. A waiter that times out or goes away never cancels the flight: the image is still
rendered and cached, and the claim stays alive so a retry joins instead of rendering again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import redis

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from celery_bridge.contract import GenerationResult
from celery_bridge.producer import GenerationProducer
from serve_app import stats
from serve_app.admission import Admission
from serve_app.catalogue import GatewayCatalogue
from serve_app.claims import ClusterClaims
from serve_app.config import GatewayConfig
from serve_app.fair_pool import FairPool
from serve_app.init_images import check_images, fitted_size
from serve_app.flight import Answer, EventCallback, Flight, StatusCallback
from serve_app.store import ImageStore
from serve_app.tenants import ANONYMOUS, Tenant, TenantWaiting
from serve_app.waiters import WaiterRelay
from celery_bridge import redis_keys
from celery_bridge.fair_share import IMAGES_SERVED, tenant_counter

__all__ = ["Answer", "FrontService", "Hooks"]
log = logging.getLogger(__name__)
GALLERY_KEPT = 1000  # newest entries of a tenant's own gallery
LOOP_READ_MAX_BYTES = 64 * 1024  # a cache entry this small is read and checked on the event loop (tens of us)


class Hooks:
    """Test seams at the race windows: None unless a test sets one; each is called on a pool thread
    and may block."""

    after_cache_miss: Optional[Callable[[str], None]] = None
    """(key): a request read the cache and found nothing; it has not joined or led a flight yet."""
    after_claim: Optional[Callable[[str, str, bool], None]] = None
    """(key, task id, claimed): the leader learned the cluster claim (won it, or joined another
    replica's task)."""
    after_submit: Optional[Callable[[str, str], None]] = None
    """(key, task id): the leader queued the task."""


class FrontService:
    """Answers generation requests for one gateway replica."""

    def __init__(self, config: GatewayConfig, producer: GenerationProducer, store: ImageStore,
                 counters: stats.Counters, on_generated: Optional[Callable[[float, float], None]] = None,
                 admission: Optional[Admission] = None, catalogue: Optional[GatewayCatalogue] = None):
        """on_generated(pipeline_ms, miss_ms) is called after each generation this replica led;
        `catalogue` defaults to configs/models.yaml ($SDGATE_MODELS_FILE)."""
        self.config = config
        self.on_generated = on_generated
        self.producer = producer
        self.store = store
        self.counters = counters
        self.admission = admission or Admission(config)
        self.hooks = Hooks()
        self.loop_read_max_bytes = LOOP_READ_MAX_BYTES
        self.catalogue = catalogue or GatewayCatalogue.load(producer.redis, counters)
        self.redis: redis.Redis = producer.redis
        self._flights: Dict[str, Flight] = {}
        self._flights_lock = threading.Lock()
        self._waiting: Dict[str, Tuple[Flight, asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = {}
        # Two small pools: cache reads (hits) never queue behind claims, submits and cache writes.
        self._reads = ThreadPoolExecutor(config.front_threads, thread_name_prefix="sdgate-read")
        self._work = ThreadPoolExecutor(config.front_threads, thread_name_prefix="sdgate-work")
        self._leads = FairPool(config.front_threads)  # a new miss's first steps, round robin by tenant
        self.claims = ClusterClaims(self.redis, config)
        self.tenant_waiting = TenantWaiting(self.redis)
        self._counted_waiters: Dict[str, str] = {}  # waiter id -> tenant, for tenants with a max_queued
        self.waiters = WaiterRelay(self.redis, max(3 * config.claim_lease_s, 2.0), self._work, producer.config.queue,
                                   lambda model: self.catalogue.live_count(model), producer.fair)
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_claims, name="sdgate-claims", daemon=True)
        self._keeper.start()
        self.waiters.keep_publishing(self._live_flights, self._stop)
        if config.fair_share:
            producer.start_dispatcher(lambda: self.catalogue.catalogue.names)

    @property
    def pending_misses(self) -> int:
        return len(self._flights)

    def close(self) -> None:
        self._stop.set()
        self.waiters.close()
        self._reads.shutdown(wait=False, cancel_futures=True)
        self._work.shutdown(wait=False, cancel_futures=True)
        self._leads.shutdown()

    async def generate_async(self, request: GenerationRequest, on_status: Optional[StatusCallback] = None,
                             client: str = "?", on_event: Optional[EventCallback] = None,
                             waiter_id: Optional[str] = None, timeout_s: Optional[float] = None,
                             previews: int = 0, tenant: Tenant = ANONYMOUS) -> Answer:
        """The image for `request`, from the cache or a worker; raises ProtocolError with a code.

        Call it on an event loop; `on_status` and `on_event` (progress: state, step, steps,
        queue_position, eta_s, preview) are always called on that loop, and never raise into the
        generation (a vanished client only loses its own statuses). `waiter_id` names this waiter
        for cancel(); `timeout_s` replaces the request deadline; `previews` asks a preview every k steps;
        `tenant`: whose limits, fair share, usage and gallery the request counts in.
        """
        waiter_id = waiter_id or uuid.uuid4().hex
        try:
            answer = await self._generate(request, _never_raises(on_status), client, _never_raises(on_event),
                                          waiter_id, timeout_s, previews, tenant)
        except ProtocolError as exc:
            self.counters.error(exc.code)
            raise
        self.served(tenant, answer)
        return answer

    async def generate_seeds(self, request: GenerationRequest, n: int, **options) -> List[Answer]:
        """n images of `request` with seeds seed, seed+1, ... (its own seed, or the one derived from
        it), as A1111 numbers a batch: each its own cache key, all in flight at once so a batching
        worker can render them together. Raises the first error; the others still finish and are cached."""
        if n == 1:
            return [await self.generate_async(request, **options)]
        seed = (await self.prepare(request)).seed
        variants = [dataclasses.replace(request, seed=(seed + i) % (protocol.MAX_SEED + 1)) for i in range(n)]
        return list(await asyncio.gather(*(self.generate_async(variant, **options) for variant in variants)))

    def served(self, tenant: Tenant, answer: Answer) -> None:
        """Count an image served to `tenant` (hit or miss) and list it in the tenant's gallery."""
        self.counters.incr(tenant_counter(tenant.name, IMAGES_SERVED))
        if not tenant.shared:  # the shared identities see the whole gallery
            self._reads.submit(self._note_in_gallery, tenant, answer)

    def _note_in_gallery(self, tenant: Tenant, answer: Answer) -> None:
        """The tenant's own gallery lists what it asked for (the cache itself is shared)."""
        key = answer.meta.get("key")
        if not key:
            return
        gallery = redis_keys.TENANT_GALLERY + tenant.name
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(gallery, {key: time.time()})
            pipe.zremrangebyrank(gallery, 0, -GALLERY_KEPT - 1)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("could not note %s in %s's gallery: %s", key[:12], tenant.name, exc)

    async def _generate(self, request: GenerationRequest, on_status: Optional[StatusCallback], client: str,
                        on_event: Optional[EventCallback], waiter_id: str, timeout_s: Optional[float],
                        previews: int, tenant: Tenant) -> Answer:
        loop = asyncio.get_running_loop()
        # 1. Check its images, fill the model and its defaults from the catalogue, then normalise and key.
        normalized = await self.prepare(request)
        tenant.check_request(normalized.width, normalized.height, normalized.steps)
        self.catalogue.count_request(normalized.model)
        key = normalized.cache_key()
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = loop.time() + timeout_s

        # 2. Cache hit: straight from the store. What the store can tell at once (a miss, a small
        #    entry: SQLite, on this loop) skips the read pool; the rest is read there.
        told, entry = self.store.read_now(key, self.loop_read_max_bytes)
        if not told:
            cached = await loop.run_in_executor(self._reads, self._lookup, key)
        elif entry is not None:
            cached = Answer(entry.meta, entry.png, cached=True)
        else:
            cached = None
            if self.hooks.after_cache_miss:
                await loop.run_in_executor(self._reads, self.hooks.after_cache_miss, key)
        if cached is not None:
            self.counters.incr(stats.CACHE_HITS)
            if on_status:
                on_status(protocol.STATUS_CACHED)
            return cached
        self.counters.incr(stats.CACHE_MISSES)
        self.catalogue.check_served(normalized.model)  # fail fast: nobody would render it
        if tenant.max_queued:
            await loop.run_in_executor(self._reads, self.tenant_waiting.enter, tenant, waiter_id)
            self._counted_waiters[waiter_id] = tenant.name

        # 3. Miss: count the waiter, then join this replica's flight for the key or lead a new one.
        who = tenant.limit_key(client)
        self.admission.enter_wait(who)
        try:
            threadsafe = _on_loop(loop, on_status)
            flight, leading = self._join_or_lead(key, normalized, threadsafe, tenant)
            listener = _on_loop(loop, on_event)
            cancelled: "asyncio.Future[None]" = loop.create_future()
            self._waiting[waiter_id] = (flight, loop, cancelled)
            self._join_flight(flight, waiter_id, listener)
            if leading:
                flight.previews = previews
                self._leads.submit(tenant.name, self._lead, flight)
            else:
                self.counters.incr(stats.SINGLEFLIGHT_JOINS)
                if on_status:
                    on_status(protocol.STATUS_JOINED)
            if threadsafe:
                flight.on_started(lambda: threadsafe(protocol.STATUS_GENERATING))
            # 4. Wait as a coroutine; shield: our deadline or disconnect must not cancel the flight.
            outcome = asyncio.wrap_future(flight.future)
            left = True  # a waiter that disconnects leaves; one that times out still wants the image
            try:
                done, _ = await asyncio.wait({outcome, cancelled}, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if outcome in done:
                    return outcome.result()
                if cancelled in done:
                    raise ProtocolError(protocol.E_CANCELLED, "cancelled at the client's request")
                left = False
                raise ProtocolError(protocol.E_TIMEOUT, "no image within the request deadline "
                                    f"({timeout_s:.0f} s); it is still being made: retry "
                                    "later and it will come from the cache")
            finally:
                self._leave_flight(flight, waiter_id, listener, left)
        finally:
            self._waiting.pop(waiter_id, None)
            self.admission.leave_wait(who)
            if self._counted_waiters.pop(waiter_id, None) is not None:
                self._reads.submit(self.tenant_waiting.leave, tenant.name, waiter_id)

    async def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """`request` as it is keyed and rendered: its init image and mask checked whole (on the read
        pool), an init image's own size where no size was asked, the model's defaults filled, then
        normalised. Raises ProtocolError `invalid_request` naming the field."""
        try:
            if request.init_image is not None:
                size = await asyncio.get_running_loop().run_in_executor(self._reads, check_images, request)
                if request.width is None and request.height is None:
                    width, height = fitted_size(size, self.catalogue.entry(request.model).limits.max_side)
                    request = dataclasses.replace(request, width=width, height=height)
            return self.catalogue.resolve(request).normalized()
        except InvalidRequest as exc:
            raise ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field) from None

    def _lookup(self, key: str) -> Optional[Answer]:
        cached = self.cached(key)
        if cached is None and self.hooks.after_cache_miss:
            self.hooks.after_cache_miss(key)
        return cached

    def _join_or_lead(self, key: str, request: GenerationRequest, leader_status: Optional[StatusCallback],
                      tenant: Tenant = ANONYMOUS) -> Tuple[Flight, bool]:
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            if len(self._flights) >= self.config.max_pending_misses:
                raise ProtocolError(protocol.E_BUSY, f"{len(self._flights)} generations are already pending here "
                                    f"(limit {self.config.max_pending_misses}); cache hits are still served, "
                                    "retry in a few seconds")
            flight = self._flights[key] = Flight(key, request, leader_status)
            flight.tenant = tenant.name
            return flight, True

    # -- the leader's work, on the work pool --------------------------------------------------------

    def _lead(self, flight: Flight) -> None:
        """Claim, re-check, watch, submit; any failure finishes the flight so no joiner is stranded."""
        try:
            self._start(flight)
        except ProtocolError as exc:
            self._finish(flight, exc)
        except Exception:  # noqa: BLE001 - whatever it was, the joiners get an answer now
            log.exception("starting the generation for %s failed", flight.key[:12])
            self._finish(flight, ProtocolError(protocol.E_INTERNAL, "the gateway failed to start this generation; "
                                               "retry, and tell the operator if it persists"))

    def _start(self, flight: Flight) -> None:
        key = flight.key
        # 1. Claim the key cluster-wide, or learn which task already renders it, and lease the
        #    waiters known now on that task (marked watched if ours), in one round trip.
        leased = flight.waiter_ids()
        try:
            task_id, claimed = self.claims.claim(key, leased, self.waiters.lease_s)
        except redis.RedisError as exc:
            log.warning("claim for %s failed: %s", key[:12], exc)
            raise ProtocolError(protocol.E_UNAVAILABLE, "the task queue (Redis) is unreachable; "
                                "retry in a few seconds") from None
        flight.task_id, flight.owner = task_id, claimed
        # Waiters that came or went during the claim saw no task id: the leader leases or drops them.
        now = set(flight.waiter_ids())
        self.waiters.lease(task_id, sorted(now - set(leased)))
        for gone in set(leased) - now:
            self.waiters.left(task_id, gone)
        if self.hooks.after_claim:
            self.hooks.after_claim(key, task_id, claimed)

        # 2. Whoever stored the image may have released the claim we just won: look again.
        if claimed:
            cached = self.cached(key)
            if cached is not None:
                self._finish(flight, cached)
                return
        else:
            self.counters.incr(stats.SINGLEFLIGHT_JOINS)

        # 3. Watch before submitting so the result cannot slip past; finish from its callback.
        self._watch(flight, unsent=claimed)
        if flight.leader_status:  # before submitting, so it always precedes `generating`
            flight.leader_status(protocol.STATUS_QUEUED if claimed else protocol.STATUS_JOINED)
        if claimed:
            self._submit(flight)

    def _watch(self, flight: Flight, unsent: bool) -> None:
        started = time.monotonic()
        future = self.producer.watch(flight.task_id, on_started=flight.mark_started,
                                     on_progress=lambda event: self.waiters.relay_progress(flight, event),
                                     unsent=unsent)

        def done(result: "Future[GenerationResult]") -> None:
            try:
                self._work.submit(self._complete, flight, result, started)
            except RuntimeError:  # the pool is shut down: finish here rather than strand anyone
                self._complete(flight, result, started)

        future.add_done_callback(done)

    def _submit(self, flight: Flight, adopting: bool = False) -> bool:
        """Queue the flight's task (or, `adopting` a dead replica's claim, only if it is nowhere);
        True when it was queued now. ProtocolError when the broker is unreachable."""
        args = dict(previews=flight.previews, expires_s=self.config.flight_timeout_s,
                    tenant=flight.tenant if self.config.fair_share else None)
        try:
            if adopting:
                queued_now = self.producer.adopt(flight.request, flight.task_id, **args)
            else:
                self.producer.submit(flight.request, flight.task_id, **args)
                queued_now = True
        except Exception as exc:  # noqa: BLE001 - kombu raises several families on a dead broker
            log.warning("could not queue %s: %s", flight.task_id, exc)
            raise ProtocolError(protocol.E_UNAVAILABLE, "could not queue the generation; retry in a few "
                                "seconds") from None
        if queued_now:
            self.counters.incr(stats.GENERATIONS)
            if self.hooks.after_submit:
                self.hooks.after_submit(flight.key, flight.task_id)
        return queued_now

    def _complete(self, flight: Flight, future: "Future[GenerationResult]", started: float) -> None:
        """The task's result arrived: store the image, then finish the flight (always), and only then
        report the generation's times (on_generated: Ray metrics), off its waiters' path."""
        outcome: object = ProtocolError(protocol.E_INTERNAL, "the gateway failed while storing the image; retry")
        times: Optional[Tuple[float, float]] = None
        try:
            result = future.result()
            if not result.ok:
                outcome = ProtocolError(result.error_code or protocol.E_INTERNAL, _public_message(result, flight),
                                        result.error_field)
            else:
                outcome = self._store(flight.key, result, flight.request)
                times = (result.pipeline_ms, (time.monotonic() - started) * 1000)
        except ProtocolError as exc:
            outcome = exc
        except Exception:  # noqa: BLE001 - logged; the flight is finished below whatever happened
            log.exception("completing the generation for %s failed", flight.key[:12])
        finally:
            self._finish(flight, outcome, task_done=True)
        if times is not None and self.on_generated and flight.owner:
            try:
                self.on_generated(*times)
            except Exception:  # noqa: BLE001 - a metric lost, nothing more
                log.exception("reporting the generation times of %s failed", flight.key[:12])

    def _finish(self, flight: Flight, outcome: object, task_done: bool = False) -> None:
        """Every end of a flight: forget it, stop watching, free the claim, wake every waiter.

        Once the task's result is in, its claim is freed whoever owns it (it names a finished task).
        An image wakes its waiters before the claim is freed (a retry reads it from the cache); a
        failure frees the claim first, so a retry renders anew rather than joining the failed task."""
        answered = isinstance(outcome, Answer)
        try:
            with self._flights_lock:
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]
            if answered:
                flight.finish(outcome)  # its waiters now; a retry finds the image in the cache
            elif flight.task_id:
                self.producer.unwatch(flight.task_id)
            if (flight.owner or task_done) and flight.task_id:
                self.claims.release(flight.key, flight.task_id)
        finally:
            flight.finish(outcome)  # whatever failed above (a no-op once answered)

    # -- waiters and cancel ----------------------------------------------------------------------

    def _join_flight(self, flight: Flight, waiter_id: str, listener: Optional[EventCallback]) -> None:
        task_id = flight.join(waiter_id, listener)
        if task_id:  # the leader registered the waiters it knew; this one came later
            self.waiters.joined(task_id, waiter_id)

    def _leave_flight(self, flight: Flight, waiter_id: str, listener: Optional[EventCallback], left: bool) -> None:
        task_id = flight.leave(waiter_id, listener, left)
        if task_id:
            self.waiters.left(task_id, waiter_id)

    def task_id_of(self, waiter_id: str) -> Optional[str]:
        """The task `waiter_id` waits on here, once its flight knows it (None before, or if it waits elsewhere)."""
        entry = self._waiting.get(waiter_id)
        return entry[0].task_id if entry is not None else None

    def cancel(self, waiter_id: str) -> bool:
        """Cancel one waiter (thread-safe): it gets `cancelled` now; if it was the last waiter of its
        task cluster-wide, the task is cancelled too (skipped if queued, stopped within one step if
        running; nothing is cached). False when no such waiter waits here."""
        entry = self._waiting.get(waiter_id)
        if entry is None:
            return False
        flight, loop, cancelled = entry
        task_id = flight.drop(waiter_id)
        if task_id:
            self.waiters.cancel(task_id, waiter_id)
        loop.call_soon_threadsafe(lambda: cancelled.done() or cancelled.set_result(None))
        return True

    def cancel_task(self, task_id: str, waiter_id: str) -> int:
        """`waiter_id` leaves `task_id`, cancelling it when it was the last live waiter; returns waiters left."""
        return self.waiters.cancel(task_id, waiter_id)

    def publish_queue_positions(self) -> None:
        """Queue positions and ETAs to the waiters of every queued flight (the relay's timer calls it too)."""
        self.waiters.publish_queue_positions(self._live_flights())

    # -- the keeper: timeouts, leases, claims ---------------------------------------------------------

    def _live_flights(self) -> List[Flight]:
        with self._flights_lock:
            return [f for f in self._flights.values() if f.task_id and not f.future.done()]

    def _keep_claims(self) -> None:
        """Renew the leases this replica owns; take over those whose owner stopped renewing (died)."""
        period = max(0.05, min(1.0, self.config.claim_lease_s / 3))
        while not self._stop.wait(period):
            try:
                self.keep_claims_once()
            except redis.RedisError as exc:
                log.warning("renewing claims failed (%s); retrying in %.1f s", exc, period)
            except Exception:  # noqa: BLE001 - the keeper must outlive any one bad round
                log.exception("renewing claims failed")

    def keep_claims_once(self) -> None:
        """One round of the keeper: time out overdue flights, renew waiter leases and owned claims,
        take over the others' lapsed ones. Only Redis errors can stop a round (the keeper retries)."""
        now = time.monotonic()
        live = []
        for flight in self._live_flights():
            if now - flight.born > self.config.flight_timeout_s:
                self._finish(flight, ProtocolError(protocol.E_TIMEOUT, "the generation took longer than "
                                                   f"{self.config.flight_timeout_s:.0f} s; retry later"))
            else:
                live.append(flight)
        if self._counted_waiters:
            self.tenant_waiting.renew(dict(self._counted_waiters))
        if not live:
            return
        pipe = self.redis.pipeline(transaction=False)
        self.waiters.renew(live, pipe)
        pipe.execute()
        for flight in self.claims.renew(live, self.redis.pipeline(transaction=False)):
            if self.claims.take_over(flight):
                self._adopt(flight)

    def _adopt(self, flight: Flight) -> None:
        """We took over a dead claimer's claim: its task is ours to see through (producer.adopt)."""
        try:
            queued_now = self._submit(flight, adopting=True)
        except ProtocolError as exc:
            self._finish(flight, exc)
            return
        log.warning("took over the claim for %s from a replica that stopped renewing it; its task %s %s",
                    flight.key[:12], flight.task_id, "was nowhere, queued it now" if queued_now else
                    "is queued or running, and is re-queued from here if the broker loses it")

    # -- the cache -----------------------------------------------------------------------------------

    def cached(self, key: str) -> Optional[Answer]:
        """The cached image for `key`, or None (a cache that fails to read counts as a miss)."""
        try:
            cached = self.store.get(key)
        except Exception:  # noqa: BLE001 - a broken cache degrades to a miss, never to an error
            log.exception("cache read failed for %s; treating as a miss", key[:12])
            return None
        return Answer(cached.meta, cached.png, cached=True) if cached is not None else None

    def _store(self, key: str, result: GenerationResult, request: GenerationRequest) -> Answer:
        # The normalised request rides along, so the gallery can show what made each image.
        png, meta = result.png, dict(result.meta(), params=request.summary())
        if result.key != key:
            log.error("worker answered key %s for %s", result.key[:12], key[:12])
            raise ProtocolError(protocol.E_INTERNAL, "the worker answered for another request; retry")
        try:
            self.store.put(key, png, meta)
        except Exception:  # noqa: BLE001 - the client still gets its image
            log.exception("cache write failed for %s", key[:12])
        return Answer(meta, png, cached=False)


def _public_message(result: GenerationResult, flight: Flight) -> str:
    """What a client may read about a failed task: the worker's own words for request errors, and
    for internal failures only the task id (exception texts and host names stay in the log)."""
    if result.error_code and result.error_code != protocol.E_INTERNAL:
        return result.error_message
    log.warning("task %s failed: %s", flight.task_id, result.error_message)
    return (f"the worker failed on this image (task {flight.task_id}); retry, and give the operator the task "
            "id if it persists")


def _on_loop(loop: asyncio.AbstractEventLoop, on_status: Optional[StatusCallback]) -> Optional[StatusCallback]:
    """`on_status` callable from any thread: it runs on `loop`, or not at all once the loop closed."""
    if on_status is None:
        return None

    def call(state: str) -> None:
        try:
            loop.call_soon_threadsafe(on_status, state)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return call


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
