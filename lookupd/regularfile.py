"""Opening a file lookupd only reads (an allowlist, the firewall database, a GeoIP database)
without ever blocking on what someone put at the path instead: a named pipe would block
`open()` until a writer came (on the event loop, every answer with it), a device or a
directory is no list. Opened non-blocking, then refused unless it is a regular file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path | str) -> int:
    """A read-only descriptor on `path`, a regular file; OSError otherwise (its strerror says
    what the path is and what to do)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise OSError(errno.EINVAL, f"it is {what}, not a file: point the setting at the "
                                        "file itself")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_text(path: Path | str, limit: int = 1024 * 1024) -> str:
    """The text (UTF-8) of a small regular file, at most `limit` bytes; OSError as above."""
    with open(open_regular(path), encoding="utf-8", errors="replace") as fh:
        return fh.read(limit)
