"""Continuous batching: the loop's admission, steps and exits with a deterministic stand-in
denoiser (driven one iteration at a time), then the real step loop on the tiny CPU pipeline."""

from __future__ import annotations

import hashlib
import io
import statistics
import threading
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from client.protocol import GenerationRequest
from celery_bridge.continuous import ContinuousLoop, DiffusersStepper, Stepper, supports_continuous
from tests.integration.harness import wait_for
from tests.unit import test_batching


class StandIn(Stepper):
    """Each request's latent moves by its own rule at each of its own timesteps: row-independent, so
    a request's result is the same alone or in any company, and any mix-up shows."""

    def __init__(self, fail_on: str = ""):
        self.fail_on = fail_on
        self.calls: List[List[str]] = []  # the prompts stepped together, per call

    def start(self, request: GenerationRequest) -> Tuple[Any, int]:
        if request.prompt == self.fail_on:
            raise ValueError("cannot encode that prompt")
        steps = request.steps + (1 if request.scheduler == "pndm" else 0)  # as PNDM runs one more
        seed = int(hashlib.sha256(request.prompt.encode()).hexdigest()[:8], 16) + request.seed
        return {"request": request, "latent": float(seed % 1000), "t": list(range(steps, 0, -1)), "i": 0}, steps

    def step(self, states: List[Any]) -> List[Any]:
        self.calls.append([state["request"].prompt for state in states])
        for state in states:
            t = state["t"][state["i"]]
            rate = 0.5 if state["request"].scheduler == "euler_a" else 0.9
            state["latent"] = state["latent"] * rate + t * state["request"].guidance_scale
            state["i"] += 1
        return [state["latent"] for state in states]

    def finish(self, state: Any) -> bytes:
        return repr(round(state["latent"], 9)).encode()


def req(prompt: str, steps: int = 4, scheduler: str = "ddim", guidance: float = 7.5, seed: int = 1, size: int = 64):
    return GenerationRequest(prompt, width=size, height=size, steps=steps, scheduler=scheduler,
                             guidance_scale=guidance, seed=seed, model="tiny")


class Driven:
    """A loop driven one iteration at a time, with each submit on its own thread."""

    def __init__(self, stepper: Stepper, max_active: int = 8):
        self.loop = ContinuousLoop(stepper, max_active, own_thread=False)
        self.results: Dict[str, Any] = {}
        self.steps_seen: Dict[str, List[Tuple[int, int]]] = {}

    def submit(self, request: GenerationRequest, cancel_at: int = -1) -> None:
        seen = self.steps_seen.setdefault(request.prompt, [])

        def on_step(step: int, steps: int, latents: Any) -> None:
            seen.append((step, steps))
            if step == cancel_at:
                raise RuntimeError("cancelled")

        def run() -> None:
            try:
                self.results[request.prompt] = self.loop.submit(request, on_step)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                self.results[request.prompt] = exc

        waiting = self.loop.waiting
        threading.Thread(target=run, daemon=True).start()
        wait_for(lambda: self.loop.waiting > waiting, 5, "the submit queued")

    def run(self, iterations: int = 1000) -> None:
        for _ in range(iterations):
            if not self.loop.iterate():
                break

    def result(self, prompt: str) -> Any:
        wait_for(lambda: prompt in self.results, 5, f"{prompt}'s result")
        return self.results[prompt]

    def png(self, prompt: str) -> bytes:
        result = self.result(prompt)
        assert not isinstance(result, BaseException), result
        return result.png


def run_together(loop: ContinuousLoop, requests: List[GenerationRequest]) -> Dict[int, Any]:
    """Each request submitted to the loop from its own thread at once: {index: its Rendered}."""
    results: Dict[int, Any] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, loop.submit(r)))
               for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def solo(request: GenerationRequest) -> bytes:
    driven = Driven(StandIn())
    driven.submit(request)
    driven.run()
    return driven.png(request.prompt)


def test_a_request_joins_at_the_next_step_and_each_ends_as_it_would_alone():
    driven = Driven(StandIn())
    a, b = req("a", steps=6), req("b", steps=3, scheduler="euler_a", guidance=2.0)
    driven.submit(a)
    for _ in range(2):
        driven.loop.iterate()
    driven.submit(b)  # joins the running loop at its third iteration
    driven.run()
    assert driven.loop.iterations == [1, 1, 2, 2, 2, 1]
    assert driven.png("a") == solo(a) and driven.png("b") == solo(b)
    assert driven.result("a").batch_size == 2 and driven.result("b").batch_size == 2  # shares, rounded


def test_mixed_steps_schedulers_and_guidance_share_every_step_and_match_solo_runs():
    driven = Driven(StandIn())
    mixed = [req("p1", 2, "ddim", 7.5), req("p2", 5, "euler_a", 1.0), req("p3", 9, "pndm", 3.0, seed=5)]
    for request in mixed:
        driven.submit(request)
    driven.run()
    assert driven.loop.iterations[:3] == [3, 3, 2] and max(driven.loop.iterations) == 3
    for request in mixed:
        assert driven.png(request.prompt) == solo(request)
    assert [s for s, _ in driven.steps_seen["p3"]] == list(range(10)) and driven.steps_seen["p3"][0][1] == 10


def test_a_cancelled_request_leaves_at_its_step_and_the_others_go_on():
    driven = Driven(StandIn())
    driven.submit(req("stays", steps=5))
    driven.submit(req("leaves", steps=5), cancel_at=1)
    driven.run()
    assert isinstance(driven.result("leaves"), RuntimeError)
    assert [s for s, _ in driven.steps_seen["leaves"]] == [0, 1]
    assert driven.loop.iterations == [2, 2, 1, 1, 1]
    assert driven.png("stays") == solo(req("stays", steps=5))


def test_a_request_that_cannot_start_fails_alone():
    driven = Driven(StandIn(fail_on="broken"))
    driven.submit(req("broken"))
    driven.submit(req("fine"))
    driven.run()
    assert isinstance(driven.result("broken"), ValueError)
    assert driven.png("fine") == solo(req("fine"))


class Timed(StandIn):
    """The stand-in on a fake clock: encoding a prompt takes 30 ms, each step 10 ms, the decode 5 ms,
    and the PNG 7 ms on the request's own thread."""

    def __init__(self):
        super().__init__()
        self.now = 100.0
        self.encoded_on: List[str] = []

    def clock(self) -> float:
        return self.now

    def start(self, request: GenerationRequest) -> Tuple[Any, int]:
        self.now += 0.030
        return super().start(request)

    def step(self, states: List[Any]) -> List[Any]:
        self.now += 0.010
        return super().step(states)

    def finish(self, state: Any) -> Any:
        self.now += 0.005
        return super().finish(state)

    def encode(self, request: GenerationRequest, image: Any) -> bytes:
        self.encoded_on.append(threading.current_thread().name)
        self.now += 0.007
        return b"PNG:" + image


def test_pipeline_time_runs_from_the_prompt_encoding_to_the_decode_and_the_png_is_made_off_the_loop():
    """pipeline_ms is the model's work, timed as a solo pipeline call is (prompt encoding, steps,
    decode): the bench's miss overhead is everything else. The PNG is encoded by the request's own
    thread, so the loop's next iteration does not wait for it."""
    stepper = Timed()
    driven = Driven(stepper)
    driven.loop._clock = stepper.clock
    driven.submit(req("a fox", steps=4))
    stepper.now += 1.0  # waiting to be admitted is not the model's time
    driven.run()
    rendered = driven.result("a fox")
    assert rendered.pipeline_ms == pytest.approx(30 + 4 * 10 + 5)
    assert rendered.png.startswith(b"PNG:")
    assert stepper.encoded_on and stepper.encoded_on[0] != threading.current_thread().name


def test_at_most_max_active_run_and_another_resolution_runs_once_the_loop_drains():
    stepper = StandIn()
    driven = Driven(stepper, max_active=2)
    for name in ("a", "b", "c"):
        driven.submit(req(name, steps=3))
    driven.submit(req("wide", steps=2, size=128))
    driven.submit(req("d", steps=2))
    driven.run()
    assert max(driven.loop.iterations) == 2
    groups = [set(call) for call in stepper.calls]
    assert groups[:3] == [{"a", "b"}] * 3 and groups[3] == {"c"}  # c joined when a and b left
    wide = [i for i, call in enumerate(groups) if "wide" in call]
    assert all(len(groups[i]) == 1 or groups[i] <= {"wide"} for i in wide)  # never with 64 px requests
    assert wide[0] > 3 and all("d" not in groups[i] for i in range(wide[0]))  # oldest group first
    for name in ("a", "b", "c", "d"):
        assert driven.png(name) == solo(req(name, steps=3 if name != "d" else 2))


# -- the real loop on the tiny pipeline ----------------------------------------------------------------

runner, pixels = test_batching.runner, test_batching.pixels  # the tiny pipeline fixture, and its pixel reader

# Measured here: mixed requests in one loop came within 1 grey level of their solo renders (the batched
# UNet's float sums); the bound allows 2 of 255 per pixel.
PIXEL_BOUND = 2


def test_mixed_requests_in_one_real_loop_match_their_solo_images_and_are_never_swapped(runner):
    assert supports_continuous(runner.pipe)
    mixed = [runner.resolve(GenerationRequest(f"mixed {i}", width=64, height=64, steps=steps, scheduler=scheduler,
                                              guidance_scale=guidance, seed=10 + i))
             for i, (steps, scheduler, guidance) in enumerate([(3, "ddim", 7.5), (6, "euler_a", 1.0),
                                                                (9, "euler", 7.5), (6, "ddim", 1.0)])]
    loop = ContinuousLoop(DiffusersStepper(runner), max_active=8, lock=runner._lock)
    results = run_together(loop, mixed)
    assert max(loop.iterations) >= 3, loop.iterations  # they really shared iterations
    alone = [pixels(runner.render(r)) for r in mixed]
    together = [pixels(results[i].png) for i in range(len(mixed))]
    for i, image in enumerate(together):
        distances = [np.abs(image - other).max() for other in alone]
        assert distances[i] <= PIXEL_BOUND, distances
        assert distances[i] == min(distances)  # its own, not another's
    assert Image.open(io.BytesIO(results[0].png)).text["parameters"].startswith("mixed 0")


def test_a_lone_request_in_the_loop_takes_about_as_long_as_the_pipeline(runner):
    request = runner.resolve(GenerationRequest("alone", width=64, height=64, steps=8, seed=3))
    loop = ContinuousLoop(DiffusersStepper(runner), max_active=4, lock=runner._lock)
    loop.submit(request)  # warm
    ratios = []  # loop / pipeline, each pair timed back to back, so a neighbour's load hits both alike
    for _ in range(5):
        started = time.perf_counter()
        loop.submit(request)
        looped = time.perf_counter() - started
        started = time.perf_counter()
        runner.render(request)
        ratios.append(looped / (time.perf_counter() - started))
    # A ratio in one run, not a time; the median, since one quiet moment can halve a single render
    # (ci51: a pipeline render of 0.08 s among 0.16 to 0.19 s, against the loop's best of three).
    assert statistics.median(ratios) < 1.5, ratios


def test_a_continuous_worker_renders_concurrent_tasks_in_its_loop_and_stops_a_cancelled_one(tmp_path):
    """The worker's wiring: tasks of different steps and schedulers share the loop, each result names
    its own request, a cancelled one leaves, and an img2img task renders outside the loop."""
    from celery_bridge.config import WorkerConfig
    from celery_bridge.worker import GenerationService
    from tests.unit.test_batching import Recorder, handle_concurrently

    service = GenerationService(WorkerConfig(device="cpu", model_cache_dir=str(tmp_path), max_batch_size=3,
                                             batching="continuous"))
    assert service.batching == "continuous" and service.batcher is None
    reporters = {}
    service._reporter = lambda request, previews: reporters.setdefault(request.prompt, Recorder(request, cancel_at=1))
    requests = [GenerationRequest("keep me", width=64, height=64, steps=6, scheduler="ddim", seed=1),
                GenerationRequest("me too", width=64, height=64, steps=9, scheduler="euler", seed=2, guidance_scale=1.0),
                GenerationRequest("cancel me", width=64, height=64, steps=6, seed=3)]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 80, 120)).save(buffer, format="PNG")
    img2img = GenerationRequest("from a picture", width=64, height=64, steps=4, init_image=buffer.getvalue())
    results = handle_concurrently(service, requests + [img2img])
    assert results["from a picture"]["ok"] and results["from a picture"]["batch_size"] == 1
    assert max(service.loop.iterations) >= 2
    for request in requests[:2]:
        result = results[request.prompt]
        assert result["ok"] and result["key"] == service.runner.resolve(request).cache_key()
        assert [step for step, _, _ in reporters[request.prompt].steps] == list(range(request.steps))
    assert results["cancel me"]["error_code"] == "cancelled" and len(reporters["cancel me"].steps) == 2


def test_the_real_loop_steps_sdxl_too(tmp_path):
    """SDXL's UNet takes its text/time conditioning per row: a tiny random SDXL pipeline, mixed
    requests in one loop, each within the bound of its solo render and never swapped."""
    from celery_bridge.config import WorkerConfig
    from celery_bridge.pipeline import PipelineRunner
    from celery_bridge.tiny_model import save_tiny_sdxl

    sdxl = PipelineRunner(WorkerConfig(device="cpu", model=str(save_tiny_sdxl(tmp_path / "tiny-sdxl"))))
    assert type(sdxl.pipe).__name__ == "StableDiffusionXLPipeline" and supports_continuous(sdxl.pipe)
    mixed = [sdxl.resolve(GenerationRequest(f"xl {i}", width=64, height=64, steps=steps, scheduler=scheduler,
                                            guidance_scale=guidance, seed=20 + i, negative_prompt=negative))
             for i, (steps, scheduler, guidance, negative) in enumerate([(3, "euler", 5.0, ""), (5, "ddim", 1.0, ""),
                                                                          (4, "euler_a", 7.0, "blurry")])]
    loop = ContinuousLoop(DiffusersStepper(sdxl), max_active=4, lock=sdxl._lock)
    results = run_together(loop, mixed)
    assert max(loop.iterations) >= 2, loop.iterations
    alone = [pixels(sdxl.render(r)) for r in mixed]
    for i in range(len(mixed)):
        distances = [np.abs(pixels(results[i].png) - other).max() for other in alone]
        assert distances[i] <= PIXEL_BOUND and distances[i] == min(distances), distances
