"""Suite `dnsbl`: `dnsbl IP` from lookupd's shared cache, and cold against Exim's own dnslists.

Issue 3's benchmark:
1. Warm: `dnsbl IP` for a clean and a listed client at 8 Exim-style clients, answered from
   lookupd's cache, against the C baseline in the same rounds.
2. Cold: three lists (rbldnsd) behind a local DNS server that adds a fixed delay to every
   query (20 ms: a list far away). lookupd asks the lists in parallel, so its cold answer
   should take about one delay; Exim's `dnslists` asks them one after another and pays three.
   Side by side, alternating: whole `exim -bh` sessions with `dnslists` on the three zones,
   with `${readsocket{...}{dnsbl IP}}` instead (cold, then warm), with no DNSBL check; and
   lookupd's own answer time, cold and warm.

Exim's resolver asks the nameservers of /etc/resolv.conf on port 53 only. So the cold part
runs in a private mount and network namespace (`unshare --mount --net`, as root): its own
loopback, the delaying server on 127.0.0.1:53 there, and a resolv.conf saying so bind-mounted
over /etc/resolv.conf for that namespace only. Nothing leaves it; the host's resolver and
network are untouched. This module is also the program run inside (`--inside SPEC`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from bench import harness, pairs
from bench.harness import BenchError, Contender, Context, Settings, SuiteResult, Table, Tools
from bench.realparts import dnsservers, exim_bh, exim_config, exim_problem

log = logging.getLogger(__name__)

DESCRIPTION = ("dnsbl from cache vs the C baseline; cold, 3 lists with a 20 ms delay: "
               "lookupd vs Exim dnslists")

# The three lists, served by rbldnsd: zone, rbldnsd dataset, file.
ZONES = tuple((zone, "ip4set", f"{zone}.zone") for zone in ("bl.test", "cop.test", "mask.test"))
CLEAN = "81.2.69.142"  # on no list
LISTED = "192.0.2.4"  # on all three
# Long TTLs, NXDOMAIN included (the SOA minimum): "warm" stays warm through a whole run.
ZONE_TEXT = """\
$SOA 3600 ns.{zone}. hostmaster.{zone}. 1 600 60 3600 3600
$NS 3600 ns.{zone}.
$TTL 3600
:127.0.0.2:Listed in {zone}, see https://{zone}/lookup?ip=$
# RFC 5782 test point (lookupd probes it)
127.0.0.2
{listed}
"""
# Cold clients: fresh addresses from 198.18.0.0/15 (RFC 2544, benchmarking), on no list.
COLD_NET = ipaddress.IPv4Network("198.18.0.0/15")

# The clients are documentation and benchmarking addresses, which lookupd asks only of lists
# that say they list such addresses (as Exim's dnslists, the baseline, asks about any).
LISTS_CONFIG = "".join(f'[[dnsbl.list]]\nzone = "{zone}"\nquery_special = true\n'
                       for zone, _, _ in ZONES)


def start_lists(workdir: Path) -> dnsservers.Rbldnsd:
    """rbldnsd on a free loopback port serving ZONES (stop it when done)."""
    zones = workdir / "zones"
    zones.mkdir(parents=True)
    for zone, _, name in ZONES:
        (zones / name).write_text(ZONE_TEXT.format(zone=zone, listed=LISTED))
    rbl = dnsservers.Rbldnsd(workdir / "rbldnsd", zones=ZONES, source_dir=zones)
    started(rbl)
    return rbl


class _Startable(Protocol):
    def start(self) -> object: ...
    def stop(self) -> None: ...


def started(server: _Startable) -> None:
    """Start one of tests/dnsservers.py's servers; a failure is a BenchError, and what did
    start is stopped."""
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        raise BenchError(f"{type(server).__name__} did not start: {exc}") from exc


def lookupd_config(nameserver: str) -> str:
    return f"""\
[server]
# Exim's ACLs run as Debian-exim; the socket is in the bench's private directory.
socket_mode = "0666"
[dnsbl]
nameservers = ["{nameserver}"]
{LISTS_CONFIG}"""


def run(ctx: Context) -> SuiteResult:
    warm_table, warm_data, failed = _warm(ctx)
    tables: list[Table] = [warm_table]
    data: dict[str, object] = {"warm": warm_data}
    problem = exim_problem()
    if problem is None:
        timings = cold_timings(ctx, ctx.settings.rounds, ctx.settings.exim_runs)
        tables += [cold_table(ctx, timings), latency_table(ctx, timings)]
        data["cold"] = {label: t.to_json() for label, t in timings.items()}
    else:
        tables.append(Table("DNSBL cold, lookupd vs Exim dnslists", ("skipped",), (),
                            (f"not measured: {problem}",)))
    return SuiteResult("dnsbl", tuple(tables), data, failed_queries=failed)


# --- warm: from lookupd's cache, against the C baseline ---------------------------------------


def _warm(ctx: Context) -> tuple[Table, dict[str, object], int]:
    with contextlib.ExitStack() as stack:
        rbl = start_lists(ctx.workdir / "lists")
        stack.callback(rbl.stop)
        base = stack.enter_context(harness.baseline_server(ctx))
        lookupd = stack.enter_context(harness.lookupd_server(
            ctx, config=lookupd_config(f"127.0.0.1:{rbl.port}")))
        contenders = [
            Contender(f"lookupd dnsbl {ip} ({kind}, cached)", lookupd.endpoint, f"dnsbl {ip}",
                      warm_answer(lookupd.endpoint, ip, kind), pid=lookupd.proc.pid)
            for ip, kind in ((CLEAN, "clean"), (LISTED, "listed"))
        ]
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong", pid=base.proc.pid)
        base_series, series = harness.alternate(ctx, baseline, contenders, (8,))
    table = Table(
        title=f"dnsbl from lookupd's cache vs the C baseline ({ctx.settings.rounds} rounds,"
              " medians)",
        header=harness.RATIO_HEADER,
        rows=harness.ratio_rows(base_series, series),
        notes=(
            f"Three lists ({', '.join(z for z, _, _ in ZONES)}) in rbldnsd on loopback; every"
            " answer after the first comes from lookupd's shared cache.",
            "x/C: lookupd's figure over the C baseline's `ping` in the same round.",
            harness.CPU_NOTE,
            *harness.problem_notes([*base_series, *series]),
        ),
    )
    failed = sum(s.failed for s in [*base_series, *series])
    return table, {"series": [s.to_json() for s in base_series + series]}, failed


def warm_answer(endpoint: harness.Endpoint, ip: str, verdict: str) -> str:
    """Ask until every list has answered (lookupd probes its lists at start), return the
    answer: every later query must get exactly this."""
    answer = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = harness.exim_query(endpoint, f"dnsbl {ip}".encode()).decode()
        if answer.startswith(f"verdict={verdict} ") and 'unknown=""' in answer:
            return answer
        time.sleep(0.1)
    raise BenchError(f"lookupd answered `dnsbl {ip}` with {answer!r}, expected verdict={verdict}"
                     " with every list answering")


# --- cold: in a private network namespace, against Exim's dnslists ---------------------------

# The ways measured inside the namespace, by key: (label, what).
EXIM_DNSLISTS = "Exim dnslists"
EXIM_COLD = "Exim + lookupd, cold"
EXIM_WARM = "Exim + lookupd, warm"
EXIM_NONE = "Exim, no DNSBL check"
LOOKUPD_COLD = "lookupd dnsbl, cold"
LOOKUPD_WARM = "lookupd dnsbl, warm"

SESSION = "EHLO client.example\nQUIT\n"

ACL_DNSLISTS = f"""\
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  deny  dnslists = {' : '.join(z for z, _, _ in ZONES)}
        message = $sender_host_address is listed in $dnslist_domain
  accept
"""

ACL_READSOCKET = """\
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  deny  condition = ${if eq{${extract{verdict}{${readsocket{SOCKET}{dnsbl $sender_host_address}\\
                         {3s}{}{verdict=unknown}}}}}{listed}}
        message = $sender_host_address is listed
  accept
"""

ACL_NONE = """\
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  accept
"""


def cold_timings(ctx: Context, rounds: int, per_round: int) -> dict[str, pairs.Timing]:
    """Run the cold comparison in a private namespace; the timings of every way by label."""
    if shutil.which("unshare") is None:
        raise BenchError("unshare is missing (Debian: util-linux)")
    inner = ctx.workdir / "netns"
    inner.mkdir(exist_ok=True)
    inner.chmod(0o755)
    result = inner / "result.json"
    spec = inner / "spec.json"
    spec.write_text(json.dumps({
        "settings": asdict(ctx.settings),
        "tools": {"loadgen": str(ctx.tools.loadgen), "baseline": str(ctx.tools.baseline)},
        "workdir": str(inner),
        "rounds": rounds,
        "per_round": per_round,
        "result": str(result),
    }))
    argv = ["unshare", "--mount", "--net", "--", sys.executable, "-m", "bench.dnsbl",
            "--inside", str(spec)]
    if log.isEnabledFor(logging.INFO):
        argv.append("-v")
    proc = subprocess.run(argv, cwd=harness.REPO_DIR, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
        raise BenchError(f"the cold DNSBL comparison (in a private namespace) failed"
                         f" ({proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    data = json.loads(result.read_text())
    return {label: pairs.Timing(label, rnds) for label, rnds in data.items()}


def cold_comparisons(timings: dict[str, pairs.Timing]) -> list[pairs.Comparison]:
    lists = len(ZONES)
    return [
        pairs.Comparison(f"DNSBL, {lists} lists, cold: exim -bh session",
                         timings[EXIM_DNSLISTS], timings[EXIM_COLD]),
        pairs.Comparison(f"DNSBL, {lists} lists, warm: exim -bh session",
                         timings[EXIM_DNSLISTS], timings[EXIM_WARM]),
    ]


def cold_table(ctx: Context, timings: dict[str, pairs.Timing]) -> Table:
    delay_ms = ctx.settings.dns_delay * 1000
    return pairs.table(
        f"DNSBL, {len(ZONES)} lists {delay_ms:.0f} ms away: Exim dnslists vs lookupd"
        f" ({ctx.settings.rounds} rounds)",
        cold_comparisons(timings),
        notes=(
            f"A whole `exim -bh` session (EHLO, QUIT) from a client on none of the lists:"
            f" Exim's own `dnslists = {' : '.join(z for z, _, _ in ZONES)}` in the connect ACL"
            " (one list after another) against `${readsocket}` of `dnsbl IP` (lookupd asks"
            " the lists in parallel; cold: a new address every session; warm: one lookupd"
            " has just answered). Every DNS query waits the delay, as from a list far away.",
        ),
    )


def latency_table(ctx: Context, timings: dict[str, pairs.Timing]) -> Table:
    delay = ctx.settings.dns_delay
    none = timings[EXIM_NONE].median()

    def row(label: str, seconds: float) -> tuple[str, ...]:
        return (label, f"{seconds * 1000:.2f}", harness.fmt_ratio(seconds / delay))

    return Table(
        title=f"DNSBL answer time against one list's delay ({delay * 1000:.0f} ms)",
        header=("what", "median ms", "/ delay"),
        rows=(
            row("lookupd `dnsbl IP`, cold (3 lists in parallel)",
                timings[LOOKUPD_COLD].median()),
            row("lookupd `dnsbl IP`, warm (cache)", timings[LOOKUPD_WARM].median()),
            row("Exim dnslists: session minus a session without the check",
                timings[EXIM_DNSLISTS].median() - none),
            row("Exim + lookupd cold: session minus a session without the check",
                timings[EXIM_COLD].median() - none),
            row("Exim session without a DNSBL check (the process itself)", none),
        ),
        notes=("Parallel lists cost about one delay; one after another, one per list.",),
    )


# --- inside the namespace ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    ctx: Context
    rounds: int
    per_round: int
    result: Path


def _read_spec(path: Path) -> Spec:
    raw = json.loads(path.read_text())
    settings = dict(raw["settings"])
    settings["clients"] = tuple(settings["clients"])
    settings["lookupd_cmd"] = tuple(settings["lookupd_cmd"])
    tools = Tools(loadgen=Path(raw["tools"]["loadgen"]), baseline=Path(raw["tools"]["baseline"]))
    ctx = Context(Settings(**settings), tools, Path(raw["workdir"]))
    return Spec(ctx, int(raw["rounds"]), int(raw["per_round"]), Path(raw["result"]))


def _loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2: a new network namespace starts with
    its loopback down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0))
        flags = struct.unpack("16sh", ifreq[:18])[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _private_resolv_conf(workdir: Path) -> None:
    """Point this namespace's /etc/resolv.conf at 127.0.0.1 (a bind mount that only this
    mount namespace sees; unshare made its mounts private)."""
    conf = workdir / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    conf.chmod(0o644)
    subprocess.run(["mount", "--bind", str(conf), "/etc/resolv.conf"], check=True)


class Addresses:
    """Fresh client addresses (never asked before: cold), and the last one lookupd answered
    (still in its cache: warm)."""

    def __init__(self) -> None:
        self._hosts = COLD_NET.hosts()
        self.last_asked = CLEAN  # warm_answer() asked it

    def fresh(self) -> str:
        return str(next(self._hosts))


def inside(spec: Spec) -> None:
    ctx = spec.ctx
    if os.readlink("/proc/self/ns/net") == os.readlink(f"/proc/{os.getppid()}/ns/net"):
        # Only in the namespace unshare made: never bind-mount over the host's resolv.conf.
        raise BenchError("--inside runs in the private namespace the dnsbl suite makes with"
                         " unshare, never by hand")
    _loopback_up()
    _private_resolv_conf(ctx.workdir)
    with contextlib.ExitStack() as stack:
        rbl = start_lists(ctx.workdir / "lists")
        stack.callback(rbl.stop)
        proxy = dnsservers.DelayProxy(rbl.port, ctx.settings.dns_delay, port=53)
        stack.callback(proxy.stop)
        lookupd = stack.enter_context(harness.lookupd_server(ctx, config=lookupd_config(
            "127.0.0.1:53")))
        sock = lookupd.endpoint
        warm_answer(sock, CLEAN, "clean")  # the lists answer through the proxy

        def config(name: str, acl: str) -> Path:
            return exim_config(ctx.workdir / name, acl.replace("SOCKET", str(sock)))

        dnslists = config("exim-dnslists", ACL_DNSLISTS)
        readsocket = config("exim-readsocket", ACL_READSOCKET)
        none = config("exim-none", ACL_NONE)
        # Both checks really ask the lists: a listed client is refused by each.
        for cfg in (dnslists, readsocket):
            exim_bh(cfg, LISTED, SESSION, "550 ")
        addresses = Addresses()

        def session(cfg: Path, fresh: bool) -> float:
            ip = addresses.fresh() if fresh else addresses.last_asked
            took = exim_bh(cfg, ip, SESSION, "221 ")
            if cfg == readsocket and fresh:
                addresses.last_asked = ip
            return took

        def direct(fresh: bool) -> float:
            ip = addresses.fresh() if fresh else addresses.last_asked
            started = time.perf_counter()
            answer = harness.exim_query(sock, f"dnsbl {ip}".encode(), timeout=5).decode()
            took = time.perf_counter() - started
            if not answer.startswith("verdict=clean ") or 'unknown=""' not in answer:
                raise BenchError(f"lookupd answered `dnsbl {ip}` with {answer!r}")
            if fresh:
                addresses.last_asked = ip
            return took

        ways = [
            pairs.Way(EXIM_DNSLISTS, lambda: session(dnslists, True)),
            pairs.Way(EXIM_COLD, lambda: session(readsocket, True)),
            pairs.Way(EXIM_WARM, lambda: session(readsocket, False)),
            pairs.Way(EXIM_NONE, lambda: session(none, True)),
            pairs.Way(LOOKUPD_COLD, lambda: direct(True)),
            pairs.Way(LOOKUPD_WARM, lambda: direct(False)),
        ]
        timings = pairs.interleave(ways, spec.rounds, spec.per_round)
    spec.result.write_text(json.dumps({t.label: t.rounds for t in timings}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dnsbl")
    parser.add_argument("--inside", type=Path, required=True, metavar="SPEC")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bench (netns): %(message)s")
    try:
        inside(_read_spec(args.inside))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

