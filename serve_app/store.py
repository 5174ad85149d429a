"""The image cache: PNGs under their canonical cache key, with metadata and a checksum.

`SQLiteImageStore` is the embedded, durable default for one machine (WAL mode, shared safely
by every replica process on it); `RedisImageStore` is the option for several gateway nodes.
Both are bounded by a byte budget with least-recently-used eviction, write each entry in one
atomic step, and verify the checksum on every read: a corrupt entry is dropped, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """A cached PNG and the metadata it was generated with."""

    png: bytes
    meta: dict


class ImageStore(ABC):
    """What the gateway needs from a cache backend."""

    corrupt_dropped = 0

    @abstractmethod
    def get(self, key: str) -> Optional[CachedImage]: ...

    @abstractmethod
    def put(self, key: str, png: bytes, meta: dict) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def total_bytes(self) -> int: ...

    @abstractmethod
    def count(self) -> int: ...

    def close(self) -> None:
        pass

    def _drop_corrupt(self, key: str, why: str) -> None:
        log.warning("cache entry %s is corrupt (%s); dropped, it will be regenerated", key[:12], why)
        self.corrupt_dropped += 1
        self.delete(key)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY, png BLOB NOT NULL, meta TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, last_access REAL NOT NULL);
CREATE INDEX IF NOT EXISTS images_lru ON images(last_access);
"""
ACCESS_FLUSH_S = 1.0


class SQLiteImageStore(ImageStore):
    """SQLite in WAL mode: one connection per thread; access times batched off the hit path."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._local = threading.local()
        self._accessed: Dict[str, float] = {}
        self._accessed_lock = threading.Lock()
        self._last_access_flush = time.monotonic()
        with self._connection() as conn:
            conn.executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> Optional[CachedImage]:
        row = self._connection().execute("SELECT png, meta, sha256 FROM images WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        png, meta_text, checksum = row
        if hashlib.sha256(png).hexdigest() != checksum:
            self._drop_corrupt(key, "checksum mismatch")
            return None
        try:
            meta = json.loads(meta_text)
        except ValueError:
            self._drop_corrupt(key, "unreadable metadata")
            return None
        with self._accessed_lock:
            self._accessed[key] = time.time()
        if time.monotonic() - self._last_access_flush > ACCESS_FLUSH_S:
            self._flush_access_times()
        return CachedImage(bytes(png), meta)

    def put(self, key: str, png: bytes, meta: dict) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.execute("INSERT OR REPLACE INTO images(key, png, meta, sha256, size, last_access) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (key, png, json.dumps(meta), hashlib.sha256(png).hexdigest(), len(png), time.time()))
        self._flush_access_times()
        self._evict()

    def delete(self, key: str) -> None:
        self._connection().execute("DELETE FROM images WHERE key=?", (key,))

    def total_bytes(self) -> int:
        return int(self._connection().execute("SELECT COALESCE(SUM(size), 0) FROM images").fetchone()[0])

    def count(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def integrity_check(self) -> bool:
        return self._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        self._flush_access_times()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _flush_access_times(self) -> None:
        with self._accessed_lock:
            batch, self._accessed = self._accessed, {}
            self._last_access_flush = time.monotonic()
        if batch:
            conn = self._connection()
            with _transaction(conn):
                conn.executemany("UPDATE images SET last_access=? WHERE key=?", [(t, k) for k, t in batch.items()])

    def _evict(self) -> None:
        conn = self._connection()
        excess = self.total_bytes() - self.max_bytes
        if excess <= 0:
            return
        with _transaction(conn):
            freed = 0
            for key, size in conn.execute("SELECT key, size FROM images ORDER BY last_access ASC").fetchall():
                if freed >= excess:
                    break
                conn.execute("DELETE FROM images WHERE key=?", (key,))
                freed += size


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (autocommit connections)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


_ENVELOPE_HEAD = struct.Struct(">I")  # metadata length; then metadata JSON, sha256 digest, PNG
# Evict least-recently-used entries until the byte counter is within budget, atomically.
_EVICT = """
local budget = tonumber(ARGV[1])
local total = tonumber(redis.call('get', KEYS[2]) or '0')
while total > budget do
  local oldest = redis.call('zrange', KEYS[1], 0, 0)
  if #oldest == 0 then break end
  local key = ARGV[2] .. oldest[1]
  local size = redis.call('strlen', key)
  redis.call('del', key)
  redis.call('zrem', KEYS[1], oldest[1])
  total = redis.call('decrby', KEYS[2], size)
end
return total
"""
# Replace an entry and keep the byte counter equal to the sum of entry sizes.
_PUT = """
local old = redis.call('strlen', KEYS[1])
redis.call('set', KEYS[1], ARGV[1])
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
return redis.call('incrby', KEYS[3], string.len(ARGV[1]) - old)
"""
_DELETE = """
local old = redis.call('strlen', KEYS[1])
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
if old > 0 then redis.call('decrby', KEYS[3], old) end
return old
"""


class RedisImageStore(ImageStore):
    """One Redis value per entry (an envelope with its checksum), an LRU zset, a byte counter."""

    def __init__(self, url: str, max_bytes: int, prefix: str = "sdgate:img:"):
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.max_bytes = max_bytes
        self.prefix = prefix
        self._lru, self._bytes = f"{prefix}lru", f"{prefix}bytes"
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._evict = self.client.register_script(_EVICT)

    def _entry(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def get(self, key: str) -> Optional[CachedImage]:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._entry(key))
        pipe.zadd(self._lru, {key: time.time()}, xx=True)
        value = pipe.execute()[0]
        if value is None:
            return None
        try:
            (meta_len,) = _ENVELOPE_HEAD.unpack_from(value)
            meta_end = _ENVELOPE_HEAD.size + meta_len
            meta = json.loads(value[_ENVELOPE_HEAD.size:meta_end])
            digest, png = value[meta_end:meta_end + 32], value[meta_end + 32:]
        except (struct.error, ValueError):
            self._drop_corrupt(key, "unreadable envelope")
            return None
        if hashlib.sha256(png).digest() != digest:
            self._drop_corrupt(key, "checksum mismatch")
            return None
        return CachedImage(png, meta)

    def put(self, key: str, png: bytes, meta: dict) -> None:
        meta_bytes = json.dumps(meta).encode()
        envelope = _ENVELOPE_HEAD.pack(len(meta_bytes)) + meta_bytes + hashlib.sha256(png).digest() + png
        self._put(keys=[self._entry(key), self._lru, self._bytes], args=[envelope, time.time(), key])
        self._evict(keys=[self._lru, self._bytes], args=[self.max_bytes, f"{self.prefix}e:"])

    def delete(self, key: str) -> None:
        self._delete(keys=[self._entry(key), self._lru, self._bytes], args=[key])

    def total_bytes(self) -> int:
        return int(self.client.get(self._bytes) or 0)

    def count(self) -> int:
        return int(self.client.zcard(self._lru))

    def close(self) -> None:
        self.client.close()


def open_store(kind: str, *, path: Optional[Path] = None, redis_url: Optional[str] = None,
               max_bytes: int) -> ImageStore:
    """The configured cache backend: "sqlite" (needs path) or "redis" (needs redis_url)."""
    if kind == "sqlite":
        if path is None:
            raise ValueError("the sqlite cache needs a path (gateway.yaml cache_path)")
        return SQLiteImageStore(path, max_bytes)
    if kind == "redis":
        if not redis_url:
            raise ValueError("the redis cache needs a Redis URL (SDGATE_REDIS_URL)")
        return RedisImageStore(redis_url, max_bytes)
    raise ValueError(f"cache_backend {kind!r} must be 'sqlite' or 'redis'")
