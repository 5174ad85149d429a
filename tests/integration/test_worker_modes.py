"""Both worker modes on real Redis + Celery with the tiny real pipeline.

The plain `sdgate worker` process and the Ray Serve task consumer each consume their own queue
here, so every assertion is about the mode under test.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from client.protocol import E_INVALID_REQUEST, GenerationRequest
from celery_bridge.contract import GenerationResult
from celery_bridge.producer import GenerationProducer, new_task_id
from celery_bridge.models import queue_for
from tests.resolve import key_of, resolved
from tests.integration.conftest import PlainWorker, celery_config, deploy, service_env

pytestmark = pytest.mark.integration
RESULT_TIMEOUT = 120


@pytest.fixture(scope="module")
def plain_mode(redis_server, home):
    worker = PlainWorker(redis_server.url, "plain-q", home, home / "plain-worker.log")
    producer = GenerationProducer(celery_config(redis_server.url, "plain-q"))
    yield producer
    producer.close()
    worker.stop()


@pytest.fixture(scope="module")
def ray_mode(redis_server, home, ray_head):
    spec = {"ray_address": ray_head.address, "gateway": None, "workers": 1,
            "celery": {"redis_url": redis_server.url, "queue": "ray-q"}, "timeout_s": 240}
    deploy(spec, service_env(redis_server.url, home))
    producer = GenerationProducer(celery_config(redis_server.url, "ray-q"))
    yield producer
    producer.close()


@pytest.fixture(params=["plain", "ray"])
def producer(request):
    return request.getfixturevalue(f"{request.param}_mode")


def render(producer: GenerationProducer, payload) -> GenerationResult:
    """Submit a raw payload (valid or not) the way the gateway does and wait for the result."""
    request = payload if isinstance(payload, GenerationRequest) else None
    key = key_of(request) if request else "0" * 64
    task_id = new_task_id(key)
    future = producer.watch(task_id)
    args = [resolved(request).normalized().to_dict()] if request else [payload]
    producer.app.send_task("sdgate.generate", args=args, task_id=task_id, queue=queue_for(producer.config.queue, "tiny"))
    return future.result(timeout=RESULT_TIMEOUT)


def test_renders_png_with_size_and_parameters(producer):
    result = render(producer, GenerationRequest("a red fox in the snow", width=96, height=64))
    assert result.ok, result.error_message
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (96, 64)
    parameters = image.info["parameters"]
    assert parameters.startswith("a red fox in the snow\n")
    assert f"Seed: {result.seed}" in parameters and "Size: 96x64" in parameters and "Steps: 2" in parameters


def test_same_request_gives_identical_bytes(producer):
    request = GenerationRequest("identical bytes please", seed=7)
    assert render(producer, request).png == render(producer, request).png


def test_ten_tasks_one_pipeline_load(producer):
    results = [render(producer, GenerationRequest(f"task number {i}")) for i in range(10)]
    assert all(r.ok for r in results)
    assert {r.pipeline_loads for r in results} == {1}
    assert len({r.worker for r in results}) == 1


def test_invalid_request_is_a_clear_error_and_worker_keeps_serving(producer):
    bad = GenerationRequest("ok").to_dict() | {"width": 10**6}
    result = render(producer, bad)
    assert not result.ok and result.error_code == E_INVALID_REQUEST
    assert result.error_field == "width" and "1000000" in result.error_message and "64..2048" in result.error_message
    assert render(producer, GenerationRequest("still serving")).ok


def test_a_model_the_worker_does_not_run_is_refused(producer):
    other = GenerationRequest("other model").with_defaults("someone/other-model", 64, 64, 2, 7.5, "default")
    result = render(producer, other.normalized().to_dict())
    assert not result.ok and result.error_code == E_INVALID_REQUEST and result.error_field == "model"
    assert "tiny" in result.error_message


def test_both_modes_give_byte_identical_pngs(plain_mode, ray_mode):
    request = GenerationRequest("same bytes from both worker modes", steps=3, guidance_scale=5.0)
    assert render(plain_mode, request).png == render(ray_mode, request).png
