"""The `connect` verb: every fact a connect ACL needs about a client, and lookupd's verdict.

    connect IP [PORT] [HELO]
    -> action=accept|deny|defer rule=RULE would=none|deny|defer reason="..." country=GB
       asn=AS64496 incidents=3 dnsbl=listed|clean|unknown dnsbl_lists=LIST:CODE,...
       ptr=NAME fcrdns=yes|no|unknown allowlisted=yes|no helo_dbl=listed|clean|unknown

`dnsbl` is the IP lists' verdict on the address; `helo_dbl` the domain lists' verdict on the
HELO name (clean when there is none, as at connect time, or when no list could hold it: an
address literal, a numeric TLD). The sources are asked together under [connect] deadline;
one that cannot answer leaves its field unknown (`??`, `unknown`) and never makes a deny or a
defer by itself. `decide()` is the policy: a pure function of the facts and ConnectConfig.
`ConnectChecker` only fetches: at once (`answer_now`) when the DNSBL, PTR and HELO answers are
all in the DNS cache, as they are for a client seen lately, else through DNS (`answer`). The
reply `answer_now` gave is given again (`replay`) while every source it came from says it
would answer the same; counted and logged every time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from lookupd.allowlist import ListFiles, Match
from lookupd.config import ConnectConfig
from lookupd.dnsbl.render import VERDICTS, exim_value, printable
from lookupd.dnsbl.source import Cached
from lookupd.dnsbl.verdict import DnsblResult, PtrResult
from lookupd.errors import BadRequest
from lookupd.fastpath import Keep
from lookupd.geoip import AsnResult, CountryResult
from lookupd.incidents import IncidentsResult
from lookupd.ipaddr import IPAddress, is_public, parse_ip
from lookupd.outcome import Count, Status
from lookupd.protocol import shown
from lookupd.replies import UNKNOWN, render_asn, render_country, render_incidents

log = logging.getLogger(__name__)

Action = Literal["accept", "deny", "defer"]
Rule = Literal["none", "allowlist", "incidents", "dnsbl", "helo_dbl", "country", "no_ptr",
               "submission", "strikes"]

# The classic message of the nftfw / Sympl connect ACLs; fail2ban and nftfw setups match it.
INCIDENTS_MESSAGE = "Blacklisted: Denied access - history of unwanted activity"
STRIKES_MESSAGE = "Denied access - too many failed logins or invalid recipients"
# Longest reason: Exim puts it into an SMTP reply line (RFC 5321: 512 octets a line).
REASON_MAX = 200
_HELO_SHOWN = 64
# The HELO verdict when there is no HELO to check (connect time): nothing is listed.
NO_HELO = DnsblResult(Status.NOT_FOUND)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """`connect IP [PORT] [HELO]`: PORT is None when absent or not a port (exim -bh sends
    -1); HELO is empty at connect time (the client has not said it yet)."""

    ip: IPAddress | None
    port: int | None = None
    helo: str = ""


def parse_args(args: tuple[str, ...]) -> ConnectRequest:
    """The request's arguments; BadRequest when IP is not an address. Anything after PORT is
    the HELO name, as the client gave it (checked against the domain lists)."""
    if not args or not args[0]:
        return ConnectRequest(None)
    try:
        ip = parse_ip(args[0])
    except ValueError:
        raise BadRequest(f'not an IP address: "{shown(args[0])}"') from None
    port: int | None = None
    if len(args) > 1 and args[1].isdigit() and 0 < int(args[1]) <= 65535:
        port = int(args[1])
    return ConnectRequest(ip, port, " ".join(args[2:]))


@dataclass(frozen=True, slots=True)
class Facts:
    """What the sources said about one client, fetched before any decision."""

    request: ConnectRequest
    country: CountryResult
    asn: AsnResult
    incidents: IncidentsResult
    dnsbl: DnsblResult
    ptr: PtrResult
    allowlist: Match
    # None: no submission_access_file configured.
    submission_access: Match | None = None
    # The domain lists on the HELO name; clean when there is none.
    helo_dbl: DnsblResult = NO_HELO
    # lookupd's own count of this address's strikes in [connect] strikes_window.
    strikes: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """lookupd's answer: the action, the rule that chose it, why (reply-safe text), and for
    a log-only rule (or a deny not enforced) what it would have done."""

    action: Action
    rule: Rule = "none"
    reason: str = ""
    would: Literal["none", "deny", "defer"] = "none"


# ---------------------------------------------------------------------------------------------
# The policy (pure).


def decide(facts: Facts, config: ConnectConfig) -> Verdict:
    """The verdict on one connection. Order: allowlist (bypasses everything), then the deny
    rules (incidents, DNSBL, countries, no PTR), then the submission-port rule (defer)."""
    if facts.request.ip is None:
        return Verdict("accept", "none", "no client address (local submission)")
    if facts.allowlist.status is Status.FOUND:
        name = facts.allowlist.path.name if facts.allowlist.path else "allowlist"
        return Verdict("accept", "allowlist", f"allowlisted ({name})")
    logged: Verdict | None = None
    for rule, action, reason in _matching_rules(facts, config):
        if rule in config.log_only:
            logged = logged or Verdict("accept", rule, reason, would=action)
            continue
        if facts.allowlist.status is Status.UNKNOWN:
            # The client may be on a list that cannot be read: do not refuse it on a guess.
            return Verdict("accept", rule, f"{reason} (not enforced: an allowlist file "
                                           "cannot be read)", would=action)
        return Verdict(action, rule, reason)
    return logged or Verdict("accept", "none", "no rule matched")


def _matching_rules(facts: Facts, config: ConnectConfig,
                    ) -> list[tuple[Rule, Literal["deny", "defer"], str]]:
    """Every rule that refuses this client, in policy order."""
    ip = facts.request.ip
    assert ip is not None
    found: list[tuple[Rule, Literal["deny", "defer"], str]] = []
    incidents = facts.incidents
    if (config.incidents_threshold and incidents.status is Status.FOUND
            and incidents.count > config.incidents_threshold):
        found.append(("incidents", "deny", INCIDENTS_MESSAGE))
    if config.strikes_threshold and facts.strikes > config.strikes_threshold:
        found.append(("strikes", "deny", STRIKES_MESSAGE))
    if config.deny_on_dnsbl and facts.dnsbl.status is Status.FOUND:
        names = ", ".join(dict.fromkeys(a.name for a in facts.dnsbl.listed))
        found.append(("dnsbl", "deny", f"Rejected - {ip} is listed at {names}"))
    if config.deny_on_helo_dbl and facts.helo_dbl.status is Status.FOUND:
        names = ", ".join(dict.fromkeys(a.name for a in facts.helo_dbl.listed))
        helo = shown(facts.request.helo[:_HELO_SHOWN])
        found.append(("helo_dbl", "deny", f"Rejected - HELO name {helo} is listed at {names}"))
    country = facts.country
    code = country.code if country.status is Status.FOUND else ""
    if code and (code in config.deny_countries
                 or (config.allow_countries and code not in config.allow_countries)):
        found.append(("country", "deny",
                      f"Connections from your country ({code}) are not accepted"))
    if config.deny_no_ptr and facts.ptr.status is Status.NOT_FOUND:
        found.append(("no_ptr", "deny",
                      f"Rejected - no reverse DNS (PTR) for {ip}; ask your provider for one"))
    if _submission_refused(facts, config):
        found.append(("submission", "defer",
                      f"Submission is not open to {ip} now; log in to your mailbox (IMAP) "
                      "first, or ask postmaster"))
    return found


def _submission_refused(facts: Facts, config: ConnectConfig) -> bool:
    """On a submission port, with submission_countries set: refused unless the client is in
    the access file or in one of the countries. When either answer is unknown: not refused.
    Addresses that cannot have a country (private, loopback) are never refused here."""
    ip, port = facts.request.ip, facts.request.port
    if port not in config.submission_ports or not config.submission_countries:
        return False
    if ip is None or not is_public(ip):
        return False
    access = facts.submission_access
    if access is not None and access.status is Status.FOUND:
        return False
    country = facts.country
    if country.status is Status.FOUND and country.code in config.submission_countries:
        return False
    if country.status is Status.UNKNOWN or (access is not None
                                            and access.status is Status.UNKNOWN):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The reply and the log line (pure).



def render(verdict: Verdict, facts: Facts) -> str:
    """One line of key=value pairs, every key always present, for Exim's ${extract}."""
    return " ".join(f"{key}={value}" for key, value in fields(verdict, facts))


def fields(verdict: Verdict, facts: Facts) -> list[tuple[str, str]]:
    """The reply's (key, value) pairs in their fixed order; values already Exim-quoted."""
    dnsbl = facts.dnsbl
    lists = ",".join(f"{a.name}:{code}" for a in dnsbl.listed for code in a.codes)
    return [
        ("action", verdict.action),
        ("rule", verdict.rule),
        ("would", verdict.would),
        ("reason", exim_value(printable(verdict.reason, REASON_MAX))),
        ("country", render_country(facts.country)),
        ("asn", render_asn(facts.asn, organisation=False)),
        ("incidents", render_incidents(facts.incidents)),
        ("dnsbl", VERDICTS[dnsbl.status]),
        ("dnsbl_lists", exim_value(lists)),
        ("ptr", _ptr(facts.ptr)),
        ("fcrdns", facts.ptr.fcrdns),
        ("allowlisted", "yes" if facts.allowlist.status is Status.FOUND else "no"),
        ("helo_dbl", VERDICTS[facts.helo_dbl.status]),
        ("strikes", str(facts.strikes)),
    ]


def _ptr(result: PtrResult) -> str:
    """The PTR name; "" when there is none; ?? when the lookup failed."""
    if result.status is Status.UNKNOWN:
        return UNKNOWN
    name = result.name if result.status is Status.FOUND else ""
    return exim_value(printable(name, 255))


def log_line(verdict: Verdict, facts: Facts) -> str | None:
    """The one log line for a deny, a defer or a log-only match; None for a plain accept."""
    if verdict.action == "accept" and verdict.would == "none":
        return None
    request = facts.request
    what = verdict.action if verdict.would == "none" else f"would {verdict.would} (log-only)"
    port = f" port {request.port}" if request.port else ""
    helo = f" helo {shown(request.helo[:_HELO_SHOWN])}" if request.helo else ""
    return (f"connect {what}: [{request.ip}]{port}{helo} rule={verdict.rule} "
            f"country={render_country(facts.country)} "
            f"incidents={render_incidents(facts.incidents)} "
            f"dnsbl={VERDICTS[facts.dnsbl.status]}: "
            f"{printable(verdict.reason, REASON_MAX)}")


# ---------------------------------------------------------------------------------------------
# Fetching the facts.


class GeoIPLookup(Protocol):
    def country(self, ip: IPAddress | None) -> CountryResult: ...

    def asn(self, ip: IPAddress | None) -> AsnResult: ...

    def version(self) -> object:
        """Equal while every answer stays the same."""


class IncidentsLookup(Protocol):
    def count(self, ip: IPAddress) -> IncidentsResult: ...

    def version(self) -> object:
        """Equal while every answer stays the same (within each answer's `until`)."""


class StrikesLookup(Protocol):
    def count(self, ip: IPAddress) -> int: ...

    def key(self, ip: IPAddress) -> str:
        """What `ip`'s strikes are counted under (an IPv6 client's network)."""

    def count_key(self, key: str) -> int:
        """`count` by `key(ip)`."""


class DnsblLookup(Protocol):
    async def check_ip(self, ip: str | IPAddress) -> DnsblResult: ...

    async def ptr(self, ip: str | IPAddress) -> PtrResult: ...

    async def check_smtp_name(self, text: str,
                              client: IPAddress | None = None) -> DnsblResult: ...

    def peek_ip(self, ip: str | IPAddress) -> Cached[DnsblResult] | None: ...

    def peek_ptr(self, ip: str | IPAddress) -> Cached[PtrResult] | None: ...

    def peek_smtp_name(self, text: str,
                       client: IPAddress | None = None) -> Cached[DnsblResult] | None: ...

    @property
    def generation(self) -> int: ...

    def holds(self, generation: int, expires: float) -> bool: ...


T = TypeVar("T")


_CONCLUDED_MAX = 4096  # clients whose last verdict is kept beside its facts


@dataclass(frozen=True, slots=True)
class _Warm:
    """A reply `answer_now` gave, and what it depended on: reused for the same request while
    every source says it would answer the same (see `ConnectChecker.replay`)."""

    facts: Facts
    strike_key: str  # what the client's strikes are counted under
    verdict: Verdict
    line: str | None
    reply: str
    # What taking the DNSBL, PTR and HELO results counted: counted again for each reuse.
    counts: tuple[Count, ...]
    dns: int  # the DNS source's generation, and the earliest expiry of the answers used
    dns_until: float
    until: float  # the incidents count holds until then (time.time(); a Sympl window)
    geoip: object
    incidents: object
    allowlist: int
    access: int


class ConnectChecker:
    """Fetches the facts for `connect` from the daemon's sources and the [connect] list files,
    decides, and logs the refusals."""

    def __init__(self, config: ConnectConfig, geoip: GeoIPLookup, incidents: IncidentsLookup,
                 dnsbl: DnsblLookup, *,
                 on_verdict: Callable[[Verdict, Facts, int], None] | None = None,
                 strikes: StrikesLookup | None = None) -> None:
        self.config = config
        self.strikes = strikes
        self.on_verdict = on_verdict  # the metrics' count of verdicts
        self.geoip = geoip
        self.incidents = incidents
        self.dnsbl = dnsbl
        self.allowlist = ListFiles(config.allowlist_files)
        self.access: ListFiles | None = (
            ListFiles((config.submission_access_file,))
            if config.submission_access_file is not None else None)
        # request -> (its last facts, the verdict, log line and reply they gave)
        self._concluded: dict[ConnectRequest, tuple[Facts, Verdict, str | None, str]] = {}
        # The request's words -> the reply `answer_now` gave them, and what it came from.
        self._warm: dict[tuple[str, ...], _Warm] = {}
        self._broken = 0  # from-memory lookups that failed (their facts are not reused)
        # The last reply's word for the compiled front end (lookupd/fastpath.py), when the
        # same request may get it again without Python: an accept, not a logged refusal.
        self.kept: Keep | None = None

    def replay(self, words: tuple[str, ...]) -> str | None:
        """The reply `answer_now` gave the same request words, when no source it came from
        could answer differently now; None: ask `answer_now`. Counted (DNSBL figures,
        metrics) and logged (a deny's line) as a new answer is.

        Every fact is checked, not guessed: the DNS results' generation and earliest expiry,
        the GeoIP files and the incidents index answering (and a Sympl window's next
        expiry), the list files' versions, and the client's strikes, counted again now."""
        warm = self._warm.get(words)
        if warm is None:
            return None
        facts = warm.facts
        strikes = self.strikes
        try:
            if (time.time() >= warm.until
                    or not self.dnsbl.holds(warm.dns, warm.dns_until)
                    or self.geoip.version() != warm.geoip
                    or self.incidents.version() != warm.incidents
                    or self.allowlist.version() != warm.allowlist
                    or (self.access is not None and self.access.version() != warm.access)
                    or (strikes is not None
                        and strikes.count_key(warm.strike_key) != facts.strikes)):
                return None
        except Exception:
            return None  # `answer_now` looks again, and says what went wrong
        for count in warm.counts:
            count()
        self._announce(warm.verdict, facts, warm.line)
        self.kept = self._keep(warm)
        return warm.reply

    def answer_now(self, request: ConnectRequest,
                   words: tuple[str, ...] | None = None) -> str | None:
        """The reply without waiting when the DNS cache holds the whole DNSBL, PTR and HELO
        answers (GeoIP, incidents and the list files answer from memory anyway); None: use
        `answer`. Replies, log lines and DNSBL stats are the same as `answer` gives. With
        the request's `words`, the reply is kept for `replay`."""
        ip = request.ip
        if ip is None:
            return self._conclude(_no_address(request))
        try:
            # What the reply depends on, read before the facts: a change in between shows
            # at the next `replay` as a change, never the other way round.
            versions = self.versions() if words is not None else None
            dnsbl = self.dnsbl.peek_ip(ip)
            ptr = self.dnsbl.peek_ptr(ip) if dnsbl is not None else None
            helo = (self._peek_helo(request.helo, ip) if dnsbl is not None and ptr is not None
                    else None)
        except Exception:
            return None  # `answer` looks again, and says what went wrong
        if dnsbl is None or ptr is None or helo is None:
            return None  # nothing taken, nothing counted: `answer` counts it
        broken = self._broken
        facts = self._with_memory(request, ip, dnsbl.take(), ptr.take(), helo.take())
        verdict, line, reply = self._decided(facts)
        self._announce(verdict, facts, line)
        if words is None or versions is None:
            return reply
        if self._broken != broken:
            self._warm.pop(words, None)  # asked again, so that the next request logs it too
            return reply
        dns, geoip, incidents, allowlist, access = versions
        if len(self._warm) >= _CONCLUDED_MAX:
            self._warm.clear()
        warm = self._warm[words] = _Warm(
            facts, "" if self.strikes is None else self.strikes.key(ip), verdict, line, reply,
            (dnsbl.counter, ptr.counter, helo.counter),
            dns, min(dnsbl.expires, ptr.expires, helo.expires), facts.incidents.until,
            geoip, incidents, allowlist, access)
        self.kept = self._keep(warm)
        return reply

    def _keep(self, warm: _Warm) -> Keep | None:
        """For the compiled front end: an accept with no strikes (a count that falls with
        time) is the same reply until its answers expire, while the token (`versions` and
        the strikes' changes) stays the same; each reuse counts as `replay` counts."""
        if warm.line is not None or warm.facts.strikes:
            return None
        verdict, facts, on_verdict = warm.verdict, warm.facts, self.on_verdict

        def counted(n: int = 1) -> None:  # as `_announce` counts an accept (it logs nothing)
            if on_verdict is not None:
                on_verdict(verdict, facts, n)

        return Keep(min(warm.until, warm.dns_until), (*warm.counts, counted))

    def versions(self) -> tuple[int, object, object, int, int]:
        """What a warm reply depends on besides the strikes: each source's version."""
        access = self.access
        return (self.dnsbl.generation, self.geoip.version(), self.incidents.version(),
                self.allowlist.version(), access.version() if access is not None else 0)

    def _peek_helo(self, helo: str, ip: IPAddress) -> Cached[DnsblResult] | None:
        """The domain lists' verdict on the HELO from the cache; no HELO: clean at once. A
        LAN client's HELO is internal: asked only of internal lists, as its address is."""
        if not helo:
            return Cached(NO_HELO, _nothing)
        return self.dnsbl.peek_smtp_name(helo, ip)

    async def answer(self, request: ConnectRequest) -> str:
        return self._conclude(await self.facts(request))

    def _conclude(self, facts: Facts) -> str:
        verdict, line, reply = self._decided(facts)
        self._announce(verdict, facts, line)
        return reply

    def _decided(self, facts: Facts) -> tuple[Verdict, str | None, str]:
        """The verdict, its log line and the reply: pure functions of the facts (and this
        checker's config), decided once for a client whose facts did not change since its
        last connection, Exim's usual case."""
        concluded = self._concluded.get(facts.request)
        if concluded is not None and concluded[0] == facts:
            return concluded[1:]
        verdict = decide(facts, self.config)
        line = log_line(verdict, facts)
        reply = render(verdict, facts)
        if len(self._concluded) >= _CONCLUDED_MAX:
            self._concluded.clear()
        self._concluded[facts.request] = (facts, verdict, line, reply)
        return verdict, line, reply

    def _announce(self, verdict: Verdict, facts: Facts, line: str | None) -> None:
        """Count the verdict and log a refusal: for every answer, new or reused."""
        if self.on_verdict is not None:
            self.on_verdict(verdict, facts, 1)
        if line is not None:
            # One line per refusal: the admin's record of why (Exim logs the SMTP side).
            log.info("%s", line)

    async def facts(self, request: ConnectRequest) -> Facts:
        """Everything known about the client within [connect] deadline. GeoIP, incidents and
        the list files answer from memory; DNSBL and PTR come from the DNS cache when it holds
        them whole, else from DNS, in parallel."""
        ip = request.ip
        if ip is None:
            return _no_address(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.deadline
        dnsbl_now = _taken(lambda: self.dnsbl.peek_ip(ip), "DNSBL")
        ptr_now = _taken(lambda: self.dnsbl.peek_ptr(ip), "PTR")
        helo_now = _taken(lambda: self._peek_helo(request.helo, ip), "HELO")
        dnsbl_task = (asyncio.create_task(self.dnsbl.check_ip(ip)) if dnsbl_now is None
                      else None)
        ptr_task = asyncio.create_task(self.dnsbl.ptr(ip)) if ptr_now is None else None
        helo_task = (asyncio.create_task(self.dnsbl.check_smtp_name(request.helo, ip))
                     if helo_now is None else None)
        pending = [task for task in (dnsbl_task, ptr_task, helo_task) if task is not None]
        try:
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        finally:
            for task in pending:
                if not task.done():
                    task.cancel()
        dnsbl = dnsbl_now if dnsbl_task is None else await _settled(
            dnsbl_task, DnsblResult(Status.UNKNOWN), "DNSBL")
        ptr = ptr_now if ptr_task is None else await _settled(
            ptr_task, PtrResult(Status.UNKNOWN, fcrdns="unknown", reason="timeout"), "PTR")
        helo = helo_now if helo_task is None else await _settled(
            helo_task, DnsblResult(Status.UNKNOWN), "HELO")
        assert dnsbl is not None and ptr is not None and helo is not None  # tasks for the rest
        return self._with_memory(request, ip, dnsbl, ptr, helo)

    def _with_memory(self, request: ConnectRequest, ip: IPAddress, dnsbl: DnsblResult,
                     ptr: PtrResult, helo: DnsblResult) -> Facts:
        """The facts: the DNS ones given, the rest looked up in memory (GeoIP, incidents,
        the list files: each a bounded, in-memory or indexed read)."""
        guarded = self._guarded
        country = guarded(lambda: self.geoip.country(ip), CountryResult(Status.UNKNOWN),
                          "GeoIP country")
        asn = guarded(lambda: self.geoip.asn(ip), AsnResult(Status.UNKNOWN), "GeoIP ASN")
        incidents = guarded(lambda: self.incidents.count(ip),
                            IncidentsResult(Status.UNKNOWN), "incidents")
        allowlist = guarded(lambda: self.allowlist.match(ip), Match(Status.UNKNOWN),
                            "allowlist")
        access_files = self.access
        access = (None if access_files is None else
                  guarded(lambda: access_files.match(ip), Match(Status.UNKNOWN),
                          "submission access file"))
        strikes = self.strikes
        count = 0 if strikes is None else guarded(lambda: strikes.count(ip), 0, "strikes")
        return Facts(request, country, asn, incidents, dnsbl, ptr, allowlist, access, helo,
                     count)

    def _guarded(self, lookup: Callable[[], T | None], failed: T, what: str) -> T:
        """A from-memory lookup; a bug in it makes its fact unknown instead of failing the
        reply (and the reply is not kept for `replay`: the next request logs it again)."""
        try:
            result = lookup()
        except Exception:
            self._broken += 1
            log.exception("connect: the %s lookup failed unexpectedly; please report this",
                          what)
            return failed
        return failed if result is None else result


def _nothing(n: int = 1) -> None:
    """What taking a result that needed no lookup counts: nothing."""


def _no_address(request: ConnectRequest) -> Facts:
    """No client address (a local submission): nothing to look up."""
    return Facts(request, CountryResult(Status.NOT_FOUND), AsnResult(Status.NOT_FOUND),
                 IncidentsResult(Status.NOT_FOUND), DnsblResult(Status.NOT_FOUND),
                 PtrResult(Status.NOT_FOUND, fcrdns="no"), Match(Status.NOT_FOUND))


def unknown_facts(request: ConnectRequest) -> Facts:
    """Nothing could be asked (lookupd runs without its configuration): every fact unknown."""
    if request.ip is None:
        return _no_address(request)
    return Facts(request, CountryResult(Status.UNKNOWN), AsnResult(Status.UNKNOWN),
                 IncidentsResult(Status.UNKNOWN), DnsblResult(Status.UNKNOWN),
                 PtrResult(Status.UNKNOWN, fcrdns="unknown"), Match(Status.UNKNOWN),
                 helo_dbl=DnsblResult(Status.UNKNOWN) if request.helo else NO_HELO)


def _taken(peek: Callable[[], Cached[T] | None], what: str) -> T | None:
    """A DNS fact the cache holds whole (taken, so counted), else None: ask DNS for it."""
    try:
        cached = peek()
    except Exception:
        log.exception("connect: looking up the %s answer in the DNS cache failed "
                      "unexpectedly; asking DNS instead. Please report this", what)
        return None
    return None if cached is None else cached.take()


async def _settled(task: asyncio.Task[T], failed: T, what: str) -> T:
    """A DNS lookup's result, or `failed` when it missed the deadline or broke."""
    if not task.done():
        await asyncio.gather(task, return_exceptions=True)  # let the cancellation finish
        return failed
    if task.cancelled():
        return failed
    exc = task.exception()
    if exc is not None:
        if not isinstance(exc, BadRequest):
            log.error("connect: the %s lookup failed unexpectedly; please report this", what,
                      exc_info=exc)
        return failed
    return task.result()
