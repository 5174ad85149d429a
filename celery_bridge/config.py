"""Typed configuration: one YAML file per concern in configs/, each field overridable by env.

Every field `name` of a config dataclass can be overridden by the environment variable
`SDGATE_<NAME>` (upper case), e.g. SDGATE_REDIS_URL. Field names are unique across sections so
that one variable means one thing everywhere. Values are validated with pydantic at load: YAML
values and overrides must have the field's type exactly (`fp16: "no"` is an error, not True),
environment strings are parsed into it (a list is comma-separated: SDGATE_TRUSTED_PROXIES=10.0.0.0/8,fd00::/8),
and an unknown key is an error naming the file.

Secrets (the Redis password, the gateway token) may also come from a secrets file,
$SDGATE_SECRETS_FILE or configs/secrets.env (KEY=VALUE lines, as configs/secrets.env.example),
so they never have to appear in a Serve config, a command line or a YAML file in git.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import typing
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Tuple, Type, TypeVar
from urllib.parse import quote, urlsplit

import pydantic
import yaml
from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass

T = TypeVar("T")
log = logging.getLogger(__name__)
REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Strict: a YAML string is never silently a bool or a number. Forbid: a typo'd key is an error.
config_dataclass = dataclass(config=ConfigDict(extra="forbid", strict=True))
Port = Annotated[int, Field(ge=0, le=65535)]
# field -> variables that may carry it in the secrets file or the environment (first wins).
SECRET_VARIABLES = {"redis_password": ("SDGATE_REDIS_PASSWORD",), "redis_username": ("SDGATE_REDIS_USERNAME",),
                    "auth_token": ("SDGATE_TOKEN",)}


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type; the message names where it came from."""


def config_dir() -> Path:
    """configs/ of this checkout, or $SDGATE_CONFIG_DIR."""
    return Path(os.environ.get("SDGATE_CONFIG_DIR", REPO_CONFIG_DIR))


def sdgate_home() -> Path:
    """The one data directory for cache, logs, PIDs and the embedded model: $SDGATE_HOME."""
    return Path(os.environ.get("SDGATE_HOME", Path.home() / ".sdgate")).expanduser()


def secrets_file() -> Path:
    """$SDGATE_SECRETS_FILE, else configs/secrets.env (absent is fine: no secrets)."""
    return Path(os.environ.get("SDGATE_SECRETS_FILE") or config_dir() / "secrets.env").expanduser()


def read_env_file(path: Path) -> Dict[str, str]:
    """KEY=VALUE lines (comments, blank lines and `export ` ignored; one level of quotes removed)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise ConfigError(f"{path}, line {number}: expected KEY=VALUE, got {line[:40]!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def example_secrets() -> Dict[str, str]:
    """The placeholder values of configs/secrets.env.example, refused as real secrets."""
    example = REPO_CONFIG_DIR / "secrets.env.example"
    return read_env_file(example) if example.exists() else {}


def _secrets(names) -> Dict[str, Tuple[str, str]]:
    path = secrets_file()
    if not path.exists() or not any(name in SECRET_VARIABLES for name in names):
        return {}
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; `chmod 600 %s`", path, path)
    found = read_env_file(path)
    values = {}
    for name in names:
        for variable in SECRET_VARIABLES.get(name, ()):
            if found.get(variable):
                values[name] = (found[variable], f"{path} ({variable})")
                break
    return values


def load_config(cls: Type[T], section: str, overrides: Optional[Dict[str, Any]] = None) -> T:
    """Defaults of `cls` <- configs/<section>.yaml <- secrets file <- SDGATE_* environment <- `overrides`,
    validated; ConfigError names the file or variable, the key, the value and what was expected."""
    values: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    # 1. The section's YAML file.
    path = config_dir() / f"{section}.yaml"
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
        unknown = sorted(map(str, set(loaded) - set(names)))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {names}")
        values.update(loaded)
        origin.update((key, str(path)) for key in loaded)
    # 2. Secrets from the secrets file.
    for name, (value, source) in _secrets(names).items():
        values[name], origin[name] = value, source
    # 3. SDGATE_* variables: strings, parsed into the field's type.
    hints = typing.get_type_hints(cls)
    for name in names:
        for variable in SECRET_VARIABLES.get(name, (f"SDGATE_{name.upper()}",)):
            raw = os.environ.get(variable)
            if raw is not None:
                values[name] = _from_env(raw, hints[name], variable)
                origin[name] = f"environment variable {variable}"
                break
    # 4. Explicit overrides (command-line flags, Serve application args).
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], origin[key] = value, f"{section} override"
    # 5. Validate the whole, strictly.
    try:
        config = cls(**values)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, origin, section)) from None
    _refuse_example_secrets(config, origin)
    return config


MODELS_FILE_ENV = "SDGATE_MODELS_FILE"  # the model catalogue to read instead of configs/models.yaml
# SDGATE_* variables that are not config fields.
OTHER_VARIABLES = ("SDGATE_HOME", "SDGATE_CONFIG_DIR", "SDGATE_SECRETS_FILE", "SDGATE_BIND_HOST", "SDGATE_BROKER_URL",
                   MODELS_FILE_ENV)


def unknown_variables(classes, environ: Optional[Dict[str, str]] = None) -> list:
    """One line per SDGATE_* variable that no field of `classes` reads (a typo is otherwise silent)."""
    import difflib

    environ = os.environ if environ is None else environ
    known = set(OTHER_VARIABLES) | {v for variables in SECRET_VARIABLES.values() for v in variables}
    known |= {f"SDGATE_{f.name.upper()}" for cls in classes for f in dataclasses.fields(cls)}
    lines = []
    for variable in sorted(environ):
        if variable.startswith("SDGATE_") and variable not in known and not variable.startswith("SDGATE_TEST_"):
            close = difflib.get_close_matches(variable, sorted(known), n=1)
            lines.append(f"environment variable {variable} is not an sdgate setting; it is ignored"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    return lines


def _from_env(raw: str, hint: Any, variable: str) -> Any:
    if raw == "" and type(None) in typing.get_args(hint):
        return None
    value: Any = raw
    if typing.get_origin(hint) is list:  # a list is comma-separated in one variable: "a, b"
        value = [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return TypeAdapter(hint).validate_python(value)  # lax: "8" -> 8, "no" -> False
    except pydantic.ValidationError as exc:
        raise ConfigError(f"environment variable {variable}={raw!r} is not valid: "
                          f"{exc.errors()[0]['msg']}") from None


def _describe(exc: pydantic.ValidationError, origin: Dict[str, str], section: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "?"
        where = origin.get(str(error["loc"][0]) if error["loc"] else "", f"{section} defaults")
        if error["type"] == "unexpected_keyword_argument":
            problems.append(f"{where}: unknown setting {key!r}")
        else:
            problems.append(f"{where}: {key} = {error.get('input')!r} is not valid: {error['msg']}")
    return "; ".join(problems)


def _refuse_example_secrets(config: Any, origin: Dict[str, str]) -> None:
    placeholders = set(example_secrets().values())
    for name in SECRET_VARIABLES:
        value = getattr(config, name, None)
        if value and value in placeholders:
            raise ConfigError(
                f"{origin.get(name, name)}: {name} is still the example value {value!r} from "
                "configs/secrets.env.example; set a real secret in configs/secrets.env "
                "(e.g. `openssl rand -hex 24`)")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@config_dataclass
class CeleryConfig:
    """The broker, the queue and the delivery guarantees shared by producers and workers."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: Optional[str] = None  # kept out of URLs in config files; SDGATE_REDIS_PASSWORD
    queue: str = "sdgate"
    result_expires_s: int = 120  # the gateway reads a result within ms and caches it; Redis keeps it this long
    soft_time_limit_s: int = 300
    time_limit_s: int = 330
    # An unacknowledged task whose worker died is redelivered after this long. A live worker
    # renews the lease of its task, so long generations are never handed out twice.
    visibility_timeout_s: int = 10
    lease_renew_s: float = 2.0
    redis_username: Optional[str] = None  # a Redis ACL user (Redis >= 6); SDGATE_REDIS_USERNAME
    task_events: bool = True  # Celery task events, so `celery events` and Flower see every task

    def redis_kwargs(self) -> Dict[str, Any]:
        """redis-py's connection arguments: redis_url parsed by redis-py, then redis_username/password."""
        from redis.connection import parse_url

        kwargs = parse_url(self.redis_url)
        if self.redis_username:
            kwargs["username"] = self.redis_username
        if self.redis_password:
            kwargs["password"] = self.redis_password
        return kwargs

    def redis_client(self, **options: Any):
        """A redis.Redis for this broker; `options` are redis-py's (socket_timeout=...)."""
        import redis

        return redis.Redis(**self.redis_kwargs(), **options)

    def broker_url(self) -> str:
        """The URL kombu and Celery need: credentials percent-quoted (kombu unquotes them), IPv6
        hosts in brackets, the query string of redis_url kept."""
        kwargs = self.redis_kwargs()
        parts = urlsplit(self.redis_url)
        if "path" in kwargs:  # unix socket: nothing to fill in
            return self.redis_url
        user, password = kwargs.get("username"), kwargs.get("password")
        userinfo = ""
        if user or password:
            userinfo = quote(user or "", safe="") + (":" + quote(password, safe="") if password else "") + "@"
        netloc = f"{userinfo}{_bracket(kwargs.get('host', 'localhost'))}:{kwargs.get('port', 6379)}"
        return f"{parts.scheme}://{netloc}/{kwargs.get('db', 0)}" + (f"?{parts.query}" if parts.query else "")


@config_dataclass
class WorkerConfig:
    """What a worker loads and how it fits the pipeline onto its device."""

    model: Optional[str] = None  # a catalogued name, a folder or a hub id; None: the catalogue's default model
    device: Literal["auto", "cuda", "cpu"] = "auto"
    fp16: bool = True  # only on cuda
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    model_cache_dir: Optional[str] = None  # default: $SDGATE_HOME/models
    num_gpus: float = 0  # per Ray task-consumer replica; 1 on GPU nodes
    cpu_threads: int = 0  # torch threads when rendering on CPU; 0: torch's default (every core)
    # Requests of one shape rendered in one pipeline call (celery_bridge/batching.py). None: the
    # catalogue entry's `max_batch_size` on a GPU, 1 on the CPU. 1 turns batching off.
    max_batch_size: Optional[int] = None
    batch_wait_ms: int = 50  # how long the oldest waiting request waits for others of its shape
    # window | continuous | auto (celery_bridge/continuous.py); None: the catalogue entry's `batching`
    batching: Optional[Literal["auto", "window", "continuous"]] = None

    def __post_init__(self) -> None:
        if self.model is None:
            from celery_bridge.models import DEMO, CatalogueError, load_catalogue

            try:
                self.model = load_catalogue().default
            except CatalogueError:  # loading the model reports the catalogue's problem, with what to do
                self.model = DEMO

    def resolved_model_cache_dir(self) -> Path:
        return Path(self.model_cache_dir).expanduser() if self.model_cache_dir else sdgate_home() / "models"


def load_celery_config(**overrides: Any) -> CeleryConfig:
    return load_config(CeleryConfig, "celery", overrides)


def load_worker_config(**overrides: Any) -> WorkerConfig:
    return load_config(WorkerConfig, "worker", overrides)
