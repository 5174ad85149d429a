"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """An empty config dir (and no secrets file or SDGATE_* variables) for one test."""
    monkeypatch.setenv("SDGATE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("SDGATE_SECRETS_FILE", raising=False)
    for name in list(os.environ):
        if name.startswith("SDGATE_") and name not in ("SDGATE_CONFIG_DIR", "SDGATE_HOME"):
            monkeypatch.delenv(name)
    return tmp_path
