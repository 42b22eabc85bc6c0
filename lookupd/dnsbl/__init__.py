"""DNSBL, DBL and reverse-DNS verdicts: parallel, cached for every client, never fooled by a
list's error codes, never telling a list about special-use addresses or names. `DnsblSource`
does the fetching; the sibling modules decide and render."""

from __future__ import annotations

from lookupd.dnsbl.render import render_dnsbl, render_ptr, render_stats
from lookupd.dnsbl.source import Cached, DnsblSource
from lookupd.dnsbl.stats import DnsblStats, ListStats
from lookupd.dnsbl.verdict import DnsblResult, ListAnswer, PtrResult

__all__ = ["Cached", "DnsblResult", "DnsblSource", "DnsblStats", "ListAnswer", "ListStats",
           "PtrResult", "render_dnsbl", "render_ptr", "render_stats"]
