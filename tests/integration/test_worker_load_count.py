"""The worker autoscaling policy's count against real Redis and kombu: a task a consumer holds
(delivered, not acked: a render in progress) counts for its own queue only."""

from __future__ import annotations

import pytest
import redis

from celery_bridge.app import make_celery_app
from celery_bridge.autoscaling import QueueWork, WorkerLoadPolicy, count_queue_work
from celery_bridge.contract import TASK_NAME
from tests.integration.conftest import celery_config

pytestmark = pytest.mark.integration


def test_held_tasks_count_as_in_progress_per_queue(redis_server):
    app = make_celery_app(celery_config(redis_server.url, "count-model-a"))
    client = redis.Redis.from_url(redis_server.url)
    for queue, count in (("count-model-a", 3), ("count-model-b", 2)):
        for i in range(count):
            app.send_task(TASK_NAME, args=[{"n": i}], queue=queue)
    assert count_queue_work(client, "count-model-a") == QueueWork(queued=3, in_progress=0)

    with app.connection_for_read() as conn:
        held = conn.SimpleQueue("count-model-a", no_ack=False)
        message = held.get(timeout=10)  # what a worker with late acks holds while it renders
        try:
            assert count_queue_work(client, "count-model-a") == QueueWork(queued=2, in_progress=1)
            assert count_queue_work(client, "count-model-b") == QueueWork(queued=2, in_progress=0)
            policy = WorkerLoadPolicy(queue_name="count-model-a", broker_url=redis_server.url)
            ctx = type("Ctx", (), {"target_num_replicas": 1, "current_num_replicas": 1,
                                   "config": type("C", (), {"get_target_ongoing_requests": lambda self: 1})()})()
            assert policy(ctx)[0] == 3, "queued plus in progress"
        finally:
            message.ack()
            held.close()
    assert count_queue_work(client, "count-model-a") == QueueWork(queued=2, in_progress=0)
    client.delete("count-model-a", "count-model-b")
