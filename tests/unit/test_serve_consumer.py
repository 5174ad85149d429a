"""Ray Serve's Celery adapter as celery_bridge.consumer.ServeConsumer reads it. These private
attributes are not Serve's API: when a Ray upgrade renames one, this fails here, by name, instead
of a replica silently never draining (Serve would kill renders mid-way) or never failing its
health check."""

from __future__ import annotations

import inspect
import threading

from ray.serve.task_consumer import task_consumer
from ray.serve.task_processor import CeleryTaskProcessorAdapter

from celery_bridge.app import WorkerRedisBackend
from celery_bridge.config import CeleryConfig
from celery_bridge.consumer import ServeConsumer, task_processor_config


def test_the_adapter_still_has_the_attributes_the_consumer_reads():
    adapter = CeleryTaskProcessorAdapter(task_processor_config(CeleryConfig(), "tiny"))
    adapter.initialize(consumer_concurrency=1)
    for name in ServeConsumer.ADAPTER_ATTRIBUTES:
        assert hasattr(adapter, name), f"Ray's CeleryTaskProcessorAdapter has no {name} any more"
    assert hasattr(adapter._app, "control") and adapter._worker_thread is None
    assert isinstance(adapter._app.backend, WorkerRedisBackend), "Ray's workers store results as plain ones do"
    started = inspect.getsource(CeleryTaskProcessorAdapter.start_consumer)
    assert "self._worker_thread = threading.Thread(" in started and "self._worker_hostname =" in started


def test_a_task_consumer_replica_keeps_its_adapter_where_the_consumer_looks():
    source = inspect.getsource(task_consumer)
    assert f"self.{ServeConsumer.REPLICA_ATTRIBUTE} = _instantiate_adapter(" in source


def test_the_consumer_reads_a_stopped_thread():
    class Adapter:
        _worker_thread = threading.Thread(target=lambda: None)

    Adapter._worker_thread.start()
    Adapter._worker_thread.join()
    replica = type("Replica", (), {"_adapter": Adapter()})()
    assert ServeConsumer.of(replica).stopped() and ServeConsumer.of(object()) is None
