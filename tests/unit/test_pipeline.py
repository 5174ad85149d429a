"""The resident pipeline: the tiny real diffusers pipeline on the CPU, no services."""

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.resolve import resolved
from client.protocol import SCHEDULERS, GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.pipeline import GenerationTimeout, ModelLoadError, PipelineRunner, a1111_parameters
from celery_bridge.tiny_model import TINY_MODEL_DIR


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def runner(cache_dir):
    return PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(cache_dir)))


def open_png(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(open_png(png).convert("RGB"))


@pytest.mark.parametrize("width, height", [(64, 64), (128, 64)])
def test_render_gives_png_of_the_size_with_parameters(runner, width, height):
    request = GenerationRequest("A  Red fox", width=width, height=height, seed=9)
    image = open_png(runner.render(request))
    assert image.size == (width, height)
    text = image.info["parameters"]
    assert text == image.text["parameters"] == a1111_parameters(runner.resolve(request))
    assert text.startswith("a red fox\n") and "Steps: 2," in text and "Seed: 9," in text
    assert f"Size: {width}x{height}," in text and text.endswith("Model: tiny")
    assert "Negative prompt" not in text
    assert runner.last_pipeline_ms > 0


def test_parameters_text_is_automatic1111s_format():
    request = GenerationRequest("a fox", negative_prompt="Blurry,  dark", steps=2, seed=123, scheduler="euler_a")
    assert a1111_parameters(resolved(request).normalized()) == (
        "a fox\nNegative prompt: blurry, dark\n"
        "Steps: 2, Sampler: euler_a, CFG scale: 7.5, Seed: 123, Size: 64x64, Model: tiny")
    assert a1111_parameters(resolved(GenerationRequest("a fox", seed=1)).normalized()).count("\n") == 1


def test_unicode_prompt_survives_into_the_png(runner):
    request = GenerationRequest("Ein Fuchs im Schnee, 雪の中の狐 🦊", seed=2)
    assert open_png(runner.render(request)).info["parameters"].startswith("ein fuchs im schnee, 雪の中の狐 🦊\n")


def test_negative_prompt_reaches_the_pipeline_and_the_png(runner):
    plain = runner.render(GenerationRequest("fox", seed=3))
    negative = runner.render(GenerationRequest("fox", negative_prompt="blur", seed=3))
    assert "\nNegative prompt: blur\n" in open_png(negative).info["parameters"]
    assert not np.array_equal(pixels(plain), pixels(negative))


def test_same_request_same_bytes_other_seed_other_bytes(runner):
    request = GenerationRequest("determinism", seed=4)
    first = runner.render(request)
    assert runner.render(request) == first
    assert runner.render(GenerationRequest("  Determinism ", seed=4)) == first, "renders the normalized form"
    assert not np.array_equal(pixels(runner.render(GenerationRequest("determinism", seed=5))), pixels(first))
    unseeded = GenerationRequest("determinism")
    assert runner.render(unseeded) == runner.render(unseeded), "the derived seed is stable too"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_renders(runner, scheduler):
    image = open_png(runner.render(GenerationRequest("sched", scheduler=scheduler, seed=7)))
    assert image.size == (64, 64) and f"Sampler: {scheduler}," in image.info["parameters"]


def test_scheduler_is_really_swapped_and_default_comes_back(runner):
    def image(scheduler):
        return pixels(runner.render(GenerationRequest("swap", scheduler=scheduler, seed=8)))

    default = image("default")
    assert np.array_equal(image("pndm"), default), "the tiny model's own scheduler is PNDM"
    assert not np.array_equal(image("ddim"), default) and not np.array_equal(image("euler"), default)
    assert np.array_equal(image("default"), default)


def test_bare_call_is_the_same_pipeline_call(runner):
    request = GenerationRequest("bare", seed=11, scheduler="ddim")
    assert np.array_equal(np.asarray(runner.bare_call(request).convert("RGB")), pixels(runner.render(request)))


def test_pipeline_loads_once_per_runner(runner, cache_dir):
    before = PipelineRunner.loads
    other = PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(cache_dir)))
    assert PipelineRunner.loads == before + 1 and other.load_seconds > 0
    for i in range(3):
        other.render(GenerationRequest(f"load count {i}"))
    runner.render(GenerationRequest("the shared runner"))
    assert PipelineRunner.loads == before + 1


def test_cpu_threads_sets_torchs_thread_count(cache_dir):
    before = torch.get_num_threads()
    wanted = before + 1  # differs from whatever this machine's default is
    try:
        PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(cache_dir), cpu_threads=wanted))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_concurrent_renders_equal_serial_renders(runner):
    requests = [GenerationRequest(f"thread {i}", scheduler=SCHEDULERS[i % len(SCHEDULERS)]) for i in range(6)]
    serial = [runner.render(r) for r in requests]
    parallel = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def work(i):
        start.wait()
        parallel[i] = runner.render(requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert parallel == serial


@pytest.mark.parametrize("kind", ["missing folder", "empty folder"])
def test_unloadable_model_fails_and_says_what_to_do(tmp_path, kind):
    model = str(tmp_path / "no-such-model") if kind == "missing folder" else str(tmp_path)
    before = PipelineRunner.loads
    with pytest.raises(ModelLoadError) as caught:
        PipelineRunner(WorkerConfig(model=model, device="cpu", model_cache_dir=str(tmp_path)))
    message = str(caught.value)
    assert repr(model) in message
    assert ("no folder at that path" if kind == "missing folder" else "not a diffusers pipeline") in message
    for fix in ("configs/worker.yaml", "SDGATE_MODEL", "'tiny'", "model_index.json", "HF_HUB_OFFLINE=0"):
        assert fix in message
    assert PipelineRunner.loads == before


def test_unwritable_or_broken_tiny_model_fails_and_says_what_to_do(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ModelLoadError, match="could not build the embedded model 'tiny'.*SDGATE_MODEL_CACHE_DIR"):
        PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(not_a_folder)))
    broken = tmp_path / "cache" / TINY_MODEL_DIR
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{TINY_MODEL_DIR}' is broken; delete it"):
        PipelineRunner(WorkerConfig(device="cpu", model_cache_dir=str(tmp_path / "cache")))


def test_unusable_device_fails_and_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="(?s)device.*'auto', 'cuda' or 'cpu'"):  # typed config: refused at load
        PipelineRunner(WorkerConfig(device="gpu", model_cache_dir=str(tmp_path)))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="sees no CUDA GPU.*'auto' or 'cpu'"):
            PipelineRunner(WorkerConfig(device="cuda", model_cache_dir=str(tmp_path)))


def test_generation_past_its_time_limit_is_stopped(runner):
    request = GenerationRequest("stopped and fine afterwards", seed=12)
    before = runner.render(request)
    with pytest.raises(GenerationTimeout, match="stopped after step 1 of 50: over the 0 s limit"):
        runner.render(GenerationRequest("too slow", steps=50), time_limit_s=1e-6)
    assert runner.render(request) == before, "an aborted run leaves no state behind"


class Stop(RuntimeError):
    pass


def test_on_start_runs_once_after_the_prompt_is_encoded_and_before_the_first_step(runner):
    """The worker reads its start check's answer in on_start: Redis answers while the prompt is
    encoded, and a task refused there runs no denoising step."""
    order = []
    hooks = [runner.pipe.text_encoder.register_forward_hook(lambda *_: order.append("encoded")),
             runner.pipe.unet.register_forward_hook(lambda *_: order.append("denoised"))]
    try:
        png = runner.render(GenerationRequest("started once", steps=3, seed=4),
                            on_step=lambda step, steps, latents: order.append(f"step {step}"),
                            on_start=lambda: order.append("start"))
        assert png == runner.render(GenerationRequest("started once", steps=3, seed=4)), "same image with on_start"
        assert order[:order.index("denoised")] == ["encoded", "encoded", "start"]  # prompt and negative prompt
        assert order.count("start") == 1 and "step 2" in order

        order.clear()

        def refuse():
            order.append("start")
            raise Stop("cancelled before it started")

        with pytest.raises(Stop):
            runner.render(GenerationRequest("never started", steps=3, seed=4), on_start=refuse,
                          on_step=lambda step, steps, latents: order.append(f"step {step}"))
        assert "start" in order and "denoised" not in order and not any(o.startswith("step") for o in order)
    finally:
        for hook in hooks:
            hook.remove()
    order.clear()
    runner.render(GenerationRequest("no hook left behind", steps=2, seed=4), on_start=lambda: order.append("start"))
    runner.render(GenerationRequest("no hook left behind", steps=2, seed=5))
    assert order == ["start"]
