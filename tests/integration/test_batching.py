"""Batching workers on the real local stack (real Redis, Ray gateway, Celery): a plain worker
SIGKILLed mid-batch loses nothing (each task rendered once more, cached once), and a Ray worker
replica renders concurrent same-shape requests in one batch.

Window batching renders with the bench/test sleep stand-in, named by this test's own catalogue
(celery_bridge/sleep_model.py): the kill must land inside one batch, and a fixed 4 s render makes
that certain on a loaded 2-core machine. The continuous loop steps the tiny pipeline; both kill
tests share one stack with a worker of each model. The batched tiny-pipeline images themselves are
checked in tests/unit/test_batching.py.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import redis
import yaml

from celery_bridge.sleep_model import sleep_catalogue
from client import protocol
from client.protocol import GenerationRequest
from tests.integration.harness import TaskRuns, ask, cached_pngs, local_stack, task_results, wait_for
from tests.integration.test_faults import in_thread
from tests.resolve import key_of
from tests.services import TINY_CATALOGUE

pytestmark = pytest.mark.integration
SLEEP_CATALOGUE = sleep_catalogue(Path(tempfile.mkdtemp(prefix="sdgate-sleep-")) / "models.yaml", 4000)
BATCH_ENV = {"SDGATE_VISIBILITY_TIMEOUT_S": "3", "SDGATE_LEASE_RENEW_S": "0.5", "SDGATE_MAX_BATCH_SIZE": "3",
             "SDGATE_BATCH_WAIT_MS": "2000", "SDGATE_MODELS_FILE": str(SLEEP_CATALOGUE)}


def test_ray_worker_replica_renders_concurrent_same_shape_requests_in_one_batch():
    with local_stack("ray", workers=1, env=BATCH_ENV, request_timeout_s=90) as stack:
        requests = [GenerationRequest(f"ray batch {i} {time.time()}") for i in range(3)]
        clients = [in_thread(lambda r=r: ask(stack, r, timeout=150)) for r in requests]
        for thread, outcome in clients:
            thread.join(150)
            assert "reply" in outcome, f"a client got {outcome.get('error')!r} instead of its image"
        for request, (_, outcome) in zip(requests, clients):
            assert outcome["reply"].meta["key"] == key_of(request)
            assert batch_sizes(stack, key_of(request)) == [3], "the replica's three threads fed one batch"


def both_batchings_catalogue(path: Path) -> Path:
    """The sleep stand-in (the default: window batching, its 4 s render certain to hold the kill
    inside one batch) and the tiny pipeline, which the continuous loop steps: one stack for both."""
    sleep_catalogue(path, 4000, max_batch_size=3)
    catalogue = yaml.safe_load(path.read_text())
    tiny = yaml.safe_load(TINY_CATALOGUE.read_text())["models"]
    catalogue["models"] += [dict(entry, max_batch_size=3) for entry in tiny]
    path.write_text(yaml.safe_dump(catalogue))
    return path


# The continuous loop steps a real Stable Diffusion pipeline (the tiny one): three requests of
# different steps, schedulers and guidance, long enough at 256 px for the kill to land mid-loop.
LOOP_MODEL = "tiny"


def loop_requests() -> list:
    return [GenerationRequest(f"loop victim {i} {time.time()}", width=256, height=256, steps=steps,
                              scheduler=scheduler, guidance_scale=guidance, model=LOOP_MODEL)
            for i, (steps, scheduler, guidance) in enumerate([(60, "ddim", 7.5), (80, "euler", 1.0),
                                                                (70, "euler_a", 4.0)])]


@pytest.fixture(scope="module")
def kill_stack():
    """One plain worker of each model, with a short visibility timeout and batches of up to 3."""
    catalogue = both_batchings_catalogue(Path(tempfile.mkdtemp(prefix="sdgate-batchings-")) / "models.yaml")
    env = dict(BATCH_ENV, SDGATE_MODELS_FILE=str(catalogue))
    with local_stack("celery", workers=1, env=env, request_timeout_s=300) as stack:
        yield stack


@pytest.mark.parametrize("mode", ["window", "continuous"])
def test_worker_sigkilled_mid_batch_loses_nothing(kill_stack, mode):
    stack = kill_stack
    requests = ([GenerationRequest(f"batch victim {i} {time.time()}") for i in range(3)] if mode == "window"
                else loop_requests())
    model = stack.catalogue().default if mode == "window" else LOOP_MODEL
    wait_for(lambda: _models(stack)[model]["batching"] == [mode], 30, f"the worker announcing {mode} batching")
    runs = {key_of(r): TaskRuns(stack.redis_url, key_of(r)) for r in requests}
    try:
        clients = [in_thread(lambda r=r: ask(stack, r, timeout=280)) for r in requests]
        # 1. All three held by the one worker, in one batch (the sleep render is running).
        starts = wait_for(lambda: all(run.started() for run in runs.values())
                          and [run.started()[0] for run in runs.values()], 60, "the batch starting")
        assert len(set(starts)) == 1, f"the three tasks should share one worker: {starts}"
        victim = starts[0]
        stack.spawn_worker(f"worker-{mode}-after-kill", model)
        # 2. Kill it inside the render; the new worker gets every task of the batch again.
        os.kill(victim, signal.SIGKILL)
        for thread, outcome in clients:
            thread.join(290)
            assert not thread.is_alive(), "a client hung"
            assert "reply" in outcome, f"a client got {outcome.get('error')!r} instead of its image"
        for request, (_, outcome) in zip(requests, clients):
            reply, key = outcome["reply"], key_of(request)
            assert reply.meta["key"] == key, "each client got its own request's image"
            assert not reply.meta["worker"].endswith(f":{victim}")
            assert runs[key].wait_succeeded() == 1, runs[key].events
            started = runs[key].started()  # complete once the success is read: one connection, in order
            assert len(started) == 2 and started[0] == victim != started[1], runs[key].events
            assert cached_pngs(stack, key) == [reply.png], "exactly one image cached per request"
            assert ask(stack, request).statuses[0]["state"] == protocol.STATUS_CACHED
    finally:
        for run in runs.values():
            run.close()


def _models(stack) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.fast_http_port}/v1/models", timeout=10) as answer:
        return {entry["id"]: entry for entry in json.loads(answer.read())["data"]}


def batch_sizes(stack, key: str) -> list:
    """batch_size of every stored Celery result of the tasks that rendered `key`."""
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    return [result["batch_size"] for result in task_results(client, key) if "batch_size" in result]
