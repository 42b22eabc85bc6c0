"""Side by side: the same work done two ways (an in-Exim way, or the C baseline, and lookupd's),
timed in alternating rounds; medians, min-max and the ratio of lookupd's cost to the other's.

Each way is a `Way`: a label and a function that does the work once, checks the answer (raising
BenchError when it is wrong) and returns the seconds it took. `interleave` runs every way in
turn, ABBA-ordered inside a round so that neither always goes first, for several rounds. A
comparison's ratio is the median of its per-round ratios (lookupd's round median over the
other's), which cancels drift from whatever else the machine is doing, as harness.alternate
does for loads.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.harness import Chart, Context, Series, Table, fmt_ratio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Way:
    """One way of doing a piece of work: `once()` does it, checks it, returns seconds."""

    label: str
    once: Callable[[], float]


@dataclass
class Timing:
    """Every sample of one way, by round (seconds)."""

    label: str
    rounds: list[list[float]] = field(default_factory=list)

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds if r]

    def median(self) -> float:
        medians = self.round_medians()
        return statistics.median(medians) if medians else float("nan")

    def spread(self) -> tuple[float, float]:
        medians = self.round_medians()
        return (min(medians), max(medians)) if medians else (float("nan"), float("nan"))

    @property
    def samples(self) -> int:
        return sum(len(r) for r in self.rounds)

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "median_s": self.median(), "rounds_s": self.rounds}


def interleave(ways: Sequence[Way], rounds: int, per_round: int, warmup: int = 1) -> list[Timing]:
    """ROUNDS rounds of PER_ROUND runs of every way, alternating (A B, B A, A B ...)."""
    for way in ways:
        for _ in range(warmup):
            way.once()
    timings = [Timing(w.label) for w in ways]
    for rnd in range(rounds):
        for t in timings:
            t.rounds.append([])
        for i in range(per_round):
            order = list(zip(ways, timings, strict=True))
            for way, timing in order if i % 2 == 0 else reversed(order):
                timing.rounds[-1].append(way.once())
        log.info("round %d/%d of %s done", rnd + 1, rounds, " / ".join(w.label for w in ways))
    return timings


def from_series(series: Series, label: str) -> Timing:
    """A load's rounds as seconds of wall time per query (1/qps): the cost of one query."""
    return Timing(label, [[1.0 / r.qps] if r.ok and r.qps > 0 else [] for r in series.runs])


@dataclass(frozen=True)
class Comparison:
    """One row: WHAT, done the OTHER way and through LOOKUPD."""

    what: str
    other: Timing
    lookupd: Timing
    # "ms" or "us": how the times are shown.
    unit: str = "ms"

    def ratios(self) -> list[float]:
        return [lk / ot for lk, ot in zip(self.lookupd.round_medians(),
                                          self.other.round_medians(), strict=False) if ot > 0]

    def ratio(self) -> float:
        r = self.ratios()
        return statistics.median(r) if r else float("nan")

    def to_json(self) -> dict[str, object]:
        return {"what": self.what, "other": self.other.to_json(),
                "lookupd": self.lookupd.to_json(), "ratio": self.ratio(),
                "ratios_by_round": self.ratios()}


HEADER = ("what", "the other way", "median", "min-max", "through lookupd", "median", "min-max",
          "lookupd/other")


def _time(seconds: float, unit: str) -> str:
    if seconds != seconds:
        return "n/a"
    if unit == "us":
        return f"{seconds * 1e6:,.1f} us"
    return f"{seconds * 1e3:,.2f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _spread(t: Timing, unit: str) -> str:
    lo, hi = t.spread()
    if lo != lo:
        return "n/a"
    scale, fmt = (1e6, "{:,.1f}") if unit == "us" else (1e3, "{:,.2f}")
    return f"{fmt.format(lo * scale)}-{fmt.format(hi * scale)}"


def rows(comparisons: Sequence[Comparison]) -> tuple[tuple[str, ...], ...]:
    return tuple(
        (c.what, c.other.label, _time(c.other.median(), c.unit), _spread(c.other, c.unit),
         c.lookupd.label, _time(c.lookupd.median(), c.unit), _spread(c.lookupd, c.unit),
         fmt_ratio(c.ratio()))
        for c in comparisons)


def table(title: str, comparisons: Sequence[Comparison], notes: Sequence[str] = ()) -> Table:
    return Table(
        title=title,
        header=HEADER,
        rows=rows(comparisons),
        notes=(
            "median: the median over rounds of each round's median; min-max: the lowest and"
            " highest round median; lookupd/other: the median of the per-round ratios of"
            " lookupd's time to the other way's (below 1: lookupd is cheaper).",
            *notes,
        ),
    )


def chart(title: str, comparisons: Sequence[Comparison], filename: str) -> Chart:
    return Chart(
        title=title,
        labels=tuple(c.what for c in comparisons),
        values=tuple(c.ratio() for c in comparisons),
        axis="lookupd's time / the other way's (log scale; below 1: lookupd is cheaper)",
        filename=filename,
    )


def compare_in_exim(
    ctx: Context,
    what: str,
    other: Callable[[int], Way],
    lookupd: Callable[[int], Way],
    rounds: int | None = None,
) -> list[Comparison]:
    """WHAT done the OTHER way and through LOOKUPD, each given as a Way doing N expansions in
    one Exim process: one expansion per process (settings.exim_runs processes per round; an
    SMTP connection is a process), and settings.batch expansions in one process (one a round)."""
    s = ctx.settings
    out = []
    for n, per_round, label in ((1, s.exim_runs, "1 per Exim process"),
                                (s.batch, 1, f"{s.batch:,} in one Exim process")):
        timings = interleave([other(n), lookupd(n)], rounds or s.rounds, per_round)
        out.append(Comparison(f"{what}, {label}", timings[0], timings[1]))
    return out
