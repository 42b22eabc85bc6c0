"""List health from RFC 5782 test points (pure), whether a list's answers count, whose fault
a failure is (the list's or the resolver's), and "say it once per period" for logs."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.codes import CodeRule, error_advice
from lookupd.dnsbl.names import Probe
from lookupd.outcome import Status

# How often the same problem of the same list is logged again.
LOG_PERIOD = 600.0
# Why a list's answers do not count whatever it says: unprobed (the `unknown=` reason word)
# or quarantined (out of service: the list leaves the decision to the others).
UNPROBED = "unprobed"
QUARANTINED = "quarantined"
# Every list is unknown for this reason while the resolver itself is at fault.
RESOLVER_DOWN = "resolver-down"
# Health.quarantine of a list whose test points (or real questions) got no answer.
NOT_ANSWERING = "not-answering"
# Failures of a list that end in quarantine when this many of its questions in a row failed
# (DNS failures, not its error codes): an outage is noticed before the next probe.
FAILURES = frozenset({"timeout", "servfail", "refused", "unreachable", "error"})
FAIL_STREAK = 3


@dataclass(frozen=True)
class Health:
    """A probe round's judgement. `quarantine` is "" (in service), "lists-everything" or
    "not-answering"; `note` is advice for the admin when something is off but the list
    stays in service (error codes, a missing positive test point)."""

    quarantine: str = ""
    note: str = ""

    @property
    def quarantined(self) -> bool:
        return bool(self.quarantine)


def standing(health: Health | None) -> str:
    """"" when a list's answers count; else why they do not: "unprobed" while no probe round
    of it has come back (it may list everything: unknown), "quarantined" after a bad one (out
    of service: left out of the verdict)."""
    if health is None:
        return UNPROBED
    return QUARANTINED if health.quarantined else ""


# Whether a list goes through Spamhaus DQS: "" no dqs_key is set; "used" it is asked with
# the key (KEY.zen.dq.spamhaus.net); "unused" a key is set but this list is asked as it is.
Dqs = Literal["", "used", "unused"]

# Spamhaus' "not for you" codes, whose usual cure (a DQS key) is wrong once a key is set.
_DQS_ADVICE = {
    ("used", "127.255.255.254"): "Spamhaus does not take these queries although they go "
                                 "through DQS with dnsbl.dqs_key: check in your Spamhaus "
                                 "account that the key is right and still active",
    ("used", "127.255.255.255"): "Spamhaus says too many queries came with dnsbl.dqs_key: "
                                 "check the key's query allowance in your Spamhaus account",
}
_NOT_THROUGH_DQS = ("dnsbl.dqs_key is set, but this list is not asked through DQS: for a "
                    "Spamhaus zone set spamhaus = true in its [[dnsbl.list]], otherwise run a "
                    "local resolver such as unbound")


def advice(answer: str, dqs: Dqs = "", own: tuple[CodeRule, ...] = ()) -> str | None:
    """`error_advice` (`own`: the list's own error answers), right for a list asked with a
    Spamhaus DQS key (or not asked with the key that is set): "set dnsbl.dqs_key" is no cure
    once it is set."""
    general = error_advice(answer, own)
    if general is None or not dqs or answer not in ("127.255.255.254", "127.255.255.255"):
        return general
    return _DQS_ADVICE.get((dqs, answer), _NOT_THROUGH_DQS)


def judge(outcomes: Sequence[tuple[Probe, DnsAnswer]], dqs: Dqs = "",
          own: tuple[CodeRule, ...] = ()) -> Health:
    """Quarantine a list that lists a must-not-list test point, or that answered no probe.
    `own`: the list's own error answers (DNSWL's 127.0.0.255 to a test point is "you may not
    ask", not a listing of everything)."""
    if not outcomes:
        return Health()
    for probe, answer in outcomes:
        if (not probe.listed and answer.status is Status.FOUND
                and any(error_advice(r, own) is None for r in answer.records)):
            return Health("lists-everything",
                          f"it lists the RFC 5782 test point that must never be listed "
                          f"({_show(probe)}), so it would list every client")
    if all(answer.status is Status.UNKNOWN for _, answer in outcomes):
        reason = outcomes[0][1].reason
        return Health(NOT_ANSWERING, f"no test-point query got an answer ({reason})")
    for probe, answer in outcomes:
        # Without this answer nothing shows that the list does not list everything: a list
        # is trusted only once its must-not-list test point was asked and came back clean.
        if not probe.listed and answer.status is Status.UNKNOWN:
            return Health(NOT_ANSWERING, f"its RFC 5782 test point that must never be listed "
                                         f"({_show(probe)}) got no answer ({answer.reason}), "
                                         "so nothing shows it does not list every client")
    for _, answer in outcomes:
        for record in answer.records if answer.status is Status.FOUND else ():
            said = advice(record, dqs, own)
            if said is not None:
                return Health(note=f"it answers {record} to its test points: {said}")
    for probe, answer in outcomes:
        if probe.listed and answer.status is Status.NOT_FOUND:
            return Health(note=f"it does not list its RFC 5782 test point {_show(probe)}: "
                               "check the zone name in [[dnsbl.list]]")
    return Health()


def resolver_fault(replied: bool, verdicts: Sequence[Health]) -> str:
    """Whose fault a probe round's failures are: "" (each list's own), "no-nameserver" (no
    nameserver sent any reply during the round, the liveness question included), or
    "no-list-answers" (two or more lists and none answered its test points: the resolver
    answers but reaches no list, so its network or forwarders are down, not every list)."""
    if not replied:
        return "no-nameserver"
    if len(verdicts) >= 2 and all(h.quarantine == NOT_ANSWERING for h in verdicts):
        return "no-list-answers"
    return ""


def lone_list(health: Health, zone: str, label: str,
              nameservers: Sequence[tuple[str, int]], *, dqs: bool = False) -> Health:
    """A lone list that answered none of its test points: nothing tells that from a resolver
    that reaches no list at all. The note says so, with the `dig` that tells them apart (the
    configured zone: never the DQS key, and no `dig` at all for a DQS list, whose public
    zone answers differently)."""
    if health.quarantine != NOT_ANSWERING:
        return health
    if dqs:
        how = "check that the resolver reaches Spamhaus' dq.spamhaus.net"
    else:
        server = ""
        if nameservers:
            host, port = nameservers[0]
            server = f"@{shlex.quote(host)} " + (f"-p {port} " if port != 53 else "")
        how = (f"try dig {server}{shlex.quote(f'{label}.{zone}')} A, and a name you know, "
               "through it")
    return Health(NOT_ANSWERING, f"{health.note}; with no other list to compare, lookupd "
                                 "cannot tell that from a resolver that reaches no list at "
                                 f"all: {how}")


def own_failure(since: float, peers_answered: Sequence[float], last_reply: float) -> bool:
    """Whether a list's run of failed questions (begun at `since`) is its own doing: another
    list in service got an answer since then or, when no other list is in service, the
    resolver replied to anything since then. Otherwise nothing tells, and a probe round
    (with its liveness question) decides."""
    if peers_answered:
        return max(peers_answered) > since
    return last_reply > since


def _show(probe: Probe) -> str:
    if probe.family == "domain":
        return probe.label.upper()
    return {"ipv4": {True: "127.0.0.2", False: "127.0.0.1"},
            "ipv6": {True: "::FFFF:7F00:2", False: "::FFFF:7F00:1"}}[probe.family][probe.listed]


class OncePer:
    """True the first time a key is seen in each `period` (rate-limits repeated warnings)."""

    def __init__(self, period: float = LOG_PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._period:
            return False
        self._last[key] = now
        return True
