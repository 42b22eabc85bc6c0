"""The real programs the benchmarks run beside lookupd, shared with the test suite.

tests/dnsservers.py (rbldnsd, knot, dnsmasq, a delaying DNS proxy) and tests/support.py (Exim
driven with its own `-C` configuration) are imported from tests/ rather than copied: the
benchmarks measure the same set-ups the tests check. Plus what only the benchmarks need:
timing Exim processes, and whether Exim can be driven here at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.harness import REPO_DIR, BenchError

if str(REPO_DIR / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_DIR / "tests"))

import dnsservers  # noqa: E402  (tests/ on the path first)
import support  # noqa: E402

__all__ = ["dnsservers", "support", "EXIM", "exim_problem", "exim_config", "exim_be", "exim_bh"]

EXIM = support.EXIM
# What the compare suite's get_geo loads in Exim's embedded Perl (which Debian's
# exim4-daemon-heavy has and exim4-daemon-light has not).
PERL_MODULE = "MaxMind::DB::Reader"


def exim_problem() -> str | None:
    """Why Exim cannot be driven here (None when it can): the comparisons need root, because
    Exim trusts a `-C` configuration only from root (it must be owned by root, not
    world-writable), and the DNSBL comparison needs a private network namespace."""
    if not Path(EXIM).exists():
        return f"{EXIM} is not installed (Debian: exim4-daemon-heavy)"
    if os.geteuid() != 0:
        return "Exim's -C configurations and network namespaces need root: run the bench as root"
    return None


def perl_problem() -> str | None:
    """Why Exim's embedded Perl with a GeoIP2 reader cannot run here (None when it can)."""
    proc = subprocess.run(["perl", f"-M{PERL_MODULE}", "-e1"], capture_output=True, check=False)
    if proc.returncode != 0:
        return (f"perl module {PERL_MODULE} is missing (Debian: libmaxmind-db-reader-xs-perl)")
    out = subprocess.run([EXIM, "-bV"], capture_output=True, text=True, check=False).stdout
    if "Perl" not in out:
        return "this Exim has no embedded Perl (Debian: install exim4-daemon-heavy)"
    return None


def exim_config(workdir: Path, text: str) -> Path:
    """A configuration of the bench's own in WORKDIR (spool and log beside it), readable by
    the Exim user, owned by whoever runs the bench (root: Exim trusts it)."""
    exim = support.Exim(workdir, support.EXIM_BASE.format(workdir=workdir) + text)
    return exim.config


def exim_be(config: Path, lines: Sequence[str], expect: Sequence[str]) -> float:
    """Seconds one `exim -be` process takes to expand LINES (one expansion a line, read from
    stdin as Exim does in a loop); BenchError unless each result equals EXPECT's."""
    started = time.perf_counter()
    proc = subprocess.run([EXIM, "-C", str(config), "-be"],
                          input="".join(f"{line}\n" for line in lines).encode(),
                          capture_output=True, timeout=120, check=False)
    took = time.perf_counter() - started
    # In stdin mode Exim prompts "> " before each line and once more at the end.
    got = proc.stdout.decode(errors="replace").split("\n")[: len(lines)]
    got = [g.removeprefix("> ") for g in got]
    if got != list(expect):
        wrong = next(((i, g, e) for i, (g, e) in enumerate(zip(got, expect, strict=False))
                      if g != e), (len(got), "(nothing)", "(more)"))
        raise BenchError(
            f"exim -be with {config} expanded line {wrong[0] + 1} ({lines[wrong[0]]!r}) to"
            f" {wrong[1]!r}, expected {wrong[2]!r}\n{proc.stderr.decode(errors='replace')}")
    return took


def exim_bh(config: Path, ip: str, smtp: str, expect: str, port: int = 25) -> float:
    """Seconds one `exim -bh IP` session (SMTP lines in SMTP) takes; BenchError unless Exim's
    replies contain EXPECT (e.g. "250 Accepted")."""
    started = time.perf_counter()
    proc = subprocess.run([EXIM, "-C", str(config), "-oMi", f"127.0.0.1.{port}", "-bh", ip],
                          input=smtp.replace("\n", "\r\n").encode(), capture_output=True,
                          timeout=60, check=False)
    took = time.perf_counter() - started
    out = proc.stdout.decode(errors="replace")
    if expect not in out:
        log = "\n".join(line for line in proc.stderr.decode(errors="replace").splitlines()
                        if line.startswith("LOG:"))
        raise BenchError(f"exim -bh {ip} with {config}: no {expect!r} in the replies:\n{out}\n"
                         f"{log}")
    return took

