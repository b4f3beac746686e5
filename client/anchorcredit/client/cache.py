"""Result caches: an in-process LRU bounded in bytes (the default) and Redis.

Both speak the same two-call protocol (`get_many`, `set_many`) on opaque bytes values, so a
caller can plug its own. A cache may lose or refuse anything: the client treats every error
as a miss and never fails a call because of the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import cachetools

log = logging.getLogger("anchorcredit.client.cache")

DEFAULT_TTL_S = 7 * 24 * 3600  # one policy version rarely lives longer than a few hours
DEFAULT_LRU_BYTES = 256 * 1024 * 1024
ENTRY_OVERHEAD = 128  # key (~80 B) + dict entry, charged per value so many tiny values still count


@runtime_checkable
class CreditCache(Protocol):
    """What the client needs from a cache."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for keys, None where missing; same order."""
        ...

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store the (key, value) pairs; best effort."""
        ...


class LRUBytesCache:
    """Thread-safe in-process LRU whose size is the total bytes of keys and values."""

    def __init__(self, max_bytes: int = DEFAULT_LRU_BYTES):
        # cachetools evicts least-recently-used entries until the summed getsizeof fits.
        self._lru: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=max_bytes, getsizeof=lambda v: len(v) + ENTRY_OVERHEAD
        )
        self._lock = threading.Lock()
        self.max_bytes = max_bytes

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            return [self._lru.get(k) for k in keys]

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            for k, v in items:
                # a value larger than the whole cache makes cachetools raise: skip it
                if len(v) + ENTRY_OVERHEAD <= self.max_bytes:
                    self._lru[k] = v

    @property
    def current_bytes(self) -> int:
        """Bytes charged now (values + ENTRY_OVERHEAD each)."""
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)


class RedisCache:
    """Redis-backed cache: MGET for reads, a non-transactional pipeline of SET EX for writes.

    Short socket timeouts keep a slow Redis from stalling training; after an error Redis is
    skipped for `retry_after_s` (a dead server would otherwise cost a connect attempt on every
    call) and the outage is logged once, its end once.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        ttl_s: int = DEFAULT_TTL_S,
        socket_timeout_s: float = 0.5,
        retry_after_s: float = 5.0,
        client: Any = None,
    ):
        import redis

        self.ttl_s = int(ttl_s)
        self.retry_after_s = retry_after_s
        self._redis = client or redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()
        self.url = url

    def _available(self) -> bool:
        return not self._down or time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            if not self._down:
                log.warning(
                    "redis cache at %s unavailable (%s: %s); serving from the service, "
                    "retrying redis every %.0f s",
                    self.url,
                    type(exc).__name__,
                    exc,
                    self.retry_after_s,
                )
            self._down = True
            self._down_until = time.monotonic() + self.retry_after_s

    def _ok(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("redis cache at %s is back", self.url)
                self._down = False

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = self._redis.mget(list(keys))
        except Exception as exc:  # any redis/socket error is a miss, never a failed call
            self._failed(exc)
            return [None] * len(keys)
        self._ok()
        return [v if isinstance(v, bytes) else None for v in values]

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items or not self._available():
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for k, v in items:
                pipe.set(k, v, ex=self.ttl_s)
            pipe.execute()
        except Exception as exc:
            self._failed(exc)
            return
        self._ok()

    def close(self) -> None:
        try:
            self._redis.close()
        except Exception:  # closing a dead connection is not worth an error
            pass


def make_cache(cache: Any, ttl_s: int = DEFAULT_TTL_S) -> CreditCache | None:
    """None -> in-process LRU; "redis://..." / "rediss://..." / "unix://..." -> Redis;
    False -> no cache; an object with get_many/set_many -> itself."""
    if cache is None:
        return LRUBytesCache()
    if cache is False:
        return None
    if isinstance(cache, str):
        if cache.startswith(("redis://", "rediss://", "unix://")):
            return RedisCache(cache, ttl_s=ttl_s)
        raise ValueError(f"cache must be a redis://, rediss:// or unix:// URL, got {cache!r}")
    if isinstance(cache, CreditCache):
        return cache
    raise TypeError(f"cache must be None, False, a redis URL or a CreditCache, got {type(cache)}")
