"""Tenants: who is asking, with what weight and limits, and the API keys that name them.

A tenant's record and its keys live in Redis, so every gateway replica sees a new or revoked key
at once (each replica caches a lookup for KEY_CACHE_S). Keys are shown once, at creation, and
stored only as SHA-256 hashes; a key's id is the start of its hash, safe to print and log. The
shared SDGATE_TOKEN is the operator's own tenant; with auth off everyone is one anonymous tenant.
`sdgate tenant add|key|list|revoke|usage` (cluster/cli.py) manages them.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import redis

from client import protocol
from client.protocol import ProtocolError
from celery_bridge import lua, redis_keys
from celery_bridge.fair_share import GPU_MS, IMAGES_RENDERED, IMAGES_SERVED, text

log = logging.getLogger(__name__)
KEY_CACHE_S = 0.5  # a revoked key is refused by every replica within this
KEY_ID_CHARS = 12
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
LIMITS = ("rate_per_s", "max_queued", "max_running", "max_size", "max_steps")
USAGE_COUNTERS = (IMAGES_SERVED, IMAGES_RENDERED, GPU_MS)

# KEYS[1]: the tenant's rate key prefix. Counts this request in the current second of Redis's
# clock; returns the count (the caller refuses above its limit).
_RATE = """
local key = KEYS[1] .. redis.call('TIME')[1]
local count = redis.call('INCR', key)
if count == 1 then redis.call('EXPIRE', key, 2) end
return count
"""


class OverLimit(ProtocolError):
    """A tenant's limit refused the request: `busy` on the socket, 429 with Retry-After over HTTP;
    the message starts with `limit <name>:`."""

    def __init__(self, limit: str, message: str, field: Optional[str] = None, retry_after_s: int = 5):
        super().__init__(protocol.E_BUSY, f"limit {limit}: {message}", field)
        self.limit, self.retry_after_s = limit, retry_after_s


# KEYS[1]: the tenant's waiting set. ARGV: waiter id, lease ms, limit (0: only renew). Adds or
# renews the waiter; -1 when a new one would pass the limit.
_WAIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local limit = tonumber(ARGV[3])
  if limit == 0 then return 0 end
  if redis.call('ZCARD', KEYS[1]) >= limit then return -1 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""


@dataclass(frozen=True)
class Tenant:
    """A tenant's share and limits; 0 means no limit."""

    name: str
    weight: float = 1.0  # its share of busy workers, relative to the other tenants with work waiting
    rate_per_s: float = 0.0  # requests per second, every replica together
    max_queued: int = 0  # new images waited for at once (queued or rendering); more are refused (busy)
    max_running: int = 0  # renders at once; more wait in its backlog
    max_size: int = 0  # largest width or height
    max_steps: int = 0  # most denoising steps
    shared: bool = False  # many people behind one identity (auth off, the shared token): limits per address

    def limit_key(self, address: str) -> str:
        """Whose per-client caps a request counts against: the tenant's, or (shared) its address's."""
        return address if self.shared else f"tenant:{self.name}"

    def to_record(self) -> Dict[str, str]:
        return {"weight": repr(self.weight), **{name: repr(getattr(self, name)) for name in LIMITS}}

    @classmethod
    def from_record(cls, name: str, record: Dict[Any, Any]) -> "Tenant":
        fields = {text(k): text(v) for k, v in record.items()}
        values: Dict[str, Any] = {}
        for field in ("weight", *LIMITS):
            if field in fields:
                kind = float if field in ("weight", "rate_per_s") else int
                values[field] = kind(float(fields[field]))
        return cls(name=name, **values)

    def check_request(self, width: Optional[int], height: Optional[int], steps: Optional[int]) -> None:
        """Refuse (busy, naming the limit) a request over this tenant's size or step limit."""
        if self.max_size and max(width or 0, height or 0) > self.max_size:
            raise OverLimit("max_size", f"tenant {self.name!r} may ask for at most {self.max_size} pixels a "
                            "side; ask for a smaller image", field="width")
        if self.max_steps and (steps or 0) > self.max_steps:
            raise OverLimit("max_steps", f"tenant {self.name!r} may ask for at most {self.max_steps} steps; "
                            "ask for fewer", field="steps")




ANONYMOUS = Tenant("anonymous", shared=True)
OPERATOR = Tenant("operator", shared=True)
RESERVED = (ANONYMOUS.name, OPERATOR.name)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate(tenant: Tenant) -> None:
    """ValueError naming the field and the rule."""
    if not NAME.fullmatch(tenant.name):
        raise ValueError(f"tenant name {tenant.name[:80]!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if not 0 < tenant.weight <= 1000:
        raise ValueError(f"weight {tenant.weight!r} must be above 0 and at most 1000")
    for name in LIMITS:
        if getattr(tenant, name) < 0:
            raise ValueError(f"{name} {getattr(tenant, name)!r} must be 0 (no limit) or more")
    if 0 < tenant.rate_per_s < 1:
        raise ValueError(f"rate_per_s {tenant.rate_per_s!r} must be 0 (no limit) or at least 1 (it counts per second)")


class TenantRegistry:
    """Tenants and their keys in Redis (the same Redis as the broker and the cache)."""

    def __init__(self, client: redis.Redis, cache_s: float = KEY_CACHE_S):
        self.client, self.cache_s = client, cache_s
        self._cache: Dict[str, Tuple[Optional[Tenant], float]] = {}
        self._lock = threading.Lock()
        self._rate = client.register_script(_RATE)

    # -- the operator's commands -------------------------------------------------------------------

    def add(self, tenant: Tenant) -> str:
        """Create `tenant` with one new key; returns the key (shown once, never stored)."""
        validate(tenant)
        if tenant.name in RESERVED:
            raise ValueError(f"{tenant.name!r} is reserved (the shared SDGATE_TOKEN and auth-off callers); "
                             "pick another name")
        if not self.client.hsetnx(redis_keys.TENANT + tenant.name, "weight", repr(tenant.weight)):
            raise ValueError(f"tenant {tenant.name!r} exists; `sdgate tenant key {tenant.name}` adds a key to it")
        self.client.hset(redis_keys.TENANT + tenant.name, mapping=tenant.to_record())
        self.client.sadd(redis_keys.TENANTS, tenant.name)
        return self.add_key(tenant.name)

    def add_key(self, name: str) -> str:
        if self.get(name) is None:
            raise ValueError(f"no tenant {name!r}; create it with `sdgate tenant add {name}`")
        key = "sdg-" + secrets.token_urlsafe(32)
        digest = key_hash(key)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(redis_keys.TENANT_KEYS, digest, name)
        pipe.sadd(redis_keys.TENANT_KEY_IDS + name, digest)
        pipe.execute()
        return key

    def revoke(self, name: str, key_id: Optional[str] = None) -> int:
        """Revoke `name`'s key whose id starts with `key_id` (all its keys without one); returns how many."""
        digests = [text(d) for d in self.client.smembers(redis_keys.TENANT_KEY_IDS + name)]
        if key_id is not None:
            digests = [d for d in digests if d.startswith(key_id)]
        if digests:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(redis_keys.TENANT_KEYS, *digests)
            pipe.srem(redis_keys.TENANT_KEY_IDS + name, *digests)
            pipe.execute()
        return len(digests)

    def get(self, name: str) -> Optional[Tenant]:
        record = self.client.hgetall(redis_keys.TENANT + name)
        return Tenant.from_record(name, record) if record else None

    def listing(self) -> List[Tuple[Tenant, List[str]]]:
        """Every tenant with the ids of its live keys, by name."""
        rows = []
        for name in sorted(text(n) for n in self.client.smembers(redis_keys.TENANTS)):
            tenant = self.get(name)
            if tenant is not None:
                ids = sorted(text(d)[:KEY_ID_CHARS] for d in self.client.smembers(redis_keys.TENANT_KEY_IDS + name))
                rows.append((tenant, ids))
        return rows

    def usage(self) -> Dict[str, Dict[str, int]]:
        """Per tenant: images served (hits and misses), images rendered, GPU milliseconds."""
        usage: Dict[str, Dict[str, int]] = {}
        for field, value in self.client.hgetall(redis_keys.STATS).items():
            field = text(field)
            if field.startswith(redis_keys.TENANT_COUNTER):
                name, _, counter = field[len(redis_keys.TENANT_COUNTER):].rpartition(":")
                if counter in USAGE_COUNTERS:
                    usage.setdefault(name, dict.fromkeys(USAGE_COUNTERS, 0))[counter] = int(value)
        return usage

    # -- per request ---------------------------------------------------------------------------------

    def resolve(self, key: str) -> Optional[Tenant]:
        """The tenant `key` belongs to, or None (unknown or revoked); cached for cache_s."""
        digest = key_hash(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > now:
                return hit[0]
        name = self.client.hget(redis_keys.TENANT_KEYS, digest)
        tenant = self.get(text(name)) if name is not None else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (tenant, now + self.cache_s)
        return tenant

    def check_rate(self, tenant: Tenant) -> None:
        """Refuse (rate_limited, naming the limit) a request over the tenant's rate, cluster-wide."""
        if tenant.rate_per_s <= 0:
            return
        if int(self._rate(keys=[f"{redis_keys.TENANT_RATE}{tenant.name}:"])) > tenant.rate_per_s:
            raise OverLimit("rate_per_s", f"tenant {tenant.name!r} may send {tenant.rate_per_s:g} requests a "
                            "second; slow down", retry_after_s=1)


class TenantWaiting:
    """The misses each tenant with a `max_queued` waits on, cluster-wide: a lease per waiter in
    Redis (Redis's clock), renewed by the replica it waits on, so a dead replica's leases lapse."""

    def __init__(self, client: redis.Redis, lease_ms: int = 30_000):
        self.client, self.lease_ms = client, lease_ms
        self._wait = client.register_script(_WAIT)

    def enter(self, tenant: Tenant, waiter_id: str) -> None:
        """Count `waiter_id` against the tenant's max_queued; OverLimit when it is full."""
        if int(self._wait(keys=[redis_keys.TENANT_WAITING + tenant.name],
                          args=[waiter_id, self.lease_ms, tenant.max_queued])) < 0:
            raise OverLimit("max_queued", f"tenant {tenant.name!r} already waits for {tenant.max_queued} new "
                            "images (queued or rendering); wait for some to finish")

    def renew(self, waiters: Dict[str, str]) -> None:
        """Renew the leases of {waiter id: tenant name} (waiters no longer counted stay gone)."""
        pipe = self.client.pipeline(transaction=False)
        for waiter_id, name in waiters.items():
            lua.call(self._wait, [redis_keys.TENANT_WAITING + name], [waiter_id, self.lease_ms, 0], pipe)
        pipe.execute()

    def leave(self, tenant_name: str, waiter_id: str) -> None:
        try:
            self.client.zrem(redis_keys.TENANT_WAITING + tenant_name, waiter_id)
        except redis.RedisError as exc:  # a lease left behind lapses by itself
            log.debug("could not remove waiter %s of %s: %s", waiter_id, tenant_name, exc)


