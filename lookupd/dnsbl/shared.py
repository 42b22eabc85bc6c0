"""DNS answers shared by several hosts through Redis ([cluster]), behind the in-memory cache:
a question one host asked is not asked again by another within its TTL.

Only real answers are shared (listed, NXDOMAIN/NODATA, each with its expiry); failures stay
per host, as do probes and quarantine (each host's resolver can fail on its own). Keys carry
the configured zone, never the DQS one, and the records were redacted before they got here,
so the DQS key never reaches Redis. A malformed value is treated as missing (logged once).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable

from lookupd.cluster import Cluster, ClusterDown, decode, finite
from lookupd.dnsbl.answers import MAX_POSITIVE_TTL, DnsAnswer
from lookupd.outcome import Status

CacheKey = tuple[str, str, str]
MAX_RECORDS = 64
MAX_RECORD_CHARS = 512
_STATUS = {"found": Status.FOUND, "not_found": Status.NOT_FOUND}


class SharedAnswers:
    def __init__(self, cluster: Cluster, negative_ttl_max: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self.negative_ttl_max = negative_ttl_max
        self.clock = clock
        self._writes: set[asyncio.Task[None]] = set()

    def key(self, key: CacheKey) -> str:
        zone, rdtype, label = key
        return f"{self.cluster.keys.prefix}dns:{rdtype}:{label}.{zone}" if zone else \
            f"{self.cluster.keys.prefix}dns:{rdtype}:{label}"

    async def get(self, key: CacheKey) -> DnsAnswer | None:
        """Another host's answer, or None (none, expired, Redis not answering, malformed)."""
        if not self.cluster.up:
            return None
        try:
            raw = await self.cluster.run(lambda r: r.get(self.key(key)))
        except ClusterDown:
            return None
        if raw is None:
            return None
        answer = self._decode(key[1], raw)
        if answer is None:
            self.cluster.bad_value("a shared DNS answer")
        return answer

    def put(self, key: CacheKey, answer: DnsAnswer) -> None:
        """Share an answer this host got from DNS, without making the request wait."""
        ttl = answer.expires - self.clock()
        if answer.status is Status.UNKNOWN or ttl < 1.0 or not self.cluster.up:
            return
        value = json.dumps({"s": answer.status.value, "r": list(answer.records),
                            "e": answer.expires}, separators=(",", ":"))
        task = asyncio.create_task(self._put(self.key(key), value, int(ttl * 1000)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, value: str, ttl_ms: int) -> None:
        try:
            await self.cluster.run(lambda r: r.set(key, value, px=ttl_ms))
        except ClusterDown:
            pass

    async def aclose(self) -> None:
        tasks = list(self._writes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _decode(self, rdtype: str, raw: object) -> DnsAnswer | None:
        value = decode(raw)
        if value is None:
            return None
        kind = value.get("s")
        status = _STATUS.get(kind) if isinstance(kind, str) else None
        records, expires = value.get("r"), finite(value.get("e"))
        now = self.clock()
        if status is None or expires is None or not isinstance(records, list) \
                or len(records) > MAX_RECORDS or expires <= now:
            return None
        bound = MAX_POSITIVE_TTL if status is Status.FOUND else self.negative_ttl_max
        expires = min(expires, now + bound)
        if status is Status.NOT_FOUND and records:
            return None
        for record in records:
            if not _valid(rdtype, record):
                return None
        return DnsAnswer(status, tuple(records), "", expires)


def _valid(rdtype: str, record: object) -> bool:
    if not isinstance(record, str) or len(record) > MAX_RECORD_CHARS \
            or not record.isprintable():
        return False
    if rdtype in ("A", "AAAA"):
        try:
            address = ipaddress.ip_address(record)
        except ValueError:
            return False
        return address.version == (4 if rdtype == "A" else 6)
    return True
