"""`sdgate down`/`status` know their processes by PID *and* create time (psutil); the local Redis's
memory ceiling. (The local Redis itself: tests/integration/test_redis_ops.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import psutil
import pytest

from cluster.local import RAY_STOP_GRACE_S, LocalStack, StackConfig, _group_tree, _stop_group
from serve_app.config import GatewayConfig

LOCAL = Path(__file__).resolve().parents[2] / "cluster" / "local.py"


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def stack_in(home: Path) -> LocalStack:
    return LocalStack(home=home, stack=StackConfig(), gateway=GatewayConfig())


def record(home: Path, groups: Dict[str, Tuple[int, float]]) -> None:
    """A stack.json as `up` writes it: each group's {name: (pid, create time)}."""
    run = home / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "stack.json").write_text(json.dumps({"processes": {name: pid for name, (pid, _) in groups.items()},
                                                "create_times": {name: t for name, (_, t) in groups.items()}}))


def test_a_reused_pid_is_left_alone(tmp_path, sleeper):
    """A stale stack.json naming a PID that now belongs to an unrelated process (same PID, other
    create time, as after a reboot) must not kill it, and status must not call it ours."""
    real = psutil.Process(sleeper.pid).create_time()
    record(tmp_path, {"ray": (sleeper.pid, real - 1000)})
    stack = stack_in(tmp_path)
    assert stack.status()["processes"]["ray"].startswith("stopped (pid now belongs to another process")
    assert stack.running() == {}
    assert stack.down(log=lambda *_: None) == []
    assert sleeper.poll() is None, "down killed a process it did not start"


def test_the_recorded_process_is_stopped(tmp_path, sleeper):
    record(tmp_path, {"worker-0": (sleeper.pid, psutil.Process(sleeper.pid).create_time())})
    stack = stack_in(tmp_path)
    assert stack.status()["processes"]["worker-0"] == "running"
    assert stack.down(log=lambda *_: None) == ["worker-0"]
    assert sleeper.wait(10) is not None


IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"


def test_sigterm_grace_is_the_timeout_for_workers_and_short_for_ray(tmp_path):
    """Ray's head with Serve never exits on SIGTERM, so down gives the Ray group RAY_STOP_GRACE_S
    and the workers (a render to finish) the whole timeout; each then SIGKILLs what is left, and says so."""
    stubborn = {name: subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], start_new_session=True,
                                       stdout=subprocess.PIPE, text=True) for name in ("worker-0", "ray")}
    try:
        for process in stubborn.values():
            assert process.stdout.readline().strip() == "ready"  # SIGTERM ignored from here on
        record(tmp_path, {name: (p.pid, psutil.Process(p.pid).create_time()) for name, p in stubborn.items()})
        lines = []
        assert stack_in(tmp_path).down(log=lines.append, timeout=3) == ["worker-0", "ray"]
        assert lines == ["stopped worker-0 (1 killed, still running 3 s after SIGTERM)",
                         f"stopped ray (1 killed, still running {RAY_STOP_GRACE_S:g} s after SIGTERM)"]
        assert all(process.wait(10) is not None for process in stubborn.values())
    finally:
        for process in stubborn.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def test_a_process_that_exited_unreaped_counts_as_stopped(tmp_path):
    """A group member that exits on SIGTERM but whose parent never collects it (a zombie, as under an
    init that does not reap) is stopped: no waiting out the grace, no SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
                               "'import time; time.sleep(120)'], start_new_session=True); print(child.pid, flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert _stop_group(child, 30, psutil.Process(child).create_time()) == 0
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE, "its parent never reaped it"
    finally:
        parent.kill()
        parent.wait()


def test_a_record_without_create_time_is_not_trusted(tmp_path, sleeper):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stack.json").write_text(json.dumps({"processes": {"redis": sleeper.pid}}))
    lines = []
    assert stack_in(tmp_path).down(log=lines.append) == []
    assert sleeper.poll() is None and "no create time" in lines[0]


def test_group_tree_follows_children_with_psutil_only(sleeper):
    child = psutil.Process(sleeper.pid)
    assert _group_tree(sleeper.pid, child.create_time()) == {sleeper.pid}
    assert "/proc" not in LOCAL.read_text(), "process trees come from psutil (portable), not /proc"


def test_a_redis_image_cache_adds_its_budget_to_the_ceiling(tmp_path):
    stack = LocalStack(home=tmp_path, stack=StackConfig(redis_maxmemory_mb=100),
                       gateway=GatewayConfig(cache_backend="redis", cache_max_bytes=2**30))
    assert stack.redis_maxmemory() == 100 * 2**20 + 2**30


def test_a_worker_that_dies_at_start_is_named_with_its_last_log_line(tmp_path):
    """`sdgate up` says which worker died and why, instead of waiting out start_timeout_s for an image."""
    from cluster.local import StackError

    stack = stack_in(tmp_path)
    stack.paths.make()
    alive = stack._spawn("worker-tiny-0", [sys.executable, "-c", "import time; time.sleep(120)"])
    stack.workers["worker-tiny-0"] = alive
    dying = stack._spawn("worker-tiny-1", [sys.executable, "-c",
                                           "print('loading'); print('CRITICAL Unrecoverable error: boom'); exit(3)"])
    stack.workers["worker-tiny-1"] = dying
    try:
        dying.wait(30)
        with pytest.raises(StackError, match=r"worker-tiny-1 exited with code 3 at start: CRITICAL Unrecoverable "
                                             r"error: boom\nits whole log: .*worker-tiny-1\.log"):
            stack._workers_alive_and_probe()  # raises before it probes the (absent) gateway
    finally:
        stack.down(log=lambda *_: None)
