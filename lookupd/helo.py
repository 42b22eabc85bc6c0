"""The `helo` verb: what a client's HELO name says about it, and lookupd's verdict.

    helo IP OURNAME OURADDR HELO
    -> action=accept|deny would=none|deny check=CHECK facts=CHECK,... reason="..."

Asked by the RCPT ACL, once per connection, only for clients that did not authenticate and
are neither relay hosts nor allowlisted: a bad HELO then costs a bot its recipients, never a
user (qpsmtpd's `naughty` idea). OURNAME is Exim's $primary_hostname and OURADDR the address
the client connected to ("-" when there is none). `facts()` reads the name (pure), `decide()`
applies [helo] policy (pure); `HeloChecker` only fetches A/AAAA/MX and the domain lists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from lookupd.allowlist import ListFiles
from lookupd.config import HeloConfig
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.render import exim_value, printable
from lookupd.dnsbl.verdict import DnsblResult
from lookupd.errors import BadRequest
from lookupd.ipaddr import IPAddress, parse_ip
from lookupd.outcome import Status
from lookupd.protocol import shown

log = logging.getLogger(__name__)

Check = Literal["ours", "localhost", "bare_ip", "listed", "no_dot", "not_domain",
                "no_resolve", "literal_mismatch", "not_client"]

# What each policy refuses, in the order the reply names them. lenient: what no real mail
# server sends; rfc: also what RFC 5321 section 4.1.1.1 forbids (a name that is not a fully
# qualified domain name) and a name DNS does not know, which real Exchange servers behind a
# ".local" name do send (qpsmtpd's `rfc`); strict: also a name or literal that is not the
# client's own address (RFC 5321 section 4.1.4 says a server MUST NOT refuse on that alone).
POLICIES: dict[str, tuple[Check, ...]] = {
    "lenient": ("ours", "localhost", "bare_ip", "listed"),
    "rfc": ("ours", "localhost", "bare_ip", "listed", "no_dot", "not_domain", "no_resolve"),
    "strict": ("ours", "localhost", "bare_ip", "listed", "no_dot", "not_domain", "no_resolve",
               "literal_mismatch", "not_client"),
}

REASONS: dict[Check, str] = {
    "ours": "is one of our own names or addresses",
    "localhost": "is localhost",
    "bare_ip": "is an address without brackets",
    "listed": "is on a domain block list",
    "no_dot": "is not a fully qualified domain name",
    "not_domain": "is not a domain name",
    "no_resolve": "does not resolve",
    "literal_mismatch": "is not your address",
    "not_client": "does not resolve to your address",
}

# lookupd without its configuration: nothing checked, nothing refused.
HELO_FAIL_OPEN = 'action=accept would=none check=none facts="" reason=""'

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SHOWN = 64


@dataclass(frozen=True, slots=True)
class HeloRequest:
    ip: IPAddress
    helo: str
    own_names: tuple[str, ...] = ()
    own_address: IPAddress | None = None


def parse_args(args: tuple[str, ...]) -> HeloRequest:
    """`helo IP OURNAME OURADDR HELO...`; BadRequest when IP is not an address."""
    try:
        ip = parse_ip(args[0])
    except ValueError:
        raise BadRequest(f'not an IP address: "{shown(args[0])}"') from None
    own_name = args[1].lower().rstrip(".") if len(args) > 1 and args[1] != "-" else ""
    own_address: IPAddress | None = None
    if len(args) > 2:
        try:
            own_address = parse_ip(args[2])
        except ValueError:
            own_address = None  # "-": no interface address (exim -bs)
    return HeloRequest(ip, " ".join(args[3:]), (own_name,) if own_name else (), own_address)


@dataclass(frozen=True, slots=True)
class HeloFacts:
    """The name's syntax facts (from the text) and its DNS facts (fetched)."""

    request: HeloRequest
    found: frozenset[Check]
    # Checks that could not be answered (DNS timeouts): never refused on.
    unknown: frozenset[Check] = frozenset()


@dataclass(frozen=True, slots=True)
class HeloVerdict:
    action: Literal["accept", "deny"]
    check: Check | Literal["none"] = "none"
    would: Literal["none", "deny"] = "none"
    reason: str = ""


def _literal(name: str) -> IPAddress | None:
    """The address of an address literal ([192.0.2.1], [IPv6:2001:db8::1]); None otherwise."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        return None


def _bare(name: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_domain(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels) \
        and not labels[-1].isdigit()


def syntax_facts(request: HeloRequest, own_names: tuple[str, ...]) -> set[Check]:
    """What the name itself says (pure): no DNS."""
    name = request.helo.lower().rstrip(".")
    client = request.ip
    local_client = client.is_loopback
    found: set[Check] = set()
    literal, bare = _literal(name), _bare(name)
    address = literal or bare
    ours = {n.lower().rstrip(".") for n in (*own_names, *request.own_names) if n}
    if not local_client:
        if name in ("localhost", "localhost.localdomain") or (
                address is not None and address.is_loopback):
            found.add("localhost")
        elif name in ours or (address is not None and address == request.own_address
                              and address != client):
            found.add("ours")
    if bare is not None:
        found.add("bare_ip")
    if literal is not None:
        if literal != client:
            found.add("literal_mismatch")
        return found
    if bare is not None:
        return found
    if not is_domain(name):
        found.add("not_domain")
    elif "." not in name:
        found.add("no_dot")
    return found


def needs_dns(request: HeloRequest) -> str | None:
    """The name to resolve, when it is a dotted domain name; None otherwise."""
    name = request.helo.lower().rstrip(".")
    if _literal(name) or _bare(name) or not is_domain(name) or "." not in name:
        return None
    return name


def dns_facts(client: IPAddress, a: DnsAnswer, aaaa: DnsAnswer, mx: DnsAnswer,
              listed: DnsblResult) -> tuple[set[Check], set[Check]]:
    """(found, unknown) from the name's A, AAAA and MX answers and the domain lists (pure)."""
    found: set[Check] = set()
    unknown: set[Check] = set()
    answers = (a, aaaa, mx)
    if any(x.status is Status.FOUND for x in answers):
        addresses = {r.strip() for x in (a, aaaa) if x.status is Status.FOUND for r in x.records}
        if str(client) not in addresses:
            if a.status is Status.UNKNOWN or aaaa.status is Status.UNKNOWN:
                unknown.add("not_client")
            else:
                found.add("not_client")
    elif all(x.status is Status.NOT_FOUND for x in answers):
        found.update(("no_resolve", "not_client"))
    else:
        unknown.update(("no_resolve", "not_client"))
    if listed.status is Status.FOUND:
        found.add("listed")
    elif listed.status is Status.UNKNOWN:
        unknown.add("listed")
    return found, unknown


def decide(facts: HeloFacts, config: HeloConfig, *, allowlisted: bool = False) -> HeloVerdict:
    """The policy's first matching check, enforced or (log_only) only said."""
    if allowlisted:
        return HeloVerdict("accept", reason="allowlisted")
    for check in POLICIES[config.policy]:
        if check in facts.found:
            helo = shown(facts.request.helo[:_SHOWN])
            reason = f"Your HELO name {helo} {REASONS[check]}"
            if config.log_only:
                return HeloVerdict("accept", check, "deny", reason)
            return HeloVerdict("deny", check, "none", reason)
    return HeloVerdict("accept")


def render(verdict: HeloVerdict, facts: HeloFacts) -> str:
    found = ",".join(c for c in REASONS if c in facts.found)
    return (f"action={verdict.action} would={verdict.would} check={verdict.check} "
            f"facts={exim_value(found)} reason={exim_value(printable(verdict.reason, 200))}")


class HeloDns(Protocol):
    async def resolve(self, name: str, rdtype: str) -> DnsAnswer: ...

    async def check_smtp_name(self, text: str,
                              client: IPAddress | None = None) -> DnsblResult: ...


class HeloChecker:
    """Fetches the HELO name's DNS facts, decides, and logs what it refuses (or would)."""

    def __init__(self, config: HeloConfig, dns: HeloDns, allowlist: ListFiles, *,
                 on_verdict: Callable[[str, str, str], None] | None = None) -> None:
        self.config = config
        self.dns = dns
        self.allowlist = allowlist
        self.on_verdict = on_verdict  # the metrics' count of verdicts

    async def answer(self, request: HeloRequest) -> str:
        facts = await self.facts(request)
        allowlisted = self.allowlist.match(request.ip).status is Status.FOUND
        verdict = decide(facts, self.config, allowlisted=allowlisted)
        if self.on_verdict is not None:
            self.on_verdict(verdict.action, verdict.check, verdict.would)
        if verdict.check != "none":
            what = "deny" if verdict.action == "deny" else "would deny (log-only)"
            log.info("helo %s: [%s] helo %s check=%s", what, request.ip,
                     shown(request.helo[:_SHOWN]), verdict.check)
        return render(verdict, facts)

    async def facts(self, request: HeloRequest) -> HeloFacts:
        found = syntax_facts(request, self.config.own_names)
        unknown: set[Check] = set()
        name = needs_dns(request)
        if name is not None:
            # lenient refuses on no DNS fact but the domain lists: it asks for nothing else.
            forward = self.config.policy != "lenient"
            skipped = DnsAnswer(Status.FOUND, (str(request.ip),))
            try:
                async with asyncio.timeout(self.config.deadline):
                    a, aaaa, mx, listed = await asyncio.gather(
                        self.dns.resolve(name, "A") if forward else _given(skipped),
                        self.dns.resolve(name, "AAAA") if forward else _given(skipped),
                        self.dns.resolve(name, "MX") if forward else _given(skipped),
                        self.dns.check_smtp_name(name, request.ip))
            except TimeoutError:
                unknown.update(("no_resolve", "not_client", "listed"))
            else:
                more, unknown = dns_facts(request.ip, a, aaaa, mx, listed)
                found |= more
        return HeloFacts(request, frozenset(found), frozenset(unknown))


async def _given(answer: DnsAnswer) -> DnsAnswer:
    """An answer not asked for (lenient): as if the name resolved to the client."""
    return answer
