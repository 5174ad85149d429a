"""GPU: images/s of sdgate's worker path against a bare diffusers call, on SD 1.5's architecture.

The pipeline has Stable Diffusion 1.5's shapes (UNet 320/640/1280/1280 with 768-wide cross
attention, the SD VAE, a 12-layer 768-wide CLIP text encoder with CLIP's 49408-token vocabulary)
and random weights: nothing is downloaded, and the arithmetic per image is that of the real model.
It is saved with save_pretrained and loaded by the worker's own code (WorkerConfig.model = the
folder), so the worker path is exactly `sdgate worker`'s task body: GenerationService.handle
(request checks, scheduler, per-step deadline callback, the denoising call, PNG with its
`parameters` chunk, base64 result). The baseline is the same pipeline object called bare, at
batch 1 (interleaved with the worker path, so drift hits both) and at batch 2, 4 and 8; at each
of those batch sizes the worker also renders distinct same-shape prompts through its batcher
(`speedup`: its best batch size over batch 1), and batched images are compared with unbatched ones.
`continuous` is bench/continuous.py's comparison on this pipeline: continuous against window batching
(saturated_speedup, p95_ratio_at_80, solo_ratio), mixed step counts, schedulers and guidance.

    python -m bench gpu [--images 10] [--size 512] [--steps 20]
    python -m bench gpu --smoke      # CPU, tiny shapes, 64x64, 2 steps, fp32: checks the code path

Without CUDA (and without --smoke) it prints {"skipped": "no CUDA"}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from bench._common import load_average, log, summary_ms

CLIP_VOCAB = 49408
# (UNet, VAE, CLIP text encoder) keyword arguments; "sd15" is SD 1.5's published configuration.
ARCHITECTURES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "sd15": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, sample_size=512),
        "text": dict(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768),
    },
    # Same construction, tiny shapes: what --smoke runs on a CPU.
    "smoke": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=1, norm_num_groups=8, sample_size=64),
        "text": dict(vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 64x64, 2 steps, fp32")
    parser.add_argument("--images", type=int, default=10, help="timed images per path (and per batch size)")
    parser.add_argument("--size", type=int, help="image side (default 512; 64 with --smoke)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 2 with --smoke)")
    parser.add_argument("--batches", default=None, help="bare batch sizes (default 1,2,4,8; 1,2 with --smoke)")
    parser.add_argument("--keep", help="save the random pipeline here and keep it (default: a temp folder)")


def save_random_pipeline(folder: Path, architecture: str, device: str, dtype) -> Path:
    """Build the random-weight pipeline on `device`, cast it to `dtype`, save_pretrained into folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from celery_bridge.tiny_model import write_tokenizer_files

    shapes = ARCHITECTURES[architecture]
    vocab_dir = write_tokenizer_files(folder / "tokenizer-src")
    tokenizer = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    if shapes["text"]["vocab_size"] < len(tokenizer):
        raise ValueError(f"the text encoder's vocabulary ({shapes['text']['vocab_size']}) is smaller than the "
                         f"tokenizer's ({len(tokenizer)})")
    torch.manual_seed(0)
    with torch.device(device):  # random init where the weights will run: seconds instead of minutes on a CPU
        unet = UNet2DConditionModel(**shapes["unet"])
        vae = AutoencoderKL(**shapes["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **shapes["text"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    # SD 1.5's own scheduler configuration (PNDM, scaled-linear betas).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.to("cpu")
    target = folder / "pipeline"
    pipe.save_pretrained(target, safe_serialization=True)
    del pipe, unet, vae, text_encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return target


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    import diffusers
    import torch

    from celery_bridge.config import WorkerConfig
    from celery_bridge.pipeline import encode_png
    from celery_bridge.worker import GenerationService
    from client.protocol import GenerationRequest

    # 1. Where and how big.
    device = "cpu" if args.smoke else "cuda"
    architecture = "smoke" if args.smoke else "sd15"
    size = args.size or (64 if args.smoke else 512)
    steps = args.steps or (2 if args.smoke else 20)
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,2,4,8")).split(",")]
    dtype = torch.float32 if args.smoke else torch.float16
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
    log(f"{architecture} pipeline, {size}x{size}, {steps} steps, {dtype}, on {device_name}")

    # 2. The random SD 1.5 pipeline, saved and loaded through the worker's own loader.
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sdgate-gpu-bench-"))
    try:
        started = time.monotonic()
        model = save_random_pipeline(folder, architecture, device, dtype)
        build_s = time.monotonic() - started
        service = GenerationService(WorkerConfig(model=str(model), device=device, fp16=not args.smoke))
        runner = service.runner
        if runner.dtype != dtype or str(runner.pipe.unet.device).split(":")[0] != device:
            raise RuntimeError(f"the worker loaded {runner.dtype} on {runner.pipe.unet.device}, "
                               f"expected {dtype} on {device}")
        pipe = runner.pipe
        log(f"built and saved in {build_s:.1f} s, loaded by the worker in {service.load_seconds:.1f} s")

        png_kib: List[float] = []  # a tiny PNG would mean a degenerate (e.g. NaN) image: PNG cost understated

        def worker_image(i: int) -> float:
            request = GenerationRequest(f"gpu bench worker {i}: a red fox in the snow", width=size, height=size,
                                        steps=steps, model=runner.config.model)
            _sync(device)
            t0 = time.perf_counter()
            result = service.handle(request.to_dict())
            _sync(device)
            if not result["ok"]:
                raise RuntimeError(f"worker path failed: {result['error_message']}")
            png_kib.append(len(result["png_b64"]) * 3 / 4 / 1024)
            return time.perf_counter() - t0

        def bare_batch(i: int, batch: int) -> float:
            prompts = [f"gpu bench bare {i}.{j}: a red fox in the snow" for j in range(batch)]
            generator = torch.Generator(device=device).manual_seed(i)
            _sync(device)
            t0 = time.perf_counter()
            images = pipe(prompt=prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                          generator=generator).images
            _sync(device)
            if len(images) != batch:
                raise RuntimeError(f"asked for {batch} images, got {len(images)}")
            return time.perf_counter() - t0

        # 3. Worker path and bare batch 1, interleaved, after warm-up.
        for i in range(2):
            worker_image(-1 - i)
            bare_batch(-1 - i, 1)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        worker_s: List[float] = []
        bare_s: List[float] = []
        for i in range(args.images):
            worker_s.append(worker_image(i))
            bare_s.append(bare_batch(i, 1))
        worker_ips = len(worker_s) / sum(worker_s)
        by_batch: Dict[str, Any] = {"1": {"images_per_s": round(len(bare_s) / sum(bare_s), 3),
                                          "batch_ms_p50": round(statistics.median(bare_s) * 1000, 1)}}
        log(f"worker {worker_ips:.3f} img/s, bare batch 1 {by_batch['1']['images_per_s']} img/s")

        # 4. Bigger batches, bare and through the worker's batcher.
        from bench.throughput import max_pixel_difference, worker_images_per_s

        worker_batched: Dict[int, float] = {1: worker_ips}
        for batch in batches:
            if batch == 1:
                continue
            try:
                bare_batch(-1, batch)  # warm-up for this shape
                times = [bare_batch(i, batch) for i in range(max(2, args.images // batch))]
            except torch.cuda.OutOfMemoryError:
                by_batch[str(batch)] = {"error": "out of GPU memory"}
                torch.cuda.empty_cache()
                continue
            by_batch[str(batch)] = {"images_per_s": round(batch * len(times) / sum(times), 3),
                                    "batch_ms_p50": round(statistics.median(times) * 1000, 1)}
            log(f"bare batch {batch}: {by_batch[str(batch)]['images_per_s']} img/s")
            # The worker batching the same number of distinct same-shape prompts (celery_bridge/batching.py).
            try:
                worker_batched[batch] = worker_images_per_s(service, [
                    GenerationRequest(f"gpu bench batched {batch}.{j}: a red fox", width=size, height=size,
                                      steps=steps, model=runner.config.model, seed=j)
                    for j in range(batch * max(2, args.images // batch))], batch)
                by_batch[str(batch)]["worker_images_per_s"] = round(worker_batched[batch], 3)
                log(f"worker batch {batch}: {worker_batched[batch]:.3f} img/s")
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                by_batch[str(batch)]["worker_error"] = str(exc)[:200]
        service.batcher = None
        checks = [GenerationRequest(f"gpu bench pixel check {j}", width=size, height=size, steps=steps,
                                    model=runner.config.model, seed=j) for j in range(min(4, max(batches)))]
        pixel_difference = max_pixel_difference(service, checks) if len(checks) > 1 else 0

        # 5. Progress and previews: the step callback's cost on this GPU (bench/progress.py).
        progress_overhead = progress_on_gpu(runner, size, steps, args.images, device)

        # 5b. Continuous against window batching, mixed steps, schedulers and guidance (bench/continuous.py).
        from bench.continuous import compare

        step_mix = (steps // 2 or 1, steps, steps + steps // 2)
        continuous = compare(runner, slots=2 if args.smoke else 8, size=size, requests=4 * args.images,
                             poisson_requests=3 * args.images, steps=step_mix, sync=lambda: _sync(device))

        # 5c. A LoRA switch against a render at this size (bench/lora.py), with two random LoRAs.
        lora = lora_switch(runner, folder, model, size, steps, args.images, device)

        # 6. What PNG encoding alone costs at this size (part of the worker path).
        image = pipe(prompt="png probe", height=size, width=size, num_inference_steps=1).images[0]
        probe = runner.resolve(GenerationRequest("png probe", width=size, height=size, steps=steps))
        png_ms = []
        for _ in range(5):
            t0 = time.perf_counter()
            encode_png(image, probe)
            png_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    rated = {int(b): v["images_per_s"] for b, v in by_batch.items() if "images_per_s" in v}
    best = max(rated, key=rated.get)
    bare_ips = by_batch["1"]["images_per_s"]
    return {
        "device": device_name, "smoke": args.smoke, "architecture": architecture, "dtype": str(dtype).split(".")[-1],
        "size": size, "steps": steps, "images": args.images,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "worker_images_per_s": round(worker_ips, 3),
        "worker_image_ms": summary_ms([s * 1000 for s in worker_s]),
        "bare_batch1_images_per_s": bare_ips,
        "bare_image_ms": summary_ms([s * 1000 for s in bare_s]),
        "worker_vs_bare_batch1": round(worker_ips / bare_ips, 3),
        "worker_overhead_ms_p50": round((statistics.median(worker_s) - statistics.median(bare_s)) * 1000, 1),
        "png_encode_ms_p50": round(statistics.median(png_ms), 1),
        "worker_png_kib_mean": round(statistics.fmean(png_kib), 1),
        "bare_by_batch": by_batch, "best_batch": best, "best_batch_images_per_s": rated[best],
        "best_batch_vs_worker": round(rated[best] / worker_ips, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "worker_best_batch_size": max(worker_batched, key=worker_batched.get),
        "speedup": round(max(worker_batched.values()) / worker_ips, 3),  # worker: best batch / batch 1
        "max_pixel_difference_batched_vs_alone": pixel_difference,
        "progress": progress_overhead,
        "continuous": continuous,
        "lora": lora,
        "build_s": round(build_s, 1), "load_s": round(service.load_seconds, 1),
        "load_avg": load_average(),
    }


def lora_switch(runner, folder: Path, model: Path, size: int, steps: int, rounds: int, device: str) -> Dict[str, Any]:
    """bench/lora.py's switch-against-render figures on a runner of this pipeline with two random LoRAs."""
    from bench.lora import measure_switch
    from celery_bridge.config import WorkerConfig
    from celery_bridge.models import ModelEntry
    from celery_bridge.pipeline import PipelineRunner
    from celery_bridge.tiny_model import save_tiny_lora

    files = [save_tiny_lora(runner.pipe, folder / f"lora-{name}", seed=seed) for name, seed in (("a", 1), ("b", 2))]
    entry = ModelEntry(name=str(model), source=str(model), defaults=runner.entry.defaults.model_dump(),
                       loras=[{"name": "a", "source": str(files[0])}, {"name": "b", "source": str(files[1])}])
    import torch

    with_loras = PipelineRunner(WorkerConfig(model=str(model), device=device, fp16=runner.dtype == torch.float16),
                                entry=entry)
    return measure_switch(with_loras, size, steps, max(4, rounds), sync=lambda: _sync(device))


def progress_on_gpu(runner, size: int, steps: int, rounds: int, device: str) -> Dict[str, Any]:
    """bench/progress.py's on/off/previews measurement with this runner, against a local redis-server."""
    from bench.progress import measure_overhead, start_redis
    from client.protocol import GenerationRequest

    if not shutil.which("redis-server"):
        return {"skipped": "no redis-server on this machine"}
    process, client = start_redis()
    try:
        request = GenerationRequest("gpu bench progress: a red fox in the snow", width=size, height=size,
                                    steps=steps, model=runner.config.model)
        return measure_overhead(lambda r, on_step: runner.render(r, on_step=on_step), client, request,
                                max(3, rounds), every=min(5, steps), sync=lambda: _sync(device))
    finally:
        process.kill()
        process.wait(5)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "no CUDA"}
    return measure(args)
