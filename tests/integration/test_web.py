"""The web page in real headless Chromium (Debian's package, driven by Playwright) against a real
stack: type a prompt, press Generate, watch the progress, get the image (the API's bytes for the
same request), find it in the gallery after a reload; the same with auth on. Plus the image and
gallery routes over HTTP on both ports. img2img from the page: an init image picked or dropped, a
strength set with the keyboard, what the POST carried and what came back; "Use as init" on a result
and on a gallery entry; the client's own refusals and the server's 400 shown beside the field.

Which assertions depend on the jobs API (`POST /v1/jobs`, probed over HTTP): with it, the progress
bar must show a fraction below 1 before it reaches 1; without it (the page falls back to
`POST /v1/images/generations`), the bar must have been indeterminate. Everything else holds either way.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional, Tuple

import pytest


pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-token-1"
RENDER_TIMEOUT_MS = 120_000


def http(url: str, body: Optional[dict] = None, token: Optional[str] = None,
         headers: Optional[dict] = None) -> Tuple[int, Any, bytes]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers=dict(headers or {}, **({"Content-Type": "application/json"} if body
                                                                    is not None else {})))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def has_jobs_api(base: str, token: Optional[str]) -> bool:
    """Whether the gateway has the jobs routes: a body without a prompt is 400 there, 404/405 without them."""
    return http(f"{base}/v1/jobs", {}, token)[0] not in (404, 405)


@pytest.fixture(scope="module")
def playwright_browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def image_bytes(page, element_id: str = "image") -> bytes:
    """The bytes behind an <img>'s blob: or data: URL (the result image by default), as the browser holds them."""
    encoded = page.evaluate("""async (id) => {
        const buffer = new Uint8Array(await (await fetch(document.getElementById(id).src)).arrayBuffer());
        let text = '';
        for (let i = 0; i < buffer.length; i += 8192) text += String.fromCharCode(...buffer.subarray(i, i + 8192));
        return btoa(text);
    }""", element_id)
    return base64.b64decode(encoded)


def png_of(width: int, height: int) -> bytes:
    """A PNG of a smooth gradient, `width` x `height`, to start an img2img from."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def posted_jobs(page) -> list:
    """The bodies of the page's POST /v1/jobs, as they left the browser (filled as they go)."""
    bodies: list = []
    page.on("request", lambda request: bodies.append(json.loads(request.post_data))
            if request.method == "POST" and request.url.endswith("/v1/jobs") else None)
    return bodies


def render(page, prompt: str) -> None:
    """Type `prompt`, press Generate, wait for the result image."""
    from playwright.sync_api import expect

    expect(page.locator("#model option")).not_to_have_count(0)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("img", name=f"Generated image: {prompt}")).to_be_visible(timeout=RENDER_TIMEOUT_MS)


def generate_and_check(page, base: str, token: Optional[str], keyboard: bool) -> str:
    """Type a new prompt, Generate, see progress then the image; its bytes are the API's. Returns the key."""
    from playwright.sync_api import expect

    prompt = f"a lighthouse in fog {uuid.uuid4().hex[:8]}"  # new: a miss, so there is progress to see
    expect(page.locator("#model option")).not_to_have_count(0)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    if keyboard:
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
    else:
        page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-box")).to_be_visible()
    result = page.get_by_role("img", name=re.compile(r"^Generated image"))
    expect(result).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    assert result.get_attribute("alt") == f"Generated image: {prompt}"

    # The progress bar: moved through a fraction with the jobs API, indeterminate without it.
    log = page.evaluate("window.sdgateProgressLog")
    if has_jobs_api(base, token):
        fractions = [value for value in log if value != "indeterminate"]
        assert fractions[-1] == 1 and min(fractions) < 1, log
    else:
        assert "indeterminate" in log and log[-1] == 1, log
    expect(page.locator("#progress-text")).to_contain_text("Done")

    # The same request through the API (a cache hit now) gives the same key and the same bytes.
    status, _, body = http(f"{base}/v1/images/generations", {"prompt": prompt}, token)
    assert status == 200, body[:300]
    answer = json.loads(body)
    key = answer["sdgate"]["key"]
    assert answer["sdgate"]["cached"] is True
    assert page.locator("#image").get_attribute("data-key") == key
    assert image_bytes(page) == base64.b64decode(answer["data"][0]["b64_json"])
    expect(page.locator("#params")).to_contain_text(prompt)
    expect(page.get_by_role("button", name="New seed")).to_be_visible()
    expect(page.get_by_role("link", name="Download")).to_have_attribute("download", re.compile(r"\.png$"))
    page.get_by_role("button", name="Copy boot command").click()
    command = page.locator("#command").input_value()
    assert command.startswith("python3 client/boot.py ")
    assert f"'{prompt}'" in command

    # After a reload the gallery shows it, newest first, with its image loaded.
    page.reload()
    first = page.locator("#gallery li").first
    expect(first).to_have_attribute("data-key", key)
    expect(first.locator("img")).to_have_attribute("src", re.compile(r"^blob:"))
    return key


# The session's shared stack, its gateway redeployed for each setting (tests/integration/harness.py).
@pytest.fixture(scope="class")
def open_stack(shared_stack):
    return shared_stack.with_gateway()


@pytest.fixture(scope="class")
def auth_stack(shared_stack):
    return shared_stack.with_gateway(auth_token=TOKEN)


class TestOpenStack:
    """No token; the page through Serve's proxy port (8000 in `sdgate up`)."""

    def test_prompt_to_image_to_gallery(self, open_stack, playwright_browser):
        stack = open_stack
        base = f"http://127.0.0.1:{stack.gateway.http_port}"
        context = playwright_browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        try:
            page.goto(base + "/")
            generate_and_check(page, base, None, keyboard=False)
            assert page.locator("#token-dialog").is_visible() is False
            # Load the first gallery entry back into the result panel, then check the narrow layout.
            page.locator("#gallery li button").first.click()
            page.get_by_role("img", name=re.compile(r"^Generated image")).wait_for()
            page.set_viewport_size({"width": 375, "height": 800})
            assert page.evaluate("document.scrollingElement.scrollWidth") <= 375  # no sideways scrolling
        finally:
            context.close()

    def test_init_image_and_strength_go_out_and_the_image_comes_back(self, open_stack, playwright_browser, tmp_path):
        from playwright.sync_api import expect

        base = f"http://127.0.0.1:{open_stack.gateway.http_port}"
        init = png_of(96, 80)  # not the model's 64x64: the output must take the image's size
        (tmp_path / "start.png").write_bytes(init)
        prompt = f"a watercolour harbour {uuid.uuid4().hex[:8]}"
        context = playwright_browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        try:
            posted = posted_jobs(page)
            page.goto(base + "/")
            expect(page.locator("#model option")).not_to_have_count(0)
            strength = page.get_by_label("Strength", exact=True)
            expect(strength).to_be_hidden()  # no init image, no slider
            page.get_by_label("Init image").set_input_files(str(tmp_path / "start.png"))
            expect(page.get_by_role("img", name="Init image: start.png")).to_be_visible()
            expect(page.locator("#init-name")).to_contain_text("96×80")
            assert image_bytes(page, "init-thumb") == init
            expect(strength).to_be_visible()
            expect(page.locator("#strength-value")).to_have_text("0.75")
            strength.focus()
            for _ in range(5):  # keyboard only: 0.75 -> 0.50
                strength.press("ArrowLeft")
            expect(page.locator("#strength-value")).to_have_text("0.50")
            assert page.get_by_label("Width", exact=True).input_value() == "" and page.get_by_label("Height", exact=True).input_value() == ""

            render(page, prompt)
            assert len(posted) == 1
            body = posted[0]
            assert body["init_image"].startswith("data:image/png;base64,")
            assert base64.b64decode(body["init_image"].split(",", 1)[1]) == init
            assert body["strength"] == 0.5 and body["prompt"] == prompt
            assert "width" not in body and "height" not in body
            size = page.evaluate("[document.getElementById('image').naturalWidth, "
                                 "document.getElementById('image').naturalHeight]")
            assert size == [96, 80]
            expect(page.locator("#params")).to_contain_text("strength")
            expect(page.locator("#params")).to_contain_text("init image")
            expect(page.get_by_role("button", name="Copy boot command")).to_be_hidden()  # boot.py sends no image

            # The same img2img through the Images API is a cache hit with the page's bytes: keyed by the image.
            status, _, answer = http(f"{base}/v1/images/generations", {
                "prompt": prompt, "init_image": base64.b64encode(init).decode(), "strength": 0.5})
            assert status == 200, answer[:300]
            answer = json.loads(answer)
            assert answer["sdgate"]["cached"] is True
            assert page.locator("#image").get_attribute("data-key") == answer["sdgate"]["key"]
            assert image_bytes(page) == base64.b64decode(answer["data"][0]["b64_json"])
        finally:
            context.close()

    def test_use_as_init_from_the_result_and_the_gallery(self, open_stack, playwright_browser):
        from playwright.sync_api import expect

        base = f"http://127.0.0.1:{open_stack.gateway.http_port}"
        prompt = f"a paper boat {uuid.uuid4().hex[:8]}"
        context = playwright_browser.new_context(viewport={"width": 375, "height": 800})
        page = context.new_page()
        try:
            page.goto(base + "/")
            render(page, prompt)
            result = image_bytes(page)
            key = page.locator("#image").get_attribute("data-key")
            thumb = page.locator("#init-thumb")
            page.get_by_role("button", name="Use as init", exact=True).click()
            expect(thumb).to_be_visible()
            expect(thumb).to_have_attribute("alt", f"Init image: sdgate-{key[:12]}.png")
            assert image_bytes(page, "init-thumb") == result
            assert page.evaluate("document.getElementById('init-file').files[0].name") == f"sdgate-{key[:12]}.png"
            expect(page.get_by_label("Strength", exact=True)).to_be_focused()  # the keyboard lands on what comes next
            assert page.evaluate("document.scrollingElement.scrollWidth") <= 375

            page.get_by_role("button", name="Remove init image").click()
            expect(thumb).to_be_hidden()
            expect(page.get_by_label("Strength", exact=True)).to_be_hidden()
            expect(page.get_by_label("Width", exact=True)).to_have_value("64")  # the model's size is back

            entry = page.locator("#gallery li").first
            expect(entry).to_have_attribute("data-key", key)
            entry.get_by_role("button", name=f"Use as init: {prompt}").click()
            expect(thumb).to_be_visible()
            assert image_bytes(page, "init-thumb") == result
        finally:
            context.close()


class TestAuthStack:
    """With a token; the page and the routes on the replicas' fast port."""

    def test_token_asked_once_and_kept(self, auth_stack, playwright_browser):
        from playwright.sync_api import expect

        stack = auth_stack
        base = f"http://127.0.0.1:{stack.gateway.fast_http_port}"
        context = playwright_browser.new_context(viewport={"width": 375, "height": 800})
        page = context.new_page()
        try:
            page.goto(base + "/")
            dialog = page.locator("#token-dialog")
            expect(dialog).to_be_visible()
            field = page.get_by_role("textbox", name="Token")
            field.fill(TOKEN)
            field.press("Enter")  # keyboard only
            expect(dialog).to_be_hidden()
            generate_and_check(page, base, TOKEN, keyboard=True)
            # The reload inside asked nothing: the token came from local storage.
            assert page.evaluate("localStorage.getItem('sdgate.token')") == TOKEN
            expect(dialog).to_be_hidden()
        finally:
            context.close()

    def test_image_and_gallery_routes_on_both_ports(self, auth_stack):
        stack = auth_stack
        prompt = f"gallery routes {uuid.uuid4().hex[:6]}"
        status, _, body = http(f"http://127.0.0.1:{stack.gateway.fast_http_port}/v1/images/generations",
                               {"prompt": prompt}, token=TOKEN)
        assert status == 200, body
        for port in (stack.gateway.fast_http_port, stack.gateway.http_port):
            base = f"http://127.0.0.1:{port}"
            assert http(f"{base}/v1/gallery")[0] == 401
            status, _, body = http(f"{base}/v1/gallery?limit=100", token=TOKEN)
            prompts = [entry["params"]["prompt"] for entry in json.loads(body)["data"]]
            assert status == 200 and prompt in prompts, body
            assert "sdgate startup probe" not in prompts  # `sdgate up`'s own image is nobody's
            status, _, body = http(f"{base}/v1/gallery?limit=1", token=TOKEN)
            assert status == 200, body
            listing = json.loads(body)
            assert listing["object"] == "list" and len(listing["data"]) == 1
            item = listing["data"][0]
            assert item["image_url"] == f"/v1/images/{item['key']}.png" and item["params"]["prompt"]
            assert http(base + item["image_url"])[0] == 401
            status, headers, png = http(base + item["image_url"], token=TOKEN)
            assert status == 200 and png.startswith(b"\x89PNG")
            assert headers["ETag"] == f'"{item["key"]}"'
            assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert http(base + item["image_url"], token=TOKEN, headers={"If-None-Match": headers["ETag"]})[0] == 304
            assert http(f"{base}/v1/images/{'0' * 64}.png", token=TOKEN)[0] == 404
            assert http(f"{base}/v1/gallery?limit=0", token=TOKEN)[0] == 400
            status, headers, page = http(base + "/")
            assert status == 200 and b'<label for="prompt">Prompt</label>' in page  # the page itself needs no token


def test_page_follows_job_events_per_the_jobs_contract(playwright_browser):
    """The page's jobs path (JOBS_CONTRACT.md), with the server's answers played by Playwright routes:
    SSE read with fetch() and the token, progress fraction, queue position, preview, then the image.
    No stack: this pins the client side of the contract whether or not the jobs API is merged."""
    from playwright.sync_api import expect

    web = Path(__file__).resolve().parents[2] / "serve_app" / "web"
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    key = "ab" * 32
    params = {"prompt": "a fox", "negative_prompt": "", "width": 64, "height": 64, "steps": 4, "guidance": 7.5,
              "seed": 3, "scheduler": "default", "model": "tiny"}

    def job(state, step=None, position=None):
        return {"id": "j1", "object": "sdgate.job", "state": state, "model": "tiny", "key": key, "step": step,
                "steps": 4, "queue_position": position, "eta_s": 1.5, "created": 1, "cached": False,
                "params": params, "image_url": f"/v1/images/{key}.png" if state == "done" else None, "error": None}

    events = "".join(f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n" for name, data in [
        ("progress", job("queued", position=2)), ("progress", job("generating", 1)),
        ("preview", {"id": "j1", "step": 2, "steps": 4, "b64_png": base64.b64encode(png).decode()}),
        ("progress", job("generating", 2)), ("done", job("done", 4))]) + ": keep-alive\n\n"
    seen, posted = [], []

    def answer(route):
        request = route.request
        path = request.url.split("sdgate.test", 1)[1]
        seen.append((request.method, path.split("?")[0], request.headers.get("authorization")))
        if path == "/" or path.startswith("/static/"):
            name = "index.html" if path == "/" else path.rsplit("/", 1)[1]
            return route.fulfill(body=(web / name).read_bytes(), content_type={
                "html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]])
        if request.headers.get("authorization") != "Bearer t0k":
            return route.fulfill(status=401, json={"error": {"message": "token", "type": "unauthorized",
                                                             "code": "unauthorized", "param": None}})
        if path == "/v1/models":
            return route.fulfill(json={"object": "list", "data": [{"id": "tiny", "default": True, "live_workers": 1,
                "defaults": {"width": 64, "height": 64, "steps": 4, "scheduler": "default", "guidance_scale": 7.5},
                "limits": {"max_side": 512, "max_steps": 50}}]})
        if path.startswith("/v1/gallery"):
            return route.fulfill(json={"object": "list", "data": [], "next": None})
        if path == "/v1/jobs" and request.method == "POST":
            posted.append(json.loads(request.post_data))
            return route.fulfill(status=202, json=job("queued", position=3))
        if path == "/v1/jobs/j1/events":
            return route.fulfill(body=events, content_type="text/event-stream")
        if path == f"/v1/images/{key}.png":
            return route.fulfill(body=png, content_type="image/png")
        return route.fulfill(status=404, json={"error": {"message": "no", "type": "not_found"}})

    context = playwright_browser.new_context()
    page = context.new_page()
    try:
        page.add_init_script("localStorage.setItem('sdgate.token', 't0k')")
        page.route("http://sdgate.test/**", answer)
        page.goto("http://sdgate.test/")
        expect(page.locator("#model option")).to_have_count(1)
        page.get_by_label("Prompt", exact=True).fill("a fox")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image: a fox")).to_be_visible()
        assert page.evaluate("window.sdgateProgressLog") == [0, 0, 0, 0.25, 0.5, 1]
        assert image_bytes(page) == png
        expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
        assert ("GET", "/v1/jobs/j1/events", "Bearer t0k") in seen  # the events carry the token
        expect(page.locator("#params")).to_contain_text("guidance")
        assert posted[0]["previews"] == 1 and posted[0]["prompt"] == "a fox" and "seed" not in posted[0]
        page.get_by_role("button", name="New seed").click()  # the same settings again, with a drawn seed
        expect(page.locator("#progress-text")).to_contain_text("Done")
        page.wait_for_function("window.sdgateProgressLog.length === 6 && !document.getElementById('generate').disabled")
        assert len(posted) == 2 and isinstance(posted[1]["seed"], int)
        assert {k: v for k, v in posted[1].items() if k != "seed"} == posted[0]
    finally:
        context.close()


def test_init_image_refusals_drop_and_server_error_on_the_page(playwright_browser, tmp_path):
    """The init image's client-side checks (type by content, 4 MiB), a drop onto the zone, and the
    server's 400 for it shown beside the field, with the server played by Playwright routes (no stack)."""
    from playwright.sync_api import expect

    web = Path(__file__).resolve().parents[2] / "serve_app" / "web"
    posted = []
    refusal = "strength: 0.05 of 2 steps leaves no denoising step; use at least 0.5 or more steps"

    def answer(route):
        request = route.request
        path = request.url.split("sdgate.test", 1)[1].split("?")[0]
        if path == "/" or path.startswith("/static/"):
            name = "index.html" if path == "/" else path.rsplit("/", 1)[1]
            return route.fulfill(body=(web / name).read_bytes(), content_type={
                "html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]])
        if path == "/v1/models":
            return route.fulfill(json={"object": "list", "data": [{"id": "tiny", "default": True, "live_workers": 1,
                "defaults": {"width": 64, "height": 64, "steps": 2, "scheduler": "default", "guidance_scale": 7.5},
                "limits": {"max_side": 512, "max_steps": 50}}]})
        if path == "/v1/gallery":
            return route.fulfill(json={"object": "list", "data": [], "next": None})
        if path == "/v1/jobs" and request.method == "POST":
            posted.append(json.loads(request.post_data))
            return route.fulfill(status=400, json={"error": {"message": refusal, "type": "invalid_request",
                                                             "code": "invalid_request", "param": "strength"}})
        return route.fulfill(status=404, json={"error": {"message": "no", "type": "not_found"}})

    gif = tmp_path / "cat.gif"
    gif.write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_of(8, 8) + b"\x00" * (4 * 1024 * 1024))  # a PNG signature, over 4 MiB
    init = png_of(16, 16)
    context = playwright_browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    try:
        page.route("http://sdgate.test/**", answer)
        page.goto("http://sdgate.test/")
        expect(page.locator("#model option")).to_have_count(1)
        field, error = page.get_by_label("Init image"), page.locator("#init-error")
        field.set_input_files(str(gif))
        expect(error).to_contain_text("cat.gif is not a PNG, JPEG or WebP image")
        expect(page.locator("#init-thumb")).to_be_hidden()
        field.set_input_files(str(huge))
        expect(error).to_contain_text("the limit is 4 MiB")
        expect(page.get_by_label("Strength", exact=True)).to_be_hidden()
        assert page.evaluate("document.getElementById('init-file').files.length") == 0  # nothing half-set

        # A drop onto the zone, as a file dragged from the desktop arrives.
        transfer = page.evaluate_handle("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return transfer;
        }""", base64.b64encode(init).decode())
        page.dispatch_event("#init-zone", "dragover", {"dataTransfer": transfer})
        expect(page.locator("#init-zone")).to_have_class(re.compile(r"\bdragging\b"))
        page.dispatch_event("#init-zone", "drop", {"dataTransfer": transfer})
        expect(page.get_by_role("img", name="Init image: dropped.png")).to_be_visible()
        expect(error).to_be_hidden()
        expect(page.locator("#init-zone")).not_to_have_class(re.compile(r"\bdragging\b"))
        assert image_bytes(page, "init-thumb") == init
        assert page.evaluate("document.getElementById('init-file').files[0].name") == "dropped.png"
        # A refused file now keeps the one that was set.
        field.set_input_files(str(gif))
        expect(error).to_contain_text("cat.gif is not a PNG")
        expect(page.get_by_role("img", name="Init image: dropped.png")).to_be_visible()
        assert page.evaluate("document.getElementById('init-file').files[0].name") == "dropped.png"

        page.get_by_label("Strength", exact=True).press("Home")  # the slider's floor, too low for 2 steps
        expect(page.locator("#strength-value")).to_have_text("0.05")
        page.get_by_label("Prompt", exact=True).fill("a fox")
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
        expect(page.locator("#error")).to_have_text(refusal)
        expect(error).to_have_text(refusal)
        assert len(posted) == 1 and posted[0]["strength"] == 0.05
        assert base64.b64decode(posted[0]["init_image"].split(",", 1)[1]) == init
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
    finally:
        context.close()
