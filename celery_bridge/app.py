"""The one Celery app definition: settings shared by the gateway's producer and every worker.

`app` is the module-level app Celery's own tools load: `celery -A celery_bridge inspect
ping|active|stats`, `celery -A celery_bridge events` and Flower (`celery -A celery_bridge flower`).
It is configured from configs/celery.yaml, the secrets file and SDGATE_* when first used.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Type

from celery import Celery, states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from celery_bridge import lua
from celery_bridge.config import CeleryConfig, load_celery_config
from celery_bridge.contract import TASK_NAME

log = logging.getLogger(__name__)

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


# KEYS[1] the task's result key. ARGV: its new state (encoded), expiry s (0: none). Stores and publishes
# it unless the stored state is SUCCESS already; returns 1 when stored.
_STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


RIDERS_KEPT = 1024  # tasks whose commands wait for their stored result (more: the oldest are dropped)
_riders: "OrderedDict[str, Callable[[Any], None]]" = OrderedDict()
_riders_lock = threading.Lock()


def send_with_result(task_id: str, queue_commands: Callable[[Any], None]) -> None:
    """Have `queue_commands(pipeline)` queue commands that WorkerRedisBackend sends in the same round
    trip as `task_id`'s stored result, just before it (a worker's report of the task's end). Keyed by
    task id, since Celery may store a result from a thread other than the task body's."""
    with _riders_lock:
        _riders[task_id] = queue_commands
        while len(_riders) > RIDERS_KEPT:
            dropped, _ = _riders.popitem(last=False)
            log.warning("task %s: its result was never stored here; its end report is dropped", dropped)


class WorkerRedisBackend(RedisBackend):
    """Celery's Redis result backend for the workers, storing a state in one round trip. Celery's
    own reads the stored state first (a SUCCESS is never overwritten, say by a redelivered task) and
    then writes and publishes: two round trips on the path of every image. Here the same check and
    write are one script, and the commands a worker gave `send_with_result` go just before it; the
    meta stored is Celery's own (tests/integration/test_result_channels.py compares them, so a Celery
    upgrade that changes either shows there)."""

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        with _riders_lock:
            rider = _riders.pop(bytes_to_str(task_id), None)
        self.ensure(self._store_unless_succeeded, (self.get_key_for_task(task_id), value, int(expires or 0), rider))
        return result

    @cached_property
    def _store_script(self):
        return self.client.register_script(_STORE_UNLESS_SUCCEEDED)

    def _store_unless_succeeded(self, key, value, expires_s: int, rider: Optional[Callable[[Any], None]]) -> None:
        if rider is None:
            self._store_script(keys=[key], args=[value, expires_s])
            return
        pipe = self.client.pipeline(transaction=False)
        rider(pipe)
        lua.call(self._store_script, [key], [value, expires_s], pipe)
        *report, stored = pipe.execute(raise_on_error=False)
        if isinstance(stored, Exception):
            raise stored
        failed = [reply for reply in report if isinstance(reply, Exception)]
        if failed:  # the result is stored; a lost report only delays fair share's slot (it lapses)
            log.warning("a task end report beside result %s failed: %s", key, failed[0])


def make_celery_app(config: Optional[CeleryConfig] = None, name: str = "sdgate",
                    backend: Optional[Type[RedisBackend]] = None) -> Celery:
    """A configured Celery app on the Redis broker and result backend of `config`; `backend`: the
    result backend's class (the gateway's SendOnlyRedisBackend, the workers' WorkerRedisBackend)."""
    config = config or load_celery_config()
    app = Celery(name, broker=config.broker_url(), backend=result_backend_url(config, backend))
    app.conf.update(celery_settings(config))
    return app


def result_backend_url(config: CeleryConfig, backend: Optional[Type[RedisBackend]] = None) -> str:
    """The result backend's URL, in Celery's `module:Class+url` form when `backend` names a class."""
    url = config.broker_url()
    return f"{backend.__module__}:{backend.__name__}+{url}" if backend is not None else url


def _module_app_settings() -> Dict[str, Any]:
    config = load_celery_config()
    return dict(celery_settings(config), broker_url=config.broker_url(), result_backend=config.broker_url())


app = Celery("sdgate", set_as_current=False)
app.add_defaults(_module_app_settings)  # lazily: importing this module reads no config
