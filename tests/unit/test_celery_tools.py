"""Celery's own tools load sdgate's app (`celery -A celery_bridge`), task events are on, and
results leave Redis soon (the gateway caches them). The live `inspect ping`:
tests/integration/test_redis_ops.py."""

from __future__ import annotations

import subprocess
import sys

from celery_bridge.app import celery_settings
from celery_bridge.config import CeleryConfig, load_celery_config


def test_celery_finds_the_module_level_app_without_loading_celery_on_import():
    code = ("import sys, celery_bridge; assert 'celery' not in sys.modules, 'import loaded celery'; "
            "from celery.app.utils import find_app; app = find_app('celery_bridge'); "
            "print(type(app).__name__, app.conf.broker_url, app.conf.worker_send_task_events, "
            "app.conf.task_send_sent_event, app.conf.result_expires)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"SDGATE_REDIS_URL": "redis://broker:6390/1", "SDGATE_REDIS_PASSWORD": "a/b",
                              "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Celery", "redis://:a%2Fb@broker:6390/1", "True", "True", "120"]


def test_task_events_can_be_turned_off():
    settings = celery_settings(CeleryConfig(task_events=False))
    assert settings["worker_send_task_events"] is False and settings["task_send_sent_event"] is False


def test_results_expire_within_minutes():
    """Results are read by the gateway within ms and cached there; an hour in Redis only filled it."""
    assert load_celery_config().result_expires_s <= 300
    assert celery_settings(load_celery_config())["result_expires"] == load_celery_config().result_expires_s


def test_ci_prepares_a_bare_debian():
    """A fresh machine has no venv module, and apt's redis-server would sit on 6379 under systemd."""
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    install = next(line for line in script.splitlines() if "apt-get install" in line)
    assert {"python3-venv", "redis-server", "make", "ca-certificates"} <= set(install.split())
    assert "systemctl disable --now redis-server" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
