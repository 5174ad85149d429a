"""The producer subscribes to the result channels of the tasks it watches, and only those.

Results are stored and published by Celery's own Redis backend (`backend.store_result`), as a
worker does; no worker is needed to show who reads which message.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from celery.backends.redis import RedisBackend

from client.protocol import GenerationRequest
from celery_bridge.app import WorkerRedisBackend, make_celery_app
from celery_bridge.contract import GenerationResult
from celery_bridge.models import queue_for
from celery_bridge import producer as producer_module
from celery_bridge.producer import GenerationProducer, new_task_id
from tests.resolve import resolved
from tests.integration import harness
from tests.integration.conftest import celery_config
from tests.services import RedisServer, wait_for_port

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis():
    """A Redis of this test's own, so it can be restarted."""
    server = RedisServer().start()
    yield server
    server.stop()


def result_of(request: GenerationRequest) -> dict:
    return GenerationResult.success(request, b"png", pipeline_ms=1.0, worker="test").to_json()


def finish(producer: GenerationProducer, task_id: str, request: GenerationRequest) -> None:
    """What a worker's backend does when the task ends: store the result and publish it."""
    producer.app.backend.store_result(task_id, result_of(request), "SUCCESS")


def task(prompt: str):
    request = resolved(GenerationRequest(prompt)).normalized()
    return request, new_task_id(request.cache_key())


def test_a_producer_reads_only_the_results_of_tasks_it_watches(redis_server):
    config = celery_config(redis_server.url, "channels-q")
    mine, other = GenerationProducer(config), GenerationProducer(config)
    try:
        (request_a, a), (request_b, b) = task("channels task a"), task("channels task b")
        future_a, future_b = mine.watch(a), other.watch(b)
        # Let both listeners subscribe (else the result would come through the key read instead).
        harness.wait_for(lambda: _subscribed(mine, a) and _subscribed(other, b), 10, "both subscriptions")
        finish(other, b, request_b)
        assert future_b.result(timeout=10).ok
        finish(mine, a, request_a)
        assert future_a.result(timeout=10).key == request_a.cache_key()
        # The safety-net poll may deliver first; each subscription's message still arrives, once.
        harness.wait_for(lambda: mine.messages_received >= 1 and other.messages_received >= 1, 10,
                         "each producer's one result message")
        assert mine.messages_received == 1, "task b's result reached the producer watching only a"
        assert other.messages_received == 1
        # Delivered results are unsubscribed: a late republish of a reaches no one.
        harness.wait_for(lambda: not _subscribed(mine, a), 10, "the channel of the delivered task unsubscribed")
        unwatched = task("channels unwatched")[1]
        mine.watch(unwatched)
        harness.wait_for(lambda: _subscribed(mine, unwatched), 10, "a new watch subscribed")
        mine.unwatch(unwatched)
        harness.wait_for(lambda: not _subscribed(mine, unwatched), 10, "an unwatched task unsubscribed")
    finally:
        mine.close()
        other.close()


def test_results_arrive_after_redis_restarts(own_redis):
    producer = GenerationProducer(celery_config(own_redis.url, "channels-restart-q"))
    try:
        (request_1, first), (request_2, second) = task("restart first"), task("restart second")
        future_1 = producer.watch(first)
        harness.wait_for(lambda: _subscribed(producer, first), 10, "the first subscription")
        own_redis.stop()
        own_redis.start()  # same port, same append-only file
        wait_for_port(own_redis.port)
        # Published after the listener reconnected: it must have subscribed again by itself.
        harness.wait_for(lambda: _subscribed(producer, first), 30, "resubscribed after the restart", interval=0.2)
        received = producer.messages_received
        finish(producer, first, request_1)
        assert future_1.result(timeout=10).ok
        harness.wait_for(lambda: producer.messages_received == received + 1, 10,
                         "the result message through the renewed subscription")
        # A task watched after the restart works too.
        future_2 = producer.watch(second)
        finish(producer, second, request_2)
        assert future_2.result(timeout=10).ok
    finally:
        producer.close()


def _subscribed(producer: GenerationProducer, task_id: str) -> bool:
    """Whether Redis has a subscriber for `task_id`'s result channel from `producer`'s listener."""
    channel = producer._result_prefix + task_id
    return producer.redis.pubsub_numsub(channel)[0][1] >= 1


def test_a_new_watch_is_subscribed_at_once_while_the_listener_reads_other_channels(redis_server, monkeypatch):
    """While some task is watched the listener blocks reading its channels (up to SUBSCRIBE_LAG_S,
    made 60 s here); a new watch wakes it through the process's wake channel, so the new task is
    subscribed then, not at the timeout (which cost a fast render tens of milliseconds)."""
    monkeypatch.setattr(producer_module, "SUBSCRIBE_LAG_S", 60.0)
    producer = GenerationProducer(celery_config(redis_server.url, "wake-q"))
    try:
        first, second = task("wake first")[1], task("wake second")[1]
        producer.watch(first, unsent=True)
        harness.wait_for(lambda: _subscribed(producer, first), 10, "the first watch subscribed")
        producer.watch(second, unsent=True)
        harness.wait_for(lambda: _subscribed(producer, second), 10, "the second watch subscribed before the timeout")
        assert producer.redis.pubsub_numsub(producer._wake_channel)[0][1] == 1, "the wake channel beside them"
        assert producer.messages_received == 0, "a wake-up is not a result message"
    finally:
        producer.close()


def test_sending_leaves_no_subscription_that_nobody_reads(redis_server):
    """Celery's Redis backend subscribes to every sent task's channel on a connection of its own,
    which only AsyncResult.get() would read; the producer reads results with its listener, so its
    sends must open nothing there (else each left ~270 unread bytes until Redis dropped it)."""
    client = redis.Redis.from_url(redis_server.url)
    before = {entry["id"] for entry in client.client_list()}
    config = celery_config(redis_server.url, f"channels-sent-{uuid.uuid4().hex[:6]}")
    producer = GenerationProducer(config)
    try:
        for n in range(50):
            request, task_id = task(f"sent, never watched {n}")
            producer.submit(request, task_id)
        assert client.llen(queue_for(config.queue, request.model)) == 50  # sent, through kombu's pooled connection
        # Only new connections can be Celery's result subscriber (kombu shares its broker
        # connections process-wide, so the sends may open none).
        opened = [entry for entry in client.client_list() if entry["id"] not in before]
        assert not [entry for entry in opened if entry["cmd"] in ("subscribe", "unsubscribe") or int(entry["sub"])], \
            opened
    finally:
        producer.close()


def test_a_workers_backend_stores_celerys_own_state_in_one_round_trip_and_keeps_a_success(redis_server):
    config = celery_config(redis_server.url, "channels-q")
    ours = make_celery_app(config, name="test-worker", backend=WorkerRedisBackend).backend
    stock = make_celery_app(config, name="test-stock").backend  # Celery's own RedisBackend
    assert type(stock) is RedisBackend
    client = redis.Redis.from_url(redis_server.url)
    producer = GenerationProducer(config)
    try:
        (request, task_id), (_, stock_id) = task("one-trip store"), task("one-trip store, stock")
        for backend, tid in ((ours, task_id), (stock, stock_id)):
            backend.store_result(tid, {"pid": 1}, "STARTED")
        future = producer.watch(task_id)
        harness.wait_for(lambda: _subscribed(producer, task_id), 10, "the subscription")
        sent = []
        send = ours.client.execute_command
        ours.client.execute_command = lambda *args, **options: sent.append(args[0]) or send(*args, **options)
        ours.store_result(task_id, result_of(request), "SUCCESS")
        assert sent == ["EVALSHA"], "the check and the write are one script"
        assert future.result(timeout=10).key == request.cache_key(), "published, as Celery's own is"
        stock.store_result(stock_id, result_of(request), "SUCCESS")

        def stored(tid: str) -> dict:
            meta = json.loads(client.get(ours.get_key_for_task(tid)))
            return {k: v for k, v in meta.items() if k not in ("task_id", "date_done")}

        assert stored(task_id) == stored(stock_id) and stored(task_id)["status"] == "SUCCESS"
        assert abs(client.ttl(ours.get_key_for_task(task_id)) - client.ttl(stock.get_key_for_task(stock_id))) <= 1
        ours.store_result(task_id, {"exc_type": "Late", "exc_message": "a redelivered run"}, "FAILURE")
        assert stored(task_id) == stored(stock_id), "a SUCCESS is never overwritten"
    finally:
        producer.close()
        client.close()
