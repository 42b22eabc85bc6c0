"""The users.sqlite state: schema, the transactions on it, and the one writer thread.

The functions taking a `sqlite3.Connection` are plain and synchronous: the daemon runs them on
its writer thread, `lookupd users` runs them directly (WAL lets both work at once). Every value
goes in as a parameter, never into the SQL text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import queue
import shlex
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from lookupd.users.decide import Block, FailOutcome, after_fail, block_reason

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "users.sqlite"
SCHEMA_VERSION = 2
# How long a connection waits for another one's write lock (the CLI beside the daemon).
BUSY_TIMEOUT_MS = 5000
# How many recipients a new block carries into the admin's mail.
SAMPLE_RECIPIENTS = 5
# Events older than the window are deleted at most this often (one indexed DELETE).
PRUNE_EVERY = 60.0
# One group commit takes at most this many queued operations.
BATCH_MAX = 512
# The state holds account names and the addresses they tried: for lookupd's user and root only,
# whatever the umask. The directory as StateDirectoryMode= in systemd/lookupd.service (lookupd's
# group may list it; the DNSBL cache snapshot beside it is 0640), the sqlite files 0600.
DIR_MODE = 0o750
FILE_MODE = 0o600
# Modes secure() could not change, already logged: the writer reopens every 30s.
_reported: set[str] = set()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user TEXT NOT NULL,
    at REAL NOT NULL,
    recipient TEXT,
    -- "HOST:ID", the event's member in Redis ([cluster]); NULL on one host.
    eid TEXT
);
CREATE INDEX IF NOT EXISTS events_user_at ON events (user, at);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS blocks (
    user TEXT PRIMARY KEY,
    since REAL NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,
    by TEXT NOT NULL,
    -- 0 until notify_command took the admin's mail (re-sent after a restart).
    notified INTEGER NOT NULL DEFAULT 0,
    recipients TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS history (
    user TEXT NOT NULL,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_user_at ON history (user, at);
"""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailRecord:
    """What one user-fail did: the count in the window and the block, if any."""

    outcome: FailOutcome
    count: int
    block: Block | None
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float
    action: str
    reason: str
    by: str


@dataclass(frozen=True, slots=True)
class EventEntry:
    at: float
    recipient: str | None
    # "HOST:ID" with [cluster]: the host that saw it.
    eid: str | None = None

    @property
    def host(self) -> str:
        return self.eid.rpartition(":")[0] if self.eid else ""


# --- connection ----------------------------------------------------------------------------


def db_path(state_dir: Path) -> Path:
    return state_dir / DB_NAME


def state_files(path: Path) -> tuple[Path, Path, Path]:
    """The database and the two files sqlite keeps beside it in WAL mode."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def secure(path: Path) -> tuple[list[str], list[str]]:
    """Create the state directory (DIR_MODE) and an empty database (FILE_MODE) if missing, and
    take group write and all access by others from existing ones. What was changed and what
    could not be, for one WARNING.

    sqlite creates -wal and -shm with the database's mode, so a 0600 database covers them; the
    mode is set with fchmod, not a umask (process-wide, and the daemon has threads).
    """
    changed: list[str] = []
    stuck: list[str] = []
    directory = path.parent
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=DIR_MODE)  # the umask can only take bits away
    except FileExistsError:
        _tighten(directory, DIR_MODE | stat.S_ISGID, changed, stuck)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        for name in state_files(path):
            _tighten(name, FILE_MODE, changed, stuck)
    else:
        try:
            os.fchmod(fd, FILE_MODE)  # a umask such as 0277 would leave it unwritable
        finally:
            os.close(fd)  # sqlite takes an empty file for an empty database
    return changed, stuck


def _tighten(name: Path, keep: int, changed: list[str], stuck: list[str]) -> None:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX:
        # A shared directory such as /tmp: its mode is not lookupd's to change.
        stuck.append(f"{name} is a shared directory (mode {mode:04o}); give lookupd a "
                     f"state_dir of its own")
        return
    wanted = mode & keep
    if wanted == mode:
        return
    try:
        os.chmod(name, wanted)
    except OSError as exc:
        stuck.append(f"{name} is {mode:04o} and cannot be made {wanted:04o} "
                     f"({exc.strerror or exc})")
    else:
        changed.append(f"{name} {mode:04o} -> {wanted:04o}")


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the state for writing: WAL, and every commit synced.

    synchronous=FULL makes each commit fsync the WAL, so an answered block survives a power
    cut too (a kill -9 loses nothing committed at any level). sqlite refuses to change the
    level inside a transaction, so it is FULL for all; group commit keeps that cheap.
    """
    changed, stuck = secure(path)
    stuck = [note for note in stuck if note not in _reported]
    _reported.update(stuck)
    if changed or stuck:
        log.warning("users: the user state (account names and the recipients they tried) is "
                    "for lookupd's user and root only; tightening modes: %s",
                    "; ".join(changed + stuck))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.OperationalError(
                f"{path} has schema version {version}, newer than this lookupd "
                f"({SCHEMA_VERSION}); upgrade lookupd or move the file away")
        if version < SCHEMA_VERSION:
            # One transaction, so a CLI creating the file at the same moment is harmless.
            # Version 1 lacks events.eid; CREATE TABLE IF NOT EXISTS would not add it.
            migrate = "ALTER TABLE events ADD COLUMN eid TEXT;" if version == 1 else ""
            conn.executescript(f"BEGIN IMMEDIATE; {migrate} {_SCHEMA} "
                               f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


def check_writable(conn: sqlite3.Connection) -> None:
    """SQLITE_READONLY now, not at the first block: sqlite opens a file it may not write
    read-only without a word (say a -wal left root's by a kill -9 of a lookupd run as root).
    A write statement that changes nothing needs the write lock and a writable file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE blocks SET notified = notified WHERE 0")
    finally:
        conn.execute("ROLLBACK")


def explain(path: Path, exc: BaseException, doing: str = "write") -> str:
    """`cannot write PATH: ERROR; WHAT TO DO`: the error, the state files this process may not
    use (with owner and mode) and the command that fixes them, else the likely fix."""
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, sqlite3.Error) else str(exc)
    return f"cannot {doing} {path}: {error}; {_advice(path, error)}"


def _advice(path: Path, error: str) -> str:
    me = _user_name(os.geteuid())
    refused: list[tuple[Path, os.stat_result | None]] = []
    needs = [(path.parent, os.W_OK | os.X_OK)] + [(f, os.R_OK | os.W_OK)
                                                   for f in state_files(path)]
    for name, need in needs:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        except OSError:
            refused.append((name, None))
            continue
        if not os.access(name, need):
            refused.append((name, st))
    if refused:
        shown = ", ".join(
            f"{name} (unreachable)" if st is None else
            f"{name} (owner {_user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"
            for name, st in refused)
        names = [str(name) for name, _ in refused]
        if all(st is not None and st.st_uid == os.geteuid() for _, st in refused):
            fix = "run: " + shlex.join(["chmod", "u+rwX", *names])
        else:
            fix = "as root run: " + shlex.join(["chown", me, *names])
        return f"lookupd runs as {me} and may not write {shown}; {fix}"
    lower = error.lower()
    if "full" in lower or "no space" in lower or "quota" in lower:
        return f"free some space on the file system of {path.parent}"
    if "locked" in lower or "busy" in lower:
        return ("another process holds its write lock (a `lookupd users` command, or a second "
                "lookupd with the same state_dir)")
    if "malformed" in lower or "not a database" in lower:
        return (f"the file is damaged: stop lookupd and restore {path.name} from a backup, or "
                "move it aside with its -wal and -shm files (its blocks are lost)")
    return f"check the permissions and the free space of {path.parent}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open existing state for reading only, as a last resort when it cannot be written.

    `immutable=1` also works in a read-only directory, where WAL cannot create its -shm file.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        return _probe(sqlite3.connect(uri, uri=True, isolation_level=None))
    except sqlite3.Error:
        return _probe(sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None))


def _probe(conn: sqlite3.Connection) -> sqlite3.Connection:
    try:
        conn.execute("SELECT count(*) FROM blocks").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection (the CLI) committed since the last call."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


# --- transactions (called inside BEGIN ... COMMIT) ----------------------------------------


def _block_from_row(row: tuple[Any, ...]) -> Block:
    return Block(user=row[0], since=row[1], reason=row[2], count=row[3], by=row[4])


def load_blocks(conn: sqlite3.Connection) -> dict[str, Block]:
    rows = conn.execute("SELECT user, since, reason, count, by FROM blocks").fetchall()
    return {row[0]: _block_from_row(row) for row in rows}


def get_block(conn: sqlite3.Connection, user: str) -> Block | None:
    row = conn.execute("SELECT user, since, reason, count, by FROM blocks WHERE user = ?",
                       (user,)).fetchone()
    return None if row is None else _block_from_row(row)


def record_fail(conn: sqlite3.Connection, user: str, recipient: str | None, *, now: float,
                window: float, limit: int, eid: str | None = None,
                by: str = "lookupd") -> FailRecord:
    """Record one invalid-recipient event; block the user when the window holds `limit`."""
    conn.execute("INSERT INTO events (user, at, recipient, eid) VALUES (?, ?, ?, ?)",
                 (user, now, recipient, eid))
    existing = get_block(conn, user)
    if existing is not None:
        # Kept for `lookupd users history`, not counted: a blocked spammer who carries on
        # would make every count longer.
        return FailRecord(FailOutcome.STILL_BLOCKED, existing.count, existing)
    count = conn.execute("SELECT count(*) FROM events WHERE user = ? AND at > ?",
                         (user, now - window)).fetchone()[0]
    outcome = after_fail(count, limit, False)
    if outcome is FailOutcome.OK:
        return FailRecord(outcome, count, None)
    recipients = recent_recipients(conn, user, now - window)
    block = Block(user, now, block_reason(count, window), count, by)
    conn.execute("INSERT INTO blocks (user, since, reason, count, by, notified, recipients) "
                 "VALUES (?, ?, ?, ?, ?, 0, ?)",
                 (user, now, block.reason, count, block.by, "\n".join(recipients)))
    _history(conn, user, now, "block", block.reason, block.by)
    return FailRecord(outcome, count, block, recipients)


def record_event(conn: sqlite3.Connection, user: str, recipient: str | None, *, now: float,
                 eid: str) -> None:
    """Journal one event that Redis counted ([cluster]): the count and the block came from
    there."""
    conn.execute("INSERT INTO events (user, at, recipient, eid) VALUES (?, ?, ?, ?)",
                 (user, now, recipient, eid))


def adopt_block(conn: sqlite3.Connection, block: Block, *, unblocked_after: bool = True,
                notified: bool = True) -> bool:
    """Take a block made on another host (or by Redis' count) into this host's journal,
    unless an unblock here is newer. Whether it is new here."""
    if get_block(conn, block.user) is not None:
        return False
    if unblocked_after:
        row = conn.execute("SELECT max(at) FROM history WHERE user = ? AND action = 'unblock'",
                           (block.user,)).fetchone()
        if row[0] is not None and row[0] >= block.since:
            return False
    conn.execute("INSERT INTO blocks (user, since, reason, count, by, notified) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (block.user, block.since, block.reason, block.count, block.by, int(notified)))
    _history(conn, block.user, block.since, "block", block.reason, block.by)
    return True


def adopt_unblock(conn: sqlite3.Connection, user: str, *, at: float, by: str) -> bool:
    """An unblock made on another host at `at`: a block here made later stays."""
    existing = get_block(conn, user)
    if existing is None or existing.since > at:
        return False
    return clear_block(conn, user, now=at, by=by)


def window_events(conn: sqlite3.Connection, *, after: float) -> dict[str, list[tuple[float, str]]]:
    """This host's events in the window that Redis may not have seen, by user: (at, eid)."""
    rows = conn.execute("SELECT user, at, eid FROM events WHERE at > ? AND eid IS NOT NULL "
                        "ORDER BY user, at", (after,)).fetchall()
    found: dict[str, list[tuple[float, str]]] = {}
    for user, at, eid in rows:
        found.setdefault(user, []).append((at, eid))
    return found


def last_unblocks(conn: sqlite3.Connection) -> dict[str, float]:
    rows = conn.execute("SELECT user, max(at) FROM history WHERE action = 'unblock' "
                        "GROUP BY user").fetchall()
    return {row[0]: row[1] for row in rows}


def recent_recipients(conn: sqlite3.Connection, user: str, after: float) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT recipient FROM events WHERE user = ? AND at > ? AND recipient IS NOT NULL "
        "GROUP BY recipient ORDER BY max(at) DESC LIMIT ?",
        (user, after, SAMPLE_RECIPIENTS)).fetchall()
    return tuple(row[0] for row in rows)


def set_block(conn: sqlite3.Connection, user: str, reason: str, *, now: float,
              by: str) -> tuple[Block, bool]:
    """Block `user` (an admin's or an import's doing). Returns the block and whether it is new;
    an existing block keeps its time and reason.
    """
    existing = get_block(conn, user)
    if existing is not None:
        return existing, False
    block = Block(user, now, reason, 0, by)
    # notified=1: an admin did this, nobody needs telling.
    conn.execute("INSERT INTO blocks (user, since, reason, count, by, notified) "
                 "VALUES (?, ?, ?, 0, ?, 1)", (user, now, reason, by))
    _history(conn, user, now, "block", reason, by)
    return block, True


def clear_block(conn: sqlite3.Connection, user: str, *, now: float, by: str) -> bool:
    """Unblock `user` and forget its events, so the next failure does not block it again."""
    removed = conn.execute("DELETE FROM blocks WHERE user = ?", (user,)).rowcount > 0
    conn.execute("DELETE FROM events WHERE user = ?", (user,))
    if removed:
        _history(conn, user, now, "unblock", "", by)
    return removed


def mark_notified(conn: sqlite3.Connection, user: str, since: float) -> None:
    conn.execute("UPDATE blocks SET notified = 1 WHERE user = ? AND since = ?", (user, since))


def unnotified(conn: sqlite3.Connection) -> list[tuple[Block, tuple[str, ...]]]:
    """Automatic blocks whose mail was never taken (lookupd stopped before it went out)."""
    rows = conn.execute("SELECT user, since, reason, count, by, recipients FROM blocks "
                        "WHERE notified = 0").fetchall()
    return [(_block_from_row(row), tuple(r for r in row[5].split("\n") if r)) for row in rows]


def prune(conn: sqlite3.Connection, *, now: float, window: float) -> int:
    return conn.execute("DELETE FROM events WHERE at <= ?", (now - window,)).rowcount


def history(conn: sqlite3.Connection, user: str) -> list[HistoryEntry]:
    rows = conn.execute("SELECT at, action, reason, by FROM history WHERE user = ? "
                        "ORDER BY at, rowid", (user,)).fetchall()
    return [HistoryEntry(*row) for row in rows]


def events(conn: sqlite3.Connection, user: str, *, after: float) -> list[EventEntry]:
    rows = conn.execute("SELECT at, recipient, eid FROM events WHERE user = ? AND at > ? "
                        "ORDER BY at, rowid", (user, after)).fetchall()
    return [EventEntry(*row) for row in rows]


def event_counts(conn: sqlite3.Connection, *, after: float) -> dict[str, int]:
    rows = conn.execute("SELECT user, count(*) FROM events WHERE at > ? GROUP BY user",
                        (after,)).fetchall()
    return {row[0]: row[1] for row in rows}


def _history(conn: sqlite3.Connection, user: str, now: float, action: str, reason: str,
             by: str) -> None:
    conn.execute("INSERT INTO history (user, at, action, reason, by) VALUES (?, ?, ?, ?, ?)",
                 (user, now, action, reason, by))


# --- the writer thread ---------------------------------------------------------------------


class StorageError(Exception):
    """The state could not be written (disk full, read-only, I/O error, cannot open)."""


@dataclass
class Tx:
    """What an operation sees: the connection, and a flag saying it changed the blocks."""

    conn: sqlite3.Connection
    blocks_changed: bool = False


@dataclass
class _Op(Generic[T]):
    fn: Callable[[Tx], T]
    future: asyncio.Future[T] | None
    on_commit: Callable[[T], None] | None = None


@dataclass
class _Done:
    op: _Op[Any]
    result: Any = None
    error: BaseException | None = None


@dataclass
class WriterHooks:
    """Called on the writer thread after a commit / when another connection changed the
    state (with the blocks as they now are), and on the loop with that reloaded state."""

    blocks_written: Callable[[dict[str, Block]], None] = lambda blocks: None
    external_change: Callable[[dict[str, Block]], None] = lambda blocks: None


class Writer:
    """The only connection that writes: one thread, fed by a queue, one transaction a batch.

    Everything queued while a commit (an fsync) runs is committed together in the next one, so
    concurrent user-fail calls cost one fsync per batch and are counted exactly (the count is
    read inside the transaction that inserts the event). Results reach the loop in commit
    order, each after its commit: the in-memory mirror never runs ahead of the disk.
    """

    # After a failed open, try again at most this often (when there is something to write).
    REOPEN_EVERY = 30.0

    def __init__(self, path: Path, window: float, hooks: WriterHooks | None = None) -> None:
        self.path = path
        self.window = window
        self.hooks = hooks or WriterHooks()
        self.open_error = ""
        self._queue: queue.SimpleQueue[_Op[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._last_open = 0.0
        self._last_prune = 0.0
        self._data_version = -1
        self._pending = 0  # submitted, not yet resolved (touched on the loop only)

    async def start(self) -> dict[str, Block] | None:
        """Start the thread and open the database. The blocks, or None when it cannot."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lookupd-users-writer",
                                        daemon=True)
        self._thread.start()
        try:
            return await self.submit(lambda tx: load_blocks(tx.conn))
        except StorageError as exc:
            # Opened, but the first read failed (locked, damaged): the warning needs a cause too.
            if not self.open_error:
                self.open_error = await asyncio.to_thread(explain, self.path, exc, "read")
            return None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[[Tx], T],
               on_commit: Callable[[T], None] | None = None) -> asyncio.Future[T]:
        """Queue `fn` for the next batch. `on_commit` runs on the loop after the commit, even if
        the future's awaiter has gone."""
        assert self._loop is not None, "Writer.start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending += 1
        self._queue.put(_Op(fn, future, on_commit))
        return future

    def poke(self) -> None:
        """Look for changes by other connections (data_version) without a transaction."""
        self._queue.put(_Op(lambda tx: None, None))

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- on the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._open()
        while True:
            first = self._queue.get()
            batch: list[_Op[Any]] = []
            stop = first is None
            if first is not None:
                batch.append(first)
            while not stop and len(batch) < BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._batch(batch)
            if stop:
                break
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _open(self) -> None:
        self._last_open = time.monotonic()
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(self.path)
            check_writable(conn)
            self._data_version = data_version(conn)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._conn = None
            self.open_error = explain(self.path, exc)
            return
        self._conn = conn
        self.open_error = ""

    def _batch(self, batch: list[_Op[Any]]) -> None:
        if self._conn is None and time.monotonic() - self._last_open >= self.REOPEN_EVERY:
            self._open()
            if self._conn is not None:
                self._data_version = -1  # reload: `lookupd users` may have changed it since
                log.warning("users: %s is writable again; recording user failures again",
                            self.path)
        conn = self._conn
        work = [op for op in batch if op.future is not None]
        if conn is None:
            self._deliver([_Done(op, error=StorageError(self.open_error)) for op in work])
            return
        try:
            self._look_for_changes(conn)
        except sqlite3.Error as exc:
            log.debug("users: data_version check failed: %s", exc)
        if not work:
            return
        self._deliver(self._transaction(conn, work))

    def _transaction(self, conn: sqlite3.Connection, work: list[_Op[Any]]) -> list[_Done]:
        tx = Tx(conn)
        done: list[_Done] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            if now - self._last_prune >= PRUNE_EVERY:
                prune(conn, now=now, window=self.window)
                self._last_prune = now
            for op in work:
                # A savepoint each: one failing operation does not undo the others.
                conn.execute("SAVEPOINT op")
                try:
                    result = op.fn(tx)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    done.append(_Done(op, error=_storage_error(exc)))
                else:
                    conn.execute("RELEASE op")
                    done.append(_Done(op, result))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StorageError(explain(self.path, exc))
            return [_Done(op, error=error) for op in work]
        if tx.blocks_changed:
            self._written(conn)
        return done

    def _look_for_changes(self, conn: sqlite3.Connection) -> None:
        version = data_version(conn)
        if version == self._data_version:
            return
        self._data_version = version
        blocks = load_blocks(conn)
        self.hooks.blocks_written(blocks)
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self.hooks.external_change, blocks)

    def _written(self, conn: sqlite3.Connection) -> None:
        try:
            self.hooks.blocks_written(load_blocks(conn))
        except Exception:
            log.exception("users: after-commit hook failed")

    def _deliver(self, done: list[_Done]) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(self._resolve, done)

    def _resolve(self, done: list[_Done]) -> None:
        """On the loop: apply each result to the mirror, then answer its awaiter."""
        for item in done:
            self._pending -= 1
            future = item.op.future
            if item.error is None and item.op.on_commit is not None:
                try:
                    item.op.on_commit(item.result)
                except Exception:
                    log.exception("users: applying a committed change failed")
            if future is None or future.done():
                continue
            if item.error is not None:
                future.set_exception(item.error)
            else:
                future.set_result(item.result)


def _storage_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return StorageError(f"{type(exc).__name__}: {exc}")
    return exc
