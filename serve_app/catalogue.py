"""The gateway's view of the model catalogue: fill each request from it, check it against the
model's limits, know whether a worker serves the model, and list the models OpenAI-style.

Requests are resolved here before they are normalised and keyed, so the cache key never depends
on what a client left out. Live worker counts come from the workers' heartbeats in Redis
(celery_bridge/presence.py), cached for a second.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import redis

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from celery_bridge.models import Catalogue, ModelEntry, load_catalogue
from celery_bridge.presence import batching_modes, live_workers
from serve_app import stats

LIVE_CACHE_S = 1.0


class GatewayCatalogue:
    """Resolves requests against the catalogue and reports which models are served now."""

    def __init__(self, catalogue: Catalogue, client: redis.Redis, counters: Optional[stats.Counters] = None,
                 live_cache_s: float = LIVE_CACHE_S):
        self.catalogue = catalogue
        self.counters = counters
        self._client = client
        self._live_cache_s = live_cache_s
        self._live: Dict[str, Tuple[float, int]] = {}  # model -> (monotonic time read, count)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, client: redis.Redis, counters: Optional[stats.Counters] = None) -> "GatewayCatalogue":
        """From configs/models.yaml or $SDGATE_MODELS_FILE."""
        return cls(load_catalogue(), client, counters)

    def entry(self, model: Optional[str]) -> ModelEntry:
        """The catalogue entry `model` names (None: the default); `invalid_request` listing the models."""
        entry = self.catalogue.get(model)
        if entry is None:
            raise ProtocolError(protocol.E_INVALID_REQUEST,
                                f"model {model!r} is not offered here; the models are "
                                f"{', '.join(self.catalogue.names)} (GET /v1/models lists them; leave `model` "
                                f"out for the default, {self.catalogue.default!r})", field="model")
        return entry

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its model and that model's defaults filled in, within the model's limits.
        No side effects: the front counts the request once it accepts it (count_request)."""
        # 1. Which model: the one named, or the default.
        entry = self.entry(request.model)
        # 2. Fill what the client left out from that model's defaults.
        resolved = entry.fill(request)
        # 3. The model's own limits, tighter than the protocol's.
        for name in ("width", "height"):
            value = getattr(resolved, name)
            if isinstance(value, int) and value > entry.limits.max_side:
                raise ProtocolError(protocol.E_INVALID_REQUEST, f"{name} {value} is over {entry.name!r}'s limit of "
                                    f"{entry.limits.max_side}; ask for at most {entry.limits.max_side}", field=name)
        if isinstance(resolved.steps, int) and resolved.steps > entry.limits.max_steps:
            raise ProtocolError(protocol.E_INVALID_REQUEST, f"steps {resolved.steps} is over {entry.name!r}'s limit "
                                f"of {entry.limits.max_steps}; ask for at most {entry.limits.max_steps}", field="steps")
        # 4. What its family can do (its schedulers, a negative prompt only where one means something), its LoRAs.
        try:
            entry.rules.check(resolved)
            entry.check_loras(resolved)
        except InvalidRequest as exc:
            raise ProtocolError(protocol.E_INVALID_REQUEST, f"model {entry.name!r}: {exc}", field=exc.field) from None
        return resolved

    def count_request(self, model: str) -> None:
        """One request accepted for `model` (the per-model `requests` counter)."""
        if self.counters is not None:
            self.counters.incr(stats.model_counter(model, stats.MODEL_REQUESTS))

    def check_served(self, model: str) -> None:
        """Raise `unavailable` when no live worker serves `model` and none will be added for it."""
        entry = self.entry(model)
        if entry.scale_from_zero or self.live_count(model) > 0:
            return
        if self.counters is not None:
            self.counters.incr(stats.model_counter(model, stats.MODEL_UNAVAILABLE))
        raise ProtocolError(protocol.E_UNAVAILABLE,
                            f"no worker serves {model!r} right now, and none is added on demand; start one with "
                            f"`sdgate worker --model {model}`, or ask for another model "
                            f"({', '.join(n for n in self.catalogue.names if n != model) or 'none other'})",
                            field="model")

    def live_count(self, model: str) -> int:
        """Workers heartbeating for `model`, at most LIVE_CACHE_S old; 0 when Redis cannot say."""
        now = time.monotonic()
        with self._lock:
            cached = self._live.get(model)
        if cached is not None and now - cached[0] < self._live_cache_s:
            return cached[1]
        try:
            count = len(live_workers(self._client, model))
        except redis.RedisError as exc:
            raise ProtocolError(protocol.E_UNAVAILABLE, f"the task queue (Redis) is unreachable: {exc}; "
                                "retry in a few seconds") from None
        with self._lock:
            self._live[model] = (now, count)
        return count

    def listing(self) -> Dict[str, Any]:
        """OpenAI's model list, each entry with sdgate's defaults, limits and live worker count."""
        data = []
        for entry in self.catalogue.models:
            try:
                live: Optional[int] = len(live_workers(self._client, entry.name))
                batching: Optional[List[str]] = batching_modes(self._client, entry.name)
            except redis.RedisError:
                live, batching = None, None  # unknown, not zero
            data.append({
                "id": entry.name, "object": "model", "created": 0, "owned_by": "sdgate",
                "default": entry.name == self.catalogue.default,
                "source_kind": entry.kind,
                "family": entry.rules.name,
                "schedulers": list(entry.rules.schedulers),
                "variant": entry.rules.variant,  # FLUX.1: dev or schnell
                "negative_prompt": entry.rules.negative_prompt,
                "guidance": entry.rules.guidance_applies,  # False: guidance_scale is taken as 0
                "loras": [lora.name for lora in entry.loras],
                "defaults": entry.defaults.model_dump(),
                "limits": entry.limits.model_dump(),
                "live_workers": live,
                "batching": batching,  # the modes its live workers run: solo, window, continuous
                "scale_from_zero": entry.scale_from_zero,
            })
        return {"object": "list", "data": data}
