"""End to end through the local stack that `sdgate up` starts: boot client -> gateway -> Redis ->
Celery worker -> PNG, on free ports, in a throwaway SDGATE_HOME."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from client import protocol
from client.protocol import GenerationRequest
from cluster.local import LocalStack
from tests.integration.harness import ask, settled_counters
from tests.services import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack.with_gateway()


def boot(stack: LocalStack, *args: str, stdin: str = "", out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([sys.executable, str(REPO / "client" / "boot.py"), *args, "--port",
                           str(stack.gateway.socket_port), "--out", str(out)],
                          input=stdin, capture_output=True, text=True, timeout=180, env=env, cwd="/")


def test_boot_client_one_shot_writes_png_then_hits(stack, tmp_path):
    before = settled_counters(stack)
    first = boot(stack, "a lighthouse at dusk", out=tmp_path)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip().splitlines()[-1])
    image = Image.open(path)
    assert image.size == (64, 64) and "a lighthouse at dusk" in image.info["parameters"]
    middle = settled_counters(stack)
    assert middle["cache_misses"] == before["cache_misses"] + 1
    assert middle["generations"] == before["generations"] + 1

    second = boot(stack, "a lighthouse at dusk", out=tmp_path / "again")
    assert second.returncode == 0, second.stderr
    again = Path(second.stdout.strip().splitlines()[-1])
    assert again.read_bytes() == path.read_bytes()
    after = settled_counters(stack)
    assert after["cache_hits"] == middle["cache_hits"] + 1
    assert after["generations"] == middle["generations"]


def test_sixteen_identical_new_prompts_render_once(stack):
    before = settled_counters(stack)
    request = GenerationRequest("sixteen foxes asking at once")
    replies, errors = [], []

    def one():
        try:
            replies.append(ask(stack, request))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors and len(replies) == 16
    assert len({reply.png for reply in replies}) == 1
    after = settled_counters(stack)
    assert after["generations"] == before["generations"] + 1
    generated = after["cache_misses"] - before["cache_misses"]
    joins = after["singleflight_joins"] - before["singleflight_joins"]
    hits = after["cache_hits"] - before["cache_hits"]
    assert generated + hits == 16 and joins == generated - 1


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 50, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_changing_any_parameter_misses(stack):
    base = GenerationRequest("parameter sweep", negative_prompt="blur", width=64, height=64, steps=2,
                             guidance_scale=7.5, seed=11, scheduler="default", model="tiny")
    changed = {"prompt": "parameter sweep two", "negative_prompt": "noise", "width": 72, "height": 72, "steps": 3,
               "guidance_scale": 6.0, "seed": 12, "scheduler": "ddim", "model": None,
               "init_image": _png(), "mask": None, "strength": None,  # mask, strength need an init image:
               "loras": None}  # their misses are in test_clients.py; LoRAs (none on this stack) in unit/test_loras.py
    field_names = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert set(changed) == field_names, "a new request field needs a case here"
    ask(stack, base)
    for name, value in changed.items():
        if name == "model" or value is None:
            continue  # only one model is loaded in the test stack; the key test covers `model`
        before = settled_counters(stack)
        reply = ask(stack, dataclasses.replace(base, **{name: value}))
        assert protocol.STATUS_CACHED not in [s.get("state") for s in reply.statuses], name
        after = settled_counters(stack)
        assert after["cache_misses"] == before["cache_misses"] + 1, name


def test_http_returns_the_same_bytes_as_the_socket(stack):
    request = GenerationRequest("http and socket agree", seed=5)
    socket_png = ask(stack, request).png
    body = json.dumps({"prompt": "http and socket agree", "size": "64x64", "seed": 5, "n": 1,
                       "response_format": "b64_json"}).encode()
    http = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.http_port}/v1/images/generations", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(http, timeout=120) as response:
        payload = json.loads(response.read())
    assert base64.b64decode(payload["data"][0]["b64_json"]) == socket_png
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.http_port}/healthz", timeout=10) as response:
        assert json.loads(response.read())["ok"] is True


def test_fast_http_port_serves_a_cache_hit_with_the_socket_bytes(stack):
    """The replica's own listener (the fast HTTP port, no Serve proxy) answers a real cache hit."""
    request = GenerationRequest("fast http and socket agree", seed=6)
    socket_png = ask(stack, request).png
    body = json.dumps({"prompt": "fast http and socket agree", "size": "64x64", "seed": 6}).encode()
    fast = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.fast_http_port}/v1/images/generations",
                                  data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(fast, timeout=60) as response:
        payload = json.loads(response.read())
    assert base64.b64decode(payload["data"][0]["b64_json"]) == socket_png
    assert payload["sdgate"]["cached"] is True, "the socket request stored it; this is a hit"
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway.http_port}/healthz", timeout=10) as response:
        assert json.loads(response.read())["fast_http_port"] == stack.gateway.fast_http_port


def test_http_invalid_request_names_the_field(stack):
    body = json.dumps({"prompt": "x", "size": "1000000x64"}).encode()
    http = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.http_port}/v1/images/generations", data=body)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(http, timeout=30)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "invalid_request" and error["param"] == "width"


def test_invalid_request_is_answered_while_others_are_served(stack):
    good_results = []

    def good_client():
        for i in range(5):
            good_results.append(ask(stack, GenerationRequest(f"well behaved {i}")).png)

    thread = threading.Thread(target=good_client)
    thread.start()
    with socket.create_connection(("127.0.0.1", stack.gateway.socket_port), timeout=10) as conn:
        body = json.dumps({"request": {"prompt": "fine", "width": 10**6}}).encode()
        conn.sendall(protocol.encode_frame(protocol.REQUEST, body))
        frame = protocol.read_frame(conn, 10)
        error = protocol.decode_error(frame)
        assert error.code == protocol.E_INVALID_REQUEST and error.field == "width"
        # The same connection keeps working after an invalid request.
        assert protocol.exchange(conn, GenerationRequest("after the bad one"), timeout=120).png
    thread.join(180)
    assert len(good_results) == 5


def test_interactive_client_through_stdin(stack, tmp_path):
    result = boot(stack, stdin="an owl at night\na cat on a mat\nexit\n", out=tmp_path)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split() if line.endswith(".png")]
    assert len(paths) == 2 and all(Image.open(p).size == (64, 64) for p in paths)


def test_sdgate_stats_prints_the_counters(stack):
    env = dict(os.environ, SDGATE_REDIS_URL=stack.redis_url)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "stats"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("cache_hits", "cache_misses", "generations", "singleflight_joins", "errors"):
        assert isinstance(figures[key], int)
    assert figures["generations"] > 0 and figures["cache_hits"] > 0 and figures["errors"] > 0
