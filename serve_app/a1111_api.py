"""AUTOMATIC1111's `/sdapi/v1/*` API over sdgate, to the fields Open WebUI, SillyTavern and the
`webuiapi` client send and read (see README "A1111 API").

Where A1111 has one checkpoint and one job for everyone, here every caller (its key's tenant, or
its address when it shares an identity) has its own default model (`POST /options`), its own
`/progress` (only its own work) and its own `/interrupt` (stops only its own work). The caller's
work is listed in Redis, so any replica answers `/progress` and `/interrupt` for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from client import protocol
from client.protocol import GenerationRequest, InvalidRequest, ProtocolError
from celery_bridge import redis_keys
from serve_app.images_api import bounded_body, client_of, credential
from serve_app.openai_errors import HTTP_STATUS
from serve_app.tenants import Tenant

log = logging.getLogger(__name__)
# A1111's sampler names (and their aliases) -> sdgate's schedulers.
SAMPLERS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "Euler a": ("euler_a", ("k_euler_a", "k_euler_ancestral", "euler_a")),
    "Euler": ("euler", ("k_euler", "euler")),
    "LMS": ("lms", ("k_lms", "lms")),
    "DPM++ 2M": ("dpm++", ("k_dpmpp_2m", "dpm++")),
    "DDIM": ("ddim", ("ddim",)),
    "PLMS": ("pndm", ("plms",)),
    "PNDM": ("pndm", ("pndm",)),
    "Default": ("default", ("default",)),
}
SAMPLER_NAMES = {name.lower(): scheduler for name, (scheduler, aliases) in SAMPLERS.items()} | {
    alias.lower(): scheduler for _, (scheduler, aliases) in SAMPLERS.items() for alias in aliases}
# A1111 1.9+ sends the noise schedule apart from the sampler; sdgate uses each model's own.
SCHEDULES = ("automatic", "normal")
MAX_IMAGES = 16  # batch_size x n_iter
WORK_TTL_S = 120  # a caller's work entry outlives a dead replica by this much, no more
INTERRUPT_POLL_S = 0.5
DEFAULT_PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps
MAX_OPTIONS = 64
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
# Fields that would change the image in ways sdgate cannot do: refused when set, never dropped.
UNSUPPORTED_TRUE = ("enable_hr", "restore_faces", "tiling")


class A1111Error(Exception):
    """An answer in A1111's error shape: {"error", "detail", "errors"} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.code, "detail": self.message, "errors": self.message, "field": self.field},
                            status_code=self.status)


def _from_protocol(exc: ProtocolError) -> A1111Error:
    status = 422 if exc.code == protocol.E_INVALID_REQUEST else HTTP_STATUS.get(exc.code, 500)
    return A1111Error(status, exc.code, exc.message, exc.field)


def invalid(field: str, message: str) -> A1111Error:
    return A1111Error(422, protocol.E_INVALID_REQUEST, f"{field}: {message}", field)


def scheduler_for(sampler: Any, schedule: Any) -> Optional[str]:
    """sdgate's scheduler for an A1111 sampler (and schedule) name; None leaves the model's default."""
    if schedule is not None and (not isinstance(schedule, str) or schedule.lower() not in SCHEDULES):
        raise invalid("scheduler", f"{schedule!r} is not offered; sdgate uses each model's own noise schedule: "
                      f"send one of {', '.join(SCHEDULES)} or leave it out")
    if sampler is None or sampler == "":
        return None
    scheduler = SAMPLER_NAMES.get(sampler.lower()) if isinstance(sampler, str) else None
    if scheduler is None:
        raise invalid("sampler_name", f"{sampler!r} is not a sampler here; GET /sdapi/v1/samplers lists "
                      f"{', '.join(SAMPLERS)}")
    return scheduler


def model_title(name: str) -> str:
    """A1111's checkpoint title, `name [hash]`, from a catalogue name (the hash names the entry only)."""
    return f"{name} [{hashlib.sha256(name.encode()).hexdigest()[:10]}]"


def model_from_title(title: str) -> str:
    """The catalogue name in an A1111 title (`name [hash]`) or a bare name."""
    name = title.strip()
    if name.endswith("]") and " [" in name:
        name = name[:name.rindex(" [")]
    return name


def _number(body: Dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise invalid(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def generation_from_a1111(body: Any, model: Optional[str], img2img: bool) -> Tuple[GenerationRequest, int]:
    """(the request, how many images) of a txt2img or img2img body. Fields A1111 has and sdgate has
    no use for are ignored; fields that would change the image in ways sdgate cannot are refused."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object with at least a prompt")
    for name in UNSUPPORTED_TRUE:
        if body.get(name):
            raise invalid(name, "is not offered by sdgate; send it false or leave it out")
    if body.get("alwayson_scripts"):
        raise invalid("alwayson_scripts", "sdgate runs no A1111 extensions; leave it out")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise invalid("override_settings", "must be an object")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", body.get("clip_skip"))
    if clip_skip not in (None, 1):
        raise invalid("CLIP_stop_at_last_layers", f"{clip_skip!r}: sdgate uses the text encoder's last layer (1)")
    if overrides.get("sd_vae") not in (None, "", "Automatic", "None"):
        raise invalid("sd_vae", f"{overrides['sd_vae']!r}: each model renders with its own VAE; send Automatic")
    model = model_from_title(overrides["sd_model_checkpoint"]) if overrides.get("sd_model_checkpoint") else model
    batch_size, n_iter = _number(body, "batch_size", int, 1), _number(body, "n_iter", int, 1)
    count = batch_size * n_iter
    if not 1 <= batch_size or not 1 <= n_iter or count > MAX_IMAGES:
        raise invalid("batch_size", f"batch_size x n_iter is {count}; send 1 to {MAX_IMAGES} images per call")
    seed = _number(body, "seed", int, -1)
    prompt, loras = prompt_loras(body.get("prompt", ""))
    fields: Dict[str, Any] = {
        "prompt": prompt, "negative_prompt": body.get("negative_prompt") or "",
        "width": _number(body, "width", int), "height": _number(body, "height", int),
        "steps": _number(body, "steps", int), "guidance_scale": _number(body, "cfg_scale", float),
        "seed": None if seed == -1 else seed,  # A1111's "random": here, the seed sdgate derives from the prompt
        "scheduler": scheduler_for(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler")),
        "model": model,
    }
    if loras:
        fields["loras"] = loras
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise invalid("init_images", "send a list of exactly one base64 image (sdgate starts from one)")
        fields["init_image"] = images[0]
        if body.get("mask"):
            fields["mask"] = body["mask"]
        fields["strength"] = _number(body, "denoising_strength", float, 0.75)
    try:
        return GenerationRequest.from_dict(fields), count
    except InvalidRequest as exc:
        name = {"guidance_scale": "cfg_scale", "init_image": "init_images", "strength": "denoising_strength",
                "scheduler": "sampler_name"}.get(exc.field, exc.field)
        raise invalid(name, exc.message) from None


def prompt_loras(prompt: Any) -> Tuple[Any, List[Dict[str, Any]]]:
    """A1111's `<lora:name:weight>` tags taken out of a prompt: (the prompt without them, the LoRAs)."""
    if not isinstance(prompt, str):
        return prompt, []
    loras = []
    for match in LORA_TAG.finditer(prompt):
        try:
            weight = float(match.group(2)) if match.group(2) else 1.0
        except ValueError:
            raise invalid("prompt", f"{match.group(0)!r}: a LoRA tag is <lora:name:weight>, the weight a number") from None
        loras.append({"name": match.group(1).strip(), "weight": weight})
    return LORA_TAG.sub(" ", prompt).strip(), loras


def info_text(requests: List[GenerationRequest], body: Dict[str, Any], infotexts: List[str]) -> str:
    """A1111's `info`: a JSON string of how the images were made."""
    first = requests[0]
    sampler = next((name for name, (scheduler, _) in SAMPLERS.items() if scheduler == first.scheduler), first.scheduler)
    return json.dumps({
        "prompt": first.prompt, "all_prompts": [r.prompt for r in requests],
        "negative_prompt": first.negative_prompt, "all_negative_prompts": [r.negative_prompt for r in requests],
        "seed": first.seed, "all_seeds": [r.seed for r in requests], "subseed": first.seed,
        "all_subseeds": [r.seed for r in requests], "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": sampler, "cfg_scale": first.guidance_scale,
        "steps": first.steps, "batch_size": body.get("batch_size", 1), "restore_faces": False,
        "sd_model_name": first.model, "sd_model_hash": model_title(first.model)[-11:-1],
        "denoising_strength": first.strength, "clip_skip": 1, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": False,
    })


class A1111Api:
    """The A1111 routes of one gateway replica (`gateway`: serve_app.gateway.Gateway)."""

    def __init__(self, gateway: Any):
        self.gateway = gateway
        self.front = gateway.front
        self.redis: redis.Redis = gateway.front.redis

    # -- who asks ----------------------------------------------------------------------------------

    def _caller(self, request: Request) -> Tuple[Tenant, str, str]:
        """(tenant, client address, caller): whose options, progress and interrupt these are."""
        try:
            tenant = self.gateway.admission.authenticate(credential(request))
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            raise _from_protocol(exc) from None
        client = client_of(self.gateway.admission, request)
        return tenant, client, tenant.limit_key(client)

    async def _answer(self, request: Request, handler: Callable[..., Any]) -> Response:
        try:
            tenant, client, caller = self._caller(request)
            answer = await handler(request, tenant, client, caller)
        except A1111Error as exc:
            return exc.response()
        except ProtocolError as exc:
            return _from_protocol(exc).response()
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    async def _json_body(self, request: Request) -> Any:
        body = await bounded_body(request)
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid("body", f"is not valid JSON: {exc}") from None

    # -- options -------------------------------------------------------------------------------------

    def _options(self, caller: str) -> Dict[str, Any]:
        stored = {k.decode(): json.loads(v) for k, v in self.redis.hgetall(redis_keys.A1111_OPTIONS + caller).items()}
        model = stored.get("sd_model_checkpoint") or self.front.catalogue.catalogue.default
        return dict(stored, sd_model_checkpoint=model_title(model), sd_checkpoint_hash=model_title(model)[-11:-1],
                    show_progress_every_n_steps=stored.get("show_progress_every_n_steps", DEFAULT_PREVIEW_EVERY),
                    samples_format="png", CLIP_stop_at_last_layers=1, sd_vae="Automatic")

    async def options(self, request: Request) -> Response:
        async def get(request, tenant, client, caller):
            return await asyncio.to_thread(self._options, caller)
        return await self._answer(request, get)

    async def set_options(self, request: Request) -> Response:
        """Options for this caller only: `sd_model_checkpoint` becomes its default model (never
        everyone's); the rest are kept and echoed (show_progress_every_n_steps sets its previews)."""
        async def post(request, tenant, client, caller):
            body = await self._json_body(request)
            if not isinstance(body, dict) or len(body) > MAX_OPTIONS * 4:
                raise invalid("body", f"must be an object of at most {MAX_OPTIONS * 4} options")
            changes: Dict[str, str] = {}
            if "sd_model_checkpoint" in body:
                title = body["sd_model_checkpoint"]
                if not isinstance(title, str):
                    raise invalid("sd_model_checkpoint", "must be a checkpoint title from /sdapi/v1/sd-models")
                name = model_from_title(title)
                if name:
                    self.front.catalogue.entry(name)  # invalid_request listing the models
                changes["sd_model_checkpoint"] = json.dumps(name)
            every = body.get("show_progress_every_n_steps")
            if every is not None:
                if isinstance(every, bool) or not isinstance(every, int) or not -1 <= every <= protocol.MAX_PREVIEWS:
                    raise invalid("show_progress_every_n_steps", f"must be an integer -1..{protocol.MAX_PREVIEWS}")
                changes["show_progress_every_n_steps"] = json.dumps(every)
            if changes:
                def save():
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.hset(redis_keys.A1111_OPTIONS + caller, mapping=changes)
                    pipe.expire(redis_keys.A1111_OPTIONS + caller, 30 * 86400)
                    pipe.execute()
                await asyncio.to_thread(save)
            return None  # A1111 answers null
        return await self._answer(request, post)

    # -- the catalogue, as A1111 lists it -----------------------------------------------------------

    async def sd_models(self, request: Request) -> Response:
        async def listing(request, tenant, client, caller):
            return [{"title": model_title(entry.name), "model_name": entry.name, "hash": model_title(entry.name)[-11:-1],
                     "sha256": hashlib.sha256(entry.name.encode()).hexdigest(), "filename": entry.source,
                     "config": entry.config} for entry in self.front.catalogue.catalogue.models]
        return await self._answer(request, listing)

    async def samplers(self, request: Request) -> Response:
        async def listing(request, tenant, client, caller):
            return [{"name": name, "aliases": list(aliases), "options": {}} for name, (_, aliases) in SAMPLERS.items()]
        return await self._answer(request, listing)

    async def schedulers(self, request: Request) -> Response:
        async def listing(request, tenant, client, caller):
            return [{"name": name, "label": name.title(), "aliases": None, "default_rho": -1,
                     "need_inner_model": False} for name in SCHEDULES]
        return await self._answer(request, listing)

    async def upscalers(self, request: Request) -> Response:
        async def listing(request, tenant, client, caller):  # SillyTavern reads [0] as "None"
            return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]
        return await self._answer(request, listing)

    async def empty_list(self, request: Request) -> Response:
        """sd-vae, sd-modules, latent-upscale-modes, loras: each model brings its own VAE; nothing else."""
        async def listing(request, tenant, client, caller):
            return []
        return await self._answer(request, listing)

    # -- generation ---------------------------------------------------------------------------------

    async def txt2img(self, request: Request) -> Response:
        return await self._answer(request, lambda *args: self._generate(*args, img2img=False))

    async def img2img(self, request: Request) -> Response:
        return await self._answer(request, lambda *args: self._generate(*args, img2img=True))

    async def _generate(self, request: Request, tenant: Tenant, client: str, caller: str, img2img: bool) -> Any:
        self.gateway.admission.check_rate(client, tenant)
        body = await self._json_body(request)
        options = await asyncio.to_thread(self._options, caller)
        generation, count = generation_from_a1111(body, model_from_title(options["sd_model_checkpoint"]), img2img)
        every = options.get("show_progress_every_n_steps") or 0
        first = await self.front.prepare(generation)
        seeds = [(first.seed + i) % (protocol.MAX_SEED + 1) for i in range(count)]
        waiters = ["a1111-" + uuid.uuid4().hex for _ in seeds]
        work = _Work(self.redis, caller, waiters, first.steps)
        await asyncio.to_thread(work.start)
        watch = asyncio.get_running_loop().create_task(self._watch_interrupts(waiters))
        try:
            outcomes = await asyncio.gather(*(
                self.front.generate_async(_with_seed(generation, seed), client=client, tenant=tenant,
                                          waiter_id=waiter, previews=max(0, every),
                                          on_event=work.listener(waiter))
                for seed, waiter in zip(seeds, waiters)), return_exceptions=True)
        finally:
            watch.cancel()
            await asyncio.to_thread(work.finish)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        interrupted = bool(failures) and all(isinstance(f, ProtocolError) and f.code == protocol.E_CANCELLED
                                             for f in failures)
        if failures and not interrupted:
            raise failures[0] if isinstance(failures[0], ProtocolError) else ProtocolError(
                protocol.E_INTERNAL, f"generation failed: {failures[0]}")
        done = [(seed, o) for seed, o in zip(seeds, outcomes) if not isinstance(o, BaseException)]
        rendered = [_with_seed(first, seed) for seed, _ in done] or [first]
        infotexts = [_parameters(answer.png) for _, answer in done]
        return {"images": [base64.b64encode(answer.png).decode("ascii") for _, answer in done],
                "parameters": {k: v for k, v in body.items() if k not in ("init_images", "mask", "auth")},
                "info": info_text(rendered, body, infotexts)}

    async def _watch_interrupts(self, waiters: List[str]) -> None:
        """Apply an /interrupt that reached another replica to the waiters running here."""
        keys = [redis_keys.A1111_INTERRUPT + waiter for waiter in waiters]
        while True:
            await asyncio.sleep(INTERRUPT_POLL_S)
            try:
                flags = await asyncio.to_thread(self.redis.mget, keys)
            except redis.RedisError:
                continue
            for waiter, flag in zip(waiters, flags):
                if flag:
                    self.front.cancel(waiter)

    # -- the caller's own work ------------------------------------------------------------------------

    async def progress(self, request: Request) -> Response:
        async def read(request, tenant, client, caller):
            skip_image = request.query_params.get("skip_current_image", "false").lower() == "true"
            return await asyncio.to_thread(progress_of, self.redis, caller, skip_image)
        return await self._answer(request, read)

    async def interrupt(self, request: Request) -> Response:
        """Stop this caller's work, nobody else's: each of its waiters leaves (a task stops once
        nobody else waits for it); waiters on other replicas are told through Redis."""
        async def stop(request, tenant, client, caller):
            entries = await asyncio.to_thread(self.redis.hgetall, redis_keys.A1111_WORK + caller)
            remote = [waiter.decode() for waiter in entries if not self.front.cancel(waiter.decode())]
            if remote:
                def tell():
                    pipe = self.redis.pipeline(transaction=False)
                    for waiter in remote:
                        pipe.set(redis_keys.A1111_INTERRUPT + waiter, "1", ex=WORK_TTL_S)
                    pipe.execute()
                await asyncio.to_thread(tell)
            return None
        return await self._answer(request, stop)


def _with_seed(request: GenerationRequest, seed: int) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(request, seed=seed)


def _parameters(png: bytes) -> str:
    """The PNG's A1111 `parameters` text chunk (the worker writes it), or ""."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.info.get("parameters", "")


class _Work:
    """One A1111 call's images in the caller's work hash: what /progress reads, /interrupt stops."""

    def __init__(self, client: redis.Redis, caller: str, waiters: List[str], steps: int):
        self.redis, self.key, self.waiters, self.steps = client, redis_keys.A1111_WORK + caller, waiters, steps
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")  # shown as A1111 shows it, never compared

    def _entry(self, **fields: Any) -> str:
        return json.dumps(dict({"state": "queued", "step": 0, "steps": self.steps, "job_timestamp": self.job_timestamp},
                               **fields))

    def start(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key, mapping={waiter: self._entry() for waiter in self.waiters})
        pipe.expire(self.key, WORK_TTL_S)
        pipe.execute()

    def finish(self) -> None:
        self.redis.hdel(self.key, *self.waiters)

    def listener(self, waiter: str) -> Callable[[Dict[str, Any]], None]:
        """The waiter's on_event: its step and preview written for /progress (off the loop)."""
        loop = asyncio.get_running_loop()

        def on_event(event: Dict[str, Any]) -> None:
            entry = self._entry(state=event.get("state") or "queued", step=event.get("step") or 0,
                                steps=event.get("steps") or self.steps, preview=event.get("preview"),
                                eta_s=event.get("eta_s"))
            loop.run_in_executor(None, self._write, waiter, entry)

        return on_event

    def _write(self, waiter: str, entry: str) -> None:
        try:  # only while the entry exists: a late event must not bring back finished work
            self.redis.eval(_UPDATE_EXISTING, 1, self.key, waiter, entry, WORK_TTL_S)
        except redis.RedisError as exc:
            log.debug("A1111 progress write failed: %s", exc)


_UPDATE_EXISTING = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
"""


def progress_of(client: redis.Redis, caller: str, skip_image: bool = False) -> Dict[str, Any]:
    """A1111's /progress for one caller: its images in flight (job_count), the share of their steps
    done, and the newest preview of the one being rendered."""
    entries = [json.loads(raw) for raw in client.hgetall(redis_keys.A1111_WORK + caller).values()]
    idle = {"progress": 0, "eta_relative": 0, "current_image": None, "textinfo": None,
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                      "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
    if not entries:
        return idle
    steps = sum(max(1, e.get("steps") or 1) for e in entries)
    done = sum(min(e.get("step") or 0, e.get("steps") or 0) for e in entries)
    current = max(entries, key=lambda e: (e.get("state") == "generating", e.get("step") or 0))
    # The workers' own estimates (queue position and step times, from Redis): no replica's clock
    # is compared with another's.
    eta = max((e.get("eta_s") or 0.0) for e in entries)
    return {"progress": round(done / steps, 4), "eta_relative": round(max(0.0, eta), 2),
            "current_image": None if skip_image else current.get("preview"), "textinfo": None,
            "state": {"skipped": False, "interrupted": False, "job": "txt2img", "job_count": len(entries),
                      "job_timestamp": current.get("job_timestamp") or "0",
                      "job_no": 0, "sampling_step": current.get("step") or 0,
                      "sampling_steps": current.get("steps") or 0}}


# (path, Gateway method, methods, A1111Api method): both HTTP ports serve them (serve_app/gateway.py).
ROUTES_TO = [
    ("/sdapi/v1/txt2img", "a1111_txt2img", ["POST"], "txt2img"),
    ("/sdapi/v1/img2img", "a1111_img2img", ["POST"], "img2img"),
    ("/sdapi/v1/progress", "a1111_progress", ["GET"], "progress"),
    ("/sdapi/v1/interrupt", "a1111_interrupt", ["POST"], "interrupt"),
    ("/sdapi/v1/options", "a1111_options", ["GET"], "options"),
    ("/sdapi/v1/options", "a1111_set_options", ["POST"], "set_options"),
    ("/sdapi/v1/sd-models", "a1111_sd_models", ["GET"], "sd_models"),
    ("/sdapi/v1/samplers", "a1111_samplers", ["GET"], "samplers"),
    ("/sdapi/v1/schedulers", "a1111_schedulers", ["GET"], "schedulers"),
    ("/sdapi/v1/upscalers", "a1111_upscalers", ["GET"], "upscalers"),
    ("/sdapi/v1/sd-vae", "a1111_sd_vae", ["GET"], "empty_list"),
    ("/sdapi/v1/sd-modules", "a1111_sd_modules", ["GET"], "empty_list"),
    ("/sdapi/v1/latent-upscale-modes", "a1111_latent_upscale_modes", ["GET"], "empty_list"),
    ("/sdapi/v1/loras", "a1111_loras", ["GET"], "empty_list"),
]
ROUTES = [(path, name, methods) for path, name, methods, _ in ROUTES_TO]


def gateway_method(name: str, target: str) -> Callable[..., Any]:
    """A Gateway method `name` that hands the request to A1111Api.`target` (Serve's ingress finds
    a class's routes by qualified name, so it is named as Gateway's own)."""
    async def route(self, request: Request) -> Response:
        return await getattr(self.a1111, target)(request)

    route.__name__, route.__qualname__ = name, f"Gateway.{name}"
    route.__annotations__ = {"request": Request, "return": Response}  # types, not this module's strings, for FastAPI
    return route
