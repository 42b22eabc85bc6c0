"""A GeoIP database overwritten or truncated in place under a real `lookupd serve` (issue 10).

Mapping the admin's file directly, a lookup after `cp new.mmdb GeoLite2-Country.mmdb` (which
truncates the file, then fills it) or `truncate` touched pages past the file's new end: SIGBUS,
the daemon gone without a log line. These run the real `cp` and `truncate` against the daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path

import pytest
from conftest import StartLookupd
from geoip_expect import country_expectations
from support import MAXMIND, Lookupd

BEFORE_DB, AFTER_DB = "GeoIP2-Country-Test.mmdb", "GeoLite2-City-Test.mmdb"
# The one address of both test databases whose answer differs: which database is serving.
MARKER, MARKER_BEFORE, MARKER_AFTER = "2001:220::", "SE", "KR"
BEFORE = dict(country_expectations(MAXMIND / BEFORE_DB.replace(".mmdb", ".json")))
AFTER = dict(country_expectations(MAXMIND / AFTER_DB.replace(".mmdb", ".json")))


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def refusals(daemon: Lookupd) -> list[str]:
    return [line for line in daemon.log().splitlines()
            if "WARNING" in line and "refused" in line]


@pytest.fixture
def served(start_lookupd: StartLookupd, tmp_path: Path) -> tuple[Lookupd, Path]:
    """A daemon answering from a copy of BEFORE_DB that the test may overwrite."""
    path = tmp_path / "GeoLite2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    daemon = start_lookupd(f'[geoip]\ncountry_db = "{path}"\nasn_db = "{tmp_path}/none.mmdb"\n'
                           'check_interval = "50ms"\n')
    assert daemon.query("country 81.2.69.142") == "GB"
    assert daemon.query(f"country {MARKER}") == MARKER_BEFORE
    return daemon, path


def fresh(table: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Addresses not asked yet (the answer cache would hide the database) and their answers."""
    yield from ((addr, want) for addr, want in table.items()
                if addr not in ("81.2.69.142", MARKER))


def assert_answers_from_old_database(daemon: Lookupd, asked: Iterator[tuple[str, str]],
                                     until: Callable[[], bool]) -> None:
    """Ask until `until()` and then ten more; every answer must be the old database's."""
    extra = 10
    for addr, want in asked:
        assert daemon.query(f"country {addr}") == want, addr
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        if until():
            extra -= 1
            if not extra:
                return
        time.sleep(0.01)
    raise AssertionError(f"ran out of addresses:\n{daemon.log()}")


def assert_new_database_serves(daemon: Lookupd) -> None:
    wait_for(lambda: daemon.query(f"country {MARKER}") == MARKER_AFTER)
    wrong = [(addr, want, got) for addr, want in AFTER.items()
             if (got := daemon.query(f"country {addr}")) != want]
    assert wrong == []
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()


def test_cp_over_the_database_while_answering(served: tuple[Lookupd, Path],
                                              tmp_path: Path) -> None:
    daemon, path = served
    new = (MAXMIND / AFTER_DB).read_bytes()
    half = len(new) // 2
    # cp from a FIFO: a real cp whose progress the test controls, stalled halfway.
    fifo = tmp_path / "download"
    os.mkfifo(fifo)
    cp = subprocess.Popen(["cp", str(fifo), str(path)])
    try:
        with open(fifo, "wb") as feed:  # returns once cp has opened the FIFO
            feed.write(new[:half])
            feed.flush()
            wait_for(lambda: path.stat().st_size == half)
            # Half a file, over many checks: the old database answers from memory until the
            # half file has sat unchanged for two checks and is refused, and after.
            asked = fresh(BEFORE)
            assert_answers_from_old_database(daemon, asked, lambda: bool(refusals(daemon)))
            feed.write(new[half:])
        assert cp.wait(10) == 0
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    assert_new_database_serves(daemon)
    msgs = refusals(daemon)
    assert len(msgs) == 1, msgs
    assert f"GeoIP country database {path} refused: not a valid MaxMind DB file (corrupt, " \
           "truncated, or still being written?). Still answering from the previous file" \
        in msgs[0]
    assert daemon.log().count(f"GeoIP country database {path} (GeoLite2-City, built") == 1


def test_cp_again_and_again_under_queries(served: tuple[Lookupd, Path]) -> None:
    """Plain `cp` onto the file, 30 times, alternating two databases, under steady queries."""
    daemon, path = served
    both = [addr for addr in BEFORE if addr in AFTER]
    stop = threading.Event()
    wrong: list[tuple[str, str]] = []
    count = 0

    def ask_all_the_time() -> None:
        nonlocal count
        for addr in cycle(both):
            if stop.is_set():
                return
            try:
                got = daemon.query(f"country {addr}")
            except OSError as exc:  # the daemon died
                wrong.append((addr, repr(exc)))
                return
            count += 1
            if got not in (BEFORE[addr], AFTER[addr]):
                wrong.append((addr, got))

    asker = threading.Thread(target=ask_all_the_time)
    asker.start()
    try:
        for i in range(31):
            source = MAXMIND / (AFTER_DB if i % 2 == 0 else BEFORE_DB)
            subprocess.run(["cp", str(source), str(path)], check=True, timeout=10)
            time.sleep(0.02 + 0.01 * (i % 5))
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    finally:
        stop.set()
        asker.join(10)
    assert wrong == []
    assert count > 100
    assert_new_database_serves(daemon)  # the last cp put AFTER_DB in place


@pytest.mark.parametrize(("cut", "reason"), [
    ("truncate -s 0", "the file is empty (truncated, or still being written?)"),
    ("truncate(100)", "not a valid MaxMind DB file (corrupt, truncated, or still being "
                      "written?)"),
], ids=["truncate-s0", "truncate-100"])
def test_truncated_in_place(served: tuple[Lookupd, Path], cut: str, reason: str) -> None:
    daemon, path = served
    if cut == "truncate -s 0":
        subprocess.run(["truncate", "-s", "0", str(path)], check=True, timeout=10)
    else:
        with open(path, "r+b") as fh:
            fh.truncate(100)
    assert_answers_from_old_database(daemon, fresh(BEFORE), lambda: bool(refusals(daemon)))
    time.sleep(0.2)  # more checks: the same cut file is not retried or reported again
    assert daemon.query("country 81.2.69.142") == "GB"
    assert daemon.query(f"country {MARKER}") == MARKER_BEFORE
    msgs = refusals(daemon)
    assert len(msgs) == 1, msgs
    assert f"GeoIP country database {path} refused: {reason}. Still answering from the " \
           "previous file" in msgs[0]
    # A good copy, put in place the same way, is taken.
    subprocess.run(["cp", str(MAXMIND / AFTER_DB), str(path)], check=True, timeout=10)
    assert_new_database_serves(daemon)
