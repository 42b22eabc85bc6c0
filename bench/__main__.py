"""`python -m bench [SUITE ...] [--quick]`: run benchmarks, print ratios, write bench/out/.

Each suite is one module with `DESCRIPTION` and `run(ctx) -> SuiteResult`; add new ones to
SUITES below. With no SUITE named, the default ones run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import (
    chart,
    cluster,
    compare,
    connect,
    core,
    counting,
    designs,
    dnsbl,
    harness,
    users,
)
from bench.harness import BenchError, Context, Settings, SuiteResult

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    run: Callable[[Context], SuiteResult]
    # Whether a plain `python -m bench` runs it.
    default: bool


SUITES = (
    Suite("core", core.DESCRIPTION, core.run, default=True),
    Suite("dnsbl", dnsbl.DESCRIPTION, dnsbl.run, default=True),
    Suite("users", users.DESCRIPTION, users.run, default=True),
    Suite("connect", connect.DESCRIPTION, connect.run, default=True),
    Suite("compare", compare.DESCRIPTION, compare.run, default=True),
    Suite("designs", designs.DESCRIPTION, designs.run, default=False),
    Suite("counting", counting.DESCRIPTION, counting.run, default=True),
    # Needs redis-server: run it by name.
    Suite("cluster", cluster.DESCRIPTION, cluster.run, default=False),
)

# `--results`: the committed record of a run on this machine (bench/RESULTS.md and its chart).
RESULTS_MD = harness.BENCH_DIR / "RESULTS.md"
RESULTS_INTRO = """\
The record of one run of `python -m bench --results` (as root: see bench/README.md), which
rewrote this file and its chart. Every figure is paired with its baseline or its in-Exim
alternative measured moments before on the same machine; read the ratios. On a busy machine
(see the load average) single figures move by 10-30 %: rerun on a quiet one before quoting."""


def build_parser() -> argparse.ArgumentParser:
    names = [s.name for s in SUITES]
    epilog = "suites:\n" + "\n".join(
        f"  {s.name:10} {s.description}{' (default)' if s.default else ''}" for s in SUITES
    )
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of lookupd, each figure a ratio to a C baseline in the same run.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help="suites to run, from: "
        + ", ".join(names)
        + " (default: "
        + ", ".join(s.name for s in SUITES if s.default)
        + ")",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds in total (1 round of 0.2 s): checks the bench runs",
    )
    p.add_argument("--rounds", type=int, help=f"alternating rounds (default {Settings.rounds})")
    p.add_argument(
        "--duration", type=float, help=f"seconds per measurement (default {Settings.duration})"
    )
    p.add_argument(
        "--clients",
        type=_int_list,
        help="concurrent clients, comma-separated (default "
        + ",".join(map(str, Settings.clients))
        + ")",
    )
    p.add_argument(
        "--lookupd-cmd",
        type=shlex.split,
        help="command starting lookupd, with {socket} {geoip_db} {firewall_db}"
        " {state_dir} placeholders (default: this Python's `-m lookupd serve ...`)",
    )
    p.add_argument(
        "--exim-runs",
        type=int,
        help="Exim processes per way and round in the Exim comparisons"
        f" (default {Settings.exim_runs})",
    )
    p.add_argument(
        "--batch",
        type=int,
        help=f"expansions in one Exim process for the N-in-one rows (default {Settings.batch})",
    )
    p.add_argument(
        "--results",
        action="store_true",
        help="also write bench/RESULTS.md and its chart: this machine's record of the run",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=harness.OUT_DIR,
        help="where latest.md and latest.json go (default bench/out)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers such as 1,8,64")
    return values


def settings_from(args: argparse.Namespace) -> Settings:
    s = harness.QUICK if args.quick else Settings()
    changes: dict[str, object] = {}
    for name in ("rounds", "duration", "clients", "lookupd_cmd", "exim_runs", "batch"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = tuple(value) if name == "lookupd_cmd" else value
    return replace(s, **changes)  # type: ignore[arg-type]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {python}"


def load_average() -> str:
    """The 1-minute load average: figures taken on a busy machine are noisier."""
    return f"{os.getloadavg()[0]:.2f}"


def render_markdown(
    results: list[SuiteResult],
    settings: Settings,
    when: str,
    load: str,
    elapsed: float,
    charts: dict[str, str],
    command: str,
) -> str:
    """The run as Markdown; CHARTS maps a chart's title to its PNG's path relative to the
    Markdown file."""
    head = [
        "# lookupd benchmark",
        "",
        f"- Run: {when}, `{command}`, {elapsed:.0f} s",
        f"- Machine: {machine()}; load average {load} (other work adds noise)",
        f"- Settings: {settings.rounds} rounds x {settings.duration} s per measurement,"
        f" clients {', '.join(map(str, settings.clients))}; {settings.exim_runs} Exim"
        f" processes per way and round, {settings.batch} expansions in one process; DNS delay"
        f" {settings.dns_delay * 1000:.0f} ms{' (--quick)' if settings.quick else ''}",
        "",
    ]
    body: list[str] = []
    for r in results:
        body += [t.markdown() + "\n" for t in r.tables]
        body += [f"![{c.title}]({charts[c.title]})\n" for c in r.charts if c.title in charts]
    return "\n".join(head + body)


def draw_charts(results: list[SuiteResult], directory: Path, prefix: str = "") -> dict[str, str]:
    """Each suite's charts as PNG files in DIRECTORY; title -> file name, for the Markdown."""
    drawn: dict[str, str] = {}
    for r in results:
        for c in r.charts:
            name = prefix + c.filename
            problem = chart.draw(c, directory / name)
            if problem is None:
                drawn[c.title] = name
            else:
                print(f"bench: chart {c.title!r} not drawn: {problem}", file=sys.stderr)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = set(args.suites) - {s.name for s in SUITES}
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))}: see --help for the list")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="bench: %(message)s"
    )
    settings = settings_from(args)
    chosen = [s for s in SUITES if (s.name in args.suites if args.suites else s.default)]
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = load_average()
    started = time.monotonic()
    results: list[SuiteResult] = []
    try:
        tools = harness.build_tools()
        # A short private directory: Unix socket paths are limited to 107 bytes.
        with tempfile.TemporaryDirectory(prefix="lkb-") as tmp:
            # Exim drops root to its own user for -bh sessions: it must reach lookupd's
            # sockets in here (the directory holds only sockets, configurations and logs).
            Path(tmp).chmod(0o755)
            for suite in chosen:
                log.info("running %s", suite.name)
                workdir = Path(tmp) / suite.name
                workdir.mkdir()
                results.append(suite.run(Context(settings, tools, workdir)))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    load_end = load_average()
    load = f"{load_start} at the start, {load_end} at the end"

    for r in results:
        for t in r.tables:
            print(t.plain(), end="\n\n")
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(results, args.out)
    markdown = render_markdown(results, settings, when, load, elapsed, charts, command.strip())
    print(markdown)
    (args.out / "latest.md").write_text(markdown)
    if args.results:
        charts = draw_charts(results, RESULTS_MD.parent, prefix="RESULTS-")
        record = render_markdown(results, settings, when, load, elapsed, charts, command.strip())
        title, rest = record.split("\n", 1)
        RESULTS_MD.write_text(f"{title}\n\n{RESULTS_INTRO}\n{rest}")
        print(f"(the record of this run: {RESULTS_MD})")
    data = {
        "when": when,
        "machine": machine(),
        "load_average_at_start": float(load_start),
        "load_average_at_end": float(load_end),
        "elapsed_s": round(elapsed, 1),
        "settings": asdict(settings),
        "suites": {r.name: r.data for r in results},
    }
    (args.out / "latest.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"(took {elapsed:.0f} s; written to {args.out}/latest.md and latest.json)")
    failed = {r.name: r.failed_queries for r in results if r.failed_queries}
    if failed:
        detail = ", ".join(f"{name}: {n}" for name, n in failed.items())
        print(
            f"bench: queries failed or were answered wrongly ({detail}); the figures of those"
            " rows are not meaningful: see the notes under each table",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
