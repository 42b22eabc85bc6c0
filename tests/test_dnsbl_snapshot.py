"""The DNSBL cache snapshot is untrusted input (issue 10 item 7): only a regular file of a
size bounded by dnsbl.cache_size is read, decoded within bounds, and it never holds up
readiness; it is written 0600 without following a symlink. snapshot.py on its own, then
DnsblSource in-process, then real `lookupd serve` processes (rbldnsd for the warm cache)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Rbldnsd
from support import Lookupd

import lookupd.dnsbl.source as source_module
from lookupd.config import DnsblConfig, DnsblListConfig, HostPort
from lookupd.dnsbl import DnsblSource
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.snapshot import (
    HARD_LIMIT,
    MIN_LIMIT,
    SNAPSHOT_NAME,
    Corrupt,
    Refused,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    read_snapshot,
    size_limit,
    write_atomically,
)
from lookupd.outcome import Status

FOUND = Status.FOUND
LATER = time.time() + 3600  # every generated answer is still valid during the test
BL = DnsblListConfig(zone="bl.test", codes=("127.0.0.[2..11]",))
# No DNS server listens there: the source's probes fail at once, nothing is ever listed.
DEAD = (HostPort("127.0.0.1", 9),)

# How long a real `lookupd serve` may take to answer ping on this shared, loaded machine:
# starting the interpreter and importing dnspython, geoip2 and uvloop alone takes 1-2 s
# here. Before the fix a FIFO kept it from ever answering, and a 99 MB snapshot for 78 s.
READY_WITHIN = 10.0
# What the snapshot may add to DnsblSource.open() (SNAPSHOT_WAIT is 0.5 s).
OPEN_WITHIN = 2.0


def snapshot_bytes(count: int, zone: str = "bl.test", distinct: int = 65536) -> bytes:
    """A valid snapshot of `count` listings ("127.0.0.2") of labels 0000000000,
    0000000001, ... (repeating after `distinct`), made of packed pieces: 100 MB take a
    fraction of a second, where msgpack.packb of the rows would take several."""
    head = b"\x82\xa1v\x01\xa7entries\xdd" + struct.pack(">I", count)  # {"v": 1, "entries": [
    before = b"\x97" + msgpack.packb(zone) + msgpack.packb("A") + b"\xaa"  # 10-char label
    after = msgpack.packb(["found", ["127.0.0.2"], "", LATER])[1:]
    block = b"".join(before + b"%010d" % i + after for i in range(min(count, distinct)))
    whole, part = divmod(count, distinct)
    row = len(block) // min(count, distinct)
    return head + block * whole + block[:part * row]


def entries(count: int, zone: str = "bl.test") -> list[tuple[tuple[str, str, str], DnsAnswer]]:
    return [((zone, "A", f"{i:010d}"), DnsAnswer(FOUND, ("127.0.0.2",), "", LATER))
            for i in range(count)]


def warnings_about(records: list[logging.LogRecord], path: Path) -> list[str]:
    return [r.getMessage() for r in records
            if r.levelno >= logging.WARNING and str(path) in r.getMessage()]


# --- snapshot.py ------------------------------------------------------------------------------


def test_the_fast_generator_writes_the_real_format() -> None:
    # The same document (the generator always writes a 32-bit entry count).
    assert msgpack.unpackb(snapshot_bytes(3)) == msgpack.unpackb(encode_snapshot(entries(3)))
    assert decode_snapshot(snapshot_bytes(5, distinct=2), 0.0) == \
        Snapshot(entries(2) * 2 + entries(1))


def test_the_size_limit_follows_cache_size_within_bounds() -> None:
    assert size_limit(50_000) == 50_000 * 1024  # the default cache: 48.8 MiB
    assert size_limit(10) == MIN_LIMIT
    assert size_limit(10_000_000) == HARD_LIMIT


@pytest.mark.timeout(10)  # without O_NONBLOCK the FIFO case would block in open()
@pytest.mark.parametrize(("kind", "said"), [
    ("fifo", "is a FIFO, not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("symlink to a fifo", "is a FIFO, not a regular file"),
    ("symlink to a device", "is a character device, not a regular file"),
])
def test_only_a_regular_file_is_read(tmp_path: Path, kind: str, said: str) -> None:
    path = tmp_path / SNAPSHOT_NAME
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink to a fifo":
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    else:
        path.symlink_to("/dev/zero")  # read whole, it would never end
    with pytest.raises(Refused, match=said):
        read_snapshot(path, 0.0, max_bytes=MIN_LIMIT, max_entries=10)


def test_a_file_over_the_limit_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / SNAPSHOT_NAME
    path.write_bytes(snapshot_bytes(10))
    os.truncate(path, 10 * 2**30)  # 10 GiB, sparse: reading it would take a while
    with pytest.raises(Refused) as refused:
        read_snapshot(path, 0.0, max_bytes=size_limit(50_000), max_entries=50_000)
    assert str(refused.value) == (f"is {10 * 2**30} bytes, more than the limit of 51200000 "
                                  f"bytes (1024 per dnsbl.cache_size entry, {HARD_LIMIT} at "
                                  "most)")


def test_at_most_max_entries_are_kept_the_last_ones(tmp_path: Path) -> None:
    path = tmp_path / SNAPSHOT_NAME
    path.write_bytes(snapshot_bytes(1000))
    kept = read_snapshot(path, 0.0, max_bytes=MIN_LIMIT, max_entries=100)
    assert kept == Snapshot(entries(1000)[900:], dropped=900)
    assert read_snapshot(path, 0.0, max_bytes=MIN_LIMIT, max_entries=1000) == \
        Snapshot(entries(1000))


@pytest.mark.parametrize(("what", "data"), [
    ("a label longer than any DNS message", encode_snapshot([
        (("bl.test", "A", "x" * 70_000), DnsAnswer(FOUND, ("127.0.0.2",), "", LATER))])),
    ("more records than any answer has", encode_snapshot([
        (("bl.test", "A", "1"), DnsAnswer(FOUND, ("127.0.0.2",) * 2000, "", LATER))])),
    ("a map in a row", msgpack.packb({"v": 1, "entries": [{"zone": "bl.test"}]})),
    ("binary data", msgpack.packb({"v": 1, "entries": [[b"bl.test", "A", "1", "found", [],
                                                         "", LATER]]})),
    ("an unknown status", msgpack.packb({"v": 1, "entries": [["bl.test", "A", "1", "maybe",
                                                               [], "", LATER]]})),
    ("a row of 6 fields", msgpack.packb({"v": 1, "entries": [["bl.test", "A", "1", "found",
                                                               [], ""]]})),
    ("4 billion entries announced, one there",
     b"\x82\xa1v\x01\xa7entries\xdd\xff\xff\xff\xff" + snapshot_bytes(1)[16:]),
    ("another key first", msgpack.packb({"entries": [], "v": 1})),
    ("a third key", msgpack.packb({"v": 1, "entries": [], "more": 1})),
    ("data after the end", encode_snapshot(entries(3)) + b"\x90"),
    ("cut short", encode_snapshot(entries(3))[:-1]),
])
def test_the_decoder_refuses_what_lookupd_never_writes(what: str, data: bytes) -> None:
    with pytest.raises(Corrupt):
        decode_snapshot(data, 0.0, max_entries=10)


def test_the_snapshot_is_written_0600_and_replaces_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink at the snapshot's name is replaced, not written through; the temp file is
    made with O_EXCL (mkstemp) and chmod-ed through its descriptor, never by name."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = state / SNAPSHOT_NAME
    path.symlink_to(victim)
    old = os.umask(0)
    try:
        write_atomically(path, encode_snapshot(entries(3)))
    finally:
        os.umask(old)
    assert victim.read_text() == "precious\n"
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert decode_snapshot(path.read_bytes(), 0.0) == Snapshot(entries(3))
    assert sorted(p.name for p in state.iterdir()) == [SNAPSHOT_NAME]  # no temp file left


# --- DnsblSource in-process --------------------------------------------------------------------

OpenSource = Callable[..., Awaitable[DnsblSource]]


@pytest.fixture
async def open_source(tmp_path: Path) -> AsyncIterator[OpenSource]:
    """Open DnsblSources on a resolver that is not there (the snapshot is all they know)."""
    opened: list[DnsblSource] = []

    async def start(*lists: DnsblListConfig, state: Path, **settings: object) -> DnsblSource:
        config = DnsblConfig(lists=lists, nameservers=DEAD, deadline=0.5,
                             **settings)  # type: ignore[arg-type]
        source = DnsblSource(config, state)
        opened.append(source)
        await source.open()
        return source

    yield start
    for source in opened:
        await source.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def held_reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The real read_snapshot, held back until the event is set: a disk that hangs."""
    release = threading.Event()

    def held(*args: object, **kwargs: object) -> Snapshot:
        release.wait(30)
        return read_snapshot(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(source_module, "read_snapshot", held)
    yield release
    release.set()


async def wait_for_entries(source: DnsblSource, count: int) -> None:
    """Wait (10 s at most) for the snapshot loading in the background to join the cache."""
    for _ in range(200):
        if source.stats().cache_entries:
            break
        await asyncio.sleep(0.05)
    assert source.stats().cache_entries == count


async def test_open_neither_waits_on_a_fifo_nor_keeps_it(
        open_source: OpenSource, state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = state / SNAPSHOT_NAME
    os.mkfifo(path)
    caplog.set_level(logging.WARNING, logger="lookupd")
    started = time.monotonic()
    source = await asyncio.wait_for(open_source(BL, state=state), 10)
    assert time.monotonic() - started < OPEN_WITHIN
    [warning] = warnings_about(caplog.records, path)
    assert warning == (f"the DNSBL cache snapshot {path} is a FIFO, not a regular file: not "
                       "read, starting with an empty cache; remove it (lookupd writes a new "
                       "one on stop and every dnsbl.snapshot_interval)")
    await source.close()
    assert stat.S_ISREG(path.lstat().st_mode)  # replaced by a real snapshot
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600


async def test_a_hanging_read_does_not_hold_up_open_and_joins_the_cache_later(
        open_source: OpenSource, state: Path, held_reader: threading.Event) -> None:
    (state / SNAPSHOT_NAME).write_bytes(snapshot_bytes(300))
    started = time.monotonic()
    source = await asyncio.wait_for(open_source(BL, state=state), 10)
    assert time.monotonic() - started < OPEN_WITHIN
    assert source.stats().cache_entries == 0
    held_reader.set()
    await wait_for_entries(source, 300)


async def test_a_stop_during_the_load_leaves_the_snapshot_as_it_was(
        open_source: OpenSource, state: Path, held_reader: threading.Event) -> None:
    """The cache holds less than the file while it loads: it is not written over it."""
    path = state / SNAPSHOT_NAME
    data = snapshot_bytes(300)
    path.write_bytes(data)
    source = await open_source(BL, state=state, snapshot_interval=0.05)
    await asyncio.sleep(0.3)  # several snapshot intervals
    await source.close()
    assert path.read_bytes() == data


async def test_a_reload_during_the_load_loads_the_snapshot_itself(
        open_source: OpenSource, state: Path, held_reader: threading.Event) -> None:
    """The running source had not loaded the snapshot yet when it handed over its cache: the
    new one loads it, and the old one, stopped while loading, leaves the file alone."""
    path = state / SNAPSHOT_NAME
    data = snapshot_bytes(300)
    path.write_bytes(data)
    first = await open_source(BL, state=state)
    second = DnsblSource(DnsblConfig(lists=(BL,), nameservers=DEAD, deadline=0.5), state)
    second.take_over(first)
    try:
        await second.open()
        await first.close()
        assert path.read_bytes() == data
        held_reader.set()
        await wait_for_entries(second, 300)
    finally:
        await second.close()


async def test_only_the_configured_lists_and_cache_size_entries_are_loaded(
        open_source: OpenSource, state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = state / SNAPSHOT_NAME
    path.write_bytes(encode_snapshot(entries(50, "gone.test") + entries(500)))
    caplog.set_level(logging.INFO, logger="lookupd")
    source = await open_source(BL, state=state, cache_size=200)
    assert source.stats().cache_entries == 200
    assert f"DNSBL cache snapshot {path}: 200 answers loaded in " in caplog.text
    assert ", 350 more than dnsbl.cache_size dropped" in caplog.text
    await source.close()
    assert decode_snapshot(path.read_bytes(), 0.0) == Snapshot(entries(500)[300:])


# --- real `lookupd serve` processes ---------------------------------------------------------


def start_with_snapshot(start_lookupd: StartLookupd, state: Path,
                        config: str = "") -> tuple[Lookupd, float]:
    """Start lookupd on `state` (holding the snapshot); return it and the seconds until it
    answered ping."""
    started = time.monotonic()
    daemon = start_lookupd(config, "--state-dir", str(state), wait=False)
    daemon.wait_ready(timeout=60)
    return daemon, time.monotonic() - started


def peak_rss_kib(daemon: Lookupd) -> int:
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines()
                    if line.startswith("VmHWM:")).split()[1])


def log_warnings(daemon: Lookupd, path: Path) -> list[str]:
    return [line for line in daemon.log().splitlines()
            if " WARNING " in line and str(path) in line]


def test_lookupd_is_ready_at_once_with_a_fifo_as_snapshot(start_lookupd: StartLookupd,
                                                          state: Path) -> None:
    path = state / SNAPSHOT_NAME
    os.mkfifo(path)
    daemon, elapsed = start_with_snapshot(start_lookupd, state)
    assert elapsed < READY_WITHIN
    [warning] = log_warnings(daemon, path)
    assert "is a FIFO, not a regular file: not read" in warning
    assert daemon.stop() == 0
    assert stat.S_ISREG(path.lstat().st_mode)  # a real snapshot in its place


def test_lookupd_is_ready_at_once_with_a_100_mb_snapshot(start_lookupd: StartLookupd,
                                                         state: Path) -> None:
    """A valid snapshot of 2 million answers, 100 MB, twice the limit for the default
    cache_size (50000): not read. Before the fix lookupd took 78 s and 1.4 GB to be ready
    with such a file."""
    path = state / SNAPSHOT_NAME
    path.write_bytes(snapshot_bytes(2_050_000))
    size = path.stat().st_size
    assert size > 100_000_000
    daemon, elapsed = start_with_snapshot(start_lookupd, state)
    assert elapsed < READY_WITHIN
    [warning] = log_warnings(daemon, path)
    assert f"is {size} bytes, more than the limit of 51200000 bytes" in warning
    assert "remove it" in warning
    # An idle lookupd peaks at about 35 MiB; holding the file's bytes alone would take it
    # past its size (94 MiB), decoding it past a gigabyte.
    assert peak_rss_kib(daemon) < 90 * 1024
    assert daemon.query("stats").startswith("dnsbl_cache=0/50000 ")


def test_lookupd_keeps_cache_size_entries_of_a_longer_snapshot(start_lookupd: StartLookupd,
                                                               state: Path) -> None:
    path = state / SNAPSHOT_NAME
    path.write_bytes(snapshot_bytes(1000))
    daemon, elapsed = start_with_snapshot(
        start_lookupd, state, '[dnsbl]\nnameservers = ["127.0.0.1:9"]\ncache_size = 100\n'
                              '[[dnsbl.list]]\nzone = "bl.test"\n')
    assert elapsed < READY_WITHIN
    assert daemon.query("stats").startswith("dnsbl_cache=100/100 ")
    assert "100 answers loaded in " in daemon.log()
    assert "900 more than dnsbl.cache_size dropped" in daemon.log()
    assert log_warnings(daemon, path) == []


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rbldnsd]:
    if not Path(RBLDNSD).exists():
        pytest.skip("rbldnsd is not installed")
    server = Rbldnsd(tmp_path_factory.mktemp("snaprbl")).start()
    yield server
    server.stop()


def test_lookupd_answers_from_a_normal_snapshot_without_asking(
        start_lookupd: StartLookupd, state: Path, rbl: Rbldnsd) -> None:
    """192.0.2.200 is not in bl.test; the snapshot says it is: the answer comes from it."""
    expires = time.time() + 600
    (state / SNAPSHOT_NAME).write_bytes(encode_snapshot([
        (("bl.test", "A", "200.2.0.192"), DnsAnswer(FOUND, ("127.0.0.3",), "", expires)),
        (("bl.test", "TXT", "200.2.0.192"), DnsAnswer(FOUND, ("From the snapshot",), "",
                                                      expires)),
    ]))
    daemon, elapsed = start_with_snapshot(
        start_lookupd, state, f'[dnsbl]\nnameservers = ["127.0.0.1:{rbl.port}"]\n'
                              'deadline = "2s"\n[[dnsbl.list]]\nzone = "bl.test"\n'
                              'codes = ["127.0.0.[2..11]"]\n'
                              # a test list: asked about documentation addresses too
                              'query_special = true\n')
    assert elapsed < READY_WITHIN
    assert daemon.query("dnsbl 192.0.2.200") == (
        'verdict=listed score=1 lists=bl.test:127.0.0.3 unknown="" '
        'text="bl.test: From the snapshot" skipped=""')
    assert rbl.queries("200.2.0.192.bl.test") == []
    assert rbl.queries("2.0.0.127.bl.test")  # the list was probed through rbldnsd
