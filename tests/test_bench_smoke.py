"""The bench runs end to end (`python -m bench --quick`) and prints a ratio for each verb.

A benchmark, not a timing test: nothing here asserts a speed. Deselect with `-k "not bench"`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUESTS = ("ping", "country 81.2.69.142", "incidents 203.0.113.7")
RATIO = re.compile(r"\d+\.\d\dx")


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
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
