"""Reply words of the sources that answer a single value (pure), shared by their own verbs in
dispatch.py and by the fields of the `connect` answer.

`--` says "there is none" (no country, no ASN), `??` says "lookupd cannot tell right now";
an Exim ACL must never refuse mail on `??`.
"""

from __future__ import annotations

from lookupd.geoip import AsnResult, CountryResult
from lookupd.incidents import IncidentsResult
from lookupd.outcome import Status
from lookupd.protocol import shown

NONE = "--"
UNKNOWN = "??"


def render_country(result: CountryResult) -> str:
    if result.status is Status.FOUND and result.code:
        return result.code
    return NONE if result.status is Status.NOT_FOUND else UNKNOWN


def render_asn(result: AsnResult, *, organisation: bool = True) -> str:
    """`AS15169 Google LLC` (the `asn` verb), or just `AS15169` (a `connect` field)."""
    if result.status is Status.FOUND:
        if not organisation:
            return f"AS{result.number}"
        org = " ".join(shown(word) for word in (result.organisation or "").split())
        return f"AS{result.number} {org}".rstrip()
    return NONE if result.status is Status.NOT_FOUND else UNKNOWN


def render_incidents(result: IncidentsResult) -> str:
    """The count; an address the firewall never saw has 0 incidents, not "none"."""
    if result.status is Status.UNKNOWN:
        return UNKNOWN
    return str(result.count if result.status is Status.FOUND else 0)
