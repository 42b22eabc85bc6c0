"""Suite `compare`: what lookupd saves, and costs, against the in-Exim ways it replaces.

Issue 6's benchmark. Each pair runs in the same run, alternating, over several rounds
(bench/pairs.py): medians, min-max and the ratio of lookupd's time to the other way's.
1. Country: Exim's embedded Perl (`perl_startup` loading a GeoIP2 reader, MaxMind::DB::Reader,
   on the same test .mmdb) `${perl{get_geo}{IP}}` against `${readsocket{...}{country IP}}`.
2. Incidents: `${lookup sqlite{...}}` on the nftfw and Sympl test databases (the nftfw
   `matchcount` form, the Sympl `sum(count)` form, the IPv6 `like` form) against
   `${readsocket{...}{incidents IP}}`.
3. User block: `${run{/bin/sh -c "echo USER >> FILE"}}` against `user-fail USER` (bench/users.py).
Each of those for one expansion per Exim process (an SMTP connection is a process) and for N
in one process.
4. DNSBL: whole `exim -bh` sessions, Exim's `dnslists` on three zones 20 ms away against
   `dnsbl IP` through `${readsocket}`, cold and warm (bench/dnsbl.py).
5. The protocol floor: lookupd's `ping` against the C baseline at 1, 8 and 64 clients, as the
   time per query (1/throughput).
Prints one table and draws its ratios as a bar chart (compare.png beside latest.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench import dnsbl, harness, pairs, users
from bench.harness import Contender, Context, SuiteResult
from bench.realparts import exim_be, exim_config, exim_problem, perl_problem

DESCRIPTION = ("lookupd vs the in-Exim ways it replaces (Perl GeoIP, sqlite, ${run}, dnslists)"
               " and vs the C baseline: one table of ratios and a chart")

GEOIP_DB = harness.TESTDATA_DIR / "maxmind" / "GeoIP2-Country-Test.mmdb"
NFTFW_DB = harness.TESTDATA_DIR / "firewall" / "nftfw-firewall.db"
SYMPL_DB = harness.TESTDATA_DIR / "firewall" / "sympl-firewall-blacklist-count.db"

# Clients of the test .mmdb and their countries (the expected answer of both ways).
COUNTRIES = (("81.2.69.142", "GB"), ("89.160.20.112", "SE"), ("2001:218::1", "JP"),
             ("216.160.83.56", "US"), ("67.43.156.1", "BT"))

# Exim's embedded Perl: the GeoIP2 reader opened once per Exim process, at perl_startup.
GEO_PL = """\
use strict;
use MaxMind::DB::Reader;
my $reader = MaxMind::DB::Reader->new(file => '{db}');
sub get_geo {{
  my ($ip) = @_;
  my $record = eval {{ $reader->record_for_address($ip) }};
  return '??' if $@;
  return '--' unless $record && $record->{{country}} && $record->{{country}}{{iso_code}};
  return $record->{{country}}{{iso_code}};
}}
1;
"""

# The users suite's daemon settings: no DNS lists, no mail, a limit never reached.
CONFIG = users.CONFIG


# One client of the incidents comparisons: the classic query, its answer through Exim's
# ${lookup sqlite} ("" when no row), the address lookupd is asked, lookupd's answer.
Client = tuple[str, str, str, str]
# Addresses on no firewall list (RFC 2544 benchmarking ranges; the IPv6 one inside the
# 2001:db8::/32 of the test data, on no row of it).
MISSES_V4 = ipaddress.IPv4Network("198.18.0.0/15")
MISSES_V6 = ipaddress.IPv6Network("2001:db8:ffff::/48")


def run(ctx: Context) -> SuiteResult:
    comparisons: list[pairs.Comparison] = []
    skipped: list[str] = []
    problem = exim_problem()
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(harness.baseline_server(ctx))
        nftfw = stack.enter_context(harness.lookupd_server(ctx, config=CONFIG))
        if problem is None:
            sympl = stack.enter_context(harness.lookupd_server(
                ctx, config=CONFIG, firewall_db=SYMPL_DB, name="lookupd-sympl"))
            sockets = {"nftfw": nftfw.endpoint, "sympl": sympl.endpoint}
            perl = perl_problem()
            if perl is None:
                comparisons += country(ctx, nftfw.endpoint)
            else:
                skipped.append(f"country via Exim's Perl: {perl}")
            comparisons += incidents(ctx, sockets)
            comparisons += users.exim_comparisons(ctx, nftfw.endpoint)
            comparisons += dnsbl.cold_comparisons(
                dnsbl.cold_timings(ctx, ctx.settings.rounds, ctx.settings.exim_runs))
        else:
            skipped.append(f"every Exim comparison: {problem}")
        comparisons += floor(ctx, base.endpoint, nftfw.endpoint)
    title = f"lookupd vs the in-Exim ways it replaces ({ctx.settings.rounds} rounds)"
    table = pairs.table(title, comparisons, notes=(
        *NOTES, *(f"not measured: {s}" for s in skipped)))
    return SuiteResult(
        "compare",
        (table,),
        {"comparisons": [c.to_json() for c in comparisons], "skipped": skipped},
        charts=(pairs.chart(title, comparisons, "compare.png"),),
    )


NOTES = (
    "Exim rows: `exim -C CONF -be` reading its expansions from stdin, timed from start to"
    " exit (what an SMTP connection pays: Exim runs a process per connection); `1 per Exim"
    " process` is one expansion in a new process, `N in one` that many in one process. The"
    " other way's configuration has only what it needs (perl_startup for Perl), lookupd's"
    " none of it.",
    "country: `${perl{get_geo}{IP}}` with perl_startup loading MaxMind::DB::Reader on"
    " GeoIP2-Country-Test.mmdb, against `${readsocket{SOCKET}{country IP}{3s}{}{??}}`;"
    f" {len(COUNTRIES)} clients in turn.",
    "incidents: `${lookup sqlite{DB QUERY}}` on the shared test databases (nftfw: `select"
    " matchcount from blacklist where ip='IP'`, indexed; Sympl: `select sum(count) ...`, no"
    " index on ip; IPv6: `... where ip like 'a:b:c:d:%'`, the client's /64, read row by row)"
    " against `${readsocket{SOCKET}{incidents IP}{3s}{}{??}}`, lookupd on the same database."
    " A new client every expansion, the database's own rows first, then addresses on none:"
    " Exim keeps a lookup's result for the rest of its process, so a repeated query would"
    " cost it nothing.",
    "DNSBL: whole `exim -bh` sessions, EHLO and QUIT, from a client on none of three lists"
    " whose DNS answers come 20 ms late (see the dnsbl suite).",
    "protocol floor: time per query (1/throughput) of lookupd's `ping` against the C"
    " baseline's, Exim-style clients (a new connection per query) from bench/loadgen.c.",
)


def _asking(endpoint: harness.Endpoint, verb: str) -> Callable[[str], str]:
    """The ${readsocket} expansion asking lookupd at ENDPOINT `VERB ARG`, for an ARG."""
    return lambda arg: f"${{readsocket{{{endpoint}}}{{{verb} {arg}}}{{3s}}{{}}{{??}}}}"


def _way(label: str, config: Path, lines: Callable[[int], tuple[list[str], list[str]]],
         n: int) -> pairs.Way:
    """A Way expanding N lines (and checking their answers) in one `exim -be`."""
    def once() -> float:
        exprs, answers = lines(n)
        return exim_be(config, exprs, answers)

    return pairs.Way(label, once)


def _cycling(items: Sequence[tuple[str, str]], expand: Callable[[str], str]
             ) -> Callable[[int], tuple[list[str], list[str]]]:
    """N expansions of EXPAND over ITEMS' keys, in turn, with their expected answers."""
    source = itertools.cycle(items)

    def lines(n: int) -> tuple[list[str], list[str]]:
        chosen = [next(source) for _ in range(n)]
        return [expand(key) for key, _ in chosen], [answer for _, answer in chosen]

    return lines


def country(ctx: Context, endpoint: harness.Endpoint) -> list[pairs.Comparison]:
    workdir = ctx.workdir / "exim-perl"
    workdir.mkdir()
    script = workdir / "geo.pl"
    script.write_text(GEO_PL.format(db=GEOIP_DB))
    script.chmod(0o644)
    perl_conf = exim_config(workdir, f"perl_startup = do '{script}'\n")
    plain_conf = exim_config(ctx.workdir / "exim-plain", "")
    perl_lines = _cycling(COUNTRIES, lambda ip: f"${{perl{{get_geo}}{{{ip}}}}}")
    sock_lines = _cycling(COUNTRIES, _asking(endpoint, "country"))
    return pairs.compare_in_exim(
        ctx, "country", partial(_way, "${perl} GeoIP2 reader", perl_conf, perl_lines),
        partial(_way, "${readsocket} country", plain_conf, sock_lines))


def incidents(ctx: Context, sockets: dict[str, harness.Endpoint]) -> list[pairs.Comparison]:
    """The three classic sqlite forms against `incidents`, each over distinct clients: rows
    of the database first, then addresses on none (Exim caches a lookup's result for the
    rest of its process: a repeated query would cost it nothing)."""
    config = exim_config(ctx.workdir / "exim-sqlite", "")
    n = max(ctx.settings.batch, ctx.settings.exim_runs * ctx.settings.rounds + 1)
    forms = (
        ("incidents, nftfw matchcount", "nftfw", nftfw_clients(n)),
        ("incidents, Sympl sum(count)", "sympl", sympl_clients(n)),
        ("incidents, nftfw IPv6 like", "nftfw", ipv6_like_clients(n)),
    )
    out = []
    for what, instance, clients in forms:
        classic = _cycling([(q, a) for q, a, _, _ in clients],
                           lambda q: f"${{lookup sqlite{{{q}}}}}")
        lookup = _cycling([(ip, a) for _, _, ip, a in clients],
                          _asking(sockets[instance], "incidents"))
        out += pairs.compare_in_exim(
            ctx, what, partial(_way, "${lookup sqlite}", config, classic),
            partial(_way, "${readsocket} incidents", config, lookup))
    return out


def _rows(db: Path, query: str) -> list[tuple[str, int]]:
    """Rows of a test database, opened read-only (the firewall owns it)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [(str(ip), int(count)) for ip, count in conn.execute(query)]


def _v4_misses(n: int) -> list[str]:
    return [str(ip) for ip in itertools.islice(MISSES_V4.hosts(), n)]


def nftfw_clients(n: int) -> list[Client]:
    """N clients: IPv4 rows of the nftfw database (`matchcount` by `ip`), then misses."""
    rows = _rows(NFTFW_DB, "select ip, matchcount from blacklist where ip not like '%:%'"
                           f" and ip not like '%/%' order by ip limit {n}")
    form = f"{NFTFW_DB} select matchcount from blacklist where ip='{{}}'"
    clients = [(form.format(ip), str(c), ip, str(c)) for ip, c in rows]
    return clients + [(form.format(ip), "", ip, "0") for ip in _v4_misses(n - len(clients))]


def sympl_clients(n: int) -> list[Client]:
    """N clients: IPv4 addresses of the Sympl database (the `sum(count)` of their rows)."""
    rows = _rows(SYMPL_DB, "select ip, sum(count) from blacklist where ip not like '%:%'"
                           f" and ip not like '%/%' group by ip order by ip limit {n}")
    form = f"{SYMPL_DB} select sum(count) from blacklist where ip='{{}}'"
    clients = [(form.format(ip), str(c), ip, str(c)) for ip, c in rows]
    # sum() over no rows is one NULL row: Exim's lookup then answers "".
    return clients + [(form.format(ip), "", ip, "0") for ip in _v4_misses(n - len(clients))]


def ipv6_like_clients(n: int) -> list[Client]:
    """N IPv6 clients, each asked by its /64 prefix (`ip like 'a:b:c:d:%'`: no index helps,
    sqlite reads every row): the networks of the nftfw database whose prefix matches only
    them, then addresses in no network."""
    rows = _rows(NFTFW_DB, "select ip, matchcount from blacklist where ip like '%:%'")
    form = f"{NFTFW_DB} select matchcount from blacklist where ip like '{{}}:%'"

    def prefix(addr: ipaddress.IPv6Address) -> str:
        return ":".join(f"{int(h, 16):x}" for h in addr.exploded.split(":")[:4])

    stored = [ip for ip, _ in rows]
    clients = []
    for ip, count in rows:
        net = ipaddress.IPv6Network(ip, strict=False)
        pre = prefix(net.network_address)
        # The pattern as the classic form writes it must match this row, and only it.
        if [s for s in stored if s.startswith(pre + ":")] == [ip]:
            clients.append((form.format(pre), str(count), str(net.network_address + 0x25),
                            str(count)))
    clients = clients[:n]
    for i in range(n - len(clients)):
        miss = MISSES_V6.network_address + (i << 64) + 0x25
        clients.append((form.format(prefix(miss)), "", str(miss), "0"))
    return clients


def floor(ctx: Context, baseline: harness.Endpoint,
          lookupd: harness.Endpoint) -> list[pairs.Comparison]:
    """lookupd's `ping` against the C baseline: the cost of the protocol itself."""
    base_series, series = harness.alternate(
        ctx, Contender(harness.BASELINE, baseline, "ping", "pong"),
        [Contender("lookupd ping", lookupd, "ping", "pong")], ctx.settings.clients)
    failed = [s for s in [*base_series, *series] if s.failed]
    if failed:
        raise harness.BenchError("ping failed: " + "; ".join(harness.problem_notes(failed)))
    by_clients = {s.clients: s for s in series}
    return [
        pairs.Comparison(f"protocol floor, ping, {b.clients} client{'s' * (b.clients > 1)}",
                         pairs.from_series(b, "C baseline"),
                         pairs.from_series(by_clients[b.clients], "lookupd ping"), unit="us")
        for b in base_series
    ]

