"""LoRA switch cost: switching the resident pipeline's adapters between requests (set_adapters /
disable_lora, never a reload of the base) against one render at the same size, in one run. Prints
one JSON object.

    python -m bench lora [--size 64] [--steps 8] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.models import ModelEntry
from celery_bridge.pipeline import PipelineRunner
from celery_bridge.tiny_model import save_tiny_lora


def measure_switch(runner: PipelineRunner, size: int, steps: int, rounds: int,
                   sync: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Milliseconds of a switch between two LoRA sets (and to none), and of a render, interleaved."""
    names = [lora.name for lora in runner.entry.loras][:2]
    sets = [((names[0], 1.0),), ((names[1], 0.7),), None] if len(names) > 1 else [((names[0], 1.0),), None]
    switch_ms, render_ms = [], []
    request = runner.resolve(GenerationRequest("lora bench", width=size, height=size, steps=steps, seed=1))
    loads = type(runner).loads
    for i in range(rounds):
        with runner._lock:
            started = time.perf_counter()
            runner.apply_loras(sets[i % len(sets)])
            sync()
            switch_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        runner.bare_call(request)  # at whatever set the switch left
        sync()
        render_ms.append((time.perf_counter() - started) * 1000)
    switch, render = statistics.median(switch_ms), statistics.median(render_ms)
    return {"switch_ms_p50": round(switch, 2), "switch_ms_max": round(max(switch_ms), 2),
            "render_ms_p50": round(render, 1), "switch_vs_render": round(switch / render, 4),
            "base_reloads": type(runner).loads - loads, "lora_loads": runner.lora_loads}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    base = PipelineRunner(WorkerConfig())
    with tempfile.TemporaryDirectory() as scratch:
        files = [save_tiny_lora(base.pipe, Path(scratch) / name, seed=seed) for name, seed in (("a", 1), ("b", 2))]
        entry = ModelEntry(name="tiny", source="tiny", loras=[{"name": "a", "source": str(files[0])},
                                                            {"name": "b", "source": str(files[1])}],
                           defaults=base.entry.defaults.model_dump())
        runner = PipelineRunner(WorkerConfig(), entry=entry)
        figures = measure_switch(runner, args.size, args.steps, args.rounds)
    return {"size": args.size, "steps": args.steps, "rounds": args.rounds, **figures}
