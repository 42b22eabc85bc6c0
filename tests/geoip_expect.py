"""Expected country answers, read from the JSON sources of MaxMind's test databases.

Shared by the GeoIP source tests and the server tests that replay them over the socket.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

NO_COUNTRY = "--"


def _networks(json_path: Path) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                               dict[str, Any]]]:
    """(network, record) pairs in file order; `::a.b.c.d/N` (N >= 96) becomes IPv4, as the
    MaxMind writer stores IPv4 in the ::/96 subtree. Host bits are masked like the writer does."""
    entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    out: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, dict[str, Any]]] = []
    for entry in entries:
        for key, record in entry.items():
            net = ipaddress.ip_network(key, strict=False)
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 \
                    and int(net.network_address) >> 32 == 0 and "." in key:
                v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
                net = ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}", strict=False)
            out.append((net, record))
    return out


def country_expectations(json_path: Path, field: str = "country") -> list[tuple[str, str]]:
    """(address, expected reply code or "--") for the first and last address of every network.

    `field` is "country" or "registered_country". A network listed twice answers as its last
    entry (the writer overwrites).
    """
    answers: dict[str, str] = {}
    for net, record in _networks(json_path):
        entry = record.get(field)
        code = entry.get("iso_code") if isinstance(entry, dict) else None
        for addr in (net.network_address, net.broadcast_address):
            answers[str(addr)] = code.upper() if code else NO_COUNTRY
    return list(answers.items())


def asn_expectations(json_path: Path) -> list[tuple[str, int | None, str]]:
    """(address, AS number or None, organisation or "") for the first and last address of every
    network of an ASN database's JSON source."""
    answers: dict[str, tuple[int | None, str]] = {}
    for net, record in _networks(json_path):
        number = record.get("autonomous_system_number")
        org = record.get("autonomous_system_organization", "")
        for addr in (net.network_address, net.broadcast_address):
            answers[str(addr)] = (number, org)
    return [(addr, number, org) for addr, (number, org) in answers.items()]
