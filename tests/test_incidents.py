"""Incidents source against the real nftfw and Sympl schemas, live rewrites and broken files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import shutil
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from lookupd import incidents
from lookupd.config import IncidentsConfig
from lookupd.incidents import (
    IncidentsResult,
    IncidentsSource,
    build_index,
    file_state,
    load,
    parse_stored,
)
from lookupd.ipaddr import parse_ip
from lookupd.outcome import Status

FIREWALL = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "firewall"
NFTFW = FIREWALL / "nftfw-firewall.db"
SYMPL = FIREWALL / "sympl-firewall-blacklist-count.db"

MakeSource = Callable[[IncidentsConfig], Awaitable[IncidentsSource]]


@pytest.fixture
async def make_source() -> AsyncIterator[MakeSource]:
    sources: list[IncidentsSource] = []

    async def make(cfg: IncidentsConfig) -> IncidentsSource:
        src = IncidentsSource(cfg)
        await src.open()
        sources.append(src)
        return src

    yield make
    for src in sources:
        await src.close()


def create_sql(db: Path) -> str:
    """The CREATE TABLE statement of a shared test database (read-only)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT sql FROM sqlite_master WHERE name = 'blacklist'").fetchone()
    finally:
        con.close()
    return str(row[0])


def make_db(path: Path, schema_of: Path, rows: Sequence[tuple[object, ...]],
            columns: str) -> Path:
    con = sqlite3.connect(path)
    with con:
        con.execute(create_sql(schema_of))
        marks = ", ".join("?" * len(columns.split(",")))
        con.executemany(f"INSERT INTO blacklist ({columns}) VALUES ({marks})", rows)
    con.close()
    return path


def count(src: IncidentsSource, addr: str) -> int:
    result = src.count(parse_ip(addr))
    assert result.status is not Status.UNKNOWN, result
    assert (result.status is Status.FOUND) == (result.count > 0)
    return result.count


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lookupd.incidents" and r.levelno >= logging.WARNING]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The shared test databases.


@pytest.mark.parametrize("addr, want", [
    ("203.0.113.7", 42), ("203.0.113.8", 10), ("203.0.113.9", 11), ("198.51.100.23", 3),
    ("::ffff:203.0.113.7", 42),
    ("2001:db8:1:2::5", 57), ("2001:db8:1:2::", 57), ("2001:db8:1:2::ffff", 57),
    ("2001:db8:1:2::1:0", 0),  # just outside nftfw's /112
    ("2001:db8:1:3::1", 5), ("2001:db8:1:3::", 5),
    ("192.0.2.200", 0), ("203.0.113.6", 0), ("2001:db8:99::1", 0),
])
async def test_nftfw_known_rows(make_source: MakeSource, addr: str, want: int) -> None:
    src = await make_source(IncidentsConfig(db=NFTFW))
    assert count(src, addr) == want
    assert src.loaded is not None and src.loaded.schema == "nftfw"
    assert src.loaded.index.rows == 4056


@pytest.mark.parametrize("addr, want", [
    ("203.0.113.7", 42), ("203.0.113.8", 10), ("203.0.113.9", 11), ("198.51.100.23", 3),
    ("2001:db8:1:2::5", 57), ("2001:db8:1:2::1:0", 57),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", 57),  # anything in the /64
    ("2001:db8:1:3::1", 5), ("2001:db8:1:4::1", 0), ("192.0.2.200", 0),
])
async def test_sympl_known_totals(make_source: MakeSource, addr: str, want: int) -> None:
    src = await make_source(IncidentsConfig(db=SYMPL))
    assert count(src, addr) == want
    assert src.loaded is not None and src.loaded.schema == "sympl"


async def test_not_present_is_not_found(make_source: MakeSource) -> None:
    src = await make_source(IncidentsConfig(db=NFTFW))
    assert src.count(parse_ip("192.0.2.77")) == IncidentsResult(Status.NOT_FOUND, 0)


async def test_incidents_column(make_source: MakeSource) -> None:
    src = await make_source(IncidentsConfig(db=NFTFW, nftfw_column="incidents"))
    assert count(src, "203.0.113.7") == 8
    assert count(src, "2001:db8:1:2::5") == 11


async def test_schema_forced_wrong(make_source: MakeSource,
                                   caplog: pytest.LogCaptureFixture) -> None:
    src = await make_source(IncidentsConfig(db=NFTFW, schema="sympl"))
    result = src.count(parse_ip("203.0.113.7"))
    assert result.status is Status.UNKNOWN and result.reason == "firewall database unreadable"
    [msg] = warnings(caplog)
    assert str(NFTFW) in msg and "expected sympl" in msg


# ---------------------------------------------------------------------------------------------
# Databases built in tmp_path with the same schemas.


async def test_sympl_window(make_source: MakeSource, tmp_path: Path) -> None:
    now = int(time.time())
    rows = [("192.0.2.1", now - 10, 3), ("192.0.2.1", now - 100, 4),
            ("192.0.2.1", now - 5000, 100), ("2001:db8:7::/64", now - 20, 2),
            ("2001:db8:7::/64", now - 9000, 50), ("2001:db8:7::9", now - 30, 1)]
    db = make_db(tmp_path / "firewall-blacklist-count.db", SYMPL, rows, "ip, timestamp, count")
    windowed = await make_source(IncidentsConfig(db=db, sympl_window=1000))
    assert count(windowed, "192.0.2.1") == 7
    assert count(windowed, "2001:db8:7::9") == 3
    assert count(windowed, "2001:db8:7::8") == 2
    everything = await make_source(IncidentsConfig(db=db))
    assert count(everything, "192.0.2.1") == 107
    assert count(everything, "2001:db8:7::9") == 53
    narrow = await make_source(IncidentsConfig(db=db, sympl_window=15))
    assert count(narrow, "192.0.2.1") == 3
    assert count(narrow, "2001:db8:7::8") == 0
    # Each count says until when it holds: till its oldest counted row leaves the window.
    assert windowed.count(parse_ip("192.0.2.1")).until == now - 100 + 1000
    assert windowed.count(parse_ip("2001:db8:7::9")).until == now - 30 + 1000
    assert narrow.count(parse_ip("2001:db8:7::8")).until == math.inf  # nothing left to go
    assert everything.count(parse_ip("192.0.2.1")).until == math.inf


def test_a_windowed_count_holds_until_its_oldest_row_leaves_the_window() -> None:
    rows: list[tuple[object, object, object]] = [
        ("192.0.2.1", 3, 1000.0), ("192.0.2.1", 4, 1100.0), ("192.0.2.0/24", 5, 1050.0)]
    index = build_index(rows, window=100)
    ip = parse_ip("192.0.2.1")
    assert index.count_until(ip, 1090) == (12, 1100)  # every row in the window
    assert index.count_until(ip, 1100) == (12, 1100)  # the cutoff is inclusive
    assert index.count_until(ip, 1100.5) == (9, 1150)  # 1000 left: (1100, 4) and (1050, 5)
    assert index.count_until(ip, 1151) == (4, 1200)
    assert index.count_until(ip, 1201) == (0, math.inf)
    assert all(index.count_until(ip, t)[0] == index.count(ip, t) for t in (1090, 1151, 1201))


async def test_version_follows_the_index_answering(make_source: MakeSource,
                                                   tmp_path: Path) -> None:
    """version() stays the same while the same index answers, and changes when the firewall
    writes (the connect reply cache keeps its answers beside it)."""
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    past = time.time() - 10
    os.utime(db, (past, past))  # not just written: read once, not again to be sure
    src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
    first = src.version()
    await asyncio.sleep(0.05)
    assert src.version() == first
    with contextlib.closing(sqlite3.connect(db)) as con, con:  # closed: Python 3.13 warns
        con.execute("UPDATE blacklist SET matchcount = matchcount + 1")
    await eventually(lambda: src.version() != first)
    assert src.count(parse_ip("203.0.113.7")).count == 43


async def test_networks_of_any_length_and_odd_forms(make_source: MakeSource, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        ("2001:db8:5::/64", 7), ("2001:db8:5::/112", 4), ("2001:db8:5::1", 3),
        ("2001:0db8:0005:0000:0000:0000:0000:0002/128", 20),  # uncompressed, host as /128
        ("2001:DB8:6::1/64", 9),  # host bits under the mask
        ("198.51.100.0/24", 5), ("198.51.100.9/32", 1), (" 198.51.100.10 ", 2),
        ("::ffff:198.51.100.11", 30),  # IPv4-mapped: counts for the IPv4 address
        ("not-an-ip", 99), ("300.1.1.1", 99), ("2001:db8::/129", 99), ("198.51.100.012", 99),
        ("fe80::1%eth0", 99), ("198.51.100.13", None), ("198.51.100.14", -4),
        ("198.51.100.15", "many"),
    ]
    db = make_db(tmp_path / "firewall.db", NFTFW, [(ip, n) for ip, n in rows], "ip, matchcount")
    with caplog.at_level(logging.DEBUG, logger="lookupd.incidents"):
        src = await make_source(IncidentsConfig(db=db))
    assert count(src, "2001:db8:5::1") == 14
    assert count(src, "2001:db8:5::2") == 31
    assert count(src, "2001:db8:5::1:0") == 7  # outside the /112, inside the /64
    assert count(src, "2001:db8:5:0:ffff::") == 7
    assert count(src, "2001:db8:6::abcd") == 9
    assert count(src, "2001:db8:4::1") == 0
    assert count(src, "198.51.100.9") == 6
    assert count(src, "198.51.100.10") == 7
    assert count(src, "198.51.100.11") == 35
    assert count(src, "198.51.100.13") == 5  # its own row is garbage; the /24 still counts
    assert count(src, "198.51.100.200") == 5
    assert count(src, "198.51.101.1") == 0
    skipped = [r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG and "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 8 rows" in skipped[0]
    assert warnings(caplog) == []


def test_parse_stored() -> None:
    assert parse_stored("203.0.113.7") == (4, 32, 0xCB007107)
    assert parse_stored("203.0.113.7/32") == (4, 32, 0xCB007107)
    assert parse_stored("203.0.113.0/24") == (4, 24, 0xCB0071)
    assert parse_stored("2001:db8:1:2::/112") == (6, 112, 0x20010DB8000100020000000000000000 >> 16)
    assert parse_stored("::ffff:203.0.113.0/120") == (4, 24, 0xCB0071)
    assert parse_stored("0.0.0.0/0") == (4, 0, 0)
    for garbage in ("", "/", "203.0.113.7/", "203.0.113.7/33", "203.0.113.7/-1", "1.2.3",
                    "2001:db8::1/1x", None, 42, b"203.0.113.7", "203.0.113.7/٣"):
        assert parse_stored(garbage) is None, garbage


def test_index_sums_every_containing_network() -> None:
    rows: list[tuple[object, object, object]] = [
        ("10.0.0.0/8", 1, None), ("10.1.0.0/16", 2, None), ("10.1.2.0/24", 4, None),
        ("10.1.2.3", 8, None), ("10.1.2.3/32", 16, None), ("0.0.0.0/0", 32, None)]
    index = build_index(rows)
    assert index.count(parse_ip("10.1.2.3"), 0) == 63
    assert index.count(parse_ip("10.1.2.4"), 0) == 39
    assert index.count(parse_ip("11.0.0.1"), 0) == 32
    assert index.count(parse_ip("2001:db8::1"), 0) == 0


# ---------------------------------------------------------------------------------------------
# Missing, broken and replaced files.


async def test_missing_file(make_source: MakeSource, tmp_path: Path,
                            caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "firewall.db"
    src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
    for _ in range(4):
        result = src.count(parse_ip("203.0.113.7"))
        assert result == IncidentsResult(Status.UNKNOWN, reason="no firewall database")
        await asyncio.sleep(0.03)
    [msg] = warnings(caplog)
    assert str(db) in msg and "no such file" in msg and "??" in msg
    shutil.copyfile(NFTFW, db)  # the firewall comes along later
    await eventually(lambda: src.count(parse_ip("203.0.113.7")).count == 42)


async def test_no_database_anywhere(make_source: MakeSource, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    candidates = (tmp_path / "nftfw" / "firewall.db", tmp_path / "sympl" / "count.db")
    monkeypatch.setattr(incidents, "FIREWALL_DB_PATHS", candidates)
    with caplog.at_level(logging.INFO, logger="lookupd.incidents"):
        src = await make_source(IncidentsConfig(check_interval=0.02))
    assert src.count(parse_ip("203.0.113.7")).status is Status.UNKNOWN
    assert any("no firewall database found" in r.getMessage() for r in caplog.records)
    candidates[1].parent.mkdir()
    shutil.copyfile(SYMPL, candidates[1])
    await eventually(lambda: src.count(parse_ip("2001:db8:1:2::9")).count == 57)


@pytest.mark.parametrize("content, expect", [
    (random.Random(3).randbytes(8192), "not an sqlite database"),
    (b"SQLite format 3\x00" + random.Random(4).randbytes(8192), "not an sqlite database"),
    (b"", "no table blacklist"),
])
async def test_unreadable_file_is_unknown(make_source: MakeSource, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture, content: bytes,
                                          expect: str) -> None:
    db = tmp_path / "firewall.db"
    db.write_bytes(content)
    src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
    for _ in range(4):  # not retried (nor re-logged) until the file changes
        result = src.count(parse_ip("203.0.113.7"))
        assert result == IncidentsResult(Status.UNKNOWN, reason="firewall database unreadable")
        await asyncio.sleep(0.03)
    [msg] = warnings(caplog)
    assert str(db) in msg and expect in msg


async def test_corrupt_replacement_keeps_last_good_index(
        make_source: MakeSource, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
    assert count(src, "203.0.113.7") == 42
    bad = tmp_path / "bad.db"
    bad.write_bytes(random.Random(5).randbytes(16384))
    os.replace(bad, db)
    await eventually(lambda: bool(src.count(parse_ip("203.0.113.7")) and warnings(caplog)))
    for _ in range(4):
        assert count(src, "203.0.113.7") == 42
        await asyncio.sleep(0.03)
    [msg] = warnings(caplog)
    assert str(db) in msg and "Still answering from the copy read earlier" in msg

    good = tmp_path / "good.db"
    shutil.copyfile(NFTFW, good)
    con = sqlite3.connect(good)
    with con:
        con.execute("UPDATE blacklist SET matchcount = 43 WHERE ip = '203.0.113.7'")
    con.close()
    os.replace(good, db)
    await eventually(lambda: src.count(parse_ip("203.0.113.7")).count == 43)


async def test_wal_mode_changes_are_seen(make_source: MakeSource, tmp_path: Path) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")  # changes stay in the -wal file
        src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
        assert count(src, "203.0.113.8") == 10
        for value in (11, 12, 13):
            writer.execute("UPDATE blacklist SET matchcount = ? WHERE ip = '203.0.113.8'",
                           (value,))

            def updated(want: int = value) -> bool:
                return src.count(parse_ip("203.0.113.8")).count == want

            await eventually(updated)
        writer.execute("INSERT INTO blacklist (ip, matchcount) VALUES ('2001:db8:9::/64', 6)")
        await eventually(lambda: src.count(parse_ip("2001:db8:9::1")).count == 6)
    finally:
        writer.close()


WRITER = textwrap.dedent("""
    import os, shutil, sqlite3, sys, time
    path, rounds = sys.argv[1], int(sys.argv[2])
    def update(db, value):
        con = sqlite3.connect(db, timeout=10)
        with con:
            con.execute("UPDATE blacklist SET matchcount = ? WHERE ip = '203.0.113.7'",
                        (value,))
            con.execute("UPDATE blacklist SET first = first + 1")  # a whole-table write
        con.close()
    for i in range(rounds):
        if i % 7 == 3:  # replace the file by rename, as a rebuild would
            tmp = path + ".new"
            shutil.copyfile(path, tmp)
            update(tmp, 2042)
            os.replace(tmp, path)
        else:
            update(path, 42 if i % 2 else 1042)
        time.sleep(0.004)
    update(path, 7777)
""")


async def test_rewritten_while_queried(make_source: MakeSource, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    src = await make_source(IncidentsConfig(db=db, check_interval=0.02))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(db), "150")
    seen: set[int] = set()
    queries = 0
    try:
        while proc.returncode is None:
            result = src.count(parse_ip("203.0.113.7"))
            assert result.status is Status.FOUND, result
            assert result.count in (42, 1042, 2042, 7777), result
            assert count(src, "203.0.113.8") == 10  # untouched rows never waver
            assert count(src, "2001:db8:1:2::5") == 57
            seen.add(result.count)
            queries += 1
            try:
                await asyncio.wait_for(proc.wait(), 0.002)
            except TimeoutError:
                pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert queries > 100 and len(seen) >= 2, (queries, seen)
    await eventually(lambda: src.count(parse_ip("203.0.113.7")).count == 7777)
    assert warnings(caplog) == []


def test_file_state_sees_commits_within_one_mtime_tick(tmp_path: Path) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    before, st = file_state(db), os.stat(db)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE blacklist SET matchcount = 43 WHERE ip = '203.0.113.7'")
    con.close()
    os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: one tick
    assert os.stat(db).st_size == st.st_size
    assert file_state(db) != before  # the header's change counter moved


def test_file_state_sees_wal_commits(tmp_path: Path) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA wal_autocheckpoint = 0")
        con.execute("UPDATE blacklist SET matchcount = 1 WHERE ip = '203.0.113.7'")
        before = file_state(db)
        con.execute("UPDATE blacklist SET matchcount = 2 WHERE ip = '203.0.113.7'")
        assert file_state(db) != before
        assert file_state(db)[0] == before[0]  # the main file itself did not change
    finally:
        con.close()


def test_recently_written_file_is_read_again(tmp_path: Path) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    assert load(db, IncidentsConfig(db=db)).racy  # just written: may change within the tick
    old = time.time() - 3600
    os.utime(db, (old, old))
    assert not load(db, IncidentsConfig(db=db)).racy


async def test_sighup_reload_reads_now(make_source: MakeSource, tmp_path: Path) -> None:
    db = tmp_path / "firewall.db"
    shutil.copyfile(NFTFW, db)
    src = await make_source(IncidentsConfig(db=db, check_interval=3600))
    con = sqlite3.connect(db)
    with con:
        con.execute("DELETE FROM blacklist WHERE ip = '203.0.113.7'")
    con.close()
    assert count(src, "203.0.113.7") == 42  # next check is an hour away
    await src.reload()
    assert count(src, "203.0.113.7") == 0
