"""The task contract between the gateway and the workers: name, payload and result.

Everything here is JSON-ready; no pickle crosses the broker.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from client.protocol import E_INTERNAL, E_INVALID_REQUEST, GenerationRequest, InvalidRequest

TASK_NAME = "sdgate.generate"
_NOT_META = ("ok", "png_b64", "pipeline_loads", "batch_size")


def task_payload(request: GenerationRequest) -> Dict[str, Any]:
    """The single positional argument of TASK_NAME: the normalized request as a dict."""
    return request.normalized().to_dict()


def request_from_payload(payload: Any) -> GenerationRequest:
    """Worker side: rebuild and re-validate the request; raises InvalidRequest."""
    return GenerationRequest.from_dict(payload).normalized()


@dataclass
class GenerationResult:
    """What a worker returns: the PNG and how it was made, or an error with a stable code."""

    ok: bool
    key: str = ""
    seed: int = 0
    model: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    pipeline_ms: float = 0.0
    worker: str = ""
    png_b64: str = ""
    error_code: str = ""
    error_message: str = ""
    error_field: Optional[str] = None
    pipeline_loads: int = 0  # how many times the answering worker process loaded its pipeline
    batch_size: int = 1  # how many requests the pipeline call that rendered this image held

    @property
    def png(self) -> bytes:
        return base64.b64decode(self.png_b64)

    def meta(self) -> Dict[str, Any]:
        """Everything but the image bytes, for IMAGE frames and the cache."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_META and not k.startswith("error")}

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "GenerationResult":
        if not isinstance(data, dict):
            return cls.failure(E_INTERNAL, f"worker returned {type(data).__name__}, not a result object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def success(cls, request: GenerationRequest, png: bytes, pipeline_ms: float, worker: str) -> "GenerationResult":
        return cls(
            ok=True, key=request.cache_key(), seed=request.seed or 0, model=request.model,
            width=request.width or 0, height=request.height or 0, steps=request.steps or 0,
            pipeline_ms=round(pipeline_ms, 3), worker=worker, png_b64=base64.b64encode(png).decode("ascii"),
        )

    @classmethod
    def failure(cls, code: str, message: str, field: Optional[str] = None) -> "GenerationResult":
        return cls(ok=False, error_code=code, error_message=message, error_field=field)

    @classmethod
    def invalid(cls, exc: InvalidRequest) -> "GenerationResult":
        return cls.failure(E_INVALID_REQUEST, str(exc), exc.field)
