"""img2img and inpainting against text to image: per-image time of a worker task (decode, render,
PNG) for each kind at one size and step count, and each kind's bare diffusers call on the same
resident pipeline, interleaved in one run. Prints one JSON object.

    python -m bench img2img [--images 12] [--size 64] [--steps 8] [--strength 1.0]

At strength 1.0 img2img runs as many denoising steps as text to image (strength s runs s x steps),
so the ratios show what the kind itself costs: the init image's VAE encode, and for inpainting the
mask's preparation.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Dict, List

import torch
from PIL import Image

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.pipeline import image_inputs
from celery_bridge.worker import GenerationService

KINDS = ("txt2img", "img2img", "inpaint")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strength", type=float, default=1.0)
    args = parser.parse_args(argv)

    service = GenerationService(WorkerConfig())
    runner = service.runner
    init = _png(Image.effect_noise((args.size, args.size), 60).convert("RGB"))
    mask_image = Image.new("L", (args.size, args.size), 0)
    mask_image.paste(255, (args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4))
    mask = _png(mask_image)

    def request(kind: str, i: int) -> GenerationRequest:
        images = {"txt2img": {}, "img2img": {"init_image": init, "strength": args.strength},
                  "inpaint": {"init_image": init, "mask": mask, "strength": args.strength}}[kind]
        return runner.resolve(GenerationRequest(f"bench {kind} {i}", width=args.size, height=args.size,
                                                steps=args.steps, **images))

    def bare(request: GenerationRequest) -> None:
        """The diffusers call alone on the same pipeline: no decode of the payload, no PNG."""
        inputs = image_inputs([request])
        if request.kind != "img2img":
            inputs.update(width=request.width, height=request.height)
        if request.init_image is not None:
            inputs["strength"] = request.strength
        runner.pipeline_for(request.kind)(prompt=request.prompt, num_inference_steps=request.steps,
                                          guidance_scale=request.guidance_scale, output_type="pil",
                                          generator=torch.Generator(device="cpu").manual_seed(request.seed), **inputs)

    for kind in KINDS:  # warm-up: derives the pipelines, allocates
        service.handle(request(kind, -1).to_dict())
    worker: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    diffusers: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    for i in range(args.images):  # interleaved, so drift hits every kind alike
        for kind in KINDS:
            one = request(kind, i)
            started = time.perf_counter()
            result = service.handle(one.to_dict())
            worker[kind].append((time.perf_counter() - started) * 1000)
            assert result["ok"], result
            started = time.perf_counter()
            bare(one)
            diffusers[kind].append((time.perf_counter() - started) * 1000)
    p50 = {kind: statistics.median(worker[kind]) for kind in KINDS}
    bare_p50 = {kind: statistics.median(diffusers[kind]) for kind in KINDS}
    return {
        "images": args.images, "size": args.size, "steps": args.steps, "strength": args.strength,
        "worker_ms_p50": {kind: round(value, 1) for kind, value in p50.items()},
        "bare_diffusers_ms_p50": {kind: round(value, 1) for kind, value in bare_p50.items()},
        "img2img_vs_txt2img": round(p50["img2img"] / p50["txt2img"], 3),
        "inpaint_vs_txt2img": round(p50["inpaint"] / p50["txt2img"], 3),
        "worker_vs_bare": {kind: round(p50[kind] / bare_p50[kind], 3) for kind in KINDS},
    }
