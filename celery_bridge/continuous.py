"""Continuous batching: requests join a running denoising loop at its next step.

Window batching (celery_bridge/batching.py) renders requests of one identical shape in one
pipeline call and takes the next group only when the call ends. Here one loop thread keeps a set
of active requests, each with its own latents, scheduler instance, step index, guidance, seed and
prompt embeddings. Each iteration runs the denoiser once over every active request, each at its
own timestep, then advances each with its own scheduler. A new request joins at the next
iteration, after its prompt is encoded; a finished one is decoded and leaves; one whose step
callback raises (cancelled, or nobody waits) leaves at once. Requests share a loop when they share
the model and the resolution; steps, scheduler, guidance, prompts and seeds may all differ.

The worker holds at most `max_active` tasks (that many Celery consumer threads, one prefetched
message each, late acks), so a task is acknowledged only once its own image exists, a worker
killed mid-loop leaves every task unacknowledged for redelivery, and nothing waits in the loop
that the loop could not admit.

`Stepper` is the model side: DiffusersStepper for Stable Diffusion 1.x/2.x and SDXL pipelines (one
UNet call per iteration over every request's rows); tests inject a deterministic stand-in.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from client.protocol import GenerationRequest
from celery_bridge.batching import HandOff, OnStep, Rendered

log = logging.getLogger(__name__)
Group = Tuple[object, ...]


def group_of(request: GenerationRequest) -> Group:
    """What requests in one iteration must share: the model, the resolution and the LoRAs (adapters
    apply to the whole UNet call)."""
    return (request.model, request.width, request.height, request.loras)


@dataclass
class Decoded:
    """A request's image as the loop leaves it; submit() encodes its PNG on the request's thread."""

    image: Any
    pipeline_ms: float
    batch_size: int


@dataclass
class Active:
    """One request in the loop: the stepper's state for it (`state`), its steps and its waiter."""

    request: GenerationRequest
    on_step: Optional[OnStep]
    deadline: Optional[float]
    arrived: float
    state: Any = None  # the stepper's: latents, scheduler, embeddings, generator...
    steps: int = 0  # denoising steps it runs (some schedulers run one more than asked)
    index: int = 0  # steps done
    started: float = 0.0
    shared: float = 0.0  # sum over its iterations of the requests in each: its share of the GPU
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[Decoded] = None
    error: Optional[BaseException] = None


class Stepper:
    """The model side of the loop (the interface DiffusersStepper and test stand-ins implement)."""

    def start(self, request: GenerationRequest) -> Tuple[Any, int]:
        """(state, steps) for a new request: prompt encoded, latents drawn, scheduler set."""
        raise NotImplementedError

    def step(self, states: List[Any]) -> List[Any]:
        """One denoising step of every state, in one denoiser call; returns what each one's step
        callback gets (its latents, or as the runner's preview_latents gives them)."""
        raise NotImplementedError

    def finish(self, state: Any) -> Any:
        """The decoded image of a state whose steps are all done (what `encode` takes)."""
        raise NotImplementedError

    def encode(self, request: GenerationRequest, image: Any) -> bytes:
        """The PNG of `finish`'s image; called on the request's own thread, outside the loop, so
        the next iteration does not wait for it. Default: `finish` returned the bytes already."""
        return image


class TooLate(RuntimeError):
    """A request ran past its time limit; it left the loop between two steps."""


class ContinuousLoop(HandOff):
    """Admits submitted requests into one step-level denoising loop (one thread)."""

    _thread_name = "sdgate-continuous"

    def __init__(self, stepper: Stepper, max_active: int, time_limit_s: Optional[float] = None,
                 lock: Optional[threading.Lock] = None, clock: Callable[[], float] = time.monotonic,
                 timeout_error: Callable[[str], BaseException] = TooLate, own_thread: bool = True):
        """`lock` is held for each iteration (the runner's: nothing else may use the pipeline meanwhile);
        without `own_thread` the caller drives the loop with iterate() (deterministic tests)."""
        self.own_thread = own_thread
        self.stepper = stepper
        self.max_active = max_active
        self.time_limit_s = time_limit_s
        self._lock = lock or threading.Lock()
        self._clock = clock
        self._timeout_error = timeout_error
        self._init_hand_off()
        self._active: List[Active] = []
        self.iterations: List[int] = []  # active requests in each iteration (figures and tests)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest, on_step: Optional[OnStep] = None) -> Rendered:
        """Block until `request` is rendered; raises what its render or its own `on_step` raised.
        Its `pipeline_ms` runs from its admission (prompt encoding) to its decoded image, as a solo
        pipeline call is timed: the wait to join and the PNG encoding are not the model's."""
        now = self._clock()
        decoded = self._hand_in(Active(request, on_step, now + self.time_limit_s if self.time_limit_s else None, now))
        return Rendered(self.stepper.encode(request, decoded.image), decoded.pipeline_ms, decoded.batch_size)

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self.iterate(block=True)

    def iterate(self, block: bool = False) -> bool:
        """One iteration: admit what waits (of the active group, up to max_active), one step of every
        active request, then each one's callback; the finished are decoded and leave. False when idle."""
        with self._cond:
            while block and not self._pending and not self._active:
                self._cond.wait()
            joining = self._admissible()
        with self._lock:
            for slot in joining:
                self._admit(slot)
            if not self._active:
                return bool(joining)
            self._step()
            self._finish()
        return True

    def _admissible(self) -> List[Active]:
        """Waiting requests that may join now, oldest first, up to max_active in all, while they are of
        the running group (model and size). The first of another group stops admission: the loop
        drains and that group runs next, so no resolution waits behind an endless stream of another."""
        group = group_of(self._active[0].request) if self._active else None
        joining: List[Active] = []
        while self._pending and len(self._active) + len(joining) < self.max_active:
            candidate = group_of(self._pending[0].request)
            if group is not None and candidate != group:
                break
            group = candidate
            joining.append(self._pending.pop(0))
        return joining

    def _admit(self, slot: Active) -> None:
        slot.started = self._clock()
        try:
            slot.state, slot.steps = self.stepper.start(slot.request)
        except BaseException as exc:  # noqa: BLE001 - its task reports it; the loop goes on
            self._end(slot, error=exc)
            return
        self._active.append(slot)

    def _step(self) -> None:
        active = list(self._active)
        self.iterations.append(len(active))
        try:
            latents = self.stepper.step([slot.state for slot in active])
        except BaseException as exc:  # noqa: BLE001 - every request of the iteration reports it
            for slot in active:
                self._end(slot, error=exc)
            return
        now = self._clock()
        for slot, slot_latents in zip(active, latents):
            slot.index += 1
            slot.shared += len(active)
            try:
                if slot.deadline is not None and now > slot.deadline:
                    raise self._timeout_error(f"stopped after step {slot.index} of {slot.steps}: over the "
                                              f"{self.time_limit_s:.0f} s limit per image")
                if slot.on_step is not None:  # progress, previews and cancel; may raise: it leaves
                    slot.on_step(slot.index - 1, slot.steps, slot_latents)
            except BaseException as exc:  # noqa: BLE001 - its task reports it; the others go on
                self._end(slot, error=exc)

    def _finish(self) -> None:
        for slot in [slot for slot in self._active if slot.index >= slot.steps]:
            try:
                image = self.stepper.finish(slot.state)
            except BaseException as exc:  # noqa: BLE001 - as above
                self._end(slot, error=exc)
                continue
            milliseconds = (self._clock() - slot.started) * 1000
            self._end(slot, result=Decoded(image, milliseconds, max(1, round(slot.shared / max(1, slot.index)))))

    def _end(self, slot: Active, result: Optional[Decoded] = None, error: Optional[BaseException] = None) -> None:
        if slot in self._active:
            self._active.remove(slot)
        slot.state = None  # its latents and embeddings go now, not when its task thread wakes
        slot.result, slot.error = result, error
        slot.done.set()


# -- Stable Diffusion 1.x/2.x and SDXL -----------------------------------------------------------------

LOOP_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def supports_continuous(pipe: Any) -> bool:
    """Whether the loop can step this pipeline: Stable Diffusion 1.x/2.x or SDXL text to image, whose
    UNet2DConditionModel takes a timestep per sample (SDXL's added text/time conditioning included)."""
    unet = getattr(pipe, "unet", None)
    if type(pipe).__name__ not in LOOP_PIPELINES or type(unet).__name__ != "UNet2DConditionModel":
        return False
    return unet.config.time_cond_proj_dim is None and unet.config.addition_embed_type in (
        None, "text_time" if type(pipe).__name__ == "StableDiffusionXLPipeline" else None)


@dataclass
class _SdState:
    request: GenerationRequest
    scheduler: Any
    timesteps: Any
    latents: Any
    embeddings: Any  # the UNet's encoder_hidden_states rows: (uncond, cond) with guidance, else cond
    added: Dict[str, Any]  # SDXL's added_cond_kwargs rows (text_embeds, time_ids); {} for SD 1.x/2.x
    guided: bool
    generator: Any
    step_kwargs: Dict[str, Any]
    index: int = 0


class DiffusersStepper(Stepper):
    """Steps a resident StableDiffusion(XL)Pipeline, doing per request what its __call__ does, so
    each image stays within float noise of the same request rendered alone."""

    def __init__(self, runner: Any):
        """`runner`: celery_bridge.pipeline.PipelineRunner (its pipe, device and scheduler classes)."""
        self.runner = runner
        self.pipe = runner.pipe
        self.xl = type(self.pipe).__name__ == "StableDiffusionXLPipeline"

    def start(self, request: GenerationRequest) -> Tuple[Any, int]:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        pipe, device = self.pipe, self.runner.device
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        guided = request.guidance_scale > 1
        self.runner.apply_loras(request.loras)  # its group's: text encoder LoRAs change the embeddings too
        with torch.no_grad():
            # 1. The prompt's embeddings (and SDXL's pooled ones and size conditioning), as __call__ makes them.
            added: Dict[str, Any] = {}
            if self.xl:
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    prompt=request.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                    negative_prompt=request.negative_prompt or None)
                size = (request.height, request.width)
                projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                              else pipe.text_encoder_2.config.projection_dim)
                time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                                  text_encoder_projection_dim=projection).to(device)
                added = {"text_embeds": torch.cat([uncond_pooled, pooled]) if guided else pooled,
                         "time_ids": torch.cat([time_ids, time_ids]) if guided else time_ids}
            else:
                cond, uncond = pipe.encode_prompt(request.prompt, device, 1, guided, request.negative_prompt or None)
        # 2. Its own scheduler, its timesteps, and its noise from its own generator.
        scheduler = self.runner.new_scheduler(request.scheduler)
        scheduler.set_timesteps(request.steps, device=device)
        shape = (1, pipe.unet.config.in_channels, request.height // pipe.vae_scale_factor,
                 request.width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=cond.dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = set(inspect.signature(scheduler.step).parameters)
        step_kwargs = {"generator": generator} if "generator" in accepted else {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0
        state = _SdState(request, scheduler, scheduler.timesteps, latents,
                         torch.cat([uncond, cond]) if guided else cond, added, guided, generator, step_kwargs)
        return state, len(scheduler.timesteps)

    def step(self, states: List[Any]) -> List[Any]:
        import torch

        self.runner.apply_loras(states[0].request.loras)  # one group: the same LoRAs for every state
        inputs, times = [], []
        for state in states:
            t = state.timesteps[state.index]
            rows = torch.cat([state.latents] * 2) if state.guided else state.latents
            rows = state.scheduler.scale_model_input(rows, t)
            inputs.append(rows)
            times.append(torch.full((rows.shape[0],), float(t), device=rows.device, dtype=torch.float32))
        added = ({name: torch.cat([state.added[name] for state in states]) for name in states[0].added}
                 if self.xl else None)
        with torch.no_grad():
            noise = self.pipe.unet(torch.cat(inputs), torch.cat(times),
                                   encoder_hidden_states=torch.cat([state.embeddings for state in states]),
                                   added_cond_kwargs=added, return_dict=False)[0]
            at = 0
            for state in states:
                rows = 2 if state.guided else 1
                prediction = noise[at:at + rows]
                at += rows
                if state.guided:
                    uncond, text = prediction.chunk(2)
                    prediction = uncond + state.request.guidance_scale * (text - uncond)
                t = state.timesteps[state.index]
                state.latents = state.scheduler.step(prediction, t, state.latents, **state.step_kwargs,
                                                     return_dict=False)[0]
                state.index += 1
        return [self.runner.preview_latents(state.latents, state.request.width, state.request.height)
                for state in states]

    def finish(self, state: Any) -> Any:
        import torch

        pipe = self.pipe
        with torch.no_grad():
            if self.xl:
                image = self._decode_xl(state.latents)
                if getattr(pipe, "watermark", None) is not None:
                    image = pipe.watermark.apply_watermark(image)
                picture = pipe.image_processor.postprocess(image, output_type="pil")[0]
            else:
                image = pipe.vae.decode(state.latents / pipe.vae.config.scaling_factor, return_dict=False,
                                        generator=state.generator)[0]
                image, nsfw = pipe.run_safety_checker(image, self.runner.device, state.latents.dtype)
                denormalize = [True] if nsfw is None else [not flagged for flagged in nsfw]
                picture = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)[0]
        return picture

    def encode(self, request: GenerationRequest, image: Any) -> bytes:
        from celery_bridge.pipeline import encode_png

        return encode_png(image, request)

    def _decode_xl(self, latents: Any) -> Any:
        """SDXL's decode as its __call__ does it: the VAE upcast from fp16 where it overflows, and
        its latents' mean and std where its config has them."""
        import torch

        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            self.pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return image
