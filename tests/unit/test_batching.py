"""Shape-keyed batching: the batcher's grouping (deterministic, injected render), and the tiny real
pipeline's batched images against its unbatched ones (no services)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from client.protocol import GenerationRequest
from celery_bridge.batching import ShapeBatcher, batch_size_for, shape_of
from celery_bridge.config import WorkerConfig
from tests.handling import handle_concurrently

# Measured on this CPU (torch 2.13, tiny model, 64x64, 2 steps): batched and unbatched images are
# byte-identical (max per-pixel difference 0); the bound leaves room for other BLAS kernels.
PIXEL_BOUND = 8


def req(prompt: str, seed: int = 1, **shape) -> GenerationRequest:
    fields = dict(model="tiny", width=64, height=64, steps=2, guidance_scale=7.5, scheduler="default")
    fields.update(shape)
    return GenerationRequest(prompt, seed=seed, **fields).normalized()


class RecordingRender:
    """A render function that records each batch and answers each request with its own prompt."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, requests, on_step=None):
        self.gate.wait(30)
        self.batches.append([r.prompt for r in requests])
        return [r.prompt.encode() for r in requests], 1.0


def submit_all(batcher, requests):
    results = {}

    def one(r):
        results[r.prompt] = batcher.submit(r)

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    return threads, results


def wait_pending(batcher, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(batcher._pending) < count:
        assert time.monotonic() < deadline, "requests never reached the batcher"
        time.sleep(0.005)


def test_same_shape_requests_share_one_call_and_each_gets_its_own_image():
    render = RecordingRender()
    batcher = ShapeBatcher(render, max_batch_size=4, wait_s=60)  # only a full batch can start it
    threads, results = submit_all(batcher, [req(f"p{i}", seed=i) for i in range(4)])
    for t in threads:
        t.join(30)
    assert len(render.batches) == 1 and sorted(render.batches[0]) == ["p0", "p1", "p2", "p3"]
    assert all(results[p].png == p.encode() and results[p].batch_size == 4 for p in results)


def test_other_shapes_are_not_mixed_and_wait_no_longer_than_the_window():
    render = RecordingRender()
    clock = [0.0]  # frozen until the test moves it past the window
    batcher = ShapeBatcher(render, max_batch_size=4, wait_s=0.2, clock=lambda: clock[0])
    threads, results = [], {}
    for count, request in enumerate([req("a1"), req("b1", steps=3), req("a2"), req("a3")], 1):
        more, found = submit_all(batcher, [request])
        threads += more
        results = found if not results else results
        if count < 4:
            wait_pending(batcher, count)  # arrival order is the test's
    deadline = time.monotonic() + 30
    while not render.batches:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # Four requests held (every consumer thread busy): the oldest's shape goes at once, without b1.
    assert render.batches == [["a1", "a2", "a3"]] and len(batcher._pending) == 1
    clock[0] = 1.0  # b1's window passes: it goes alone rather than waiting for a partner
    for t in threads:
        t.join(30)
    assert render.batches == [["a1", "a2", "a3"], ["b1"]]


def test_a_failed_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    calls = []

    def render(requests, on_step=None):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [b"ok"] * len(requests), 1.0

    batcher = ShapeBatcher(render, max_batch_size=2, wait_s=60)
    threads, results = [], {}
    errors = []

    def one(r):
        try:
            results[r.prompt] = batcher.submit(r)
        except RuntimeError as exc:
            errors.append(str(exc))

    for r in (req("x"), req("y")):
        threads.append(threading.Thread(target=one, args=(r,)))
        threads[-1].start()
    for t in threads:
        t.join(30)
    assert errors == ["out of memory", "out of memory"]
    batcher.wait_s = 0  # a lone request need not wait for a partner
    assert batcher.submit(req("z")).png == b"ok"


class SteppingRender:
    """A render of `steps` steps that calls the batch's step callback after each, with latents
    whose row i is request i's (its seed), as the pipeline's callback gets them."""

    def __init__(self, steps: int):
        self.steps = steps
        self.steps_run = 0

    def __call__(self, requests, on_step=None):
        latents = np.array([[request.seed] for request in requests])
        for step in range(self.steps):
            self.steps_run = step + 1
            if on_step is not None:
                on_step(step, self.steps, latents)
        return [r.prompt.encode() for r in requests], 1.0


class Cancelled(RuntimeError):
    pass


def submit_with_steps(batcher, requests, cancel_at=None):
    """Submit each request with a step recorder; `cancel_at[prompt]` = the step its callback raises at."""
    seen = {r.prompt: [] for r in requests}
    outcome = {}

    def one(request):
        def on_step(step, steps, latents):
            seen[request.prompt].append((step, steps, latents.tolist()))
            if (cancel_at or {}).get(request.prompt) == step:
                raise Cancelled(f"{request.prompt} cancelled after step {step + 1}")
        try:
            outcome[request.prompt] = batcher.submit(request, on_step)
        except Cancelled as exc:
            outcome[request.prompt] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return seen, outcome


def test_each_request_of_a_batch_gets_every_step_with_its_own_latents():
    render = SteppingRender(steps=3)
    batcher = ShapeBatcher(render, max_batch_size=3, wait_s=60)
    seen, outcome = submit_with_steps(batcher, [req(f"p{i}", seed=10 + i) for i in range(3)])
    assert batcher.batches == [3]
    for i in range(3):
        assert seen[f"p{i}"] == [(step, 3, [[10 + i]]) for step in range(3)], "its own row, every step"
        assert outcome[f"p{i}"].png == f"p{i}".encode()


def test_a_request_cancelled_mid_batch_leaves_it_and_the_others_finish():
    render = SteppingRender(steps=4)
    batcher = ShapeBatcher(render, max_batch_size=3, wait_s=60)
    seen, outcome = submit_with_steps(batcher, [req(f"p{i}", seed=i) for i in range(3)], cancel_at={"p1": 1})
    assert render.steps_run == 4, "the others' render went on"
    assert isinstance(outcome["p1"], Cancelled) and "after step 2" in str(outcome["p1"])
    assert [step for step, _, _ in seen["p1"]] == [0, 1], "no steps reported after it left"
    assert outcome["p0"].png == b"p0" and outcome["p2"].png == b"p2"
    assert [step for step, _, _ in seen["p2"]] == [0, 1, 2, 3]


def test_a_batch_stops_once_every_request_in_it_is_cancelled():
    render = SteppingRender(steps=50)
    batcher = ShapeBatcher(render, max_batch_size=2, wait_s=60)
    seen, outcome = submit_with_steps(batcher, [req("a", seed=1), req("b", seed=2)], cancel_at={"a": 1, "b": 3})
    assert render.steps_run == 4, "stopped at the step the last one left"
    assert "after step 2" in str(outcome["a"]) and "after step 4" in str(outcome["b"]), "each its own reason"


def test_the_real_pipeline_gives_the_batch_callback_each_requests_latents(runner):
    requests = [req("a red fox", seed=1), req("a blue whale", seed=2)]
    shapes = []
    runner.render_batch(requests, on_step=lambda step, steps, latents: shapes.append((step, steps, latents.shape[0])))
    steps = shapes[-1][1]  # the scheduler's own count (PNDM runs one timestep more than asked)
    assert [(step, count) for step, _, count in shapes] == [(step, 2) for step in range(steps)], \
        "one row per request, every step"


def test_shape_is_what_one_call_must_share():
    assert shape_of(req("a", seed=1)) == shape_of(req("b", seed=2, negative_prompt="blur"))
    for change in ({"width": 128}, {"height": 128}, {"steps": 3}, {"guidance_scale": 5.0},
                   {"scheduler": "ddim"}, {"model": "other"}):
        assert shape_of(req("a", **change)) != shape_of(req("a"))


def test_batch_size_defaults_to_one_on_cpu_and_the_catalogue_on_gpu():
    assert batch_size_for(None, 8, "cpu") == 1 and batch_size_for(None, 8, "cuda") == 8
    assert batch_size_for(4, 8, "cpu") == 4
    with pytest.raises(ValueError, match="1 \\(no batching\\) to 64"):
        batch_size_for(0, 1, "cpu")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from celery_bridge.pipeline import PipelineRunner

    return PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(tmp_path_factory.mktemp("models"))))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_batched_images_match_unbatched_ones_and_are_never_swapped(runner):
    requests = [req("a red fox in the snow", seed=11), req("a blue whale, deep sea", seed=12),
                req("a green field at dawn", seed=13, negative_prompt="fog"), req("a red fox in the snow", seed=14)]
    alone = [pixels(runner.render(r)) for r in requests]
    assert all(np.abs(alone[i] - alone[j]).max() > 40 for i in range(4) for j in range(i)), "need distinct images"
    batched, _ = runner.render_batch(list(reversed(requests)))
    batched = [pixels(png) for png in reversed(batched)]
    for i, image in enumerate(batched):
        own = np.abs(image - alone[i]).max()
        nearest_other = min(np.abs(image - alone[j]).max() for j in range(4) if j != i)
        assert own <= PIXEL_BOUND < nearest_other, (i, own, nearest_other)


def test_worker_batches_concurrent_tasks_and_results_name_their_request(tmp_path):
    from celery_bridge.worker import GenerationService

    service = GenerationService(WorkerConfig(device="cpu", model_cache_dir=str(tmp_path), max_batch_size=3,
                                             batch_wait_ms=60_000, batching="window"))
    requests = [req(f"prompt {i}", seed=i) for i in range(3)]
    results = handle_concurrently(service, requests)
    assert service.batcher.batches == [3]
    for request, result in ((r, results[r.prompt]) for r in requests):
        assert result["ok"] and result["batch_size"] == 3 and result["key"] == request.cache_key()
        expected = pixels(service.runner.render(request))
        assert np.abs(pixels(__import__("base64").b64decode(result["png_b64"])) - expected).max() <= PIXEL_BOUND


class Recorder:
    """ProgressReporter's interface, recording (step, steps, rows of its latents) instead of publishing
    to Redis; the task whose prompt is "cancel me" is cancelled at step `cancel_at`."""

    def __init__(self, request, cancel_at: int):
        self.prompt, self.cancel_at, self.steps = request.prompt, cancel_at, []

    def check_start(self):
        pass

    def send_start_check(self):
        pass

    def drop_start_check(self):
        pass

    def on_step(self, step, steps, latents):
        from celery_bridge.progress import TaskCancelled

        self.steps.append((step, steps, latents.shape[0]))
        if self.prompt == "cancel me" and step == self.cancel_at:
            raise TaskCancelled("cancelled")


def test_a_batching_worker_reports_each_tasks_steps_and_stops_a_cancelled_one(tmp_path):
    from celery_bridge.worker import GenerationService

    service = GenerationService(WorkerConfig(device="cpu", model_cache_dir=str(tmp_path), max_batch_size=2,
                                             batch_wait_ms=60_000, batching="window"))
    reporters = {}
    service._reporter = lambda request, previews: reporters.setdefault(request.prompt, Recorder(request, cancel_at=0))
    results = handle_concurrently(service, [req("keep me", seed=1), req("cancel me", seed=2)])
    assert service.batcher.batches == [2]
    assert results["keep me"]["ok"] and results["cancel me"]["error_code"] == "cancelled"
    assert len(reporters["keep me"].steps) >= 2 and all(rows == 1 for _, _, rows in reporters["keep me"].steps)
    assert [(step, rows) for step, _, rows in reporters["cancel me"].steps] == [(0, 1)]


def test_both_worker_modes_get_one_consumer_thread_per_request_of_a_batch():
    from celery_bridge.config import CeleryConfig
    from celery_bridge.consumer import replica_batch_size
    from celery_bridge.worker import worker_argv

    assert worker_argv(CeleryConfig(), "h", "INFO", "tiny")[1:3] == ["--pool=solo", "--concurrency=1"]
    assert worker_argv(CeleryConfig(), "h", "INFO", "tiny", 4)[1:3] == ["--pool=threads", "--concurrency=4"]
    # Ray: the replica's max_ongoing_requests (its Celery thread count) is the batch size.
    assert replica_batch_size(WorkerConfig(model="tiny", num_gpus=0)) == 1
    assert replica_batch_size(WorkerConfig(model="tiny", num_gpus=1, max_batch_size=6)) == 6
