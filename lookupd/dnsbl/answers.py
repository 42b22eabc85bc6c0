"""What one DNS question got back, as a cacheable value, and how long it may be kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lookupd.outcome import Status

# Why a question got no usable answer. "timeout": nothing within the deadline;
# "servfail"/"refused": the resolver said so; "unreachable": network error (ICMP, no route);
# "error": anything else the resolver could not make sense of.
FailReason = Literal["timeout", "servfail", "refused", "unreachable", "error"]

# Listed answers with absurd TTLs are still asked again at least daily.
MAX_POSITIVE_TTL = 86400.0


@dataclass(frozen=True)
class DnsAnswer:
    """One (name, type) question's outcome: records (FOUND), NXDOMAIN/NODATA (NOT_FOUND),
    or no answer (UNKNOWN, with `reason`). `expires` is wall-clock time (it survives restarts
    in the snapshot)."""

    status: Status
    records: tuple[str, ...] = ()
    reason: str = ""
    expires: float = 0.0


def positive_ttl(ttl: float, floor: float = 0.0) -> float:
    """The record's TTL, at least `floor` (dnsbl.min_ttl), at most a day."""
    return min(max(float(ttl), floor, 0.0), MAX_POSITIVE_TTL)


def negative_ttl(soa_ttl: float | None, soa_minimum: float | None, bound: float,
                 floor: float = 0.0) -> float:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM), at least `floor` (dnsbl.min_ttl), capped
    by negative_ttl_max (the admin's explicit bound wins over the floor); without an SOA in the
    authority section a negative answer is not cached at all."""
    if soa_ttl is None or soa_minimum is None:
        return 0.0
    ttl = max(min(float(soa_ttl), float(soa_minimum)), floor)
    return max(0.0, min(ttl, bound))
