"""The classic Exim `blocked_authenticated_users` lsearch file: render, write atomically, read.

An existing ACL such as
    deny authenticated = *
         condition = ${lookup{$authenticated_id}lsearch{/etc/exim4/blocked_authenticated_users}\
                     {yes}{no}}
keeps working while lookupd owns the state. Exim compares lsearch keys caselessly (ASCII).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lookupd.atomicfile import replace_file

HEADER = ("# Blocked authenticated users, one a line (Exim lsearch).\n"
          "# Written by lookupd: change it with `lookupd users block|unblock USER`;\n"
          "# edits here are overwritten.\n")

# An lsearch key ends at a colon or white space, and `#` starts a comment line; a quoted key
# (backslash escapes for `"` and `\`) may hold any of them.
_NEEDS_QUOTES = set(':"\\#')


def key(user: str) -> str:
    if not any(c in _NEEDS_QUOTES for c in user):
        return user
    return '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(users: Iterable[str]) -> str:
    return HEADER + "".join(key(user) + "\n" for user in sorted(users))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old or the new file, never a part.
    Keeps an existing file's mode."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644  # Exim (Debian-exim) must read it
    replace_file(path, text.encode("utf-8"), mode)


@dataclass(frozen=True, slots=True)
class Line:
    """One key read from an lsearch file, with its line number for messages."""

    number: int
    key: str


def parse(text: str) -> list[Line]:
    """The keys of an lsearch file: comments, blank lines and any data after the key skipped.

    Continuation lines (starting with white space) belong to the previous entry's data.
    """
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.startswith("#") or raw[0] in " \t":
            continue
        if raw.startswith('"'):
            keys.append(Line(number, _dequote(raw)))
        else:
            end = len(raw)
            for i, c in enumerate(raw):
                if c == ":" or c.isspace():
                    end = i
                    break
            keys.append(Line(number, raw[:end]))
    return keys


def _dequote(raw: str) -> str:
    out = []
    i = 1
    while i < len(raw) and raw[i] != '"':
        if raw[i] == "\\" and i + 1 < len(raw):
            i += 1
        out.append(raw[i])
        i += 1
    return "".join(out)
