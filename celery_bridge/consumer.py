"""Workers orchestrated by Ray: a Serve task-consumer deployment on the same queue and task name.

Each replica holds one resident pipeline (and `num_gpus` GPUs, from configs/worker.yaml or the
Serve config) and runs Ray Serve's Celery adapter with one consumer thread, so Ray places,
restarts and scales the workers while the data path stays Redis + Celery.

A replica Serve stops (scale-down, redeploy) drains: it stops consuming, finishes the render it
holds, acks it, then exits. `graceful_shutdown_timeout_s` is set past the task time limit so
Serve never kills it mid-render.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Optional

from ray import serve
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_consumer, task_handler

from celery_bridge.app import SERVE_MANAGED_KEYS, WorkerRedisBackend, celery_settings, result_backend_url
from celery_bridge.config import CeleryConfig, WorkerConfig, load_celery_config, load_worker_config
from celery_bridge.contract import TASK_NAME
from celery_bridge.models import queue_for

log = logging.getLogger(__name__)
DRAIN_MARGIN_S = 30  # beyond the task time limit: the ack, the consumer's exit, Serve's own steps


def drain_timeout_s(config: CeleryConfig) -> float:
    """How long a stopping replica may take to finish its render (the hard task time limit)."""
    return float(config.time_limit_s + 10)


def graceful_shutdown_timeout_s(config: CeleryConfig) -> float:
    """Serve's force-kill deadline for a stopping replica: after its drain, never during it."""
    return drain_timeout_s(config) + DRAIN_MARGIN_S


def drain(consumer: Optional["ServeConsumer"], timeout_s: float, resend_every_s: float = 2.0) -> bool:
    """Warm-shut the Celery worker thread of Serve's adapter; True once it has exited.

    Celery's remote `shutdown` stops consuming and lets the running task finish and ack. It goes
    through the worker's pidbox, which a worker that is still starting (or reconnecting to
    Redis) does not hear yet, so it is sent again until the thread exits or `timeout_s` passes.
    """
    thread = consumer.thread if consumer is not None else None
    if thread is None:
        return True
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            consumer.ask_to_shut_down()
        except Exception as exc:  # noqa: BLE001 - Redis away: try again until the deadline
            log.warning("could not ask the Celery worker to stop (%s); retrying", exc)
        thread.join(min(resend_every_s, max(0.0, deadline - time.monotonic())))
    if thread.is_alive():
        log.warning("the Celery worker did not stop within %.0f s; the replica exits anyway", timeout_s)
        return False
    consumer.forget_thread()
    return True


class ServeConsumer:
    """The only place that reads Ray Serve's Celery adapter's private attributes (`_adapter` of a
    task-consumer replica; its `_app`, `_worker_thread`, `_worker_hostname`): Serve's public
    stop_consumer() sends one shutdown and waits 10 s, too little for a render in progress.
    tests/unit/test_serve_consumer.py fails loudly when a Ray upgrade renames any of them."""

    REPLICA_ATTRIBUTE = "_adapter"
    ADAPTER_ATTRIBUTES = ("_app", "_worker_thread", "_worker_hostname")

    def __init__(self, adapter: Any):
        self._adapter = adapter

    @classmethod
    def of(cls, replica: Any) -> Optional["ServeConsumer"]:
        adapter = getattr(replica, cls.REPLICA_ATTRIBUTE, None)
        return cls(adapter) if adapter is not None else None

    @property
    def thread(self) -> Any:
        return self._adapter._worker_thread

    def stopped(self) -> bool:
        """The consumer thread was started and has exited."""
        return self.thread is not None and not self.thread.is_alive()

    def ask_to_shut_down(self) -> None:
        self._adapter._app.control.broadcast("shutdown", destination=[f"celery@{self._adapter._worker_hostname}"])

    def forget_thread(self) -> None:
        self._adapter._worker_thread = None


def task_processor_config(config: CeleryConfig, model: str) -> TaskProcessorConfig:
    """Serve's Celery adapter on `model`'s queue, with sdgate's settings (JSON only, leases, limits)."""
    settings = {k: v for k, v in celery_settings(config).items() if k not in SERVE_MANAGED_KEYS}
    transport_options = settings.pop("broker_transport_options")
    return TaskProcessorConfig(
        queue_name=queue_for(config.queue, model),
        max_retries=0,  # the task body reports errors as results; nothing to retry blindly
        adapter_config=CeleryAdapterConfig(
            broker_url=config.broker_url(),
            backend_url=result_backend_url(config, WorkerRedisBackend),
            app_custom_config=settings,
            task_custom_config={"autoretry_for": ()},
            broker_transport_options=transport_options,
        ),
    )


def consumer_class(celery_config: CeleryConfig, model: str):
    """The task-consumer class for `celery_config`'s broker and `model`'s queue (not yet a deployment)."""

    @task_consumer(task_processor_config=task_processor_config(celery_config, model))
    class GenerationConsumer:
        """One Ray-managed worker: the resident pipeline behind Serve's Celery consumer thread."""

        def __init__(self, worker_config: Dict[str, Any]):
            from celery_bridge.worker import WorkerRuntime

            self.runtime = WorkerRuntime(celery_config, WorkerConfig(**worker_config), "the Ray worker replica")

        @task_handler(name=TASK_NAME)
        def generate(self, payload: Any) -> Dict[str, Any]:
            return self.runtime.service.handle(payload)

        def check_health(self) -> None:
            consumer = ServeConsumer.of(self)
            if consumer is not None and consumer.stopped():
                raise RuntimeError("the Celery consumer thread of this replica has stopped")

    class DrainingGenerationConsumer(GenerationConsumer):
        """Stops like a Celery warm shutdown: no new task, the running one finished and acked."""

        def __del__(self):
            # Serve calls this when it stops the replica. The adapter's own stop waits 10 s, and
            # Serve would then kill a render in progress; wait for the whole task time limit.
            try:
                drain(ServeConsumer.of(self), drain_timeout_s(celery_config))
            finally:
                runtime = getattr(self, "runtime", None)
                if runtime is not None:
                    runtime.stop()  # after the drain: the running task kept its lease until acked

    DrainingGenerationConsumer.__name__ = DrainingGenerationConsumer.__qualname__ = "GenerationConsumer"
    return DrainingGenerationConsumer


def replica_batch_size(worker_config: WorkerConfig) -> int:
    """max_batch_size of a replica: its setting, else the catalogue's value when it holds a GPU, else 1."""
    from celery_bridge.batching import batch_size_for
    from celery_bridge.models import load_catalogue

    entry = load_catalogue().get(worker_config.model)
    catalogued = entry.batch_slots(entry.batching != "window") if entry else 1  # before the pipeline says its mode
    return batch_size_for(worker_config.max_batch_size, catalogued, "cuda" if worker_config.num_gpus > 0 else "cpu")


def build_app(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """Serve application builder (`import_path: celery_bridge.consumer:build_app`).

    args: {"celery": {CeleryConfig overrides}, "worker": {WorkerConfig overrides, `model` naming a
    catalogued model}, "num_replicas": n or "autoscaling_config": {...}}; a Serve config file may
    override the deployment options. One application serves one model, from that model's queue.
    """
    args = args or {}
    celery_config = load_celery_config(**args.get("celery", {}))
    worker_config = load_worker_config(**args.get("worker", {}))
    worker_config = dataclasses.replace(worker_config, max_batch_size=replica_batch_size(worker_config))
    deployment = serve.deployment(
        consumer_class(celery_config, worker_config.model),
        name="GenerationConsumer",
        # Also the consumer thread count: one thread, or one per request of a batch feeding the
        # replica's one render thread (celery_bridge/batching.py).
        max_ongoing_requests=worker_config.max_batch_size,
        **({"autoscaling_config": args["autoscaling_config"]} if args.get("autoscaling_config")
           else {"num_replicas": args.get("num_replicas", 1)}),
        ray_actor_options={"num_gpus": worker_config.num_gpus, "num_cpus": 1},
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s(celery_config),
    )
    return deployment.bind(dataclasses.asdict(worker_config))
