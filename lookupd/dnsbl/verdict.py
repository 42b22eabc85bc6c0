"""From DNS answers to verdicts (pure): one list's say, the combined score, and FCrDNS.

A list's A records become a hit, a clean answer or an unknown (its error codes, timeouts,
quarantine, no probe back yet). The combined verdict is `listed` only when the hits alone
reach the threshold whatever the unknown lists would have said, `clean` only when no unknown
list could have changed that, and `unknown` otherwise: a failure is never taken as a "no".
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lookupd.config import DnsblListConfig
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.codes import (
    SPAMHAUS_MEANINGS,
    CodeRule,
    classify,
    known_error_codes,
    parse_codes,
)
from lookupd.outcome import Status

# Reverse DNS: at most this many PTR names are checked for a forward match (Exim checks all;
# a handful is what real hosts have).
MAX_PTR_NAMES = 4


@dataclass(frozen=True)
class ListSpec:
    """One configured list, ready to use: codes parsed (its own error answers too: the
    built-in ones of a well-known list and its error_codes), name settled."""

    name: str
    zone: str
    weight: float
    rules: tuple[CodeRule, ...]
    errors: tuple[CodeRule, ...]
    families: tuple[Literal["ipv4", "ipv6"], ...]
    kind: Literal["ip", "domain"]
    spamhaus: bool
    # Asked about special-use addresses too (an internal list); see special.py.
    query_special: bool = False

    @classmethod
    def from_config(cls, cfg: DnsblListConfig) -> ListSpec:
        zone = cfg.zone.rstrip(".").lower()
        return cls(name=cfg.name or zone, zone=zone, weight=cfg.weight,
                   rules=parse_codes(cfg.codes),
                   errors=parse_codes(known_error_codes(zone) + cfg.error_codes),
                   families=cfg.families, kind=cfg.kind, spamhaus=cfg.spamhaus,
                   query_special=cfg.query_special)


@dataclass(frozen=True)
class ListAnswer:
    """What one list said about one name. FOUND: listed with `codes`; UNKNOWN: `reason`
    (timeout, servfail, refused, unreachable, error, quarantined, unprobed,
    error-code-127.x.y.z)."""

    name: str
    weight: float
    status: Status
    codes: tuple[str, ...] = ()
    reason: str = ""
    text: str = ""


@dataclass(frozen=True, slots=True)
class KeptVerdict:
    """One list's verdict on a cached A answer, kept beside it in the cache (not decided
    again on every request): `bare` from the A records alone, `answer` with the text of
    `txt`, a hit's TXT answer, and decided again when the cache holds another TXT answer."""

    spec: ListSpec
    bare: ListAnswer
    answer: ListAnswer
    txt: DnsAnswer | None = None


def interpret(spec: ListSpec, answer: DnsAnswer) -> ListAnswer:
    """One list's verdict from its A records (without TXT; see `with_text`)."""
    if answer.status is Status.UNKNOWN:
        return ListAnswer(spec.name, spec.weight, Status.UNKNOWN, reason=answer.reason)
    if answer.status is Status.NOT_FOUND:
        return ListAnswer(spec.name, spec.weight, Status.NOT_FOUND)
    sorted_out = classify(answer.records, spec.rules, spec.errors)
    if sorted_out.errors:
        # An error code means "I did not really look": even with other codes beside it the
        # answer cannot be trusted either way.
        return ListAnswer(spec.name, spec.weight, Status.UNKNOWN,
                          reason=f"error-code-{sorted_out.errors[0]}")
    if sorted_out.hits:
        return ListAnswer(spec.name, spec.weight, Status.FOUND, codes=sorted_out.hits)
    return ListAnswer(spec.name, spec.weight, Status.NOT_FOUND)


def with_text(spec: ListSpec, listed: ListAnswer, txt: DnsAnswer | None) -> ListAnswer:
    """Attach the list's TXT (or, for Spamhaus, the meaning of its codes) to a hit."""
    if listed.status is not Status.FOUND:
        return listed
    text = ""
    if txt is not None and txt.status is Status.FOUND:
        text = " ".join(txt.records)
    elif spec.spamhaus:
        text = "; ".join(SPAMHAUS_MEANINGS[c] for c in listed.codes if c in SPAMHAUS_MEANINGS)
    return ListAnswer(listed.name, listed.weight, listed.status, listed.codes, listed.reason,
                      text)


@dataclass(frozen=True)
class DnsblResult:
    """The verdict on one IP or domain. FOUND: listed, NOT_FOUND: clean, UNKNOWN: could not
    tell. `answers` holds every asked list's say, in configuration order. `skipped` says why
    some lists were not asked at all ("private", "documentation", "numeric-tld", ... see
    special.py), or is ""."""

    status: Status
    score: float = 0.0
    answers: tuple[ListAnswer, ...] = ()
    text: str = ""
    skipped: str = ""

    @property
    def listed(self) -> tuple[ListAnswer, ...]:
        return tuple(a for a in self.answers if a.status is Status.FOUND)

    @property
    def unknown(self) -> tuple[ListAnswer, ...]:
        return tuple(a for a in self.answers if a.status is Status.UNKNOWN)

    @property
    def reason(self) -> str:
        """For UNKNOWN: which lists could not answer and why, e.g. "zen:timeout"."""
        return ",".join(f"{a.name}:{a.reason}" for a in self.unknown)


def combine(answers: Iterable[ListAnswer], threshold: float, skipped: str = "") -> DnsblResult:
    """Sum the weights of the hits and decide, counting unknown lists as "could be either".
    Lists not asked (`skipped` says why) have no say: only the `answers` count."""
    answers = tuple(answers)
    score = sum(a.weight for a in answers if a.status is Status.FOUND)
    unknown = [a.weight for a in answers if a.status is Status.UNKNOWN]
    lowest = score + sum(w for w in unknown if w < 0)
    highest = score + sum(w for w in unknown if w > 0)
    if lowest >= threshold:
        status = Status.FOUND
    elif highest < threshold:
        status = Status.NOT_FOUND
    else:
        status = Status.UNKNOWN
    text = "; ".join(f"{a.name}: {a.text}" for a in answers
                     if a.status is Status.FOUND and a.text)
    return DnsblResult(status, score, answers, text, skipped)


@dataclass(frozen=True)
class PtrResult:
    """Reverse DNS of an address. FOUND: `name` is its (first matching) PTR name; NOT_FOUND:
    no PTR; UNKNOWN: the PTR or forward lookup failed (`reason`). `fcrdns` is "yes" when
    the name's A/AAAA records contain the address."""

    status: Status
    name: str = ""
    fcrdns: Literal["yes", "no", "unknown"] = "unknown"
    reason: str = ""
    names: tuple[str, ...] = field(default=())


def ptr_names(ptr: DnsAnswer) -> tuple[str, ...]:
    """The PTR names worth a forward lookup, without trailing dots, in answer order."""
    names = [n.rstrip(".").lower() for n in ptr.records if n.rstrip(".")]
    return tuple(dict.fromkeys(names))[:MAX_PTR_NAMES]


def decide_fcrdns(address: ipaddress.IPv4Address | ipaddress.IPv6Address, ptr: DnsAnswer,
                  forwards: Mapping[str, DnsAnswer]) -> PtrResult:
    """Forward-confirmed reverse DNS: some PTR name's A/AAAA holds the address again."""
    if ptr.status is Status.UNKNOWN:
        return PtrResult(Status.UNKNOWN, fcrdns="unknown", reason=ptr.reason)
    names = ptr_names(ptr)
    if ptr.status is Status.NOT_FOUND or not names:
        return PtrResult(Status.NOT_FOUND, fcrdns="no")
    undecided: list[str] = []
    for name in names:
        fwd = forwards.get(name)
        if fwd is None or fwd.status is Status.UNKNOWN:
            undecided.append(fwd.reason if fwd is not None else "timeout")
            continue
        if fwd.status is Status.FOUND and any(_same(address, r) for r in fwd.records):
            return PtrResult(Status.FOUND, name=name, fcrdns="yes", names=names)
    if undecided:
        return PtrResult(Status.FOUND, name=names[0], fcrdns="unknown", reason=undecided[0],
                         names=names)
    return PtrResult(Status.FOUND, name=names[0], fcrdns="no", names=names)


def _same(address: ipaddress.IPv4Address | ipaddress.IPv6Address, record: str) -> bool:
    return _record_address(record) == address


@functools.lru_cache(maxsize=8192)  # a cached answer is decided again on every connection
def _record_address(record: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(record)
    except ValueError:
        return None
