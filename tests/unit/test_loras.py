"""LoRAs per request on the tiny CPU pipeline: random LoRAs built offline with peft, loaded once per
worker as named adapters and switched per call (set_adapters), never reloading the base."""

from __future__ import annotations

import base64
from typing import Any, Dict

import numpy as np
import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.config import WorkerConfig
from celery_bridge.models import ModelEntry, catalogue_from_dict
from celery_bridge.tiny_model import save_tiny_lora
from tests.unit.test_batching import handle_concurrently, pixels


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from celery_bridge.pipeline import PipelineRunner
    from celery_bridge.worker import GenerationService

    root = tmp_path_factory.mktemp("loras")
    config = WorkerConfig(device="cpu", model_cache_dir=str(root / "models"))  # solo: each task renders at once
    base = PipelineRunner(config)  # builds tiny; its UNet's shape is what the LoRAs are made for
    files = {name: save_tiny_lora(base.pipe, root / name, seed=seed) for name, seed in (("ink", 1), ("grain", 2))}
    entry = ModelEntry(name="tiny", source="tiny", defaults={"width": 64, "height": 64, "steps": 4},
                       loras=[{"name": name, "source": str(path)} for name, path in files.items()])
    service = GenerationService(config)
    service.runner = PipelineRunner(config, entry=entry)
    return service


def ask(prompt: str = "a fox in ink", loras=None, seed: int = 3) -> Dict[str, Any]:
    fields = {"prompt": prompt, "seed": seed}
    if loras is not None:
        fields["loras"] = [{"name": name, "weight": weight} for name, weight in loras]
    return fields


def png(result: Dict[str, Any]) -> bytes:
    assert result["ok"], result
    return base64.b64decode(result["png_b64"])


def test_a_lora_changes_the_image_and_weight_zero_is_the_base(service):
    base = png(service.handle(ask()))
    inked = png(service.handle(ask(loras=[("ink", 1.0)])))
    assert inked != base and png(service.handle(ask(loras=[("grain", 1.0)]))) != inked
    assert png(service.handle(ask(loras=[("ink", 0.5)]))) not in (base, inked)
    assert png(service.handle(ask(loras=[("ink", 0.0)]))) == base  # keyed and rendered as the base request
    runner = service.runner
    request = runner.resolve(GenerationRequest("a fox in ink", seed=3))
    with runner._lock:  # the adapter itself at weight 0, not only the key: the base's pixels exactly
        runner.apply_loras((("ink", 0.0),))
        at_zero = runner._call(request)
        runner.apply_loras(None)
    assert np.array_equal(np.asarray(at_zero), pixels(base).astype(np.uint8))
    assert png(service.handle(ask())) == base  # switched back off


def test_the_cache_key_covers_the_lora_set_and_weights_in_any_order():
    def key(loras):
        return GenerationRequest("x", loras=loras).with_defaults("tiny", 64, 64, 4, 7.5, "default").cache_key()

    assert key((("ink", 1.0), ("grain", 0.5))) == key((("grain", 0.5), ("ink", 1.0)))
    assert len({key(None), key((("ink", 1.0),)), key((("ink", 0.5),)), key((("grain", 1.0),))}) == 4
    assert key((("ink", 0.0),)) == key(None)


def test_two_requests_with_different_loras_in_flight_each_get_their_own(service):
    alone = {name: png(service.handle(ask(f"both {name}", [(name, 1.0)], seed=7))) for name in ("ink", "grain")}
    from celery_bridge.batching import ShapeBatcher

    service.batcher = ShapeBatcher(service._render_batch, 2, 1.0)  # as a worker with max_batch_size 2 has
    try:
        results = handle_concurrently(service, [GenerationRequest.from_dict(dict(
            ask(f"both {name}", [(name, 1.0)], seed=7), width=64, height=64, steps=4)) for name in ("ink", "grain")])
        assert service.batcher.batches == [1, 1]  # never one call: adapters apply to a whole call
    finally:
        service.batcher = None
    for name in ("ink", "grain"):
        assert png(results[f"both {name}"]) == alone[name]


def test_switching_loras_never_reloads_the_base(service):
    runner = service.runner
    loads, lora_loads = type(runner).loads, runner.lora_loads
    for loras in ([("ink", 1.0)], None, [("grain", 0.7)], [("ink", 0.3), ("grain", 0.3)], None):
        assert service.handle(ask("switching", loras))["ok"]
    assert (type(runner).loads, runner.lora_loads) == (loads, lora_loads) and lora_loads == 2


def test_a_lora_not_in_the_catalogue_or_for_another_family_is_refused_naming_it(service):
    result = service.handle(ask(loras=[("watercolour", 1.0)]))
    assert result["error_code"] == protocol.E_INVALID_REQUEST and "watercolour" in result["error_message"]
    from serve_app.catalogue import GatewayCatalogue

    catalogue = catalogue_from_dict({"default": "tiny", "models": [service.runner.entry.model_dump()]})
    with pytest.raises(ProtocolError) as caught:
        GatewayCatalogue(catalogue, None).resolve(GenerationRequest("x", loras=(("watercolour", 1.0),)))
    assert caught.value.field == "loras" and "watercolour" in caught.value.message and "ink" in caught.value.message
    with pytest.raises(ValueError, match="'xl-style' is for sdxl models"):
        ModelEntry(name="tiny", source="tiny", loras=[{"name": "xl-style", "source": "x.safetensors", "family": "sdxl"}])


def test_a1111_prompt_tags_name_loras():
    from serve_app.a1111_api import generation_from_a1111

    request, _ = generation_from_a1111({"prompt": "a fox <lora:ink:0.8> at night <lora:grain>"}, "tiny", False)
    assert request.prompt == "a fox   at night" and request.loras == (("ink", 0.8), ("grain", 1.0))


def test_the_continuous_loop_runs_one_lora_set_at_a_time(service):
    from celery_bridge.continuous import ContinuousLoop, DiffusersStepper
    from tests.unit.test_continuous import run_together

    runner = service.runner
    requests = [runner.resolve(GenerationRequest(f"loop {name}", width=64, height=64, steps=4, seed=2,
                                                 loras=((name, 1.0),) if name else None))
                for name in ("ink", "grain", None)]
    loop = ContinuousLoop(DiffusersStepper(runner), max_active=4, lock=runner._lock)
    results = run_together(loop, requests)
    assert max(loop.iterations) == 1  # different LoRA sets never share an iteration
    for i, request in enumerate(requests):
        assert np.abs(pixels(results[i].png) - pixels(runner.render(request))).max() <= 2
