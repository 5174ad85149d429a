"""The web page's server side: images by key (ETag, 304), the gallery's paging, the page's files,
and `sdgate up` naming the page's address."""

from __future__ import annotations

import hashlib
import json

import pytest

from serve_app import webui
from serve_app.store import SQLiteImageStore


def key(n: object) -> str:
    return hashlib.sha256(f"key-{n}".encode()).hexdigest()


@pytest.fixture
def store(tmp_path):
    with SQLiteImageStore(tmp_path / "images.db", max_bytes=1 << 20) as s:
        yield s


def body(response) -> dict:
    return json.loads(response.body)


def test_image_by_key_has_strong_etag_long_cache_and_304(store):
    store.put(key(1), b"\x89PNG one", {"seed": 1})
    response = webui.image_response(store, f"{key(1)}.png", None)
    assert response.status_code == 200 and response.body == b"\x89PNG one"
    assert response.headers["content-type"] == "image/png"
    assert response.headers["etag"] == f'"{key(1)}"'
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    for header in (f'"{key(1)}"', f'"{key(2)}", W/"{key(1)}"', "*"):
        revalidated = webui.image_response(store, f"{key(1)}.png", header)
        assert revalidated.status_code == 304 and revalidated.body == b""
        assert revalidated.headers["etag"] == f'"{key(1)}"'
    assert webui.image_response(store, f"{key(1)}.png", f'"{key(2)}"').status_code == 200


def test_image_errors_say_what_to_do(store):
    missing = webui.image_response(store, f"{key(9)}.png", None)
    assert missing.status_code == 404 and "generate it again" in body(missing)["error"]["message"]
    for name in ("nope.png", f"{key(1)}.jpg", f"{key(1).upper()}.png", "../etc/passwd"):
        bad = webui.image_response(store, name, None)
        assert bad.status_code == 400 and body(bad)["error"]["param"] == "key"


def test_gallery_pages_newest_first_with_params(store, monkeypatch):
    for n in range(5):
        monkeypatch.setattr("serve_app.store.time.time", lambda n=n: 1000.0 + n * 0.25)
        params = {"prompt": f"p{n}", "guidance_scale": 7.5, "seed": n, "model": "tiny"}
        store.put(key(n), b"png", {"seed": n, "params": params} if n else {"seed": 0, "model": "tiny", "width": 64})
    monkeypatch.undo()
    keys, before = [], None
    while True:
        query = {"limit": "2"} if before is None else {"limit": "2", "before": before}
        page = body(webui.gallery(store, query))
        assert page["object"] == "list" and len(page["data"]) <= 2
        keys += [item["key"] for item in page["data"]]
        before = page["next"]
        if before is None:
            break
    assert keys == [key(n) for n in (4, 3, 2, 1, 0)]
    first = body(webui.gallery(store, {}))["data"]
    assert first[0] == {"key": key(4), "created": 1001, "image_url": f"/v1/images/{key(4)}.png",
                        "params": {"prompt": "p4", "guidance": 7.5, "seed": 4, "model": "tiny"}}
    assert first[-1]["params"] == {"model": "tiny", "width": 64, "seed": 0}  # cached before params were kept
    assert body(webui.gallery(store, {"limit": "5"}))["next"] is None


@pytest.mark.parametrize("query, param", [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                                          ({"limit": "x"}, "limit"), ({"before": "123_nothex"}, "before"),
                                          ({"before": "abc"}, "before")])
def test_gallery_rejects_bad_queries(store, query, param):
    response = webui.gallery(store, query)
    assert response.status_code == 400 and body(response)["error"]["param"] == param


def test_page_files_are_shipped_and_nothing_else_is_served():
    page = webui.asset("index.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert '<label for="prompt">Prompt</label>' in html and ">Generate</button>" in html
    assert "http://" not in html and "https://" not in html  # no CDN: it works from a head node offline
    assert webui.asset("app.js").headers["content-type"].startswith("text/javascript")
    assert webui.asset("../gateway.py").status_code == 404


def test_sdgate_up_prints_the_page_address(monkeypatch, tmp_path, capsys):
    from cluster import cli

    monkeypatch.setenv("SDGATE_HOME", str(tmp_path))
    real_stack = cli._stack

    def fake_stack(args):
        stack = real_stack(args)
        monkeypatch.setattr(stack, "running", lambda: False)
        monkeypatch.setattr(stack, "up", lambda log: dict(stack.addresses(), startup_s="1.0"))
        return stack

    monkeypatch.setattr(cli, "_stack", fake_stack)
    assert cli.main(["up"]) == 0
    out = capsys.readouterr().out
    assert "open http://127.0.0.1:8001/ for the web page (also on http://127.0.0.1:8000/)" in out  # fast port first
