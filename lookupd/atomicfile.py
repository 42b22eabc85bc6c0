"""Replacing a file so that a reader sees the old or the new one, never a part of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temp file beside `path`, set `mode`, fsync, rename it over `path`,
    fsync the directory (blocking: call it from a thread on the event loop's side).

    mkstemp creates the temp file with O_CREAT|O_EXCL under a random name, so a symlink
    planted there is never followed and two writers never share one; the rename moves the
    entry itself, so a symlink at `path` is replaced, not written through."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
