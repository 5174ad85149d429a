"""Fair share between tenants: no tenant's backlog in front of another's first image.

A miss is not sent to its model's Celery queue at once. It waits in its tenant's backlog in Redis
(`enqueue`), and a model's Celery queue is given only what its live workers can start now
(`release`): the slots the workers announce, less the tasks released and not finished yet. Which
tenant goes next is start-time fair queueing: each tenant has a virtual time that grows by
1/weight per released task; the backlogged tenant with the least goes next, first in first out
within it, and a tenant that comes back starts at the model's virtual clock (no credit saved up
while idle, and, once all its work has finished, no debt either). A tenant's `max_running` caps
its released tasks.

Every step is one Lua script, so Redis holds the whole state and no process is special: every
gateway replica runs a `Dispatcher`, the scripts serialise them, and killing any of them loses
nothing. A new task that may start at once is queued by the very script that holds and releases
it (`enqueue_and_release`), with the message Celery's own `send_task` builds for it
(celery_bridge/task_message.py). Any other released task is sent with `send_task` by the
dispatcher that released it; until that send is confirmed it sits under a short lease, and if the
dispatcher dies first, the next release hands it out again (sent again only if the broker does not
have it).

Workers call `finished` when a task ends, whatever its outcome, in the round trip that stores its
result, just before it: it frees the slot, counts the tenant's usage and, when tasks of the queue
are held, wakes a dispatcher.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import redis

from celery_bridge import lua, redis_keys
from celery_bridge.task_message import TaskMessage

log = logging.getLogger(__name__)
SEND_LEASE_MS = 5000  # a released task whose send is not confirmed within this is handed out again
OUT_TTL_MS = 15 * 60 * 1000  # a released task no worker reports finished stops holding its slot after this
RELEASE_BATCH = 64  # tasks released by one script call at most
WAKE_LIMIT = 64  # pending wake-ups kept (more say nothing new)
IDLE_PERIOD_S = 0.5  # a dispatcher looks at every queue this often even when nobody wakes it

# Each step is a Lua function of (K, A), its keys and arguments, so that one script can also run
# two steps in one round trip (_ENQUEUE_AND_RELEASE).
# K: tenants, backlog, held, vtime, clock, wake, queue held, tenant out.
# A: tenant, task id, entry (JSON), queue, wake ('1': wake a dispatcher). Returns the tenant's
# tasks held for this queue after this one.
# A tenant with nothing held or running starts at the clock: no credit for its idle time, and no
# debt for work of its that finished while nobody else waited.
_ENQUEUE_FN = """local function enqueue(K, A)
if redis.call('HEXISTS', K[3], A[2]) == 1 then return redis.call('LLEN', K[2]) end
redis.call('SADD', K[1], A[1])
if redis.call('LLEN', K[2]) == 0 then
  local clock = tonumber(redis.call('GET', K[5]) or '0') or 0
  local vt = tonumber(redis.call('HGET', K[4], A[1]) or '0') or 0
  local t = redis.call('TIME')
  redis.call('ZREMRANGEBYSCORE', K[8], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if vt < clock or redis.call('ZCARD', K[8]) == 0 then redis.call('HSET', K[4], A[1], tostring(clock)) end
end
redis.call('RPUSH', K[2], A[2])
redis.call('HSET', K[3], A[2], A[3])
redis.call('SADD', K[7], A[2])
if A[5] == '1' then
  redis.call('LPUSH', K[6], A[4])
  redis.call('LTRIM', K[6], 0, __WAKE_LIMIT__)
end
return redis.call('LLEN', K[2])
end
""".replace("__WAKE_LIMIT__", str(WAKE_LIMIT - 1))

# K: tenants, held, vtime, clock, out, presence, slots, sending, queue held.
# A: backlog prefix, tenant record prefix, tenant out prefix, send lease ms, out ttl ms, most to
#    release.
# Returns {task id, entry, retry} for each task to send now (retry: an unconfirmed send of before).
_RELEASE_FN = """local function release(K, A)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, ttl = tonumber(A[4]), tonumber(A[5])
local released = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K[8], '-inf', now, 'LIMIT', 0, 16)) do
  local entry = redis.call('HGET', K[2], id)
  if entry then
    redis.call('ZADD', K[8], now + lease, id)
    released[#released + 1] = {id, entry, '1'}
  else
    redis.call('ZREM', K[8], id)
  end
end
redis.call('ZREMRANGEBYSCORE', K[5], '-inf', now)
local capacity = 0
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', K[6], '(' .. t[1], '+inf')) do
  capacity = capacity + (tonumber(redis.call('HGET', K[7], worker) or '1') or 1)
end
if capacity == 0 then capacity = 1 end  -- nobody serves it yet: one queued task shows there is work
local free = math.min(capacity - redis.call('ZCARD', K[5]), tonumber(A[6]))
if free <= 0 then return released end
local tenants = redis.call('SMEMBERS', K[1])
local clock = tonumber(redis.call('GET', K[4]) or '0') or 0
while free > 0 do
  local best, best_vt, best_weight = nil, 0, 1
  for _, name in ipairs(tenants) do
    if redis.call('LLEN', A[1] .. name) > 0 then
      local record = A[2] .. name
      local cap = tonumber(redis.call('HGET', record, 'max_running') or '0') or 0
      local open = true
      if cap > 0 then
        redis.call('ZREMRANGEBYSCORE', A[3] .. name, '-inf', now)
        open = redis.call('ZCARD', A[3] .. name) < cap
      end
      if open then
        local vt = tonumber(redis.call('HGET', K[3], name) or '0') or 0
        if best == nil or vt < best_vt or (vt == best_vt and name < best) then
          best, best_vt = name, vt
          best_weight = tonumber(redis.call('HGET', record, 'weight') or '1') or 1
        end
      end
    end
  end
  if best == nil then break end
  local id = redis.call('LPOP', A[1] .. best)
  redis.call('SREM', K[9], id)
  local entry = redis.call('HGET', K[2], id)
  if entry then
    if best_weight <= 0 then best_weight = 1 end
    redis.call('HSET', K[3], best, tostring(best_vt + 1 / best_weight))
    if best_vt > clock then clock = best_vt end
    redis.call('ZADD', K[5], now + ttl, id)
    redis.call('ZADD', A[3] .. best, now + ttl, id)
    redis.call('ZADD', K[8], now + lease, id)
    released[#released + 1] = {id, entry, '0'}
    free = free - 1
  end
end
redis.call('SET', K[4], tostring(clock))
return released
end
"""
_ENQUEUE_KEYS, _ENQUEUE_ARGS, _RELEASE_KEYS, _RELEASE_ARGS = 8, 5, 9, 6
_ENQUEUE = _ENQUEUE_FN + "return enqueue(KEYS, ARGV)"
_RELEASE = _RELEASE_FN + "return release(KEYS, ARGV)"
# KEYS: enqueue's, release's, then the new task's Celery queue list. ARGV: enqueue's, release's, then
# the new task's message and its task-sent event (celery_bridge/task_message.py), then the channels
# that event is published on. A new task released at once is queued by this script: its message
# pushed as kombu would push it (it is never "sending"). Returns release's rows for what else was
# released, for the caller to send.
_ENQUEUE_AND_RELEASE = _ENQUEUE_FN + _RELEASE_FN + """
local function slice(t, from, to)
  local out = {}
  for i = from, to do out[#out + 1] = t[i] end
  return out
end
local EK, EA, RK, RA = __EK__, __EA__, __RK__, __RA__
local new_id = ARGV[2]
enqueue(slice(KEYS, 1, EK), slice(ARGV, 1, EA))
local release_keys = slice(KEYS, EK + 1, EK + RK)
local rows = {}
for _, row in ipairs(release(release_keys, slice(ARGV, EA + 1, EA + RA))) do
  if row[1] == new_id and row[3] == '0' then
    redis.call('LPUSH', KEYS[EK + RK + 1], ARGV[EA + RA + 1])
    for i = EA + RA + 3, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[EA + RA + 2]) end
    redis.call('ZREM', release_keys[8], new_id)
    redis.call('HDEL', release_keys[2], new_id)
  else
    rows[#rows + 1] = row
  end
end
return rows
""".replace("__EK__", str(_ENQUEUE_KEYS)).replace("__EA__", str(_ENQUEUE_ARGS)).replace(
    "__RK__", str(_RELEASE_KEYS)).replace("__RA__", str(_RELEASE_ARGS))

# KEYS: held, the Celery queue, vtime, tenants. ARGV: backlog prefix, tenant record prefix, task ids.
# Returns each held task's place in line (the Celery queue's length, plus the held tasks that fair
# share would release first: its own tenant's ahead of it and, from each other tenant, those whose
# start tags come before its own), or -1 for a task not held.
_POSITIONS = """
local in_queue = redis.call('LLEN', KEYS[2])
local backlogged = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local length = redis.call('LLEN', ARGV[1] .. name)
  if length > 0 then
    backlogged[name] = {tonumber(redis.call('HGET', KEYS[3], name) or '0') or 0,
                        tonumber(redis.call('HGET', ARGV[2] .. name, 'weight') or '1') or 1, length}
  end
end
local places = {}
for i = 3, #ARGV do
  local place = -1
  local entry = redis.call('HGET', KEYS[1], ARGV[i])
  if entry then
    local tenant = cjson.decode(entry)['payload']['tenant']
    local own = backlogged[tenant]
    local index = own and redis.call('LPOS', ARGV[1] .. tenant, ARGV[i])
    if index then
      local tag = own[1] + index / own[2]
      place = in_queue + index
      for name, other in pairs(backlogged) do
        if name ~= tenant and tag > other[1] then
          place = place + math.min(other[3], math.ceil((tag - other[1]) * other[2]))
        end
      end
    end
  end
  places[#places + 1] = place
end
return places
"""

# KEYS: out, tenant out, wake, queue held. ARGV: task id, queue. Wakes a dispatcher only when tasks of
# the queue are held (with none, its round would release nothing).
_FINISHED = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[4]) > 0 then
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('LTRIM', KEYS[3], 0, __WAKE_LIMIT__)
end
return 1
""".replace("__WAKE_LIMIT__", str(WAKE_LIMIT - 1))


def backlog_key(queue: str, tenant: str) -> str:
    return f"{redis_keys.FAIR_BACKLOG}{queue}:{tenant}"


def queue_held_key(queue: str) -> str:
    return f"{redis_keys.FAIR_QUEUED}{queue}"


def tenant_counter(tenant: str, counter: str) -> str:
    """The STATS field of `counter` for `tenant` (tenant names have no ':')."""
    return f"{redis_keys.TENANT_COUNTER}{tenant}:{counter}"


IMAGES_RENDERED, GPU_MS, IMAGES_SERVED = "images_rendered", "gpu_ms", "images_served"


class FairShare:
    """The scripts, registered once per client."""

    def __init__(self, client: redis.Redis, send_lease_ms: int = SEND_LEASE_MS):
        self.client, self.send_lease_ms = client, send_lease_ms
        self._enqueue = client.register_script(_ENQUEUE)
        self._release = client.register_script(_RELEASE)
        self._finished = client.register_script(_FINISHED)
        self._positions = client.register_script(_POSITIONS)
        self._enqueue_and_release = client.register_script(_ENQUEUE_AND_RELEASE)

    def enqueue(self, queue: str, tenant: str, task_id: str, entry: Dict[str, Any], wake: bool = True) -> int:
        """Put `task_id` at the end of `tenant`'s backlog for `queue`; returns how many it holds there.
        `wake`: wake a dispatcher (False when the caller releases right after)."""
        keys, args = self._enqueue_call(queue, tenant, task_id, entry, wake)
        return int(self._enqueue(keys=keys, args=args))

    def positions(self, queue: str, task_ids: List[str]) -> Dict[str, int]:
        """Each held task's 0-based place in line for `queue` (0: next to start); tasks not held are left out."""
        if not task_ids:
            return {}
        keys = [redis_keys.FAIR_HELD, queue, redis_keys.FAIR_VTIME + queue, redis_keys.FAIR_TENANTS + queue]
        places = self._positions(keys=keys, args=[backlog_key(queue, ""), redis_keys.TENANT, *task_ids])
        return {task_id: int(place) for task_id, place in zip(task_ids, places) if int(place) >= 0}

    def release(self, queue: str, model: str, most: int = RELEASE_BATCH) -> List[Tuple[str, Dict[str, Any], bool]]:
        """Hand out what `queue`'s workers can start now: [(task id, entry, retry)]; send each, then
        `confirm` it."""
        keys, args = self._release_call(queue, model, most)
        return _released(self._release(keys=keys, args=args))

    def enqueue_and_release(self, queue: str, model: str, tenant: str, task_id: str, entry: Dict[str, Any],
                            message: TaskMessage) -> List[Tuple[str, Dict[str, Any], bool]]:
        """`enqueue` then `release`, in one round trip, and the new task, if released, queued by the
        same script with `message` (its broker message as Celery would send it). Returns the other
        released tasks, to send and confirm as `release`'s."""
        enqueue_keys, enqueue_args = self._enqueue_call(queue, tenant, task_id, entry, wake=False)
        release_keys, release_args = self._release_call(queue, model, RELEASE_BATCH)
        return _released(self._enqueue_and_release(
            keys=enqueue_keys + release_keys + [message.list_key],
            args=enqueue_args + release_args + [message.body, message.event, *message.event_channels]))

    @staticmethod
    def _enqueue_call(queue: str, tenant: str, task_id: str, entry: Dict[str, Any],
                      wake: bool) -> Tuple[List[str], List[Any]]:
        keys = [redis_keys.FAIR_TENANTS + queue, backlog_key(queue, tenant), redis_keys.FAIR_HELD,
                redis_keys.FAIR_VTIME + queue, redis_keys.FAIR_CLOCK + queue, redis_keys.FAIR_WAKE,
                queue_held_key(queue), redis_keys.TENANT_OUT + tenant]
        return keys, [tenant, task_id, json.dumps(entry), queue, "1" if wake else "0"]

    def _release_call(self, queue: str, model: str, most: int) -> Tuple[List[str], List[Any]]:
        keys = [redis_keys.FAIR_TENANTS + queue, redis_keys.FAIR_HELD, redis_keys.FAIR_VTIME + queue,
                redis_keys.FAIR_CLOCK + queue, redis_keys.FAIR_OUT + queue, redis_keys.PRESENCE + model,
                redis_keys.WORKER_SLOTS + model, redis_keys.FAIR_SENDING, queue_held_key(queue)]
        return keys, [backlog_key(queue, ""), redis_keys.TENANT, redis_keys.TENANT_OUT, self.send_lease_ms,
                      OUT_TTL_MS, most]

    def confirm(self, task_ids: Iterable[str]) -> None:
        """These released tasks are with the broker now."""
        task_ids = list(task_ids)
        if task_ids:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(redis_keys.FAIR_SENDING, *task_ids)
            pipe.hdel(redis_keys.FAIR_HELD, *task_ids)
            pipe.execute()

    def finished(self, queue: str, tenant: str, task_id: str, gpu_ms: Optional[float], pipe: Any = None) -> None:
        """A worker is done with `task_id` (any outcome): free its slot, count the tenant's usage
        (`gpu_ms` for a rendered image, None otherwise), wake a dispatcher; queued on `pipe` when given."""
        own = pipe is None
        pipe = self.client.pipeline(transaction=False) if own else pipe
        lua.call(self._finished, [redis_keys.FAIR_OUT + queue, redis_keys.TENANT_OUT + tenant, redis_keys.FAIR_WAKE,
                                  queue_held_key(queue)], [task_id, queue], pipe)
        if gpu_ms is not None:
            pipe.hincrby(redis_keys.STATS, tenant_counter(tenant, IMAGES_RENDERED), 1)
            pipe.hincrby(redis_keys.STATS, tenant_counter(tenant, GPU_MS), int(round(gpu_ms)))
        if own:
            pipe.execute()


class Dispatcher:
    """One per gateway replica: releases work when woken (a task queued or finished) and every
    IDLE_PERIOD_S, and sends what it released with `send(task_id, entry)`; `known(task_id, entry)`
    says whether a released task the previous dispatcher may have sent is with the broker already."""

    def __init__(self, fair: FairShare, queues: Callable[[], Iterable[Tuple[str, str]]],
                 send: Callable[[str, Dict[str, Any]], None], known: Callable[[str, Dict[str, Any]], bool]):
        self.fair, self.queues, self.send, self.known = fair, queues, send, known
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdgate-fair-share", daemon=True)

    def start(self) -> "Dispatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def release_once(self, queue: str, model: str) -> int:
        """Release and send what `queue` can start now; returns how many were sent."""
        sent = self._send(self.fair.release(queue, model))
        self.fair.confirm(sent)
        return len(sent)

    def submit(self, queue: str, model: str, tenant: str, task_id: str, entry: Dict[str, Any],
               message: TaskMessage) -> None:
        """Put a new task in `tenant`'s backlog and release what may start now: one script, which
        queues the new task itself (with `message`) when a slot is free; then the sends of any older
        tasks it released, and their confirmation. RedisError when the task could not be held; a
        failure after that is logged (the send lease hands those tasks out again)."""
        released = self.fair.enqueue_and_release(queue, model, tenant, task_id, entry, message)
        if not released:
            return
        try:
            self.fair.confirm(self._send(released))
        except Exception as exc:  # noqa: BLE001 - kombu raises several families; the lease covers them
            log.warning("sending released tasks failed (%s); they are handed out again in %.0f s", exc,
                        self.fair.send_lease_ms / 1000)

    def _send(self, released: List[Tuple[str, Dict[str, Any], bool]]) -> List[str]:
        """Send each released task (a retry only if the broker does not have it yet); returns their ids."""
        for task_id, entry, retry in released:
            if not (retry and self.known(task_id, entry)):
                self.send(task_id, entry)
        return [task_id for task_id, _, _ in released]

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                woken = self.fair.client.blpop([redis_keys.FAIR_WAKE], timeout=IDLE_PERIOD_S)
                queues = list(self.queues())
                if woken is not None:
                    queue = text(woken[1])
                    queues = [pair for pair in queues if pair[0] == queue] or queues
                for queue, model in queues:
                    self.release_once(queue, model)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("fair-share dispatch lost Redis (%s); retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, 2.0)
            except Exception:  # noqa: BLE001 - e.g. kombu failing to publish; the lease hands it out again
                log.exception("fair-share dispatch failed; retrying in 1 s")
                self._stop.wait(1.0)


def _released(rows: List[Any]) -> List[Tuple[str, Dict[str, Any], bool]]:
    return [(text(task_id), json.loads(entry), text(retry) == "1") for task_id, entry, retry in rows]


def text(value: Any) -> str:
    """A Redis reply as str (redis-py gives bytes unless decode_responses is on)."""
    return value.decode() if isinstance(value, bytes) else str(value)
