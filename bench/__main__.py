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

from bench import connect, core, designs, harness
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
    Suite("designs", designs.DESCRIPTION, designs.run, default=False),
    Suite("connect", connect.DESCRIPTION, connect.run, default=False),
)


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
    for name in ("rounds", "duration", "clients", "lookupd_cmd"):
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


def render_markdown(results: list[SuiteResult], settings: Settings, when: str, load: str) -> str:
    head = [
        "# lookupd benchmark",
        "",
        f"- Run: {when}",
        f"- Machine: {machine()}; load average {load} at the start (other work adds noise)",
        f"- Settings: {settings.rounds} rounds x {settings.duration} s per measurement,"
        f" clients {', '.join(map(str, settings.clients))}{' (--quick)' if settings.quick else ''}",
        "",
    ]
    body = [t.markdown() + "\n" for r in results for t in r.tables]
    return "\n".join(head + body)


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
    load = load_average()
    started = time.monotonic()
    results: list[SuiteResult] = []
    try:
        tools = harness.build_tools()
        # A short private directory: Unix socket paths are limited to 107 bytes.
        with tempfile.TemporaryDirectory(prefix="lkb-") as tmp:
            for suite in chosen:
                log.info("running %s", suite.name)
                workdir = Path(tmp) / suite.name
                workdir.mkdir()
                results.append(suite.run(Context(settings, tools, workdir)))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started

    for r in results:
        for t in r.tables:
            print(t.plain(), end="\n\n")
    markdown = render_markdown(results, settings, when, load)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(markdown)
    data = {
        "when": when,
        "machine": machine(),
        "load_average_at_start": float(load),
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
