"""The gateway's image cache: PNG plus metadata under sdgate's canonical cache key.

Two backends behind one interface. `SQLiteImageStore` is the embedded, durable default for one
machine (WAL, one connection per thread, safe to share between processes). `RedisImageStore`
is shared by several gateway nodes. Both verify a sha256 of every PNG they serve: a corrupt
entry is dropped and read as a miss, so the caller regenerates instead of sending bad bytes.
Both keep a byte budget, evicting the least recently used entries after each put.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import random
import re
import sqlite3
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import redis

from celery_bridge import lua, redis_keys
from celery_bridge.redis_check import require_redis_version

log = logging.getLogger(__name__)
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CachedImage:
    """One cache entry as served: the PNG bytes and the metadata stored with them."""

    png: bytes
    meta: dict


@dataclass(frozen=True)
class ListedImage:
    """One entry of a listing, newest first: its key, when it was first stored (unix s) and its metadata."""

    key: str
    created: float
    meta: dict


class ImageStore(abc.ABC):
    """A byte-budgeted LRU of PNGs keyed by the canonical cache key; every hit is checksummed."""

    corrupt_dropped: int = 0  # entries that failed their checksum (or whose meta was unreadable)

    @abc.abstractmethod
    def get(self, key: str) -> Optional[CachedImage]:
        """The entry for `key`, or None when absent or corrupt (a corrupt entry is deleted)."""

    def read_now(self, key: str, max_bytes: int) -> Tuple[bool, Optional[CachedImage]]:
        """(told, entry): `key`'s entry, or None when it is certainly not stored, read at once (no
        network, no lock waits, at most `max_bytes` read and checked), so an event loop may ask:
        a miss or a small hit then skips the read pool. told=False: this store cannot say so
        (the entry is bigger, unreadable, or the store is remote): ask get() on a pool."""
        return False, None

    @abc.abstractmethod
    def put(self, key: str, png: bytes, meta: dict) -> None:
        """Store atomically (replacing any entry for `key`), then evict down to the byte budget."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the entry for `key` if there is one."""

    @abc.abstractmethod
    def total_bytes(self) -> int:
        """Bytes held by all entries (PNG plus metadata), the figure the budget bounds."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many entries the store holds."""

    @abc.abstractmethod
    def recent(self, limit: int, before: Optional[Tuple[float, str]] = None) -> List[ListedImage]:
        """Up to `limit` entries, newest first, strictly older than the (created, key) `before`.

        A listing reads metadata only: it neither verifies checksums nor counts as an access.
        """

    @abc.abstractmethod
    def metas(self, keys: List[str]) -> List[Optional[dict]]:
        """The metadata of each of `keys` (None where absent or unreadable), read as a listing reads it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and background threads; the store is unusable afterwards."""

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def open_store(kind: str, *, path: Optional[Union[str, Path]] = None, redis_url: Optional[str] = None,
               max_bytes: int) -> ImageStore:
    """The store named by the gateway's `cache_backend`: "sqlite" (needs path) or "redis" (needs redis_url)."""
    if kind == "sqlite":
        if path is None:
            raise ValueError("cache_backend 'sqlite' needs a database path (gateway cache_path)")
        return SQLiteImageStore(Path(path), max_bytes)
    if kind == "redis":
        if not redis_url:
            raise ValueError("cache_backend 'redis' needs a Redis URL, e.g. redis://host:6379/0")
        return RedisImageStore(redis_url, max_bytes)
    raise ValueError(f"unknown cache_backend {kind!r}: use 'sqlite' (one machine) or 'redis' "
                     "(several gateway nodes) in configs/gateway.yaml or SDGATE_CACHE_BACKEND")


def _check_key(key: str) -> None:
    # The key names Redis keys next to `<prefix>lru`; a stray value must not collide with them.
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"cache keys are 64 lowercase hex chars (GenerationRequest.cache_key()); got {key!r:.80}")


def _check_listing(limit: int, before: Optional[Tuple[float, str]]) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive number of entries; got {limit!r}")
    if before is not None:
        _check_key(before[1])


def _check_budget(max_bytes: int) -> None:
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive number of bytes (gateway cache_max_bytes); got {max_bytes!r}")


def _meta_bytes(meta: dict) -> bytes:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_meta(raw: Union[str, bytes]) -> Optional[dict]:
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


# ---------------------------------------------------------------------------------------------
# SQLite: one machine, durable, shared by the gateway's threads and processes
# ---------------------------------------------------------------------------------------------

# Version 2 added `created` (when the key was first stored), for the gallery's newest-first listing.
_SCHEMA_VERSION = 2
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
        key TEXT PRIMARY KEY, png BLOB NOT NULL, meta TEXT NOT NULL, sha256 TEXT NOT NULL,
        size INTEGER NOT NULL, last_access REAL NOT NULL, created REAL NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS images_by_access ON images (last_access)",
    # Running totals kept by triggers, in the same transaction as the change that moves them,
    # so no process ever sees a total that disagrees with the rows.
    """CREATE TABLE IF NOT EXISTS totals (
        id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL, entries INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO totals SELECT 0, coalesce(sum(size), 0), count(*) FROM images",
    """CREATE TRIGGER IF NOT EXISTS images_insert AFTER INSERT ON images BEGIN
        UPDATE totals SET bytes = bytes + new.size, entries = entries + 1 WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS images_delete AFTER DELETE ON images BEGIN
        UPDATE totals SET bytes = bytes - old.size, entries = entries - 1 WHERE id = 0; END""",
    """CREATE TRIGGER IF NOT EXISTS images_resize AFTER UPDATE OF size ON images BEGIN
        UPDATE totals SET bytes = bytes - old.size + new.size WHERE id = 0; END""",
)
# A version 1 file lacks `created`: its entries count as created when last used.
_ADD_CREATED = ("ALTER TABLE images ADD COLUMN created REAL NOT NULL DEFAULT 0",
                "UPDATE images SET created = last_access")
_INDEX_CREATED = "CREATE INDEX IF NOT EXISTS images_by_created ON images (created, key)"
# `created` stays at the first put: a re-put (after a corrupt read) is the same image.
_LIST = """SELECT key, created, CAST(meta AS BLOB) FROM images WHERE created < ?1 OR (created = ?1 AND key < ?2)
    ORDER BY created DESC, key DESC LIMIT ?3"""
# An upsert rather than INSERT OR REPLACE: REPLACE's implicit delete skips the delete trigger
# unless recursive_triggers is on, which would leave the running total wrong.
_UPSERT = """INSERT INTO images (key, png, meta, sha256, size, last_access, created) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET png = excluded.png, meta = excluded.meta, sha256 = excluded.sha256,
    size = excluded.size, last_access = excluded.last_access"""
# CASTs: a damaged row may hold text where bytes belong; read it as bytes and let the checksum judge.
_METAS = "SELECT key, CAST(meta AS BLOB) FROM images WHERE key IN ({marks})"
_SELECT = "SELECT CAST(png AS BLOB), CAST(meta AS BLOB), CAST(sha256 AS BLOB) FROM images WHERE key = ?"
_SELECT_SMALL = ("SELECT size, CASE WHEN size <= ?2 THEN CAST(png AS BLOB) END, CAST(meta AS BLOB), "
                 "CAST(sha256 AS BLOB) FROM images WHERE key = ?1")
_TOUCH = "UPDATE images SET last_access = ?1 WHERE key = ?2 AND last_access < ?1"
_BUSY_TIMEOUT_MS = 2000
_LOCKED_RETRY_S = 10.0
_ACCESS_FLUSH_S = 1.0


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class SQLiteImageStore(ImageStore):
    """The embedded default: one SQLite file in WAL mode, safe across threads and processes.

    Hits never write: access times are kept in memory and flushed at most once a second (and
    before every put), so LRU order across processes is right to within that second.
    Open it after forking, not before: connections do not survive a fork.
    """

    def __init__(self, path: Path, max_bytes: int):
        _check_budget(max_bytes)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.corrupt_dropped = 0
        self._local = threading.local()
        self._conns: List[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._touched: Dict[str, float] = {}
        self._touched_lock = threading.Lock()
        self._closed = False

        # 1. The file, its schema, and the budget (a reopen may come with a smaller one).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(self._create_schema)
        self._write(lambda conn: self._evict(conn, keep=None))

        # 2. The access-time flusher; it holds only a weak reference, so a forgotten store is freed.
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=_flush_loop, args=(weakref.ref(self), self._stop),
                                         name="sdgate-store-lru", daemon=True)
        self._flusher.start()

    # -- the interface --------------------------------------------------------------------------

    def get(self, key: str) -> Optional[CachedImage]:
        _check_key(key)
        conn = self._conn()
        try:
            row = conn.execute(_SELECT, (key,)).fetchone()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            row = self._retrying(lambda: conn.execute(_SELECT, (key,)).fetchone())
        if row is None:
            return None
        entry = self._verified(key, row)
        if entry is None:
            self._drop_corrupt(key, row)
        return entry

    def read_now(self, key: str, max_bytes: int) -> Tuple[bool, Optional[CachedImage]]:
        """One statement on a read-only connection of the calling thread that never waits for a
        lock; the PNG is read only when the entry is small enough. A corrupt entry is left to get()
        (which deletes it: a write)."""
        _check_key(key)
        try:
            row = self._probe_conn().execute(_SELECT_SMALL, (key, max_bytes)).fetchone()
        except sqlite3.Error:  # busy, or anything else: get() on the pool will say
            return False, None
        if row is None:
            return True, None
        if row[0] > max_bytes:
            return False, None
        entry = self._verified(key, row[1:])
        return (True, entry) if entry is not None else (False, None)

    def _verified(self, key: str, row: Tuple[Any, Any, Any]) -> Optional[CachedImage]:
        """The entry of a (png, meta, sha256) row whose checksum and metadata verify, its access
        time noted for the LRU; None for a corrupt one."""
        png, raw_meta, checksum = row
        meta = _parse_meta(raw_meta) if raw_meta is not None else None
        if meta is None or png is None or hashlib.sha256(png).hexdigest().encode() != checksum:
            return None
        now = time.time()
        with self._touched_lock:
            self._touched[key] = now
        return CachedImage(png, meta)

    def put(self, key: str, png: bytes, meta: dict) -> None:
        _check_key(key)
        png = bytes(png)
        raw_meta = _meta_bytes(meta).decode("utf-8")
        size = len(png) + len(raw_meta)
        if size > self.max_bytes:
            log.warning("not caching %s: %d bytes exceed the whole cache budget of %d (cache_max_bytes)",
                        key[:12], size, self.max_bytes)
            return
        now = time.time()
        row = (key, png, raw_meta, hashlib.sha256(png).hexdigest(), size, now, now)
        touched = self._take_touched()

        def body(conn: sqlite3.Connection) -> None:
            # Recent hits first, so eviction sees them; then the entry; then the budget.
            if touched:
                conn.executemany(_TOUCH, [(at, k) for k, at in touched.items()])
            conn.execute(_UPSERT, row)
            self._evict(conn, keep=key)

        try:
            self._write(body)
        except BaseException:
            self._restore_touched(touched)
            raise

    def delete(self, key: str) -> None:
        _check_key(key)
        self._write(lambda conn: conn.execute("DELETE FROM images WHERE key = ?", (key,)))
        with self._touched_lock:
            self._touched.pop(key, None)

    def total_bytes(self) -> int:
        return self._totals()[0]

    def count(self) -> int:
        return self._totals()[1]

    def recent(self, limit: int, before: Optional[Tuple[float, str]] = None) -> List[ListedImage]:
        _check_listing(limit, before)
        created, key = before if before is not None else (float("inf"), "")
        conn = self._conn()
        rows = self._retrying(lambda: conn.execute(_LIST, (created, key, limit)).fetchall())
        listed = []
        for key, created, raw_meta in rows:
            meta = _parse_meta(raw_meta) if raw_meta is not None else None
            if meta is not None:  # an unreadable one is dropped by the next get()
                listed.append(ListedImage(key, created, meta))
        return listed

    def metas(self, keys: List[str]) -> List[Optional[dict]]:
        if not keys:
            return []
        conn = self._conn()
        query = _METAS.format(marks=",".join("?" * len(keys)))
        found = dict(self._retrying(lambda: conn.execute(query, keys).fetchall()))
        return [_parse_meta(found[key]) if found.get(key) is not None else None for key in keys]

    def integrity_check(self) -> bool:
        """True when SQLite's PRAGMA integrity_check finds the file sound."""
        conn = self._conn()
        rows = self._retrying(lambda: conn.execute("PRAGMA integrity_check").fetchall())
        if rows != [("ok",)]:
            log.error("image cache %s failed integrity_check: %s", self.path, rows[:10])
            return False
        return True

    def flush_access_times(self) -> None:
        """Write the in-memory access times of recent hits, so eviction in any process sees them."""
        touched = self._take_touched()
        if not touched:
            return
        try:
            self._write(lambda conn: conn.executemany(_TOUCH, [(at, k) for k, at in touched.items()]))
        except BaseException:
            self._restore_touched(touched)
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join(timeout=_LOCKED_RETRY_S + 5)
        try:
            self.flush_access_times()
        except sqlite3.Error as exc:
            log.warning("could not save recent access times of %s (%s); LRU order may be slightly off",
                        self.path, exc)
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- internals ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeError(f"the image store {self.path} is closed")
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a reader never holds a
        # transaction open and a writer takes the lock up front instead of failing to upgrade.
        # check_same_thread=False only so close() may close it; each thread uses its own.
        conn = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = self._retrying(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(
                    f"{self.path} could not switch to WAL (journal_mode is {mode}); put the cache on a "
                    "local filesystem (WAL needs shared memory, which network filesystems lack)")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        with self._conns_lock:
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    def _probe_conn(self) -> sqlite3.Connection:
        """The calling thread's connection for read_now: read only, and busy at once rather
        than waiting (the file is in WAL mode already: its writers never block its readers)."""
        conn = getattr(self._local, "probe", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError(f"the image store {self.path} is closed")
            conn = sqlite3.connect(str(self.path), timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            with self._conns_lock:
                self._conns.append(conn)
            self._local.probe = conn
        return conn

    def _retrying(self, operation: Callable[[], Any]) -> Any:
        # busy_timeout covers ordinary waits; SQLite still answers `locked` at once in a few
        # cases (WAL recovery after a crash, a checkpoint racing a writer), so retry briefly.
        deadline = time.monotonic() + _LOCKED_RETRY_S
        delay = 0.002
        while True:
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError(
                        f"the image cache {self.path} stayed locked for {_LOCKED_RETRY_S:.0f} s ({exc}); "
                        "another process holds a long write transaction, or the file is on a filesystem "
                        "without working locks") from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)

    def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `body` in one IMMEDIATE transaction, retried whole if the database is locked."""
        conn = self._conn()

        def attempt() -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._retrying(attempt)

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise RuntimeError(f"the image cache was written by a newer sdgate (schema {version}, this one "
                               f"reads {_SCHEMA_VERSION}); upgrade this node or point cache_path elsewhere")
        for statement in _SCHEMA:
            conn.execute(statement)
        if "created" not in {row[1] for row in conn.execute("PRAGMA table_info(images)")}:
            for statement in _ADD_CREATED:
                conn.execute(statement)
        conn.execute(_INDEX_CREATED)
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _evict(self, conn: sqlite3.Connection, keep: Optional[str]) -> None:
        """Inside a write transaction: delete least recently used rows until within budget."""
        total = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0]
        excess = total - self.max_bytes
        if excess <= 0:
            return
        victims: List[Tuple[str]] = []
        for key, size in conn.execute("SELECT key, size FROM images ORDER BY last_access, key"):
            if key == keep:
                continue
            victims.append((key,))
            excess -= size
            if excess <= 0:
                break
        conn.executemany("DELETE FROM images WHERE key = ?", victims)
        with self._touched_lock:
            for (key,) in victims:
                self._touched.pop(key, None)

    def _drop_corrupt(self, key: str, row: Tuple[Any, Any, Any]) -> None:
        # Delete only the exact row we read: a good image put since then must survive.
        png, raw_meta, checksum = row
        self._write(lambda conn: conn.execute(
            "DELETE FROM images WHERE key = ? AND CAST(png AS BLOB) IS ? AND CAST(meta AS BLOB) IS ? "
            "AND CAST(sha256 AS BLOB) IS ?",
            (key, png, raw_meta, checksum)))
        self.corrupt_dropped += 1
        log.warning("dropped corrupt cache entry %s from %s (checksum or metadata did not verify); "
                    "it will be regenerated", key[:12], self.path)

    def _totals(self) -> Tuple[int, int]:
        conn = self._conn()
        return self._retrying(lambda: conn.execute("SELECT bytes, entries FROM totals WHERE id = 0").fetchone())

    def _take_touched(self) -> Dict[str, float]:
        with self._touched_lock:
            touched, self._touched = self._touched, {}
        return touched

    def _restore_touched(self, touched: Dict[str, float]) -> None:
        with self._touched_lock:
            for key, at in touched.items():
                if self._touched.get(key, 0.0) < at:
                    self._touched[key] = at


def _flush_loop(ref: "weakref.ref[SQLiteImageStore]", stop: threading.Event) -> None:
    while not stop.wait(_ACCESS_FLUSH_S):
        store = ref()
        if store is None:
            return
        try:
            store.flush_access_times()
        except Exception as exc:  # noqa: BLE001 - kept for the next round; never kills the thread
            log.warning("could not flush access times of %s (%s); retrying", store.path, exc)
        del store


# ---------------------------------------------------------------------------------------------
# Redis: one cache shared by several gateway nodes
# ---------------------------------------------------------------------------------------------

# Entry value: >I meta length | meta JSON | sha256(png), 32 bytes | png. No pickle.
_HEADER = struct.Struct(">I")
_DIGEST_LEN = 32
_META_PEEK = 4096  # bytes of metadata a listing reads in its first round trip

# KEYS: entry, lru, bytes, sizes, created. ARGV: value, now, max_bytes, member, entry prefix.
# One script: the write, the accounting and the eviction happen together, so two gateways
# putting at once can neither double-evict nor let the counter drift from the entries.
# Entry keys of victims are derived from the prefix (fine on standalone/sentinel Redis).
_PUT_SCRIPT = """
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
redis.call('ZADD', KEYS[5], 'NX', ARGV[2], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[4], size)
local total = redis.call('INCRBY', KEYS[3], size - old)
local budget = tonumber(ARGV[3])
local evicted = 0
while total > budget do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 1)
  local victim = oldest[1]
  if victim == ARGV[4] then victim = oldest[2] end
  if not victim then break end
  local victim_size = tonumber(redis.call('HGET', KEYS[4], victim) or '0')
  redis.call('DEL', ARGV[5] .. victim)
  redis.call('ZREM', KEYS[2], victim)
  redis.call('ZREM', KEYS[5], victim)
  redis.call('HDEL', KEYS[4], victim)
  total = redis.call('DECRBY', KEYS[3], victim_size)
  evicted = evicted + 1
end
return evicted
"""
# KEYS: lru. ARGV: now, member. What `ZADD XX GT` does on Redis >= 6.2, for Redis 5 and 6.0:
# never re-add an entry evicted meanwhile (XX); never age an entry from a node with a late clock (GT).
_TOUCH_SCRIPT = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[2])
if current and tonumber(current) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: entry, lru, bytes, sizes, created. ARGV: member, expected value ('' = any).
_DELETE_SCRIPT = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
local size = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('HDEL', KEYS[4], ARGV[1]) == 1 then redis.call('DECRBY', KEYS[3], size) end
return 1
"""


def _pack(png: bytes, meta_json: bytes) -> bytes:
    return b"".join((_HEADER.pack(len(meta_json)), meta_json, hashlib.sha256(png).digest(), png))


def _unpack(value: bytes) -> Optional[CachedImage]:
    """The entry in `value`, or None when it is truncated, tampered with or unreadable."""
    if len(value) < _HEADER.size + _DIGEST_LEN:
        return None
    (meta_len,) = _HEADER.unpack_from(value)
    png_at = _HEADER.size + meta_len + _DIGEST_LEN
    if png_at > len(value):
        return None
    digest = value[png_at - _DIGEST_LEN:png_at]
    png = value[png_at:]
    if hashlib.sha256(png).digest() != digest:
        return None
    meta = _parse_meta(value[_HEADER.size:png_at - _DIGEST_LEN])
    return CachedImage(png, meta) if meta is not None else None


class RedisImageStore(ImageStore):
    """A cache shared by several gateway nodes: one Redis value per entry, LRU in a sorted set.

    Layout under `prefix`: `<key>` (the entry), `lru` (zset key -> last access), `created` (zset
    key -> first put, for listings), `sizes` (hash key -> counted bytes) and `bytes` (their sum,
    the figure the budget bounds).
    """

    def __init__(self, client: Union[str, Callable[[], redis.Redis]], max_bytes: int,
                 prefix: str = redis_keys.IMAGE):
        _check_budget(max_bytes)
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.corrupt_dropped = 0
        if isinstance(client, str):
            # Bounded waits: a dead Redis must turn a hit into a miss quickly, not hang a handler.
            self._client = redis.Redis.from_url(client, socket_timeout=5, socket_connect_timeout=2,
                                                health_check_interval=30)
        elif callable(client):
            self._client = client()
        else:
            raise TypeError(f"RedisImageStore needs a redis:// URL or a client factory, got {type(client).__name__}")
        self._lru, self._bytes, self._sizes = prefix + "lru", prefix + "bytes", prefix + "sizes"
        self._created = prefix + "created"
        self._put_script = self._client.register_script(_PUT_SCRIPT)
        self._delete_script = self._client.register_script(_DELETE_SCRIPT)
        self._touch_script = self._client.register_script(_TOUCH_SCRIPT)
        require_redis_version(self._client, "the Redis image cache")

    def get(self, key: str) -> Optional[CachedImage]:
        _check_key(key)
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self.prefix + key)
        lua.call(self._touch_script, [self._lru], [repr(time.time()), key], pipe)
        value, _ = pipe.execute()
        if value is None:
            return None
        image = _unpack(value)
        if image is None:
            self._drop(key, expected=value)
            self.corrupt_dropped += 1
            log.warning("dropped corrupt cache entry %s from Redis (checksum or metadata did not verify); "
                        "it will be regenerated", key[:12])
        return image

    def put(self, key: str, png: bytes, meta: dict) -> None:
        _check_key(key)
        value = _pack(bytes(png), _meta_bytes(meta))
        if len(value) > self.max_bytes:
            log.warning("not caching %s: %d bytes exceed the whole cache budget of %d (cache_max_bytes)",
                        key[:12], len(value), self.max_bytes)
            return
        self._put_script(keys=[self.prefix + key, self._lru, self._bytes, self._sizes, self._created],
                         args=[value, repr(time.time()), self.max_bytes, key, self.prefix])

    def delete(self, key: str) -> None:
        _check_key(key)
        self._drop(key, expected=b"")

    def total_bytes(self) -> int:
        return int(self._client.get(self._bytes) or 0)

    def count(self) -> int:
        return int(self._client.zcard(self._lru))

    def recent(self, limit: int, before: Optional[Tuple[float, str]] = None) -> List[ListedImage]:
        _check_listing(limit, before)
        top = "+inf" if before is None else repr(before[0])
        listed: List[ListedImage] = []
        offset = 0
        while len(listed) < limit:
            # Ties on the score come in descending key order, as the cursor expects.
            batch = self._client.zrevrangebyscore(self._created, top, "-inf", start=offset, num=limit,
                                                  withscores=True)
            if not batch:
                break
            offset += len(batch)
            members = [(m.decode() if isinstance(m, bytes) else m, score) for m, score in batch]
            members = [(k, score) for k, score in members
                       if before is None or score < before[0] or k < before[1]]
            for (k, score), meta in zip(members, self.metas([k for k, _ in members])):
                if meta is not None and len(listed) < limit:
                    listed.append(ListedImage(k, score, meta))
        return listed

    def metas(self, keys: List[str]) -> List[Optional[dict]]:
        """Read by range (not the PNG)."""
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.getrange(self.prefix + key, 0, _HEADER.size + _META_PEEK - 1)
        metas: List[Optional[dict]] = []
        for key, head in zip(keys, pipe.execute()):
            if len(head) < _HEADER.size:
                metas.append(None)
                continue
            (meta_len,) = _HEADER.unpack_from(head)
            raw = head[_HEADER.size:_HEADER.size + meta_len]
            if len(raw) < meta_len:  # a long one: read the rest
                raw = self._client.getrange(self.prefix + key, _HEADER.size, _HEADER.size + meta_len - 1)
            metas.append(_parse_meta(raw) if len(raw) == meta_len else None)
        return metas

    def close(self) -> None:
        self._client.close()

    def _drop(self, key: str, expected: bytes) -> None:
        # With `expected`, only that exact value goes: a good image put since the read survives.
        self._delete_script(keys=[self.prefix + key, self._lru, self._bytes, self._sizes, self._created],
                            args=[key, expected])
