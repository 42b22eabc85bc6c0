"""Pure decisions for user blocks: valid names, when a user is blocked, who may administer,
and the reply text Exim reads with ${extract}. No I/O here.
"""

from __future__ import annotations

import enum
import math
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from lookupd.errors import BadRequest
from lookupd.outcome import Status

# $authenticated_id is whatever the client typed in AUTH: bound it before it reaches sqlite,
# logs or mail headers.
MAX_NAME_BYTES = 256
# RFC 5321 4.5.3.1: 64 octets of local part, 255 of domain.
MAX_RECIPIENT_CHARS = 320
MAX_REASON_CHARS = 200

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Block:
    """One blocked user: since when (Unix time), why, how many events, and who blocked."""

    user: str
    since: float
    reason: str
    count: int = 0
    by: str = "lookupd"


@dataclass(frozen=True, slots=True)
class UserStatus:
    """A user's state. FOUND: blocked (block set); NOT_FOUND: may send; UNKNOWN: the state
    could not be stored or read (`problem` says why), which the user verbs answer as `ok`.
    """

    status: Status
    user: str
    block: Block | None = None
    # Events in the window after a user-fail (0 for the other verbs).
    count: int = 0
    problem: str = ""

    @property
    def blocked(self) -> bool:
        return self.status is Status.FOUND


def ok(user: str, count: int = 0) -> UserStatus:
    return UserStatus(Status.NOT_FOUND, user, count=count)


def blocked(block: Block, count: int = 0) -> UserStatus:
    return UserStatus(Status.FOUND, block.user, block=block, count=count)


def unknown(user: str, problem: str) -> UserStatus:
    return UserStatus(Status.UNKNOWN, user, problem=problem)


# --- names ---------------------------------------------------------------------------------


def fold(name: str) -> str:
    """ASCII-only lower case: what Exim's caseless compares and lsearch keys do."""
    return name.translate(_ASCII_LOWER)


def check_name(raw: str, *, case_insensitive: bool) -> str:
    """The stored form of a user name, or BadRequest saying what is wrong with it.

    No spaces, no control, format or separator characters (they would split the request
    line, forge log lines or mail headers), at most MAX_NAME_BYTES of UTF-8.
    """
    if not raw:
        raise BadRequest("empty user name")
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a lossy decode
        raise BadRequest("user name is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise BadRequest(f"user name longer than {MAX_NAME_BYTES} bytes")
    # str.isprintable() is False for Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs except " ".
    if " " in raw or not raw.isprintable():
        raise BadRequest("user name contains a space or a control character")
    return fold(raw) if case_insensitive else raw


def clean_text(raw: str, limit: int) -> str:
    """Client or admin text made safe to store, log and mail: printable, one line, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_recipient(raw: str | None) -> str | None:
    """A recipient as recorded: never rejected (the event must count), only made harmless."""
    if not raw:
        return None
    return clean_text(raw.replace(" ", "?"), MAX_RECIPIENT_CHARS)


def clean_reason(words: Iterable[str]) -> str:
    return clean_text(" ".join(words), MAX_REASON_CHARS)


# --- blocking ------------------------------------------------------------------------------


class FailOutcome(enum.Enum):
    """What one more invalid-recipient event means for the user."""

    OK = "ok"
    NEWLY_BLOCKED = "newly_blocked"
    STILL_BLOCKED = "still_blocked"


def after_fail(count_in_window: int, limit: int, already_blocked: bool) -> FailOutcome:
    """Reaching `limit` events in the window blocks; a blocked user stays blocked."""
    if already_blocked:
        return FailOutcome.STILL_BLOCKED
    return FailOutcome.NEWLY_BLOCKED if count_in_window >= limit else FailOutcome.OK


def window_text(seconds: float) -> str:
    """3600 -> "1h", 5400 -> "1h30m", 90 -> "1m30s", 0.5 -> "0.5s"."""
    if seconds < 1 or seconds != math.floor(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def block_reason(count: int, window: float) -> str:
    noun = "recipient" if count == 1 else "recipients"
    return f"{count} invalid {noun} in {window_text(window)}"


def command(action: str, user: str) -> str:
    """`lookupd users ACTION USER` as a line an admin may paste into a shell: the name is
    shell-quoted (it is whatever the client typed: `;`, `$(...)`, quotes all pass ${escape:}),
    after `--` when it starts with `-` so that argparse does not take it for an option."""
    return f"lookupd users {action} {'-- ' if user.startswith('-') else ''}{shlex.quote(user)}"


def may_administer(uid: int | None, groups: frozenset[int], admin_gid: int | None) -> bool:
    """user-block / user-unblock: root, or a member of the admin group. No uid (TCP): never."""
    if uid is None:
        return False
    if uid == 0:
        return True
    return admin_gid is not None and admin_gid in groups


# --- reply text ----------------------------------------------------------------------------


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quote_value(text: str) -> str:
    """A double-quoted ${extract} value in printable ASCII.

    Exim's expand_getkeyed reads a quoted value with string_dequote, which undoes `\\"`,
    `\\\\` and `\\xHH` (at most two hex digits), so any UTF-8 text survives the round trip.
    """
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "replace"))
    out.append('"')
    return "".join(out)


def render_block(block: Block) -> str:
    """`blocked - since=... reason="..."`.

    The `-` is there on purpose: Exim's ${extract} takes a bare first word as a key whose value
    is the next token, so without it `${extract{since}{...}}` would come back empty. With it,
    `${extract{blocked}{$value}{yes}{no}}` is yes, and since/reason read as expected.
    """
    return f"blocked - since={iso_utc(block.since)} reason={quote_value(block.reason)}"


def render_check(result: UserStatus) -> str:
    """Reply to `user` and `user-fail`: `ok` or `blocked ...`. UNKNOWN fails open: `ok`
    (the problem was logged loudly; blocking everyone on a full disk would be worse).
    """
    if result.status is Status.FOUND and result.block is not None:
        return render_block(result.block)
    return "ok"


def render_admin(result: UserStatus) -> str:
    """Reply to `user-block` / `user-unblock`: the state after it, or `error ...`."""
    if result.status is Status.UNKNOWN:
        return f"error {clean_text(result.problem, 80).encode('ascii', 'replace').decode()}"
    return render_check(result)
