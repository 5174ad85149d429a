"""The web page and the routes it reads: images by cache key and the gallery of recent entries.

The page is plain files in `serve_app/web/` (no build step, no CDN), served at `/` on both HTTP
ports. Images never change behind a key, so they go out with a strong ETag (the key) and a year
of `Cache-Control`; a revalidation is answered 304 without reading the store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import redis

from starlette.responses import JSONResponse, Response

from client import protocol
from celery_bridge import redis_keys
from celery_bridge.fair_share import text
from serve_app.openai_errors import E_NOT_FOUND, error_response
from serve_app.store import ImageStore, ListedImage

WEB_DIR = Path(__file__).parent / "web"
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
IMMUTABLE = "public, max-age=31536000, immutable"
GALLERY_DEFAULT, GALLERY_MAX = 24, 100
_IMAGE_NAME = re.compile(r"([0-9a-f]{64})\.png")
_CURSOR = re.compile(r"(\d+(?:\.\d+)?)_([0-9a-f]{64})")
# Legacy entries (cached before params were stored) still carry these.
_META_PARAMS = ("model", "width", "height", "steps", "seed")


def asset(name: str) -> Response:
    """One of the page's files; they change with the installed version, so browsers revalidate them."""
    if name not in ASSETS:
        return error_response(E_NOT_FOUND, f"no file {name[:40]!r} here; the page is at /")
    return Response((WEB_DIR / name).read_bytes(), media_type=ASSETS[name],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def image_key(name: str) -> Optional[str]:
    """The cache key in an image path's last part (`<64 hex>.png`), else None."""
    match = _IMAGE_NAME.fullmatch(name)
    return match.group(1) if match else None


def not_modified(key: str, if_none_match: Optional[str]) -> bool:
    """True when the browser's If-None-Match already names this key's ETag (or `*`)."""
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or f'"{key}"' in tags


def image_response(store: ImageStore, name: str, if_none_match: Optional[str]) -> Response:
    """The PNG behind a key, with its ETag; 304 on a matching If-None-Match; 404 when not cached."""
    key = image_key(name)
    if key is None:
        return error_response(protocol.E_INVALID_REQUEST, f"{name[:80]!r} is not an image name: use "
                              "/v1/images/<cache key>.png (64 lowercase hex characters, the `key` of a generation)",
                              "key")
    headers = {"ETag": f'"{key}"', "Cache-Control": IMMUTABLE}
    if not_modified(key, if_none_match):
        return Response(status_code=304, headers=headers)
    cached = store.get(key)
    if cached is None:
        return error_response(E_NOT_FOUND, f"no cached image for key {key[:12]}...: it was never rendered here or "
                              "has been evicted; generate it again with the same parameters", "key")
    return Response(cached.png, media_type="image/png", headers=headers)


def parse_gallery_query(query: Dict[str, str]) -> Tuple[int, Optional[Tuple[float, str]]]:
    """(limit, before) from `?limit=N&before=CURSOR`; ValueError naming the parameter and the rule."""
    raw_limit = query.get("limit", str(GALLERY_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= GALLERY_MAX:
        raise ValueError(f"limit: {raw_limit[:20]!r} must be a whole number from 1 to {GALLERY_MAX}")
    before = query.get("before")
    if before is None or before == "":
        return int(raw_limit), None
    match = _CURSOR.fullmatch(before)
    if match is None:
        raise ValueError(f"before: {before[:80]!r} is not a cursor; pass the `next` of the previous page")
    return int(raw_limit), (float(match.group(1)), match.group(2))


def cursor(item: ListedImage) -> str:
    """The opaque `next` that continues a listing after `item` (repr keeps the float exact)."""
    return f"{item.created!r}_{item.key}"


def gallery_item(item: ListedImage) -> Dict[str, Any]:
    """A listing entry as the gallery endpoint shows it."""
    params = item.meta.get("params")
    if isinstance(params, dict):  # the jobs contract's names: `guidance`, not the request's `guidance_scale`
        params = {("guidance" if name == "guidance_scale" else name): value for name, value in params.items()}
    else:
        params = {name: item.meta[name] for name in _META_PARAMS if name in item.meta}
    return {"key": item.key, "created": int(item.created), "params": params,
            "image_url": f"/v1/images/{item.key}.png"}


def tenant_recent(store: ImageStore, client: redis.Redis, tenant: str, limit: int,
                  before: Optional[Tuple[float, str]]) -> List[ListedImage]:
    """The newest images `tenant` asked for that are still cached, before the `before` cursor."""
    high = "+inf" if before is None else f"({before[0]!r}"
    asked = [(text(raw), float(score)) for raw, score in client.zrevrangebyscore(
        redis_keys.TENANT_GALLERY + tenant, high, "-inf", start=0, num=limit * 2, withscores=True)]
    listed = [ListedImage(key, score, meta) for (key, score), meta in zip(asked, store.metas([k for k, _ in asked]))
              if meta is not None]
    return listed[:limit]


def gallery(store: ImageStore, query: Dict[str, str], client: Optional[redis.Redis] = None,
            tenant: Optional[str] = None) -> Response:
    """`{"object": "list", "data": [...], "next": cursor|null}`, newest first; with a `tenant`, only
    the images it asked for (its index in Redis, `client`), else every cached image."""
    try:
        limit, before = parse_gallery_query(query)
    except ValueError as exc:
        param = str(exc).split(":", 1)[0]
        return error_response(protocol.E_INVALID_REQUEST, str(exc), param)
    listed = store.recent(limit + 1, before) if tenant is None else tenant_recent(store, client, tenant, limit + 1,
                                                                                  before)
    page = listed[:limit]
    return JSONResponse({"object": "list", "data": [gallery_item(item) for item in page],
                         "next": cursor(page[-1]) if len(listed) > limit else None})
