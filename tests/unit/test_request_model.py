"""GenerationRequest: validation names the field; the cache key covers every field."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from client.protocol import MAX_PROMPT_CHARS, GenerationRequest, InvalidRequest

REPO = Path(__file__).resolve().parents[2]
BASE = GenerationRequest("a red fox", negative_prompt="blurry", width=64, height=64, steps=2, guidance_scale=7.5,
                         seed=1, scheduler="default", model="tiny")

# A different valid value for every field; a new field without an entry here fails the test below.
CHANGED = {"prompt": "a blue fox", "negative_prompt": "grainy", "width": 72, "height": 72, "steps": 3,
           "guidance_scale": 8.0, "seed": 2, "scheduler": "ddim", "model": "runwayml/stable-diffusion-v1-5"}


def test_every_field_changes_the_key():
    names = [f.name for f in dataclasses.fields(GenerationRequest)]
    assert sorted(names) == sorted(CHANGED), "add the new field to CHANGED (and to the cache key)"
    base_key = BASE.cache_key()
    keys = {name: dataclasses.replace(BASE, **{name: value}).cache_key() for name, value in CHANGED.items()}
    for name, key in keys.items():
        assert key != base_key, f"changing {name} must change the cache key"
    assert len(set(keys.values())) == len(keys)


def test_normalisation_does_not_change_the_key():
    assert GenerationRequest("  A   Red\tFOX ", seed=1).cache_key() == GenerationRequest("a red fox", seed=1).cache_key()
    assert GenerationRequest("a red fox", guidance_scale=7).cache_key() == \
        GenerationRequest("a red fox", guidance_scale=7.0).cache_key()


def test_defaults_resolve_to_the_same_key_as_explicit_values():
    derived = GenerationRequest("a red fox").normalized()
    explicit = GenerationRequest("a red fox", width=64, height=64, steps=2, seed=derived.seed)
    assert explicit.cache_key() == GenerationRequest("a red fox").cache_key()


def test_derived_seed_is_stable_across_processes():
    here = GenerationRequest("stable seed").normalized().seed
    code = "from client.protocol import GenerationRequest as G; print(G('stable seed').normalized().seed)"
    there = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert int(there.stdout) == here
    assert GenerationRequest("another prompt").normalized().seed != here


@pytest.mark.parametrize("field, value, words", [
    ("prompt", "", "empty"),
    ("prompt", "   \n\t ", "empty"),
    ("prompt", "x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
    ("prompt", 42, "string"),
    ("negative_prompt", "x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
    ("width", 100, "multiple of 8"),
    ("width", 10**6, "64..2048"),
    ("height", 8, "64..2048"),
    ("width", "512", "integer"),
    ("steps", -1, "1..150"),
    ("steps", 10**9, "1..150"),
    ("steps", 2.5, "integer"),
    ("guidance_scale", math.nan, "outside"),
    ("guidance_scale", 31.0, "outside"),
    ("guidance_scale", True, "number"),
    ("seed", -1, "0..4294967295"),
    ("seed", 2**32, "0..4294967295"),
    ("scheduler", "warp", "not one of"),
    ("model", "", "non-empty"),
    ("model", "../../etc passwd", "A-Z"),
])
def test_bad_field_is_named_with_value_and_limit(field, value, words):
    with pytest.raises(InvalidRequest) as caught:
        dataclasses.replace(BASE, **{field: value}).validate()
    assert caught.value.field == field and words in str(caught.value)


def test_unknown_and_missing_fields_are_refused():
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})
    assert caught.value.field == "colour"
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest.from_dict({"width": 64})
    assert caught.value.field == "prompt"
    with pytest.raises(InvalidRequest):
        GenerationRequest.from_dict(["prompt"])
