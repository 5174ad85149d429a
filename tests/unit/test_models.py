"""The model catalogue: its schema, how the gateway fills and checks requests from it, and
single-file checkpoints that render exactly what their folder renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.checkpoint import export_single_file
from celery_bridge.config import REPO_CONFIG_DIR, WorkerConfig
from celery_bridge.models import CatalogueError, ModelEntry, catalogue_from_dict, load_catalogue, queue_for
from celery_bridge.tiny_model import save_tiny_variant
from serve_app.catalogue import GatewayCatalogue

TWO_MODELS = {
    "default": "a",
    "models": [
        {"name": "a", "source": "tiny", "defaults": {"width": 64, "height": 64, "steps": 2},
         "limits": {"max_side": 256, "max_steps": 10}},
        {"name": "b", "source": "/models/b", "defaults": {"width": 128, "height": 96, "steps": 3,
                                                          "scheduler": "ddim", "guidance_scale": 5}},
    ],
}


def gateway_catalogue(data=TWO_MODELS) -> GatewayCatalogue:
    return GatewayCatalogue(catalogue_from_dict(data), client=None)  # resolve() never reads Redis


def test_the_shipped_catalogue_serves_the_demo_model_and_the_tests_the_embedded_one():
    from celery_bridge.models import DEMO_FOLDER

    shipped = load_catalogue(REPO_CONFIG_DIR / "models.yaml").get(None)
    assert shipped.name == "demo" and shipped.kind == "folder" and Path(shipped.weights) == DEMO_FOLDER
    assert (DEMO_FOLDER / "model_index.json").is_file() and shipped.rules.name == "sd1"  # committed, and SD 1.x
    tiny = load_catalogue(REPO_CONFIG_DIR / "models-tiny.yaml")
    assert tiny.default == "tiny" and tiny.get(None).kind == "embedded"
    assert tiny.get("tiny").defaults.width == 64 and tiny.get("tiny").defaults.steps == 2


def test_a_worker_without_a_model_serves_the_catalogues_default(monkeypatch):
    from celery_bridge.config import WorkerConfig

    assert WorkerConfig().model == "tiny"  # the tests' catalogue (tests/conftest.py)
    monkeypatch.setenv("SDGATE_MODELS_FILE", str(REPO_CONFIG_DIR / "models.yaml"))
    assert WorkerConfig().model == "demo" and WorkerConfig(model="tiny").model == "tiny"


@pytest.mark.parametrize("change, words", [
    ({"default": "c"}, "default 'c' is not one of the models ['a', 'b']"),
    ({"models": []}, "lists no models"),
    ({"models": TWO_MODELS["models"] * 2}, "must be unique"),
    ({"models": [dict(TWO_MODELS["models"][0], fp16="no")]}, "models.0.fp16: Extra inputs are not permitted"),
    ({"models": [dict(TWO_MODELS["models"][0], workers="two")]}, "models.0.workers"),
    ({"models": [dict(TWO_MODELS["models"][0], defaults={"scheduler": "fast"})]}, "'fast' is not one of"),
    ({"models": [dict(TWO_MODELS["models"][0], defaults={"width": 512})]}, "exceed the limits"),
    ({"models": [dict(TWO_MODELS["models"][0], name="a b")]}, "A-Z a-z 0-9"),
])
def test_a_wrong_catalogue_is_an_error_that_says_where(change, words):
    with pytest.raises(CatalogueError) as caught:
        catalogue_from_dict(dict(TWO_MODELS, **change), "models.yaml")
    assert "models.yaml is invalid" in str(caught.value) and words in str(caught.value)


def test_missing_catalogue_file_says_what_to_do(tmp_path):
    with pytest.raises(CatalogueError, match="SDGATE_MODELS_FILE"):
        load_catalogue(tmp_path / "nope.yaml")


def test_the_gateway_fills_the_default_model_and_its_defaults():
    catalogue = gateway_catalogue()
    filled = catalogue.resolve(GenerationRequest("a fox"))
    assert (filled.model, filled.width, filled.height, filled.steps, filled.guidance_scale, filled.scheduler) == \
        ("a", 64, 64, 2, 7.5, "default")
    other = catalogue.resolve(GenerationRequest("a fox", model="b", steps=5))
    assert (other.model, other.width, other.height, other.steps, other.guidance_scale, other.scheduler) == \
        ("b", 128, 96, 5, 5.0, "ddim")
    # The key is that of the filled request: leaving a default out or spelling it gives one key.
    assert filled.cache_key() == catalogue.resolve(GenerationRequest("a fox", model="a", width=64)).cache_key()
    assert filled.cache_key() != catalogue.resolve(GenerationRequest("a fox", model="b")).cache_key()


def test_an_unknown_model_is_invalid_and_the_error_lists_the_models():
    with pytest.raises(ProtocolError) as caught:
        gateway_catalogue().resolve(GenerationRequest("a fox", model="sdxl"))
    error = caught.value
    assert error.code == protocol.E_INVALID_REQUEST and error.field == "model"
    assert "'sdxl' is not offered here" in error.message and "a, b" in error.message


@pytest.mark.parametrize("fields, field, words", [
    ({"width": 512}, "width", "width 512 is over 'a''s limit of 256"),
    ({"height": 264}, "height", "limit of 256"),
    ({"steps": 11}, "steps", "steps 11 is over 'a''s limit of 10; ask for at most 10"),
])
def test_a_request_over_its_models_limits_is_invalid(fields, field, words):
    with pytest.raises(ProtocolError) as caught:
        gateway_catalogue().resolve(GenerationRequest("a fox", **fields))
    assert caught.value.code == protocol.E_INVALID_REQUEST and caught.value.field == field
    assert words in caught.value.message


def test_each_model_has_its_own_queue():
    assert queue_for("sdgate", "a") == "sdgate.a" != queue_for("sdgate", "b")


def test_source_kinds(tmp_path):
    assert ModelEntry(name="x", source="tiny").kind == "embedded"
    assert ModelEntry(name="x", source=str(tmp_path)).kind == "folder"
    assert ModelEntry(name="x", source="/m/dreamshaper_8.safetensors").kind == "single_file"
    assert ModelEntry(name="x", source="/m/v1-5-pruned.ckpt").kind == "single_file"
    assert ModelEntry(name="x", source="runwayml/stable-diffusion-v1-5").kind == "hub"


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    """A second tiny model (another seed), as a folder and as one LDM-layout .safetensors file."""
    root = tmp_path_factory.mktemp("model-b")
    folder = save_tiny_variant(root / "folder", seed=7)
    return folder, export_single_file(folder, root / "model-b.safetensors")


def runner_for(entry: ModelEntry, tmp_path):
    from celery_bridge.pipeline import PipelineRunner

    return PipelineRunner(WorkerConfig(model=entry.name, device="cpu", model_cache_dir=str(tmp_path)), entry=entry)


def test_a_single_file_renders_the_same_bytes_as_its_folder_offline(model_b, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    folder, single_file = model_b
    request = GenerationRequest("a lighthouse at dusk", seed=5, width=64, height=64)
    from_folder = runner_for(ModelEntry(name="b", source=str(folder)), tmp_path)
    from_file = runner_for(ModelEntry(name="b", source=str(single_file), config=str(folder)), tmp_path)
    png = from_folder.render(request)
    assert from_file.render(request) == png
    assert from_file.render(GenerationRequest("another prompt", seed=5)) == \
        from_folder.render(GenerationRequest("another prompt", seed=5))
    # ... and another model renders another image for the same request.
    tiny = runner_for(ModelEntry(name="b", source="tiny"), tmp_path)
    assert tiny.render(request) != png


def test_a_single_file_without_a_local_config_folder_says_what_to_do(model_b, tmp_path):
    from celery_bridge.pipeline import ModelLoadError

    _, single_file = model_b
    with pytest.raises(ModelLoadError, match="not a local folder holding model_index.json.*never downloads"):
        runner_for(ModelEntry(name="b", source=str(single_file)), tmp_path)


# -- SDGATE_MODEL names the local stack's default model ----------------------------------------------

def test_sdgate_model_with_a_folder_is_served_as_the_default(tmp_path, monkeypatch):
    """`SDGATE_MODEL=/models/my-sd15 sdgate up` once served `tiny` without a word."""
    from cluster.local import LocalStack, StackConfig
    from serve_app.config import GatewayConfig

    folder = tmp_path / "my-sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    monkeypatch.setenv("SDGATE_MODEL", str(folder))
    stack = LocalStack(home=tmp_path / "home", stack=StackConfig(), gateway=GatewayConfig())
    stack.paths.make()
    stack._choose_default_model()
    catalogue = stack.catalogue()
    assert catalogue.default == "my-sd15" and catalogue.get("my-sd15").source == str(folder)
    assert "tiny" in catalogue.names and "my-sd15" in stack.workers_per_model()
    assert stack.child_env()["SDGATE_MODELS_FILE"] == str(stack.models_file)  # every process reads the same


def test_sdgate_model_that_cannot_be_served_is_refused_saying_what_to_do(tmp_path):
    from celery_bridge.models import CatalogueError, load_catalogue, with_default_model

    catalogue = load_catalogue()
    assert with_default_model(catalogue, "tiny").default == "tiny"
    checkpoint = tmp_path / "dreamshaper.safetensors"
    checkpoint.write_bytes(b"x")
    with pytest.raises(CatalogueError, match=r"single-file checkpoint.*config: /a/diffusers/folder"):
        with_default_model(catalogue, str(checkpoint))
    with pytest.raises(CatalogueError, match=r"neither a catalogued model \(tiny\) nor a local diffusers folder"):
        with_default_model(catalogue, str(tmp_path / "missing"))
