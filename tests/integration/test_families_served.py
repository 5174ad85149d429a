"""Every model family's tiny pipeline served as a user meets it: a real `sdgate worker` per family
(Celery over the session's redis-server, the pipeline resident) and a gateway front in this
process. Text to image, a batch, previews, a cancel within one step and every scheduler name the
family takes; the names it refuses, and a negative prompt where it means nothing, refused at the
gateway before anything is queued. The task bodies are covered closer in tests/unit/test_families.py."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

import pytest
import redis
import yaml
from PIL import Image

from celery_bridge import progress
from celery_bridge.config import CeleryConfig
from celery_bridge.families import FAMILIES, FAMILY_NAMES
from celery_bridge.models import catalogue_from_dict
from celery_bridge.presence import live_workers
from celery_bridge.producer import GenerationProducer
from celery_bridge.tiny_model import save_tiny_family
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from serve_app import stats
from serve_app.catalogue import GatewayCatalogue
from serve_app.config import GatewayConfig
from serve_app.front import FrontService
from serve_app.store import SQLiteImageStore
from tests.integration.conftest import PlainWorker
from tests.integration.harness import Loop, finished_task, task_results, wait_for
from tests.resolve import key_of

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:6]
LONG_STEPS = 150  # a render long enough to cancel in the middle of


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory):
    """(front, catalogue, redis client, loop): one worker per family, all started at once."""
    root = tmp_path_factory.mktemp("families")
    models = [{"name": family, "source": str(save_tiny_family(family, root / family)), "max_batch_size": 2,
               "batching": "window", "limits": {"max_steps": LONG_STEPS},
               "defaults": {"width": 64, "height": 64, "steps": 3, "scheduler": "default",
                            "guidance_scale": FAMILIES[family].guidance}}
              for family in FAMILY_NAMES]
    catalogue_file = root / "models.yaml"
    catalogue_file.write_text(yaml.safe_dump({"default": "sd1", "models": models}))
    base_queue = f"families-{RUN}"
    workers = []
    try:
        for family in FAMILY_NAMES:
            env = dict(SDGATE_MODELS_FILE=str(catalogue_file), HF_HUB_OFFLINE="1",
                       SDGATE_MAX_BATCH_SIZE="2", SDGATE_BATCH_WAIT_MS="400")
            workers.append(PlainWorker(redis_server.url, base_queue, root / f"home-{family}",
                                       root / f"worker-{family}.log", model=family, env=env, wait=False))
        for worker in workers:
            worker.wait_ready()
        catalogue = catalogue_from_dict({"default": "sd1", "models": models})
        producer = GenerationProducer(CeleryConfig(redis_url=redis_server.url, queue=base_queue))
        client = producer.redis
        wait_for(lambda: all(live_workers(client, family) for family in FAMILY_NAMES), 60, "a live worker per family")
        front = FrontService(GatewayConfig(request_timeout_s=120), producer,
                             SQLiteImageStore(root / "images.db", 1 << 26), stats.Counters(client, 0.1),
                             catalogue=GatewayCatalogue(catalogue, client))
        loop = Loop()
        yield front, catalogue, client, loop
        loop.close()
        front.close()
        producer.close()
        front.counters.close()
    finally:
        with ThreadPoolExecutor(max(1, len(workers))) as stopping:  # each sits out Celery's warm shutdown
            list(stopping.map(PlainWorker.stop, workers))


def request(family: str, prompt: str, **fields) -> GenerationRequest:
    return GenerationRequest(f"{prompt} {RUN}", model=family, **fields)


def image(answer) -> Image.Image:
    assert not isinstance(answer, BaseException), repr(answer)
    return Image.open(io.BytesIO(answer.png))


def results_of(client: redis.Redis, key: str) -> List[Dict[str, Any]]:
    """The stored Celery result of every task that rendered `key`."""
    return task_results(client, key)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_text_to_image_and_a_batch_through_the_familys_worker(served, family):
    front, catalogue, client, loop = served
    alone = loop.gather(front.generate_async(request(family, "a lighthouse at dusk")))[0]
    png = image(alone)
    assert png.size == (64, 64) and alone.meta["model"] == family
    assert alone.meta["worker"] in live_workers(client, family)
    for attempt in range(3):  # the worker's 400 ms window can close before a loaded machine sends the second
        pair = [request(family, f"one of two {attempt}"), request(family, f"two of two {attempt}")]
        answers = loop.gather(*(front.generate_async(r) for r in pair))
        assert image(answers[0]).tobytes() != image(answers[1]).tobytes()
        sizes = [[result["batch_size"] for result in results_of(client, key_of(sent, catalogue))] for sent in pair]
        if sizes == [[2], [2]]:
            break
    assert sizes == [[2], [2]], f"each of the pair rendered once, in one batch of two: {sizes}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_previews_arrive_from_the_familys_latents(served, family):
    front, _, _, loop = served
    events: List[Dict[str, Any]] = []
    answer = loop.gather(front.generate_async(request(family, "previews", steps=4), on_event=events.append,
                                              previews=1))[0]
    image(answer)
    previews = [Image.open(io.BytesIO(base64.b64decode(e["preview"]))) for e in events if e.get("preview")]
    assert previews, f"no preview reached the waiter: {events}"
    assert {p.mode for p in previews} == {"RGB"} and {p.size for p in previews} == {(8, 8)}  # the latent grid
    assert len({p.tobytes() for p in previews}) > 1  # they change as it denoises


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_cancel_stops_the_familys_worker_within_one_step(served, family):
    front, catalogue, client, loop = served
    sent = request(family, "cancel me", steps=LONG_STEPS)
    waiter = f"cancel-{family}-{RUN}"
    events: List[Dict[str, Any]] = []

    async def cancel_after_a_step():
        render = asyncio.ensure_future(front.generate_async(sent, on_event=events.append, waiter_id=waiter))
        while not any((e.get("step") or 0) >= 1 for e in events):
            assert not render.done(), render
            await asyncio.sleep(0.005)
        task_id = front._flights[key_of(sent, catalogue)].task_id
        assert front.cancel(waiter)
        at_cancel = progress.last_event(client, task_id)["step"]  # the worker's own count, stored every step
        outcome = (await asyncio.gather(render, return_exceptions=True))[0]
        return outcome, task_id, at_cancel

    outcome, task_id, at_cancel = loop.gather(cancel_after_a_step())[0]
    assert isinstance(outcome, ProtocolError) and outcome.code == protocol.E_CANCELLED, outcome

    result = finished_task(client, task_id, 60)["result"]
    assert result["ok"] is False and result["error_code"] == protocol.E_CANCELLED
    stopped = int(result["error_message"].split("stopped after step ")[1].split(" ")[0])
    assert stopped <= at_cancel + 1 < LONG_STEPS


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_scheduler_the_family_takes_renders_and_the_rest_are_refused(served, family):
    front, _, _, loop = served
    rules = FAMILIES[family]
    taken = list(rules.schedulers)
    answers = loop.gather(*(front.generate_async(request(family, "schedulers", scheduler=name)) for name in taken))
    for name, answer in zip(taken, answers):
        assert f"Sampler: {name}," in image(answer).text["parameters"]
    refused = [name for name in protocol.SCHEDULERS if name not in rules.schedulers]
    assert bool(refused) == (family in ("sd3", "flux"))
    asked = {"scheduler": refused}
    if not rules.negative_prompt:
        asked["negative_prompt"] = ["a dog"]
    for field, values in asked.items():
        for value in values:
            outcome = loop.gather(front.generate_async(request(family, "refused", **{field: value})))[0]
            assert isinstance(outcome, ProtocolError), outcome
            assert outcome.code == protocol.E_INVALID_REQUEST and outcome.field == field
            assert family in outcome.message


def test_the_listing_says_each_models_family_and_what_it_takes(served):
    front, _, _, _ = served
    listing = {entry["id"]: entry for entry in front.catalogue.listing()["data"]}
    for family in FAMILY_NAMES:
        entry = listing[family]
        assert (entry["family"], entry["schedulers"], entry["negative_prompt"]) == \
            (family, list(FAMILIES[family].schedulers), FAMILIES[family].negative_prompt)
        assert entry["live_workers"] == 1 and entry["batching"] == ["window"]
    # The tiny FLUX.1 is shaped as schnell (no guidance embeddings): no guidance, 4 steps unless set.
    assert (listing["flux"]["variant"], listing["flux"]["guidance"]) == ("schnell", False)
    others = [family for family in FAMILY_NAMES if family != "flux"]
    assert all(listing[family]["variant"] is None and listing[family]["guidance"] for family in others)
