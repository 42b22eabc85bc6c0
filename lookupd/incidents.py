"""Firewall incidents source: how often nftfw or Sympl/Symbiosis caught an address.

The firewall owns its sqlite database and rewrites it while lookupd runs. lookupd reads the whole
table in one read-only transaction (in a worker thread) into an in-memory index and answers from
that, synchronously; when the file changes, a background load builds a new index while the old one
keeps answering. Load times measured on the 2-core project machine: the 4,056-row nftfw test
database 6 ms; synthetic 200,000-row databases 0.34 s (nftfw) and 0.33 s (Sympl; 0.7 s with
sympl_window set, which keeps every row's timestamp). An answer then costs one dict lookup per
stored prefix length (0.5-0.8 us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sqlite3
import time
import urllib.parse
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal, TypeVar

from lookupd.config import FIREWALL_DB_PATHS, IncidentsConfig, find_existing
from lookupd.ipaddr import IPAddress
from lookupd.outcome import Status
from lookupd.regularfile import open_regular

log = logging.getLogger(__name__)

Schema = Literal["nftfw", "sympl"]

_BITS = {4: 32, 6: 128}
_V = TypeVar("_V")
_BUSY_TIMEOUT = 1.0  # seconds sqlite waits for the firewall's write lock, per attempt
_ATTEMPTS = 3  # loads tried in a row when the database is locked or changes under us
_RACY_NS = 1_000_000_000  # a file modified this recently may change again within one mtime tick


@dataclass(frozen=True)
class IncidentsResult:
    """FOUND with the count; NOT_FOUND means a count of 0; UNKNOWN: the database cannot tell.
    `until`: the count holds until then (time.time()) while the same index answers; a Sympl
    window lets older rows go (the index's `count_until`)."""

    status: Status
    count: int = 0
    reason: str = ""
    until: float = field(default=math.inf, compare=False)


# ---------------------------------------------------------------------------------------------
# Decisions over rows already read: parsing stored addresses, the index, the schema.


def parse_stored(value: object) -> tuple[int, int, int] | None:
    """(IP version, prefix length, network number) of a stored `ip` value; None for garbage.

    Accepts what firewalls have been seen to write: hosts, networks of any prefix length (nftfw
    /112, older nftfw and Sympl /64), uncompressed IPv6, hosts with /32 or /128, host bits set
    under the mask, IPv4-mapped IPv6 (stored as IPv4, as lookups see it), stray blanks.
    The network number is the address shifted right by the host bits.
    """
    if not isinstance(value, str):
        return None
    addr, slash, plen_text = value.strip().partition("/")
    try:
        if ":" in addr:
            number, bits = int.from_bytes(socket.inet_pton(socket.AF_INET6, addr), "big"), 128
        else:
            number, bits = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big"), 32
    except (OSError, ValueError):
        return None
    if not slash:
        plen = bits
    elif plen_text.isascii() and plen_text.isdigit() and int(plen_text) <= bits:
        plen = int(plen_text)
    else:
        return None
    if bits == 128 and number >> 32 == 0xFFFF and plen >= 96:
        number, bits, plen = number & 0xFFFFFFFF, 32, plen - 96
    return (4 if bits == 32 else 6), plen, number >> (bits - plen)


# One network's Sympl rows: sorted timestamps and, for each, the sum of counts from it on.
# (Plain tuples: a load builds one per stored network, and they are cheap to make.)
Timeline = tuple[tuple[float, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Index:
    """Counts by network: per IP version, (prefix length, {network number: count}) pairs.

    With a window (Sympl `sympl_window`), the values are Timelines summed at query time.
    """

    totals: dict[int, tuple[tuple[int, dict[int, int]], ...]]
    timelines: dict[int, tuple[tuple[int, dict[int, Timeline]], ...]]
    window: float
    rows: int
    skipped: int

    def count(self, ip: IPAddress, now: float) -> int:
        """Sum over every stored network containing `ip`, its own host entry included."""
        return self.count_until(ip, now)[0]

    def count_until(self, ip: IPAddress, now: float) -> tuple[int, float]:
        """`count`, and until when it holds: with a window, the count drops when the oldest
        row counted leaves it (at its timestamp + window); without one, never."""
        version = 4 if isinstance(ip, IPv4Address) else 6
        bits, number = _BITS[version], int(ip)
        total = 0
        for plen, nets in self.totals.get(version, ()):
            total += nets.get(number >> (bits - plen), 0)
        until = math.inf
        cutoff = now - self.window
        for plen, lines in self.timelines.get(version, ()):
            line = lines.get(number >> (bits - plen))
            if line is not None:
                stamps, sums_from = line
                i = bisect_left(stamps, cutoff)
                if i < len(stamps):
                    total += sums_from[i]
                    until = min(until, stamps[i] + self.window)
        return total, until


def build_index(rows: Iterable[tuple[object, object, object]], window: float = 0.0) -> Index:
    """Index rows of (ip, count, timestamp); the timestamp is only read when `window` > 0."""
    totals: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    timed: dict[tuple[int, int], dict[int, list[tuple[float, int]]]] = \
        defaultdict(lambda: defaultdict(list))
    used = skipped = 0
    for ip, count, stamp in rows:
        net = parse_stored(ip)
        if net is None or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            skipped += 1
            continue
        version, plen, number = net
        if window > 0:
            if not isinstance(stamp, int | float) or isinstance(stamp, bool):
                skipped += 1
                continue
            timed[version, plen][number].append((float(stamp), count))
        else:
            totals[version, plen][number] += count
        used += 1
    return Index(
        totals=_by_version({key: dict(nets) for key, nets in totals.items()}),
        timelines=_by_version({key: {n: _timeline(v) for n, v in nets.items()}
                               for key, nets in timed.items()}),
        window=window, rows=used, skipped=skipped)


def _timeline(rows: list[tuple[float, int]]) -> Timeline:
    if len(rows) == 1:
        return (rows[0][0],), (rows[0][1],)
    rows.sort()
    sums: list[int] = []
    running = 0
    for _, count in reversed(rows):
        running += count
        sums.append(running)
    return tuple(stamp for stamp, _ in rows), tuple(reversed(sums))


def _by_version(by_key: dict[tuple[int, int], dict[int, _V]]) -> dict[
        int, tuple[tuple[int, dict[int, _V]], ...]]:
    out: dict[int, list[tuple[int, dict[int, _V]]]] = defaultdict(list)
    for (version, plen), nets in sorted(by_key.items()):
        out[version].append((plen, nets))
    return {version: tuple(pairs) for version, pairs in out.items()}


_COLUMNS: dict[Schema, frozenset[str]] = {
    "nftfw": frozenset({"ip", "matchcount", "incidents"}),
    "sympl": frozenset({"ip", "timestamp", "count"}),
}


def detect_schema(columns: Iterable[str], setting: Literal["auto", "nftfw", "sympl"]) -> Schema:
    """The schema of table `blacklist` with these columns; ValueError says why it is neither."""
    have = {c.lower() for c in columns}
    if not have:
        raise ValueError("it has no table blacklist: is this the firewall's database?")
    choices: tuple[Schema, ...] = ("nftfw", "sympl") if setting == "auto" else (setting,)
    for schema in choices:
        if _COLUMNS[schema] <= have:
            return schema
    want = " or ".join(f"{s} ({', '.join(sorted(_COLUMNS[s]))})" for s in choices)
    raise ValueError(f"table blacklist has columns {', '.join(sorted(have))}; expected {want}")


# ---------------------------------------------------------------------------------------------
# Reading the database (runs in a worker thread).

# What tells one state of the database from the next: (st_dev, st_ino, st_size, st_mtime_ns) of
# the file, the change counter in its header (bumped by every commit in rollback-journal mode,
# even within one mtime tick), and the same stat fields of the -wal file (None without one).
FileState = tuple[tuple[int, int, int, int], int, tuple[int, int, int, int] | None]


class Unreadable(Exception):
    """The database could not be read; `transient` when trying again soon may help."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient
        self.state: FileState | None = None  # the state of the file that could not be read


@dataclass(frozen=True)
class Loaded:
    index: Index
    schema: Schema
    state: FileState
    racy: bool  # modified so recently that a further change may not show in `state`
    seconds: float


def file_state(path: Path) -> FileState:
    """Stat the database (and its -wal) and read the header's change counter; raises OSError."""
    with open(open_regular(path), "rb") as fh:
        st = os.fstat(fh.fileno())
        header = os.pread(fh.fileno(), 4, 24)
    try:
        wst = os.stat(f"{path}-wal")
        wal: tuple[int, int, int, int] | None = (wst.st_dev, wst.st_ino, wst.st_size,
                                                 wst.st_mtime_ns)
    except FileNotFoundError:
        wal = None
    return ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
            int.from_bytes(header, "big"), wal)


def load(path: Path, config: IncidentsConfig) -> Loaded:
    """Read the whole blacklist table into an Index; raise Unreadable saying why not.

    Retries a few times when the firewall holds the write lock or replaces the file meanwhile.
    """
    last: Unreadable | None = None
    for attempt in range(_ATTEMPTS):
        if attempt:
            time.sleep(0.05 * attempt)
        try:
            return _load_once(path, config)
        except Unreadable as exc:
            if not exc.transient:
                raise
            last = exc
    assert last is not None
    raise last


def _load_once(path: Path, config: IncidentsConfig) -> Loaded:
    started = time.monotonic()
    now_ns = time.time_ns()
    try:
        state = file_state(path)
    except FileNotFoundError:
        raise Unreadable("no such file") from None
    except PermissionError:
        raise Unreadable("permission denied: make it readable by the lookupd user") from None
    except OSError as exc:
        raise Unreadable(f"cannot read it: {exc.strerror}") from None
    try:
        index, schema = _read(path, config)
    except Unreadable as exc:
        exc.state = state
        raise
    # Replaced by rename meanwhile: this is a consistent read of the old file, and the next
    # check sees the new inode. Written meanwhile: the next check sees the new state.
    newest = max(state[0][3], state[2][3] if state[2] else 0)
    return Loaded(index, schema, state, newest >= now_ns - _RACY_NS, time.monotonic() - started)


def _read(path: Path, config: IncidentsConfig) -> tuple[Index, Schema]:
    uri = f"file:{urllib.parse.quote(os.fspath(path))}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT, isolation_level=None,
                              check_same_thread=False)
    except sqlite3.Error as exc:
        raise _unreadable(exc) from None
    try:
        con.execute("BEGIN")  # one read transaction: columns and rows from the same state
        columns = [row[1] for row in con.execute("PRAGMA table_info(blacklist)")]
        try:
            schema = detect_schema(columns, config.schema)
        except ValueError as exc:
            raise Unreadable(str(exc)) from None
        if schema == "nftfw":
            # The column name comes from a Literal in the config, never from outside.
            query = f"SELECT ip, {config.nftfw_column}, NULL FROM blacklist"
            window = 0.0
        else:
            query = "SELECT ip, count, timestamp FROM blacklist"
            window = config.sympl_window
        index = build_index(con.execute(query), window)
        con.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _unreadable(exc) from None
    finally:
        con.close()
    return index, schema


def _unreadable(exc: sqlite3.Error) -> Unreadable:
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    # SQLITE_BUSY / SQLITE_LOCKED: the firewall is writing; SQLITE_READONLY*: a hot journal or
    # WAL that only a writer can recover; SQLITE_CANTOPEN: replaced between stat and open.
    transient = code is not None and (code & 0xFF) in (5, 6, 8, 14)
    detail = str(exc)
    if code is not None and (code & 0xFF) in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        detail = f"{exc} (corrupt, or not an sqlite database)"
    return Unreadable(f"{detail} [{name}]", transient=transient)


# ---------------------------------------------------------------------------------------------
# The source.


@dataclass
class _Watch:
    """What the source knows about the file besides the index it answers from."""

    path: Path | None = None
    tried: FileState | None = None  # state of the last load attempt, good or bad
    retry: bool = False  # the last attempt failed for a passing reason, or the state was racy
    failing: bool = False  # a WARNING about the current failure has been logged
    next_check: float = 0.0
    closed: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class IncidentsSource:
    """Incident counts from the firewall's sqlite database, re-read when the firewall writes."""

    def __init__(self, config: IncidentsConfig) -> None:
        self._config = config
        self._loaded: Loaded | None = None
        self._reason = "firewall database not opened"
        self._watch = _Watch()

    async def open(self) -> None:
        """Find and load the database; a missing or unreadable one only logs."""
        self._watch.next_check = time.monotonic() + self._config.check_interval
        await self._load(starting=True)

    async def close(self) -> None:
        self._watch.closed = True
        task = self._watch.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loaded = None
        self._reason = "firewall database closed"

    async def reload(self) -> None:
        """SIGHUP: read the database again now."""
        task = self._watch.task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watch.next_check = time.monotonic() + self._config.check_interval
        await self._load(force=True)

    @property
    def loaded(self) -> Loaded | None:
        """The index answering now, with its schema and load time (for status output)."""
        return self._loaded

    @property
    def path(self) -> Path | None:
        """The database file configured or found (for status output)."""
        return self._find()

    @property
    def problem(self) -> str:
        """Why no index answers ("" when one does)."""
        return "" if self._loaded is not None else self._reason

    def count(self, ip: IPAddress) -> IncidentsResult:
        """How many incidents the firewall counted for `ip` (0 is NOT_FOUND)."""
        loaded = self._current()
        if loaded is None:
            return IncidentsResult(Status.UNKNOWN, reason=self._reason)
        n, until = loaded.index.count_until(ip, time.time())
        return IncidentsResult(Status.FOUND if n else Status.NOT_FOUND, n, until=until)

    def version(self) -> tuple[object, ...]:
        """Equal while the same index answers (or the same reason why none does); a count
        with a window holds only `until` its result says. Looks for changes as `count` does."""
        return (self._current(), self._reason)

    def _current(self) -> Loaded | None:
        """The index answering now; at most once per check_interval, look for a change."""
        now = time.monotonic()
        if now >= self._watch.next_check:
            self._watch.next_check = now + self._config.check_interval
            self._poll()
        return self._loaded

    def _find(self) -> Path | None:
        return find_existing(self._config.db, FIREWALL_DB_PATHS)

    def _poll(self) -> None:
        watch = self._watch
        if watch.closed or (watch.task is not None and not watch.task.done()):
            return
        path = self._find()
        if path is None:
            return
        try:
            state = file_state(path)
        except OSError:
            state = None
        if path == watch.path and state == watch.tried and not watch.retry:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the daemon's loop: nothing to schedule on
        watch.task = loop.create_task(self._load(), name="incidents-load")

    async def _load(self, *, starting: bool = False, force: bool = False) -> None:
        watch = self._watch
        path = self._find()
        if path is None:
            self._reason = "no firewall database"
            if starting:
                log.info("no firewall database found (looked for %s): the incidents verb "
                         "answers ??; set [incidents] db if your firewall keeps it elsewhere",
                         ", ".join(str(p) for p in FIREWALL_DB_PATHS))
            return
        if path != watch.path:
            watch.path, watch.tried = path, None
        try:
            loaded = await asyncio.to_thread(load, path, self._config)
        except Unreadable as exc:
            watch.tried, watch.retry = exc.state, exc.transient
            self._failed(path, str(exc), starting or force)
            return
        watch.tried, watch.retry = loaded.state, loaded.racy
        old, self._loaded = self._loaded, loaded
        self._reason = ""
        log.debug("firewall database %s read: %d entries in %.3f s", path, loaded.index.rows,
                  loaded.seconds)
        if watch.failing or old is None:
            log.info("firewall database %s (%s schema) loaded: %d entries in %.2f s%s", path,
                     loaded.schema, loaded.index.rows, loaded.seconds,
                     "" if old is None else "; the earlier problem is gone")
        watch.failing = False
        if loaded.index.skipped:
            log.debug("%s: skipped %d rows with an unreadable address or count", path,
                      loaded.index.skipped)

    def _failed(self, path: Path, problem: str, loud: bool) -> None:
        watch = self._watch
        if watch.failing and not loud:
            log.debug("firewall database %s still unreadable: %s", path, problem)
            return
        watch.failing = True
        if self._loaded is not None:
            log.warning("firewall database %s cannot be read: %s. Still answering from the copy "
                        "read earlier; lookupd tries again when the file changes", path, problem)
            return
        self._reason = "firewall database unreadable"
        if problem == "no such file":
            self._reason = "no firewall database"
        log.warning("firewall database %s cannot be read: %s. Incident answers are ?? until it "
                    "can; check [incidents] db and that the lookupd user may read the file "
                    "(lookupd tries again when it changes)", path, problem)
