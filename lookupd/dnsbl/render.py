"""Reply lines for `dnsbl`, `dbl`, `sender`, `ptr` and the DNSBL part of `stats` (pure).

Every reply is one line of `key=value` pairs for Exim's `${extract{key}{...}}`. Exim reads
a value up to the next white space, or, when it starts with a double quote, up to the
closing quote with backslash escapes (\\" and \\\\) undone. So values with spaces or
quotes, and empty values, are always quoted: an empty unquoted value would swallow the
next pair (`name= fcrdns=no` reads name as "fcrdns=no").

    dnsbl IP / dbl DOMAIN
        verdict=listed|clean|unknown score=N lists=LIST:CODE,... unknown=LIST:REASON,...
        text="..." skipped=WHY
      e.g. verdict=listed score=2 lists=zen.spamhaus.org:127.0.0.4,bl.spamcop.net:127.0.0.2
           unknown=b.barracudacentral.org:timeout text="zen.spamhaus.org: ..." skipped=""
      A list that answered several codes appears once per code. Scores are whole numbers
      when the weights are. `text` is printable ASCII, at most TEXT_MAX characters.
      `skipped` is "" when every list serving the query was asked, else why some (or all)
      were not: the kind of special-use address ("private", "documentation", ...), or for
      names "special-use-name", "numeric-tld", "address-literal", "not-a-domain".
    sender [DOMAIN|ADDRESS]
        the same as dbl, for a sender domain as the client gave it
    ptr IP
        name=<PTR name or ""> fcrdns=yes|no|unknown
    stats (the DNSBL part, one line)
        dnsbl_cache=ENTRIES/SIZE dnsbl_inflight=N LIST=queries:N,hits:N,errors:N,
        timeouts:N,cache_hit_rate:R,state:ok|unprobed|quarantined-REASON,p50_ms:X,
        p99_ms:Y ...
        dnsbl_resolver=ok|no-nameserver|no-list-answers dnsbl_silent=NAMESERVER,...
      one LIST= pair per configured list, plus reverse-dns= for `ptr`, so
      ${extract{zen.spamhaus.org}{...}} gives one list's figures; dnsbl_resolver says
      whether the resolver is to blame for every list's failures, dnsbl_silent which
      nameservers did not answer the last liveness question.
"""

from __future__ import annotations

import re

from lookupd.dnsbl.health import UNPROBED
from lookupd.dnsbl.stats import DnsblStats, ListStats
from lookupd.dnsbl.verdict import DnsblResult, PtrResult
from lookupd.outcome import Status

# Longest `text=` value: Exim puts it into an SMTP reply line, which RFC 5321 caps at 512.
TEXT_MAX = 200
# The `verdict=` word of a DNSBL result (also the `dnsbl=` field of `connect`).
VERDICTS = {Status.FOUND: "listed", Status.NOT_FOUND: "clean", Status.UNKNOWN: "unknown"}
_TOKEN_RE = re.compile(r"[A-Za-z0-9._:,/@+-]+")


def printable(text: str, limit: int) -> str:
    """Printable ASCII only, white space runs made one space, cut to `limit` characters."""
    if len(text) <= limit and text.isascii() and text.isprintable() and "  " not in text \
            and text == text.strip():
        return text  # already clean: the common case, asked on every reply
    clean = "".join(c if " " <= c <= "~" else " " if c.isspace() else "?" for c in text)
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3].rstrip() + "..."


def exim_value(text: str) -> str:
    """`text` as an Exim extract value: bare when it is a plain token, else quoted."""
    if _TOKEN_RE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def score_text(score: float) -> str:
    return str(int(score)) if score == int(score) else f"{score:g}"


def render_dnsbl(result: DnsblResult) -> str:
    lists = ",".join(f"{a.name}:{code}" for a in result.listed for code in a.codes)
    unknown = ",".join(f"{a.name}:{a.reason}" for a in result.unknown)
    return (f"verdict={VERDICTS[result.status]} score={score_text(result.score)} "
            f"lists={exim_value(lists)} unknown={exim_value(unknown)} "
            f"text={exim_value(printable(result.text, TEXT_MAX))} "
            f"skipped={exim_value(result.skipped)}")


def render_ptr(result: PtrResult) -> str:
    return f"name={exim_value(printable(result.name, 255))} fcrdns={result.fcrdns}"


def _list_figures(s: ListStats) -> str:
    # An unprobed list is not out of service (it is unknown while it is unprobed).
    state = ("ok" if not s.quarantine else "unprobed" if s.quarantine == UNPROBED
             else f"quarantined-{s.quarantine}")
    return (f"queries:{s.queries},hits:{s.hits},errors:{s.errors},timeouts:{s.timeouts},"
            f"cache_hit_rate:{s.cache_hit_rate:.2f},state:{state},"
            f"p50_ms:{s.p50_ms:.1f},p99_ms:{s.p99_ms:.1f}")


def render_stats(stats: DnsblStats) -> str:
    pairs = [f"dnsbl_cache={stats.cache_entries}/{stats.cache_size}",
             f"dnsbl_inflight={stats.inflight}"]
    pairs += [f"{exim_value(s.name)}={_list_figures(s)}" for s in stats.lists]
    pairs += [f"dnsbl_resolver={stats.resolver or 'ok'}",
              f"dnsbl_silent={exim_value(','.join(stats.silent))}"]
    return " ".join(pairs)
