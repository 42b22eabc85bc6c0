"""Which DNSBL answers count as listings, and which are a list's error codes (pure).

A list answers with A records inside 127.0.0.0/8. Some of those are not listings at all:
Spamhaus uses 127.255.255.0/24 for "you may not ask" and 127.0.1.255 for "the DBL was asked
about an IP"; RFC 5782 says 127.0.0.1 never means listed; anything outside 127/8 is a
resolver or wildcard gone wrong. Those are errors, never hits, for every list. Some lists
have error answers of their own that look like codes of other lists (DNSWL's 127.0.0.255):
those are errors of that list only (`KNOWN_ERROR_CODES`, or a list's `error_codes`).

Codes are written as Postfix's postscreen_dnsbl_sites filters are: "127.0.0.2", every octet
a number or a bracketed list of numbers and ranges ("127.0.[0..255].[1..3]",
"127.0.0.[2;4;9..11]"); also a network ("127.255.255.0/24") or a bitmask of the last
octet ("&0x04").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

_MASK_RE = re.compile(r"&(0[xX][0-9a-fA-F]{1,2}|\d{1,3})")
_PATTERN_RE = re.compile(r"(\d{1,3}|\[[^\[\]]*\])" + r"\.(\d{1,3}|\[[^\[\]]*\])" * 3)
_ITEM_RE = re.compile(r"(\d{1,3})(?:\.\.(\d{1,3}))?")
_NETWORK_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}/\d{1,2}")
_FORMS = ('write "127.0.0.2", a range in any octet "127.0.[0..255].[2..11]" (postscreen '
          'syntax, "[2;4;9..11]" for several), a network "127.255.255.0/24" or a bitmask '
          '"&0x04"')

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

# What each error answer every list shares means, and what the admin should do about it.
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

# Error answers of particular lists (by zone), beside the shared ones above, and applied
# whatever the list's `error_codes` add. Spamhaus' (127.255.255.0/24, and 127.0.1.255 of
# the DBL) are shared already. SpamCop, Barracuda, SURBL and URIBL document no error answer
# in 127/8 other than 127.0.0.1 (SURBL's and URIBL's "query refused"), shared too.
KNOWN_ERROR_CODES: dict[str, tuple[str, ...]] = {
    # dnswl.org answers 127.0.0.255 to resolvers it blocks (over the free-use limit, or
    # asking through a big public resolver). Its codes are 127.0.CATEGORY.TRUST, trust 0-3.
    "list.dnswl.org": ("127.0.0.255",),
    "dwl.dnswl.org": ("127.0.0.255",),
}
_OWN_ERROR_ADVICE: dict[str, str] = {
    "127.0.0.255": "dnswl.org answers this to resolvers it blocks (over its free-use limit, "
                   "or queries through a public resolver): run a local resolver such as "
                   "unbound, or register with dnswl.org",
}


@dataclass(frozen=True)
class CodeRule:
    """One accepted answer: per octet, the ranges of values it may have (an exact code has
    one range of one value in each), or a bitmask of the last octet."""

    octets: tuple[tuple[tuple[int, int], ...], ...] = ()
    # Nonzero: a hit when the answer's last octet AND mask is nonzero (e.g. SURBL's multi).
    mask: int = 0

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        if self.mask:
            return address.packed[3] & self.mask != 0
        return all(any(low <= value <= high for low, high in ranges)
                   for value, ranges in zip(address.packed, self.octets, strict=True))


def parse_code(text: str) -> CodeRule:
    """Parse one code, range pattern, network or bitmask; ValueError says what is expected."""
    text = text.strip()
    if m := _MASK_RE.fullmatch(text):
        mask = int(m.group(1), 0)
        if not 0 < mask <= 0xFF:
            raise ValueError(f'bitmask {text!r} must be 1..255, e.g. "&0x04"')
        return CodeRule(mask=mask)
    if _NETWORK_RE.fullmatch(text):
        return _network(text)
    if m := _PATTERN_RE.fullmatch(text):
        octets = tuple(_octet(part, text) for part in m.groups())
        if not any(low <= 127 <= high for low, high in octets[0]):
            raise ValueError(f"{text!r} is outside 127.0.0.0/8, where lists answer: {_FORMS}")
        return CodeRule(octets=octets)
    raise ValueError(f"{text!r} is not an answer code: {_FORMS}")


def parse_codes(texts: Iterable[str]) -> tuple[CodeRule, ...]:
    return tuple(parse_code(t) for t in texts)


def _octet(part: str, original: str) -> tuple[tuple[int, int], ...]:
    if not part.startswith("["):
        value = int(part)
        if value > 255:
            raise ValueError(f"{original!r} is not an answer code: {_FORMS}")
        return ((value, value),)
    ranges: list[tuple[int, int]] = []
    for item in part[1:-1].split(";"):
        m = _ITEM_RE.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"{original!r} is not an answer code: {_FORMS}")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) is not None else low
        if low > high or high > 255:
            raise ValueError(f"range {original!r} must go from low to high within 0..255")
        ranges.append((low, high))
    return tuple(ranges)


def _network(text: str) -> CodeRule:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a network: {_FORMS}") from None
    if net.network_address not in _LOOPBACK_NET:
        raise ValueError(f"{text!r} is outside 127.0.0.0/8, where lists answer: {_FORMS}")
    # A prefix fixes whole octets, narrows one to a range and leaves the rest free.
    first, last = net.network_address.packed, net.broadcast_address.packed
    return CodeRule(octets=tuple(((lo, hi),) for lo, hi in zip(first, last, strict=True)))


def known_error_codes(zone: str) -> tuple[str, ...]:
    """The built-in error answers of a well-known list (none for others)."""
    return KNOWN_ERROR_CODES.get(zone.rstrip(".").lower(), ())


def error_advice(answer: str, own: tuple[CodeRule, ...] = ()) -> str | None:
    """None when `answer` may be a listing; else why it is not and what the admin should do.
    `own`: the list's own error answers (built in for known lists, plus its error_codes)."""
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
    if own and any(rule.matches(address) for rule in own):
        return _OWN_ERROR_ADVICE.get(
            answer, "it is one of the list's own error answers (error_codes), not a listing: "
                    "see the list's usage policy")
    return None


@dataclass(frozen=True)
class Classified:
    """A list's A records sorted out: the codes that count, the errors, and the rest."""

    hits: tuple[str, ...]
    errors: tuple[str, ...]


def classify(addresses: Iterable[str], rules: tuple[CodeRule, ...],
             errors: tuple[CodeRule, ...] = ()) -> Classified:
    """Split answers into hits (matching `rules`; no rules: any non-error code) and errors
    (the shared error answers, and `errors`, the list's own)."""
    hits: list[str] = []
    errs: list[str] = []
    for answer in addresses:
        if error_advice(answer, errors) is not None:
            errs.append(answer)
            continue
        address = ipaddress.IPv4Address(answer)
        if not rules or any(rule.matches(address) for rule in rules):
            hits.append(answer)
    return Classified(tuple(sorted(hits, key=_numeric)), tuple(sorted(errs, key=_numeric)))


def _numeric(answer: str) -> tuple[int, str]:
    try:
        return (int(ipaddress.ip_address(answer)), answer)
    except ValueError:
        return (-1, answer)
