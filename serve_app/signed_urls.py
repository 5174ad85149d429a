"""Image URLs that work without the key for a bounded time: `response_format: "url"`.

A URL names the image's cache key, an expiry (Redis server time, so every replica and host agrees)
and an HMAC-SHA256 over both with a secret that the first replica to need one makes and keeps in
Redis. Past its expiry, or with any part changed, it is answered 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

import redis

from celery_bridge import redis_keys


class SignedUrls:
    """Signs and checks image URLs for one replica (the secret is read once)."""

    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._secret: Optional[bytes] = None

    def _key(self) -> bytes:
        if self._secret is None:
            self.redis.set(redis_keys.URL_SECRET, secrets.token_hex(32), nx=True)
            self._secret = bytes.fromhex(self.redis.get(redis_keys.URL_SECRET).decode("ascii"))
        return self._secret

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._key(), f"{key}.{expires}".encode("ascii"), hashlib.sha256).hexdigest()

    def _now(self) -> int:
        return int(self.redis.time()[0])

    def url(self, base: str, key: str) -> str:
        """The image's path under `base` (e.g. http://host:8001), working for ttl_s from now."""
        expires = self._now() + self.ttl_s
        return f"{base.rstrip('/')}/v1/images/{key}.png?expires={expires}&signature={self._signature(key, expires)}"

    def valid(self, key: str, expires: str, signature: str) -> bool:
        """Whether a URL's expiry and signature are its own and it has not expired (blocking)."""
        if not expires.isdigit() or len(expires) > 12 or len(signature) != 64:
            return False
        if not hmac.compare_digest(self._signature(key, int(expires)), signature):
            return False
        return self._now() <= int(expires)
