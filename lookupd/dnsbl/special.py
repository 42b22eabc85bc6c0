"""What is never sent to a list (pure): special-use addresses, unless a list asks for them.

A client on a private, loopback, link-local, documentation or other special-use address is
not on the Internet's lists: asking them about it only tells the list operators about the
inside of the network, and costs a query. rspamd skips them the same way by default. An
internal list that does list such addresses says so with `query_special = true`.

The table follows IANA's IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and
later), keeping only the blocks that are not globally reachable, and is explicit rather than
`ipaddress.is_global`, whose answer changes between Python versions. IPv4-mapped IPv6
(::ffff:10.1.2.3) is checked as the IPv4 address it carries (`names.parse_ip`).
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

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
