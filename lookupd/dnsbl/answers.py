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


def positive_ttl(ttl: float) -> float:
    return max(0.0, min(float(ttl), MAX_POSITIVE_TTL))


def negative_ttl(soa_ttl: float | None, soa_minimum: float | None, bound: float) -> float:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM), capped by negative_ttl_max; without an
    SOA in the authority section a negative answer is not cached at all."""
    if soa_ttl is None or soa_minimum is None:
        return 0.0
    return max(0.0, min(float(soa_ttl), float(soa_minimum), bound))
