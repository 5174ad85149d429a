"""Shape-keyed batching: queued tasks of one shape rendered in one pipeline call.

A worker that batches consumes with `max_batch_size` Celery threads (prefetch 1 each, late acks),
so it holds up to B unacknowledged messages. Each thread runs the task body, which hands its
request to the ShapeBatcher and blocks. One render thread takes the oldest waiting request and
every other waiting request of the same shape (up to B), waits at most `batch_wait_ms` after the
oldest arrived for more, renders them in one call, and wakes each task with its own image. Each
task's step callback (progress, previews, cancel) runs at every step of the shared call with its
own slice of the latents; a task cancelled mid-batch leaves it (its image is dropped), and the call
stops early only once every task in it has left. A task
returns (Celery stores its result, then acks it) only after its own image exists; a worker killed
mid-batch leaves every message of the batch unacknowledged, so Redis redelivers each of them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

from client.protocol import GenerationRequest

log = logging.getLogger(__name__)
MAX_BATCH_SIZE = 64
Shape = Tuple[object, ...]
OnStep = Callable[[int, int, Any], None]  # (step, steps, latents); what it raises stops the render
RenderBatch = Callable[[List[GenerationRequest], Optional[OnStep]], Tuple[List[bytes], float]]


def shape_of(request: GenerationRequest) -> Shape:
    """What one pipeline call must share: everything but the prompts, the seeds and the images
    (its LoRAs too: adapters apply to the whole call)."""
    return (request.model, request.kind, request.width, request.height, request.steps, request.scheduler,
            float(request.guidance_scale), request.strength, request.loras)


def batch_size_for(configured: Optional[int], catalogued: int, device: str) -> int:
    """The worker's batch size: its own setting, else the catalogue's per-model value on a GPU, else 1
    (a CPU gains little from batching and a batch delays every image in it)."""
    size = configured if configured is not None else (catalogued if device == "cuda" else 1)
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size {size} is out of range; use 1 (no batching) to {MAX_BATCH_SIZE}")
    return size


@dataclass(frozen=True)
class Rendered:
    """One request's share of a batch: its PNG, the batch call's time and the batch's size."""

    png: bytes
    pipeline_ms: float
    batch_size: int


@dataclass
class _Slot:
    request: GenerationRequest
    shape: Shape
    arrived: float
    on_step: Optional[OnStep] = None
    left: Optional[BaseException] = None  # what its step callback raised mid-batch: it left the batch
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[Rendered] = None
    error: Optional[BaseException] = None


class HandOff:
    """What both batchers share: task threads hand a slot (with `done`, `result`, `error`) to one
    daemon render thread (`_run`, started on first use) through `_pending`, and wait for its outcome."""

    _thread_name = "sdgate-batcher"
    own_thread = True

    def _init_hand_off(self) -> None:
        self._pending: List[Any] = []
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def _hand_in(self, slot: Any) -> Any:
        """Queue `slot` for the render thread and block until it has its `result`; raises its error."""
        with self._cond:
            if self._thread is None and self.own_thread:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
            self._pending.append(slot)
            self._cond.notify_all()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _run(self) -> None:
        raise NotImplementedError


class ShapeBatcher(HandOff):
    """Collects concurrent `submit` calls into same-shape batches for one render function."""

    def __init__(self, render: RenderBatch, max_batch_size: int, wait_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._render = render
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._clock = clock
        self._init_hand_off()
        self.batches: List[int] = []  # sizes of the batches rendered so far (figures and tests)

    def submit(self, request: GenerationRequest, on_step: Optional[OnStep] = None) -> Rendered:
        """Block until `request` has been rendered in some batch; raises what its render (or its own
        `on_step`, which runs after each step of the batch's call) raised."""
        return self._hand_in(_Slot(request, shape_of(request), self._clock(), on_step))

    def next_batch(self) -> List[_Slot]:
        """The next batch: the oldest waiting request and up to B-1 more of its shape, once B are
        there, every consumer thread is waiting (no more can come), or its window has passed."""
        with self._cond:
            while True:
                if self._pending:
                    head = self._pending[0]
                    same = [slot for slot in self._pending if slot.shape == head.shape][: self.max_batch_size]
                    left = head.arrived + self.wait_s - self._clock()
                    if len(same) >= self.max_batch_size or len(self._pending) >= self.max_batch_size or left <= 0:
                        taken = {id(slot) for slot in same}
                        self._pending = [slot for slot in self._pending if id(slot) not in taken]
                        return same
                    self._cond.wait(left)
                else:
                    self._cond.wait()

    def render(self, batch: Sequence[_Slot]) -> None:
        """Render `batch` in one call and wake each of its tasks with its own image (or the error)."""
        try:
            pngs, pipeline_ms = self._render([slot.request for slot in batch], self._step_callback(batch))
            if len(pngs) != len(batch):
                raise RuntimeError(f"the pipeline returned {len(pngs)} images for a batch of {len(batch)}")
            for slot, png in zip(batch, pngs):
                if slot.left is not None:
                    slot.error = slot.left
                else:
                    slot.result = Rendered(png, pipeline_ms, len(batch))
            self.batches.append(len(batch))
        except BaseException as exc:  # noqa: BLE001 - every task of the batch reports it
            for slot in batch:
                slot.error = slot.left or exc
        finally:
            for slot in batch:
                slot.done.set()

    @staticmethod
    def _step_callback(batch: Sequence[_Slot]) -> Optional[OnStep]:
        """One step callback for the batch's call: each task's own, with its own latents (index i of
        the batch's). A task whose callback raises leaves the batch; the call stops once all have."""
        if not any(slot.on_step for slot in batch):
            return None

        def on_step(step: int, steps: int, latents: Any) -> None:
            for index, slot in enumerate(batch):
                if slot.on_step is None or slot.left is not None:
                    continue
                try:
                    slot.on_step(step, steps, None if latents is None else latents[index:index + 1])
                except Exception as exc:  # noqa: BLE001 - its task reports it; the others go on
                    slot.left = exc
            if all(slot.left is not None for slot in batch):
                raise batch[0].left  # nobody is left to render for

        return on_step

    def _run(self) -> None:
        while True:
            self.render(self.next_batch())
