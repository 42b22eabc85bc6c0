"""The DNSBL cache snapshot in state_dir: msgpack, written atomically, read back at start.

The format: {"v": 1, "entries": [[zone, type, label, status, records, reason, expires],
...]}, keys as in cache.py; decoding is pure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import msgpack

from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.cache import CacheKey
from lookupd.outcome import Status

SNAPSHOT_NAME = "dnsbl-cache.msgpack"
SNAPSHOT_VERSION = 1


def encode_snapshot(entries: Iterable[tuple[CacheKey, DnsAnswer]]) -> bytes:
    rows = [[k[0], k[1], k[2], a.status.value, list(a.records), a.reason, a.expires]
            for k, a in entries]
    data = msgpack.packb({"v": SNAPSHOT_VERSION, "entries": rows})
    assert isinstance(data, bytes)
    return data


def decode_snapshot(data: bytes, now: float) -> list[tuple[CacheKey, DnsAnswer]]:
    """Entries still valid at `now`; ValueError when `data` is not a whole, sane snapshot."""
    try:
        doc = msgpack.unpackb(data)
        if not isinstance(doc, dict) or doc.get("v") != SNAPSHOT_VERSION:
            raise ValueError("not a lookupd DNSBL cache snapshot (version 1)")
        entries: list[tuple[CacheKey, DnsAnswer]] = []
        for row in doc["entries"]:
            zone, rdtype, label, status, records, reason, expires = row
            if not all(isinstance(x, str) for x in (zone, rdtype, label, reason, *records)):
                raise ValueError("snapshot row with a non-text field")
            if isinstance(expires, bool) or not isinstance(expires, int | float):
                raise ValueError("snapshot row with a non-numeric expiry")
            if expires > now:
                entries.append(((zone, rdtype, label),
                                DnsAnswer(Status(status), tuple(records), reason,
                                          float(expires))))
        return entries
    except (TypeError, KeyError, msgpack.UnpackException) as exc:
        raise ValueError(f"corrupt snapshot ({exc.__class__.__name__})") from None


def write_atomically(path: Path, data: bytes) -> None:
    """Write temp file, fsync, rename over `path`, fsync the directory (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: after a reload the old and the new source may write at once.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
