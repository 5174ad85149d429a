"""SQLiteImageStore: round trips, LRU by bytes, corruption never served, threads, processes, SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from serve_app.store import CachedImage, SQLiteImageStore, open_store
from tests.services import REPO


def key(n: object) -> str:
    return hashlib.sha256(f"key-{n}".encode()).hexdigest()


def png_for(n: object, version: int = 0, size: int = 1000) -> bytes:
    seed = hashlib.sha256(f"png-{n}-{version}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def entry_size(png: bytes, meta: dict) -> int:
    # What the store counts against the budget: PNG plus compact JSON metadata.
    return len(png) + len(json.dumps(meta, sort_keys=True, separators=(",", ":")))


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "cache" / "images.db"


@pytest.fixture
def store(db):
    s = SQLiteImageStore(db, max_bytes=1 << 20)
    yield s
    s.close()


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None, timeout=10)


def test_round_trip_preserves_png_and_meta(store):
    meta = {"model": "tiny", "seed": 7, "size": [64, 64], "prompt": "a red fox", "guidance": 7.5}
    store.put(key(1), png_for(1), meta)
    got = store.get(key(1))
    assert got == CachedImage(png_for(1), meta)
    assert store.get(key(2)) is None
    assert store.count() == 1
    assert store.total_bytes() == entry_size(png_for(1), meta)


def test_put_replaces_and_delete_removes_with_totals_kept(store, db):
    store.put(key(1), png_for(1, 0, 500), {"v": 0})
    store.put(key(1), png_for(1, 1, 800), {"v": 1})
    assert store.get(key(1)).png == png_for(1, 1, 800)
    assert (store.total_bytes(), store.count()) == (entry_size(png_for(1, 1, 800), {"v": 1}), 1)
    store.delete(key(1))
    store.delete(key(1))  # deleting an absent key is fine
    assert store.get(key(1)) is None
    assert (store.total_bytes(), store.count()) == (0, 0)
    assert raw(db).execute("SELECT count(*) FROM images").fetchone() == (0,)


def test_eviction_keeps_budget_and_drops_least_recently_used(db):
    budget = 10_000
    store = SQLiteImageStore(db, max_bytes=budget)
    try:
        for n in range(8):
            store.put(key(n), png_for(n), {"n": n})
        assert store.get(key(0)) is not None  # the oldest put, but now recently used
        for n in range(8, 16):
            store.put(key(n), png_for(n), {"n": n})
            assert store.total_bytes() <= budget
        assert store.get(key(0)) is not None, "a recently read entry was evicted"
        assert store.get(key(1)) is None, "a never-read older entry survived eviction"
        assert store.get(key(15)) is not None
        rows = raw(db).execute("SELECT sum(size), count(*) FROM images").fetchone()
        assert rows == (store.total_bytes(), store.count())
    finally:
        store.close()


def test_access_times_reach_disk_without_a_put(store, db):
    store.put(key(1), png_for(1), {})
    before = raw(db).execute("SELECT last_access FROM images").fetchone()[0]
    time.sleep(0.01)
    store.get(key(1))
    assert raw(db).execute("SELECT last_access FROM images").fetchone()[0] == before  # hits don't write
    deadline = time.monotonic() + 5
    while raw(db).execute("SELECT last_access FROM images").fetchone()[0] == before:
        assert time.monotonic() < deadline, "the background flush never wrote the access time"
        time.sleep(0.05)


def test_metas_read_metadata_only_and_are_no_access(store, db):
    """What a tenant's gallery lists with: an entry's metadata, in the order asked, without touching it."""
    store.put(key(1), png_for(1), {"seed": 1})
    store.put(key(2), png_for(2), {"seed": 2})
    assert store.metas([key(2), key(3), key(1)]) == [{"seed": 2}, None, {"seed": 1}]
    store.flush_access_times()
    before = dict(raw(db).execute("SELECT key, last_access FROM images").fetchall())
    store.metas([key(1), key(2)])
    store.flush_access_times()
    assert dict(raw(db).execute("SELECT key, last_access FROM images").fetchall()) == before
    assert store.metas([]) == []


def test_oversized_entry_is_not_cached(db):
    store = SQLiteImageStore(db, max_bytes=2000)
    try:
        store.put(key(1), png_for(1, size=500), {})
        store.put(key(2), png_for(2, size=5000), {})
        assert store.get(key(2)) is None
        assert store.get(key(1)) is not None
    finally:
        store.close()


def test_reopening_with_a_smaller_budget_evicts(db):
    with SQLiteImageStore(db, max_bytes=1 << 20) as store:
        for n in range(10):
            store.put(key(n), png_for(n), {})
    with SQLiteImageStore(db, max_bytes=3000) as store:
        assert store.total_bytes() <= 3000
        assert store.get(key(9)) is not None


@pytest.mark.parametrize("damage", [
    "UPDATE images SET png = substr(png, 1, 100)",  # truncated write
    "UPDATE images SET png = CAST(X'00' || substr(png, 2) AS BLOB)",  # one byte flipped
    "UPDATE images SET png = X'FF' || substr(png, 2)",  # flipped, and turned into (invalid UTF-8) text
    "UPDATE images SET meta = CAST(X'FFFE' AS TEXT)",  # metadata that is not even UTF-8
    "UPDATE images SET meta = '{\"model\": \"tin'",  # garbage metadata
    "UPDATE images SET meta = '[1, 2]'",  # JSON, but not an object
    "UPDATE images SET sha256 = 'nope'",  # damaged checksum
])
def test_corrupt_entry_is_never_served_and_is_deleted(store, db, damage):
    store.put(key(1), png_for(1), {"model": "tiny"})
    store.put(key(2), png_for(2), {"model": "tiny"})
    raw(db).execute(damage + " WHERE key = ?", (key(1),))
    assert store.get(key(1)) is None
    assert store.corrupt_dropped == 1
    assert raw(db).execute("SELECT count(*) FROM images WHERE key = ?", (key(1),)).fetchone() == (0,)
    assert store.get(key(1)) is None and store.corrupt_dropped == 1  # gone, not re-counted
    assert store.get(key(2)).png == png_for(2)  # the neighbour is untouched
    store.put(key(1), png_for(1), {"model": "tiny"})  # the regenerated image is cached again
    assert store.get(key(1)).png == png_for(1)
    assert store.total_bytes() == raw(db).execute("SELECT sum(size) FROM images").fetchone()[0]


def test_threads_hammering_get_and_put_see_only_whole_images(db):
    store = SQLiteImageStore(db, max_bytes=40_000)  # small: eviction runs under the hammering
    errors, served = [], []

    def hammer(worker: int) -> None:
        try:
            for i in range(400):
                n = (i * 7 + worker) % 60
                if i % 3 == 0:
                    version = i + worker * 10_000
                    png = png_for(n, version, size=500 + n * 10)
                    store.put(key(n), png, {"n": n, "sha": hashlib.sha256(png).hexdigest()})
                got = store.get(key(n))
                if got is not None:
                    assert got.meta["n"] == n
                    assert hashlib.sha256(got.png).hexdigest() == got.meta["sha"]
                    served.append(1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert served, "no get ever hit"
        assert store.corrupt_dropped == 0
        assert store.total_bytes() <= 40_000
        assert raw(db).execute("SELECT sum(size), count(*) FROM images").fetchone() == (
            store.total_bytes(), store.count())
    finally:
        store.close()


def test_two_store_objects_on_one_file_see_each_others_writes(db):
    with SQLiteImageStore(db, max_bytes=1 << 20) as first, SQLiteImageStore(db, max_bytes=1 << 20) as second:
        first.put(key(1), png_for(1), {"by": "first"})
        assert second.get(key(1)) == CachedImage(png_for(1), {"by": "first"})
        second.put(key(2), png_for(2), {"by": "second"})
        assert first.get(key(2)).meta == {"by": "second"}
        second.delete(key(1))
        assert first.get(key(1)) is None
        assert first.count() == second.count() == 1
        assert first.total_bytes() == second.total_bytes()


_WRITER = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from serve_app.store import SQLiteImageStore
    store = SQLiteImageStore(Path(sys.argv[1]), max_bytes=200_000)
    n = 0
    while True:
        png = hashlib.sha256(str(n).encode()).digest() * (50 + n % 200)
        store.put(hashlib.sha256(f"key-{n % 500}".encode()).hexdigest(), png, {"n": n})
        n += 1
        if n == 50:
            print("writing", flush=True)
""")


def test_sigkilled_writer_leaves_a_sound_store(db):
    db.parent.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], cwd=REPO, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    try:
        assert writer.stdout.readline() == b"writing\n", "the writer never started writing"
        time.sleep(0.5)  # mid-burst: it is committing puts and evicting continuously
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert Path(f"{db}-wal").exists()  # the crash left a WAL behind to recover from

    with SQLiteImageStore(db, max_bytes=200_000) as store:
        assert store.integrity_check()
        keys = [row[0] for row in raw(db).execute("SELECT key FROM images")]
        assert keys, "the writer committed nothing before it was killed"
        for k in keys:
            got = store.get(k)
            assert got is not None, "a committed row did not verify after the crash"
            n = got.meta["n"]
            assert got.png == hashlib.sha256(str(n).encode()).digest() * (50 + n % 200)
        assert store.corrupt_dropped == 0
        assert raw(db).execute("SELECT sum(size), count(*) FROM images").fetchone() == (
            store.total_bytes(), store.count())
        assert store.total_bytes() <= 200_000
        store.put(key("after"), png_for("after"), {})  # and it takes writes again
        assert store.get(key("after")).png == png_for("after")


def test_keys_must_be_canonical_cache_keys(store):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.put("lru", b"x", {})
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get(key(1).upper())


def test_open_store_names_its_choices(tmp_path):
    with open_store("sqlite", path=tmp_path / "x.db", max_bytes=1000) as store:
        assert isinstance(store, SQLiteImageStore)
    with pytest.raises(ValueError, match="'sqlite'.*'redis'"):
        open_store("memcached", max_bytes=1000)
    with pytest.raises(ValueError, match="path"):
        open_store("sqlite", max_bytes=1000)
    with pytest.raises(ValueError, match="Redis URL"):
        open_store("redis", max_bytes=1000)
    with pytest.raises(ValueError, match="positive"):
        open_store("sqlite", path=tmp_path / "y.db", max_bytes=0)


# -- listing (the gallery) --------------------------------------------------------------------------

def walk(store, page: int):
    """Every entry, following the cursor a page at a time, as (key, created)."""
    seen, before = [], None
    while True:
        listed = store.recent(page, before)
        assert len(listed) <= page
        seen += [(item.key, item.created) for item in listed]
        if len(listed) < page:
            return seen
        before = (listed[-1].created, listed[-1].key)


def put_at(store, monkeypatch, times):
    """Put one entry per time in `times` (ties included), with time.time() pinned to it."""
    for n, at in enumerate(times):
        monkeypatch.setattr("serve_app.store.time.time", lambda at=at: at)
        store.put(key(n), png_for(n), {"n": n})
    monkeypatch.undo()


def test_recent_pages_newest_first_through_ties(store, monkeypatch):
    put_at(store, monkeypatch, [100.0, 200.5, 200.5, 200.5, 300.25])
    expected = sorted(((key(n), at) for n, at in enumerate([100.0, 200.5, 200.5, 200.5, 300.25])),
                      key=lambda item: (item[1], item[0]), reverse=True)
    for page in (1, 2, 3, 10):
        assert walk(store, page) == expected
    assert store.recent(1)[0].meta == {"n": 4}
    store.get(key(0))  # an access does not move an entry in the listing
    store.put(key(1), png_for(1), {"n": 1, "again": True})  # a re-put keeps its first time
    assert walk(store, 2) == expected
    store.delete(key(4))
    assert walk(store, 2) == expected[1:]


def test_recent_forgets_evicted_entries(db):
    with SQLiteImageStore(db, max_bytes=2500) as small:
        for n in range(4):
            small.put(key(n), png_for(n), {"n": n})
        assert [item.key for item in small.recent(10)] == [key(3), key(2)]


def test_recent_rejects_bad_arguments(store):
    with pytest.raises(ValueError, match="positive"):
        store.recent(0)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.recent(5, (1.0, "../x"))


def test_version_1_file_gains_created_from_last_access(db):
    db.parent.mkdir(parents=True)
    conn = raw(db)
    conn.execute("""CREATE TABLE images (key TEXT PRIMARY KEY, png BLOB NOT NULL, meta TEXT NOT NULL,
                    sha256 TEXT NOT NULL, size INTEGER NOT NULL, last_access REAL NOT NULL)""")
    for n, at in ((1, 10.0), (2, 30.0), (3, 20.0)):
        png = png_for(n)
        conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                     (key(n), png, "{}", hashlib.sha256(png).hexdigest(), len(png) + 2, at))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with SQLiteImageStore(db, max_bytes=1 << 20) as store:
        assert [(i.key, i.created) for i in store.recent(5)] == [(key(2), 30.0), (key(3), 20.0), (key(1), 10.0)]
        assert store.count() == 3 and store.get(key(1)) is not None


def test_read_now_tells_misses_and_small_entries_without_waiting_for_a_lock(db):
    """The front asks it on its event loop: a miss or a small entry is told at once, on a read-only
    connection that never waits for a lock; a bigger entry, a corrupt one (get() deletes it) or a
    closed store is left to get() on the pool."""
    store = SQLiteImageStore(db, max_bytes=1 << 20)
    assert store.read_now(key(1), 4096) == (True, None)
    store.put(key(1), png_for(1), {"n": 1})
    assert store.read_now(key(1), 4096) == (True, CachedImage(png_for(1), {"n": 1}))
    assert store.read_now(key(1), 100) == (False, None), "bigger than asked: the pool reads it"
    assert store.read_now(key(2), 4096) == (True, None)
    probe = store._probe_conn()
    assert probe.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        probe.execute("DELETE FROM images")
    raw = sqlite3.connect(str(db), isolation_level=None)
    raw.execute("UPDATE images SET png = ? WHERE key = ?", (b"not the bytes stored", key(1)))
    raw.close()
    assert store.read_now(key(1), 4096) == (False, None), "a corrupt entry is left to get()"
    assert store.get(key(1)) is None and store.read_now(key(1), 4096) == (True, None)
    store.close()
    assert store.read_now(key(2), 4096) == (False, None), "a closed store cannot say"
