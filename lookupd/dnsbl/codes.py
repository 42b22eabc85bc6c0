"""Which DNSBL answers count as listings, and which are a list's error codes (pure).

A list answers with A records inside 127.0.0.0/8. Some of those are not listings at all:
Spamhaus uses 127.255.255.0/24 for "you may not ask" and 127.0.1.255 for "the DBL was asked
about an IP"; RFC 5782 says 127.0.0.1 never means listed; anything outside 127/8 is a
resolver or wildcard gone wrong. Those are errors, never hits.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

# "127.0.0.2", "127.0.0.[2..11]", "&0x04" / "&4".
_RANGE_RE = re.compile(r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.)\[(\d{1,3})\.\.(\d{1,3})\]")
_MASK_RE = re.compile(r"&(0[xX][0-9a-fA-F]{1,2}|\d{1,3})")

_LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
_SPAMHAUS_ERRORS_NET = ipaddress.IPv4Network("127.255.255.0/24")

# Spamhaus' documented return codes (ZEN and DBL pages of docs.spamhaus.com); used as the
# text of a hit when a Spamhaus list sends no TXT.
SPAMHAUS_MEANINGS: dict[str, str] = {
    "127.0.0.2": "Spamhaus SBL: known spam source",
    "127.0.0.3": "Spamhaus SBL CSS: snowshoe spam source",
    "127.0.0.4": "Spamhaus XBL: exploited or infected host",
    "127.0.0.9": "Spamhaus DROP: hijacked network",
    "127.0.0.10": "Spamhaus PBL: end-user range (ISP policy), should not send mail directly",
    "127.0.0.11": "Spamhaus PBL: end-user range (Spamhaus policy), should not send mail "
                  "directly",
    "127.0.1.2": "Spamhaus DBL: spam domain",
    "127.0.1.4": "Spamhaus DBL: phishing domain",
    "127.0.1.5": "Spamhaus DBL: malware domain",
    "127.0.1.6": "Spamhaus DBL: botnet C&C domain",
    "127.0.1.102": "Spamhaus DBL: abused legitimate domain (spam)",
    "127.0.1.103": "Spamhaus DBL: abused redirector or URL shortener",
    "127.0.1.104": "Spamhaus DBL: abused legitimate domain (phishing)",
    "127.0.1.105": "Spamhaus DBL: abused legitimate domain (malware)",
    "127.0.1.106": "Spamhaus DBL: abused legitimate domain (botnet C&C)",
}

# What each error answer means and what the admin should do about it.
_ERROR_ADVICE: dict[str, str] = {
    "127.255.255.252": "the list says the query name is mistyped: check the zone in "
                       "[[dnsbl.list]]",
    "127.255.255.254": "Spamhaus refuses queries from public/open resolvers: run a local "
                       "resolver such as unbound, or set dnsbl.dqs_key",
    "127.255.255.255": "Spamhaus says this resolver sent too many queries (free-use limit): "
                       "register for a free DQS key and set dnsbl.dqs_key",
    "127.0.1.255": "the domain list was asked about an IP address: it answers only for "
                   "domain names (set kind = \"domain\" for it, or use the IP list)",
    "127.0.0.1": "127.0.0.1 never means listed (RFC 5782): the list is misconfigured or "
                 "answers everything; remove it from [[dnsbl.list]] if this persists",
}


@dataclass(frozen=True)
class CodeRule:
    """One accepted answer: an address range (an exact code is a range of one) or a bitmask."""

    low: int = 0
    high: int = 0
    # Nonzero: a hit when the answer's last octet AND mask is nonzero (e.g. SURBL's multi).
    mask: int = 0

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        if self.mask:
            return int(address) & 0xFF & self.mask != 0
        return self.low <= int(address) <= self.high


def parse_code(text: str) -> CodeRule:
    """Parse "127.0.0.2", "127.0.0.[2..11]" or "&0x04"; ValueError says what is expected."""
    text = text.strip()
    if m := _MASK_RE.fullmatch(text):
        mask = int(m.group(1), 0)
        if not 0 < mask <= 0xFF:
            raise ValueError(f'bitmask {text!r} must be 1..255, e.g. "&0x04"')
        return CodeRule(mask=mask)
    if m := _RANGE_RE.fullmatch(text):
        first, last = int(m.group(2)), int(m.group(3))
        if first > last or last > 255:
            raise ValueError(f"range {text!r} must go from low to high within 0..255")
        low = _ipv4(m.group(1) + str(first), text)
        return CodeRule(low=int(low), high=int(low) + last - first)
    address = _ipv4(text, text)
    return CodeRule(low=int(address), high=int(address))


def parse_codes(texts: Iterable[str]) -> tuple[CodeRule, ...]:
    return tuple(parse_code(t) for t in texts)


def _ipv4(text: str, original: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(
            f'{original!r} is not an answer code: write "127.0.0.2", "127.0.0.[2..11]" '
            'or "&0x04"'
        ) from None


def error_advice(answer: str) -> str | None:
    """None when `answer` may be a listing; else why it is not and what the admin should do."""
    try:
        address = ipaddress.ip_address(answer)
    except ValueError:
        return "the answer is not an IPv4 address: the list or the resolver is broken"
    if not isinstance(address, ipaddress.IPv4Address) or address not in _LOOPBACK_NET:
        return ("the answer is outside 127.0.0.0/8, so it is not a DNSBL code: the zone no "
                "longer hosts a list (expired domain, wildcard) or the resolver rewrites "
                "answers; check the zone in [[dnsbl.list]]")
    if answer in _ERROR_ADVICE:
        return _ERROR_ADVICE[answer]
    if address in _SPAMHAUS_ERRORS_NET:
        return "127.255.255.0/24 is the list's error range, not a listing: see its usage policy"
    return None


@dataclass(frozen=True)
class Classified:
    """A list's A records sorted out: the codes that count, the errors, and the rest."""

    hits: tuple[str, ...]
    errors: tuple[str, ...]


def classify(addresses: Iterable[str], rules: tuple[CodeRule, ...]) -> Classified:
    """Split answers into hits (matching `rules`; no rules: any non-error code) and errors."""
    hits: list[str] = []
    errors: list[str] = []
    for answer in addresses:
        if error_advice(answer) is not None:
            errors.append(answer)
            continue
        address = ipaddress.IPv4Address(answer)
        if not rules or any(rule.matches(address) for rule in rules):
            hits.append(answer)
    return Classified(tuple(sorted(hits, key=_numeric)), tuple(sorted(errors, key=_numeric)))


def _numeric(answer: str) -> tuple[int, str]:
    try:
        return (int(ipaddress.ip_address(answer)), answer)
    except ValueError:
        return (-1, answer)
