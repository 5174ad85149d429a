"""Model families through the worker's task body (GenerationService.handle): a tiny random pipeline
of each family (SD 1.x, SD 2.x, SDXL, SD 3.5, FLUX.1), built offline with generated CLIP and T5 vocabularies,
renders text to image, a batch, previews and a cancel within one step, with every scheduler name its
family takes; the names it does not take, and a negative prompt where it means nothing, are refused
naming the field, at the gateway's catalogue and at the worker alike."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.batching import ShapeBatcher
from celery_bridge.config import WorkerConfig
from celery_bridge.families import FAMILIES, family_of_folder
from celery_bridge.models import ModelEntry, catalogue_from_dict
from celery_bridge.progress import latent_preview
from celery_bridge.tiny_model import save_tiny_family
from tests.unit.test_batching import Recorder, handle_concurrently

FAMILY_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module", params=list(FAMILY_PIPELINES))
def service(request, tmp_path_factory):
    from celery_bridge.worker import GenerationService

    folder = save_tiny_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return GenerationService(WorkerConfig(device="cpu", model=str(folder)))  # solo: each task renders at once


def ask(family: str, prompt: str, **fields) -> GenerationRequest:
    fields = dict({"width": 64, "height": 64, "steps": 3, "seed": 1}, **fields)
    if family == "flux":
        fields.setdefault("guidance_scale", 3.5)
    return GenerationRequest(prompt, **fields)


def png_of(result) -> Image.Image:
    assert result["ok"], result
    return Image.open(io.BytesIO(base64.b64decode(result["png_b64"])))


def test_the_family_is_detected_from_the_folder_and_gives_its_defaults(service):
    family = service.runner.family
    assert type(service.runner.pipe).__name__ == FAMILY_PIPELINES[family.name]
    assert family_of_folder(Path(service.runner.entry.source)) == family.name
    entry = ModelEntry(name="m", source=service.runner.entry.source)
    assert (entry.defaults.steps, entry.defaults.guidance_scale, entry.defaults.width) == \
        (family.steps, family.guidance, family.side)


def test_text_to_image_and_a_batch(service):
    family = service.runner.family.name
    alone = png_of(service.handle(ask(family, "a lighthouse at dusk").to_dict()))
    assert alone.size == (64, 64) and alone.text["parameters"].startswith("a lighthouse at dusk")
    service.batcher = ShapeBatcher(service._render_batch, 2, 60.0)  # as a worker with max_batch_size 2 has
    try:
        results = handle_concurrently(service, [ask(family, "one of two", seed=5), ask(family, "two of two", seed=6)])
        assert service.batcher.batches == [2] and all(r["batch_size"] == 2 for r in results.values())
    finally:
        service.batcher = None
    assert png_of(results["one of two"]).tobytes() != png_of(results["two of two"]).tobytes()


def test_previews_and_a_cancel_within_one_step(service):
    family = service.runner.family.name
    reporters = {}
    previews = []

    class Previewing(Recorder):
        def on_step(self, step, steps, latents):
            previews.append(latent_preview(latents))
            super().on_step(step, steps, latents)

    service._reporter = lambda request, every: reporters.setdefault(request.prompt, Previewing(request, cancel_at=0))
    try:
        kept = service.handle(ask(family, "keep me", seed=9).to_dict())
        cancelled = service.handle(ask(family, "cancel me", seed=9).to_dict())
    finally:
        del service._reporter
    steps = reporters["keep me"].steps
    assert kept["ok"] and len(steps) == steps[0][1] >= 3  # every step it ran (PNDM runs one more)
    preview = Image.open(io.BytesIO(previews[0]))
    assert preview.mode == "RGB" and preview.size == (8, 8)  # the latent grid, by the model's own RGB map
    assert len({np.asarray(Image.open(io.BytesIO(p))).tobytes() for p in previews}) > 1  # they change as it denoises
    assert cancelled["error_code"] == protocol.E_CANCELLED and len(reporters["cancel me"].steps) == 1


def test_every_scheduler_the_family_takes_renders_and_the_others_are_refused(service):
    family = service.runner.family
    images = {}
    for name in family.schedulers:
        images[name] = png_of(service.handle(ask(family.name, "schedulers", scheduler=name).to_dict())).tobytes()
    assert len(images) == len(family.schedulers)
    if family.name == "sd2":  # v-prediction (SD 2.1's 768 px model) survives every scheduler swap
        assert {service.runner.new_scheduler(name).config.prediction_type for name in family.schedulers} == \
            {"v_prediction"}
    refused = [name for name in protocol.SCHEDULERS if name not in family.schedulers]
    assert bool(refused) == (family.name in ("sd3", "flux"))
    catalogue = catalogue_from_dict({"default": "m", "models": [{"name": "m", "source": service.runner.entry.source}]})
    from serve_app.catalogue import GatewayCatalogue

    gateway = GatewayCatalogue(catalogue, None)
    for name in refused:
        result = service.handle(ask(family.name, "refused", scheduler=name).to_dict())
        assert result["error_code"] == protocol.E_INVALID_REQUEST and result["error_field"] == "scheduler"
        with pytest.raises(ProtocolError) as caught:
            gateway.resolve(ask(family.name, "refused", scheduler=name, model="m"))
        assert caught.value.field == "scheduler" and family.name in caught.value.message


def test_a_negative_prompt_is_refused_only_where_it_means_nothing(service):
    family = service.runner.family
    result = service.handle(ask(family.name, "a cat", negative_prompt="a dog").to_dict())
    if family.negative_prompt:
        with_negative = png_of(result).tobytes()
        assert with_negative != png_of(service.handle(ask(family.name, "a cat").to_dict())).tobytes()
    else:
        assert result["error_code"] == protocol.E_INVALID_REQUEST and result["error_field"] == "negative_prompt"
        assert "distilled" in result["error_message"]


def test_every_family_is_covered_here():
    assert set(FAMILY_PIPELINES) == set(FAMILIES)


def test_flux_dev_takes_guidance_and_schnell_is_keyed_and_rendered_without_it(tmp_path):
    """FLUX.1 dev's transformer takes the guidance as an input (28 steps at 3.5); schnell's has none
    (timestep-distilled: 4 steps), so its requests are keyed and rendered at guidance 0."""
    from celery_bridge.worker import GenerationService
    from serve_app.catalogue import GatewayCatalogue

    folders = {variant: save_tiny_family("flux", tmp_path / variant, guidance_embeds=variant == "dev")
               for variant in ("dev", "schnell")}
    catalogue = catalogue_from_dict({"default": "dev", "models": [{"name": variant, "source": str(folder)}
                                                                   for variant, folder in folders.items()]})
    dev, schnell = catalogue.get("dev"), catalogue.get("schnell")
    assert (dev.rules.variant, dev.rules.guidance_applies, dev.defaults.steps, dev.defaults.guidance_scale) == \
        ("dev", True, 28, 3.5)
    assert (schnell.rules.variant, schnell.rules.guidance_applies, schnell.defaults.steps,
            schnell.defaults.guidance_scale) == ("schnell", False, 4, 0.0)
    gateway = GatewayCatalogue(catalogue, None)
    for model, same in (("schnell", True), ("dev", False)):
        resolved = {g: gateway.resolve(ask("flux", "a fox", model=model, guidance_scale=g)) for g in (1.0, 7.0)}
        assert (resolved[1.0].cache_key() == resolved[7.0].cache_key()) is same
        assert (resolved[7.0].guidance_scale == 0.0) is same
    for variant, differ in (("dev", True), ("schnell", False)):
        service = GenerationService(WorkerConfig(device="cpu", model=str(folders[variant])))
        images = [png_of(service.handle(ask("flux", "a fox", guidance_scale=g).to_dict())) for g in (1.0, 7.0)]
        assert (images[0].tobytes() != images[1].tobytes()) is differ
        assert ("CFG scale: 0" in images[1].text["parameters"]) is not differ


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_single_file_renders_what_its_folder_renders_with_a_config_folder_holding_no_weights(
        family, tmp_path, monkeypatch):
    """The families that ship single files (A1111/Civitai's layout): the file alone carries the
    weights (its config folder has none), SDXL's second encoder in OpenCLIP's fused layout."""
    import shutil

    from safetensors import safe_open

    from celery_bridge.checkpoint import export_single_file
    from celery_bridge.pipeline import PipelineRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    folder = save_tiny_family(family, tmp_path / "folder", seed=11)
    single_file = export_single_file(folder, tmp_path / f"{family}.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with safe_open(str(single_file), "pt") as weights:
        keys = set(weights.keys())
    if family == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
        assert not any(key.startswith("conditioner.embedders.1.model.text_model.") for key in keys)

    from_folder, from_file = (
        PipelineRunner(WorkerConfig(model="m", device="cpu", model_cache_dir=str(tmp_path)), entry=entry)
        for entry in (ModelEntry(name="m", source=str(folder)),
                      ModelEntry(name="m", source=str(single_file), config=str(configs))))
    for prompt in ("a lighthouse at dusk", "a red fox"):
        request = GenerationRequest(prompt, seed=5, width=64, height=64, steps=3)
        assert from_file.render(request) == from_folder.render(request)
