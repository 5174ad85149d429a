"""A clean install prints no packaging warnings, and the wheel carries the web page."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _project_copy(folder: Path) -> Path:
    """What a build reads, copied (a build writes build/ and *.egg-info beside pyproject.toml)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, folder / name)
    for package in ("client", "serve_app", "celery_bridge", "cluster", "bench"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_the_build_hooks_pip_calls_warn_of_nothing(hook, tmp_path):
    """`make setup` is `pip install -e .`: it once printed screens of warnings about serve_app.web."""
    (tmp_path / "project").mkdir()
    project, out = _project_copy(tmp_path / "project"), tmp_path / "out"
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    built = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    output = built.stdout + built.stderr
    # setuptools' warnings are classes (BuildBackendWarning, SetuptoolsDeprecationWarning...) in "!!" banners.
    assert not re.search(r"[A-Za-z]+Warning\b|^\s*!!", output, re.M), output[-3000:]
    wheel = out / built.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    if hook == "build_wheel":
        assert {"serve_app/web/index.html", "serve_app/web/app.js", "serve_app/web/app.css"} <= set(names)


def test_redis_replies_are_parsed_by_hiredis():
    """Every Redis reply of a miss (the gateway's claims and scripts, kombu's and Celery's, the
    worker's) is parsed by redis-py; the install brings its C parser, hiredis."""
    import redis.connection
    import redis.utils

    assert redis.utils.HIREDIS_AVAILABLE, "hiredis is missing: `pip install -e .` installs redis[hiredis]"
    assert redis.connection.DefaultParser is redis.connection._HiredisParser
