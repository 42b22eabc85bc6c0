"""Query names: reversed IPs, checked domain names, Spamhaus DQS zones, RFC 5782 test points."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from lookupd import ipaddr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_DQS_KEY_RE = re.compile(r"[a-z0-9]{8,64}")


def parse_ip(text: str | IPAddress) -> IPAddress:
    """An address to check; IPv4-mapped IPv6 (::ffff:192.0.2.1) is checked as IPv4."""
    if isinstance(text, str):
        return ipaddr.parse_ip(text)
    if isinstance(text, ipaddress.IPv6Address) and text.ipv4_mapped is not None:
        return text.ipv4_mapped
    return text


@functools.lru_cache(maxsize=16384)  # asked for every list and the PTR of each connection
def reverse_ip(address: IPAddress) -> str:
    """The DNSBL label of an address: 1.2.3.4 -> 4.3.2.1; IPv6 -> 32 reversed nibbles."""
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def normalize_domain(text: str) -> str:
    """A domain to look up in a domain list: lower case, no trailing dot, valid labels.

    ValueError for anything else (IP literals, empty labels, over-long names): a domain list
    answers 127.0.1.255 or nonsense for those.
    """
    name = text.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ValueError(f"{text!r} is not a valid domain name") from None
    labels = name.split(".")
    if len(name) > 200 or len(labels) < 2 or not all(_LABEL_RE.fullmatch(x) for x in labels):
        raise ValueError(f"{text!r} is not a valid domain name")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ValueError(f"{text!r} is an IP address: use `dnsbl` for addresses")


def valid_dqs_key(key: str) -> bool:
    """Spamhaus DQS keys are 26 lower-case letters and digits; accept a little more."""
    return _DQS_KEY_RE.fullmatch(key) is not None


def query_zone(zone: str, *, spamhaus: bool, dqs_key: str) -> str:
    """The zone actually asked: Spamhaus lists with a DQS key go to KEY.<list>.dq.spamhaus.net.

    zen.spamhaus.org -> KEY.zen.dq.spamhaus.net, dbl.spamhaus.org -> KEY.dbl.dq.spamhaus.net.
    The result contains the key: never log it or put it in an answer.
    """
    zone = zone.rstrip(".").lower()
    if not (spamhaus and dqs_key):
        return zone
    if zone.endswith(".spamhaus.org"):
        return f"{dqs_key}.{zone.removesuffix('.spamhaus.org')}.dq.spamhaus.net"
    if zone.endswith(".dq.spamhaus.net") and not zone.startswith(dqs_key + "."):
        return f"{dqs_key}.{zone}"
    return zone


def redact(text: str, secret: str) -> str:
    """`text` with every occurrence of `secret` (any case) blanked out."""
    if not secret:
        return text
    return re.sub(re.escape(secret), "<key>", text, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Probe:
    """An RFC 5782 section 5 test entry and whether a healthy list lists it."""

    label: str
    listed: bool
    family: Literal["ipv4", "ipv6", "domain"]


def probe_points(kind: Literal["ip", "domain"],
                families: tuple[Literal["ipv4", "ipv6"], ...]) -> tuple[Probe, ...]:
    """RFC 5782: IPv4 lists list 127.0.0.2 and not 127.0.0.1; IPv6 lists ::FFFF:7F00:2 and
    not ::FFFF:7F00:1; domain lists list TEST and not INVALID."""
    if kind == "domain":
        return (Probe("test", True, "domain"), Probe("invalid", False, "domain"))
    points: list[Probe] = []
    if "ipv4" in families:
        points += [Probe(reverse_ip(ipaddress.IPv4Address("127.0.0.2")), True, "ipv4"),
                   Probe(reverse_ip(ipaddress.IPv4Address("127.0.0.1")), False, "ipv4")]
    if "ipv6" in families:
        points += [Probe(reverse_ip(ipaddress.IPv6Address("::ffff:7f00:2")), True, "ipv6"),
                   Probe(reverse_ip(ipaddress.IPv6Address("::ffff:7f00:1")), False, "ipv6")]
    return tuple(points)
