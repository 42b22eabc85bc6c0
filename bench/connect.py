"""Suite `connect`: the `connect` verb with every source warm, and what the connect ACL costs.

Issue 5's benchmark, two tables from one run:
1. `connect IP 25` at 8 Exim-style clients against the C baseline: lookupd asks GeoIP
   (country and ASN), the firewall database, three DNSBLs (rbldnsd) and reverse DNS with its
   forward confirmation (knot), both behind a local resolver (dnsmasq), all answered from
   memory or lookupd's DNS cache once warm. Two clients: one accepted, one denied (the deny
   also writes lookupd's log line).
2. Whole `exim -bh` sessions (EHLO, QUIT) with the single-file example configuration
   (exim-snippets/single-file/exim.conf): lookupd's connect ACL, and one `${readsocket}` of
   `ping` only, each against the same configuration with an empty connect ACL, alternating.
   The difference is what one connect verdict costs a real Exim process.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from bench import dnsbl, harness, pairs
from bench.harness import BenchError, Contender, Context, SuiteResult, Table
from bench.realparts import dnsservers, exim_bh, exim_problem

DESCRIPTION = "connect verb (all sources warm) vs the C baseline; exim -bh with/without the ACL"

ACCEPTED = "81.2.69.142"  # GB, no incidents, on no list, PTR mail.bench.test (confirmed)
DENIED = "203.0.113.7"  # 42 incidents in the nftfw test database
SINGLE_FILE = harness.REPO_DIR / "exim-snippets" / "single-file" / "exim.conf"
SESSION = "EHLO client.example\nQUIT\n"

# Reverse DNS for ACCEPTED, and the name pointing back at it (fcrdns=yes).
KNOT_ZONES = {
    "69.2.81.in-addr.arpa": """
$TTL 3600
@ SOA ns.bench.test. hostmaster.bench.test. 1 600 60 3600 3600
@ NS ns.bench.test.
142 PTR mail.bench.test.
""",
    "bench.test": """
$TTL 3600
@ SOA ns.bench.test. hostmaster.bench.test. 1 600 60 3600 3600
@ NS ns.bench.test.
ns A 127.0.0.1
mail A 81.2.69.142
""",
}

CONFIG = """\
[server]
# Exim's ACLs run as Debian-exim; the socket is in the bench's private directory.
socket_mode = "0666"
[geoip]
asn_db = "{asn_db}"
[dnsbl]
nameservers = ["127.0.0.1:{port}"]
# Warm means cached: errors (the reverse zones nobody serves) are kept as long as answers.
error_ttl = "1h"
negative_ttl_max = "1h"
{lists}
[connect]
submission_countries = ["GB"]
"""


def run(ctx: Context) -> SuiteResult:
    with contextlib.ExitStack() as stack:
        resolver = _dns(ctx.workdir, stack)
        config = CONFIG.format(port=resolver, lists=dnsbl.LISTS_CONFIG,
                               asn_db=harness.TESTDATA_DIR / "maxmind" / "GeoLite2-ASN-Test.mmdb")
        base = stack.enter_context(harness.baseline_server(ctx))
        lookupd = stack.enter_context(harness.lookupd_server(ctx, config=config))
        contenders = [Contender(f"lookupd connect {ip} 25", lookupd.endpoint, f"connect {ip} 25",
                                warm_answer(lookupd.endpoint, ip, action), pid=lookupd.proc.pid)
                      for ip, action in ((ACCEPTED, "accept"), (DENIED, "deny"))]
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong", pid=base.proc.pid)
        base_series, series = harness.alternate(ctx, baseline, contenders, (8,))
        tables = [Table(
            title=f"connect, every source warm, vs the C baseline ({ctx.settings.rounds} rounds,"
                  " medians)",
            header=harness.RATIO_HEADER,
            rows=harness.ratio_rows(base_series, series),
            notes=(
                "connect asks GeoIP country and ASN, the firewall database, three DNSBLs"
                " (rbldnsd) and reverse DNS with its forward confirmation (knot), behind"
                " dnsmasq on loopback; after the warm-up every DNS answer is in lookupd's"
                " cache. The deny row also writes lookupd's INFO log line per answer.",
                "x/C: lookupd's figure over the C baseline's `ping` in the same round.",
                harness.CPU_NOTE,
                *harness.problem_notes([*base_series, *series]),
            ),
        )]
        data: dict[str, object] = {"series": [s.to_json() for s in base_series + series]}
        problem = exim_problem() or (None if SINGLE_FILE.exists() else f"no {SINGLE_FILE}")
        if problem is None:
            comparisons = exim_sessions(ctx, lookupd.endpoint)
            tables.append(pairs.table(
                "exim -bh session (EHLO, QUIT), single-file example configuration:"
                f" connect ACL vs an empty one ({ctx.settings.rounds} rounds)",
                comparisons, notes=(
                    f"{ACCEPTED} on port 25, accepted. A session is a whole Exim process: start,"
                    " read the configuration, run the connect ACL, EHLO, QUIT. The other way:"
                    " the same configuration with an empty connect ACL (`accept`). lookupd's"
                    " ACL: the snippets' (one ${readsocket} of `connect`, then ${extract}s);"
                    " `ping` only: one ${readsocket} and nothing else, Exim's own share.",
                )))
            data["exim_bh"] = [c.to_json() for c in comparisons]
        else:
            tables.append(Table("exim -bh connect ACL", ("skipped",), (),
                                (f"not measured: {problem}",)))
    return SuiteResult("connect", tuple(tables), data,
                       failed_queries=sum(s.failed for s in [*base_series, *series]))


def _dns(workdir: Path, stack: contextlib.ExitStack) -> int:
    """The lists (rbldnsd) and reverse DNS (knot) behind dnsmasq; dnsmasq's port."""
    rbl = dnsbl.start_lists(workdir / "lists")
    stack.callback(rbl.stop)
    knot = dnsservers.Knot(workdir / "knot", zones=dict(KNOT_ZONES), broken=())
    stack.callback(knot.stop)
    dnsbl.started(knot)
    routes = {zone: rbl.port for zone, _, _ in dnsbl.ZONES}
    routes |= {zone: knot.port for zone in KNOT_ZONES}
    forwarder = dnsservers.Dnsmasq(workdir / "dnsmasq", routes)
    stack.callback(forwarder.stop)
    dnsbl.started(forwarder)
    return forwarder.port


def warm_answer(endpoint: harness.Endpoint, ip: str, action: str) -> str:
    """Ask until every source has answered (filling lookupd's caches) and return the answer
    every later query must get."""
    answer = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = harness.exim_query(endpoint, f"connect {ip} 25".encode()).decode()
        if "dnsbl=unknown" not in answer and (ip != ACCEPTED or "fcrdns=yes" in answer):
            break
        time.sleep(0.1)  # the DNS answers are on their way
    if not answer.startswith(f"action={action} ") or "dnsbl=clean" not in answer:
        raise BenchError(f"lookupd answered `connect {ip} 25` with {answer!r}")
    if ip == ACCEPTED and "fcrdns=yes" not in answer:
        raise BenchError(f"lookupd answered `connect {ip} 25` with {answer!r}: no fcrdns=yes")
    return answer


# --- exim -bh sessions -----------------------------------------------------------------------


def exim_sessions(ctx: Context, endpoint: harness.Endpoint) -> list[pairs.Comparison]:
    """Whole sessions: lookupd's connect ACL and a `ping`-only one, each against none."""
    text = SINGLE_FILE.read_text()
    hook = "acl_smtp_connect = acl_check_connect\n"
    if hook not in text or "\nbegin acl\n" not in text:
        raise BenchError(f"{SINGLE_FILE} has changed: no `{hook.strip()}` / `begin acl` in it")
    workdir = ctx.workdir / "exim"
    for sub in ("spool", "log"):
        (workdir / sub).mkdir(parents=True)
        (workdir / sub).chmod(0o777)
    # No host lookups (they would ask the system's resolver); macros set here, not with -D
    # (with -D Exim gives up root, and would have to be told the macros are safe).
    prefix = (f"HOST_LOOKUP =\nLOOKUPD_SOCKET = {endpoint}\nSPOOLDIR = {workdir / 'spool'}\n"
              f"LOGFILEPATH = {workdir / 'log'}/%slog\n")

    def config(name: str, body: str | None) -> Path:
        path = workdir / f"{name}.conf"
        full = prefix + text
        path.write_text(full if body is None else _with_connect_acl(full, hook, body))
        path.chmod(0o644)
        return path

    snippets = config("lookupd", None)
    empty = config("empty", "  accept\n")
    ping = config("ping", "  warn set acl_c_bench = ${readsocket{LOOKUPD_SOCKET}{ping}{3s}{}"
                          "{down}}\n  accept\n")
    # The ACL really asks lookupd: a client it denies is refused.
    exim_bh(snippets, DENIED, SESSION, "550 Blacklisted")

    def way(label: str, conf: Path) -> pairs.Way:
        return pairs.Way(label, lambda: exim_bh(conf, ACCEPTED, SESSION, "221 "))

    empty_way = way("empty connect ACL", empty)
    timings = pairs.interleave([empty_way, way("one ${readsocket} of ping", ping),
                                way("lookupd's connect ACL", snippets)],
                               ctx.settings.rounds, ctx.settings.exim_runs)
    return [pairs.Comparison("exim -bh session, ping only", timings[0], timings[1]),
            pairs.Comparison("exim -bh session, lookupd connect ACL", timings[0], timings[2])]


def _with_connect_acl(text: str, hook: str, body: str) -> str:
    """TEXT with its connect ACL replaced by one named acl_bench_connect holding BODY."""
    return (text.replace(hook, "acl_smtp_connect = acl_bench_connect\n")
            .replace("\nbegin acl\n", f"\nbegin acl\n\nacl_bench_connect:\n{body}\n", 1))
