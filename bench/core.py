"""Suite `core`: lookupd's ping, country and incidents against the C baseline.

Issue 2's benchmark: queries per second and p50/p99 latency at 1, 8 and 64 concurrent
Exim-style clients (a new connection per query), each as a ratio to the C baseline measured
in the same rounds. lookupd runs on the MaxMind and nftfw test databases.
"""

from __future__ import annotations

import contextlib

from bench import harness
from bench.harness import Contender, Context, SuiteResult, Table

DESCRIPTION = "lookupd ping / country / incidents vs the C baseline at 1, 8, 64 clients"

# (request, the answer lookupd must give on the test databases)
REQUESTS = (
    ("ping", "pong"),
    ("country 81.2.69.142", "GB"),
    ("incidents 203.0.113.7", "42"),
)


def run(ctx: Context) -> SuiteResult:
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(harness.baseline_server(ctx))
        lookupd = stack.enter_context(harness.lookupd_server(ctx))
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong", pid=base.proc.pid)
        contenders = [
            Contender(f"lookupd {req}", lookupd.endpoint, req, ans, pid=lookupd.proc.pid)
            for req, ans in REQUESTS
        ]
        base_series, series = harness.alternate(ctx, baseline, contenders, ctx.settings.clients)
    table = Table(
        title=f"lookupd vs the C baseline ({ctx.settings.rounds} rounds, medians)",
        header=harness.RATIO_HEADER,
        rows=harness.ratio_rows(base_series, series),
        notes=(
            "x/C: lookupd's figure over the C baseline's in the same round (median of rounds);"
            " qps/C above 1 is better, p50/C and p99/C below 1 are better.",
            harness.CPU_NOTE,
            *harness.problem_notes([*base_series, *series]),
        ),
    )
    return SuiteResult(
        "core",
        (table,),
        {"series": [s.to_json() for s in base_series + series]},
        failed_queries=sum(s.failed for s in [*base_series, *series]),
    )
