"""Progress, cancel, no lost work and jobs, end to end: two gateway replicas (FrontServices with
their own producers) over a real redis-server, a real `sdgate worker` (Celery, tiny pipeline)."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from typing import Any, Dict, List

import pytest
import redis
from celery.result import AsyncResult

from celery_bridge import redis_keys
from celery_bridge import progress
from celery_bridge.config import CeleryConfig
from celery_bridge.producer import GenerationProducer, new_task_id
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from serve_app import stats
from serve_app.config import GatewayConfig
from serve_app.front import FrontService
from serve_app.jobs import JobService
from serve_app.store import SQLiteImageStore
from tests.integration.conftest import PlainWorker
from tests.integration import harness
from tests.integration.harness import Loop, finished_task
from tests.resolve import key_of, resolved

pytestmark = pytest.mark.integration
LONG = dict(width=64, height=64, steps=150)  # a render long enough to act in the middle of
wait_for = functools.partial(harness.wait_for, interval=0.02)


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("progress")
    queue = f"pq-{uuid.uuid4().hex[:6]}"
    worker = PlainWorker(redis_server.url, queue, home, home / "worker.log")
    yield {"url": redis_server.url, "queue": queue, "cache": home / "images.db", "worker": worker}
    worker.stop()


class Replica:
    def __init__(self, stack, **gateway):
        self.producer = GenerationProducer(CeleryConfig(redis_url=stack["url"], queue=stack["queue"]))
        config = GatewayConfig(**dict({"claim_lease_s": 0.6, "request_timeout_s": 120}, **gateway))
        self.store = SQLiteImageStore(stack["cache"], 1 << 26)
        self.front = FrontService(config, self.producer, self.store, stats.Counters(self.producer.redis, 0.1))
        self.loop = Loop()
        self.jobs = JobService(self.front)

    def close(self):
        self.jobs.close()
        self.front.close()
        self.producer.close()
        self.front.counters.close()
        self.loop.close()


@pytest.fixture
def replicas(stack):
    made: List[Replica] = []

    def make(**gateway) -> Replica:
        made.append(Replica(stack, **gateway))
        return made[-1]

    yield make
    for replica in made:
        replica.close()


def task_of(replica: Replica, request: GenerationRequest) -> str:
    key = key_of(request)
    return wait_for(lambda: (replica.front._flights.get(key) and replica.front._flights[key].task_id), 60, "task id")


def result_of(r: redis.Redis, task_id: str) -> Dict[str, Any]:
    return finished_task(r, task_id)


def test_progress_arrives_in_order_and_reaches_a_joiner_on_another_replica(replicas):
    a, b = replicas(), replicas()
    request = GenerationRequest(f"progress in order {uuid.uuid4().hex[:6]}", width=64, height=64, steps=6)
    seen_a: List[Dict[str, Any]] = []
    seen_b: List[Dict[str, Any]] = []
    leader = a.loop.spawn(a.front.generate_async(request, on_event=seen_a.append))
    task_of(a, request)
    joiner = b.loop.spawn(b.front.generate_async(request, on_event=seen_b.append))
    first, second = leader.result(180), joiner.result(180)
    assert first.png == second.png
    for seen in (seen_a, seen_b):
        steps = [e["step"] for e in seen if e["state"] == protocol.STATUS_GENERATING]
        assert steps, "no progress reached this replica's waiter"
        assert steps == sorted(steps) and len(set(steps)) == len(steps)  # in order, no repeats
        totals = {e["steps"] for e in seen if e["state"] == protocol.STATUS_GENERATING}
        assert len(totals) == 1 and totals.pop() >= 6  # the scheduler's real count (PNDM runs one more)
    assert seen_a[-1]["step"] == seen_a[-1]["steps"]  # the last step is always sent


def test_cancel_mid_render_stops_the_worker_within_one_step_and_caches_nothing(replicas, stack):
    a = replicas()
    r = a.producer.redis
    request = GenerationRequest(f"cancel me {uuid.uuid4().hex[:6]}", **LONG)
    events: List[Dict[str, Any]] = []
    waiter = a.loop.spawn(a.front.generate_async(request, on_event=events.append, waiter_id="w-cancel"))
    task_id = task_of(a, request)
    wait_for(lambda: any((e.get("step") or 0) >= 1 for e in events), 120, "a step")
    # The worker's start check stored Celery's STARTED state: Celery's own tools read it as theirs.
    running = AsyncResult(task_id, app=a.producer.app)
    assert running.state == "STARTED" and running.info["pid"] == stack["worker"].process.pid, running.info
    assert a.front.cancel("w-cancel")
    at_cancel = progress.last_event(r, task_id)["step"]  # the worker's own count, stored every step
    with pytest.raises(ProtocolError) as raised:
        waiter.result(60)
    assert raised.value.code == protocol.E_CANCELLED
    result = result_of(r, task_id)["result"]
    assert result["ok"] is False and result["error_code"] == protocol.E_CANCELLED
    stopped = int(result["error_message"].split("stopped after step ")[1].split(" ")[0])
    assert stopped <= at_cancel + 1 < 150
    key = key_of(request)
    wait_for(lambda: key not in a.front._flights, 30, "the flight ended")
    assert a.store.get(key) is None


def test_when_one_of_two_waiters_cancels_the_render_goes_on(replicas):
    a, b = replicas(), replicas()
    request = GenerationRequest(f"two waiters {uuid.uuid4().hex[:6]}", width=64, height=64, steps=6)
    events: List[Dict[str, Any]] = []
    first = a.loop.spawn(a.front.generate_async(request, on_event=events.append, waiter_id="w-one"))
    task_of(a, request)
    second = b.loop.spawn(b.front.generate_async(request, waiter_id="w-two"))
    wait_for(lambda: b.producer.redis.zscore(redis_keys.WAITERS + task_of(a, request), "w-two"), 30,
             "the joiner is counted")
    wait_for(lambda: any(e.get("step") for e in events), 120, "a step")
    assert a.front.cancel("w-one")
    with pytest.raises(ProtocolError):
        first.result(30)
    answer = second.result(180)
    assert answer.png.startswith(b"\x89PNG") and not answer.cached
    assert a.store.get(answer.meta["key"]) is not None


def test_a_timed_out_waiters_image_is_cached_and_its_retry_is_a_hit(replicas):
    a = replicas()
    # LONG renders for seconds here, far past the waiter's 0.5 s (6 steps finished within it on a quiet machine).
    request = GenerationRequest(f"timed out {uuid.uuid4().hex[:6]}", **LONG)
    with pytest.raises(ProtocolError) as raised:
        a.loop.run(a.front.generate_async(request, timeout_s=0.5))
    assert raised.value.code == protocol.E_TIMEOUT
    key = key_of(request)
    wait_for(lambda: a.store.get(key), 120, "the image cached after its waiter timed out")
    retry = a.loop.run(a.front.generate_async(request))
    assert retry.cached  # one generation in all: the retry is a hit


def test_a_queued_task_whose_waiters_all_left_never_runs(replicas):
    a = replicas()
    r = a.producer.redis
    busy = GenerationRequest(f"keeps the worker busy {uuid.uuid4().hex[:6]}", **LONG)
    busy_events: List[Dict[str, Any]] = []
    blocker = a.loop.spawn(a.front.generate_async(busy, on_event=busy_events.append, waiter_id="w-busy"))
    wait_for(lambda: any(e.get("step") for e in busy_events), 120, "the worker is rendering")
    orphan = GenerationRequest(f"nobody waits {uuid.uuid4().hex[:6]}", width=64, height=64, steps=2)
    runs = harness.TaskRuns(a.producer.config.redis_url, key_of(orphan))
    positions: List[Any] = []
    waiter = a.loop.spawn(a.front.generate_async(orphan, on_event=lambda e: positions.append(e.get("queue_position"))))
    task_id = task_of(a, orphan)
    wait_for(lambda: 0 in positions, 30, "queue position 0 reported while queued")
    waiter.cancel()  # the client disconnects: it leaves (no explicit cancel)
    wait_for(lambda: not r.zcard(redis_keys.WAITERS + task_id), 30, "the waiter left")
    assert a.front.cancel("w-busy")  # frees the worker sooner
    with pytest.raises(ProtocolError):
        blocker.result(60)
    result = result_of(r, task_id)["result"]
    assert result["error_code"] == protocol.E_CANCELLED and "before it started" in result["error_message"]
    assert progress.last_event(r, task_id) is None  # not one denoising step ran
    wait_for(lambda: runs.events, 10, "the skipped task's end published")
    runs.close()
    assert runs.started() == [], "a task skipped at its start check never shows as started"


class SkewedClock:
    """The `time` module as seen on a host whose clock is `offset_s` off the worker's."""

    def __init__(self, offset_s: float):
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("offset_s", [-60, 60])
def test_waiter_leases_hold_with_the_gateway_clock_60_s_off_the_workers(replicas, monkeypatch, offset_s):
    """Leases are Redis server time: with this (gateway) process's clock 60 s behind, a live
    waiter's task still renders (it once looked expired); 60 s ahead, a dead waiter's task still
    expires (its lease once looked alive for a minute more)."""
    monkeypatch.setattr(progress, "time", SkewedClock(offset_s))
    a = replicas()
    r = a.producer.redis
    live = GenerationRequest(f"clock skew live {offset_s} {uuid.uuid4().hex[:6]}", width=64, height=64, steps=2)
    assert a.loop.run(a.front.generate_async(live)).png.startswith(b"\x89PNG")

    busy = GenerationRequest(f"clock skew busy {offset_s} {uuid.uuid4().hex[:6]}", **LONG)
    busy_events: List[Dict[str, Any]] = []
    blocker = a.loop.spawn(a.front.generate_async(busy, on_event=busy_events.append, waiter_id=f"w-skew{offset_s}"))
    wait_for(lambda: any(e.get("step") for e in busy_events), 120, "the worker is rendering")
    # A task queued by a replica that died at once: one waiter, a 0.5 s lease nobody renews.
    dead = resolved(GenerationRequest(f"clock skew dead {offset_s} {uuid.uuid4().hex[:6]}", width=64, height=64,
                                      steps=2))
    task_id = new_task_id(dead.cache_key())
    progress.add_waiters(r, task_id, ["w-dead"], 0.5, watched=True)
    a.producer.submit(dead, task_id)

    def server_ms() -> int:
        seconds, micros = r.time()
        return seconds * 1000 + micros // 1000

    wait_for(lambda: r.zcount(redis_keys.WAITERS + task_id, server_ms(), "+inf") == 0, 30, "the lease lapsed")
    assert a.front.cancel(f"w-skew{offset_s}")  # frees the worker sooner
    with pytest.raises(ProtocolError):
        blocker.result(60)
    result = result_of(r, task_id)["result"]
    assert result["error_code"] == protocol.E_CANCELLED and "before it started" in result["error_message"]


def test_a_late_save_never_moves_a_done_job_back(replicas):
    """A progress save queued on the executor that lands after the final save is refused."""
    a = replicas()
    request = GenerationRequest(f"a late save {uuid.uuid4().hex[:6]}", width=64, height=64, steps=2)
    record = a.loop.run(a.jobs.submit(request))
    stale = dict(record, state="generating", step=1)  # the snapshot of an earlier event

    def stored_done():  # the stored record, not the replica's own copy (done there before its save lands)
        raw = a.producer.redis.get(redis_keys.JOB + record["id"])
        stored = json.loads(raw) if raw else None
        return stored if stored and stored["state"] == "done" else None

    done = wait_for(stored_done, 120, "the job stored as done")
    assert not a.jobs._save(stale)  # its seq is below the stored one
    assert not a.jobs._save(dict(stale, seq=done["seq"] + 1))  # newer, but done is final
    assert a.loop.run(a.jobs.read(record["id"]))["state"] == "done"


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_a_job_survives_its_replica_and_is_finished_by_another(replicas, kind):
    a, b = replicas(), replicas()
    images = {}
    if kind == "img2img":  # its record names the image by sha256; the bytes are kept beside it
        from tests.integration.test_clients import init_png

        images = {"init_image": init_png((9, 99, 199)), "strength": 0.5}
    request = GenerationRequest(f"a job {uuid.uuid4().hex[:6]}", width=64, height=64, steps=4, **images)
    record = a.loop.run(a.jobs.submit(request))
    assert record["state"] == "queued" and record["id"].startswith("job-")
    task_of(a, request)
    a.close()  # the replica goes away mid-job (its loop, its claim keeper, its job leases)
    seen = b.loop.run(b.jobs.read(record["id"]))
    assert seen is not None and seen["params"]["prompt"] == request.prompt

    def done():
        current = b.loop.run(b.jobs.read(record["id"]))
        return current if current["state"] == "done" else None

    final = wait_for(done, 180, "the job finished by the other replica")
    assert b.store.get(final["key"]) is not None
    assert final["key"] == record["key"]  # the very request, images included, was rendered


def test_a_job_counts_as_one_request_for_its_model_whether_it_renders_or_hits(replicas):
    a = replicas()
    counted: List[str] = []
    incr = a.front.counters.incr
    a.front.counters.incr = lambda name, amount=1: (counted.append(name), incr(name, amount))
    requests_for_tiny = stats.model_counter("tiny", stats.MODEL_REQUESTS)
    request = GenerationRequest(f"a counted job {uuid.uuid4().hex[:6]}", width=64, height=64, steps=2)
    record = a.loop.run(a.jobs.submit(request))
    wait_for(lambda: a.loop.run(a.jobs.read(record["id"]))["state"] == "done", 180, "the job rendered")
    assert counted.count(requests_for_tiny) == 1, "a job that renders is one request"
    again = a.loop.run(a.jobs.submit(request))
    assert again["state"] == "done" and again["cached"]
    assert counted.count(requests_for_tiny) == 2, "a job answered from the cache is one request too"


class HttpShim:
    """The gateway's own route functions (serve_app/gateway.py, jobs_api) served by uvicorn for one
    Replica, without Ray: what the fast HTTP port does."""

    def __init__(self, replica: Replica):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        from serve_app.admission import Admission
        from serve_app.gateway import Gateway

        from serve_app.signed_urls import SignedUrls

        cls = Gateway.func_or_class
        self.front, self.jobs, self.admission = replica.front, replica.jobs, Admission(replica.front.config)
        self.urls = SignedUrls(replica.front.redis, 60)
        self._images = lambda *args: cls._images(self, *args)

        def bound(method):
            async def endpoint(request):
                return await method(self, request)
            return endpoint

        routes = [Route("/v1/images/generations", bound(cls.generations), methods=["POST"]),
                  Route("/v1/jobs", bound(cls.create_job), methods=["POST"]),
                  Route("/v1/jobs/{job_id}", bound(cls.get_job), methods=["GET"]),
                  Route("/v1/jobs/{job_id}", bound(cls.delete_job), methods=["DELETE"]),
                  Route("/v1/jobs/{job_id}/events", bound(cls.job_events), methods=["GET"]),
                  Route("/v1/jobs/{job_id}/image", bound(cls.job_image), methods=["GET"])]
        from tests.services import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn")

    def _refused(self, request):  # no token in these tests
        return None

    def authenticate(self, request):  # auth off: everyone is the anonymous tenant
        from serve_app.gateway import Gateway

        return Gateway.func_or_class.authenticate(self, request)

    def close(self):
        self.server.should_exit = True
        self.thread.join(5)


def test_openai_sdk_streams_partial_images_then_the_same_final_image(replicas):
    import base64

    import openai

    a = replicas()
    http = HttpShim(a)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        prompt = f"streamed {uuid.uuid4().hex[:6]}"
        extra = {"steps": 6, "seed": 7}
        stream = client.images.generate(prompt=prompt, size="64x64", stream=True, partial_images=2, extra_body=extra)
        events = list(stream)
        kinds = [event.type for event in events]
        assert kinds[-1] == "image_generation.completed"
        partials = [e for e in events if e.type == "image_generation.partial_image"]
        assert [e.partial_image_index for e in partials] == [0, 1]
        assert all(base64.b64decode(e.b64_json).startswith(b"\x89PNG") for e in partials)
        streamed = base64.b64decode(events[-1].b64_json)
        plain = client.images.generate(prompt=prompt, size="64x64", extra_body=extra)
        assert base64.b64decode(plain.data[0].b64_json) == streamed
    finally:
        http.close()


def _http(port: int, method: str, path: str, body: Any = None):
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


def _sse(raw: bytes) -> List[tuple]:
    events = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_jobs_api_follows_the_contract(replicas):
    a = replicas()
    http = HttpShim(a)
    try:
        body = {"prompt": f"a job over http {uuid.uuid4().hex[:6]}", "size": "64x64", "steps": 6, "previews": 2}
        status, _, raw = _http(http.port, "POST", "/v1/jobs", body)
        job = json.loads(raw)
        assert status == 202 and job["object"] == "sdgate.job" and job["state"] in ("queued", "generating")
        assert job["params"]["prompt"] == body["prompt"] and job["image_url"] is None
        status, kind, raw = _http(http.port, "GET", f"/v1/jobs/{job['id']}/events")
        assert status == 200 and kind.startswith("text/event-stream")
        events = _sse(raw)
        assert events[-1][0] == "done" and events[-1][1]["image_url"] == f"/v1/images/{job['key']}.png"
        assert any(name == "preview" and data["b64_png"] for name, data in events)
        steps = [data["step"] for name, data in events if name == "progress" and data["state"] == "generating"
                 and data["step"] is not None]
        assert steps == sorted(steps)
        status, kind, png = _http(http.port, "GET", f"/v1/jobs/{job['id']}/image")
        assert status == 200 and kind == "image/png" and a.store.get(job["key"]).png == png
        status, _, raw = _http(http.port, "POST", "/v1/jobs", body)  # the same again: a hit, done at once
        assert status == 200 and json.loads(raw)["state"] == "done" and json.loads(raw)["cached"] is True

        long = {"prompt": f"a job to cancel {uuid.uuid4().hex[:6]}", "size": "64x64", "steps": 150}
        job = json.loads(_http(http.port, "POST", "/v1/jobs", long)[2])
        wait_for(lambda: json.loads(_http(http.port, "GET", f"/v1/jobs/{job['id']}")[2])["step"], 120, "a step")
        status, _, raw = _http(http.port, "DELETE", f"/v1/jobs/{job['id']}")
        assert status == 200 and json.loads(raw)["state"] == "cancelled"
        assert json.loads(_http(http.port, "GET", f"/v1/jobs/{job['id']}")[2])["error"]["code"] == "cancelled"
        assert _http(http.port, "GET", "/v1/jobs/job-nope")[0] == 404
    finally:
        http.close()


def test_a_renewal_queued_before_a_waiter_left_does_not_bring_it_back(redis_server):
    """The keeper snapshots a flight's waiters, then its pipeline renews them; a waiter that left in
    between (its removal ran first) must stay gone, not come back with a fresh lease."""
    r = redis.Redis.from_url(redis_server.url)
    task_id = f"sdgate-renew-{uuid.uuid4().hex[:8]}"
    progress.add_waiters(r, task_id, ["stays", "leaves"], 5.0)
    snapshot = ["stays", "leaves"]  # what the keeper read before the leave
    progress.remove_waiter(r, task_id, "leaves")
    progress.add_waiters(r, task_id, snapshot, 5.0, renew=True)
    assert sorted(m.decode() for m in r.zrange(redis_keys.WAITERS + task_id, 0, -1)) == ["stays"]


@pytest.mark.parametrize("sent_ahead", [False, True])
def test_a_start_check_sent_ahead_answers_as_one_made_at_once(redis_server, sent_ahead):
    """The worker sends its start check before the render prepares and reads it just before the
    first step (send_start_check, check_start): the same answers as a check made at once, on a
    pool of one connection that it gives back clean, even when Redis lost the script."""
    r = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=1,
                                                                          timeout=5))

    def check(task_id: str, drop: bool = False) -> str:
        reporter = progress.ProgressReporter(r, task_id, 2, started_state=(f"result-{task_id}", "STARTED", 60))
        if sent_ahead:
            reporter.send_start_check()
        try:
            if drop:
                reporter.drop_start_check()
                return "dropped"
            reporter.check_start()
            return "started"
        except progress.TaskCancelled as exc:
            return str(exc)

    live, cancelled, orphan, dropped = (f"sdgate-check-{name}-{uuid.uuid4().hex[:6]}"
                                        for name in ("live", "cancelled", "orphan", "dropped"))
    progress.add_waiters(r, live, ["w"], 30, watched=True)
    r.set(redis_keys.TASK_CANCEL + cancelled, "1")
    progress.add_waiters(r, orphan, [], 30, watched=True)
    r.script_flush()  # a Redis restarted since the script was registered: NOSCRIPT, then a round trip
    assert check(live) == "started" and r.get(f"result-{live}") == b"STARTED"
    assert check(cancelled) == progress.CANCELLED_MESSAGE and r.get(f"result-{cancelled}") is None
    assert "left before it started" in check(orphan) and r.get(f"result-{orphan}") is None
    assert check(dropped, drop=True) == "dropped"
    r.set("after-the-checks", "read on the same connection")
    assert r.get("after-the-checks") == b"read on the same connection", "no stale answer left on the connection"
