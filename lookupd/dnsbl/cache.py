"""One answer cache for every client: TTL-bounded, size-bounded, with in-flight merging.

Keys are (zone, type, label) with the configured zone (never the DQS one, so the key stays
out of the snapshot) or "" for reverse DNS. Values are DnsAnswer with a wall-clock expiry.
Identical questions asked while one is on the wire wait for that one (one DNS packet).
The cache is saved to and loaded from state_dir by snapshot.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from cachetools import TLRUCache

from lookupd.dnsbl.answers import MAX_POSITIVE_TTL, DnsAnswer
from lookupd.outcome import Status

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str]


def _expiry(_key: CacheKey, value: DnsAnswer, _now: float) -> float:
    return value.expires


class AnswerCache:
    """TLRU cache of DnsAnswer plus the questions currently being asked."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cache: TLRUCache[CacheKey, DnsAnswer] = TLRUCache(maxsize, ttu=_expiry,
                                                                 timer=clock)
        self._inflight: dict[CacheKey, asyncio.Task[DnsAnswer]] = {}

    def __len__(self) -> int:
        self._cache.expire()
        return len(self._cache)

    @property
    def maxsize(self) -> int:
        return int(self._cache.maxsize)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def get(self, key: CacheKey) -> DnsAnswer | None:
        return self._cache.get(key)

    def put(self, key: CacheKey, answer: DnsAnswer) -> None:
        # TLRUCache silently skips values that are already expired (TTL 0, errors with
        # error_ttl 0): those are still shared by in-flight waiters, just not kept.
        self._cache[key] = answer

    async def fetch(self, key: CacheKey,
                    ask: Callable[[], Awaitable[DnsAnswer]]) -> tuple[DnsAnswer, bool]:
        """The cached answer, else the in-flight one, else ask; True when no packet was sent
        for this call. The question runs in its own task: a caller that gives up (deadline,
        disconnect) does not cancel it, so the answer still lands in the cache."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        task = self._inflight.get(key)
        merged = task is not None
        if task is None:
            task = asyncio.create_task(self._ask(key, ask))
            self._inflight[key] = task
        return await asyncio.shield(task), merged

    async def _ask(self, key: CacheKey, ask: Callable[[], Awaitable[DnsAnswer]]) -> DnsAnswer:
        try:
            answer = await ask()
        except Exception:
            # Not a DNS failure (those are values): a bug. Every waiter gets "unknown".
            logger.exception("DNSBL lookup of a %s record failed unexpectedly", key[1])
            answer = DnsAnswer(Status.UNKNOWN, reason="error", expires=0.0)
        finally:
            self._inflight.pop(key, None)
        self.put(key, answer)
        return answer

    def items(self) -> list[tuple[CacheKey, DnsAnswer]]:
        self._cache.expire()
        return list(self._cache.items())

    def load(self, entries: Iterable[tuple[CacheKey, DnsAnswer]]) -> int:
        count = 0
        for key, answer in entries:
            self.put(key, answer)
            count += 1
        return count

    def absorb(self, loaded: AnswerCache) -> None:
        """Take the answers of `loaded` (a cache of the same size filled in another thread,
        from the snapshot) under the ones this cache holds already, which are newer and win.
        Costs O(len(self)), not O(len(loaded)): the event loop never waits for a big load."""
        if loaded.maxsize != self.maxsize:
            raise ValueError("AnswerCache.absorb() needs a cache of the same size")
        cache = loaded._cache
        for key, answer in self._cache.items():
            cache[key] = answer
        self._cache = cache

    async def aclose(self) -> None:
        """Cancel the questions still on the wire (at shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()


def carry_over(entries: Iterable[tuple[CacheKey, DnsAnswer]], now: float, *,
               zones: Collection[str], negative_ttl_max: float,
               error_ttl: float) -> list[tuple[CacheKey, DnsAnswer]]:
    """The answers a reloaded source (or one loading the snapshot) keeps (pure): those of
    `zones` ("" is reverse DNS) still valid at `now`, kept no longer than the bounds allow
    (a listing a day, a NXDOMAIN negative_ttl_max, a failure error_ttl)."""
    kept: list[tuple[CacheKey, DnsAnswer]] = []
    for key, answer in entries:
        if key[0] not in zones or answer.expires <= now:
            continue
        bound = {Status.FOUND: MAX_POSITIVE_TTL, Status.NOT_FOUND: negative_ttl_max,
                 Status.UNKNOWN: error_ttl}[answer.status]
        if answer.expires > now + bound:
            answer = DnsAnswer(answer.status, answer.records, answer.reason, now + bound)
        kept.append((key, answer))
    return kept
