"""What is never sent to a list (pure): special-use addresses and names, unless a list asks
for them, and names no list can hold.

A client on a private, loopback, link-local, documentation or other special-use address is
not on the Internet's lists: asking them about it only tells the list operators about the
inside of the network, and costs a query. rspamd skips them the same way by default. The
same holds for special-use domain names (a HELO of `laptop.local` or `localhost.test`). An
internal list that does list such addresses or names says so with `query_special = true`.

The address table follows IANA's IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890
and later), keeping only the blocks that are not globally reachable, and is explicit rather
than `ipaddress.is_global`, whose answer changes between Python versions. IPv4-mapped IPv6
(::ffff:10.1.2.3) is checked as the IPv4 address it carries (`names.parse_ip`).

HELO names and sender domains come as the client gave them: an address literal
(`[192.0.2.1]`), a name under a numeric TLD (a bare IP, `host.123`: smtpd skips those for its
RHSBL checks, as no such TLD can exist) or something that is no domain name at all are never
asked of any list (`smtp_name`).
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from lookupd.dnsbl.names import normalize_domain

# (network, the `skipped=` word). Globally reachable blocks inside these (192.0.0.9/32 and
# 192.0.0.10/32, anycast service addresses) never send mail and are left in.
_SPECIAL_V4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), word) for net, word in (
        ("0.0.0.0/8", "this-network"),        # RFC 791, 1122
        ("10.0.0.0/8", "private"),            # RFC 1918
        ("100.64.0.0/10", "shared"),          # RFC 6598: carrier-grade NAT
        ("127.0.0.0/8", "loopback"),          # RFC 1122
        ("169.254.0.0/16", "link-local"),     # RFC 3927
        ("172.16.0.0/12", "private"),         # RFC 1918
        ("192.0.0.0/24", "ietf-protocol"),    # RFC 6890
        ("192.0.2.0/24", "documentation"),    # RFC 5737: TEST-NET-1
        ("192.168.0.0/16", "private"),        # RFC 1918
        ("198.18.0.0/15", "benchmarking"),    # RFC 2544
        ("198.51.100.0/24", "documentation"),  # RFC 5737: TEST-NET-2
        ("203.0.113.0/24", "documentation"),  # RFC 5737: TEST-NET-3
        ("224.0.0.0/4", "multicast"),         # RFC 5771
        ("240.0.0.0/4", "reserved"),          # RFC 1112; 255.255.255.255 broadcast too
    ))
_SPECIAL_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), word) for net, word in (
        ("::/128", "unspecified"),            # RFC 4291
        ("::1/128", "loopback"),              # RFC 4291
        ("64:ff9b:1::/48", "private"),        # RFC 8215: local-use IPv4/IPv6 translation
        ("100::/64", "discard-only"),         # RFC 6666
        ("2001:2::/48", "benchmarking"),      # RFC 5180
        ("2001:db8::/32", "documentation"),   # RFC 3849
        ("3fff::/20", "documentation"),       # RFC 9637
        ("fc00::/7", "private"),              # RFC 4193: unique local
        ("fe80::/10", "link-local"),          # RFC 4291
        ("fec0::/10", "site-local"),          # RFC 3879: deprecated site-local
        ("ff00::/8", "multicast"),            # RFC 4291
    ))


@functools.lru_cache(maxsize=16384)  # asked for every dnsbl and connect query
def special_address(address: IPv4Address | IPv6Address) -> str:
    """The kind of special-use address `address` is ("private", "loopback", ...), or "" for
    an address on the Internet, which the lists are asked about."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return special_address(address.ipv4_mapped)
    if isinstance(address, IPv4Address):
        return next((word for net, word in _SPECIAL_V4 if address in net), "")
    return next((word for net, word in _SPECIAL_V6 if address in net), "")


# IANA's Special-Use Domain Names registry (RFC 6761, 6762, 7686, 8375, 9476), without the
# infrastructure names under .arpa, and ICANN's private-use .internal (2024). A name is
# special when it is one of these or under one.
SPECIAL_NAMES = ("alt", "example", "example.com", "example.net", "example.org", "home.arpa",
                 "internal", "invalid", "local", "localhost", "onion", "test")
_SPECIAL_SUFFIXES = tuple("." + name for name in SPECIAL_NAMES)

# The `skipped=` words for names.
SPECIAL_NAME = "special-use-name"
NUMERIC_TLD = "numeric-tld"
ADDRESS_LITERAL = "address-literal"
NOT_A_DOMAIN = "not-a-domain"


def special_name(name: str) -> str:
    """SPECIAL_NAME for a (normalized) special-use domain name, else ""."""
    if name in SPECIAL_NAMES or name.endswith(_SPECIAL_SUFFIXES):
        return SPECIAL_NAME
    return ""


def numeric_tld(name: str) -> bool:
    """A name whose last label is all digits (a bare IPv4 address too): no list can hold it."""
    return name.rstrip(".").rpartition(".")[2].isdigit()


def smtp_name(text: str) -> tuple[str, str]:
    """A HELO name or a sender domain (or whole address) as the client gave it: (the name to
    ask the domain lists, "") or ("", why none is asked). Empty text, "<>" and an address
    with nothing after its "@" (a bounce's empty sender) have nothing to ask: ("", "")."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    text = text.rpartition("@")[2]
    if not text:
        return "", ""
    if text.startswith("[") and text.endswith("]"):
        return "", ADDRESS_LITERAL
    if numeric_tld(text):
        return "", NUMERIC_TLD
    try:
        return normalize_domain(text), ""
    except ValueError:
        return "", NOT_A_DOMAIN
