"""Replies the compiled front end (lookupd/_fastpath.c) gives again without Python (issue 15).

A handler that gives a reply which the same request bytes would get again, unchanged, until
a time and while nothing it came from changes, says so with a `Keep`. The server keeps the
reply in a table the compiled front end reads when the listening socket wakes: it accepts,
reads, finds the request there, writes the reply and closes, all in C. Python sees only the
other clients (a new request, an expired reply, a request not all there).

What a reused answer would have done besides its reply is done all the same, later: each
hit is counted in the entry, and `drain` (before `metrics`, `status` and `stats` answer, when
the table is emptied, and every DRAIN_EVERY seconds) adds the hits to the metrics and gives
each `Keep.counts` the number of hits (the DNSBL figures, connect's verdict counts). A reply that
logs (a refusal) or changes state is never kept.

What keeps the table true: an entry's `expires` (the earliest TTL of the DNS answers it came
from, a window's end), checked by the C code against the clock on every hit; and the
dispatcher's token (the DNS cache's generation, the versions of the GeoIP files, the
incidents index and the list files, the strikes' changes), checked when the socket wakes
before any client is answered: when it differs, the table is emptied. A reload empties it.

Without the compiled module (a pip install without a C compiler) or with LOOKUPD_NO_FASTPATH
set, nothing is kept and every request goes through Python as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from lookupd.metrics import Metrics
from lookupd.outcome import Count

try:
    from lookupd import _fastpath  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: every request through Python
    _fastpath = None

DISABLED_BY = "LOOKUPD_NO_FASTPATH"
# Entries kept at most (each a request and its reply, a few hundred bytes); then emptied.
MAX_ENTRIES = 4096
# Longer replies are not kept: a new Unix socket's buffer takes a kept reply in one write.
MAX_REPLY = 1024
# How often hits reach the metrics and the sources' figures while no one reads them.
DRAIN_EVERY = 0.1

Serve = Callable[[int, dict[bytes, list[Any]], float, int],
                 tuple[int, list[tuple[int, bytes, bool]], int]]


def compiled() -> Serve | None:
    """The compiled front end's `serve`, or None (not built, or switched off)."""
    if _fastpath is None or os.environ.get(DISABLED_BY):
        return None
    serve: Serve = _fastpath.serve
    return serve


def describe_fastpath(on: bool) -> str:
    """For the ready line: whether the compiled front end answers, and if not, why."""
    if on:
        return "repeated lookups answered by the compiled front end"
    if _fastpath is not None:
        return f"compiled front end switched off ({DISABLED_BY} is set)"
    return ("compiled front end not built: every lookup goes through Python (slower; to build "
            "it, install gcc and python3-dev and reinstall lookupd)")


@dataclass(frozen=True, slots=True)
class Keep:
    """A handler's word on the reply it just gave: the same request gets the same reply until
    `expires` (time.time()) while the dispatcher's token stays the same; `counts` are what
    a new answer would have counted, each called with the number of reuses."""

    expires: float = float("inf")
    counts: tuple[Count, ...] = ()


ALWAYS = Keep()


class KeptReplies:
    """The table the compiled front end answers from, and what its hits still owe."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # request bytes -> [reply bytes, expires, hits, seconds]: read and counted by C.
        self.table: dict[bytes, list[Any]] = {}
        self._owed: dict[bytes, tuple[str, tuple[Count, ...]]] = {}
        self._token: Hashable = None

    def keep(self, request: bytes, verb: str, reply: bytes, keep: Keep) -> None:
        if len(reply) > MAX_REPLY or len(request) > MAX_REPLY:
            return
        if request in self.table:
            self._drain_one(request, self.table[request])
        elif len(self.table) >= MAX_ENTRIES:
            self.clear()
        self.table[request] = [reply, float(keep.expires), 0, 0.0]
        self._owed[request] = (verb, keep.counts)

    def check(self, token: Hashable) -> None:
        """Empty the table when what its replies came from may have changed."""
        if token != self._token:
            if self.table:
                self.clear()
            self._token = token

    def reset(self, token: Hashable) -> None:
        """Empty the table (a reload): what is kept from now on is kept under `token`."""
        self.clear()
        self._token = token

    def clear(self) -> None:
        self.drain()
        self.table.clear()
        self._owed.clear()

    def drain(self) -> None:
        """Count every hit not yet counted, as a new answer would have counted it."""
        for request, entry in self.table.items():
            if entry[2]:
                self._drain_one(request, entry)

    def _drain_one(self, request: bytes, entry: list[Any]) -> None:
        hits, seconds = entry[2], entry[3]
        if not hits:
            return
        entry[2], entry[3] = 0, 0.0
        verb, counts = self._owed[request]
        self.metrics.answered_many(verb, hits, seconds)
        for count in counts:
            count(hits)
