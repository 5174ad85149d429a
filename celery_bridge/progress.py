"""Live progress, waiters and cancel flags of a task, shared by workers and gateways through Redis.

Per task (never one channel every replica parses for every task):
- `sdgate:progress:<task_id>`: a pub/sub channel the worker publishes step events on (throttled),
  which only the gateways watching that task subscribe to (celery_bridge/producer.py);
- `sdgate:progress-last:<task_id>`: the latest event (short TTL), for any replica that asks later;
- `sdgate:waiters:<task_id>`: a sorted set of waiter ids scored by their lease expiry (ms of Redis
  server time: never a host's clock), and
  `sdgate:watched:<task_id>`, set by the gateway that queues the task: a watched task with no live
  waiter that has not started is skipped by the worker, so nobody's GPU renders an orphan;
- `sdgate:cancel:<task_id>`: set when the last waiter cancels; the worker checks it before it
  starts and at every denoising step, and stops.

Imports no torch at module level: the gateway uses the key helpers and the waiter scripts.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import redis
from redis.commands.core import Script

from celery_bridge import lua, redis_keys

log = logging.getLogger(__name__)
TASK_TTL_S = 3600  # the per-task keys outlive any request (bounded, like the job records)
MIN_INTERVAL_S = 0.1  # at most ~10 progress events a second per task
MAX_PREVIEW_BYTES = 64 * 1024
RENDER_SAMPLES = 16
CANCELLED_MESSAGE = "cancelled: every client waiting for this image left or cancelled it"

# A fixed linear map from SD 1.x/2.x's 4 latent channels to RGB ("Approx cheap" in A1111, InvokeAI).
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))

# Waiter leases are scored in Redis server time (ms), written and read inside these scripts, so
# the clocks of the gateway and worker hosts never meet.
_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
# A Lua function, shared with the claim script (serve_app/claims.py): lease the waiter ids
# ARGV[first..] on the `waiters` zset for `lease_ms` of server time and keep it `ttl` s; with
# `watched` (a key name) mark the task watched; with `renew`, extend only waiters still registered
# (a renewal queued just before a waiter left must not add it back after its removal).
LEASE_WAITERS_FN = _NOW_MS + """local function lease_waiters(waiters, watched, lease_ms, ttl, first, renew)
local expiry = now + lease_ms
for i = first, #ARGV do
  if renew then redis.call('zadd', waiters, 'XX', expiry, ARGV[i]) else redis.call('zadd', waiters, expiry, ARGV[i]) end
end
redis.call('expire', waiters, ttl)
if watched then redis.call('set', watched, '1', 'EX', ttl) end
end
"""
# KEYS[1] waiters zset, optional KEYS[2] watched flag. ARGV: lease ms, ttl s, then waiter ids.
_ADD_WAITERS = LEASE_WAITERS_FN + "lease_waiters(KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2], 3, false) return 1"
_RENEW_WAITERS = LEASE_WAITERS_FN + "lease_waiters(KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2], 3, true) return 1"
# KEYS[1] waiters zset, KEYS[2] cancel flag. ARGV: waiter id, ttl s.
# Removes the waiter and the lapsed ones; when none is left, raises the cancel flag. Returns the
# number of live waiters left (0: this cancel stops the task).
_LEAVE_AND_CANCEL = _NOW_MS + """
redis.call('zrem', KEYS[1], ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local left = redis.call('zcard', KEYS[1])
if left == 0 then redis.call('set', KEYS[2], '1', 'EX', ARGV[2]) end
return left
"""
# KEYS[1] cancel flag, KEYS[2] watched flag, KEYS[3] waiters zset, optionally KEYS[4] the task's Celery result
# key. ARGV[1] its STARTED state as Celery's result backend encodes it, ARGV[2] that state's ttl (s).
# Returns {cancelled, watched, live waiters}. A task that may start gets its STARTED state stored and
# published as Celery's task_track_started would store it, in this same round trip.
_START_CHECK = _NOW_MS + """
local cancelled, watched = redis.call('exists', KEYS[1]), redis.call('exists', KEYS[2])
local live = redis.call('zcount', KEYS[3], now, '+inf')
if KEYS[4] and cancelled == 0 and (watched == 0 or live > 0) then
  redis.call('set', KEYS[4], ARGV[1], 'EX', ARGV[2])
  redis.call('publish', KEYS[4], ARGV[1])
end
return {cancelled, watched, live}
"""
# KEYS[1] queue list. ARGV[1] scan limit, then task ids. Returns each id's 0-based position from the
# consuming end (kombu LPUSHes and BRPOPs, so the oldest is at the right), or -1 when not seen.
_QUEUE_POSITIONS = """
local len = redis.call('llen', KEYS[1])
local limit = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do out[i - 1] = -1 end
local start = len - limit
if start < 0 then start = 0 end
local items = redis.call('lrange', KEYS[1], start, -1)
for idx, raw in ipairs(items) do
  for i = 2, #ARGV do
    if out[i - 1] == -1 and string.find(raw, ARGV[i], 1, true) then out[i - 1] = #items - idx end
  end
end
return out
"""


@functools.lru_cache(maxsize=256)
def _script(client: redis.Redis, source: str) -> Script:
    """`source` registered on `client` once (its SHA computed once): the lease keeper runs these for
    every flight several times a second."""
    return client.register_script(source)


def channel(task_id: str) -> str:
    return redis_keys.PROGRESS_CHANNEL + task_id


def add_waiters(client: redis.Redis, task_id: str, waiter_ids: List[str], lease_s: float, pipe=None,
                watched: bool = False, renew: bool = False) -> None:
    """Register `waiter_ids` on `task_id` for `lease_s` of Redis server time (`renew`: only extend
    those still registered), and with `watched` mark the task watched; in one round trip, or queued
    on `pipe` when given."""
    if not waiter_ids and not watched:
        return
    keys = [redis_keys.WAITERS + task_id] + ([redis_keys.WATCHED + task_id] if watched else [])
    lua.call(_script(client, _RENEW_WAITERS if renew else _ADD_WAITERS), keys,
             [int(lease_s * 1000), TASK_TTL_S, *waiter_ids], pipe if pipe is not None else client)


def remove_waiter(client: redis.Redis, task_id: str, waiter_id: str) -> None:
    """`waiter_id` no longer waits (it left); a running render goes on and is cached."""
    client.zrem(redis_keys.WAITERS + task_id, waiter_id)


def cancel(client: redis.Redis, task_id: str, waiter_id: str) -> int:
    """`waiter_id` cancels: it leaves, and if it was the last live waiter the task is cancelled.
    Returns the live waiters left (0 means the task stops)."""
    script = _script(client, _LEAVE_AND_CANCEL)
    return int(script(keys=[redis_keys.WAITERS + task_id, redis_keys.TASK_CANCEL + task_id],
                      args=[waiter_id, TASK_TTL_S]))


def queue_positions(client: redis.Redis, queue: str, task_ids: List[str], limit: int = 1000) -> Dict[str, Optional[int]]:
    """0-based place of each task in `queue` (0: next to start), None when not within `limit` of the head."""
    if not task_ids:
        return {}
    script = _script(client, _QUEUE_POSITIONS)
    found = script(keys=[queue], args=[limit, *task_ids])
    return {task_id: (int(pos) if int(pos) >= 0 else None) for task_id, pos in zip(task_ids, found)}


def last_event(client: redis.Redis, task_id: str) -> Optional[Dict[str, Any]]:
    raw = client.get(redis_keys.PROGRESS_LAST + task_id)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def step_eta_s(event: Dict[str, Any]) -> Optional[float]:
    """Seconds left for a render at the pace of its steps so far, from a step event ({step, steps,
    elapsed}); None when the event cannot say."""
    step, steps, elapsed = event.get("step"), event.get("steps"), event.get("elapsed")
    if isinstance(step, int) and isinstance(steps, int) and isinstance(elapsed, (int, float)) and step > 0:
        return round(elapsed / step * (steps - step), 2)
    return None


def recent_render_s(client: redis.Redis, model: str) -> Optional[float]:
    """Mean of the model's recent render times in seconds, None before the first."""
    samples = [float(x) for x in client.lrange(redis_keys.RENDER_MS + model, 0, RENDER_SAMPLES - 1)]
    return sum(samples) / len(samples) / 1000 if samples else None


def record_render(pipe: Any, model: str, ms: float) -> None:
    """Queue on `pipe` one render time of `model` (the newest RENDER_SAMPLES make its queue ETAs)."""
    pipe.lpush(redis_keys.RENDER_MS + model, round(ms, 1))
    pipe.ltrim(redis_keys.RENDER_MS + model, 0, RENDER_SAMPLES - 1)


class TaskCancelled(RuntimeError):
    """The task's last waiter cancelled it (or every waiter left before it started)."""


class ProgressReporter:
    """Worker side, one per task: gate the start, publish throttled steps, stop on a cancel flag."""

    def __init__(self, client: redis.Redis, task_id: str, steps: int, previews: int = 0,
                 min_interval_s: float = MIN_INTERVAL_S, started_state: Optional[Tuple[str, str, int]] = None):
        """`started_state`: (result key, encoded state, ttl s) that check_start stores and publishes
        when the task may start: its Celery STARTED state (the worker's `_started_state`)."""
        self.client, self.task_id, self.steps = client, task_id, steps
        self.started_state = started_state
        self.previews = max(0, int(previews))
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        self._last_sent = 0.0
        self.steps_run = 0  # the worker's own step count (tests read it from the last event)
        self._start_check_sent_on: Any = None  # the connection a sent start check's answer comes on

    def _start_check_call(self) -> Tuple[List[str], List[Any]]:
        keys = [redis_keys.TASK_CANCEL + self.task_id, redis_keys.WATCHED + self.task_id, redis_keys.WAITERS + self.task_id]
        args: List[Any] = []
        if self.started_state is not None:
            result_key, state, ttl_s = self.started_state
            keys, args = keys + [result_key], [state, max(1, int(ttl_s))]
        return keys, args

    def send_start_check(self) -> None:
        """Send the start check now and read its answer in check_start, so the render prepares (the
        prompt's encoding, the first latents) while Redis answers. Sent on a connection of the
        client's pool, held until check_start or drop_start_check gives it back."""
        keys, args = self._start_check_call()
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_command("EVALSHA", _script(self.client, _START_CHECK).sha, len(keys), *keys, *args)
        except redis.RedisError:  # check_start makes the round trip itself
            pool.release(connection)
            return
        self._start_check_sent_on = connection

    def drop_start_check(self) -> None:
        """Read and forget the answer of a start check sent but never checked (the render failed
        before its first step), so its connection goes back to the pool clean."""
        self._start_check_answer()

    def _start_check_answer(self) -> Optional[List[int]]:
        connection, self._start_check_sent_on = self._start_check_sent_on, None
        if connection is None:
            return None
        try:
            return connection.read_response()
        except redis.RedisError:  # NOSCRIPT, or a broken connection (redis-py disconnects it)
            return None
        finally:
            self.client.connection_pool.release(connection)

    def check_start(self) -> None:
        """Raise TaskCancelled when the task was cancelled, or every waiter left before it started;
        otherwise store and publish its `started_state`, where the gateways watching it see it start.
        Reads the answer of send_start_check when one was sent, else makes the round trip now."""
        answer = self._start_check_answer()
        if answer is None:
            keys, args = self._start_check_call()
            answer = _script(self.client, _START_CHECK)(keys=keys, args=args)
        cancelled, watched, live = answer
        if cancelled:
            raise TaskCancelled(CANCELLED_MESSAGE)
        if watched and not live:
            raise TaskCancelled("expired: every client waiting for this image left before it started")

    def on_step(self, step: int, steps: Optional[int] = None, latents: Any = None) -> None:
        """Called after denoising step `step` (0-based) of `steps`; raises TaskCancelled when cancelled."""
        self.steps_run = step + 1
        if isinstance(steps, int) and steps > 0:
            self.steps = steps
        now = time.monotonic()
        last = self.steps_run >= self.steps
        preview = self.previews and latents is not None and (self.steps_run % self.previews == 0)
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(redis_keys.TASK_CANCEL + self.task_id)  # first: a cancel seen here stops this very step
        event: Dict[str, Any] = {"task_id": self.task_id, "step": self.steps_run, "steps": self.steps,
                                 "elapsed": round(now - self.started, 3)}
        # The latest step is stored every step (one SET in the same round trip), published throttled.
        publish = preview or last or now - self._last_sent >= self.min_interval_s
        if publish:
            self._last_sent = now
            if preview:
                png = latent_preview(latents)
                if png is not None:
                    event["preview"] = base64.b64encode(png).decode("ascii")
            pipe.publish(redis_keys.PROGRESS_CHANNEL + self.task_id, json.dumps(event, separators=(",", ":")))
        event.pop("preview", None)
        pipe.set(redis_keys.PROGRESS_LAST + self.task_id, json.dumps(event, separators=(",", ":")), ex=TASK_TTL_S)
        try:
            cancelled = pipe.execute()[0]
        except redis.RedisError as exc:  # progress is best effort; the render goes on
            log.debug("progress for %s not sent: %s", self.task_id, exc)
            return
        if cancelled:
            raise TaskCancelled(f"{CANCELLED_MESSAGE} (stopped after step {self.steps_run} of {self.steps})")


def latent_preview(latents: Any) -> Optional[bytes]:
    """A small PNG of the first latent image by a fixed linear projection (no model), <= 64 KB."""
    import torch
    from PIL import Image

    with torch.no_grad():
        lat = latents[0].float()
        if lat.shape[0] >= 4:
            rgb = torch.einsum("chw,cr->rhw", lat[:4], torch.tensor(LATENT_RGB, device=lat.device))
        else:
            rgb = lat[:3] if lat.shape[0] >= 3 else lat[:1].repeat(3, 1, 1)
        rgb = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(rgb)
    for _ in range(4):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        if buffer.tell() <= MAX_PREVIEW_BYTES:
            return buffer.getvalue()
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))
    return None
