"""Session fixtures for integration tests: real redis-server, real Ray, real Celery workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

from celery_bridge.config import CeleryConfig
from tests.services import REPO, free_port, python_process, stop_process, wait_for_port

pytestmark = pytest.mark.integration
WORKER_READY_TIMEOUT = 180


def service_env(redis_url: str, home: Path, **extra: str) -> dict:
    env = dict(os.environ, SDGATE_HOME=str(home), SDGATE_REDIS_URL=redis_url, RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(REPO)
    return env


def wait_for_log(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {log} after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


class PlainWorker:
    """`sdgate worker` as a subprocess (its own process group), consuming `queue` for `model` (the
    catalogue's default when None); `env`: more SDGATE_* settings. Without `wait`, call wait_ready()
    later (several workers then start side by side)."""

    def __init__(self, redis_url: str, queue: str, home: Path, log: Path, model: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, wait: bool = True):
        self.log = log
        self.started = time.monotonic()
        self.process = python_process(["-m", "cluster.cli", "worker", *(["--model", model] if model else []),
                                       "--loglevel", "INFO"], service_env(redis_url, home, SDGATE_QUEUE=queue, **(env or {})), log)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_for_log(self.log, " ready.", self.process, WORKER_READY_TIMEOUT)
        self.ready_seconds = time.monotonic() - self.started

    def stop(self) -> None:
        stop_process(self.process)


class RayHead:
    """`ray start --head --block` on free ports, stopped through its process group."""

    def __init__(self, home: Path, num_cpus: int = 4, extra_args=()):
        self.port = free_port()
        self.dashboard_port = free_port()
        self.log = home / "ray.log"
        temp = Path(f"/tmp/sdgate-ray-{self.port}")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={self.port}",
             f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=false",
             f"--num-cpus={num_cpus}",
             "--num-gpus=0", "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
             *extra_args],
            env=service_env("", home), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_port(self.port, timeout=60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process, timeout=0)  # `ray start --block` sits out 30 s of SIGTERM; nothing here is kept


def deploy(spec: dict, env: dict, timeout: float = 300) -> dict:
    result = subprocess.run([sys.executable, "-m", "cluster.deploy", json.dumps(spec)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdgate-home")


@pytest.fixture(scope="module")
def ray_head(home):
    """A Ray head for one module: stopped with it, so its idle processes and the worker replicas
    deployed on it (which beat presence on the session's Redis) do not outlive their tests."""
    head = RayHead(home)
    yield head
    head.stop()


def celery_config(redis_url: str, queue: str) -> CeleryConfig:
    return CeleryConfig(redis_url=redis_url, queue=queue)


@pytest.fixture(scope="session")
def shared_stack():
    """tests.integration.harness.SharedStack: `shared_stack.with_gateway(**settings)` in a module fixture."""
    from tests.integration.harness import SharedStack

    stacks = SharedStack()
    yield stacks
    stacks.close()
