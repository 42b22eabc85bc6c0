"""One answer cache for every client: TTL-bounded, size-bounded, with in-flight merging.

Keys are (zone, type, label) with the configured zone (never the DQS one, so the key stays
out of the snapshot) or "" for reverse DNS. Values are DnsAnswer with a wall-clock expiry,
each in an Entry that also carries a list's verdict on it. Identical questions asked while
one is on the wire wait for that one (one DNS packet). The cache is saved to and loaded from
state_dir by snapshot.py.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from lookupd.dnsbl.answers import MAX_POSITIVE_TTL, DnsAnswer
from lookupd.dnsbl.verdict import KeptVerdict
from lookupd.outcome import Status

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str]


class Entry:
    """One cached answer, and what a list decided from it: kept with the answer, so it goes
    when the answer expires, is replaced or is evicted (see DnsblSource._peek_check)."""

    __slots__ = ("answer", "verdict")

    def __init__(self, answer: DnsAnswer) -> None:
        self.answer = answer
        self.verdict: KeptVerdict | None = None


class AnswerCache:
    """Least-recently-used cache of DnsAnswer, each until its expiry, plus the questions
    currently being asked.

    A plain dict in LRU order: its `get` costs a fraction of cachetools' TLRUCache's, and it
    is asked several times for every `connect` and `dnsbl`. Expired answers are never
    returned nor kept: they go when met, and when the cache is full (found through a heap of
    expiry times) before the least recently used. `changes` counts the answers that left or
    were replaced before their expiry: while it stays the same, every answer the cache gave
    out is still there until it expires, so what was decided from cached answers holds until
    their earliest expiry."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._maxsize = maxsize
        self._entries: dict[CacheKey, Entry] = {}
        # (expiry, key) of every answer put, stale ones included (skipped when met).
        self._expiry: list[tuple[float, CacheKey]] = []
        self._inflight: dict[CacheKey, asyncio.Task[DnsAnswer]] = {}
        self.changes = 0

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def get(self, key: CacheKey) -> DnsAnswer | None:
        entry = self.entry(key, self._clock())
        return None if entry is None else entry.answer

    def entry(self, key: CacheKey, now: float) -> Entry | None:
        """The entry of an answer unexpired at `now` (now the most recently used), else None."""
        entries = self._entries
        entry = entries.pop(key, None)
        if entry is None:
            return None
        if entry.answer.expires <= now:
            return None  # expired: dropped
        entries[key] = entry
        return entry

    def touch(self, keys: Iterable[CacheKey]) -> None:
        """Make these answers the most recently used (a reply given again without a lookup,
        lookupd/fastpath.py, used them): the busiest clients' answers are not the first to
        go when the cache is full."""
        entries = self._entries
        for key in keys:
            entry = entries.pop(key, None)
            if entry is not None:
                entries[key] = entry

    def put(self, key: CacheKey, answer: DnsAnswer) -> None:
        # An answer already expired (TTL 0, errors with error_ttl 0) is not kept, and takes
        # the key's older answer with it: it is still shared by the in-flight waiters.
        now = self._clock()
        old = self._entries.pop(key, None)
        if old is not None and old.answer.expires > now:
            self.changes += 1
        if answer.expires > now:
            self._insert(key, Entry(answer), now)

    def _insert(self, key: CacheKey, entry: Entry, now: float) -> None:
        entries = self._entries
        if len(entries) >= self._maxsize:
            self._expire(now)
            while len(entries) >= self._maxsize:
                del entries[next(iter(entries))]  # the least recently used, unexpired
                self.changes += 1
        entries[key] = entry
        heapq.heappush(self._expiry, (entry.answer.expires, key))

    def _expire(self, now: float) -> None:
        """Drop every answer expired at `now`."""
        entries, heap = self._entries, self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry.answer.expires <= now:
                del entries[key]
        if len(heap) > 2 * len(entries) + 64:  # mostly answers replaced or evicted
            self._expiry = [(entry.answer.expires, key) for key, entry in entries.items()]
            heapq.heapify(self._expiry)

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
        self._expire(self._clock())
        return [(key, entry.answer) for key, entry in self._entries.items()]

    def load(self, entries: Iterable[tuple[CacheKey, DnsAnswer]]) -> int:
        count = 0
        for key, answer in entries:
            self.put(key, answer)
            count += 1
        return count

    def absorb(self, loaded: AnswerCache) -> None:
        """Take the answers of `loaded` (a cache of the same size filled in another thread,
        from the snapshot) under the ones this cache holds already, which are newer and win.
        Costs O(len(self) log n), not O(len(loaded)): the event loop never waits for a big
        load. The live entries move as they are, with what was decided from them."""
        if loaded.maxsize != self.maxsize:
            raise ValueError("AnswerCache.absorb() needs a cache of the same size")
        now = self._clock()
        live, self._entries, self._expiry = self._entries, loaded._entries, loaded._expiry
        for key, entry in live.items():
            if entry.answer.expires > now:
                self._entries.pop(key, None)
                self._insert(key, entry, now)  # the same entry: what was decided holds

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
