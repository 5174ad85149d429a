"""The embedded tiny model and the resident pipeline (real diffusers on the CPU, no services)."""

import io
import threading

import pytest
import torch
from PIL import Image

from client.protocol import SCHEDULERS, GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.pipeline import ModelLoadError, PipelineRunner, a1111_parameters
from celery_bridge.tiny_model import TINY_MODEL_DIR, ensure_tiny_model


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return PipelineRunner(WorkerConfig(model_cache_dir=str(tmp_path_factory.mktemp("models"))))


def state_dicts(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def test_tiny_model_built_twice_is_identical(tmp_path):
    first, second = ensure_tiny_model(tmp_path / "a"), ensure_tiny_model(tmp_path / "b")
    weights_a, weights_b = state_dicts(first), state_dicts(second)
    for component, tensors in weights_a.items():
        assert tensors.keys() == weights_b[component].keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, weights_b[component][name]), f"{component}.{name} differs"
    for file in sorted((first / "tokenizer").iterdir()):
        assert file.read_bytes() == (second / "tokenizer" / file.name).read_bytes()


def test_tiny_model_is_built_once(tmp_path):
    folder = ensure_tiny_model(tmp_path)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == folder == tmp_path / TINY_MODEL_DIR
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_render_gives_png_with_size_and_parameters(runner):
    request = GenerationRequest("A  Red fox", width=128, height=64, seed=9)
    image = Image.open(io.BytesIO(runner.render(request)))
    assert image.format == "PNG" and image.size == (128, 64)
    text = image.info["parameters"]
    assert text == a1111_parameters(request.normalized())
    assert text.startswith("a red fox\n") and "Steps: 2" in text and "Seed: 9" in text
    assert "Size: 128x64" in text and "Model: tiny" in text and "Negative prompt" not in text


def test_negative_prompt_line_in_parameters():
    text = a1111_parameters(GenerationRequest("fox", negative_prompt="blur", seed=1).normalized())
    assert text.splitlines()[1] == "Negative prompt: blur"


def test_same_request_same_bytes_other_seed_other_bytes(runner):
    request = GenerationRequest("determinism", seed=4)
    assert runner.render(request) == runner.render(request)
    assert runner.render(request) != runner.render(GenerationRequest("determinism", seed=5))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_renders(runner, scheduler):
    assert Image.open(io.BytesIO(runner.render(GenerationRequest("sched", scheduler=scheduler)))).size == (64, 64)


def test_pipeline_loads_once_per_runner(tmp_path):
    before = PipelineRunner.loads
    runner = PipelineRunner(WorkerConfig(model_cache_dir=str(tmp_path)))
    for i in range(3):
        runner.render(GenerationRequest(f"load count {i}"))
    assert PipelineRunner.loads == before + 1


def test_concurrent_renders_equal_serial_renders(runner):
    requests = [GenerationRequest(f"thread {i}", scheduler=SCHEDULERS[i % len(SCHEDULERS)]) for i in range(6)]
    serial = [runner.render(r) for r in requests]
    parallel = [None] * len(requests)

    def work(i):
        parallel[i] = runner.render(requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert parallel == serial


def test_unloadable_model_fails_fast_and_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        PipelineRunner(WorkerConfig(model=str(tmp_path), model_cache_dir=str(tmp_path)))
    message = str(caught.value)
    assert str(tmp_path) in message and "model_index.json" in message and "SDGATE_MODEL" in message


def test_generation_past_its_time_limit_is_stopped(runner):
    from celery_bridge.pipeline import GenerationTimeout

    with pytest.raises(GenerationTimeout, match="limit"):
        runner.render(GenerationRequest("too slow", width=512, height=512, steps=50), time_limit_s=0.01)
    assert runner.render(GenerationRequest("fine afterwards")), "the runner keeps serving"
