"""IP address parsing shared by the sources: one strict parser, and "can this have a country"."""

from __future__ import annotations

import functools
import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address

# Longest text form of an address (IPv4-mapped IPv6 with every group written out); anything
# longer is not an address and is refused before ipaddress sees it.
_MAX_LEN = 45

# Addresses that cannot be located in a country: private, loopback, link-local, unspecified
# (all of 0.0.0.0/8 is "this network"), multicast, and RFC 6598 shared carrier-grade NAT space.
# Documentation ranges (192.0.2.0/24, 2001:db8::/32, ...) are deliberately not here: they are
# ordinary addresses to a GeoIP database, and the test data uses them.
_NO_COUNTRY_V4 = tuple(
    IPv4Network(n)
    for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4")
)
_NO_COUNTRY_V6 = tuple(
    IPv6Network(n) for n in ("::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8")
)


@functools.lru_cache(maxsize=16384)  # the same clients ask again and again; ~3 us saved
def parse_ip(text: str) -> IPAddress:
    """Parse one IPv4 or IPv6 address; IPv4-mapped IPv6 (::ffff:a.b.c.d) comes back as IPv4.

    Exim hands either form for the same client (dual-stack listeners), and every source must see
    one. Brackets, zone ids (fe80::1%eth0), prefixes and surrounding blanks are refused: a
    ValueError carries a short reason fit for an `error` reply.
    """
    if not text:
        raise ValueError("empty address")
    if len(text) > _MAX_LEN:
        raise ValueError("address too long")
    if "%" in text:
        raise ValueError("zone id not allowed")
    if "/" in text:
        raise ValueError("prefix not allowed")
    if not text.isascii() or text.strip() != text or text.startswith("["):
        raise ValueError("not an IP address")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("not an IP address") from None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_public(ip: IPAddress) -> bool:
    """False when `ip` cannot have a country: private, loopback, link-local, unspecified,
    multicast or shared CGNAT space. Documentation ranges count as public."""
    if isinstance(ip, IPv4Address):
        return not any(ip in net for net in _NO_COUNTRY_V4)
    if ip.ipv4_mapped is not None:
        return is_public(ip.ipv4_mapped)
    return not any(ip in net for net in _NO_COUNTRY_V6)
