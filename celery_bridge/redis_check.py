"""The Redis sdgate needs: the minimum server version, checked by every sdgate process at start.

Redis 6.0 (what Ubuntu 22.04's apt installs for configs/cluster.yaml): redis-py 8, and kombu and
Celery through it, open each connection with `HELLO 3` (RESP3), which Redis 6.0 introduced, and
ACL users (`redis_username`) need 6.0 too. Nothing sdgate sends needs more: the image store
touches its LRU with a Lua script rather than `ZADD ... GT` (6.2+).
"""

from __future__ import annotations

import logging
from typing import Tuple

import redis

log = logging.getLogger(__name__)
MIN_REDIS_VERSION: Tuple[int, int] = (6, 0)


class RedisVersionError(RuntimeError):
    """The Redis server is older than sdgate supports."""


def parse_version(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def require_redis_version(client: redis.Redis, what: str = "sdgate") -> Tuple[int, ...]:
    """The server's version; RedisVersionError when it is older than MIN_REDIS_VERSION.

    Asks over RESP2 (no HELLO), so an old server gets this clear error rather than an "unknown
    command HELLO" from the first real command. An unreachable Redis is not an error here: every
    path already retries a lost broker, and a process that starts before Redis must come up once
    Redis does.
    """
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith("maint_notifications")}
    kwargs.update(protocol=2, socket_timeout=kwargs.get("socket_timeout") or 5)
    probe = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
    try:
        text = str(probe.info("server").get("redis_version", "0"))
    except redis.RedisError as exc:
        log.warning("%s could not check the Redis version (%s); continuing", what, exc)
        return ()
    finally:
        probe.close()
    version = parse_version(text)
    if version < MIN_REDIS_VERSION:
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        raise RedisVersionError(
            f"{what} needs Redis >= {'.'.join(map(str, MIN_REDIS_VERSION))}, but the server at {where} is "
            f"Redis {text}; install a newer redis-server (Ubuntu 22.04's apt has 6.0, Debian 12's 7.0)")
    return version
