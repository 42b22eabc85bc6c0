"""The wire protocol: bytes in, a typed request out; reply text out. No I/O here.

One request per connection: ``VERB [ARG ...]`` in printable ASCII, words separated by spaces
or tabs, ended by ``\\n``, ``\\r\\n`` or EOF (Exim half-closes after its single write, see
shared/docs/exim-readsocket.md section 3). At most MAX_REQUEST bytes. The reply is one line
with **no trailing newline**: Exim keeps a newline in its result (section 4), so
``${readsocket{SOCK}{country $sender_host_address}}`` yields exactly ``GB``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from lookupd.errors import BadRequest

MAX_REQUEST = 512
# After an oversized request lookupd keeps reading (and dropping) up to this much, so that the
# client's write completes before the close (an early close races Exim's write: EPIPE -> DEFER).
MAX_DISCARD = 64 * 1024

# Replies lookupd sends for a request it cannot take. Documented in the README.
ERR_EMPTY = "error empty request"
ERR_TOO_LONG = f"error request longer than {MAX_REQUEST} bytes"
ERR_NOT_ASCII = "error request is not printable ASCII"
ERR_TIMEOUT = "error request not received in time"
ERR_INTERNAL = "error internal error, see the lookupd log"

# Every verb lookupd answers: its usage and what it answers (README "The protocol" says more).
# dispatch.py answers exactly these; `lookupd query --help` lists them.
VERBS: dict[str, tuple[str, str]] = {
    "ping": ("ping", "pong: lookupd is answering"),
    "version": ("version", "lookupd's version"),
    "country": ("country IP", "ISO country code; -- none; ?? unknown"),
    "asn": ("asn IP", "AS number and organisation"),
    "incidents": ("incidents IP", "the firewall database's incident count"),
    "dnsbl": ("dnsbl IP", "the DNS block lists' verdict (key=value pairs)"),
    "dbl": ("dbl DOMAIN", "the domain lists' verdict (key=value pairs)"),
    "sender": ("sender [DOMAIN|ADDRESS]", "the domain lists' verdict on a MAIL FROM domain"),
    "ptr": ("ptr IP", "reverse name and whether it resolves back"),
    "stats": ("stats", "the DNS lists' figures"),
    "connect": ("connect IP [PORT] [HELO]", "every fact and lookupd's verdict on a client"),
    "helo": ("helo IP OURNAME OURADDR HELO", "the HELO policy's verdict (key=value pairs)"),
    "strike": ("strike IP KIND [COUNT] [KIND [COUNT]]...",
               "record COUNT (default 1) failed AUTHs (auth), invalid recipients (rcpt) or "
               "protocol errors (proto) of a client; strikes=N after"),
    "user": ("user USER", "ok, or blocked - since=... reason=..."),
    "user-fail": ("user-fail USER [RECIPIENT]", "record an invalid recipient; the state after"),
    "user-block": ("user-block USER [REASON]", "block a user (root or users.admin_group)"),
    "user-unblock": ("user-unblock USER", "unblock a user (root or users.admin_group)"),
    "reload": ("reload", "reload the configuration and say whether it was taken (root, "
                         "lookupd's user or users.admin_group)"),
    "status": ("status", "lookupd's state as one line of JSON (lookupd status shows it)"),
    "metrics": ("metrics", "the metrics in Prometheus' text format (several lines)"),
}

_PRINTABLE = re.compile(rb"[\x20-\x7e\t]*")
_MAX_SHOWN = 40  # longest piece of client text echoed in an error reply


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: the verb in lower case and its arguments as given."""

    verb: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent a request. uid/gid/pid come from SO_PEERCRED on the Unix socket only."""

    transport: Literal["unix", "tcp"]
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None


def request_end(buffer: bytes | bytearray) -> int:
    """Index of the newline that ends the request in `buffer`, or -1 while it is incomplete."""
    return buffer.find(b"\n")


def parse_request(data: bytes | bytearray) -> Request:
    """Parse one request (without or with its line end). Raises BadRequest with the reply."""
    if len(data) > MAX_REQUEST:
        raise BadRequest(ERR_TOO_LONG)
    return _parse(bytes(data))


@functools.lru_cache(maxsize=4096)  # Exim asks the same questions of the same clients
def _parse(line: bytes) -> Request:
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if not _PRINTABLE.fullmatch(line):
        raise BadRequest(ERR_NOT_ASCII)
    words = line.decode("ascii").split()
    if not words:
        raise BadRequest(ERR_EMPTY)
    return Request(words[0].lower(), tuple(words[1:]))


def shown(text: str) -> str:
    """Client text made safe to echo in a reply or a log line: printable, short."""
    clean = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    return clean if len(clean) <= _MAX_SHOWN else clean[: _MAX_SHOWN - 3] + "..."


def error_reply(reason: str) -> str:
    """`error <reason>`, the reply to any request lookupd cannot answer as asked."""
    return f"error {reason}"


class Document(str):
    """A reply of several lines, for people and tools, never for Exim (`metrics`)."""


def check_reply(reply: str) -> bytes:
    """Encode a reply for the wire; a reply must be one printable ASCII line (a Document may
    have several)."""
    data = reply.encode("ascii", "replace")
    if isinstance(reply, Document):
        return data
    if b"\n" in data or b"\r" in data:
        raise ValueError(f"reply contains a line break: {reply!r}")
    return data
