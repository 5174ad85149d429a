"""The clients people already run, unchanged, against the shared stack (one tiny worker, auth on):
the `webuiapi` A1111 client, the exact requests Open WebUI and SillyTavern send, the `openai` SDK's
generations and edits, and bad init images while a well-behaved client is served."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import struct
import threading
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any, Dict, Optional, Tuple

import pytest
import redis
from PIL import Image

from client import protocol
from client.protocol import GenerationRequest
from celery_bridge import redis_keys
from serve_app.a1111_api import model_title
from serve_app.tenants import Tenant, TenantRegistry
from tests.integration.harness import ask, wait_for

pytestmark = pytest.mark.integration
TOKEN = "clients-operator-token"
URL_TTL_S = 5
RUN = uuid.uuid4().hex[:6]
TINY = model_title("tiny")


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack.with_gateway(auth_token=TOKEN, image_url_ttl_s=URL_TTL_S)


@pytest.fixture(scope="module")
def registry(stack):
    return TenantRegistry(redis.Redis.from_url(stack.redis_url, socket_timeout=5))


def new_key(registry: TenantRegistry, name: str) -> str:
    return registry.add(Tenant(f"{name}-{RUN}-{uuid.uuid4().hex[:4]}"))


def png_of(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def init_png(colour=(200, 30, 30), size=(64, 64)) -> bytes:
    return png_of(Image.new("RGB", size, colour))


def call(stack, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
         port: Optional[int] = None, raw: Optional[bytes] = None) -> Tuple[int, Any]:
    """(status, JSON or bytes) of one HTTP call; the fast port unless `port`."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port or stack.gateway.fast_http_port}{path}", data=data,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            payload, status, kind = response.read(), response.status, response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        payload, status, kind = error.read(), error.code, error.headers.get("content-type", "")
    return status, json.loads(payload) if "json" in kind else payload


def basic(key: str, user: str = "user") -> Dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# -- webuiapi, unchanged ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def webui(stack, registry):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=stack.gateway.fast_http_port, username="me",
                             password=new_key(registry, "webui"), sampler="Euler a", steps=4)


def test_webuiapi_txt2img_img2img_and_model_names_with_basic_auth(webui):
    assert TINY in webui.util_get_model_names()
    result = webui.txt2img(prompt=f"a red fox {RUN}", width=64, height=64, steps=4, seed=41, batch_size=2,
                           cfg_scale=7)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [41, 42] and result.info["seed"] == 41
    assert result.info["sampler_name"] == "Euler a" and result.info["sd_model_name"] == "tiny"
    assert {"prompt", "steps", "cfg_scale", "width", "height", "seed"} <= set(result.info)
    assert result.images[0].tobytes() != result.images[1].tobytes()
    edited = webui.img2img(images=[result.images[0]], prompt=f"a red fox {RUN}", denoising_strength=0.5,
                           steps=4, seed=7, width=64, height=64)
    assert len(edited.images) == 1 and edited.images[0].size == (64, 64)
    assert edited.info["denoising_strength"] == 0.5
    assert edited.images[0].tobytes() != result.images[0].tobytes()


def test_a_wrong_basic_auth_key_is_refused(stack):
    status, body = call(stack, "GET", "/sdapi/v1/sd-models", headers=basic("not-a-key"))
    assert status == 401 and body["error"] == protocol.E_UNAUTHORIZED


def long_body(prompt: str) -> Dict[str, Any]:
    return {"prompt": prompt, "width": 512, "height": 512, "steps": 150, "sampler_name": "Euler"}


def test_progress_and_interrupt_are_the_callers_own(stack, registry):
    import webuiapi

    mine, theirs = new_key(registry, "painter"), new_key(registry, "bystander")
    painter = webuiapi.WebUIApi(host="127.0.0.1", port=stack.gateway.fast_http_port, username="me", password=mine)
    painter.set_options({"show_progress_every_n_steps": 1})
    assert painter.get_options()["show_progress_every_n_steps"] == 1
    outcome: Dict[str, Any] = {}

    def render(key: str, body: Dict[str, Any], slot: str) -> None:
        outcome[slot] = call(stack, "POST", "/sdapi/v1/txt2img", body, basic(key))

    long = threading.Thread(target=render, args=(mine, long_body(f"a long night {RUN}"), "long"))
    long.start()
    progress = wait_for(lambda: (lambda p: p if p["state"]["sampling_step"] >= 1 and p["current_image"] else None)(
        painter.get_progress()), 120, "the long render's progress")
    assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1
    assert progress["state"]["sampling_steps"] == 150
    decoded(progress["current_image"]).verify()  # a preview, as A1111 sends current_image
    idle = call(stack, "GET", "/sdapi/v1/progress", headers=basic(theirs))[1]
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0  # what SillyTavern polls for
    assert call(stack, "POST", "/sdapi/v1/interrupt", headers=basic(theirs))[0] == 200  # stops nothing of mine
    assert long.is_alive() and painter.get_progress()["state"]["job_count"] == 1
    short = threading.Thread(target=render, args=(theirs, {"prompt": f"a short day {RUN}", "steps": 4}, "short"))
    short.start()
    wait_for(lambda: call(stack, "GET", "/sdapi/v1/progress", headers=basic(theirs))[1]["state"]["job_count"] == 1,
             30, "the bystander's request in flight")
    painter.interrupt()
    long.join(60)
    short.join(120)
    assert not long.is_alive() and not short.is_alive()
    status, body = outcome["long"]
    assert status == 200 and body["images"] == []  # interrupted before its image existed
    wait_for(lambda: painter.get_progress()["state"]["job_count"] == 0, 10, "the interrupted work gone from progress")
    status, body = outcome["short"]  # my interrupt stopped nothing of the bystander's
    assert status == 200 and len(body["images"]) == 1


def test_the_default_model_is_set_per_caller_and_unknown_names_are_refused(stack, registry):
    one, other = new_key(registry, "one"), new_key(registry, "other")
    assert call(stack, "GET", "/sdapi/v1/options", headers=basic(one))[1]["sd_model_checkpoint"] == TINY
    status, body = call(stack, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "no-such-model [0]"}, basic(one))
    assert status == 422 and body["field"] == "model" and "tiny" in body["detail"]
    assert call(stack, "POST", "/sdapi/v1/options", {"show_progress_every_n_steps": 3}, basic(one))[0] == 200
    assert call(stack, "GET", "/sdapi/v1/options", headers=basic(one))[1]["show_progress_every_n_steps"] == 3
    assert call(stack, "GET", "/sdapi/v1/options", headers=basic(other))[1]["show_progress_every_n_steps"] == 10
    status, body = call(stack, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "override_settings": {
        "sd_model_checkpoint": "elsewhere [1]"}}, basic(one))
    assert status == 422 and "elsewhere" in body["detail"]


@pytest.mark.parametrize("body, field", [
    ({"sampler_name": "Heun++ 9000"}, "sampler_name"),
    ({"scheduler": "karras"}, "scheduler"),
    ({"enable_hr": True}, "enable_hr"),
    ({"cfg_scale": "high"}, "cfg_scale"),
    ({"batch_size": 20}, "batch_size"),
])
def test_what_a1111_would_refuse_is_a_clear_422(stack, body, field):
    status, answer = call(stack, "POST", "/sdapi/v1/txt2img", dict({"prompt": "x", "steps": 2}, **body),
                          basic(TOKEN))
    assert status == 422 and answer["field"] == field and answer["detail"].startswith(field)


# -- the exact requests of Open WebUI and SillyTavern -------------------------------------------------
# Shapes from open-webui/open-webui backend/open_webui/routers/images.py (02530d50) and SillyTavern
# src/endpoints/stable-diffusion.js (02903fdd) with public/scripts/extensions/stable-diffusion/index.js
# (7a497421): both send Basic auth always (empty when unset), Open WebUI in a lowercase header.

def test_open_webui_a1111_calls(stack):
    auth = basic(TOKEN)
    assert call(stack, "GET", "/sdapi/v1/options", headers=auth)[0] == 200  # "verify URL"
    models = call(stack, "GET", "/sdapi/v1/sd-models", headers=auth)[1]
    assert [{"id": m["title"], "name": m["model_name"]} for m in models][0] == {"id": TINY, "name": "tiny"}
    options = call(stack, "GET", "/sdapi/v1/options", headers=auth)[1]
    options["sd_model_checkpoint"] = TINY  # it posts back the whole dict it read
    assert call(stack, "POST", "/sdapi/v1/options", options, dict(auth, **{"content-type": "application/json"}))[0] == 200
    assert call(stack, "POST", "/sdapi/v1/options", dict(options, sd_model_checkpoint=""), auth)[0] == 200  # on save
    data = {"prompt": f"a cat {RUN}", "batch_size": 1, "width": 64, "height": 64, "steps": 4,
            "negative_prompt": "blurry"}
    status, res = call(stack, "POST", "/sdapi/v1/txt2img", data, dict(auth, **{"content-type": "application/json"}))
    assert status == 200 and isinstance(res["info"], str) and "," not in res["images"][0][:40]
    assert decoded(res["images"][0]).format == "PNG"


def test_sillytavern_a1111_calls(stack):
    auth = {"Authorization": basic(TOKEN)["authorization"], "Content-Type": "application/json"}
    get = lambda path: call(stack, "GET", path, headers=auth)  # noqa: E731
    assert get("/sdapi/v1/options")[0] == 200  # ping
    assert get("/sdapi/v1/options")[1]["sd_model_checkpoint"] in [m["title"] for m in get("/sdapi/v1/sd-models")[1]]
    upscalers, latent = get("/sdapi/v1/upscalers"), get("/sdapi/v1/latent-upscale-modes")
    assert upscalers[0] == latent[0] == 200 and upscalers[1][0]["name"] == "None"
    samplers = [s["name"] for s in get("/sdapi/v1/samplers")[1]]
    assert {"DDIM", "Euler a", "Euler", "DPM++ 2M"} <= set(samplers)
    assert "normal" in [s["name"] for s in get("/sdapi/v1/schedulers")[1]]
    for path in ("/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules"):
        status, items = get(path)
        assert status == 200 and isinstance(items, list) and all("model_name" in i for i in items)
    assert call(stack, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": TINY}, auth)[0] == 200  # set-model
    progress = get("/sdapi/v1/progress")[1]
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert type(progress["progress"]) in (int, float) and type(progress["state"]["job_count"]) is int
    assert "forge_preset" not in get("/sdapi/v1/options")[1]
    body = {"url": f"http://127.0.0.1:{stack.gateway.fast_http_port}", "auth": f"user:{TOKEN}",
            "prompt": f"a lighthouse {RUN}", "negative_prompt": "blurry", "sampler_name": "DDIM", "scheduler": "normal",
            "steps": 4, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 1.0, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 12, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    status, res = call(stack, "POST", "/sdapi/v1/txt2img", body, auth)
    assert status == 200 and decoded(res["images"][0]).size == (64, 64)
    assert "auth" not in res["parameters"]  # the plaintext credentials it forwards are not echoed
    status, _ = call(stack, "POST", "/sdapi/v1/interrupt", headers={"Authorization": auth["Authorization"]})
    assert status == 200  # no body, no content type: fire and forget


def test_the_a1111_api_answers_on_serves_port_too(stack):
    status, models = call(stack, "GET", "/sdapi/v1/sd-models", headers=basic(TOKEN), port=stack.gateway.http_port)
    assert status == 200 and models[0]["title"] == TINY


# -- the openai SDK ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{stack.gateway.fast_http_port}/v1", api_key=TOKEN, max_retries=0)


def sdgate_meta(response) -> Dict[str, Any]:
    return response.model_extra["sdgate"]


def test_n_gives_different_images_whose_repeat_is_all_cache_hits(openai_client):
    ask_for = dict(prompt=f"three owls {RUN}", n=3, size="64x64", response_format="b64_json",
                   extra_body={"steps": 4})
    first = openai_client.images.generate(**ask_for)
    assert len({item.b64_json for item in first.data}) == 3
    metas = sdgate_meta(first)["images"]
    assert len({m["key"] for m in metas}) == 3 and [m["seed"] - metas[0]["seed"] for m in metas] == [0, 1, 2]
    again = openai_client.images.generate(**ask_for)
    assert [item.b64_json for item in again.data] == [item.b64_json for item in first.data]
    assert all(m["cached"] for m in sdgate_meta(again)["images"])


def test_an_image_url_serves_the_png_without_the_key_until_it_expires(stack, openai_client):
    answer = openai_client.images.generate(prompt=f"a lantern {RUN}", size="64x64", response_format="url",
                                           extra_body={"steps": 2})
    url = answer.data[0].url
    with urllib.request.urlopen(url, timeout=10) as response:  # no Authorization header
        assert response.read().startswith(b"\x89PNG")
    key = sdgate_meta(answer)["key"]
    assert call(stack, "GET", f"/v1/images/{key}.png")[0] == 401  # without the signature, the key is needed
    tampered = url.replace("expires=", "expires=9")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=10)
    assert refused.value.code == 403
    wait_for(lambda: _status(url) == 403, URL_TTL_S + 30, "the URL to expire")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_url_signed_with_another_secret_or_a_past_expiry_is_refused(stack):
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    secret = bytes.fromhex(client.get(redis_keys.URL_SECRET).decode())
    key = hashlib.sha256(b"any image").hexdigest()
    past = int(client.time()[0]) - 1
    signature = hmac.new(secret, f"{key}.{past}".encode(), hashlib.sha256).hexdigest()
    assert call(stack, "GET", f"/v1/images/{key}.png?expires={past}&signature={signature}")[0] == 403
    future = past + 60
    forged = hmac.new(b"other", f"{key}.{future}".encode(), hashlib.sha256).hexdigest()
    assert call(stack, "GET", f"/v1/images/{key}.png?expires={future}&signature={forged}")[0] == 403
    good = hmac.new(secret, f"{key}.{future}".encode(), hashlib.sha256).hexdigest()
    assert call(stack, "GET", f"/v1/images/{key}.png?expires={future}&signature={good}")[0] == 404  # valid, not cached


def test_images_edit_with_and_without_a_mask(openai_client):
    init = init_png((30, 160, 40))
    plain = openai_client.images.edit(image=("init.png", init, "image/png"), prompt=f"a garden {RUN}", n=1,
                                      extra_body={"steps": 4})
    assert decoded(plain.data[0].b64_json).size == (64, 64)  # the init image's own size
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI's mask: transparent where to edit
    masked = openai_client.images.edit(image=("init.png", init, "image/png"), mask=("mask.png", png_of(mask),
                                       "image/png"), prompt=f"a garden {RUN}", size="64x64", extra_body={"steps": 4})
    assert masked.data[0].b64_json != plain.data[0].b64_json
    assert sdgate_meta(masked)["key"] != sdgate_meta(plain)["key"]


def test_the_same_init_image_is_a_hit_and_another_is_a_miss(openai_client):
    def edit(colour):
        return openai_client.images.edit(image=("i.png", init_png(colour), "image/png"), prompt=f"a pond {RUN}",
                                         extra_body={"steps": 4, "strength": 0.5})
    first, same, other = edit((1, 2, 3)), edit((1, 2, 3)), edit((3, 2, 1))
    assert not sdgate_meta(first)["cached"] and sdgate_meta(same)["cached"]
    assert not sdgate_meta(other)["cached"] and other.data[0].b64_json != first.data[0].b64_json


def test_img2img_over_the_socket_protocol(stack):
    big = png_of(Image.effect_noise((512, 512), 90).convert("RGB"))  # ~800 KB: far over the old 16 KB frame
    reply = ask(stack, GenerationRequest(f"static {RUN}", init_image=big, strength=0.5, steps=4), token=TOKEN)
    assert Image.open(io.BytesIO(reply.png)).size == (512, 512)
    assert reply.meta["params"]["init_image_sha256"] == hashlib.sha256(big).hexdigest()


# -- bad images, while a well-behaved client is served -------------------------------------------------

def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height pixels, with one tiny IDAT: never to be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


BAD_IMAGES = {
    "not an image": ({"init_image": base64.b64encode(b"GIF89a" + b"\x00" * 64).decode()}, "init_image", "not a PNG"),
    "truncated": ({"init_image": base64.b64encode(init_png()[:60]).decode()}, "init_image", "could not be decoded"),
    "bomb": ({"init_image": base64.b64encode(png_bomb()).decode()}, "init_image", "pixels"),
    "mask of another size": ({"init_image": base64.b64encode(init_png()).decode(),
                              "mask": base64.b64encode(init_png(size=(32, 32))).decode()}, "mask", "32x32"),
    "bad base64": ({"init_image": "%%%"}, "init_image", "base64"),
    "strength without image": ({"strength": 0.5}, "strength", "init_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_each_bad_image_is_refused_naming_its_field_while_others_are_served(stack, case):
    fields, field, words = BAD_IMAGES[case]
    served: Dict[str, Any] = {}
    good = threading.Thread(target=lambda: served.update(reply=ask(
        stack, GenerationRequest(f"a calm sea {case} {RUN}", steps=2), token=TOKEN)))
    good.start()
    status, body = call(stack, "POST", "/v1/images/generations", dict({"prompt": "x", "steps": 2}, **fields),
                        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert status == 400 and body["error"]["param"] == field and words in body["error"]["message"]
    status, body = call(stack, "POST", "/sdapi/v1/img2img", {"prompt": "x", "steps": 2, "init_images": [
        fields.get("init_image", "")], **({"mask": fields["mask"]} if "mask" in fields else {})}, basic(TOKEN))
    assert status == 422
    good.join(120)
    assert served["reply"].png.startswith(b"\x89PNG")


def test_an_image_over_the_byte_cap_is_refused_naming_its_field(stack):
    status, body = call(stack, "POST", "/v1/images/generations", {
        "prompt": "x", "init_image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * protocol.MAX_IMAGE_BYTES).decode()},
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert status == 400 and body["error"]["param"] == "init_image" and "limit" in body["error"]["message"]
