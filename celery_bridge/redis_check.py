"""The Redis sdgate needs: the minimum server version, checked by every sdgate process at start.

Every command sdgate, kombu and Celery send exists in Redis 5.0 (the image store touches its LRU
with a Lua script rather than `ZADD ... GT`, which needs 6.2), so Ubuntu 22.04's 6.0 and Debian's
apt packages work. ACL users (`redis_username`) need Redis 6.
"""

from __future__ import annotations

import logging
from typing import Tuple

import redis

log = logging.getLogger(__name__)
MIN_REDIS_VERSION: Tuple[int, int] = (5, 0)


class RedisVersionError(RuntimeError):
    """The Redis server is older than sdgate supports."""


def parse_version(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def require_redis_version(client: redis.Redis, what: str = "sdgate") -> Tuple[int, ...]:
    """Raise RedisVersionError when the server is older than MIN_REDIS_VERSION.

    An unreachable Redis is not an error here: every path already retries a lost broker, and a
    process that starts before Redis must come up once Redis does.
    """
    try:
        info = client.info("server")
    except redis.RedisError as exc:
        log.warning("%s could not check the Redis version (%s); continuing", what, exc)
        return ()
    text = str(info.get("redis_version", "0"))
    version = parse_version(text)
    if version < MIN_REDIS_VERSION:
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        raise RedisVersionError(
            f"{what} needs Redis >= {'.'.join(map(str, MIN_REDIS_VERSION))}, but the server at {where} is "
            f"Redis {text}; install a newer redis-server (Ubuntu 22.04 and Debian 12 ship 6.0+ and 7.0)")
    return version
