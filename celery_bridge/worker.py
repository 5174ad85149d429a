"""The worker side: one resident pipeline per process, serving sdgate.generate.

Both worker modes run `GenerationService.handle` as the task body: the plain Celery process
(`sdgate worker`, below) and the Ray Serve task consumer (celery_bridge/consumer.py).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from celery.worker.consumer import Consumer

from client.protocol import E_CANCELLED, E_INTERNAL, E_TIMEOUT, MAX_PREVIEWS, GenerationRequest, InvalidRequest
from celery_bridge.app import send_with_result
from celery_bridge.config import CeleryConfig, WorkerConfig, load_celery_config, load_worker_config
from celery_bridge.contract import TASK_NAME, GenerationResult
from celery_bridge.fair_share import FairShare
from celery_bridge.models import queue_for
from celery_bridge.presence import count_rendered
from celery_bridge.progress import TASK_TTL_S, ProgressReporter, TaskCancelled, record_render

log = logging.getLogger(__name__)
RECONNECT_INTERVAL_MAX_S = 2.0  # Celery's own backoff grows to 30 s between broker reconnect attempts


class QuickReconnectConsumer(Consumer):
    """Celery's worker consumer, retrying a lost broker every RECONNECT_INTERVAL_MAX_S at the most.

    Celery passes kombu fixed intervals (2 s, growing by 2 s to 30 s), so after a long Redis
    outage a worker could sit idle for up to 30 s while the gateway already queues new work.
    """

    def ensure_connected(self, conn):
        retry = conn.ensure_connection
        conn.ensure_connection = functools.partial(retry, interval_start=0.2, interval_step=0.5,
                                                   interval_max=RECONNECT_INTERVAL_MAX_S)
        try:
            return super().ensure_connected(conn)
        finally:
            conn.ensure_connection = retry


class GenerationService:
    """Owns the resident pipeline of one worker process and turns task payloads into results."""

    def __init__(self, config: WorkerConfig, name: Optional[str] = None, time_limit_s: Optional[float] = None,
                 redis_client: Any = None, report_with_result: bool = False):
        """With `redis_client`, tasks report progress and honour cancels (celery_bridge/progress.py), and
        each task's end is reported (_report_end); `report_with_result`: beside the result that
        Celery stores with celery_bridge.app.WorkerRedisBackend."""
        from celery_bridge.batching import ShapeBatcher, batch_size_for
        from celery_bridge.models import load_catalogue

        entry = load_catalogue().get(config.model)
        if entry is not None and entry.kind == "sleep":  # a catalogue that names the bench/test stand-in
            from celery_bridge.sleep_model import SleepRunner, SleepTimeout  # no torch

            runner_class, self._timeout_error = SleepRunner, SleepTimeout
        else:
            from celery_bridge.pipeline import GenerationTimeout, PipelineRunner  # torch loads here, on workers only

            runner_class, self._timeout_error = PipelineRunner, GenerationTimeout
        self.time_limit_s = time_limit_s
        started = time.monotonic()
        self.runner = runner_class(config)
        self.load_seconds = time.monotonic() - started
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.tasks_done = 0
        self.redis = redis_client
        self.report_with_result = report_with_result
        self.fair = FairShare(redis_client) if redis_client is not None else None
        # 1 renders in the calling thread as before; more needs that many consumer threads (worker_argv).
        entry = self.runner.entry
        self.batching = batching_mode(config.batching or entry.batching, self.runner)
        self.max_batch_size = batch_size_for(config.max_batch_size, entry.batch_slots(self.batching == "continuous"),
                                             self.runner.device)
        self.batcher = self.loop = None
        if self.max_batch_size <= 1:
            self.batching = "solo"
        elif self.batching == "continuous":
            from celery_bridge.continuous import ContinuousLoop, DiffusersStepper

            self.loop = ContinuousLoop(DiffusersStepper(self.runner), self.max_batch_size, time_limit_s,
                                       lock=self.runner._lock, timeout_error=self._timeout_error)
        else:
            self.batcher = ShapeBatcher(self._render_batch, self.max_batch_size, config.batch_wait_ms / 1000)
        log.info("model %r batching: %s (%d at once)", config.model, self.batching, self.max_batch_size)

    def _render_batch(self, requests: List[GenerationRequest], on_step=None):
        return self.runner.render_batch(requests, self.time_limit_s, on_step)

    def _reporter(self, request: GenerationRequest, previews: Any):
        """The progress reporter of the Celery task being run, or None (no Redis, no task id)."""
        task_id, _ = _current_task()
        if self.redis is None or not task_id:
            return None
        return ProgressReporter(self.redis, task_id, request.steps or 0,
                                previews if isinstance(previews, int) and 0 < previews <= MAX_PREVIEWS else 0,
                                started_state=_started_state())

    def handle(self, payload: Any) -> Dict[str, Any]:
        """Render one request; never raises, so both worker modes report errors the same way.
        Whatever the outcome, the task's fair-share slot is freed and its tenant's usage counted."""
        tenant = payload.pop("tenant", None) if isinstance(payload, dict) else None  # not part of the request
        outcome = self._handle(payload)
        self._report_end(outcome, tenant)
        return outcome

    def _report_end(self, outcome: Dict[str, Any], tenant: Any) -> None:
        """The task's end, sent before its result is stored: its fair-share slot freed and its
        tenant's usage counted (so a gateway that learns of the result can release the next task at
        once), the render counted per model, and a render time for queue ETAs. With
        `report_with_result` these go in the result's own round trip (app.send_with_result), else
        in one of their own, now."""
        if self.redis is None:
            return
        task_id, queue = _current_task()
        gpu_ms = None
        if outcome.get("ok"):
            gpu_ms = float(outcome.get("pipeline_ms") or 0.0) / (outcome.get("batch_size") or 1)

        def queue_report(pipe: Any) -> None:
            if outcome.get("ok"):
                model = str(outcome.get("model"))
                count_rendered(pipe, model)
                record_render(pipe, model, gpu_ms)
            if isinstance(tenant, str) and task_id:
                self.fair.finished(queue, tenant, task_id, gpu_ms, pipe=pipe)

        if self.report_with_result and task_id:
            send_with_result(task_id, queue_report)
            return
        pipe = self.redis.pipeline(transaction=False)
        queue_report(pipe)
        try:
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the slot lapses by itself; the image must not be lost
            log.warning("could not report the end of task %s: %s", task_id, exc)

    def _handle(self, payload: Any) -> Dict[str, Any]:
        GenerationTimeout = self._timeout_error  # noqa: N806 - the runner's exception class

        previews = payload.pop("previews", 0) if isinstance(payload, dict) else 0  # not part of the request
        try:
            request = GenerationRequest.from_dict(payload)
            if request.model not in (None, self.runner.config.model):  # never cache another model's image
                raise InvalidRequest("model", f"{request.model!r} is not served here; this worker runs "
                                              f"{self.runner.config.model!r}")
            request = self.runner.resolve(request)  # gateways send it filled; direct senders may not
        except (InvalidRequest, TypeError) as exc:
            error = exc if isinstance(exc, InvalidRequest) else InvalidRequest("request", str(exc))
            log.info("rejected invalid task payload: %s", error)
            return GenerationResult.invalid(error).to_json()
        reporter = self._reporter(request, previews)
        try:
            # The start check (cancelled, or nobody waits any more: free the GPU for others) comes
            # first; rendering alone, its answer is read just before the first step, so Redis
            # answers while the prompt is encoded.
            if self.loop is not None and request.kind == "txt2img":  # joins the running loop at its next step
                if reporter is not None:
                    reporter.check_start()
                rendered = self.loop.submit(request, reporter.on_step if reporter else None)
                png, pipeline_ms, batch_size = rendered.png, rendered.pipeline_ms, rendered.batch_size
            elif self.batcher is not None:  # one call for several tasks, each with its own progress
                if reporter is not None:
                    reporter.check_start()
                rendered = self.batcher.submit(request, reporter.on_step if reporter else None)
                png, pipeline_ms, batch_size = rendered.png, rendered.pipeline_ms, rendered.batch_size
            else:
                if reporter is not None:
                    reporter.send_start_check()
                png = self.runner.render(request, self.time_limit_s, reporter.on_step if reporter else None,
                                         on_start=reporter.check_start if reporter else None)
                pipeline_ms, batch_size = self.runner.last_pipeline_ms, 1
        except TaskCancelled as exc:
            log.info("task for %s not rendered: %s", request.cache_key()[:12], exc)
            return GenerationResult.failure(E_CANCELLED, str(exc)).to_json()
        except GenerationTimeout as exc:
            log.warning("generation of %s stopped: %s", request.cache_key()[:12], exc)
            return GenerationResult.failure(E_TIMEOUT, str(exc)).to_json()
        except Exception as exc:  # noqa: BLE001 - reported to the waiting clients as `internal`
            log.exception("generation failed for %s", request.cache_key()[:12])
            return GenerationResult.failure(E_INTERNAL, f"generation failed on worker {self.name}: {exc}").to_json()
        finally:
            if reporter is not None:
                reporter.drop_start_check()  # a render that failed before its first step never read it
        self.tasks_done += 1
        result = GenerationResult.success(request, png, pipeline_ms, self.name)
        result.pipeline_loads, result.batch_size = type(self.runner).loads, batch_size
        return result.to_json()


def batching_mode(configured: str, runner: Any) -> str:
    """continuous or window, from the catalogue's `batching` and what the model's pipeline supports
    (a sleep stand-in or a family the loop cannot step gets window batching)."""
    from celery_bridge.continuous import supports_continuous

    supported = supports_continuous(getattr(runner, "pipe", None))
    if configured == "continuous" and not supported:
        log.warning("model %r: continuous batching asked for, but its pipeline (%s) is not one the loop steps "
                    "(Stable Diffusion 1.x/2.x, SDXL); batching by window instead", runner.config.model,
                    type(getattr(runner, "pipe", None)).__name__)
    return "continuous" if configured != "window" and supported else "window"


def _current_task() -> Tuple[Optional[str], str]:
    """(id, queue) of the Celery task this thread runs, or (None, "") outside one."""
    from celery import current_task

    request = getattr(current_task, "request", None) if current_task else None
    delivery = getattr(request, "delivery_info", None) or {}
    return getattr(request, "id", None), delivery.get("routing_key") or ""


def _started_state() -> Tuple[str, str, int]:
    """(result key, encoded state, ttl s) of the running Celery task's STARTED state, as Celery's
    task_track_started would store it: the worker's start check stores it in its own round trip."""
    from celery import current_task, states

    backend, request = current_task.backend, current_task.request
    meta = {"status": states.STARTED, "result": {"pid": os.getpid(), "hostname": request.hostname},
            "traceback": None, "children": [], "date_done": None, "task_id": request.id}
    key = backend.get_key_for_task(request.id)
    return key.decode() if isinstance(key, bytes) else key, backend.encode(meta), int(backend.expires or TASK_TTL_S)


def require_catalogued(model: str) -> None:
    """Raise ModelLoadError unless the catalogue lists `model`: no gateway routes work to other names."""
    from celery_bridge.models import CatalogueError, load_catalogue, models_file
    from celery_bridge.models import ModelLoadError

    try:
        catalogue = load_catalogue()
    except CatalogueError as exc:
        raise ModelLoadError(str(exc)) from None
    if catalogue.get(model) is None:
        hint = (f"a worker serves a catalogued model, so gateways can route to it: add `- {{name: NAME, source: "
                f"{model}}}` under `models:` there (every gateway and worker reads it), then pass --model NAME"
                if "/" in model or model.lower().endswith((".safetensors", ".ckpt")) else
                "add an entry for it, or pass --model with one of those")
        raise ModelLoadError(f"model {model!r} is not in the catalogue {models_file()} (it lists "
                             f"{', '.join(catalogue.names)}); {hint}")


def pin_gpu(gpu: Optional[str]) -> None:
    """Restrict this process to one GPU; must run before torch initialises CUDA."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def worker_argv(celery_config: CeleryConfig, hostname: str, loglevel: str, model: str,
                max_batch_size: int = 1) -> List[str]:
    """Celery's worker command line: solo pool (or one thread per request of a batch, each holding
    one prefetched task for the batcher), and only `model`'s queue."""
    pool = ["--pool=solo", "--concurrency=1"] if max_batch_size <= 1 else ["--pool=threads",
                                                                           f"--concurrency={max_batch_size}"]
    return ["worker", *pool, "-Q", queue_for(celery_config.queue, model),
            f"--hostname={hostname}",
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]


class WorkerRuntime:
    """What every worker holds, built the same way whoever runs it (`sdgate worker` or a Ray
    replica): the Redis version and the catalogue checked, the resident pipeline loaded, the
    leases of held tasks renewed, and the heartbeat that tells gateways the model is served."""

    def __init__(self, celery_config: CeleryConfig, worker_config: WorkerConfig, what: str):
        from celery_bridge.lease import LeaseKeeper
        from celery_bridge.presence import Heartbeat
        from celery_bridge.redis_check import require_redis_version

        # 1. Checks that must fail in seconds, before a model loads.
        client = celery_config.redis_client(socket_timeout=5, socket_connect_timeout=5)
        require_redis_version(client, what)
        require_catalogued(worker_config.model)
        # 2. Load the pipeline once, before taking any task; a model that cannot load fails here.
        self.service = GenerationService(worker_config, time_limit_s=celery_config.soft_time_limit_s,
                                         redis_client=client, report_with_result=True)  # both modes store with WorkerRedisBackend
        # 3. Renew the leases of held tasks, and tell gateways we serve the model.
        self.leases = LeaseKeeper(client, celery_config.lease_renew_s).start()
        self.presence = Heartbeat(client, worker_config.model, self.service.name,
                                  slots=self.service.max_batch_size, batching=self.service.batching).start()

    def stop(self) -> None:
        """After the last task is acked: its lease is no longer needed, and gateways stop counting us."""
        self.presence.stop()
        self.leases.stop()


def run_worker(celery_overrides: Dict[str, Any], worker_overrides: Dict[str, Any], gpu: Optional[str] = None,
               loglevel: str = "INFO") -> None:
    """`sdgate worker`: load the pipeline of one catalogued model, then consume that model's queue
    until stopped (blocks)."""
    from celery_bridge.app import WorkerRedisBackend, make_celery_app

    # 1. Pin the GPU before anything imports torch.
    pin_gpu(gpu)
    celery_config = load_celery_config(**celery_overrides)
    worker_config = load_worker_config(**worker_overrides)
    runtime = WorkerRuntime(celery_config, worker_config, "sdgate worker")
    print(f"sdgate worker: model {worker_config.model!r} loaded in {runtime.service.load_seconds:.1f} s", flush=True)
    # 2. Register the task body; consume: solo pool, one task at a time, so one pipeline is never
    #    used by two threads; with batching, B threads feed one render thread (celery_bridge/batching.py).
    app = make_celery_app(celery_config, name="sdgate-worker", backend=WorkerRedisBackend)
    app.task(name=TASK_NAME)(runtime.service.handle)
    try:
        app.worker_main(worker_argv(celery_config, f"sdgate-{os.getpid()}@{socket.gethostname()}", loglevel,
                                    worker_config.model, runtime.service.max_batch_size))
    finally:
        runtime.stop()
