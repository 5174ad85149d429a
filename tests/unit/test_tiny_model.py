"""The embedded tiny model: built offline, deterministic, once per cache folder, loadable."""

import hashlib
import threading

import pytest
import torch

from celery_bridge import tiny_model
from celery_bridge.tiny_model import TINY_MODEL_DIR, build_tiny_pipeline, ensure_tiny_model

COMPONENTS = ("unet", "vae", "text_encoder")
# sha256 over every tensor and a few tokenizations of the `tiny-sd-v1` recipe. Workers that find
# the folder render with whatever is in it, so new weights need a new folder name.
FINGERPRINT = {"tiny-sd-v1": "99c1a99733bba6b538e062e4f2c75bcf1fba8d26fe86b1dc0f46e7c19f9f910f"}
ANY_TEXT = "A  Red\tfox, 🦊 日本語 ñandú; <tag> 42%\u200b"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pipe(folder):
    return load(folder)


def load(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def fingerprint(pipe) -> str:
    digest = hashlib.sha256()
    for component in COMPONENTS:
        for name, tensor in sorted(getattr(pipe, component).state_dict().items()):
            digest.update(f"{component}.{name}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    for text in ("a red fox", "Ünïcode 日本語 🦊"):
        digest.update(repr(pipe.tokenizer(text).input_ids).encode())
    return digest.hexdigest()


def test_built_twice_gives_identical_weights_and_tokenizer(folder, pipe, tmp_path):
    other = ensure_tiny_model(tmp_path)
    again = load(other)
    for component in COMPONENTS:
        mine, theirs = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        assert mine.keys() == theirs.keys()
        for name, tensor in mine.items():
            assert torch.equal(tensor, theirs[name]), f"{component}.{name} differs between two builds"
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert any(p.parts[0] == "tokenizer" for p in files)
    for relative in files:
        assert (folder / relative).read_bytes() == (other / relative).read_bytes(), f"{relative} differs"


def test_recipe_change_needs_a_new_folder_name(pipe):
    assert fingerprint(pipe) == FINGERPRINT.get(TINY_MODEL_DIR), (
        "the tiny model's weights or tokenizer changed: bump TINY_MODEL_DIR in celery_bridge/tiny_model.py "
        "(hosts that built the old recipe keep rendering it) and pin the new fingerprint here")


def test_existing_folder_is_returned_without_rebuilding(folder, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def fail(*args):
        raise AssertionError("ensure_tiny_model rebuilt a model that was already there")

    monkeypatch.setattr(tiny_model, "build_tiny_pipeline", fail)
    assert ensure_tiny_model(folder.parent) == folder == folder.parent / TINY_MODEL_DIR
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps


def test_saved_folder_loads_as_a_stable_diffusion_pipeline(pipe):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8, "64x64 images have 8x8 latents"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert sum(p.numel() for c in COMPONENTS for p in getattr(pipe, c).parameters()) < 2_000_000


def test_tokenizer_takes_any_text_without_unknowns(pipe):
    tokenizer = pipe.tokenizer
    ids = tokenizer(ANY_TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1], "every byte has a token, so nothing is unknown"
    # CLIP's decoder puts a space after every word piece, so compare without spaces: no byte is lost.
    assert "".join(tokenizer.decode(ids, skip_special_tokens=True).split()) == "".join(ANY_TEXT.split()).lower()
    assert len(tokenizer("a red fox").input_ids) < len("a red fox") + 2, "the merges shorten words"
    padded = tokenizer(ANY_TEXT * 20, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and max(padded) < pipe.text_encoder.config.vocab_size


def test_two_builders_at_once_build_once(tmp_path, monkeypatch):
    # flock locks belong to the open file, so two threads opening the lock file contend exactly
    # as two processes do.
    builds = []
    real_build = tiny_model.build_tiny_pipeline
    started = threading.Barrier(2)

    def counted_build(tokenizer_dir):
        builds.append(tokenizer_dir)
        return real_build(tokenizer_dir)

    def ensure(results, i):
        started.wait()
        results[i] = ensure_tiny_model(tmp_path)

    monkeypatch.setattr(tiny_model, "build_tiny_pipeline", counted_build)
    results = [None, None]
    threads = [threading.Thread(target=ensure, args=(results, i)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / TINY_MODEL_DIR] * 2 and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{TINY_MODEL_DIR}.lock", TINY_MODEL_DIR]


def test_crashed_build_leftovers_are_cleaned_up(tmp_path, pipe):
    (tmp_path / f".{TINY_MODEL_DIR}-crashed" / "pipeline").mkdir(parents=True)
    (tmp_path / TINY_MODEL_DIR / "unet").mkdir(parents=True)  # a folder without model_index.json
    folder = ensure_tiny_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{TINY_MODEL_DIR}.lock", TINY_MODEL_DIR]
    assert fingerprint(load(folder)) == fingerprint(pipe)


def test_building_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_pipeline(tmp_path)
    assert torch.equal(torch.rand(4), expected)
