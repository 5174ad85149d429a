"""RedisImageStore against a real redis-server: round trip, LRU budget, corruption, concurrent evictors."""

from __future__ import annotations

import hashlib
import socket
import threading
import uuid

import pytest
import redis

from serve_app.store import CachedImage, RedisImageStore, open_store

pytestmark = pytest.mark.integration


def key(n: object) -> str:
    return hashlib.sha256(f"key-{n}".encode()).hexdigest()


def png_for(n: object, version: int = 0, size: int = 1000) -> bytes:
    seed = hashlib.sha256(f"png-{n}-{version}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:img:"


def make(redis_server, prefix: str, max_bytes: int) -> RedisImageStore:
    return RedisImageStore(redis_server.url, max_bytes, prefix=prefix)


def assert_consistent(raw: redis.Redis, prefix: str, budget: int) -> None:
    """The counter equals the real sum of entry sizes, and the zset names exactly the entries."""
    members = {m.decode() for m in raw.zrange(prefix + "lru", 0, -1)}
    entries = {k.decode()[len(prefix):] for k in raw.scan_iter(match=prefix + "*")} - {
        "lru", "bytes", "sizes", "created"}
    assert members == entries == {m.decode() for m in raw.zrange(prefix + "created", 0, -1)}
    actual = sum(raw.strlen(prefix + k) for k in entries)
    assert int(raw.get(prefix + "bytes") or 0) == actual <= budget
    assert {k.decode(): int(v) for k, v in raw.hgetall(prefix + "sizes").items()} == {
        k: raw.strlen(prefix + k) for k in entries}


def test_round_trip_replace_and_delete(redis_server, raw, prefix):
    with make(redis_server, prefix, 1 << 20) as store:
        meta = {"model": "tiny", "seed": 3, "prompt": "a lighthouse"}
        store.put(key(1), png_for(1), meta)
        assert store.get(key(1)) == CachedImage(png_for(1), meta)
        assert store.get(key(2)) is None
        store.put(key(1), png_for(1, 1, 3000), {"v": 1})
        assert store.get(key(1)) == CachedImage(png_for(1, 1, 3000), {"v": 1})
        assert store.count() == 1
        assert store.total_bytes() == raw.strlen(prefix + key(1))
        store.delete(key(1))
        store.delete(key(1))
        assert store.get(key(1)) is None
        assert (store.total_bytes(), store.count()) == (0, 0)
        assert_consistent(raw, prefix, 1 << 20)


def test_eviction_keeps_budget_and_drops_least_recently_used(redis_server, raw, prefix):
    budget = 10_000
    with make(redis_server, prefix, budget) as store:
        for n in range(8):
            store.put(key(n), png_for(n), {"n": n})
        assert store.get(key(0)) is not None  # the oldest put, but now recently used
        for n in range(8, 16):
            store.put(key(n), png_for(n), {"n": n})
            assert store.total_bytes() <= budget
        assert store.get(key(0)) is not None, "a recently read entry was evicted"
        assert store.get(key(1)) is None, "a never-read older entry survived eviction"
        assert store.get(key(15)) is not None
        assert_consistent(raw, prefix, budget)


def test_oversized_entry_is_not_cached(redis_server, prefix):
    with make(redis_server, prefix, 2000) as store:
        store.put(key(1), png_for(1, size=500), {})
        store.put(key(2), png_for(2, size=5000), {})
        assert store.get(key(2)) is None
        assert store.get(key(1)) is not None


@pytest.mark.parametrize("damage", [
    lambda value: value[:-100],  # truncated
    lambda value: value[:-1] + bytes([value[-1] ^ 0xFF]),  # one PNG byte flipped
    lambda value: b"\xff\xff\xff\xff" + value[4:],  # metadata length beyond the value
    lambda value: value[:4] + b"#" + value[5:],  # metadata JSON broken
    lambda value: b"pk",  # shorter than any header
], ids=["truncated", "flipped", "bad-length", "bad-meta", "stub"])
def test_corrupt_value_is_never_served_and_is_deleted(redis_server, raw, prefix, damage):
    with make(redis_server, prefix, 1 << 20) as store:
        store.put(key(1), png_for(1), {"model": "tiny"})
        store.put(key(2), png_for(2), {"model": "tiny"})
        raw.set(prefix + key(1), damage(raw.get(prefix + key(1))))
        assert store.get(key(1)) is None
        assert store.corrupt_dropped == 1
        assert not raw.exists(prefix + key(1))
        assert store.get(key(2)).png == png_for(2)
        assert_consistent(raw, prefix, 1 << 20)  # the counter lost what was counted, not what was damaged
        store.put(key(1), png_for(1), {"model": "tiny"})
        assert store.get(key(1)).png == png_for(1)


def test_two_gateways_evicting_at_once_keep_budget_and_counter(redis_server, raw, prefix):
    budget = 50_000
    stores = [make(redis_server, prefix, budget) for _ in range(2)]
    errors = []

    def hammer(store: RedisImageStore, worker: int) -> None:
        try:
            for i in range(300):
                n = (i * 13 + worker * 7) % 120
                if i % 2 == 0:
                    png = png_for(n, i + worker * 1000, size=800 + (n % 10) * 200)
                    store.put(key(n), png, {"n": n, "sha": hashlib.sha256(png).hexdigest()})
                got = store.get(key(n))
                if got is not None:
                    assert hashlib.sha256(got.png).hexdigest() == got.meta["sha"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(stores[w % 2], w)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert all(s.corrupt_dropped == 0 for s in stores)
        assert stores[0].count() > 0
        assert stores[0].total_bytes() == stores[1].total_bytes() <= budget
        assert_consistent(raw, prefix, budget)
    finally:
        for s in stores:
            s.close()


def test_open_store_redis_and_client_factory(redis_server, raw, prefix):
    with open_store("redis", redis_url=redis_server.url, max_bytes=1000) as store:
        assert isinstance(store, RedisImageStore)
        assert store.prefix == "sdgate:img:"
    factory_store = RedisImageStore(lambda: redis.Redis.from_url(redis_server.url, socket_timeout=5), 10_000,
                                    prefix=prefix)
    with factory_store:
        factory_store.put(key(1), png_for(1), {})
        assert factory_store.get(key(1)).png == png_for(1)


def test_unreachable_redis_fails_fast(prefix):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RedisImageStore(f"redis://127.0.0.1:{port}/0", 1000, prefix=prefix) as store:
        with pytest.raises(redis.ConnectionError):
            store.get(key(1))


def test_recent_pages_newest_first_and_forgets_what_goes(redis_server, raw, prefix, monkeypatch):
    """The gallery's listing: newest first through ties, cursor paging, no PNG read, evictions gone."""
    times = [100.0, 200.5, 200.5, 200.5, 300.25]
    with make(redis_server, prefix, 12000) as store:
        for n, at in enumerate(times):
            monkeypatch.setattr("serve_app.store.time.time", lambda at=at: at)
            store.put(key(n), png_for(n), {"n": n, "prompt": "p" * (5000 if n == 2 else 1)})
        monkeypatch.undo()
        expected = sorted(((key(n), at) for n, at in enumerate(times)), key=lambda i: (i[1], i[0]), reverse=True)
        for page in (1, 2, 3, 10):
            seen, before = [], None
            while True:
                listed = store.recent(page, before)
                seen += [(item.key, item.created) for item in listed]
                if len(listed) < page:
                    break
                before = (listed[-1].created, listed[-1].key)
            assert seen == expected
        assert {i.key: i.meta["n"] for i in store.recent(10)} == {key(n): n for n in range(5)}  # long meta too
        store.put(key(1), png_for(1), {"n": 1})  # a re-put keeps its first time
        assert [i.key for i in store.recent(10)] == [k for k, _ in expected]
        store.delete(key(4))
        store.put(key(9), png_for(9, size=3000), {"n": 9})  # evicts the least recently used
        listed = [i.key for i in store.recent(10)]
        assert listed[0] == key(9) and key(4) not in listed and len(listed) == store.count() < 5
        assert_consistent(raw, prefix, 12000)
