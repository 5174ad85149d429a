"""Typed configuration: one YAML file per concern in configs/, each field overridable by env.

Every field `name` of a config dataclass can be overridden by the environment variable
`SDGATE_<NAME>` (upper case), e.g. SDGATE_REDIS_URL. Field names are unique across sections so
that one variable means one thing everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Type, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml

T = TypeVar("T")
REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_dir() -> Path:
    """configs/ of this checkout, or $SDGATE_CONFIG_DIR."""
    return Path(os.environ.get("SDGATE_CONFIG_DIR", REPO_CONFIG_DIR))


def sdgate_home() -> Path:
    """The one data directory for cache, logs, PIDs and the embedded model: $SDGATE_HOME."""
    return Path(os.environ.get("SDGATE_HOME", Path.home() / ".sdgate")).expanduser()


def load_config(cls: Type[T], section: str, overrides: Optional[Dict[str, Any]] = None) -> T:
    """Defaults of `cls` <- configs/<section>.yaml <- SDGATE_* environment <- `overrides`."""
    values: Dict[str, Any] = {}
    path = config_dir() / f"{section}.yaml"
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(names)}")
    for name in names:
        env = os.environ.get(f"SDGATE_{name.upper()}")
        if env is not None:
            values[name] = _coerce(env, hints[name], f"SDGATE_{name.upper()}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cls(**values)


def _coerce(raw: str, hint: Any, source: str) -> Any:
    target = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
    if raw == "" and type(None) in typing.get_args(hint):
        return None
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target in (int, float):
            return target(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not a valid {target.__name__}") from None
    return raw


@dataclass
class CeleryConfig:
    """The broker, the queue and the delivery guarantees shared by producers and workers."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: Optional[str] = None  # kept out of URLs in config files; SDGATE_REDIS_PASSWORD
    queue: str = "sdgate"
    result_expires_s: int = 3600
    soft_time_limit_s: int = 300
    time_limit_s: int = 330
    # An unacknowledged task whose worker died is redelivered after this long. A live worker
    # renews the lease of its task, so long generations are never handed out twice.
    visibility_timeout_s: int = 10
    lease_renew_s: float = 2.0

    def broker_url(self) -> str:
        """redis_url with the password (if configured separately) filled in."""
        if not self.redis_password:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        netloc = f":{self.redis_password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class WorkerConfig:
    """What a worker loads and how it fits the pipeline onto its device."""

    model: str = "tiny"
    device: str = "auto"  # auto | cuda | cpu
    fp16: bool = True  # only on cuda
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    model_cache_dir: Optional[str] = None  # default: $SDGATE_HOME/models
    num_gpus: float = 0  # per Ray task-consumer replica; 1 on GPU nodes
    cpu_threads: int = 0  # torch threads when rendering on CPU; 0: torch's default (every core)

    def resolved_model_cache_dir(self) -> Path:
        return Path(self.model_cache_dir).expanduser() if self.model_cache_dir else sdgate_home() / "models"


def load_celery_config(**overrides: Any) -> CeleryConfig:
    return load_config(CeleryConfig, "celery", overrides)


def load_worker_config(**overrides: Any) -> WorkerConfig:
    return load_config(WorkerConfig, "worker", overrides)
