"""Suite `cluster`: lookupd with [cluster] (a real redis-server on loopback) against lookupd
with the local store, in the same rounds.

Issue 13's benchmark:
1. Block propagation delay, host a -> host c: a `user-fail` that blocks on a, then `user` on
   c until it answers `blocked` (p50/p99 over many users).
2. `user-fail` and `strike` throughput at 8 clients, through Redis vs the local store (sqlite
   journal, memory), as ratios of the same round.
(The DNSBL questions three hosts send with and without the shared cache are counted by
tests/test_dnsbl_shared.py against a real rbldnsd.)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator

from bench import harness
from bench.harness import Contender, Context, SuiteResult, Table

DESCRIPTION = ("[cluster] through a real redis-server vs the local store: block propagation"
               " a -> c, user-fail and strike at 8 clients (needs redis-server)")

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
        time.sleep(1.0)  # the first connection to Redis
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
    return SuiteResult("cluster", tuple(tables), data, failed_queries=failed)


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
