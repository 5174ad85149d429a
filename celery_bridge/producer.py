"""The producer side the gateway calls: submit a generation, watch for its result.

Imports no torch or diffusers. Results arrive through Celery's Redis result backend, which
stores each task's state under a key and publishes it on a channel of the same name; one
listener thread per process subscribes to the channels of exactly the tasks this process
watches (so a replica never reads the results of other replicas' tasks) and wakes the waiter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import redis
from kombu.transport.redis import Channel as KombuRedisChannel

from client.protocol import E_INTERNAL, GenerationRequest
from celery_bridge import progress, redis_keys
from celery_bridge.fair_share import Dispatcher, FairShare
from celery_bridge.app import SendOnlyRedisBackend, make_celery_app
from celery_bridge.config import CeleryConfig
from celery_bridge.contract import TASK_NAME, GenerationResult, task_payload
from celery_bridge.models import queue_for
from celery_bridge.task_message import TaskMessages

log = logging.getLogger(__name__)
STATE_STARTED, STATE_SUCCESS, STATE_FAILURE = "STARTED", "SUCCESS", "FAILURE"
# kombu's Redis transport keeps a queue as one list per priority step and a popped, unacknowledged
# message in its unacked hash.
LOST_CHECK_S = 5.0  # how often submitted tasks are looked for; lost after two misses in a row
# How long the listener waits for a message before it applies new (un)subscriptions; a result
# published meanwhile is not missed (the listener reads each key once it has subscribed).
SUBSCRIBE_LAG_S = 0.05
SUBSCRIBE_BATCH = 500  # channels per SUBSCRIBE/UNSUBSCRIBE command

# KEYS: result key of each task id, then the queue lists, then the fair-share held hash (or a key
# that is never written), then the unacked hash. ARGV: the task ids.
# Returns the ids with no result (not even STARTED), in no queue list or backlog and held by no
# worker: lost.
# One script, so a task cannot move between those places while we look.
_FIND_LOST = """
local n = #ARGV
local seen = {}
local function scan(raws)
  for _, raw in ipairs(raws) do
    for id in string.gmatch(raw, '__PREFIX__[%w%-]+') do seen[id] = true end
  end
end
for q = n + 1, #KEYS - 2 do scan(redis.call('LRANGE', KEYS[q], 0, -1)) end
scan(redis.call('HVALS', KEYS[#KEYS]))
local lost = {}
for i = 1, n do
  if not seen[ARGV[i]] and redis.call('EXISTS', KEYS[i]) == 0 and redis.call('HEXISTS', KEYS[#KEYS - 1], ARGV[i]) == 0 then
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
""".replace("__PREFIX__", redis_keys.TASK_ID.replace("-", "%-"))


def new_task_id(key: str) -> str:
    """Task ids name the cache key they render, plus a nonce so a retry never sees a stale result."""
    return f"{redis_keys.TASK_ID}{key}-{uuid.uuid4().hex[:12]}"


class GenerationProducer:
    """Sends sdgate.generate tasks and resolves their results (one per gateway process)."""

    def __init__(self, config: CeleryConfig):
        self.config = config
        self.app = make_celery_app(config, name="sdgate-gateway", backend=SendOnlyRedisBackend)
        self.redis = config.redis_client(socket_timeout=5, socket_connect_timeout=3, health_check_interval=10)
        prefix = self.app.backend.task_keyprefix
        self._result_prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
        self._watches: Dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._subscriptions_stale = threading.Event()  # set when the watched ids change
        self._listener_reading = False  # the listener may be blocked reading its channels (not on the event)
        self._wake_channel = redis_keys.LISTENER_WAKE_CHANNEL + uuid.uuid4().hex
        self.messages_received = 0  # result messages this process's listener read and parsed
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="sdgate-results", daemon=True)
        self._listener.start()
        self._find_lost = self.redis.register_script(_FIND_LOST)
        self.fair = FairShare(self.redis)
        self.dispatcher: Optional[Dispatcher] = None
        self.messages = TaskMessages(self.app)  # a new task's message, for fair share's script to queue
        self._poller = threading.Thread(target=self._poll_pending, name="sdgate-results-poll", daemon=True)
        self._poller.start()

    def submit(self, request: GenerationRequest, task_id: str, previews: int = 0,
               expires_s: Optional[float] = None, tenant: Optional[str] = None) -> None:
        """Queue one generation under `task_id` (call watch() first so no result is missed).

        With a `tenant` it waits in that tenant's fair-share backlog until the model's workers can
        start it (celery_bridge/fair_share.py; start_dispatcher must run in some process); without,
        it goes to the model's Celery queue now. While the task is watched it is queued again if
        the broker loses it (see _requeue_lost). `previews`: a preview every k steps; `expires_s`:
        Celery drops it unstarted that long after it reaches the queue.
        """
        payload, queue = self._message(request, previews, tenant)
        entry = {"payload": payload, "queue": queue, "expires_s": expires_s}
        if tenant is None:
            self.app.send_task(TASK_NAME, args=[payload], task_id=task_id, queue=queue, expires=expires_s)
        elif self.dispatcher is not None:  # a free worker starts it now, not on a wake-up
            self.dispatcher.submit(queue, payload["model"], tenant, task_id, entry,
                                   self.messages.build(task_id, payload, queue, expires_s))
        else:  # another process's dispatcher releases it
            self.fair.enqueue(queue, tenant, task_id, entry)
        self._remember(task_id, payload, queue)

    def start_dispatcher(self, models: Callable[[], List[str]]) -> Dispatcher:
        """Release fair-share backlogs of `models` from this process (one per gateway replica)."""
        def queues() -> List[Tuple[str, str]]:
            return [(queue_for(self.config.queue, model), model) for model in models()]

        def send(task_id: str, entry: Dict[str, Any]) -> None:
            self.app.send_task(TASK_NAME, args=[entry["payload"]], task_id=task_id, queue=entry["queue"],
                               expires=entry.get("expires_s"))

        def known(task_id: str, entry: Dict[str, Any]) -> bool:
            return self.task_known(task_id, entry["payload"]["model"], held=False)

        self.dispatcher = Dispatcher(self.fair, queues, send, known).start()
        return self.dispatcher

    def adopt(self, request: GenerationRequest, task_id: str, previews: int = 0,
              expires_s: Optional[float] = None, tenant: Optional[str] = None) -> bool:
        """Take `task_id` over from a gateway that stopped renewing its claim (it died). From now on
        this process re-queues it if the broker loses it (_requeue_lost: the one recovery path), and
        it is queued now if it is nowhere (its first owner died before queueing it, or the broker
        lost it since). True when it was queued now."""
        payload, queue = self._message(request, previews, tenant)
        queued_now = not self.task_known(task_id, payload["model"])
        if queued_now:
            self.submit(request, task_id, previews, expires_s, tenant)
        else:
            self._remember(task_id, payload, queue)
        return queued_now

    def _message(self, request: GenerationRequest, previews: int,
                 tenant: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
        """The task's payload and the queue of its model (only that model's workers consume it)."""
        payload = task_payload(request)
        if previews:
            payload["previews"] = int(previews)  # the worker pops it: not part of the request or its key
        if tenant is not None:
            payload["tenant"] = tenant  # popped too: whose usage the render is
        return payload, queue_for(self.config.queue, payload["model"])

    def _remember(self, task_id: str, payload: Dict[str, Any], queue: str) -> None:
        """While `task_id` is watched, this process queues it again if the broker loses it."""
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is not None:
                watch.payload, watch.queue = payload, queue

    def watch(self, task_id: str, on_started: Optional[Callable[[], None]] = None,
              on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
              unsent: bool = False) -> "Future[GenerationResult]":
        """A future for `task_id`'s result; `on_started` runs once when a worker picks it up, and
        `on_progress(event)` on the listener thread for each step event (celery_bridge/progress.py).
        `unsent`: this process has yet to send the task, so nothing can be stored for it yet (no
        look-up now; the listener reads the key once subscribed, as for every watch)."""
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is None:
                watch = self._watches[task_id] = _Watch()
            if on_started:
                watch.on_started.append(on_started)
            if on_progress:
                watch.on_progress.append(on_progress)
        self._subscriptions_stale.set()
        if self._listener_reading:  # blocked on its channels: it would see the new id only at its timeout
            self._wake_listener()
        if not unsent:
            self._check(task_id)  # the result may already be there (a joined or finished task)
        return watch.future

    def unwatch(self, task_id: str) -> None:
        """Stop waiting for `task_id` (its channel is unsubscribed)."""
        with self._lock:
            self._watches.pop(task_id, None)
        self._subscriptions_stale.set()

    def task_known(self, task_id: str, model: str, held: bool = True) -> bool:
        """Whether `task_id` has a state or result, waits in `model`'s queue (or, `held`, in a
        fair-share backlog), or is held by a worker."""
        keys = [self._result_prefix + task_id, *_queue_lists(queue_for(self.config.queue, model)),
                redis_keys.FAIR_HELD if held else redis_keys.FAIR_HELD + ":none", redis_keys.KOMBU_UNACKED]
        return not self._find_lost(keys=keys, args=[task_id])

    def queue_length(self, model: Optional[str] = None) -> int:
        """Tasks waiting for `model`'s workers (None: the base queue, which no worker consumes)."""
        return int(self.redis.llen(queue_for(self.config.queue, model) if model else self.config.queue))

    def close(self) -> None:
        self._stop.set()
        if self.dispatcher is not None:
            self.dispatcher.stop()

    # -- result delivery -------------------------------------------------------------------------

    def _deliver(self, task_id: str, raw: Optional[bytes]) -> None:
        if raw is None:
            return
        try:
            meta = json.loads(raw)
            state = meta.get("status")
        except (ValueError, AttributeError):
            state, meta = STATE_FAILURE, {"result": {"exc_message": "unreadable result in the backend"}}
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is None:
                return
            if state == STATE_STARTED:
                callbacks, watch.on_started = watch.on_started, []
            elif state in (STATE_SUCCESS, STATE_FAILURE, "REVOKED"):
                self._watches.pop(task_id, None)
                self._subscriptions_stale.set()
                callbacks = []
            else:
                return
        for callback in callbacks:
            callback()
        if state == STATE_STARTED:
            return
        if state == STATE_SUCCESS:
            result = GenerationResult.from_json(meta.get("result"))
        else:
            result = GenerationResult.failure(E_INTERNAL, f"the worker failed: {_failure_text(meta)}")
        if not watch.future.done():
            watch.future.set_result(result)

    def _deliver_progress(self, task_id: str, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        with self._lock:
            watch = self._watches.get(task_id)
            callbacks = list(watch.on_progress) if watch is not None else []
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - one listener must not stop result delivery
                log.exception("a progress listener failed")

    def _wake_listener(self) -> None:
        try:
            self.redis.publish(self._wake_channel, b"")
        except redis.RedisError as exc:  # it subscribes at its next timeout (SUBSCRIBE_LAG_S) instead
            log.debug("could not wake the result listener: %s", exc)

    def _check(self, task_id: str) -> None:
        try:
            self._deliver(task_id, self.redis.get(self._result_prefix + task_id))
        except redis.RedisError as exc:
            log.debug("result check for %s failed: %s", task_id, exc)

    def _listen(self) -> None:
        """Subscribe to the result channel of each watched task; reconnect with backoff when Redis drops."""
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            subscribed: Set[str] = set()
            self._subscriptions_stale.set()  # a new connection subscribes to everything watched
            try:
                while not self._stop.is_set():
                    # Set before looking at the event, so a watch added after the look wakes the read below.
                    self._listener_reading = True
                    if self._subscriptions_stale.is_set():
                        self._subscriptions_stale.clear()
                        added = self._resubscribe(pubsub, subscribed)
                        backoff = 0.1
                        if added:  # published before the subscription took effect: read the keys
                            self._poll_once(added)
                    # Idle only once the last unsubscribe is confirmed: a result published before it
                    # (already delivered by the poll) is still read off the connection, not left there.
                    if not subscribed and not pubsub.subscribed:
                        self._listener_reading = False
                        self._subscriptions_stale.wait(1.0)
                        continue
                    message = pubsub.get_message(timeout=SUBSCRIBE_LAG_S)
                    if message and message.get("type") == "message":
                        channel = message["channel"].decode()
                        if channel == self._wake_channel:
                            continue
                        self.messages_received += 1
                        if channel.startswith(redis_keys.PROGRESS_CHANNEL):
                            self._deliver_progress(channel[len(redis_keys.PROGRESS_CHANNEL):], message["data"])
                        else:
                            self._deliver(channel[len(self._result_prefix):], message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("result listener lost Redis (%s); reconnecting in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass

    def _resubscribe(self, pubsub, subscribed: Set[str]) -> List[str]:
        """Bring `pubsub`'s channels in line with the watched task ids; returns the ids added."""
        with self._lock:
            wanted = set(self._watches)
        added, gone = sorted(wanted - subscribed), sorted(subscribed - wanted)
        # The wake channel is subscribed while some task is: with none, the listener waits on the event.
        if added and not subscribed:
            pubsub.subscribe(self._wake_channel)
        elif gone and not wanted:
            pubsub.unsubscribe(self._wake_channel)

        def channels(task_ids: List[str]) -> List[str]:  # each task's result and progress channels
            return [name for task_id in task_ids for name in (self._result_prefix + task_id, progress.channel(task_id))]

        for batch in _batches(gone):
            pubsub.unsubscribe(*channels(batch))
            subscribed.difference_update(batch)
        for batch in _batches(added):
            pubsub.subscribe(*channels(batch))
            subscribed.update(batch)
        return added

    def _poll_once(self, task_ids: Optional[List[str]] = None) -> None:
        """Read the stored result of `task_ids` (default: every watched task) and deliver it."""
        with self._lock:
            pending: List[str] = list(self._watches) if task_ids is None else task_ids
        if not pending:
            return
        raws = self.redis.mget([self._result_prefix + task_id for task_id in pending])
        for task_id, raw in zip(pending, raws):
            self._deliver(task_id, raw)

    def _poll_pending(self) -> None:
        """Safety net for a missed publish: look up every pending result every second; and every
        LOST_CHECK_S, requeue submitted tasks the broker lost."""
        last_check = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                self._poll_once()
                if time.monotonic() - last_check >= LOST_CHECK_S:
                    last_check = time.monotonic()
                    self._requeue_lost()
            except redis.RedisError:
                pass
            except Exception:  # noqa: BLE001 - e.g. kombu failing to publish; the next round retries
                log.exception("checking for lost tasks failed; retrying in %.0f s", LOST_CHECK_S)

    def _requeue_lost(self) -> None:
        """Send again each task this process submitted that is nowhere in Redis, twice in a row.

        kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged; if
        the worker's broker connection restarts in between (it does after a Redis restart), the
        message is gone and its waiters would wait for the request deadline. Two sightings
        LOST_CHECK_S apart rule out a worker caught between the pop and the record.
        """
        with self._lock:
            submitted = {task_id: watch for task_id, watch in self._watches.items() if watch.payload is not None}
        if not submitted:
            return
        ids = list(submitted)
        queues = [name for queue in sorted({watch.queue for watch in submitted.values()}) for name in _queue_lists(queue)]
        keys = [self._result_prefix + task_id for task_id in ids] + queues + [redis_keys.FAIR_HELD,
                                                                                  redis_keys.KOMBU_UNACKED]
        lost = {raw.decode() if isinstance(raw, bytes) else raw for raw in self._find_lost(keys=keys, args=ids)}
        for task_id, watch in submitted.items():
            if task_id not in lost:
                watch.missing = 0
                continue
            watch.missing += 1
            if watch.missing >= 2 and not watch.future.done():
                log.warning("task %s is no longer queued, held by a worker or finished: the broker lost it "
                            "(e.g. across a Redis restart); queueing it again", task_id)
                self.app.send_task(TASK_NAME, args=[watch.payload], task_id=task_id, queue=watch.queue)
                watch.missing = 0


def _queue_lists(queue: str) -> List[str]:
    """The Redis lists kombu keeps `queue` in: one per priority step."""
    return [f"{queue}{KombuRedisChannel.sep}{step}" if step else queue for step in KombuRedisChannel.priority_steps]


class _Watch:
    def __init__(self) -> None:
        self.future: "Future[GenerationResult]" = Future()
        self.on_started: List[Callable[[], None]] = []
        self.on_progress: List[Callable[[Dict[str, Any]], None]] = []
        self.payload: Optional[Dict[str, Any]] = None  # set when this process submitted the task
        self.queue = ""  # the model's queue it was sent to
        self.missing = 0  # consecutive checks that found the task nowhere


def _batches(items: List[str]) -> Iterator[List[str]]:
    for start in range(0, len(items), SUBSCRIBE_BATCH):
        yield items[start:start + SUBSCRIBE_BATCH]


def _failure_text(meta: Dict[str, Any]) -> str:
    result = meta.get("result")
    if isinstance(result, dict):
        return f"{result.get('exc_type', 'error')}: {result.get('exc_message', '')}"
    return str(result)[:300]
