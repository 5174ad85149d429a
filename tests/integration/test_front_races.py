"""The front service's races, forced with its hooks: real Redis, the real producer (real Celery
`send_task` into kombu's Redis queue), a real SQLite cache. The test plays the worker by
publishing task states exactly as Celery's Redis result backend does, so it decides when a
task starts and finishes, and each bad interleaving happens every run."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from typing import List

import pytest
import redis

from celery_bridge import redis_keys
from celery_bridge.config import CeleryConfig
from celery_bridge.contract import GenerationResult
from celery_bridge.models import load_catalogue, queue_for
from celery_bridge.presence import Heartbeat
from celery_bridge.producer import GenerationProducer
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from serve_app import stats
from serve_app.config import GatewayConfig
from serve_app.front import FrontService
from serve_app.store import SQLiteImageStore
from tests.resolve import resolved
from tests.integration import harness

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n" + b"test image"
RESULT_PREFIX = "celery-task-meta-"
wait_for = functools.partial(harness.wait_for, interval=0.02)


class Cluster:
    """Gateway replicas (FrontServices) sharing one Redis, one queue and one cache file."""

    def __init__(self, redis_server, tmp_path, **gateway):
        self.queue = f"q-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url(redis_server.url)
        self.celery = CeleryConfig(redis_url=redis_server.url, queue=self.queue)
        self.config = GatewayConfig(**dict({"request_timeout_s": 20, "claim_lease_s": 0.6}, **gateway))
        self.cache = tmp_path / "images.db"
        self.fronts: List[FrontService] = []
        self.model = load_catalogue().default
        self.worker = Heartbeat(self.redis, self.model, "the test, playing the worker").start()

    def replica(self) -> FrontService:
        producer = GenerationProducer(self.celery)
        front = FrontService(self.config, producer, SQLiteImageStore(self.cache, 1 << 26),
                             stats.Counters(producer.redis, 0.1))
        self.fronts.append(front)
        return front

    def queued(self) -> List[str]:
        """Task ids in the queue list, oldest first."""
        queue = queue_for(self.queue, self.model)
        return [json.loads(raw)["headers"]["id"] for raw in reversed(self.redis.lrange(queue, 0, -1))]

    def publish(self, task_id: str, status: str, result=None) -> None:
        """What Celery's Redis backend does for a task state: store it and publish it."""
        body = json.dumps({"status": status, "result": result, "task_id": task_id})
        self.redis.set(RESULT_PREFIX + task_id, body)
        self.redis.publish(RESULT_PREFIX + task_id, body)

    def render(self, task_id: str, request: GenerationRequest) -> None:
        self.publish(task_id, "STARTED", {"pid": 1})
        result = GenerationResult.success(request.normalized(), PNG, 1.0, "worker@secret-host")
        self.publish(task_id, "SUCCESS", result.to_json())

    def close(self) -> None:
        self.worker.stop()
        for front in self.fronts:
            front.close()
            front.producer.close()
            front.counters.close()


@pytest.fixture
def cluster(redis_server, tmp_path):
    cluster = Cluster(redis_server, tmp_path)
    yield cluster
    cluster.close()


def in_loop(coroutine_factory):
    """Run coroutines on a fresh loop in a thread; returns (thread, outcome dict)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = asyncio.run(coroutine_factory())
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_the_claim_leases_its_waiters_and_the_leader_leases_one_that_joined_during_it(cluster):
    """The claim's one round trip leases the waiters known when it is sent on the task it names,
    and marks that task watched (ours); a waiter that joins while the claim is in flight sees no
    task id yet, so leases nothing itself: the leader leases it right after, before the hook that
    follows the claim, and both get the image."""
    front = cluster.replica()
    request = resolved(GenerationRequest(f"claim leases {uuid.uuid4().hex[:6]}", seed=6))
    real_claim, box = front.claims._claim, {}

    def claim_while_a_joiner_arrives(*args, **kwargs):
        box["late"] = asyncio.run_coroutine_threadsafe(front.generate_async(request, waiter_id="w-late"), box["loop"])
        flight = front._flights[request.cache_key()]
        wait_for(lambda: len(flight.waiter_ids()) == 2, what="the joiner in the flight")
        assert flight.task_id is None
        return real_claim(*args, **kwargs)

    def after_claim(key, task_id, claimed):
        seconds, micros = cluster.redis.time()
        live = cluster.redis.zrangebyscore(redis_keys.WAITERS + task_id, seconds * 1000 + micros // 1000, "+inf")
        box.update(claimed=claimed, live=sorted(m.decode() for m in live),
                   watched=cluster.redis.exists(redis_keys.WATCHED + task_id))

    front.claims._claim, front.hooks.after_claim = claim_while_a_joiner_arrives, after_claim

    async def lead_then_the_joiner():  # both awaited: the loop's end would cancel a joiner still pending
        box["loop"] = asyncio.get_running_loop()
        lead = await front.generate_async(request, waiter_id="w-lead")
        return lead, await asyncio.wrap_future(box["late"])

    thread, outcome = in_loop(lead_then_the_joiner)
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="the task queued")
    assert (box["claimed"], box["live"], box["watched"]) == (True, ["w-late", "w-lead"], 1)
    cluster.render(task_id, request)
    thread.join(10)
    assert [answer.png for answer in outcome["value"]] == [PNG, PNG]


def test_a_waiter_that_leaves_during_the_claim_holds_no_lease_after_it(cluster):
    """The claim leased the waiter it knew; that waiter went away while the claim was in flight (it
    saw no task id, so dropped nothing itself): the leader drops its lease, so the task that
    nobody waits for is watched with no live waiter, which a worker skips."""
    front = cluster.replica()
    request = resolved(GenerationRequest(f"claim leaver {uuid.uuid4().hex[:6]}", seed=6))
    real_claim, box = front.claims._claim, {}

    def claim_while_the_waiter_leaves(*args, **kwargs):
        flight = front._flights[request.cache_key()]
        box["loop"].call_soon_threadsafe(box["waiter"].cancel)
        wait_for(lambda: not flight.waiter_ids(), what="the waiter gone from the flight")
        reply = real_claim(*args, **kwargs)
        box["task_id"] = reply[1].decode()
        return reply

    front.claims._claim = claim_while_the_waiter_leaves

    async def leave():
        box["loop"] = asyncio.get_running_loop()
        box["waiter"] = asyncio.ensure_future(front.generate_async(request, waiter_id="w-gone"))
        try:
            await box["waiter"]
        except asyncio.CancelledError:
            return "left"

    thread, outcome = in_loop(leave)
    thread.join(10)
    assert outcome["value"] == "left"
    task_id = wait_for(lambda: box.get("task_id"), what="the claim made")

    # Dropped, not lapsed: a lapsed lease stays in the set until something removes it.
    wait_for(lambda: cluster.redis.zscore(redis_keys.WAITERS + task_id, "w-gone") is None, what="its lease dropped")
    assert cluster.redis.exists(redis_keys.WATCHED + task_id)


def test_a_miss_that_wins_a_just_released_claim_reads_the_cache_again(cluster):
    """Item 3: B misses the cache, A stores the image and frees the claim, then B wins the claim.
    B must find the image in the cache instead of rendering it a second time."""
    front = cluster.replica()
    request = resolved(GenerationRequest("double render race", seed=1))
    misses, b_may_go, submitted = [], threading.Event(), []
    front.hooks.after_submit = lambda key, task_id: submitted.append(task_id)

    def after_cache_miss(key):
        misses.append(key)
        if len(misses) == 2:  # B: hold it between its cache read and its flight/claim
            assert b_may_go.wait(20)

    front.hooks.after_cache_miss = after_cache_miss
    a_thread, a = in_loop(lambda: front.generate_async(request))
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="A's task queued")
    b_thread, b = in_loop(lambda: front.generate_async(request))
    wait_for(lambda: len(misses) == 2, what="B missed the cache")
    cluster.render(task_id, request)
    a_thread.join(10)
    assert a["value"].png == PNG and not a["value"].cached
    # A's waiters are answered before its claim is freed (FrontService._finish): B goes once it is.
    wait_for(lambda: cluster.redis.get(redis_keys.CLAIM + request.cache_key()) is None, what="A released its claim")
    b_may_go.set()
    b_thread.join(10)
    assert not b_thread.is_alive(), "B rendered again and waits for a second task"
    assert b["value"].png == PNG and b["value"].cached, b
    assert submitted == [task_id], "one render for the key"


def hold(owner, method: str):
    """Make `owner.method` wait until the returned event is set; returns (the calls' arguments, event)."""
    calls, go, original = [], threading.Event(), getattr(owner, method)

    def held(*args):
        calls.append(args)
        assert go.wait(20)
        return original(*args)

    setattr(owner, method, held)
    return calls, go


def rendered_while_held(cluster, front, request, held: str):
    """Render `request` through `front` (the test plays the worker); (task id, its Answer), which
    must arrive while `held` is still held."""
    thread, outcome = in_loop(lambda: front.generate_async(request))
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[-1], what="the task queued")
    cluster.render(task_id, request)
    thread.join(10)
    assert not thread.is_alive(), f"the image waited for {held}"
    return task_id, outcome["value"]


def test_an_image_is_answered_before_the_claim_is_freed_and_a_failure_only_after(cluster):
    """The claim release is one Redis round trip that the image need not wait for: the image is
    cached by then, so a retry reads it there. A failure frees the claim first, so a retry claims
    anew and renders rather than joining the failed task."""
    front = cluster.replica()
    releasing, release_may_go = hold(front.claims, "release")
    request = resolved(GenerationRequest("answered before the release", seed=5))
    task_id, answer = rendered_while_held(cluster, front, request, "the claim release")
    assert answer.png == PNG
    assert wait_for(lambda: [task for _, task in releasing], what="the release begun") == [task_id]
    assert cluster.redis.get(redis_keys.CLAIM + request.cache_key()) == task_id.encode(), "released after"
    release_may_go.set()
    wait_for(lambda: cluster.redis.get(redis_keys.CLAIM + request.cache_key()) is None, what="the claim released")

    failing = resolved(GenerationRequest("a failure frees its claim first", seed=6))
    release_may_go.clear()
    thread, outcome = in_loop(lambda: front.generate_async(failing))
    flight = wait_for(lambda: front._flights.get(failing.cache_key()), what="the second flight")
    task_id = wait_for(lambda: flight.task_id, what="the second task claimed")  # waits for a worker slot
    cluster.publish(task_id, "FAILURE", {"exc_type": "RuntimeError", "exc_message": "out of memory"})
    wait_for(lambda: len(releasing) == 2, what="the failed task's release started")
    assert not flight.future.done(), "a failure was answered before its claim was freed"
    release_may_go.set()
    thread.join(10)
    assert outcome["error"].code == protocol.E_INTERNAL


def test_a_new_tasks_watch_reads_nothing_before_it_is_sent(cluster):
    """A task id this replica just claimed has nothing stored under it: watching it costs no
    look-up on the miss's path (a joined task's watch still reads what is there)."""
    producer = cluster.replica().producer
    read, get = [], producer.redis.get
    producer.redis.get = lambda name: read.append(name) or get(name)
    unsent, joined = "sdgate-unsent-" + uuid.uuid4().hex, "sdgate-joined-" + uuid.uuid4().hex
    future = producer.watch(unsent, unsent=True)
    cluster.publish(joined, "SUCCESS", GenerationResult.success(
        resolved(GenerationRequest("joined late", seed=7)).normalized(), PNG, 1.0, "w").to_json())
    assert producer.watch(joined).result(5).png == PNG
    assert RESULT_PREFIX + joined in read and RESULT_PREFIX + unsent not in read
    assert not future.done()


def test_an_unexpected_error_in_the_leader_finishes_every_joiner_and_frees_the_claim(cluster):
    """Item 4: a bug on the leader's path must answer the joiners at once, not at their deadline."""
    front = cluster.replica()
    request = resolved(GenerationRequest("leader blows up", seed=2))
    go = threading.Event()

    def after_claim(key, task_id, claimed):
        assert go.wait(20)
        raise RuntimeError("a bug between the claim and the submit")

    front.hooks.after_claim = after_claim

    async def five():
        return await asyncio.gather(*(front.generate_async(request) for _ in range(5)), return_exceptions=True)

    thread, outcome = in_loop(five)
    wait_for(lambda: front.admission.waiting == 5, what="five waiters")
    started = time.monotonic()
    go.set()
    thread.join(10)
    assert time.monotonic() - started < 5, "joiners waited for their deadline"
    assert [getattr(e, "code", e) for e in outcome["value"]] == [protocol.E_INTERNAL] * 5
    assert all("a bug" not in e.message for e in outcome["value"]), "exception texts stay in the log"
    assert cluster.redis.get(redis_keys.CLAIM + request.cache_key()) is None
    assert front.pending_misses == 0 and front.admission.waiting == 0


def test_a_waiter_that_times_out_never_cancels_the_flight(redis_server, tmp_path):
    cluster = Cluster(redis_server, tmp_path, request_timeout_s=0.5)
    try:
        front = cluster.replica()
        request = resolved(GenerationRequest("impatient client", seed=3))
        thread, outcome = in_loop(lambda: front.generate_async(request))
        task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="task queued")
        thread.join(10)
        assert outcome["error"].code == protocol.E_TIMEOUT
        assert front.pending_misses == 1, "the flight outlives its waiter"
        assert cluster.redis.get(redis_keys.CLAIM + request.cache_key()) == task_id.encode(), "claim kept alive"
        time.sleep(cluster.config.claim_lease_s * 2)  # longer than the lease: it must have been renewed
        assert cluster.redis.get(redis_keys.CLAIM + request.cache_key()) == task_id.encode()
        cluster.render(task_id, request)
        wait_for(lambda: front.pending_misses == 0, what="flight finished")
        thread, outcome = in_loop(lambda: front.generate_async(request))
        thread.join(10)
        assert outcome["value"].cached, "the retry is a hit"
    finally:
        cluster.close()


@pytest.mark.parametrize("dies", ["after_claim", "after_submit"])
def test_joiners_on_another_replica_take_over_a_dead_claimers_task(cluster, dies):
    """Item 5: replica A claims, then dies (stops renewing) before or after queueing the task.
    B's joiners take over the lapsed claim with the same task id, queue it only if it never was,
    and are answered."""
    a, b = cluster.replica(), cluster.replica()
    request = resolved(GenerationRequest(f"claimer dies {dies}", seed=4))
    dead = threading.Event()

    def die(*_):
        a.close()  # its keeper stops: nobody renews the lease any more
        dead.set()
        threading.Event().wait(60)  # and it never goes on

    setattr(a.hooks, dies, die)
    in_loop(lambda: a.generate_async(request))
    assert dead.wait(10)
    task_ids = cluster.queued()
    assert len(task_ids) == (1 if dies == "after_submit" else 0)
    async def three():
        return await asyncio.gather(*(b.generate_async(request) for _ in range(3)))

    b_thread, b_out = in_loop(three)
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="the task queued (once)")
    assert len(cluster.queued()) == 1, "the task is queued once"
    assert wait_for(lambda: cluster.redis.get(redis_keys.CLAIM + request.cache_key()), what="claim") == task_id.encode()
    cluster.render(task_id, request)
    b_thread.join(10)
    assert [r.png for r in b_out["value"]] == [PNG] * 3


def test_http_meta_and_internal_errors_hide_hosts_and_exception_texts(cluster):
    front = cluster.replica()
    request = resolved(GenerationRequest("worker fails", seed=5))
    thread, outcome = in_loop(lambda: front.generate_async(request))
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="task queued")
    cluster.publish(task_id, "FAILURE", {"exc_type": "RuntimeError", "exc_message": "CUDA oom on gpu-node-7.internal"})
    thread.join(10)
    error = outcome["error"]
    assert isinstance(error, ProtocolError) and error.code == protocol.E_INTERNAL
    assert "gpu-node-7" not in error.message and task_id in error.message


def test_a_failing_queue_position_never_skips_a_lease_renewal(cluster, monkeypatch):
    """Queue positions are cosmetic; waiter leases and claims are what correctness rests on. A
    positions step that raises (the worker count read failing) once skipped every renewal."""
    front = cluster.replica()
    request = resolved(GenerationRequest("positions fail, leases hold", seed=4))
    thread, outcome = in_loop(lambda: front.generate_async(request, on_event=lambda event: None, waiter_id="w-lease"))
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[0], what="task queued")

    def broken(model):
        raise RuntimeError("the worker count is unreadable")

    monkeypatch.setattr(front.catalogue, "live_count", broken)
    with pytest.raises(RuntimeError):
        front.publish_queue_positions()
    alive_key, waiters_key = redis_keys.CLAIM_ALIVE + request.cache_key(), redis_keys.WAITERS + task_id
    cluster.redis.delete(alive_key)
    cluster.redis.zadd(waiters_key, {"w-lease": 0})  # a lease about to lapse
    front.keep_claims_once()
    assert cluster.redis.zscore(waiters_key, "w-lease") > 0, "the waiter's lease was renewed"
    assert cluster.redis.get(alive_key) == task_id.encode(), "the claim's heartbeat was renewed"
    cluster.render(task_id, request)
    thread.join(10)
    assert outcome["value"].png == PNG


def test_a_taken_over_task_the_broker_then_loses_is_queued_again_by_its_new_owner(cluster):
    """One recovery path (producer.adopt, then _requeue_lost): A queued the task and died; B took
    the claim over. When the broker then loses the message (a Redis restart between BRPOP and the
    unacked record), B queues it again; before, only the dead A would have."""
    a, b = cluster.replica(), cluster.replica()
    request = resolved(GenerationRequest("adopted then lost", seed=6))
    dead = threading.Event()

    def die(*_):
        a.close()
        a.producer.close()  # its lost-task checks stop too: A is gone
        dead.set()
        threading.Event().wait(60)

    a.hooks.after_submit = die
    in_loop(lambda: a.generate_async(request))
    assert dead.wait(10)
    [task_id] = cluster.queued()
    b_thread, b_out = in_loop(lambda: b.generate_async(request))
    wait_for(lambda: b._flights.get(request.cache_key()) and b._flights[request.cache_key()].owner, 10,
             "B owning the claim")
    cluster.redis.delete(queue_for(cluster.queue, cluster.model))  # the broker lost the message
    assert wait_for(lambda: cluster.queued() == [task_id], 30, "the same task queued again by B")
    cluster.render(task_id, request)
    b_thread.join(10)
    assert b_out["value"].png == PNG


def test_a_miss_or_a_small_hit_the_store_tells_at_once_skips_the_read_pool(cluster):
    """SQLite tells a miss, or reads a small entry, on the event loop, so neither waits for the
    read pool; an entry over loop_read_max_bytes is read on the pool."""
    front = cluster.replica()
    pooled, submit = [], front._reads.submit
    front._reads.submit = lambda fn, *args: pooled.append(getattr(fn, "__name__", repr(fn))) or submit(fn, *args)
    request = resolved(GenerationRequest(f"no hop for a miss {uuid.uuid4().hex[:6]}", seed=3))
    thread, outcome = in_loop(lambda: front.generate_async(request))
    task_id = wait_for(lambda: cluster.queued() and cluster.queued()[-1], what="the task queued")
    cluster.render(task_id, request)
    thread.join(10)
    assert outcome["value"].png == PNG and not outcome["value"].cached
    for loop_read_max_bytes, on_the_pool in ((1 << 16, False), (0, True)):
        front.loop_read_max_bytes = loop_read_max_bytes
        thread, outcome = in_loop(lambda: front.generate_async(request))
        thread.join(10)
        assert outcome["value"].png == PNG and outcome["value"].cached
        assert ("_lookup" in pooled) is on_the_pool, (loop_read_max_bytes, pooled)
