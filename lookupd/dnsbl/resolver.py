"""Asking DNS (the only network code of the DNSBL source): dnspython's async stub resolver,
one per nameserver, every outcome turned into a DnsAnswer value.

NXDOMAIN and NODATA are answers ("not listed"); LifetimeTimeout, SERVFAIL, REFUSED and
network errors are not: they become UNKNOWN with a reason and are kept only `error_ttl`.
Exception texts from dnspython contain the query name (and so a DQS key): never log them.

Several nameservers share one question's deadline the way resolv.conf consumers share theirs,
without giving the first one all of it: the question goes to the first nameserver, and after
each share of the deadline to the next one as well (the earlier ones may still answer); an
error reply (SERVFAIL, REFUSED, no route) moves on at once. A single nameserver is asked a
second time halfway, for a lost packet. A nameserver that leaves questions unanswered, or
did not answer `ping`, is asked last until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from lookupd.config import HostPort
from lookupd.dnsbl.answers import DnsAnswer, negative_ttl, positive_ttl
from lookupd.outcome import Status

try:
    import dns.nameserver
    _NAMESERVER_OBJECTS = True
except ImportError:  # dnspython < 2.4 (Debian 12 has 2.3): nameservers are address strings
    _NAMESERVER_OBJECTS = False

logger = logging.getLogger(__name__)

# A nameserver that left this many questions in a row unanswered within its share of the
# deadline is asked after the others until it answers again.
SLOW_AFTER = 3
# Why a question failed, most telling first: what a nameserver said beats silence.
_REASON_ORDER = ("servfail", "refused", "timeout", "unreachable", "error")


@dataclass
class Nameserver:
    """One nameserver, its own stub resolver, and how it has been answering lately."""

    label: str  # "127.0.0.1:53", for logs and stats
    resolver: dns.asyncresolver.Resolver
    # Questions in a row it left unanswered while it had its share of the deadline.
    misses: int = 0
    # Its last `ping` got no reply at all.
    silent: bool = False

    @property
    def suspect(self) -> bool:
        return self.silent or self.misses >= SLOW_AFTER


def make_nameservers(nameservers: tuple[HostPort, ...], timeout: float) -> list[Nameserver]:
    """The configured nameservers, else the system's (/etc/resolv.conf), one resolver each.

    Reading resolv.conf is a small local file read, done once at open.
    """
    targets: list[HostPort] = []
    if nameservers:
        targets = list(nameservers)
    else:
        try:
            system = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            logger.warning("no nameserver in /etc/resolv.conf: DNSBL queries go to 127.0.0.1; "
                           "set dnsbl.nameservers to your local resolver")
            targets = [HostPort("127.0.0.1", 53)]
        else:
            for entry in system.nameservers:
                if isinstance(entry, str):
                    targets.append(HostPort(entry, system.nameserver_ports.get(entry,
                                                                               system.port)))
                else:  # a dns.nameserver.Do53Nameserver (dnspython >= 2.4)
                    targets.append(HostPort(str(getattr(entry, "address", entry)),
                                            int(getattr(entry, "port", system.port))))
    return [Nameserver(str(target), _stub(target, timeout)) for target in targets]


def _stub(target: HostPort, timeout: float) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    if _NAMESERVER_OBJECTS:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(target.host, target.port)]
    else:  # dnspython 2.3: an address, and its port apart
        resolver.nameservers = [target.host]
        resolver.nameserver_ports = {target.host: target.port}
    # lookupd keeps its own cache (shared, snapshotted, bounded); never search domains.
    resolver.cache = None
    resolver.use_search_by_default = False
    resolver.domain = dns.name.root
    resolver.search = []
    # One try per question: DnsClient.ask spreads the deadline over the nameservers.
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.retry_servfail = False
    return resolver


@dataclass(frozen=True)
class _Outcome:
    """One nameserver's reply to one question: a usable answer, or why not (`responded`:
    it sent any reply at all, SERVFAIL and REFUSED included)."""

    answer: DnsAnswer | None
    reason: str = ""
    responded: bool = True


class DnsClient:
    """Turns one (name, type) question into a DnsAnswer with its cache expiry."""

    def __init__(self, nameservers: Sequence[Nameserver], *, negative_ttl_max: float,
                 error_ttl: float, min_ttl: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not nameservers:
            raise ValueError("DnsClient needs at least one nameserver")
        self.nameservers = tuple(nameservers)
        # Who is asked, comparable across a reload (the system resolver's may have changed).
        self.servers = tuple(n.label for n in self.nameservers)
        # time.monotonic() of the last reply of any kind from any nameserver.
        self.last_reply = -math.inf
        self._negative_ttl_max = negative_ttl_max
        self._error_ttl = error_ttl
        self._min_ttl = min_ttl
        self._clock = clock

    def order(self) -> list[Nameserver]:
        """Who is asked first: the configured order, suspect nameservers last."""
        return sorted(self.nameservers, key=lambda n: n.suspect)

    def standing(self) -> tuple[tuple[int, bool], ...]:
        """What this client learnt about its nameservers, as values (for a reload)."""
        return tuple((n.misses, n.silent) for n in self.nameservers)

    def resume(self, standing: tuple[tuple[int, bool], ...]) -> None:
        """Start from another client's `standing()` for the same servers."""
        for server, (misses, silent) in zip(self.nameservers, standing, strict=True):
            server.misses, server.silent = misses, silent

    async def ask(self, qname: str, rdtype: str, lifetime: float) -> DnsAnswer:
        """The first usable answer of any nameserver within `lifetime`, else the most telling
        failure. A nameserver that has not answered within its share of `lifetime` is not
        given up: the next one is asked beside it."""
        name = dns.name.from_text(qname)
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + lifetime
        order = self.order()
        plan = order if len(order) > 1 else order * 2
        share = lifetime / len(plan)
        running: dict[asyncio.Task[_Outcome], tuple[Nameserver, float]] = {}
        charged: set[asyncio.Task[_Outcome]] = set()  # a miss counted against its server
        replied: set[str] = set()  # an error reply is not asked for again
        reasons: list[str] = []
        sent = 0
        try:
            while True:
                now = loop.time()
                if now >= end:
                    break
                while sent < len(plan) and plan[sent].label in replied:
                    sent += 1
                if sent < len(plan) and (not running or now >= start + sent * share):
                    # Those that let their share pass count against their servers now, so
                    # that the questions asked meanwhile go to the next one first.
                    for waited in running.keys() - charged:
                        charged.add(waited)
                        self._missed(running[waited][0])
                    server = plan[sent]
                    sent += 1
                    task = asyncio.create_task(self._try(server, name, rdtype, end - now))
                    running[task] = (server, now)
                    continue
                if not running:
                    break
                wake = end if sent >= len(plan) else min(end, start + sent * share)
                done, _ = await asyncio.wait(running, timeout=wake - now,
                                             return_when=asyncio.FIRST_COMPLETED)
                answer: DnsAnswer | None = None
                for task in done:
                    server, _ = running.pop(task)
                    outcome = task.result()
                    if outcome.responded:
                        self._heard(server)
                        replied.add(server.label)
                    elif task not in charged:
                        self._missed(server)
                    if outcome.answer is not None:
                        answer = answer or outcome.answer
                    else:
                        reasons.append(outcome.reason)
                if answer is not None:
                    return answer
        finally:
            await self._give_up(running, charged, loop.time(), share)
        if running:
            reasons.append("timeout")
        return self._failed(next((r for r in _REASON_ORDER if r in reasons), "timeout"))

    async def ping(self, lifetime: float) -> tuple[str, ...]:
        """Ask every nameserver for the root's NS: any reply (REFUSED too) shows it is there.
        Returns the nameservers that sent none within `lifetime`; they are asked last."""
        outcomes = await asyncio.gather(*(self._try(n, dns.name.root, "NS", lifetime)
                                          for n in self.nameservers))
        for server, outcome in zip(self.nameservers, outcomes, strict=True):
            if outcome.responded:
                self._heard(server)
            else:
                server.silent = True
        return tuple(n.label for n, o in zip(self.nameservers, outcomes, strict=True)
                     if not o.responded)

    async def _give_up(self, running: dict[asyncio.Task[_Outcome], tuple[Nameserver, float]],
                       charged: set[asyncio.Task[_Outcome]], now: float, share: float) -> None:
        """Cancel the tries still out; one that had half its share or more without a reply
        counts against its server (unless it was counted when its share ran out)."""
        for task, (server, asked) in running.items():
            task.cancel()
            if task not in charged and now - asked >= share / 2:
                self._missed(server)
        if running:
            await asyncio.wait(running)

    def _heard(self, server: Nameserver) -> None:
        server.misses = 0
        server.silent = False
        self.last_reply = time.monotonic()

    @staticmethod
    def _missed(server: Nameserver) -> None:
        server.misses += 1

    async def _try(self, server: Nameserver, name: dns.name.Name, rdtype: str,
                   lifetime: float) -> _Outcome:
        try:
            answer = await server.resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            return _Outcome(self._negative(responses[0] if responses else None))
        except dns.exception.Timeout:
            return _Outcome(None, "timeout", responded=False)
        except dns.resolver.NoNameservers as exc:
            reason, responded = _why_no_nameservers(exc)
            return _Outcome(None, reason, responded)
        except dns.exception.DNSException:
            return _Outcome(None, "error", responded=False)
        except OSError:
            return _Outcome(None, "unreachable", responded=False)
        if answer.rrset is None:
            return _Outcome(self._negative(answer.response))
        records = tuple(_record_text(rdata) for rdata in answer.rrset)
        return _Outcome(DnsAnswer(Status.FOUND, records, expires=self._clock() + positive_ttl(
            answer.rrset.ttl, self._min_ttl)))

    def _negative(self, response: dns.message.Message | None) -> DnsAnswer:
        soa_ttl: float | None = None
        minimum: float | None = None
        for rrset in response.authority if response is not None else ():
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                soa_ttl, minimum = rrset.ttl, rrset[0].minimum
                break
        ttl = negative_ttl(soa_ttl, minimum, self._negative_ttl_max, self._min_ttl)
        return DnsAnswer(Status.NOT_FOUND, expires=self._clock() + ttl)

    def _failed(self, reason: str) -> DnsAnswer:
        return DnsAnswer(Status.UNKNOWN, reason=reason,
                         expires=self._clock() + self._error_ttl)


def _why_no_nameservers(exc: dns.resolver.NoNameservers) -> tuple[str, bool]:
    """servfail / refused / unreachable / error from the errors dnspython collected, and
    whether the nameserver sent a reply at all."""
    reasons: list[str] = []
    responded = False
    for error in exc.kwargs.get("errors", []):
        response = error[4] if len(error) > 4 else None
        if isinstance(response, dns.message.Message):
            responded = True
            rcode = response.rcode()
            reasons.append({dns.rcode.SERVFAIL: "servfail",
                            dns.rcode.REFUSED: "refused"}.get(rcode, "error"))
        elif isinstance(error[3], OSError | EOFError):
            reasons.append("unreachable")
        else:
            reasons.append("error")
    return next((r for r in _REASON_ORDER if r in reasons), "error"), responded


def _record_text(rdata: object) -> str:
    """A: the address; TXT: the strings joined (RFC 7208 style); PTR: the name, no dot."""
    strings = getattr(rdata, "strings", None)
    if strings is not None:
        return b"".join(strings).decode("latin-1")
    target = getattr(rdata, "target", None)
    if isinstance(target, dns.name.Name):
        return target.to_text(omit_final_dot=True)
    address = getattr(rdata, "address", None)
    return str(address) if address is not None else str(rdata)
