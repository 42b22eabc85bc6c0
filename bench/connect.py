"""Suite `connect`: the `connect` verb with every source warm, and what the connect ACL costs.

Issue 5's benchmark, two tables from one run:
1. `connect IP 25` at 8 Exim-style clients against the C baseline: lookupd asks GeoIP
   (country and ASN), the firewall database, a DNSBL served by a local rbldnsd, and reverse
   DNS, all answered from memory or lookupd's DNS cache once warm. Two clients: one accepted,
   one denied (the deny also writes lookupd's log line).
2. Whole `exim -bh` sessions (connect, QUIT) with the single-file example configuration:
   lookupd's connect ACL against the same configuration with an empty connect ACL, in
   alternating rounds. The difference is what one connect verdict costs a real Exim process.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from bench import harness
from bench.harness import BenchError, Contender, Context, SuiteResult, Table

DESCRIPTION = "connect verb (all sources warm) vs the C baseline; exim -bh with/without the ACL"

CLIENTS = (8,)
ACCEPTED = "81.2.69.142"  # GB, no incidents, not listed
DENIED = "203.0.113.7"  # 42 incidents in the nftfw test database
RBLDNSD = shutil.which("rbldnsd") or "/usr/sbin/rbldnsd"
EXIM = shutil.which("exim4") or shutil.which("exim") or "/usr/sbin/exim4"
SINGLE_FILE = harness.REPO_DIR / "exim-snippets" / "single-file" / "exim.conf"

ZONE = """\
$SOA 3600 ns.bl.test. hostmaster.bl.test. 1 600 60 3600 3600
$NS 3600 ns.bl.test.
$TTL 3600
:127.0.0.2:Listed in bl.test
127.0.0.2
192.0.2.20
"""

CONFIG = """\
[server]
socket_mode = "0666"
[geoip]
asn_db = "{asn_db}"
[dnsbl]
nameservers = ["127.0.0.1:{port}"]
# Warm means cached: errors (the PTR zones rbldnsd refuses) are kept as long as answers.
error_ttl = "1h"
negative_ttl_max = "1h"
[[dnsbl.list]]
zone = "bl.test"
families = ["ipv4"]
[connect]
submission_countries = ["GB"]
"""


def run(ctx: Context) -> SuiteResult:
    if not Path(RBLDNSD).exists():
        raise BenchError("rbldnsd is not installed (Debian: apt-get install rbldnsd)")
    # Exim's ACLs run as Debian-exim: lookupd's socket must be reachable from there (the run's
    # private temporary directory included; it holds nothing but sockets and logs).
    for directory in (ctx.workdir.parent, ctx.workdir):
        directory.chmod(0o755)
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(_rbldnsd(ctx.workdir / "rbl"))
        config = CONFIG.format(port=port,
                               asn_db=harness.TESTDATA_DIR / "maxmind" / "GeoLite2-ASN-Test.mmdb")
        base = stack.enter_context(harness.baseline_server(ctx))
        lookupd = stack.enter_context(harness.lookupd_server(ctx, config=config))
        contenders = [Contender(f"lookupd connect {ip} 25", lookupd.endpoint, f"connect {ip} 25",
                                _warm_answer(lookupd.endpoint, ip, action))
                      for ip, action in ((ACCEPTED, "accept"), (DENIED, "deny"))]
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong")
        base_series, series = harness.alternate(ctx, baseline, contenders, CLIENTS)
        exim_table, exim_data = _exim_sessions(ctx, lookupd.endpoint)
    verb_table = Table(
        title=f"connect, every source warm, vs the C baseline ({ctx.settings.rounds} rounds, "
              "medians)",
        header=harness.RATIO_HEADER,
        rows=harness.ratio_rows(base_series, series),
        notes=(
            "connect asks GeoIP country and ASN, the firewall database, one DNSBL (rbldnsd on"
            " loopback) and reverse DNS; after the warm-up every DNS answer is in lookupd's"
            " cache. The deny row also writes lookupd's INFO log line per answer.",
            "x/C: lookupd's figure over the C baseline's `ping` in the same round.",
            *harness.problem_notes([*base_series, *series]),
        ),
    )
    return SuiteResult(
        "connect",
        (verb_table, exim_table),
        {"series": [s.to_json() for s in base_series + series], "exim_bh": exim_data},
        failed_queries=sum(s.failed for s in [*base_series, *series]),
    )


def _warm_answer(endpoint: harness.Endpoint, ip: str, action: str) -> str:
    """Ask once (filling lookupd's caches) and return the answer every later query must get."""
    answer = ""
    for _ in range(50):
        answer = harness.exim_query(endpoint, f"connect {ip} 25".encode()).decode()
        if "dnsbl=unknown" not in answer:
            break
        time.sleep(0.1)  # the DNSBL's first answer is on its way
    if not answer.startswith(f"action={action} ") or "dnsbl=clean" not in answer:
        raise BenchError(f"lookupd answered `connect {ip} 25` with {answer!r}")
    return answer


# --- exim -bh sessions -----------------------------------------------------------------------


def _exim_sessions(ctx: Context, endpoint: harness.Endpoint) -> tuple[Table, dict[str, object]]:
    if not Path(EXIM).exists():
        raise BenchError("exim4 is not installed (Debian: apt-get install exim4-daemon-heavy)")
    text = SINGLE_FILE.read_text()
    prefix = f"HOST_LOOKUP =\nLOOKUPD_SOCKET = {endpoint}\n"
    full = ctx.workdir / "exim-lookupd.conf"
    full.write_text(prefix + text)
    empty = ctx.workdir / "exim-empty.conf"
    hook = "acl_smtp_connect = acl_check_connect\n"
    if hook not in text or "\nbegin acl\n" not in text:
        raise BenchError(f"{SINGLE_FILE} has changed: no `{hook.strip()}` / `begin acl` in it")
    empty.write_text(_with_connect_acl(prefix + text, hook, "  accept\n"))
    # Exim's own cost of one ${readsocket} (lookupd answers `ping` from memory, no task).
    ping = ctx.workdir / "exim-ping.conf"
    ping.write_text(_with_connect_acl(prefix + text, hook, (
        "  warn set acl_c_bench = ${readsocket{LOOKUPD_SOCKET}{ping}{3s}{}{down}}\n"
        "  accept\n")))
    for path in (full, empty, ping):
        path.chmod(0o644)
    # The ACL really asks lookupd: a client it denies is refused.
    refused = _session(full, DENIED)[1]
    if "550 Blacklisted" not in refused:
        raise BenchError(f"exim -bh with lookupd's connect ACL did not refuse {DENIED}:\n"
                         f"{refused}")
    per_round = max(5, int(20 * ctx.settings.duration))
    times: dict[str, list[float]] = {"empty": [], "ping": [], "lookupd": []}
    failed = 0
    for _ in range(ctx.settings.rounds):
        for name, config in (("empty", empty), ("ping", ping), ("lookupd", full)):
            for _ in range(per_round):
                took, out = _session(config, ACCEPTED)
                if not out.startswith("220 ") and "\n220 " not in out:
                    failed += 1
                times[name].append(took)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    p90 = {k: statistics.quantiles(v, n=10)[-1] * 1000 for k, v in times.items()}
    labels = {"empty": "empty connect ACL", "ping": "one ${readsocket} of `ping` only",
              "lookupd": "lookupd's connect ACL (the snippets)"}
    rows = tuple(
        (labels[k], str(len(times[k])), f"{med[k]:.2f}", f"{p90[k]:.2f}",
         harness.fmt_ratio(med[k] / med["empty"]),
         "-" if k == "empty" else f"{med[k] - med['empty']:+.2f}")
        for k in times)
    table = Table(
        title="exim -bh session (connect + QUIT), single-file example configuration",
        header=("connect ACL", "sessions", "median ms", "p90 ms", "vs empty", "ms added"),
        rows=rows,
        notes=(
            f"{ACCEPTED} on port 25, accepted; {per_round} sessions of each kind per round,"
            f" {ctx.settings.rounds} rounds alternating. A session is a whole Exim process:"
            " start, read the configuration, run the connect ACL (one ${readsocket} to"
            " lookupd's `connect`), QUIT.",
            *([f"{failed} sessions did not get a 220 greeting"] if failed else ()),
        ),
    )
    data: dict[str, object] = {"median_ms": med, "p90_ms": p90, "sessions": {
        k: len(v) for k, v in times.items()}, "failed": failed}
    return table, data


def _with_connect_acl(text: str, hook: str, body: str) -> str:
    """TEXT with its connect ACL replaced by one named acl_bench_connect holding BODY."""
    return (text.replace(hook, "acl_smtp_connect = acl_bench_connect\n")
            .replace("\nbegin acl\n", f"\nbegin acl\n\nacl_bench_connect:\n{body}\n", 1))


def _session(config: Path, ip: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([EXIM, "-C", str(config), "-oMi", "127.0.0.1.25", "-bh", ip],
                          input=b"QUIT\r\n", capture_output=True, timeout=30, check=False)
    return time.perf_counter() - started, proc.stdout.decode(errors="replace")


# --- rbldnsd --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rbldnsd(workdir: Path) -> Iterator[int]:
    """rbldnsd serving ZONE as bl.test on a free loopback port (chrooted as an unprivileged
    user when run as root, as rbldnsd insists)."""
    workdir.mkdir()
    workdir.chmod(0o755)
    (workdir / "bl.zone").write_text(ZONE)
    (workdir / "bl.zone").chmod(0o644)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    args = [RBLDNSD, "-n", "-c", "0", "-b", f"127.0.0.1/{port}"]
    if os.geteuid() == 0:
        user = next((u for u in ("rbldns", "nobody") if _user_exists(u)), None)
        if user is None:
            raise BenchError("no user rbldns or nobody to run rbldnsd as")
        args += ["-u", user, "-r", str(workdir), "-w", "/"]
    else:
        args += ["-w", str(workdir)]
    args.append("bl.test:ip4set:bl.zone")
    with open(workdir / "rbldnsd.log", "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        query = dns.message.make_query("bl.test", "SOA")
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise BenchError(f"rbldnsd exited: {(workdir / 'rbldnsd.log').read_text()}")
            try:
                dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
                break
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise BenchError("rbldnsd did not answer within 10 s") from None
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
