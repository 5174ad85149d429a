"""The bench/test-only sleep render and the scale benchmark's arithmetic (no services)."""

from __future__ import annotations

import io
import sys

from PIL import Image

from bench.scale import efficiency
from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.sleep_model import SLEEP_MODEL, SleepRunner, sleep_catalogue, solid_png
from tests.handling import handle_concurrently


def test_solid_png_is_a_valid_png():
    image = Image.open(io.BytesIO(solid_png(8, 4, (1, 2, 3))))
    image.load()
    assert image.size == (8, 4) and image.getpixel((7, 3)) == (1, 2, 3)


def test_worker_of_a_sleep_source_loads_no_torch_and_batches(monkeypatch, tmp_path):
    from celery_bridge.worker import GenerationService

    monkeypatch.setenv("SDGATE_MODELS_FILE", str(sleep_catalogue(tmp_path / "models.yaml", 1)))
    had_torch = "torch" in sys.modules
    service = GenerationService(WorkerConfig(model=SLEEP_MODEL, max_batch_size=2, batch_wait_ms=60_000))
    assert isinstance(service.runner, SleepRunner)
    assert had_torch or "torch" not in sys.modules, "the sleep hook must not import torch"
    requests = [GenerationRequest(f"p{i}", seed=i) for i in range(2)]
    results = handle_concurrently(service, requests, timeout=30)
    assert service.batcher.batches == [2]
    for request in requests:
        result = results[request.prompt]
        assert result["ok"] and result["batch_size"] == 2
        assert result["key"] == service.runner.resolve(request).cache_key()
    assert results["p0"]["png_b64"] != results["p1"]["png_b64"], "each request gets its own image"


def test_scale_efficiency_is_images_per_s_over_ideal():
    # 20 images in 5 s with 2 workers of 500 ms: ideal 4 images/s, measured 4 -> 1.0.
    assert efficiency(20, 5.0, 2, 500) == {"images_per_s": 4.0, "efficiency": 1.0}
    assert efficiency(10, 5.0, 2, 500)["efficiency"] == 0.5


def test_no_environment_variable_turns_a_real_model_into_the_stand_in(monkeypatch):
    """The old hook: any worker with SDGATE_TEST_SLEEP_RENDER_MS set drew 8x8 squares under real keys."""
    from celery_bridge.pipeline import PipelineRunner
    from celery_bridge.worker import GenerationService

    monkeypatch.setenv("SDGATE_TEST_SLEEP_RENDER_MS", "1")
    service = GenerationService(WorkerConfig(model="tiny"))
    assert isinstance(service.runner, PipelineRunner)
    png = service.runner.render(GenerationRequest("a real render", width=64, height=64, steps=2, seed=1))
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_a_sleep_source_must_name_its_milliseconds():
    import pytest

    from celery_bridge.models import ModelEntry

    sleeper = ModelEntry(name="s", source="sleep:250")
    assert sleeper.sleep_ms == 250 and sleeper.kind == "sleep"
    assert ModelEntry(name="t", source="tiny").sleep_ms is None
    with pytest.raises(ValueError, match="sleep:<milliseconds>"):
        ModelEntry(name="s", source="sleep:fast")
