"""The DNSBL cache snapshot is untrusted input (issue 10 item 7): only a regular file of a
size bounded by dnsbl.cache_size is read, decoded within bounds; it is written 0600 without
following a symlink."""

from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

import msgpack
import pytest

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
