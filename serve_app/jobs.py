"""Jobs: a generation that outlives the HTTP request that made it (see /v1/jobs in README).

A job is a waiter of the front service (its id is the waiter id) whose record lives in Redis for
JOB_TTL_S, so any gateway replica can answer GET, events, image and DELETE for it, and a replica
restart loses nothing: the record says what was asked, and a replica that finds a job whose owner
stopped renewing it adopts it (it asks the front again: a cache hit, a join, or a new render).

The owner replica runs the job as a coroutine on its HTTP loop and relays the flight's events to
its local SSE listeners; other replicas poll the record and the task's latest progress key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional

import redis
from sse_starlette import ServerSentEvent

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge import lua, progress, redis_keys
from celery_bridge.lifecycle import (RECORD_SCRIPT, TERMINAL as TERMINAL_STATES, IllegalTransition, State, advance,
                                     ended)
from serve_app import sse, stats
from serve_app.front import FrontService
from serve_app.tenants import ANONYMOUS, OPERATOR, Tenant

log = logging.getLogger(__name__)
JOB_TTL_S = 3600
OWNER_LEASE_S = 6.0
POLL_S = 0.25  # how often a replica that does not own a job looks at it for SSE
TERMINAL = tuple(state.value for state in TERMINAL_STATES)
SAVE_EVERY_S = 1.0  # progress within a state is saved at most this often (steps are read from the task's key)


def job_body(record: Dict[str, Any]) -> Dict[str, Any]:
    """The public `Job` object of the contract (no owner or task bookkeeping)."""
    body = {k: record.get(k) for k in ("id", "object", "state", "model", "key", "step", "steps", "queue_position",
                                         "eta_s", "created", "cached", "params", "error")}
    body["image_url"] = f"/v1/images/{record['key']}.png" if record.get("state") == "done" else None
    return body


class JobService:
    """Creates, runs, reads and cancels jobs for one gateway replica."""

    def __init__(self, front: FrontService):
        self.front = front
        self.redis: redis.Redis = front.redis
        self.replica = uuid.uuid4().hex[:12]
        self._record_script = self.redis.register_script(RECORD_SCRIPT)
        self._local: Dict[str, Dict[str, Any]] = {}  # job id -> {"record", "listeners": [asyncio.Queue]}
        self._stop = threading.Event()
        threading.Thread(target=self._keep, name="sdgate-jobs", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    # -- create and run -----------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest, previews: int = 0, client: str = "?",
                     tenant: Tenant = ANONYMOUS) -> Dict[str, Any]:
        """Create a job for `request`, owned by `tenant`; a cache hit is done at once. Raises ProtocolError."""
        protocol.check_previews(previews)
        normalized = await self.front.prepare(request)
        tenant.check_request(normalized.width, normalized.height, normalized.steps)
        record = {"id": "job-" + uuid.uuid4().hex, "object": "sdgate.job", "state": "queued",
                  "model": normalized.model, "key": normalized.cache_key(), "step": None, "steps": normalized.steps,
                  "queue_position": None, "eta_s": None, "created": int(time.time()), "cached": False,
                  "params": _params(normalized), "error": None, "previews": previews, "task_id": None,
                  "request": normalized.summary(), "seq": 0, "tenant": tenant.name}  # images by sha256: bytes beside it
        loop = asyncio.get_running_loop()
        cached = await loop.run_in_executor(None, self.front.cached, record["key"])
        if cached is not None:  # answered here; a miss is counted by the front when the job runs
            self.front.catalogue.count_request(normalized.model)
            self.front.counters.incr(stats.CACHE_HITS)
            self.front.served(tenant, cached)
            record.update(state="done", cached=True, step=normalized.steps)
            await loop.run_in_executor(None, self._save, _next(record))
            return record
        if tenant.max_queued:  # refused now (429), not after the 202; the job's wait renews it
            await loop.run_in_executor(None, self.front.tenant_waiting.enter, tenant, record["id"])
        if normalized.init_image is not None:  # kept once beside the record, which is saved at every step
            await loop.run_in_executor(None, self._save_images, record["id"], normalized)
        await loop.run_in_executor(None, self._save, _next(record), True)
        self._start(record, normalized, client, tenant)
        return record

    def _start(self, record: Dict[str, Any], request: GenerationRequest, client: str, tenant: Tenant) -> None:
        self._local[record["id"]] = {"record": record, "listeners": []}
        asyncio.get_running_loop().create_task(self._run(record, request, client, tenant))

    async def _run(self, record: Dict[str, Any], request: GenerationRequest, client: str, tenant: Tenant) -> None:
        job_id = record["id"]
        loop = asyncio.get_running_loop()
        last_saved = [0.0]

        def update(**changes: Any) -> None:
            preview = changes.pop("preview", None)
            state = changes.pop("state", None)
            moved = False
            if state is not None and state != record["state"]:
                try:
                    record["state"] = advance(State(record["state"]), State(state)).value
                    moved = True
                except IllegalTransition:
                    pass  # a late event (a queue position after the start): the job stays where it is
            record.update(changes)
            if record.get("task_id") is None:
                record["task_id"] = self.front.task_id_of(job_id)
            for queue in self._local.get(job_id, {}).get("listeners", []):
                queue.put_nowait(("progress", dict(record)))
                if preview:
                    queue.put_nowait(("preview", {"id": job_id, "step": record.get("step"),
                                                  "steps": record.get("steps"), "b64_png": preview}))
            now = time.monotonic()
            if moved or now - last_saved[0] >= SAVE_EVERY_S:
                last_saved[0] = now
                loop.run_in_executor(None, self._save_quietly, _next(record))

        def on_status(state: str) -> None:
            update(state="generating" if state == protocol.STATUS_GENERATING else "queued")

        def on_event(event: Dict[str, Any]) -> None:
            update(**{k: event.get(k) for k in ("step", "steps", "queue_position", "eta_s", "preview")
                      if k in event}, state="generating" if event.get("state") == "generating" else "queued")

        try:
            answer = await self.front.generate_async(request, on_status=on_status, client=client, on_event=on_event,
                                                     waiter_id=job_id, timeout_s=self.front.config.flight_timeout_s,
                                                     previews=record.get("previews") or 0, tenant=tenant)
            final = dict(state="done", cached=answer.cached, step=record.get("steps"), queue_position=None, eta_s=0.0)
        except ProtocolError as exc:
            final = dict(state=ended(exc.code).value, queue_position=None, eta_s=None,
                         error={"code": exc.code, "message": exc.message, "param": exc.field})
        except Exception:  # noqa: BLE001 - the job must end in a terminal state whatever happened
            log.exception("job %s failed", job_id)
            final = dict(state="failed", error={"code": protocol.E_INTERNAL, "message": "the gateway failed on this "
                                                "job; submit it again", "param": None})
        record.update(final)
        try:
            await loop.run_in_executor(None, self._save, _next(record))
        finally:
            entry = self._local.pop(job_id, None)
            for queue in (entry or {}).get("listeners", []):
                queue.put_nowait(("end", dict(record)))
            await loop.run_in_executor(None, self._quiet, self.redis.delete, redis_keys.JOB_OWNER + job_id)
            if tenant.max_queued:  # its place among the tenant's waiting images, whatever the outcome
                await loop.run_in_executor(None, self.front.tenant_waiting.leave, tenant.name, job_id)

    # -- read ----------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        """The job's record with live step/ETA (blocking: call it off the loop); None if unknown."""
        if not job_id.startswith("job-") or len(job_id) > 64:
            return None
        local = self._local.get(job_id)
        if local is not None:
            return dict(local["record"])
        raw = self.redis.get(redis_keys.JOB + job_id)
        if raw is None:
            return None
        record = json.loads(raw)
        if record.get("state") == "generating" and record.get("task_id"):
            event = progress.last_event(self.redis, record["task_id"])
            if event and isinstance(event.get("step"), int):
                record["step"] = event["step"]
                eta = progress.step_eta_s(dict(event, steps=event.get("steps") or record.get("steps")))
                if eta is not None:
                    record["eta_s"] = eta
        return record

    def adopt_if_orphaned(self, record: Dict[str, Any]) -> bool:
        """A running job whose owner stopped renewing (its replica died) is taken over here."""
        if record.get("state") in TERMINAL or record["id"] in self._local:
            return False
        if not self.redis.set(redis_keys.JOB_OWNER + record["id"], self.replica, nx=True, ex=int(OWNER_LEASE_S)):
            return False
        log.warning("adopting job %s: the replica that ran it stopped renewing it", record["id"])
        fields = dict(record["request"])
        if any(name + "_sha256" in fields for name in protocol.IMAGE_FIELDS):
            images = self.redis.hgetall(redis_keys.JOB_IMAGES + record["id"])
            for name in protocol.IMAGE_FIELDS:
                if fields.pop(name + "_sha256", None) is not None:
                    fields[name] = images[name.encode()]
        request = GenerationRequest.from_dict(fields)
        asyncio.get_running_loop().call_soon(self._start, record, request, "adopted", self._tenant_of(record))
        return True

    def _tenant_of(self, record: Dict[str, Any]) -> Tenant:
        """The tenant that submitted `record` (its limits and share as they are now)."""
        name = record.get("tenant") or ANONYMOUS.name
        shared = {ANONYMOUS.name: ANONYMOUS, OPERATOR.name: OPERATOR}
        tenants = self.front.admission.tenants
        return shared.get(name) or (tenants.get(name) if tenants is not None else None) or Tenant(name)

    async def read(self, job_id: str) -> Optional[Dict[str, Any]]:
        """get() off the loop, adopting an orphaned job."""
        record = await asyncio.get_running_loop().run_in_executor(None, self.get, job_id)
        if record is not None and record.get("state") not in TERMINAL:
            if self.adopt_if_orphaned(record):
                record = self._local[record["id"]]["record"] if record["id"] in self._local else record
        return record

    async def events(self, job_id: str, first: Dict[str, Any]) -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events for the job: progress (and previews when it asked), then done or error."""
        yield sse.event("progress", job_body(first))
        if first.get("state") in TERMINAL:
            yield sse.event("done" if first["state"] == "done" else "error", job_body(first))
            return
        local = self._local.get(job_id)
        if local is not None:
            queue: "asyncio.Queue" = asyncio.Queue()
            local["listeners"].append(queue)
            try:
                while True:
                    kind, data = await queue.get()
                    if kind == "end":
                        yield sse.event("done" if data["state"] == "done" else "error", job_body(data))
                        return
                    yield sse.event(kind, job_body(data) if kind == "progress" else data)
            finally:
                if queue in local["listeners"]:
                    local["listeners"].remove(queue)
        # Another replica runs it: follow its record and its task's latest step.
        last = json.dumps(job_body(first), sort_keys=True)
        deadline = time.monotonic() + JOB_TTL_S
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            record = await self.read(job_id)
            if record is None:
                yield sse.event("error", dict(job_body(first), state="failed", error={
                    "code": protocol.E_INTERNAL, "message": "the job expired", "param": None}))
                return
            body = job_body(record)
            if record.get("state") in TERMINAL:
                yield sse.event("done" if record["state"] == "done" else "error", body)
                return
            now = json.dumps(body, sort_keys=True)
            if now != last:
                last = now
                yield sse.event("progress", body)

    # -- cancel --------------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Optional[Dict[str, Any]]:
        """Cancel the named job only: its waiter leaves, and the task stops if nobody else waits."""
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(None, self.get, job_id)
        if record is None or record.get("state") in TERMINAL:
            return record
        if self.front.cancel(job_id):
            for _ in range(200):  # the job's coroutine records the cancel
                if job_id not in self._local:
                    break
                await asyncio.sleep(0.01)
            return await loop.run_in_executor(None, self.get, job_id)
        # The owner is another replica: tell it, and cancel the waiter on the task directly.
        def remote() -> Dict[str, Any]:
            self.redis.set(redis_keys.JOB_CANCEL + job_id, "1", ex=JOB_TTL_S)
            if record.get("task_id"):
                self.front.cancel_task(record["task_id"], job_id)
            record.update(state="cancelled", queue_position=None, eta_s=None,
                          error={"code": protocol.E_CANCELLED, "message": "cancelled at the client's request",
                                 "param": None})
            if not self._save(_next(record)):  # it ended meanwhile: the stored end stands
                return self.get(job_id) or record
            return record

        return await loop.run_in_executor(None, remote)

    # -- records -------------------------------------------------------------------------------------

    def _save(self, snapshot: Dict[str, Any], own: bool = False) -> bool:
        """Write a snapshot made by _next: refused (False) when a later one, or an end, is stored
        already (lifecycle.RECORD_SCRIPT), so the record never moves backwards."""
        pipe = self.redis.pipeline(transaction=False)
        lua.call(self._record_script, [redis_keys.JOB + snapshot["id"]],
                 [json.dumps(snapshot, separators=(",", ":")), JOB_TTL_S], pipe)
        if own:
            pipe.set(redis_keys.JOB_OWNER + snapshot["id"], self.replica, ex=int(OWNER_LEASE_S))
        return bool(pipe.execute()[0])

    def _save_images(self, job_id: str, request: GenerationRequest) -> None:
        images = {name: getattr(request, name) for name in protocol.IMAGE_FIELDS if getattr(request, name) is not None}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(redis_keys.JOB_IMAGES + job_id, mapping=images)
        pipe.expire(redis_keys.JOB_IMAGES + job_id, JOB_TTL_S)
        pipe.execute()

    def _save_quietly(self, record: Dict[str, Any]) -> None:
        self._quiet(self._save, record)

    @staticmethod
    def _quiet(call, *args) -> None:
        try:
            call(*args)
        except redis.RedisError as exc:
            log.warning("job bookkeeping failed: %s", exc)

    def _keep(self) -> None:
        """Renew the owner lease of the jobs running here; apply cancels that reached other replicas."""
        while not self._stop.wait(OWNER_LEASE_S / 3):
            ids: List[str] = list(self._local)
            if not ids:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.set(redis_keys.JOB_OWNER + job_id, self.replica, ex=int(OWNER_LEASE_S))
                    pipe.exists(redis_keys.JOB_CANCEL + job_id)
                replies = pipe.execute()
                for job_id, cancelled in zip(ids, replies[1::2]):
                    if cancelled:
                        self.front.cancel(job_id)
            except redis.RedisError as exc:
                log.warning("renewing job leases failed: %s", exc)


def _next(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record's next version to save: its sequence number raised, then a copy taken."""
    record["seq"] = int(record.get("seq") or 0) + 1
    return dict(record)


def _params(request: GenerationRequest) -> Dict[str, Any]:
    images = {k: v for k, v in request.summary().items() if k.endswith("_sha256") or k == "strength"}
    return images | {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "width": request.width,
            "height": request.height, "steps": request.steps, "guidance": request.guidance_scale,
            "seed": request.seed, "scheduler": request.scheduler, "model": request.model}
