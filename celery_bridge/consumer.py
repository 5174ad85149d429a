"""Workers orchestrated by Ray: a Serve task-consumer deployment on the same queue and task name.

Each replica holds one resident pipeline (and `num_gpus` GPUs, from configs/worker.yaml or the
Serve config) and runs Ray Serve's Celery adapter with one consumer thread, so Ray places,
restarts and scales the workers while the data path stays Redis + Celery.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from ray import serve
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_consumer, task_handler

from celery_bridge.app import SERVE_MANAGED_KEYS, celery_settings
from celery_bridge.config import CeleryConfig, WorkerConfig, load_celery_config, load_worker_config
from celery_bridge.contract import TASK_NAME
from celery_bridge.models import queue_for


def task_processor_config(config: CeleryConfig, model: str) -> TaskProcessorConfig:
    """Serve's Celery adapter on `model`'s queue, with sdgate's settings (JSON only, leases, limits)."""
    settings = {k: v for k, v in celery_settings(config).items() if k not in SERVE_MANAGED_KEYS}
    transport_options = settings.pop("broker_transport_options")
    return TaskProcessorConfig(
        queue_name=queue_for(config.queue, model),
        max_retries=0,  # the task body reports errors as results; nothing to retry blindly
        adapter_config=CeleryAdapterConfig(
            broker_url=config.broker_url(),
            backend_url=config.broker_url(),
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
            import redis

            from celery_bridge.lease import LeaseKeeper
            from celery_bridge.presence import Heartbeat, count_rendered
            from celery_bridge.worker import GenerationService

            client = redis.Redis.from_url(celery_config.broker_url(), socket_timeout=5, socket_connect_timeout=3)
            self.service = GenerationService(WorkerConfig(**worker_config),
                                             time_limit_s=celery_config.soft_time_limit_s,
                                             on_rendered=lambda name: count_rendered(client, name))
            self.leases = LeaseKeeper(celery_config.broker_url(), celery_config.lease_renew_s).start()
            self.presence = Heartbeat(client, model, self.service.name).start()

        @task_handler(name=TASK_NAME)
        def generate(self, payload: Any) -> Dict[str, Any]:
            return self.service.handle(payload)

        def __del__(self) -> None:
            presence = getattr(self, "presence", None)
            if presence is not None:
                presence.stop()

        def check_health(self) -> None:
            thread = getattr(getattr(self, "_adapter", None), "_worker_thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError("the Celery consumer thread of this replica has stopped")

    return GenerationConsumer


def build_app(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """Serve application builder (`import_path: celery_bridge.consumer:build_app`).

    args: {"celery": {CeleryConfig overrides}, "worker": {WorkerConfig overrides, `model` naming a
    catalogued model}, "num_replicas": n or "autoscaling_config": {...}}; a Serve config file may
    override the deployment options. One application serves one model, from that model's queue.
    """
    args = args or {}
    celery_config = load_celery_config(**args.get("celery", {}))
    worker_config = load_worker_config(**args.get("worker", {}))
    deployment = serve.deployment(
        consumer_class(celery_config, worker_config.model),
        name="GenerationConsumer",
        max_ongoing_requests=1,  # also the consumer thread count: one pipeline, one thread
        **({"autoscaling_config": args["autoscaling_config"]} if args.get("autoscaling_config")
           else {"num_replicas": args.get("num_replicas", 1)}),
        ray_actor_options={"num_gpus": worker_config.num_gpus, "num_cpus": 1},
    )
    return deployment.bind(dataclasses.asdict(worker_config))
