"""The demo model `demo`: a Stable Diffusion 1.x pipeline trained here, on this machine's CPU, to draw
the scenes of celery_bridge/demo_world.py ("a small red circle on the left on a yellow background").

Same architecture as SD 1.5, only small: an `AutoencoderKL` (4 latent channels, 8x downsampling),
a CLIP text encoder with a CLIP tokenizer whose vocabulary this module writes (every word of the
grammar is one token, any other text falls back to bytes), a `UNet2DConditionModel` with cross
attention, and SD's own noise schedule. Saved as a diffusers folder, so a worker serves it the way
it serves real weights. Rebuild it (deterministic from the seed, about 36 minutes on 2 cores):

    python -m celery_bridge.demo_model train --out models/demo-sd-v1

Training: 1. the VAE learns to reconstruct scenes (MSE + L1 weighted up at edges + a small KL term); 2. its latents are
scaled to unit variance; 3. the UNet and the text encoder learn to predict the noise added to
those latents (offset noise, so flat dark and bright backgrounds come out as asked), with 10 % of
prompts dropped for classifier-free guidance and an EMA of the UNet's weights kept for sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from celery_bridge import demo_world
from celery_bridge.models import DEMO_FOLDER
from celery_bridge.tiny_model import _bytes_to_unicode

if TYPE_CHECKING:
    import torch

SIDE = 64  # training images; the model renders 64 and 128 px
MAX_TOKENS = 32  # the grammar's longest prompt is 22 tokens (a word is a token); SD's 77 would only cost time
VAE_CHANNELS = (16, 32, 64, 128)  # four blocks: 8x downsampling, as SD's VAE (64 px images, 8x8 latents);
# widest where the resolution is lowest, where a small shape's corners are decided, at little cost
UNET_CHANNELS = (32, 64, 128)
STEPS, GUIDANCE = 20, 5.0  # how the demo model is rendered: configs/models.yaml's defaults for `demo`


@dataclass(frozen=True)
class TrainConfig:
    """How the demo model is trained; the defaults are the committed weights' recipe."""

    seed: int = 0
    vae_steps: int = 1400
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: it learns as well from crops, at a quarter of the cost
    vae_edge_weight: float = 4.0  # L1 counts this much more near edges: corners cost little MSE, so they blur away
    pool: int = 24_000  # scenes drawn and encoded once; each use gets a fresh prompt (parts left out at random)
    unet_steps: int = 2400
    unet_batch: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    offset_noise: float = 0.1
    drop_prompt: float = 0.1
    threads: int = 2
    vae_from: str = ""  # a trained demo folder whose VAE is reused (skips step 1: for trying UNet recipes)


def write_demo_tokenizer(folder: Path) -> Path:
    """CLIP's byte-level BPE files (vocab.json, merges.txt) in which every word of the grammar is a
    single token: merges learnt from the grammar's words (`learn_merges`), over a vocabulary of
    every byte, so any other text still tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = learn_merges(sorted({w for text in _grammar_words() for w in text.split()}))
    vocab_tokens = symbols + [s + "</w>" for s in symbols] + [first + second for first, second in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return folder


def learn_merges(words: List[str]) -> List[Tuple[str, str]]:
    """BPE's merges for `words` (CLIP's symbols: the last character carries </w>), learnt until each
    word is one symbol: the commonest pair first, ties by the pair itself, so the result never depends
    on hash order (the `tokenizers` trainer's does). Encoding applies merges in this order, so each
    word comes out as the one token it was learnt as."""
    spelled = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges: List[Tuple[str, str]] = []
    while True:
        counts: dict = {}
        for symbols in spelled:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, symbols in enumerate(spelled):
            merged, position = [], 0
            while position < len(symbols):
                if tuple(symbols[position:position + 2]) == best:
                    merged.append(best[0] + best[1])
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            spelled[index] = merged


def _grammar_words() -> List[str]:
    return [*demo_world.COLOURS, *demo_world.SHAPES, *demo_world.SIZES, "shape",
            "a an on the at in and background left right top bottom centre"]


def build_demo_pipeline(tokenizer_dir: Path, seed: int = 0):
    """The untrained demo pipeline (fixed initialisation from `seed`)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_demo_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=VAE_CHANNELS, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS), up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
            layers_per_block=1, sample_size=SIDE)
        unet = UNet2DConditionModel(
            sample_size=SIDE // 2 ** (len(VAE_CHANNELS) - 1), in_channels=4, out_channels=4, block_out_channels=UNET_CHANNELS,
            layers_per_block=1, attention_head_dim=8, norm_num_groups=16, cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _draw_batch(rng: random.Random, count: int, side: int) -> Tuple[List["demo_world.Scene"], "object"]:
    import numpy as np
    import torch

    scenes = [demo_world.training_scene(rng) for _ in range(count)]
    images = [np.asarray(demo_world.draw(scene, side, rng), dtype=np.float32) for scene in scenes]
    return scenes, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _progress(total: float, label: str) -> "object":
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)


def train(out: Path, config: TrainConfig = TrainConfig(), log_path: Optional[Path] = None) -> Path:
    """Train the demo model and save it as a diffusers folder at `out` (with its loss log)."""
    import copy

    import torch

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    log_lines: List[str] = []

    def log(**fields) -> None:
        log_lines.append(json.dumps(fields))

    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_demo_pipeline(Path(scratch), seed=config.seed)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    started = time.monotonic()

    if config.vae_from:
        from diffusers import AutoencoderKL

        vae = pipe.vae = AutoencoderKL.from_pretrained(Path(config.vae_from) / "vae")
    # 1. The VAE: reconstruct crops of scenes. Its posterior starts narrow (log-variance -6), as a
    #    trained VAE's is, so early reconstructions are not drowned in sampling noise.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    bar = _progress(config.vae_steps, "vae")
    for step in range(0 if config.vae_from else config.vae_steps):
        _, pixels = _draw_batch(rng, config.vae_batch, SIDE)
        top, left = rng.randrange(SIDE - config.vae_crop + 1), rng.randrange(SIDE - config.vae_crop + 1)
        pixels = pixels[:, :, top:top + config.vae_crop, left:left + config.vae_crop]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        # L1 keeps edges sharp (MSE alone blurs them), weighted up near edges so that a small square
        # keeps its corners; the KL term keeps the latent space smooth.
        weight = 1 + config.vae_edge_weight * _edges(pixels)
        l1 = ((reconstruction - pixels).abs() * weight).mean() / weight.mean()
        loss = mse + l1 + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimiser.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 100) * _cosine(step, config.vae_steps)
        optimiser.step()
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if step % 50 == 0 or step == config.vae_steps - 1:
            log(stage="vae", step=step, mse=round(mse.item(), 5), s=round(time.monotonic() - started, 1))
    bar.close()
    vae.eval().requires_grad_(False)

    # 2. A pool of scenes, encoded once (the VAE is fixed from here); scaled to unit variance, as
    #    SD's 0.18215 does for its VAE.
    pool: List["demo_world.Scene"] = []
    means, stds = [], []
    bar = _progress(config.pool, "pool")
    with torch.no_grad():
        while len(pool) < config.pool:
            scenes, pixels = _draw_batch(rng, min(256, config.pool - len(pool)), SIDE)
            posterior = vae.encode(pixels).latent_dist
            pool += scenes
            means.append(posterior.mean)
            stds.append(posterior.std)
            bar.update(len(scenes))
    bar.close()
    means, stds = torch.cat(means), torch.cat(stds)
    vae.register_to_config(scaling_factor=round(float(1.0 / means.std()), 5))
    scaling = vae.config.scaling_factor
    log(stage="pool", scenes=len(pool), scaling_factor=scaling, s=round(time.monotonic() - started, 1))

    # 3. The UNet and the text encoder: predict the noise (epsilon), SD 1.x's objective.
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
    ema = copy.deepcopy(unet).requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
    unet.train()
    text_encoder.train()
    bar = _progress(config.unet_steps, "unet")
    smoothed, step = None, 0
    for step in range(config.unet_steps):
        picks = [rng.randrange(len(pool)) for _ in range(config.unet_batch)]
        prompts = [demo_world.training_prompt(pool[i], rng) for i in picks]
        prompts = ["" if rng.random() < config.drop_prompt else p for p in prompts]
        index = torch.tensor(picks)
        latents = (means[index] + stds[index] * torch.randn_like(means[index])) * scaling
        noise = torch.randn_like(latents) + config.offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
        timesteps = torch.randint(0, 1000, (latents.shape[0],))
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        for group in optimiser.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 200) * _cosine(step, config.unet_steps)
        optimiser.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), unet.parameters()):
                kept.lerp_(live, 1 - decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if step % 100 == 0:
            log(stage="unet", step=step, loss=round(smoothed, 5), s=round(time.monotonic() - started, 1))
    bar.close()
    log(stage="done", unet_steps=config.unet_steps, s=round(time.monotonic() - started, 1))

    # 4. Save: the EMA weights are the ones that sample well.
    pipe.unet = ema.eval()
    pipe.text_encoder.eval()
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # SD 1.5's own scheduler settings, kept in the config for the schedulers a request may switch to
    # (diffusers carries keys a class does not take to compatible classes): DDIM must not clip latents.
    scheduler_config = out / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler_config.read_text())
    settings.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    scheduler_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (log_path or out / "loss.jsonl").write_text("\n".join(log_lines) + "\n")
    return out


def _edges(pixels: "torch.Tensor") -> "torch.Tensor":
    """1 within a pixel of a colour edge of `pixels` (N, 3, H, W in [-1, 1]), else 0: (N, 1, H, W)."""
    import torch

    down = (pixels[:, :, 1:, :] - pixels[:, :, :-1, :]).abs().sum(1, keepdim=True)
    across = (pixels[:, :, :, 1:] - pixels[:, :, :, :-1]).abs().sum(1, keepdim=True)
    steps = torch.nn.functional.pad(down, (0, 0, 0, 1)) + torch.nn.functional.pad(across, (0, 1, 0, 0))
    return torch.nn.functional.max_pool2d((steps > 0.1).float(), 3, stride=1, padding=1)


def _cosine(step: float, total: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


GRID_PROMPTS = (
    "a large red circle in the centre on a white background",
    "a small blue triangle on the left on a yellow background",
    "a large green square at the top on a black background",
    "a small orange cross on the right on a blue background",
    "a large purple triangle at the bottom on a green background",
    "a small yellow circle at the top on a purple background",
    "a large white cross in the centre on a red background",
    "a small black square on the left on an orange background",
    "a large yellow triangle on the right on a blue background",
    "a small red square in the centre on a green background",
    "a red circle on the left and a blue square on the right on a white background",
    "a green triangle at the top and an orange cross at the bottom on a black background",
)


def grid(weights: Path, out: Path, side: int = 64, prompts=GRID_PROMPTS, seed: int = 0, zoom: int = 2) -> Path:
    """A captioned grid of what the model at `weights` draws for `prompts` at `side` px, shown `zoom`
    times larger (pixels repeated, nothing smoothed): the README's picture."""
    import io

    from PIL import Image, ImageDraw

    from celery_bridge.config import WorkerConfig
    from celery_bridge.pipeline import PipelineRunner
    from client.protocol import GenerationRequest

    runner = PipelineRunner(WorkerConfig(device="cpu", model=str(Path(weights).resolve())))
    columns, caption, shown = 4, 50, side * zoom
    cell = shown + 16
    sheet = Image.new("RGB", (columns * cell, -(-len(prompts) // columns) * (cell + caption)), "white")
    pen = ImageDraw.Draw(sheet)
    for index, prompt in enumerate(prompts):
        png = runner.render(GenerationRequest(prompt, width=side, height=side, steps=STEPS, guidance_scale=GUIDANCE,
                                              seed=seed + index))
        x, y = (index % columns) * cell + 8, (index // columns) * (cell + caption) + 8
        sheet.paste(Image.open(io.BytesIO(png)).resize((shown, shown), Image.NEAREST), (x, y))
        words, lines = prompt.split(), [""]
        for word in words:  # wrap the caption to the cell's width
            if len(lines[-1]) + len(word) + 1 > shown // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        pen.multiline_text((x, y + shown + 2), "\n".join(lines[:4]), fill="black", spacing=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m celery_bridge.demo_model",
                                     description="Train the demo model (celery_bridge/demo_world.py's scenes).")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train and save a diffusers folder")
    train_parser.add_argument("--out", type=Path, default=DEMO_FOLDER)
    for name, value in asdict(TrainConfig()).items():
        train_parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    grid_parser = sub.add_parser("grid", help="render the README's grid of prompts and what the model drew")
    grid_parser.add_argument("--weights", type=Path, default=DEMO_FOLDER)
    grid_parser.add_argument("--out", type=Path, default=Path("docs/demo-grid.png"))
    args = parser.parse_args(argv)
    if args.command == "grid":
        print(grid(args.weights, args.out))
        return 0
    config = TrainConfig(**{name: getattr(args, name) for name in asdict(TrainConfig())})
    print(train(args.out, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
