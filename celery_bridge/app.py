"""The one Celery app definition: settings shared by the gateway's producer and every worker.

`app` is the module-level app Celery's own tools load: `celery -A celery_bridge inspect
ping|active|stats`, `celery -A celery_bridge events` and Flower (`celery -A celery_bridge flower`).
It is configured from configs/celery.yaml, the secrets file and SDGATE_* when first used.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from celery import Celery
from celery.backends.redis import RedisBackend

from celery_bridge.config import CeleryConfig, load_celery_config
from celery_bridge.contract import TASK_NAME

# Keys Ray Serve's Celery adapter manages itself (it sets the same values we want: late acks,
# requeue on worker loss) and refuses in app_custom_config.
SERVE_MANAGED_KEYS = {"worker_pool", "worker_concurrency", "task_ignore_result", "task_acks_late",
                      "task_reject_on_worker_lost"}


def celery_settings(config: CeleryConfig) -> Dict[str, Any]:
    """Lowercase Celery settings for `config`: JSON only, late acks, prefetch 1, bounded everything."""
    socket_opts = {"socket_timeout": 10, "socket_connect_timeout": 5, "retry_on_timeout": True,
                   "health_check_interval": 10}
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": False,
        # Waiters see "generating" from the STARTED state that the worker's start check stores and
        # publishes (celery_bridge/progress.py), one round trip sooner than Celery's own would.
        "task_track_started": False,
        "worker_prefetch_multiplier": 1,
        "result_expires": config.result_expires_s,
        "task_soft_time_limit": config.soft_time_limit_s,
        "task_time_limit": config.time_limit_s,
        "task_default_queue": config.queue,
        "task_routes": {TASK_NAME: {"queue": config.queue}},
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": config.visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            **socket_opts,
        },
        "redis_socket_timeout": socket_opts["socket_timeout"],
        "redis_socket_connect_timeout": socket_opts["socket_connect_timeout"],
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": 10,
        "worker_consumer": "celery_bridge.worker:QuickReconnectConsumer",
        "worker_hijack_root_logger": False,
        # Task events (sent, received, started, succeeded) for Flower and `celery events`; one
        # small PUBLISH each, measured by `python -m bench miss` (events on vs off).
        "worker_send_task_events": config.task_events,
        "task_send_sent_event": config.task_events,
    }


class SendOnlyRedisBackend(RedisBackend):
    """Celery's Redis result backend for a process that sends tasks and reads their results with its
    own listener (the gateway's producer). Celery's own would subscribe to every sent task's channel,
    and unsubscribe when the unused AsyncResult is collected, on a connection nothing reads: each
    send left its two confirmations (about 270 bytes) unread there, 800 kB after 3000 sends, until
    Redis dropped the connection at its pub/sub output limit."""

    def on_task_call(self, producer, task_id):
        pass


def make_celery_app(config: Optional[CeleryConfig] = None, name: str = "sdgate",
                    reads_own_results: bool = False) -> Celery:
    """A configured Celery app on the Redis broker and result backend of `config`;
    `reads_own_results`: with SendOnlyRedisBackend."""
    config = config or load_celery_config()
    backend = config.broker_url()
    if reads_own_results:  # Celery's `class+url` form of a backend
        backend = f"{SendOnlyRedisBackend.__module__}:{SendOnlyRedisBackend.__name__}+{backend}"
    app = Celery(name, broker=config.broker_url(), backend=backend)
    app.conf.update(celery_settings(config))
    return app


def _module_app_settings() -> Dict[str, Any]:
    config = load_celery_config()
    return dict(celery_settings(config), broker_url=config.broker_url(), result_backend=config.broker_url())


app = Celery("sdgate", set_as_current=False)
app.add_defaults(_module_app_settings)  # lazily: importing this module reads no config
