"""The resident diffusers pipeline of one worker process.

Loaded once per process, then reused by every task. diffusers schedulers keep per-call state,
so one lock serialises every use of the pipeline object.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image, PngImagePlugin

from client.protocol import GenerationRequest, InvalidRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.models import CatalogueError, ModelEntry, ModelLoadError, load_catalogue
from celery_bridge.models import DEMO_FOLDER
from celery_bridge.tiny_model import ensure_tiny_model

log = logging.getLogger(__name__)
DEVICES = ("auto", "cuda", "cpu")
_FIX = ("Set `model` in configs/worker.yaml, SDGATE_MODEL or `sdgate worker --model` to a model of the catalogue "
        "(configs/models.yaml) whose `source` is a local folder saved with save_pretrained (it holds "
        "model_index.json), a single .safetensors/.ckpt file with `config:` a local folder of its pipeline's "
        "configs, 'tiny' (the embedded test model), or a hub id with network access and HF_HUB_OFFLINE=0.")


class GenerationTimeout(RuntimeError):
    """A generation ran past its time limit and was stopped between two denoising steps."""


def a1111_parameters(request: GenerationRequest) -> str:
    """The `parameters` PNG text in AUTOMATIC1111's format, so PNG-info readers show it."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    strength = f", Denoising strength: {request.strength}" if request.init_image is not None else ""
    lines.append(f"Steps: {request.steps}, Sampler: {request.scheduler}, CFG scale: {request.guidance_scale}, "
                 f"Seed: {request.seed}, Size: {request.width}x{request.height}, Model: {request.model}{strength}")
    return "\n".join(lines)


def encode_png(image: Image.Image, request: GenerationRequest) -> bytes:
    """PNG bytes with the `parameters` text chunk; deterministic (Pillow writes no timestamp)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(request))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _resolve_device(device: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; raises ModelLoadError for what cannot work."""
    if device not in DEVICES:
        raise ModelLoadError(f"device {device!r} is not one of {', '.join(DEVICES)}; set `device` in "
                             "configs/worker.yaml or SDGATE_DEVICE")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device 'cuda' was asked for, but torch {torch.__version__} sees no CUDA GPU; "
                             "use device 'auto' or 'cpu' (SDGATE_DEVICE), or install a CUDA build of torch")
    return device


class PipelineRunner:
    """Owns the resident pipeline of one worker process."""

    loads = 0  # pipeline loads in this process; one per worker is the contract

    def __init__(self, config: WorkerConfig, entry: Optional[ModelEntry] = None):
        """`entry` defaults to config.model's entry in the catalogue; a name the catalogue does not
        list is read as a source itself (a folder, a single file or a hub id) with default settings."""
        import diffusers
        import transformers

        # Worker logs are read by people; per-load and per-step progress bars only clutter them.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.config = config
        self.entry = entry or catalogue_entry(config.model)
        self.device = _resolve_device(config.device)
        self.dtype = torch.float16 if self.device == "cuda" and config.fp16 else torch.float32
        if self.device == "cpu" and config.cpu_threads > 0:
            # Workers sharing a machine must split its cores: oversubscribed torch threads spin
            # against each other and every render slows down several times over.
            torch.set_num_threads(config.cpu_threads)
        self.last_pipeline_ms = 0.0
        self._lock = threading.Lock()
        started = time.monotonic()
        self.pipe = self._load(diffusers)
        self.load_seconds = time.monotonic() - started
        type(self).loads += 1
        self.family = self.entry.rules
        self._default_scheduler = self.pipe.scheduler
        self._schedulers: Dict[str, Any] = {"default": self._default_scheduler}
        self.preview_projection = fit_preview_projection(self.pipe)
        self.lora_loads = 0  # adapters loaded in this process: once each, whatever requests switch between
        self._applied_loras: Tuple[Tuple[str, float], ...] = ()
        self._load_loras()
        self._derived: Dict[str, Any] = {"txt2img": self.pipe}  # img2img, inpaint: from_pipe, same weights
        log.info("pipeline %r loaded on %s (%s, %d torch threads) in %.1f s", config.model, self.device, self.dtype,
                 torch.get_num_threads(), self.load_seconds)

    def _load(self, diffusers):
        # 1. Find the weights: the embedded model is built into the cache on first use.
        model, source = self.config.model, self.entry.weights
        if self.entry.kind == "embedded":
            cache_dir = self.config.resolved_model_cache_dir()
            try:
                source = str(ensure_tiny_model(cache_dir))
            except OSError as exc:
                raise ModelLoadError(
                    f"could not build the embedded model 'tiny' under {str(cache_dir)!r} ({exc}). Point "
                    "`model_cache_dir` in configs/worker.yaml or SDGATE_MODEL_CACHE_DIR at a writable folder."
                ) from exc
        # 2. Read them (diffusers 0.42 takes `dtype`; `torch_dtype` is deprecated). A single file
        #    gets its pipeline's configs from a local folder: nothing is downloaded.
        try:
            if self.entry.kind == "single_file":
                pipe = self._load_single_file(diffusers, source)
            else:
                cls = diffusers.StableDiffusionPipeline if self.entry.kind == "embedded" else diffusers.DiffusionPipeline
                pipe = cls.from_pretrained(source, dtype=self.dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets the same advice
            raise ModelLoadError(f"could not load model {model!r}: {_why(model, source, exc)} {_FIX}") from exc
        # 3. Fit them onto the device.
        pipe.set_progress_bar_config(disable=True)
        if self.config.attention_slicing:
            pipe.enable_attention_slicing()
        if self.config.vae_tiling:
            pipe.vae.enable_tiling()
        if self.config.cpu_offload and self.device == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            if self.config.cpu_offload:
                log.info("cpu_offload ignored: the pipeline already runs on the CPU")
            pipe.to(self.device)
        return pipe

    def _load_single_file(self, diffusers, source: str):
        config = self.entry.config
        if not config or not (Path(config).expanduser() / "model_index.json").is_file():
            raise ModelLoadError(
                f"model {self.config.model!r} is the single file {source!r}, and its `config` ({config!r}) is not a "
                "local folder holding model_index.json. Set `config` in its configs/models.yaml entry to a folder "
                "with the configs of its pipeline (e.g. a diffusers copy of the base model, weights not needed): "
                "sdgate never downloads them.")
        config = str(Path(config).expanduser())
        index = json.loads((Path(config) / "model_index.json").read_text())
        cls = getattr(diffusers, str(index.get("_class_name")), None)
        if cls is None or not hasattr(cls, "from_single_file"):
            raise ModelLoadError(f"{config}/model_index.json names pipeline class {index.get('_class_name')!r}, which "
                                 "cannot load single-file checkpoints; use a StableDiffusion(XL)Pipeline config folder")
        return cls.from_single_file(source, config=config, local_files_only=True, dtype=self.dtype)

    def _scheduler(self, name: str):
        """The scheduler `name` means for this model's family (celery_bridge/families.py), over the
        model's own scheduler config; the gateway refuses names the family does not take."""
        if name not in self._schedulers:
            import diffusers

            cls = self.family.schedulers.get(name)
            if name not in self.family.schedulers:
                raise InvalidRequest("scheduler", f"{name!r} does not apply to {self.family.name} models")
            # PNDM's Runge-Kutta warm-up needs more steps than a short render has; Stable Diffusion skips it.
            extra = {"skip_prk_steps": True} if cls == "PNDMScheduler" else {}
            self._schedulers[name] = (getattr(diffusers, cls).from_config(self._default_scheduler.config, **extra)
                                      if cls else self._default_scheduler)
        return self._schedulers[name]

    def _load_loras(self) -> None:
        """Each catalogued LoRA loaded once as a named adapter of the resident pipeline, then off."""
        for lora in self.entry.loras:
            try:
                self.pipe.load_lora_weights(str(Path(lora.source).expanduser()), adapter_name=lora.name)
            except Exception as exc:  # noqa: BLE001 - every failure gets the same advice
                raise ModelLoadError(f"model {self.config.model!r}: LoRA {lora.name!r} from {lora.source!r} could not "
                                     f"be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); is it a "
                                     f".safetensors LoRA for {self.family.name} models? Fix or remove its entry under "
                                     "`loras:` in configs/models.yaml") from exc
            self.lora_loads += 1
        if self.entry.loras:
            self.pipe.disable_lora()
            log.info("LoRAs %s loaded for %r", [lora.name for lora in self.entry.loras], self.config.model)

    def apply_loras(self, loras: Optional[Tuple[Tuple[str, float], ...]]) -> None:
        """Switch the resident pipeline to `loras` (None: none): adapter weights only, the base is
        never reloaded. The caller holds the lock, as for any use of the pipeline."""
        wanted = tuple(loras or ())
        if wanted == self._applied_loras:
            return
        if wanted:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in wanted], adapter_weights=[weight for _, weight in wanted])
        else:
            self.pipe.disable_lora()
        self._applied_loras = wanted

    def preview_latents(self, latents: Any, width: int, height: int) -> Any:
        """What step callbacks get: the latents as a small RGB image per sample, (batch, 3, h, w) in
        [-1, 1], by this model's own latent-to-RGB map (any channel count; FLUX.1's unpacked first)."""
        if latents is None or self.preview_projection is None:
            return latents
        if self.family.packed_latents:
            latents = type(self.pipe)._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        weights, bias = self.preview_projection
        with torch.no_grad():
            return torch.einsum("bchw,cr->brhw", latents.float(), weights.to(latents.device)) + \
                bias.to(latents.device).view(1, 3, 1, 1)

    def pipeline_for(self, kind: str):
        """The pipeline of a request kind: the resident one for txt2img; for img2img and inpaint one
        derived from it with from_pipe on first use, sharing its modules (no second copy of the weights)."""
        if kind not in self._derived:
            import diffusers

            cls = diffusers.AutoPipelineForImage2Image if kind == "img2img" else diffusers.AutoPipelineForInpainting
            derived = cls.from_pipe(self.pipe)
            derived.set_progress_bar_config(disable=True)
            self._derived[kind] = derived
            log.info("%s pipeline %s derived from the resident one", kind, type(derived).__name__)
        return self._derived[kind]

    def new_scheduler(self, name: str):
        """A scheduler instance of its own for one request of the continuous loop (schedulers keep
        per-call state), of class `name` over this model's scheduler config."""
        return type(self._scheduler(name)).from_config(self._default_scheduler.config)

    def _call(self, request: GenerationRequest, time_limit_s: Optional[float] = None,
              on_step: Optional[Callable[[int, int, Any], None]] = None,
              batch: Optional[List[GenerationRequest]] = None, on_start: Optional[Callable[[], None]] = None):
        # The caller holds self._lock: the scheduler swap and its per-call state are not thread-safe.
        # A CPU generator gives the same noise on every device, so both worker modes agree. A batch
        # (requests of one shape, celery_bridge/batching.py) gets one generator per request, so each
        # seed keeps its own noise; it returns the list of images, in the order of `batch`.
        inputs = batch_inputs(batch) if batch else image_inputs([request])
        generator = inputs.pop("generator", None) or torch.Generator(device="cpu").manual_seed(request.seed)
        pipe = self.pipeline_for(request.kind)
        pipe.scheduler = self._scheduler(request.scheduler)
        self.apply_loras(request.loras)  # a batch shares its LoRAs (batching.shape_of)
        deadline = time.monotonic() + time_limit_s if time_limit_s else None

        def stop_past_deadline(pipe, step, timestep, callback_kwargs):
            # Celery's time limits need signals the solo and thread pools don't have; this works in both.
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeout(f"stopped after step {step + 1} of {request.steps}: over the "
                                        f"{time_limit_s:.0f} s limit per image")
            if on_step is not None:  # progress, previews and cancel (celery_bridge/progress.py); may raise
                # Some schedulers (PNDM) run one timestep more than asked: report the real count.
                on_step(step, getattr(pipe, "num_timesteps", None) or request.steps,
                        self.preview_latents(callback_kwargs.get("latents"), request.width, request.height))
            return callback_kwargs

        if request.kind != "img2img":  # img2img takes its size from the (resized) init image
            inputs.update(width=request.width, height=request.height)
        if request.init_image is not None:
            inputs["strength"] = request.strength
        negative = inputs.pop("negative_prompt") if batch else request.negative_prompt or None
        if self.family.negative_prompt:  # FLUX.1 has none; the gateway refuses one sent to it
            inputs["negative_prompt"] = negative
        with _before_first_denoising(pipe, on_start):
            return pipe(
                prompt=inputs.pop("prompt", request.prompt),
                **inputs,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="pil",
                callback_on_step_end=stop_past_deadline,
            ).images[slice(None) if batch else 0]

    def render(self, request: GenerationRequest, time_limit_s: Optional[float] = None,
               on_step: Optional[Callable[[int, int, Any], None]] = None,
               on_start: Optional[Callable[[], None]] = None) -> bytes:
        """PNG bytes for `request` (filled from this model's defaults and normalized first), with the
        `parameters` chunk; raises GenerationTimeout when the pipeline runs past `time_limit_s`.
        `on_step(step, steps, latents)` runs after each denoising step, and `on_start()` once just
        before the first (the prompt encoded, the latents drawn); what either raises stops the render.
        The time spent in `on_start` is not counted in last_pipeline_ms."""
        request = self.resolve(request)
        waited = [0.0]

        def timed_start() -> None:
            began = time.perf_counter()
            try:
                on_start()
            finally:
                waited[0] += time.perf_counter() - began

        with self._lock:
            started = time.perf_counter()
            image = self._call(request, time_limit_s, on_step, on_start=timed_start if on_start else None)
            self.last_pipeline_ms = (time.perf_counter() - started - waited[0]) * 1000
        return encode_png(image, request)

    def render_batch(self, requests: List[GenerationRequest], time_limit_s: Optional[float] = None,
                     on_step: Optional[Callable[[int, int, Any], None]] = None) -> Tuple[List[bytes], float]:
        """PNG bytes for each of `requests` (one shape; see celery_bridge/batching.py), rendered in
        one pipeline call, in their order, and the call's milliseconds. `on_step(step, steps,
        latents)` runs after each step with the whole batch's latents (request i at index i)."""
        requests = [self.resolve(request) for request in requests]
        with self._lock:
            started = time.perf_counter()
            images = self._call(requests[0], time_limit_s, on_step, batch=requests)
            self.last_pipeline_ms = (time.perf_counter() - started) * 1000
            pipeline_ms = self.last_pipeline_ms
        return [encode_png(image, request) for image, request in zip(images, requests)], pipeline_ms

    def bare_call(self, request: GenerationRequest):
        """The pipeline call alone (no PNG), the baseline benchmarks compare `render` with.

        It still takes the lock: uncontended it costs well under a microsecond, and without it a
        benchmark thread could corrupt a concurrent render's scheduler state.
        """
        with self._lock:
            return self._call(self.resolve(request))

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with this model's name and defaults in the fields it left out, normalised, and
        checked against the model's family (InvalidRequest: a scheduler or negative prompt it lacks)."""
        resolved = self.entry.fill(request).normalized()
        self.family.check(resolved)
        self.entry.check_loras(resolved)
        return resolved


@contextlib.contextmanager
def _before_first_denoising(pipe: Any, on_start: Optional[Callable[[], None]]) -> Iterator[None]:
    """Within it, `on_start()` runs once, just before `pipe`'s denoiser (its UNet or transformer)
    first runs; diffusers has no callback before the first step. With no denoiser to hook, now."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if on_start is None or not isinstance(denoiser, torch.nn.Module):
        if on_start is not None:
            on_start()
        yield
        return
    called = []

    def before(module: Any, args: Any) -> None:
        if not called:
            called.append(True)
            on_start()

    hook = denoiser.register_forward_pre_hook(before)
    try:
        yield
    finally:
        hook.remove()


def batch_inputs(batch: List[GenerationRequest]) -> Dict[str, Any]:
    """The per-request pipeline arguments of one batched call: prompts, negative prompts and one
    CPU generator per request (diffusers draws each sample's latents from its own generator)."""
    negatives = [request.negative_prompt or "" for request in batch]  # "" is what None means to diffusers
    return {"prompt": [request.prompt for request in batch],
            "negative_prompt": negatives if any(negatives) else None,
            "generator": [torch.Generator(device="cpu").manual_seed(request.seed) for request in batch],
            **image_inputs(batch)}


def image_inputs(batch: List[GenerationRequest]) -> Dict[str, Any]:
    """`image` (and `mask_image`) for img2img and inpainting: each request's own, decoded and resized
    to its output size (the gateway checked them whole and within the pixel cap); {} for txt2img."""
    if batch[0].init_image is None:
        return {}
    size = (batch[0].width, batch[0].height)

    def decoded(data: bytes, mode: str) -> Image.Image:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert(mode).resize(size, Image.LANCZOS)

    images = [decoded(request.init_image, "RGB") for request in batch]
    inputs: Dict[str, Any] = {"image": images if len(batch) > 1 else images[0]}
    if batch[0].mask is not None:
        masks = [decoded(request.mask, "L") for request in batch]
        inputs["mask_image"] = masks if len(batch) > 1 else masks[0]
    return inputs


def fit_preview_projection(pipe: Any) -> Optional[Tuple[Any, Any]]:
    """A linear map from this model's latents (as its denoiser sees them) to RGB, for previews:
    least squares over synthetic colour images encoded by the model's own VAE, so it fits any
    family's channel count and scaling; None without a VAE. Costs a few small encodes at load."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    factor = getattr(pipe, "vae_scale_factor", 8)
    side = 8 * factor
    colours = [(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1), (1, 1, 1), (-1, -1, -1),
               (0.5, 0, -0.5), (-0.5, 0.5, 0)]
    images = torch.tensor(colours, dtype=torch.float32).view(-1, 3, 1, 1).repeat(1, 1, side, side)
    images[len(colours) // 2:, :, :, side // 2:] *= -1  # half of them in two colours, for edges
    with torch.no_grad():
        sample = images.to(vae.device, vae.dtype)
        latents = vae.encode(sample).latent_dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor  # the denoiser's space, as the pipeline's decode undoes
        target = torch.nn.functional.avg_pool2d(images, factor)
        rows = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu()
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
        solution = torch.linalg.lstsq(rows, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return solution[:-1], solution[-1]


def catalogue_entry(model: str) -> ModelEntry:
    """`model`'s catalogue entry; a name the catalogue lacks is taken as its own source."""
    try:
        entry = load_catalogue().get(model)
    except CatalogueError as exc:
        raise ModelLoadError(str(exc)) from None
    return entry if entry is not None else ModelEntry(name=model, source=model)


def _why(model: str, source: str, exc: Exception) -> str:
    """The cause of a failed load in words, with the library's own message (shortened)."""
    detail = f"({type(exc).__name__}: {' '.join(str(exc).split())[:400]})"
    path = Path(source).expanduser()
    if model == "tiny" and source != model:
        return f"its folder {source!r} is broken; delete it to have it rebuilt {detail}."
    if Path(source) == DEMO_FOLDER:
        return (f"the demo model's folder {source!r} is missing or broken; restore it with `git checkout -- "
                f"models/` or rebuild it with `python -m celery_bridge.demo_model train` {detail}.")
    if path.is_dir():
        return f"the folder exists but is not a diffusers pipeline, or a component in it is broken {detail}."
    if path.exists():
        if source.lower().endswith((".safetensors", ".ckpt")):
            return f"the single-file checkpoint is not a Stable Diffusion checkpoint its config folder fits {detail}."
        return f"it is a file, not a folder {detail}."
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # hub ids are `owner/name`
        return f"there is no folder at that path {detail}."
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"it is not a local folder, and HF_HUB_OFFLINE forbids asking the hub for it {detail}."
    return f"it is not a local folder, and the hub could not serve it (offline, or no such repo?) {detail}."
