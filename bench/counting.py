"""Suite `counting`: what the metrics cost the answer path (issue 12).

In-process, no sockets: nanoseconds per call of what the server does for every reply
(Metrics.answered: one counter, one histogram bucket, one sum) and for every connect verdict
(Metrics.verdict), against a plain dict increment measured in the same run, and as a share
of the C baseline's server CPU per query from bench/RESULTS.md's issue (16-22 us).
"""

from __future__ import annotations

import statistics
import timeit
from collections import defaultdict

from bench.harness import Context, SuiteResult, Table
from lookupd.config import ConnectConfig
from lookupd.connect import ConnectRequest, Verdict, decide, unknown_facts
from lookupd.ipaddr import parse_ip
from lookupd.metrics import Metrics

DESCRIPTION = "ns per request that the metrics add to the answer path, vs a dict increment"

C_SERVER_CPU_US = 16.0  # the C baseline's server CPU per query (issue 15's measurement)


def _per_call_ns(stmt: object, number: int, rounds: int) -> float:
    timer = timeit.Timer(stmt)  # type: ignore[arg-type]
    return statistics.median(timer.timeit(number) / number * 1e9 for _ in range(rounds))


def run(ctx: Context) -> SuiteResult:
    number = 20_000 if ctx.settings.duration < 1 else 200_000
    rounds = max(3, ctx.settings.rounds)
    metrics = Metrics()
    counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    facts = unknown_facts(ConnectRequest(parse_ip("192.0.2.1"), 25))
    verdict: Verdict = decide(facts, ConnectConfig())

    def plain() -> None:
        counts["country", "ok"] += 1

    def answered() -> None:
        metrics.answered("country", False, 0.00012)

    def counted_verdict() -> None:
        metrics.verdict(verdict, facts)

    base = _per_call_ns(plain, number, rounds)
    rows = [("dict increment (baseline)", f"{base:.0f}", "1.00", "")]
    figures = {"baseline_ns": base}
    for name, fn in (("Metrics.answered (every reply)", answered),
                     ("Metrics.verdict (every connect)", counted_verdict)):
        ns = _per_call_ns(fn, number, rounds)
        figures[name] = ns
        rows.append((name, f"{ns:.0f}", f"{ns / base:.2f}",
                     f"{ns / 1000 / C_SERVER_CPU_US * 100:.1f} %"))
    table = Table(
        title=f"Counting cost per call ({rounds} rounds of {number} calls, medians)",
        header=("what", "ns/call", "x dict", "of C's CPU/query"),
        rows=tuple(rows),
        notes=("x dict: over a plain dict increment measured in the same run. The last column "
               f"is the cost as a share of the C baseline's {C_SERVER_CPU_US:g} us of server "
               "CPU per query.",),
    )
    return SuiteResult("counting", (table,), {"ns": figures})
