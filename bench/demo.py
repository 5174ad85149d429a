"""The demo model's evaluation: held-out prompts of its grammar (combinations it never saw in
training), rendered through the worker's own pipeline code (PipelineRunner, batched as a worker
batches), read back by the checker (celery_bridge/demo_world.py). The baseline, in the same run, is
the embedded random `tiny` model read by the same checker: what chance scores. Prints one JSON object
whose top-level `colour`, `background`, `position`, `shape` (and `size`) are the demo model's
accuracies at 64 px, as fractions of 1.

    python -m bench demo [--prompts 200] [--sides 64,128] [--weights models/demo-sd-v1] [--no-baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path
from typing import Dict, List

from PIL import Image

from client.protocol import GenerationRequest
from celery_bridge import demo_world
from celery_bridge.config import WorkerConfig
from celery_bridge.demo_model import GUIDANCE, STEPS
from celery_bridge.models import DEMO_FOLDER
from celery_bridge.pipeline import PipelineRunner

TARGETS = {"colour": 0.90, "background": 0.90, "position": 0.80, "shape": 0.70}
BATCH = 16


def evaluate(runner: PipelineRunner, scenes: List[demo_world.Scene], side: int, steps: int,
             guidance: float, seed: int = 0) -> Dict[str, float]:
    """The checker's accuracies for `runner`'s images of `scenes` at `side` px, and seconds per image."""
    images: List[Image.Image] = []
    started = time.perf_counter()
    for start in range(0, len(scenes), BATCH):
        requests = [GenerationRequest(scene.prompt(), width=side, height=side, steps=steps, guidance_scale=guidance,
                                      seed=seed + start + i) for i, scene in enumerate(scenes[start:start + BATCH])]
        pngs, _ = runner.render_batch(requests)
        images += [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return {**demo_world.score(scenes, images),
            "seconds_per_image": round((time.perf_counter() - started) / max(1, len(scenes)), 4)}


def weights_digest(folder: Path) -> str:
    """sha256 over the folder's safetensors files (which weights were scored)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench demo")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per size (default 200)")
    parser.add_argument("--sides", default="64,128", help="image sizes, the first is the top-level one")
    parser.add_argument("--weights", type=Path, default=DEMO_FOLDER, help="a demo model folder (default: the committed one)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random `tiny` baseline")
    args = parser.parse_args(argv)

    sides = [int(side) for side in args.sides.split(",")]
    scenes = demo_world.evaluation_scenes(args.prompts)
    runner = PipelineRunner(WorkerConfig(device="cpu", model=str(args.weights.resolve())))
    by_side = {str(side): evaluate(runner, scenes, side, STEPS, GUIDANCE) for side in sides}
    figures = {**by_side[str(sides[0])], "side": sides[0], "by_side": by_side, "targets": TARGETS,
               "meets_targets": all(by_side[str(sides[0])][name] >= goal for name, goal in TARGETS.items()),
               "prompts": len(scenes), "steps": STEPS, "guidance_scale": GUIDANCE,
               "weights": str(args.weights), "weights_sha256": weights_digest(args.weights),
               "example": {"prompt": scenes[0].prompt()}}
    if not args.no_baseline:
        tiny = PipelineRunner(WorkerConfig(device="cpu", model="tiny"))
        figures["baseline_tiny"] = evaluate(tiny, scenes, sides[0], STEPS, GUIDANCE)
    return figures
