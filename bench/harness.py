"""Shared machinery of the benchmarks: compile the C parts, start and stop servers, drive the
load generator, run alternating rounds against the C baseline, and render result tables.

A suite (one module per benchmark, listed in bench/__main__.py) calls these and returns a
SuiteResult; __main__ prints it as plain text and Markdown and writes bench/out/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / "build"
OUT_DIR = BENCH_DIR / "out"
TESTDATA_DIR = REPO_DIR.parent / "shared" / "testdata"

BASELINE = "C baseline"


class BenchError(Exception):
    """The bench cannot go on (a compile failed, a server did not start); the text says why."""


# --- settings and context ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the command line chose; every suite reads its sizes from here."""

    # Seconds of load per measurement (one server, one request kind, one client count).
    duration: float = 1.0
    # Alternating rounds (baseline, then each contender); figures are medians over rounds.
    rounds: int = 7
    # Concurrent clients (loadgen threads) to measure at.
    clients: tuple[int, ...] = (1, 8, 64)
    # Seconds of unmeasured load on each server before the first round.
    warmup: float = 0.5
    # The --quick setting, for the smoke test: seconds in total, figures only indicative.
    quick: bool = False
    # Exim processes per way and round in the side-by-side Exim comparisons (bench/pairs.py).
    exim_runs: int = 10
    # Expansions in one Exim process for the "N in one process" comparisons.
    batch: int = 1000
    # Delay the local DNS server adds to every DNSBL query in the cold DNSBL measurements.
    dns_delay: float = 0.020
    # Command that starts lookupd; {socket} {config} {geoip_db} {firewall_db} {state_dir} are
    # filled in.
    lookupd_cmd: tuple[str, ...] = (
        sys.executable,
        "-m",
        "lookupd",
        "serve",
        "--config",
        "{config}",
        "--socket",
        "{socket}",
        "--geoip-db",
        "{geoip_db}",
        "--firewall-db",
        "{firewall_db}",
        "--state-dir",
        "{state_dir}",
    )

    @property
    def max_count(self) -> int:
        """Upper bound on queries per measurement, so every load is bounded in count too."""
        return max(1000, int(self.duration * 200_000))


QUICK = Settings(duration=0.2, rounds=1, warmup=0.05, quick=True, exim_runs=2, batch=20)


@dataclass(frozen=True)
class Tools:
    """Paths of the compiled C programs."""

    loadgen: Path
    baseline: Path


@dataclass
class Context:
    """What a suite gets: the settings, the compiled tools and a short private directory."""

    settings: Settings
    tools: Tools
    workdir: Path


# --- compiling ----------------------------------------------------------------------------------


def compile_c(name: str, *extra: str) -> Path:
    """Compile bench/NAME.c with gcc -O2 into bench/build/NAME, unless it is up to date."""
    source = BENCH_DIR / f"{name}.c"
    target = BUILD_DIR / name
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BenchError("no C compiler: install gcc (Debian: apt-get install gcc)")
    BUILD_DIR.mkdir(exist_ok=True)
    # Build beside the target and rename: a concurrent run never executes a half-written file.
    partial = target.with_name(f"{name}.{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-Wall", "-o", str(partial), str(source), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BenchError(f"compiling {source.name} failed:\n{proc.stderr}")
    os.replace(partial, target)
    return target


def build_tools() -> Tools:
    return Tools(loadgen=compile_c("loadgen", "-pthread"), baseline=compile_c("baseline"))


# --- talking to a server ------------------------------------------------------------------------


# Where a server listens: a Unix socket path, or (host, port) for loopback TCP (Exim's inet:).
Endpoint = Path | tuple[str, int]


def endpoint_args(endpoint: Endpoint) -> list[str]:
    """loadgen's arguments for ENDPOINT."""
    if isinstance(endpoint, Path):
        return ["--unix", str(endpoint)]
    return ["--tcp", f"{endpoint[0]}:{endpoint[1]}"]


def exim_query(endpoint: Endpoint, request: bytes, timeout: float = 2.0) -> bytes:
    """One query as Exim's ${readsocket} makes it: connect, write, half-close, read to EOF."""
    if isinstance(endpoint, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(endpoint))
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection(endpoint, timeout=timeout)
    with sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class Server:
    """A server process this bench started."""

    name: str
    endpoint: Endpoint
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _wait_ready(server: Server, probe: bytes, expect: bytes, timeout: float) -> None:
    """Poll with PROBE until the server answers EXPECT; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.proc.returncode} before answering:\n"
                f"{server.log_tail()}"
            )
        try:
            answer = exim_query(server.endpoint, probe, timeout=1.0)
            if answer == expect:
                return
            last = f"answered {answer!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(
        f"{server.name} did not answer {probe!r} with {expect!r} within {timeout:.0f} s "
        f"({last}):\n{server.log_tail()}"
    )


def _stop(server: Server) -> None:
    """SIGTERM the server's process group (it runs in its own session), then SIGKILL."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for 5 s; killing it", server.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    if server.proc.returncode not in (0, -signal.SIGTERM):
        log.warning(
            "%s ended with status %s when stopped:\n%s",
            server.name,
            server.proc.returncode,
            server.log_tail(),
        )


@contextlib.contextmanager
def run_server(
    name: str,
    argv: Sequence[str],
    endpoint: Endpoint,
    workdir: Path,
    probe: bytes = b"ping",
    expect: bytes = b"pong",
    timeout: float = 20.0,
) -> Iterator[Server]:
    """Start ARGV (in its own session, output to a log file), wait until it answers, stop it."""
    log_path = workdir / f"{name.replace(' ', '_')}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            start_new_session=True,
        )
    server = Server(name, endpoint, proc, log_path)
    try:
        _wait_ready(server, probe, expect, timeout)
        yield server
    finally:
        _stop(server)


@contextlib.contextmanager
def baseline_server(ctx: Context) -> Iterator[Server]:
    path = ctx.workdir / "baseline.sock"
    with run_server(BASELINE, [str(ctx.tools.baseline), str(path)], path, ctx.workdir) as srv:
        yield srv


# No DNS lists: lookupd's shipped defaults would ask (and health-probe) public DNSBLs.
OFFLINE_CONFIG = """\
[dnsbl]
list = []
"""


@contextlib.contextmanager
def lookupd_server(
    ctx: Context,
    config: str = OFFLINE_CONFIG,
    geoip_db: Path = TESTDATA_DIR / "maxmind" / "GeoIP2-Country-Test.mmdb",
    firewall_db: Path = TESTDATA_DIR / "firewall" / "nftfw-firewall.db",
    extra_args: Sequence[str] = (),
    name: str = "lookupd",
) -> Iterator[Server]:
    """`lookupd serve` with CONFIG (TOML text) on the test databases, or --lookupd-cmd;
    ready once `ping` answers. NAME tells apart several instances in one workdir."""
    path = ctx.workdir / f"{name}.sock"
    state_dir = ctx.workdir / ("state" if name == "lookupd" else f"{name}-state")
    state_dir.mkdir(exist_ok=True)
    config_path = ctx.workdir / f"{name}.toml"
    config_path.write_text(config)
    fill = {
        "socket": str(path),
        "config": str(config_path),
        "geoip_db": str(geoip_db),
        "firewall_db": str(firewall_db),
        "state_dir": str(state_dir),
    }
    argv = [arg.format(**fill) for arg in ctx.settings.lookupd_cmd] + list(extra_args)
    with run_server(name, argv, path, ctx.workdir) as srv:
        yield srv


# --- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """What one loadgen run printed (latencies in microseconds, over successful queries)."""

    threads: int
    queries: int
    ok: int
    errors: int
    mismatches: int
    elapsed_s: float
    qps: float
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    first_problem: str | None
    # The server's CPU time (user + system, /proc/PID/stat) over the queries it answered, in
    # microseconds per query; NaN when the server's pid is not known.
    cpu_us: float = float("nan")

    @property
    def failed(self) -> int:
        return self.errors + self.mismatches


def run_load(
    ctx: Context,
    endpoint: Endpoint,
    request: str,
    clients: int,
    duration: float,
    expect: str | None = None,
    requests_file: Path | None = None,
) -> LoadResult:
    """Drive ENDPOINT with CLIENTS Exim-style clients for DURATION s (count-bounded too)."""
    argv = [
        str(ctx.tools.loadgen),
        *endpoint_args(endpoint),
        "--threads",
        str(clients),
        "--duration",
        str(duration),
        "--count",
        str(ctx.settings.max_count),
    ]
    if expect is not None:
        argv += ["--expect", expect]
    if requests_file is not None:
        argv += ["--requests-file", str(requests_file)]
    else:
        argv.append(request)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()}")
    return LoadResult(**json.loads(proc.stdout))


# --- alternating rounds -----------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One thing measured: a label, where it listens, what it is asked and should answer."""

    label: str
    endpoint: Endpoint
    request: str
    expect: str | None
    # Lines to cycle through instead of REQUEST (e.g. distinct addresses, for cold caches).
    requests_file: Path | None = None
    # The server process, for its CPU time per query (None: not measured).
    pid: int | None = None

    def load(self, ctx: Context, clients: int, duration: float) -> LoadResult:
        before = cpu_seconds(self.pid)
        result = run_load(
            ctx, self.endpoint, self.request, clients, duration, self.expect, self.requests_file
        )
        after = cpu_seconds(self.pid)
        if before is None or after is None or not result.queries:
            return result
        # Every query the loadgen made cost the server its work, answered well or not.
        return replace(result, cpu_us=(after - before) * 1e6 / result.queries)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of PID (its threads included) in seconds, from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Series:
    """All rounds of one contender at one client count, plus the paired baseline ratios."""

    label: str
    clients: int
    runs: list[LoadResult] = field(default_factory=list)
    # Per round: this contender's figure / the baseline's figure in the same round.
    qps_ratios: list[float] = field(default_factory=list)
    p50_ratios: list[float] = field(default_factory=list)
    p99_ratios: list[float] = field(default_factory=list)

    def median(self, attr: str) -> float:
        """Median over the rounds that had successful queries (NaN when none had)."""
        values = [getattr(r, attr) for r in self.runs if r.ok]
        return statistics.median(values) if values else float("nan")

    def spread(self, attr: str) -> tuple[float, float] | None:
        """Lowest and highest figure over the rounds that had successful queries."""
        values = [getattr(r, attr) for r in self.runs if r.ok]
        return (min(values), max(values)) if values else None

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.runs)

    @property
    def first_problem(self) -> str | None:
        return next((r.first_problem for r in self.runs if r.first_problem), None)

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "clients": self.clients,
            "median": {a: _finite_or_none(self.median(a)) for a in FIGURES},
            "min_max": {a: self.spread(a) for a in FIGURES},
            "ratio_to_baseline": {
                "qps": _median_or_none(self.qps_ratios),
                "p50": _median_or_none(self.p50_ratios),
                "p99": _median_or_none(self.p99_ratios),
            },
            "failed": self.failed,
            "first_problem": self.first_problem,
            "runs": [asdict(r) for r in self.runs],
        }


FIGURES = ("qps", "p50_us", "p99_us", "cpu_us")


def _finite_or_none(value: float) -> float | None:
    return None if value != value else value


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def warm_up(ctx: Context, contenders: Sequence[Contender]) -> None:
    """Unmeasured load on each contender so first-round figures are not cold-start figures."""
    for c in contenders:
        c.load(ctx, 8, ctx.settings.warmup)


def alternate(
    ctx: Context, baseline: Contender, contenders: Sequence[Contender], clients: Sequence[int]
) -> tuple[list[Series], list[Series]]:
    """Rounds of: baseline, then each contender, at each client count; pair each with its round.

    Pairing a figure with the baseline measured moments before cancels drift from whatever
    else the machine is doing; the reported ratio is the median of the per-round ratios.
    Returns (baseline series, contender series), each ordered by client count.
    """
    s = ctx.settings
    base = {n: Series(baseline.label, n) for n in clients}
    other = {(c.label, n): Series(c.label, n) for n in clients for c in contenders}
    warm_up(ctx, [baseline, *contenders])
    for rnd in range(s.rounds):
        for n in clients:
            b = baseline.load(ctx, n, s.duration)
            base[n].runs.append(b)
            for c in contenders:
                r = c.load(ctx, n, s.duration)
                series = other[(c.label, n)]
                series.runs.append(r)
                if r.ok == 0 or b.ok == 0:
                    continue  # no successful queries: no figures to compare
                series.qps_ratios.append(_ratio(r.qps, b.qps))
                series.p50_ratios.append(_ratio(r.p50_us, b.p50_us))
                series.p99_ratios.append(_ratio(r.p99_us, b.p99_us))
        log.info("round %d/%d done", rnd + 1, s.rounds)
    return list(base.values()), [other[(c.label, n)] for c in contenders for n in clients]


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A titled table of strings; rendered as aligned plain text or as Markdown."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()

    def plain(self) -> str:
        widths = [
            max(len(r[i]) for r in (self.header, *self.rows)) for i in range(len(self.header))
        ]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        out = [self.title, "=" * len(self.title), line(self.header)]
        out.append("  ".join("-" * w for w in widths))
        out += [line(r) for r in self.rows]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        out.append("|" + "|".join([":---"] + ["---:"] * (len(self.header) - 1)) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


@dataclass(frozen=True)
class Chart:
    """A horizontal bar chart of ratios (one bar a row), drawn by bench/chart.py."""

    title: str
    labels: tuple[str, ...]
    values: tuple[float, ...]
    # What a bar's length means, under the axis.
    axis: str
    # File name of the PNG in the output directory.
    filename: str


@dataclass(frozen=True)
class SuiteResult:
    """One suite's output: tables to print and the raw figures for bench/out/latest.json."""

    name: str
    tables: tuple[Table, ...]
    data: dict[str, object]
    # Queries that got an error or a wrong answer: the figures are then not to be trusted.
    failed_queries: int = 0
    # Bar charts to draw as PNG beside latest.md.
    charts: tuple[Chart, ...] = ()


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}x"


def fmt_qps(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}"


def fmt_us(value: float) -> str:
    return "n/a" if value != value else f"{value:,.0f}"


def fmt_cpu(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"


def ratio_rows(base: Sequence[Series], series: Sequence[Series]) -> tuple[tuple[str, ...], ...]:
    """Rows grouped by client count: the baseline first, then every contender with its ratios."""
    rows: list[tuple[str, ...]] = []
    by_clients = {b.clients: b for b in base}
    for s in sorted([*base, *series], key=lambda s: s.clients):
        b = by_clients[s.clients]
        is_base = s is b
        rows.append(
            (
                s.label,
                str(s.clients),
                fmt_qps(s.median("qps")),
                "1.00x" if is_base else fmt_ratio(_median_or_none(s.qps_ratios)),
                fmt_us(s.median("p50_us")),
                "1.00x" if is_base else fmt_ratio(_median_or_none(s.p50_ratios)),
                fmt_us(s.median("p99_us")),
                "1.00x" if is_base else fmt_ratio(_median_or_none(s.p99_ratios)),
                fmt_cpu(s.median("cpu_us")),
                str(s.failed),
            )
        )
    return tuple(rows)


RATIO_HEADER = (
    "server / request",
    "clients",
    "qps",
    "qps/C",
    "p50 us",
    "p50/C",
    "p99 us",
    "p99/C",
    "cpu us/q",
    "errors",
)


CPU_NOTE = ("cpu us/q: the server process's CPU time (user + system, /proc/PID/stat) over the"
            " queries made of it, median of rounds: what each query costs the machine beside"
            " the clients' own work.")


def problem_notes(series: Sequence[Series]) -> tuple[str, ...]:
    """One note per series that had failed queries, with the first problem seen."""
    return tuple(
        f"{s.label} at {s.clients} clients: {s.failed} failed queries, first: {s.first_problem}"
        for s in series
        if s.failed
    )
