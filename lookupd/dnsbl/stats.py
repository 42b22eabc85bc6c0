"""Per-list counters and latency percentiles, and the typed snapshot `stats` returns."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Latency percentiles are over the most recent DNS questions of each list.
LATENCY_WINDOW = 1024


@dataclass
class ListCounters:
    """Mutable counters of one list (only the event loop touches them)."""

    queries: int = 0
    hits: int = 0
    errors: int = 0
    timeouts: int = 0
    cache_hits: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class ListStats:
    """One list's figures: answers asked of it, hits, errors (servfail, refused, error
    codes...), timeouts, the share answered without a DNS packet, health, and the DNS
    round-trip percentiles in milliseconds."""

    name: str
    kind: str
    queries: int
    hits: int
    errors: int
    timeouts: int
    cache_hit_rate: float
    quarantine: str
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class DnsblStats:
    """Every list's figures, the cache's, and the resolver's: `resolver` is "" while it
    answers, else why every list is unknown ("no-nameserver", "no-list-answers");
    `silent` names the nameservers that did not answer the last liveness question."""

    lists: tuple[ListStats, ...]
    cache_entries: int
    cache_size: int
    inflight: int
    resolver: str = ""
    silent: tuple[str, ...] = ()


def list_stats(name: str, kind: str, counters: ListCounters, quarantine: str) -> ListStats:
    latencies = list(counters.latencies)
    rate = counters.cache_hits / counters.queries if counters.queries else 0.0
    return ListStats(name, kind, counters.queries, counters.hits, counters.errors,
                     counters.timeouts, rate, quarantine,
                     percentile(latencies, 50) * 1000.0, percentile(latencies, 99) * 1000.0)
