"""Suite `cluster`: lookupd with [cluster] (a real redis-server on loopback) against lookupd
with the local store, in the same rounds.

Issue 13's benchmark:
1. Block propagation delay, host a -> host c: a `user-fail` that blocks on a, then `user` on
   c until it answers `blocked` (p50/p99 over many users).
2. `user-fail` and `strike` throughput at 8 clients, through Redis vs the local store (sqlite
   journal, memory), as ratios of the same round.
3. DNSBL questions sent to the lists by three hosts for the same 1,000 clients (three lists in
   a real rbldnsd, which logs every question it gets), each host alone and then with the
   answers shared through Redis, in the same run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import dnsbl, harness
from bench.harness import Contender, Context, SuiteResult, Table
from bench.realparts import dnsservers

DESCRIPTION = ("[cluster] through a real redis-server vs the local store: block propagation"
               " a -> c, user-fail and strike at 8 clients, DNSBL questions of 3 hosts with"
               " and without the shared cache (needs redis-server, rbldnsd)")

PASSWORD = "bench-redis-password"
LOCAL = """\
[server]
socket_mode = "0666"
[dnsbl]
list = []
[users]
notify_command = ""
limit = {limit}
"""
CLUSTER = LOCAL + """\
[cluster]
redis = "redis://127.0.0.1:{port}/0"
password_file = "{password_file}"
host_name = "{host}"
"""
USERS = 1000
SAMPLES = 200
# The DNSBL part: clients from 198.18.0.0/15 (RFC 2544, benchmarking), every LISTED_EVERY-th
# on all three lists; the others get NXDOMAIN. Both kinds of answer are shared.
DNSBL_CLIENTS = 1000
DNSBL_CLIENTS_QUICK = 100
LISTED_EVERY = 10
DNSBL_CONFIG = """\
[server]
socket_mode = "0666"
[dnsbl]
nameservers = ["127.0.0.1:{dns_port}"]
deadline = 2.0
{lists}"""
DNSBL_CLUSTER = """\
[cluster]
redis = "redis://127.0.0.1:{port}/0"
password_file = "{password_file}"
host_name = "{host}"
key_prefix = "dnsbl-bench:"
"""


@contextlib.contextmanager
def redis_server(ctx: Context) -> Iterator[int]:
    """redis-server on a free loopback port with requirepass, in the bench's directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise harness.BenchError("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    workdir = ctx.workdir / "redis"
    workdir.mkdir(exist_ok=True)
    conf = workdir / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\ndir {workdir}\nrequirepass {PASSWORD}\n"
                    f'save ""\nappendonly no\nlogfile {workdir}/redis.log\n')
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise harness.BenchError("redis-server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def run(ctx: Context) -> SuiteResult:
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(redis_server(ctx))
        password_file = ctx.workdir / "redis.pw"
        password_file.write_text(PASSWORD)

        def cluster(host: str, limit: int) -> harness.Server:
            return stack.enter_context(harness.lookupd_server(
                ctx, config=CLUSTER.format(limit=limit, port=port, host=host,
                                           password_file=password_file), name=host))

        local = stack.enter_context(harness.lookupd_server(
            ctx, config=LOCAL.format(limit=10**9), name="local"))
        shared = cluster("shared", 10**9)
        a, c = cluster("a", 1), cluster("c", 1)
        for server in (shared, a, c):  # each measured through Redis, not alone
            _wait_for_redis(server)
        delays = propagation(a.endpoint, c.endpoint)
        tables = [Table(
            title=f"Block propagation host a -> host c ({len(delays)} blocks)",
            header=("p50 ms", "p99 ms", "max ms"),
            rows=((f"{statistics.median(delays) * 1000:.2f}",
                   f"{_percentile(delays, 0.99) * 1000:.2f}", f"{max(delays) * 1000:.2f}"),),
            notes=("A user-fail that blocks on a; `user` asked on c until it says blocked.",),
        )]
        data: dict[str, object] = {"propagation_s": delays}
        failed = 0
        for verb, lines in (("user-fail", [f"user-fail bench{i:04d} x@example.org\n"
                                           for i in range(USERS)]),
                            ("strike", [f"strike 10.{i // 65536}.{i // 256 % 256}.{i % 256} "
                                        "auth\n" for i in range(USERS)])):
            requests = ctx.workdir / f"cluster-{verb}.requests"
            requests.write_text("".join(lines))
            expect = "ok" if verb == "user-fail" else None
            base = Contender(f"local {verb}", local.endpoint, verb, expect,
                             requests_file=requests)
            other = Contender(f"redis {verb}", shared.endpoint, verb, expect,
                              requests_file=requests)
            base_series, series = harness.alternate(ctx, base, [other], (8,))
            rows = harness.ratio_rows(base_series, series)
            tables.append(Table(
                title=f"{verb} through Redis vs the local store ({ctx.settings.rounds} rounds)",
                header=tuple(h.replace("/C", "/local") for h in harness.RATIO_HEADER),
                rows=rows,
                notes=("/local: the Redis figure over the local store's in the same round.",
                       *harness.problem_notes([*base_series, *series])),
            ))
            data[verb] = [s.to_json() for s in base_series + series]
            failed += sum(s.failed for s in [*base_series, *series])
        table, figures, wrong = dnsbl_questions(ctx, port, password_file)
        tables.append(table)
        data["dnsbl_questions"] = figures
        failed += wrong
    return SuiteResult("cluster", tuple(tables), data, failed_queries=failed)


# --- DNSBL questions with and without the shared cache ----------------------------------------


def dnsbl_questions(ctx: Context, port: int, password_file: Path) -> tuple[
        Table, dict[str, object], int]:
    """Three hosts ask `dnsbl IP` for the same clients, one host after the other (a client
    going from MX to MX): the questions rbldnsd got, each host alone and then shared."""
    count = DNSBL_CLIENTS_QUICK if ctx.settings.quick else DNSBL_CLIENTS
    hosts = dnsbl.COLD_NET.hosts()
    clients = [str(next(hosts)) for _ in range(count)]
    listed = set(clients[::LISTED_EVERY])
    with contextlib.ExitStack() as stack:
        rbl = _start_lists(ctx.workdir / "dnsbl-lists", listed)
        stack.callback(rbl.stop)
        names = {_qname(ip, zone) for ip in clients for zone, _, _ in dnsbl.ZONES}
        base = DNSBL_CONFIG.format(dns_port=rbl.port, lists=dnsbl.LISTS_CONFIG)
        asked: dict[str, int] = {}
        seconds: dict[str, float] = {}
        wrong = 0
        for label, shared in (("alone", False), ("shared", True)):
            before = _asked(rbl, names)
            started = time.monotonic()
            for host in "abc":
                config = base + (DNSBL_CLUSTER.format(port=port, password_file=password_file,
                                                      host=host) if shared else "")
                with harness.lookupd_server(ctx, config=config,
                                            name=f"dnsbl-{label}-{host}") as server:
                    if shared:
                        _wait_for_redis(server)
                    wrong += _ask_all(server.endpoint, clients, listed)
                    time.sleep(0.2)  # the last answers' writes to Redis (not awaited)
            asked[label] = _asked(rbl, names) - before
            seconds[label] = time.monotonic() - started
    alone, shared_q = asked["alone"], asked["shared"]
    figures: dict[str, object] = {"clients": count, "lists": len(dnsbl.ZONES), "hosts": 3,
                                  "questions": asked, "seconds": seconds}
    per = count * len(dnsbl.ZONES)
    rows = tuple(
        (what, str(q), f"{q / per:.2f}", harness.fmt_ratio(q / shared_q if shared_q else None))
        for what, q in (("each host alone", alone), ("answers shared through Redis", shared_q)))
    table = Table(
        title=(f"DNSBL questions to the lists: 3 hosts, the same {count:,} clients, "
               f"{len(dnsbl.ZONES)} lists"),
        header=("DNS answers", "questions", "per client and list", "/shared"),
        rows=rows,
        notes=(f"rbldnsd's query log, client questions only (each host's health probes are "
               f"its own); every {LISTED_EVERY}th client listed, the others NXDOMAIN.",
               "Hosts a, b, c ask in turn, each for every client (8 at a time); /shared: the "
               "figure over the shared cache's."),
    )
    return table, figures, wrong


def _start_lists(workdir: Path, listed: set[str]) -> dnsservers.Rbldnsd:
    zones = workdir / "zones"
    zones.mkdir(parents=True)
    for zone, _, name in dnsbl.ZONES:
        (zones / name).write_text(dnsbl.ZONE_TEXT.format(zone=zone, listed="\n".join(
            sorted(listed, key=ipaddress.IPv4Address))))
    rbl = dnsservers.Rbldnsd(workdir / "rbldnsd", zones=dnsbl.ZONES, source_dir=zones)
    dnsbl.started(rbl)
    return rbl


def _qname(ip: str, zone: str) -> str:
    return ".".join(reversed(ip.split("."))) + "." + zone


def _asked(rbl: dnsservers.Rbldnsd, names: set[str]) -> int:
    return sum(1 for q in rbl.queries(qtype="A") if q.split()[2].lower().rstrip(".") in names)


def _wait_for_redis(server: harness.Server) -> None:
    deadline = time.monotonic() + 10
    while "sharing state through Redis" not in server.log_tail(200):
        if time.monotonic() > deadline:
            raise harness.BenchError(f"{server.name} did not reach Redis:\n"
                                     f"{server.log_tail()}")
        time.sleep(0.05)


def _ask_all(endpoint: harness.Endpoint, clients: list[str], listed: set[str]) -> int:
    """`dnsbl IP` for every client, 8 at a time; how many verdicts were wrong."""
    def one(ip: str) -> bool:
        reply = harness.exim_query(endpoint, f"dnsbl {ip}\n".encode(), timeout=5.0)
        want = b"verdict=listed" if ip in listed else b"verdict=clean"
        return reply.startswith(want)

    with ThreadPoolExecutor(8) as pool:
        return sum(not ok for ok in pool.map(one, clients))


def propagation(a: harness.Endpoint, c: harness.Endpoint) -> list[float]:
    delays = []
    stamp = int(time.time())
    for i in range(SAMPLES):
        user = f"prop{stamp}x{i}"
        reply = harness.exim_query(a, f"user-fail {user} x@example.org\n".encode())
        if not reply.startswith(b"blocked"):
            raise harness.BenchError(f"user-fail on a answered {reply!r}")
        start = time.monotonic()
        while not harness.exim_query(c, f"user {user}\n".encode()).startswith(b"blocked"):
            if time.monotonic() - start > 5:
                raise harness.BenchError("a block on a did not reach c within 5s")
        delays.append(time.monotonic() - start)
    return delays


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
