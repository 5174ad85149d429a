"""Two models side by side on one `sdgate up` stack: the embedded `tiny` (the default) and
`tiny-b`, another tiny model (another seed) served from a single .safetensors file, one worker
each; plus `ghost`, catalogued with no worker. Real Redis, Ray Serve gateway and Celery workers."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import redis
import yaml

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.checkpoint import export_single_file
from celery_bridge.presence import live_workers
from celery_bridge.tiny_model import save_tiny_variant
from tests.integration.harness import ask, connect, counters, local_stack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = save_tiny_variant(root / "tiny-b", seed=7)
    single_file = export_single_file(folder, root / "tiny-b.safetensors")
    catalogue = {"default": "tiny", "models": [
        {"name": "tiny", "source": "tiny", "defaults": {"width": 64, "height": 64, "steps": 2},
         "limits": {"max_side": 2048, "max_steps": 150}},
        {"name": "tiny-b", "source": str(single_file), "config": str(folder),
         "defaults": {"width": 64, "height": 64, "steps": 3}, "limits": {"max_side": 256, "max_steps": 10}},
        {"name": "ghost", "source": str(folder), "workers": 0},
    ]}
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(catalogue))
    with local_stack(env={"SDGATE_MODELS_FILE": str(path), "HF_HUB_OFFLINE": "1"}) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        # Both workers announce themselves once their pipelines are loaded.
        wait_for(lambda: live_workers(client, "tiny") and live_workers(client, "tiny-b"), 180, "a worker per model")
        yield stack


def http_json(stack, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.http_port}{path}", timeout=30) as response:
        return json.loads(response.read())


def test_each_model_renders_its_own_image_and_the_default_needs_no_name(two_models):
    stack = two_models
    before = per_model(counters(stack))  # `sdgate up`'s start-up probe rendered one `tiny` image
    default = ask(stack, GenerationRequest("a lighthouse at dusk", seed=3))
    named = ask(stack, GenerationRequest("a lighthouse at dusk", seed=3, model="tiny"))
    other = ask(stack, GenerationRequest("a lighthouse at dusk", seed=3, model="tiny-b"))
    assert default.meta["model"] == "tiny" and named.meta["key"] == default.meta["key"]  # same key: one image
    assert other.meta["model"] == "tiny-b" and other.meta["steps"] == 3  # tiny-b's own default
    assert other.png != default.png and other.meta["key"] != default.meta["key"]
    assert protocol.STATUS_CACHED in [s.get("state") for s in named.statuses]

    # Each worker rendered only its own model: the answering worker is the one announced for it.
    client = redis.Redis.from_url(stack.redis_url)
    assert default.meta["worker"] in live_workers(client, "tiny")
    assert other.meta["worker"] in live_workers(client, "tiny-b")
    assert set(live_workers(client, "tiny")).isdisjoint(live_workers(client, "tiny-b"))
    expected = {("tiny", "rendered"): 1, ("tiny-b", "rendered"): 1, ("tiny", "requests"): 2, ("tiny-b", "requests"): 1}
    wait_for(lambda: {k: per_model(counters(stack))[k] - before[k] for k in expected} == expected, 30,
             "per-model counters: each model rendered its one image")


def per_model(figures: dict) -> dict:
    """{(model, counter): value} from `sdgate stats`' `models`, 0 where absent."""
    return {(model, counter): figures["models"].get(model, {}).get(counter, 0)
            for model in ("tiny", "tiny-b", "ghost") for counter in ("requests", "rendered", "unavailable")}


def test_the_model_listing_has_defaults_limits_and_live_workers(two_models):
    listing = http_json(two_models, "/v1/models")
    assert listing["object"] == "list"
    models = {m["id"]: m for m in listing["data"]}
    assert set(models) == {"tiny", "tiny-b", "ghost"} and all(m["object"] == "model" for m in models.values())
    assert models["tiny"]["default"] and not models["tiny-b"]["default"]
    assert (models["tiny"]["live_workers"], models["tiny-b"]["live_workers"], models["ghost"]["live_workers"]) == \
        (1, 1, 0)
    assert models["tiny-b"]["defaults"]["steps"] == 3 and models["tiny-b"]["limits"]["max_side"] == 256
    assert models["tiny-b"]["source_kind"] == "single_file"
    with connect(two_models) as conn:  # the socket protocol lists the same
        assert protocol.list_models(conn)["data"] == listing["data"]


def test_unknown_model_and_model_without_worker_fail_fast_with_clear_errors(two_models):
    stack = two_models
    before = counters(stack)
    for request, code, words in (
            (GenerationRequest("x", model="sdxl"), protocol.E_INVALID_REQUEST, "'sdxl' is not offered here"),
            (GenerationRequest("x", model="ghost"), protocol.E_UNAVAILABLE, "no worker serves 'ghost'"),
            (GenerationRequest("x", model="tiny-b", steps=11), protocol.E_INVALID_REQUEST, "limit of 10")):
        started = time.monotonic()
        with pytest.raises(ProtocolError) as caught:
            ask(stack, request, timeout=60)  # the gateway's own deadline is 300 s
        assert caught.value.code == code and words in caught.value.message, caught.value.message
        assert time.monotonic() - started < 60
    assert "tiny, tiny-b, ghost" in _message(stack, GenerationRequest("x", model="sdxl"))
    # Nothing was queued for the model nobody serves.
    assert redis.Redis.from_url(stack.redis_url).llen("sdgate.ghost") == 0
    after = wait_for(lambda: counters(stack)["models"].get("ghost", {}).get("unavailable"), 30, "counted")
    assert after >= 1 and counters(stack)["cache_misses"] > before["cache_misses"]


def _message(stack, request: GenerationRequest) -> str:
    try:
        ask(stack, request, timeout=60)
    except ProtocolError as exc:
        return exc.message
    raise AssertionError("no error")
