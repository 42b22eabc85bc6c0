"""The bench runs end to end (`python -m bench --quick`) and prints a ratio for each verb.

A benchmark, not a timing test: nothing here asserts a speed. Deselect with `-k "not bench"`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUESTS = ("ping", "country 81.2.69.142", "incidents 203.0.113.7")
RATIO = re.compile(r"\d+\.\d\dx")


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_bench_quick_prints_ratios_for_each_verb(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "core", "designs")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    for request in REQUESTS:
        rows = [
            line
            for line in proc.stdout.splitlines()
            if line.lstrip("| ").startswith(f"lookupd {request}")
        ]
        # One plain-text row and one Markdown row per client count (1, 8, 64).
        assert len(rows) == 6, (request, proc.stdout)
        assert all(len(RATIO.findall(row)) == 3 for row in rows), rows
    assert "| C baseline | 8 |" in proc.stdout
    assert "protocol-uvloop" in proc.stdout  # the design study ran too

    data = json.loads((tmp_path / "latest.json").read_text())
    series = data["suites"]["core"]["series"]
    measured = {(s["label"], s["clients"]): s for s in series}
    for request in REQUESTS:
        for clients in (1, 8, 64):
            s = measured[(f"lookupd {request}", clients)]
            assert s["failed"] == 0, s["first_problem"]
            assert s["ratio_to_baseline"]["qps"] > 0
    assert (tmp_path / "latest.md").read_text().startswith("# lookupd benchmark")


def test_bench_flags_wrong_answers(tmp_path: Path) -> None:
    """A server answering "pong" to everything stands in for lookupd: the bench must say so."""
    toy = f"{sys.executable} -m bench.toyservers protocol {{socket}}"
    proc = run_bench(tmp_path, "core", "--clients", "1", "--lookupd-cmd", toy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "answered wrongly" in proc.stderr
    assert "lookupd country 81.2.69.142 at 1 clients" in proc.stdout
    assert "unexpected answer: pong" in proc.stdout
    # ping is answered right, so its row still has figures.
    ping = next(line for line in proc.stdout.splitlines() if line.startswith("lookupd ping"))
    assert len(RATIO.findall(ping)) == 3


# --- the suites of issues 3-6: each end to end on --quick, its rows present ------------------

# Rows each suite prints (plain text and Markdown: every row twice), by suite.
SUITE_ROWS = {
    "dnsbl": (
        "lookupd dnsbl 81.2.69.142 (clean, cached)",
        "lookupd dnsbl 192.0.2.4 (listed, cached)",
        "DNSBL, 3 lists, cold: exim -bh session",
        "DNSBL, 3 lists, warm: exim -bh session",
        "lookupd `dnsbl IP`, cold (3 lists in parallel)",
        "Exim dnslists: session minus a session without the check",
    ),
    "users": (
        "lookupd user USER",
        "lookupd user-fail USER no-such-user@example.org",
        "user block, 1 per Exim process",
        "user block, 20 in one Exim process",
    ),
    "connect": (
        "lookupd connect 81.2.69.142 25",
        "lookupd connect 203.0.113.7 25",
        "exim -bh session, ping only",
        "exim -bh session, lookupd connect ACL",
    ),
    "compare": (
        "country, 1 per Exim process",
        "country, 20 in one Exim process",
        "incidents, nftfw matchcount, 1 per Exim process",
        "incidents, Sympl sum(count), 20 in one Exim process",
        "incidents, nftfw IPv6 like, 1 per Exim process",
        "user block, 20 in one Exim process",
        "DNSBL, 3 lists, cold: exim -bh session",
        "DNSBL, 3 lists, warm: exim -bh session",
        "protocol floor, ping, 1 client",
        "protocol floor, ping, 8 clients",
        "protocol floor, ping, 64 clients",
    ),
}
NEEDS = ("rbldnsd", "knotd", "dnsmasq", "unshare", "exim4")


def rows_of(stdout: str, label: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.lstrip("| ").startswith(label)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                  Path]:
    """One `--quick` run of the four suites (about 20 s; they share the compiled tools)."""
    missing = [t for t in NEEDS if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("Exim's -C configurations and the DNSBL namespace need root")
    out = tmp_path_factory.mktemp("bench-out")
    return run_bench(out, *SUITE_ROWS), out


@pytest.mark.parametrize("suite", SUITE_ROWS)
def test_bench_quick_suite_prints_its_rows(
    quick_run: tuple[subprocess.CompletedProcess[str], Path], suite: str
) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in SUITE_ROWS[suite]:
        rows = rows_of(proc.stdout, label)
        assert len(rows) >= 2, (label, proc.stdout)  # plain text and Markdown
        assert all(RATIO.search(row) for row in rows), rows
        assert "n/a" not in " ".join(rows), rows
    data = json.loads((out / "latest.json").read_text())
    assert suite in data["suites"]
    assert "not measured" not in proc.stdout


def test_bench_compare_draws_its_chart(
    quick_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr
    chart = out / "compare.png"
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "](compare.png)" in (out / "latest.md").read_text()
    comparisons = json.loads((out / "latest.json").read_text())["suites"]["compare"]
    ratios = {c["what"]: c["ratio"] for c in comparisons["comparisons"]}
    assert set(SUITE_ROWS["compare"]) <= set(ratios)
    assert all(r > 0 for r in ratios.values()), ratios


# --- the side-by-side arithmetic (bench/pairs.py), without timing anything -------------------


def test_pairs_alternate_abba_and_ratio_is_the_median_of_round_ratios(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is not an installed package
    from bench import pairs

    order: list[str] = []

    def way(label: str, seconds: list[float]) -> pairs.Way:
        it = iter(seconds)
        return pairs.Way(label, lambda: (order.append(label), next(it))[1])

    # warm-up value first, then 2 rounds x 2 runs; lookupd's round medians 1.5 and 6,
    # the other's 3 and 3: per-round ratios 0.5 and 2, median 1.25.
    other = way("other", [9.0, 3.0, 3.0, 3.0, 3.0])
    lookupd = way("lookupd", [9.0, 1.0, 2.0, 6.0, 6.0])
    a, b = pairs.interleave([other, lookupd], rounds=2, per_round=2)
    assert order == ["other", "lookupd"] + ["other", "lookupd", "lookupd", "other"] * 2
    c = pairs.Comparison("x", a, b)
    assert c.ratios() == [0.5, 2.0]
    assert c.ratio() == 1.25
    assert b.spread() == (1.5, 6.0) and b.median() == 3.75
    assert pairs.rows([c])[0][-1] == "1.25x"


def test_bench_cluster_quick(tmp_path: Path) -> None:
    """Issue 13's suite end to end on --quick (about 15 s): propagation, the Redis price as
    ratios of the same round, and the DNSBL questions three hosts send with and without the
    shared cache, counted in rbldnsd's log."""
    missing = [t for t in ("redis-server", "rbldnsd")
               if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    proc = run_bench(tmp_path, "cluster")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("redis user-fail", "redis strike"):
        rows = rows_of(proc.stdout, label)
        assert rows and all(RATIO.search(row) for row in rows), (label, proc.stdout)
    alone = re.search(r"\| each host alone \| (\d+) \|", proc.stdout)
    shared = re.search(r"\| answers shared through Redis \| (\d+) \|", proc.stdout)
    assert alone and shared, proc.stdout
    assert int(shared.group(1)) < int(alone.group(1))  # the shared cache saves questions
    assert re.search(r"(?m)^\| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \|$", proc.stdout)  # p50/p99
    assert "cluster" in json.loads((tmp_path / "latest.json").read_text())["suites"]
