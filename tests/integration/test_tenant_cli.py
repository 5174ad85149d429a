"""`sdgate tenant ...` against a real Redis: keys shown once and stored hashed, limits validated,
revocation, usage, and metrics that carry names, never keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from celery_bridge import redis_keys
from serve_app.metrics import tenant_series
from serve_app.tenants import Tenant, TenantRegistry, key_hash

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def empty_redis(redis_server):
    """The Redis is the session's: start from nothing (no tenants of other tests)."""
    redis.Redis.from_url(redis_server.url).flushall()


def sdgate(redis_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "tenant", *args, "--broker", redis_server.url],
                          capture_output=True, text=True, timeout=60)


def test_add_prints_the_key_alone_once_and_stores_only_its_hash(redis_server):
    added = sdgate(redis_server, "add", "acme", "--weight", "2", "--max-queued", "5", "--max-steps", "30")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("sdg-") and " " not in key and len(key) > 30
    client = redis.Redis.from_url(redis_server.url)
    dumped = b"".join(client.dump(k) or b"" for k in client.keys("*"))
    assert key.encode() not in dumped, "the key itself is nowhere in Redis"
    assert client.hget(redis_keys.TENANT_KEYS, key_hash(key)) == b"acme"
    tenant = TenantRegistry(client).resolve(key)
    assert (tenant.name, tenant.weight, tenant.max_queued, tenant.max_steps) == ("acme", 2.0, 5, 30)

    listing = sdgate(redis_server, "list")
    rows = json.loads(listing.stdout)
    assert [row["name"] for row in rows] == ["acme"] and key not in listing.stdout
    assert rows[0]["key_ids"] == [key_hash(key)[:12]]

    second = sdgate(redis_server, "key", "acme").stdout.strip().splitlines()[-1]
    assert second != key and TenantRegistry(client).resolve(second).name == "acme"
    revoked = sdgate(redis_server, "revoke", "acme", "--key", key_hash(key)[:12])
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    fresh = TenantRegistry(client, cache_s=0)
    assert fresh.resolve(key) is None and fresh.resolve(second).name == "acme"


def test_bad_tenants_are_refused_with_the_rule(redis_server):
    for args, words in ((["add", "Bad Name"], "tenant name"), (["add", "ok", "--weight", "0"], "weight"),
                        (["add", "ok", "--rate-per-s", "0.5"], "rate_per_s"), (["add", "operator"], "reserved"),
                        (["key", "nobody"], "no tenant")):
        out = sdgate(redis_server, *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert sdgate(redis_server, "add", "twice").returncode == 0
    again = sdgate(redis_server, "add", "twice")
    assert again.returncode == 2 and "exists" in again.stderr


def test_usage_and_its_metrics_name_tenants_never_keys(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    key = TenantRegistry(client).add(Tenant("metered"))
    client.hset(redis_keys.STATS, mapping={"tenants:metered:images_served": 3, "tenants:metered:images_rendered": 2,
                                           "tenants:metered:gpu_ms": 1500})
    usage = json.loads(sdgate(redis_server, "usage").stdout)
    assert usage == {"metered": {"images_served": 3, "images_rendered": 2, "gpu_ms": 1500}}
    series = tenant_series(usage)
    assert ("gpu_seconds", "metered", 1.5) in series and ("images_rendered", "metered", 2.0) in series
    assert key not in json.dumps(series)
