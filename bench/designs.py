"""Suite `designs`: what each Python server design reaches against the C baseline.

Every design (bench/toyservers.py) does the baseline's work: read to newline or EOF, answer
"pong", close. The figures are the floor each design puts under lookupd; they chose its design.
"""

from __future__ import annotations

import contextlib
import sys

from bench import harness
from bench.harness import Contender, Context, SuiteResult, Table
from bench.toyservers import DESIGNS

DESCRIPTION = "server designs (asyncio streams/Protocol, uvloop, selectors) vs the C baseline"


def run(ctx: Context, clients: tuple[int, ...] = (8,)) -> SuiteResult:
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(harness.baseline_server(ctx))
        contenders = []
        for name in DESIGNS:
            path = ctx.workdir / f"design-{name}.sock"
            argv = [sys.executable, "-m", "bench.toyservers", name, str(path)]
            stack.enter_context(harness.run_server(name, argv, path, ctx.workdir))
            contenders.append(Contender(name, path, "ping", "pong"))
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong")
        base_series, series = harness.alternate(ctx, baseline, contenders, clients)
    table = Table(
        title=f"Server designs vs the C baseline ({ctx.settings.rounds} rounds, medians)",
        header=harness.RATIO_HEADER,
        rows=harness.ratio_rows(base_series, series),
        notes=(
            *(f"{name}: {text}" for name, (text, _) in DESIGNS.items()),
            *harness.problem_notes([*base_series, *series]),
        ),
    )
    return SuiteResult(
        "designs",
        (table,),
        {"series": [s.to_json() for s in base_series + series]},
        failed_queries=sum(s.failed for s in [*base_series, *series]),
    )
