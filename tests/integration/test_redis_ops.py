"""Redis as operators run it: an ACL user with an awkward password on IPv6, the local stack's own
redis-server, and Celery's own tools (`celery -A celery_bridge inspect ...`, task events) against a
real worker. Old and oldest-supported Redis versions: test_redis_versions.py."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from celery_bridge.config import CeleryConfig
from cluster.local import LocalStack, StackConfig, StackError
from serve_app.config import GatewayConfig
from tests.resolve import resolved
from tests.integration.conftest import PlainWorker
from tests.services import REPO, RedisServer, free_port, wait_for_port

pytestmark = pytest.mark.integration
PASSWORD = "ab/cd+ef="
USER = "sdgate-app"


def start_redis(binary: str, workdir: Path, *conf_lines: str) -> tuple:
    port = free_port()
    conf = workdir / "redis.conf"
    conf.write_text("\n".join([f"port {port}", "bind 127.0.0.1 ::1", f'dir "{workdir}"', 'save ""',
                               *conf_lines]) + "\n")
    process = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process, port


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def key(n: object) -> str:
    return hashlib.sha256(f"key-{n}".encode()).hexdigest()


# -- the local stack's redis-server ----------------------------------------------------------------

def test_sdgate_up_names_a_redis_already_on_its_port():
    """apt's redis-server starts on 6379 under systemd; `sdgate up` says so instead of colliding."""
    server = RedisServer().start()
    try:
        stack = LocalStack(home=Path("/nonexistent"), gateway=GatewayConfig(socket_port=free_port(),
                                                                           http_port=free_port()),
                           stack=StackConfig(redis_port=server.port, ray_port=free_port(),
                                             dashboard_port=free_port()))
        with pytest.raises(StackError, match="another redis-server.*systemctl disable --now redis-server.*"
                                             "SDGATE_REDIS_PORT"):
            stack._check_ports_free()
    finally:
        server.stop()


def test_local_redis_password_is_not_on_its_command_line(tmp_path, monkeypatch):
    secret = 'ab/cd+ef="x\\'
    monkeypatch.setenv("SDGATE_REDIS_PASSWORD", secret)
    port = free_port()
    stack = LocalStack(home=tmp_path, gateway=GatewayConfig(), stack=StackConfig(redis_port=port,
                                                                                 redis_maxmemory_mb=64))
    stack.paths.make()
    try:
        stack._start_redis()
        assert stat.S_IMODE(stack.paths.redis_conf.stat().st_mode) == 0o600
        assert "ab/cd" not in " ".join(psutil.Process(stack.processes["redis"]).cmdline())
        client = redis.Redis(port=port, password=secret)
        settings = client.config_get("*")
        assert settings["bind"] == "127.0.0.1" and settings["protected-mode"] == "yes"
        assert settings["maxmemory-policy"] == "noeviction" and int(settings["maxmemory"]) == 64 * 2**20
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
    finally:
        stack.down(log=lambda *_: None)


# -- an ACL user, an awkward password, IPv6: Celery, kombu and redis-py all get through --------------

@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    import shutil

    process, port = start_redis(shutil.which("redis-server"), tmp_path_factory.mktemp("redis-acl"),
                                "user default off", f"user {USER} on >{PASSWORD} ~* &* +@all")
    yield port
    stop(process)


@pytest.fixture(scope="module")
def acl_worker(acl_redis, tmp_path_factory):
    home = tmp_path_factory.mktemp("acl-home")
    saved = dict(os.environ)
    os.environ.update(SDGATE_REDIS_USERNAME=USER, SDGATE_REDIS_PASSWORD=PASSWORD)
    try:
        worker = PlainWorker(f"redis://[::1]:{acl_redis}/0", "acl-q", home, home / "worker.log")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield worker
    worker.stop()


def celery_tool(acl_redis: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SDGATE_REDIS_URL=f"redis://[::1]:{acl_redis}/0", SDGATE_REDIS_USERNAME=USER,
               SDGATE_REDIS_PASSWORD=PASSWORD, PYTHONPATH=str(REPO))
    return subprocess.run([str(Path(sys.executable).parent / "celery"), "-A", "celery_bridge", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_celery_inspect_sees_the_worker(acl_redis, acl_worker):
    """Operators' own tools load sdgate's module-level app: `celery -A celery_bridge inspect ...`."""
    # Naming the worker (its hostname is sdgate-<pid>@<host>) lets inspect return on its reply
    # instead of waiting out the whole timeout for workers that might exist.
    worker = f"sdgate-{acl_worker.process.pid}@{socket.gethostname()}"
    ping = celery_tool(acl_redis, "inspect", "ping", "--timeout", "10", "-d", worker)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    stats = celery_tool(acl_redis, "inspect", "stats", "--timeout", "10", "-d", worker)
    assert stats.returncode == 0 and '"prefetch_count": 1' in stats.stdout, stats.stdout + stats.stderr


def test_a_generation_through_an_acl_user_with_task_events(acl_redis, acl_worker):
    from celery_bridge.contract import TASK_NAME
    from celery_bridge.producer import GenerationProducer, new_task_id
    from client.protocol import GenerationRequest

    config = CeleryConfig(redis_url=f"redis://[::1]:{acl_redis}/0", redis_username=USER, redis_password=PASSWORD,
                          queue="acl-q")
    producer = GenerationProducer(config)
    events: list = []
    receivers: list = []

    def listen() -> None:
        try:
            with producer.app.connection_for_read() as conn:
                receivers.append(producer.app.events.Receiver(conn, handlers={"*": events.append}))
                receivers[0].capture(limit=None, timeout=120, wakeup=False)
        except Exception:  # noqa: BLE001 - the receiver stops by timeout or should_stop
            pass

    threading.Thread(target=listen, daemon=True).start()
    try:
        # Handshake instead of a sleep: probe events until the receiver has subscribed and sees one.
        with producer.app.events.default_dispatcher() as dispatcher:
            deadline = time.monotonic() + 30
            while not any(e["type"] == "sdgate-probe" for e in events):
                assert time.monotonic() < deadline, "the event receiver never subscribed"
                dispatcher.send("sdgate-probe")
                time.sleep(0.1)
        request = resolved(GenerationRequest("acl fox", width=64, height=64, steps=2))
        task_id = new_task_id(request.cache_key())
        future = producer.watch(task_id)
        producer.submit(request, task_id)
        result = future.result(timeout=120)
        assert result.ok, result
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {"task-sent", "task-succeeded"} <= {e["type"] for e in events}:
            time.sleep(0.1)
        kinds = {e["type"] for e in events if e.get("uuid") == task_id}
        assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= kinds, kinds
        assert any(e.get("name") == TASK_NAME for e in events)
    finally:
        if receivers:
            receivers[0].should_stop = True
        producer.close()


def test_the_image_store_reaches_an_acl_user_on_ipv6(acl_redis):
    """The gateway opens its Redis cache from CeleryConfig.broker_url(): quoting must survive."""
    from serve_app.store import open_store

    config = CeleryConfig(redis_url=f"redis://[::1]:{acl_redis}/0", redis_username=USER, redis_password=PASSWORD)
    with open_store("redis", redis_url=config.broker_url(), max_bytes=10_000) as store:
        store.put(key("acl"), b"png", {"ok": True})
        assert store.get(key("acl")).meta == {"ok": True}
