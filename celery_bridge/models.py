"""The model catalogue (configs/models.yaml): which models the service offers, where each one's
weights are, its request defaults and limits, and the Celery queue that carries its work.

Read by the gateway (to fill and check requests) and by workers (to find the weights of the one
model they serve). Pydantic, like Ray Serve's own schema: a typo or a wrong type is an error that
names the entry, never a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from client import protocol
from celery_bridge import redis_keys
from celery_bridge.config import MODELS_FILE_ENV, config_dir

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
EMBEDDED = "tiny"
# `demo`: the demo model trained here (celery_bridge/demo_model.py), committed as a diffusers folder.
DEMO = "demo"
DEMO_FOLDER = Path(__file__).resolve().parents[1] / "models" / "demo-sd-v1"
# `sleep:<ms>`: the bench/test stand-in (celery_bridge/sleep_model.py), only where a catalogue names it.
SLEEP_SOURCE = "sleep:"


class CatalogueError(ValueError):
    """configs/models.yaml (or $SDGATE_MODELS_FILE) is missing or wrong; the message says where."""


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelDefaults(_Strict):
    """What a request that leaves a field out gets for this model."""

    width: int = 512
    height: int = 512
    steps: int = 25
    scheduler: str = "default"
    guidance_scale: float = Field(default=7.5, strict=False)  # `7` in YAML is a fine float

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in protocol.SCHEDULERS:
            raise ValueError(f"{value!r} is not one of {', '.join(protocol.SCHEDULERS)}")
        return value


class ModelLimits(_Strict):
    """The largest request this model accepts (tighter than the protocol's own bounds)."""

    max_side: int = Field(default=1024, ge=protocol.MIN_SIDE, le=protocol.MAX_SIDE)
    max_steps: int = Field(default=50, ge=protocol.MIN_STEPS, le=protocol.MAX_STEPS)


class LoraEntry(_Strict):
    """A LoRA a model's requests may name: a .safetensors file of adapter weights (diffusers' or
    kohya's layout, as `load_lora_weights` reads them), for that model's family."""

    name: str
    source: str
    family: Optional[Literal["sd1", "sd2", "sdxl", "sd3", "flux"]] = None  # None: the model's

    @field_validator("name")
    @classmethod
    def _wire_name(cls, value: str) -> str:
        protocol.check_loras(((value, 1.0),))
        return value


class ModelEntry(_Strict):
    """One model: its name on the wire, its weights, defaults and limits."""

    name: str
    # `demo` (trained here, committed: models/demo-sd-v1), `tiny` (embedded, built offline), a local diffusers folder, a single .safetensors/.ckpt file,
    # or a hub id (only where the machine may reach the hub).
    source: str
    # For single-file checkpoints: a local folder with the pipeline's configs (model_index.json and
    # each component's config; no weights needed), so nothing is downloaded.
    config: Optional[str] = None
    defaults: ModelDefaults = ModelDefaults()
    limits: ModelLimits = ModelLimits()
    workers: Optional[int] = Field(default=None, ge=0)  # `sdgate up` workers; None: local.yaml's `workers`
    # A Ray workers application adds a worker for this model when its queue fills (min_replicas 0):
    # with no live worker, requests queue instead of failing fast with `unavailable`.
    scale_from_zero: bool = False
    # Requests of one shape a GPU worker renders in one pipeline call (WorkerConfig.max_batch_size overrides).
    max_batch_size: int = Field(default=1, ge=1, le=64)
    # How a GPU worker batches (celery_bridge/continuous.py): `continuous` steps every active request
    # in one loop, joining at the next step (Stable Diffusion 1.x/2.x, SDXL); `window` groups requests of one
    # shape per call; `auto` is continuous where the model's family supports it (SD 1.x/2.x, SDXL), else window.
    batching: Literal["auto", "window", "continuous"] = "auto"
    # Continuous batching: requests in the loop at once (memory on a GPU); None: max_batch_size.
    max_active: Optional[int] = Field(default=None, ge=1, le=64)
    # sd1 | sd2 | sdxl | sd3 | flux (celery_bridge/families.py); None: detected from the weights'
    # model_index.json (a hub id, whose files are not here, is taken as sd1 unless this says otherwise).
    family: Optional[Literal["sd1", "sd2", "sdxl", "sd3", "flux"]] = None
    # LoRAs requests may name (`loras: [{name, weight}]`); each worker of the model loads them once.
    loras: List[LoraEntry] = []

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """An entry without `defaults` gets its family's (size, steps, guidance), not SD 1.5's."""
        if isinstance(data, dict) and "defaults" not in data and isinstance(data.get("source"), str):
            family = _rules(data["source"], data.get("config"), data.get("family"))
            data = dict(data, defaults={"width": family.side, "height": family.side, "steps": family.steps,
                                        "guidance_scale": family.guidance, "scheduler": "default"})
        return data

    @field_validator("name")
    @classmethod
    def _wire_name(cls, value: str) -> str:
        protocol.check_model_name(value)
        return value

    @field_validator("source")
    @classmethod
    def _sleep_ms(cls, value: str) -> str:
        if value.startswith(SLEEP_SOURCE):
            ms = value[len(SLEEP_SOURCE):]
            try:
                ok = float(ms) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"source {value!r}: the bench/test stand-in is `sleep:<milliseconds>`, "
                                 "e.g. sleep:250")
        return value

    def batch_slots(self, continuous: bool) -> int:
        """Tasks a GPU worker of this model holds at once: max_active in a continuous loop, else max_batch_size."""
        return (self.max_active or self.max_batch_size) if continuous else self.max_batch_size

    @property
    def sleep_ms(self) -> Optional[float]:
        """A `sleep:<ms>` source's render time; None for every real model."""
        return float(self.source[len(SLEEP_SOURCE):]) if self.source.startswith(SLEEP_SOURCE) else None

    @property
    def rules(self):
        """Its family (celery_bridge.families.Family): schedulers, negative prompt, latents, batching."""
        return _rules(self.source, self.config, self.family)

    def check_loras(self, request: protocol.GenerationRequest) -> None:
        """InvalidRequest naming a LoRA the request asks for that this model does not list."""
        offered = {lora.name for lora in self.loras}
        for name, _ in request.loras or ():
            if name not in offered:
                raise protocol.InvalidRequest("loras", f"LoRA {name!r} is not offered for model {self.name!r}; it "
                                              f"offers {', '.join(sorted(offered)) or 'none'} (GET /v1/models)")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "ModelEntry":
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA names must be unique per model, got {names}")
        for lora in self.loras:
            if lora.family is not None and lora.family != self.rules.name:
                raise ValueError(f"LoRA {lora.name!r} is for {lora.family} models; {self.name!r} is {self.rules.name}")
        if self.defaults.scheduler not in self.rules.schedulers:
            raise ValueError(f"default scheduler {self.defaults.scheduler!r} does not apply to {self.rules.name} "
                             f"models; use one of {', '.join(self.rules.schedulers)}")
        d, lim = self.defaults, self.limits
        if max(d.width, d.height) > lim.max_side or d.steps > lim.max_steps:
            raise ValueError(f"defaults {d.width}x{d.height}, {d.steps} steps exceed the limits "
                             f"(max_side {lim.max_side}, max_steps {lim.max_steps})")
        if d.width % 8 or d.height % 8:
            raise ValueError(f"default size {d.width}x{d.height} must be multiples of 8")
        return self

    def fill(self, request: protocol.GenerationRequest) -> protocol.GenerationRequest:
        """`request` naming this model, with this model's defaults in every field it left out."""
        d = self.defaults
        filled = request.with_defaults(self.name, d.width, d.height, d.steps, d.guidance_scale, d.scheduler)
        return filled if self.rules.guidance_applies else dataclasses.replace(filled, guidance_scale=0.0)

    @property
    def weights(self) -> str:
        """Where the weights are: the source, with `demo` and `~` resolved to folders."""
        return str(DEMO_FOLDER) if self.source == DEMO else str(Path(self.source).expanduser())

    @property
    def kind(self) -> str:
        """embedded | sleep | folder | single_file | hub (`demo` is a folder)."""
        if self.source == EMBEDDED:
            return "embedded"
        if self.source == DEMO:
            return "folder"
        if self.sleep_ms is not None:
            return "sleep"
        if self.source.lower().endswith(SINGLE_FILE_SUFFIXES):
            return "single_file"
        path = Path(self.source).expanduser()
        if path.is_dir() or self.source.startswith(("/", ".", "~")):
            return "folder"
        return "hub"


@functools.lru_cache(maxsize=256)
def _rules(source: str, config: Optional[str], family: Optional[str]):
    """The rules (celery_bridge.families.Family) of a source's weights, read from its folder (a
    single file's: its config folder): `family` when the catalogue names one, else detected; sd1
    for the embedded model, the sleep stand-in, a hub id and anything without a readable
    model_index.json."""
    from celery_bridge.families import family_of_folder, rules_for

    if source == EMBEDDED or source.startswith(SLEEP_SOURCE):
        return rules_for(family or "sd1", None)
    folder = config if source.lower().endswith(SINGLE_FILE_SUFFIXES) and config else source
    path = DEMO_FOLDER if folder == DEMO else Path(folder)
    return rules_for(family or family_of_folder(path) or "sd1", path)


class Catalogue(_Strict):
    """Every model offered, and the one a request gets when it names none."""

    default: str
    models: List[ModelEntry]

    @model_validator(mode="after")
    def _consistent(self) -> "Catalogue":
        names = [entry.name for entry in self.models]
        if not names:
            raise ValueError("lists no models; add at least one entry under `models`")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.default not in names:
            raise ValueError(f"default {self.default!r} is not one of the models {names}")
        return self

    @property
    def names(self) -> List[str]:
        return [entry.name for entry in self.models]

    def get(self, name: Optional[str]) -> Optional[ModelEntry]:
        """The entry for `name` (None: the default model), or None if it is not catalogued."""
        name = self.default if name is None else name
        return next((entry for entry in self.models if entry.name == name), None)

    def fill(self, request: protocol.GenerationRequest) -> protocol.GenerationRequest:
        """`request` filled from its model's entry (the default model if it names none); KeyError
        for a model not catalogued. The gateway adds the limits check (serve_app/catalogue.py)."""
        entry = self.get(request.model)
        if entry is None:
            raise KeyError(f"model {request.model!r} is not one of {self.names}")
        return entry.fill(request)


def models_file() -> Path:
    """$SDGATE_MODELS_FILE, else models.yaml in the config folder."""
    return Path(os.environ.get(MODELS_FILE_ENV) or config_dir() / "models.yaml").expanduser()


def load_catalogue(path: Optional[Path] = None) -> Catalogue:
    """The catalogue from `path` (default: models_file()); raises CatalogueError saying what is wrong."""
    path = Path(path) if path is not None else models_file()
    try:
        data: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CatalogueError(f"cannot read the model catalogue {path}: {exc.strerror or exc}; create it (see "
                             f"configs/models.yaml) or point {MODELS_FILE_ENV} at one") from None
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path} is not valid YAML: {exc}") from None
    return catalogue_from_dict(data, str(path))


def catalogue_from_dict(data: Any, where: str = "the model catalogue") -> Catalogue:
    try:
        return Catalogue.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in exc.errors())
        raise CatalogueError(f"{where} is invalid: {problems}") from None


def with_default_model(catalogue: Catalogue, model: str, where: str = "SDGATE_MODEL") -> Catalogue:
    """`catalogue` whose default is `model`: a catalogued name, or a local diffusers folder (added as
    an entry named after the folder). CatalogueError saying what to do for anything else."""
    if model in catalogue.names:
        return catalogue.model_copy(update={"default": model})
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        name = re.sub(r"[^A-Za-z0-9._-]", "-", path.resolve().name)[:protocol.MAX_MODEL_CHARS] or "local"
        if name in catalogue.names:
            raise CatalogueError(f"{where}={model}: the catalogue already has a model named {name!r}; add this folder "
                                 f"to {models_file()} under another name and set `default:` to it")
        entry = ModelEntry(name=name, source=str(path.resolve()))
        return Catalogue(default=name, models=[*catalogue.models, entry])
    if model.lower().endswith(SINGLE_FILE_SUFFIXES) and path.is_file():
        raise CatalogueError(f"{where}={model} is a single-file checkpoint: it needs its pipeline's configs, so add it "
                             f"to {models_file()} as `- {{name: NAME, source: {path}, config: /a/diffusers/folder}}` "
                             "and set `default: NAME`")
    raise CatalogueError(f"{where}={model!r} is neither a catalogued model ({', '.join(catalogue.names)}) nor a local "
                         f"diffusers folder with model_index.json; name one of those, or add it to {models_file()}")


def queue_for(base_queue: str, model: str) -> str:
    """The Celery queue of `model`'s work: one per model, so a worker takes only what it can render."""
    return f"{base_queue}.{model}"


def model_counter(model: str, counter: str) -> str:
    """The counter-hash field of `counter` for `model`: per-model counters sit in the cluster-wide
    counter hash (serve_app/stats.py reads it) as `models:<model>:<counter>`; names have no ':'."""
    return f"{redis_keys.MODEL_COUNTER}{model}:{counter}"
