"""The DNSBL cache snapshot in state_dir: written atomically, read back within bounds.

The format is msgpack: {"v": 1, "entries": [[zone, type, label, status, records, reason,
expires], ...]}, keys as in cache.py. The file is read as untrusted input: only a regular
file no larger than `size_limit(cache_size)`, decoded one entry at a time, at most
`max_entries` of them kept (the last ones: the newest), every field bounded.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

from lookupd.atomicfile import replace_file
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.cache import CacheKey
from lookupd.outcome import Status

SNAPSHOT_NAME = "dnsbl-cache.msgpack"
SNAPSHOT_VERSION = 1

# What one entry may take on disk, on average, before the file counts as too big. Real
# entries take 40 to 150 bytes (an A answer, a TXT line, a PTR name); 1 KiB is many times
# that: a snapshot lookupd wrote itself is refused only after cache_size was cut to a small
# fraction (and is then replaced at the next snapshot).
BYTES_PER_ENTRY = 1024
MIN_LIMIT = 1 << 20
# Whatever cache_size says, no more is read: a cache that large warms up from DNS instead.
HARD_LIMIT = 256 << 20

# Bounds of the decoder. One entry must fit the buffer; a field is at most a DNS message
# (64 KiB), an answer has at most _MAX_RECORDS records; nothing else nests.
_READ_SIZE = 64 << 10
_MAX_ENTRY = 1 << 20
_MAX_FIELD = 65535
_MAX_RECORDS = 1024
# How often (in entries) the decoder looks whether it should stop.
_STOP_EVERY = 1024


def size_limit(cache_size: int) -> int:
    """The largest snapshot read for a cache of `cache_size` entries, in bytes."""
    return min(HARD_LIMIT, max(MIN_LIMIT, cache_size * BYTES_PER_ENTRY))


class Refused(Exception):
    """The path holds something that is not read as a snapshot: not a regular file, or too
    big. The message says what it is (for a log line naming the file)."""


class Corrupt(ValueError):
    """The file is not a whole, sane snapshot."""


class Stopped(Exception):
    """The reader was told to stop (lookupd closes the source while it reads)."""


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot holds that is still valid, in file order."""

    entries: list[tuple[CacheKey, DnsAnswer]]
    dropped: int = 0  # entries beyond max_entries, skipped


def encode_snapshot(entries: Iterable[tuple[CacheKey, DnsAnswer]]) -> bytes:
    rows = [[k[0], k[1], k[2], a.status.value, list(a.records), a.reason, a.expires]
            for k, a in entries]
    data = msgpack.packb({"v": SNAPSHOT_VERSION, "entries": rows})
    assert isinstance(data, bytes)
    return data


def decode_snapshot(data: bytes, now: float, *, max_entries: int | None = None) -> Snapshot:
    """The entries of `data` still valid at `now`; Corrupt (a ValueError) when `data` is not
    a whole, sane snapshot (pure)."""
    return _decode(io.BytesIO(data), now, max_entries, threading.Event())


def read_snapshot(path: Path, now: float, *, max_bytes: int, max_entries: int,
                  stop: threading.Event | None = None) -> Snapshot:
    """Read `path` (blocking; run it in a thread). Refused: not a regular file (a FIFO is
    never waited on) or larger than `max_bytes`; Corrupt (a ValueError); Stopped: `stop` set;
    OSError (FileNotFoundError): cannot read it."""
    # stat() first: a device or a FIFO is refused without being opened at all. fstat() of
    # what was opened then decides, in case the name changed in between; O_NONBLOCK makes
    # opening a FIFO return at once instead of waiting for a writer.
    _check(os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        _check(os.fstat(fd), max_bytes)
        # Never more than max_bytes, even if the file grows while it is read.
        return _decode(_Bounded(fh, max_bytes), now, max_entries, stop or threading.Event())


def _check(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise Refused(f"is {st.st_size} bytes, more than the limit of {max_bytes} bytes "
                      f"({BYTES_PER_ENTRY} per dnsbl.cache_size entry, {HARD_LIMIT} at most)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class _Bounded:
    """A file's first `limit` bytes, read as msgpack.Unpacker reads a stream."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self._fh = fh
        self._left = limit

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._fh.read(n) if n > 0 else b""
        self._left -= len(data)
        return data


def _decode(stream: BinaryIO | _Bounded, now: float, max_entries: int | None,
            stop: threading.Event) -> Snapshot:
    unpacker = msgpack.Unpacker(
        stream, read_size=_READ_SIZE, max_buffer_size=_MAX_ENTRY, max_str_len=_MAX_FIELD,
        max_bin_len=0, max_ext_len=0, max_array_len=_MAX_RECORDS, max_map_len=2)
    try:
        if (unpacker.read_map_header() != 2 or unpacker.unpack() != "v"
                or unpacker.unpack() != SNAPSHOT_VERSION or unpacker.unpack() != "entries"):
            raise Corrupt("not a lookupd DNSBL cache snapshot (version 1)")
        count = unpacker.read_array_header()
        # The entries were written oldest first: keep the last max_entries. Skipping parses
        # without building objects.
        dropped = max(0, count - max_entries) if max_entries is not None else 0
        for i in range(dropped):
            if i % _STOP_EVERY == 0 and stop.is_set():
                raise Stopped
            unpacker.skip()
        entries: list[tuple[CacheKey, DnsAnswer]] = []
        for i in range(count - dropped):
            if i % _STOP_EVERY == 0 and stop.is_set():
                raise Stopped
            entry = _entry(unpacker.unpack(), now)
            if entry is not None:
                entries.append(entry)
        try:
            unpacker.skip()
        except msgpack.OutOfData:
            return Snapshot(entries, dropped)
        raise Corrupt("data after the end of the snapshot")
    except Corrupt:
        raise
    except (TypeError, ValueError, msgpack.UnpackException) as exc:
        # Truncated (OutOfData), malformed, over a decoder limit, bad UTF-8, unknown status.
        raise Corrupt(f"corrupt snapshot ({exc.__class__.__name__})") from None


def _entry(row: object, now: float) -> tuple[CacheKey, DnsAnswer] | None:
    """One row as a cache entry, None when it has expired; Corrupt when it is malformed."""
    if not isinstance(row, list) or len(row) != 7:
        raise Corrupt("snapshot row that is not a list of 7 fields")
    zone, rdtype, label, status, records, reason, expires = row
    if not isinstance(records, list):
        raise Corrupt("snapshot row whose records are not a list")
    if not all(isinstance(x, str) for x in (zone, rdtype, label, reason, *records)):
        raise Corrupt("snapshot row with a non-text field")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise Corrupt("snapshot row with a non-numeric expiry")
    if expires <= now:
        return None
    return (zone, rdtype, label), DnsAnswer(Status(status), tuple(records), reason,
                                            float(expires))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the snapshot at `path` (blocking). The file is 0600: it shows which clients
    connected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, 0o600)
