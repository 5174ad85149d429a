"""Fair share's scripts on a real Redis: who goes next, by weight, under caps, and after a
dispatcher dies between releasing a task and sending it. Workers are played by heartbeats (their
slots) and by `finished`, as a worker reports a task's end."""

from __future__ import annotations

import base64
import itertools
import json
from datetime import datetime
from typing import Dict, List

import pytest
import redis

from client.protocol import GenerationRequest
from celery_bridge import redis_keys
from celery_bridge.config import WorkerConfig
from celery_bridge.contract import TASK_NAME
from celery_bridge.fair_share import Dispatcher, FairShare, backlog_key
from celery_bridge.presence import Heartbeat
from celery_bridge.task_message import TaskMessages
from serve_app.tenants import Tenant, TenantRegistry
from tests.integration import harness

pytestmark = pytest.mark.integration
# A model no worker serves: the session's Redis is shared, and a real `tiny` worker left beating
# there by another module would add its slot to the ones these tests announce.
QUEUE, MODEL = "fair-q.fair-share-only", "fair-share-only"
_ids = itertools.count()


@pytest.fixture
def client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


def workers(client: redis.Redis, count: int, slots: int = 1) -> List[Heartbeat]:
    beats = [Heartbeat(client, MODEL, f"worker-{n}", slots=slots) for n in range(count)]
    for beat in beats:
        beat.beat()  # announced once: no thread, the test is over long before the heartbeat expires
    return beats


def entry(tenant: str) -> dict:
    """A held task's entry, as the producer writes it."""
    return {"payload": {"model": MODEL, "tenant": tenant}, "queue": QUEUE}


def enqueue(fair: FairShare, tenant: str, count: int) -> List[str]:
    ids = []
    for _ in range(count):
        task_id = f"sdgate-{tenant}-{next(_ids)}"
        fair.enqueue(QUEUE, tenant, task_id, entry(tenant))
        ids.append(task_id)
    return ids


def run_one_worker(fair: FairShare, count: int) -> List[str]:
    """Release and finish one task at a time, as one busy worker would: the order tasks started."""
    started = []
    for _ in range(count):
        released = fair.release(QUEUE, MODEL)
        assert len(released) == 1, "one worker with one slot takes exactly one task at a time"
        task_id, entry, retry = released[0]
        assert not retry
        fair.confirm([task_id])
        assert fair.release(QUEUE, MODEL) == [], "nothing more while the only slot is busy"
        fair.finished(QUEUE, entry["payload"]["tenant"], task_id, gpu_ms=100.0)
        started.append(task_id)
    return started


def test_a_light_tenant_never_waits_behind_a_heavy_backlog(client):
    fair = FairShare(client)
    workers(client, 1)
    a = enqueue(fair, "a", 32)
    b, c = enqueue(fair, "b", 2), enqueue(fair, "c", 3)
    order = run_one_worker(fair, 37)
    assert [t for t in order if t in a] == a and [t for t in order if t in b] == b and \
        [t for t in order if t in c] == c, "first in, first out within each tenant"
    tenth_of_a = order.index(a[9])
    assert all(order.index(t) < tenth_of_a for t in b + c), order[:12]
    assert order.index(b[0]) <= 2 and order.index(c[0]) <= 2, "each first image starts within three renders"
    assert client.llen(backlog_key(QUEUE, "a")) == 0 and client.hlen(redis_keys.FAIR_HELD) == 0


def test_tenants_share_busy_workers_by_weight(client):
    registry = TenantRegistry(client)
    registry.add(Tenant("heavy", weight=2))
    registry.add(Tenant("light", weight=1))
    fair = FairShare(client)
    workers(client, 1)
    heavy, light = enqueue(fair, "heavy", 60), enqueue(fair, "light", 60)
    order = run_one_worker(fair, 60)
    counts = {"heavy": sum(t in heavy for t in order), "light": sum(t in light for t in order)}
    assert counts == {"heavy": 40, "light": 20}, counts


def test_a_tenant_that_comes_back_gets_no_credit_for_its_idle_time(client):
    fair = FairShare(client)
    workers(client, 1)
    run_one_worker(fair, len(enqueue(fair, "early", 1)))
    busy = enqueue(fair, "busy", 20)
    run_one_worker(fair, 10)  # "early" idles while "busy" runs ten
    back = enqueue(fair, "early", 5)
    order = run_one_worker(fair, 10)
    assert sum(t in back for t in order) == 5 and sum(t in busy for t in order) == 5, \
        "it shares from now on; it does not get ten in a row for the time it was away"


def test_slots_fill_every_worker_and_max_running_caps_a_tenant(client):
    TenantRegistry(client).add(Tenant("capped", max_running=2))
    fair = FairShare(client)
    workers(client, 3, slots=2)  # six tasks at once
    enqueue(fair, "capped", 10)
    free = enqueue(fair, "free", 10)
    released = fair.release(QUEUE, MODEL)
    by_tenant: Dict[str, int] = {}
    for _, entry, _ in released:
        by_tenant[entry["payload"]["tenant"]] = by_tenant.get(entry["payload"]["tenant"], 0) + 1
    assert by_tenant == {"capped": 2, "free": 4}, by_tenant
    fair.confirm([task_id for task_id, _, _ in released])
    assert fair.release(QUEUE, MODEL) == []
    fair.finished(QUEUE, "free", free[0], gpu_ms=None)
    again = fair.release(QUEUE, MODEL)
    assert [entry["payload"]["tenant"] for _, entry, _ in again] == ["free"], "capped stays at its two"


def test_a_release_whose_send_was_never_confirmed_is_handed_out_again(client):
    fair = FairShare(client, send_lease_ms=200)
    workers(client, 1)
    (task_id,) = enqueue(fair, "a", 1)
    first = fair.release(QUEUE, MODEL)
    assert [(t, retry) for t, _, retry in first] == [(task_id, False)]
    # The dispatcher died before it sent the task: after the lease another one gets it, marked as a retry.
    again = harness.wait_for(lambda: fair.release(QUEUE, MODEL), 5, "the unconfirmed release handed out again")
    assert [(t, retry) for t, _, retry in again] == [(task_id, True)]
    fair.confirm([task_id])
    assert client.hlen(redis_keys.FAIR_HELD) == 0 and client.zcard(redis_keys.FAIR_SENDING) == 0


def test_usage_is_counted_per_tenant(client):
    fair = FairShare(client)
    workers(client, 1)
    enqueue(fair, "a", 2)
    run_one_worker(fair, 2)
    assert TenantRegistry(client).usage()["a"] == {"images_served": 0, "images_rendered": 2, "gpu_ms": 200}


def test_a_held_tasks_place_in_line_is_where_fair_share_will_start_it(client):
    fair = FairShare(client)
    workers(client, 1)
    a = enqueue(fair, "a", 6)
    b = enqueue(fair, "b", 2)
    fair.confirm([task_id for task_id, _, _ in fair.release(QUEUE, MODEL)])  # a[0] is with the broker now
    places = fair.positions(QUEUE, a + b)
    assert a[0] not in places, "a released task has no place among the held"
    fair.finished(QUEUE, "a", a[0], gpu_ms=None)
    order = run_one_worker(fair, 7)  # the order they really start in
    assert [places[t] for t in order] == sorted(places[t] for t in order), (order, places)
    assert places[b[0]] == 0, "b's first goes next"


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends one at a time (a script call is one)."""

    round_trips = 0

    def execute_command(self, *args, **options):
        self.round_trips += 1
        return super().execute_command(*args, **options)


def celery_app(redis_server, events: bool = True):
    from celery_bridge.app import SendOnlyRedisBackend, make_celery_app
    from celery_bridge.config import CeleryConfig

    return make_celery_app(CeleryConfig(redis_url=redis_server.url, queue=QUEUE.split(".")[0], task_events=events),
                           backend=SendOnlyRedisBackend)


def queued_ids(client: redis.Redis) -> List[str]:
    """Task ids in the model's Celery queue list, oldest first (kombu LPUSHes)."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(QUEUE, 0, -1))]


def test_a_new_task_that_may_start_is_held_released_and_queued_in_one_round_trip(redis_server):
    """The gateway's submit is one script: the new task is held, released by fair share, and (a
    slot being free) pushed onto its Celery queue as kombu would push Celery's message for it.
    A task that cannot start is held, and the dispatcher's round after a finish sends it."""
    client = CountingRedis.from_url(redis_server.url)
    client.flushall()
    fair, messages = FairShare(client), TaskMessages(celery_app(redis_server))
    workers(client, 1)
    sends = []
    dispatcher = Dispatcher(fair, lambda: [(QUEUE, MODEL)], lambda task_id, entry: sends.append(task_id),
                            known=lambda task_id, entry: False)
    try:
        for tenant in ("warm", "a"):  # the first call also loads the script
            task_id = f"sdgate-{tenant}"
            message = messages.build(task_id, entry(tenant)["payload"], QUEUE, 300)
            before = client.round_trips
            dispatcher.submit(QUEUE, MODEL, tenant, task_id, entry(tenant), message)
            round_trips = client.round_trips - before
            assert queued_ids(client)[-1] == task_id
            fair.finished(QUEUE, tenant, task_id, gpu_ms=None)
        assert round_trips == 1 and sends == [], "one script held, released and queued it; nothing sent after"
        assert client.hlen(redis_keys.FAIR_HELD) == 0 and client.zcard(redis_keys.FAIR_SENDING) == 0
        assert client.llen(redis_keys.FAIR_WAKE) == 0, "a finish with nothing held wakes no dispatcher"

        for n in (1, 2):
            dispatcher.submit(QUEUE, MODEL, "a", f"sdgate-a-{n}", entry("a"),
                              messages.build(f"sdgate-a-{n}", entry("a")["payload"], QUEUE, 300))
        assert queued_ids(client)[-1] == "sdgate-a-1", "the only slot is busy"
        assert client.lrange(backlog_key(QUEUE, "a"), 0, -1) == [b"sdgate-a-2"]
        fair.finished(QUEUE, "a", "sdgate-a-1", gpu_ms=None)
        assert client.lrange(redis_keys.FAIR_WAKE, 0, -1) == [QUEUE.encode()], "a held task: the finish wakes one"
        assert dispatcher.release_once(QUEUE, MODEL) == 1 and sends == ["sdgate-a-2"]
    finally:
        dispatcher.stop()
        client.close()


@pytest.mark.parametrize("events", [True, False])
def test_a_built_task_message_is_the_one_celery_sends(redis_server, events):
    """celery_bridge/task_message.py catches kombu's last step for a queue's first message and fills
    that one in for the next: both must be what a real `send_task` queues (all but the per-send ids
    and times), and their task-sent events the ones Celery publishes, so a kombu or Celery upgrade
    that changes either fails here."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(QUEUE)
    app = celery_app(redis_server, events)
    assert app.conf.task_send_sent_event is events
    payload = {"prompt": "it's a fox", "model": MODEL, "steps": 2, "guidance_scale": 7.5, "seed": None}
    messages = TaskMessages(app)
    caught = messages.build("sdgate-built", payload, QUEUE, 300)
    filled = messages.build("sdgate-filled", payload, QUEUE, 300)
    assert client.llen(QUEUE) == 0, "building sends nothing"
    sent_events = client.pubsub()
    sent_events.psubscribe("*celeryev*")
    harness.wait_for(lambda: sent_events.get_message(timeout=1) or sent_events.subscribed, 5, "subscribed")
    app.send_task(TASK_NAME, args=[payload], task_id="sdgate-sent", queue=QUEUE, expires=300)
    real = json.loads(client.lpop(QUEUE))

    def per_send_fields_dropped(message: dict) -> dict:
        message = json.loads(json.dumps(message))
        for field in ("id", "root_id", "expires"):
            message["headers"].pop(field)
        for field in ("delivery_tag", "correlation_id"):
            message["properties"].pop(field)
        return message

    def event_fields(event: dict) -> dict:
        fields = json.loads(base64.b64decode(event["body"]))
        for field in ("uuid", "root_id", "expires", "clock", "timestamp"):
            fields.pop(field)
        return fields

    published = (harness.wait_for(lambda: sent_events.get_message(timeout=1), 5, "the real task-sent event")
                 if events else None)
    for built, task_id in ((caught, "sdgate-built"), (filled, "sdgate-filled")):
        ours = json.loads(built.body)
        assert built.list_key == QUEUE
        assert base64.b64decode(ours["body"]) == base64.b64decode(real["body"])
        assert (ours["headers"]["id"], ours["headers"]["root_id"], ours["properties"]["correlation_id"]) == (
            task_id, task_id, task_id)
        assert abs(datetime.fromisoformat(ours["headers"]["expires"])
                   - datetime.fromisoformat(real["headers"]["expires"])).total_seconds() < 60
        assert per_send_fields_dropped(ours) == per_send_fields_dropped(real)
        if events:
            event, real_event = json.loads(built.event), json.loads(published["data"])
            assert built.event_channels == (published["channel"].decode(),)
            assert event["headers"] == real_event["headers"]
            assert json.loads(base64.b64decode(event["body"]))["uuid"] == task_id
            assert event_fields(event) == event_fields(real_event)
            event.pop("body"), real_event.pop("body")
            event["properties"].pop("delivery_tag"), real_event["properties"].pop("delivery_tag")
            assert event == real_event
        else:
            assert (built.event, built.event_channels) == ("", ())
    assert json.loads(filled.body)["properties"]["delivery_tag"] != json.loads(caught.body)["properties"]["delivery_tag"]
    sent_events.close()


def test_a_workers_end_report_goes_in_its_results_round_trip_just_before_the_result(redis_server, monkeypatch,
                                                                                      tmp_path):
    """The slot is free by the time the result is stored, so a gateway that has the image can release
    the next task at once; and the report costs no round trip of its own: it rides with the result
    that Celery stores through WorkerRedisBackend."""
    from celery import states

    from celery_bridge import worker
    from celery_bridge.app import WorkerRedisBackend, make_celery_app
    from celery_bridge.config import CeleryConfig
    from celery_bridge.sleep_model import SLEEP_MODEL, sleep_catalogue

    executed = []  # the commands of each pipeline run

    class RecordingRedis(redis.Redis):
        def pipeline(self, transaction=True, shard_hint=None):
            pipe = super().pipeline(transaction, shard_hint)
            run = pipe.execute

            def execute(raise_on_error=True):
                executed.append([args[0] for args, _ in pipe.command_stack])
                return run(raise_on_error)

            pipe.execute = execute
            return pipe

    client = RecordingRedis.from_url(redis_server.url)
    client.flushall()
    monkeypatch.setenv("SDGATE_MODELS_FILE", str(sleep_catalogue(tmp_path / "models.yaml", 1)))
    monkeypatch.setattr(worker, "_current_task", lambda: ("sdgate-end", QUEUE))
    monkeypatch.setattr(worker, "_started_state", lambda: None)  # outside a Celery task: no result key
    fair = FairShare(client)
    workers(client, 1)
    fair.enqueue(QUEUE, "a", "sdgate-end", entry("a"))
    (next_id,) = enqueue(fair, "a", 1)
    fair.confirm([task_id for task_id, _, _ in fair.release(QUEUE, MODEL)])
    service = worker.GenerationService(WorkerConfig(model=SLEEP_MODEL), redis_client=client, report_with_result=True)
    backend = make_celery_app(CeleryConfig(redis_url=redis_server.url), backend=WorkerRedisBackend).backend
    backend.__dict__["client"] = client  # Celery's cached client, replaced by the recording one
    executed.clear()
    result = service.handle(dict(GenerationRequest("the end of a task", seed=1).to_dict(), tenant="a"))
    assert result["ok"] and executed == [] and client.zcard(redis_keys.FAIR_OUT + QUEUE) == 1, "nothing sent yet"
    backend.store_result("sdgate-end", result, states.SUCCESS)
    assert executed == [["HINCRBY", "LPUSH", "LTRIM", "EVAL", "HINCRBY", "HINCRBY", "EVAL"]], \
        "the report, then the result's store: one round trip (no SCRIPT EXISTS before it: test_lua.py)"
    assert json.loads(client.get("celery-task-meta-sdgate-end"))["status"] == "SUCCESS"
    assert client.zcard(redis_keys.FAIR_OUT + QUEUE) == 0, "the slot is free"
    assert [task_id for task_id, _, _ in fair.release(QUEUE, MODEL)] == [next_id]
    assert client.hget(redis_keys.STATS, f"models:{SLEEP_MODEL}:rendered") == b"1"
    assert TenantRegistry(client).usage()["a"]["images_rendered"] == 1
    backend.store_result("sdgate-other", {"ok": True}, states.SUCCESS)
    assert len(executed) == 1, "another task's result is stored alone (its script, no pipeline)"
    client.close()
