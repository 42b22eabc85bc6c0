"""Asking DNS (the only network code of the DNSBL source): dnspython's async stub resolver,
every outcome turned into a DnsAnswer value.

NXDOMAIN and NODATA are answers ("not listed"); LifetimeTimeout, SERVFAIL, REFUSED and
network errors are not: they become UNKNOWN with a reason and are kept only `error_ttl`.
Exception texts from dnspython contain the query name (and so a DQS key): never log them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from lookupd.config import HostPort
from lookupd.dnsbl.answers import DnsAnswer, negative_ttl, positive_ttl
from lookupd.outcome import Status

logger = logging.getLogger(__name__)


def make_resolver(nameservers: tuple[HostPort, ...], timeout: float,
                  ) -> dns.asyncresolver.Resolver:
    """A resolver for the configured nameservers, else the system's (/etc/resolv.conf).

    Reading resolv.conf is a small local file read, done once at open.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, ns.port)
                                for ns in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            logger.warning("no nameserver in /etc/resolv.conf: DNSBL queries go to 127.0.0.1; "
                           "set dnsbl.nameservers to your local resolver")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    # lookupd keeps its own cache (shared, snapshotted, bounded); never search domains.
    resolver.cache = None
    resolver.use_search_by_default = False
    resolver.domain = dns.name.root
    resolver.search = []
    # One try per nameserver and deadline; a second one only when the first is quick to fail.
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.retry_servfail = False
    return resolver


class DnsClient:
    """Turns one (name, type) question into a DnsAnswer with its cache expiry."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, *, negative_ttl_max: float,
                 error_ttl: float, min_ttl: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._resolver = resolver
        # Who is asked, comparable across a reload (the system resolver's may have changed).
        self.servers = (str(resolver.port), *(str(n) for n in resolver.nameservers))
        self._negative_ttl_max = negative_ttl_max
        self._error_ttl = error_ttl
        self._min_ttl = min_ttl
        self._clock = clock

    async def ask(self, qname: str, rdtype: str, lifetime: float) -> DnsAnswer:
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(qname), rdtype, search=False, raise_on_no_answer=False,
                lifetime=lifetime)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            return self._negative(responses[0] if responses else None)
        except dns.exception.Timeout:
            return self._failed("timeout")
        except dns.resolver.NoNameservers as exc:
            return self._failed(_why_no_nameservers(exc))
        except dns.exception.DNSException:
            return self._failed("error")
        except OSError:
            return self._failed("unreachable")
        if answer.rrset is None:
            return self._negative(answer.response)
        records = tuple(_record_text(rdata) for rdata in answer.rrset)
        return DnsAnswer(Status.FOUND, records,
                         expires=self._clock() + positive_ttl(answer.rrset.ttl, self._min_ttl))

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


def _why_no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    """servfail / refused / unreachable from the per-server errors dnspython collected."""
    reasons: list[str] = []
    for error in exc.kwargs.get("errors", []):
        response = error[4] if len(error) > 4 else None
        if isinstance(response, dns.message.Message):
            rcode = response.rcode()
            reasons.append({dns.rcode.SERVFAIL: "servfail",
                            dns.rcode.REFUSED: "refused"}.get(rcode, "error"))
        elif isinstance(error[3], OSError | EOFError):
            reasons.append("unreachable")
        else:
            reasons.append("error")
    for preferred in ("servfail", "refused", "unreachable"):
        if preferred in reasons:
            return preferred
    return "error"


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
