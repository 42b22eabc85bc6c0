"""`lookupd users list|block|unblock|history|import`: the block state, straight in sqlite.

It works whether the daemon runs or not: sqlite's WAL lets this process write beside the
daemon's writer, and the daemon notices the change through PRAGMA data_version (on its next
write, or on a `user` lookup at most a second later) and reloads its blocked set. Nothing is
sent over the socket, so it needs no admin_group membership, only write access to the state.

With [cluster], block, unblock and import also go to Redis at once (published to every host),
as the daemon's own blocks do; if Redis does not answer, this host's lookupd shares them at
its next sync with Redis (within 30 seconds of Redis answering).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import pwd
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lookupd.cluster import RESYNC_EVERY, ClusterDown, client_problem
from lookupd.config import Config
from lookupd.errors import BadRequest
from lookupd.users import lsearch, store
from lookupd.users.decide import Block, check_name, clean_reason, iso_utc, window_text
from lookupd.users.shared import SharedUsers, share_now

log = logging.getLogger("lookupd.users")

# history shows at most this many of the user's events in the window.
_MAX_EVENTS_SHOWN = 50


def add_users_parser(subparsers: Any) -> None:
    """Add `users` and its actions to the top-level subparsers of lookupd's CLI."""
    users = subparsers.add_parser(
        "users", help="blocked authenticated users: list, block, unblock, history, import",
        description="Show and change which authenticated users lookupd blocks. Works on "
                    "STATE_DIR/users.sqlite directly; a running daemon follows within a "
                    "second.")
    users.add_argument("--config", type=Path, metavar="FILE",
                       help="configuration file (default /etc/lookupd/lookupd.toml)")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                       help="configuration file")
        return p

    action("list", "blocked users: since, count, who blocked them, why")
    block = action("block", "block USER now (durable before this returns)")
    block.add_argument("user", metavar="USER", help="the $authenticated_id to block")
    block.add_argument("--reason", default="", help="why (shown in list, history and to Exim)")
    unblock = action("unblock", "unblock USER and forget its invalid-recipient events")
    unblock.add_argument("user", metavar="USER")
    history = action("history", "USER's blocks, unblocks and recent invalid recipients")
    history.add_argument("user", metavar="USER")
    imp = action("import", "block every user listed in an Exim lsearch file "
                           "(the classic blocked_authenticated_users)")
    imp.add_argument("file", type=Path, metavar="FILE")


def run_users(args: argparse.Namespace, config: Config) -> int:
    """Run one `users` action; an os.EX_* exit code."""
    path = store.db_path(config.server.state_dir)
    command: str = args.users_command
    try:
        if command == "list":
            return _list(path, config)
        if command == "history":
            return _history(path, config, _name(args.user, config))
        if command == "block":
            return _block(path, config, _name(args.user, config), args.reason)
        if command == "unblock":
            return _unblock(path, config, _name(args.user, config))
        if command == "import":
            return _import(path, config, args.file)
    except BadRequest as exc:
        log.error("%s", exc)
        return os.EX_USAGE
    except PermissionError as exc:
        # The state is 0750/0600 (store.DIR_MODE, FILE_MODE): names and recipients are private.
        log.error("cannot use %s: %s; the user state is for root and the user lookupd runs as "
                  "only: run this as one of them", exc.filename or path,
                  exc.strerror or "permission denied")
        return os.EX_NOPERM
    except sqlite3.Error as exc:
        return _storage_failed(path, exc)
    except OSError as exc:
        log.error("cannot use %s: %s", path, exc)
        return os.EX_CANTCREAT
    raise AssertionError(f"unknown users action {command!r}")  # argparse prevents this


def _name(raw: str, config: Config) -> str:
    return check_name(raw, case_insensitive=config.users.case_insensitive)


def _by() -> str:
    try:
        who = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        who = f"uid {os.getuid()}"
    return f"{who} (lookupd users)"


def _connect(path: Path) -> sqlite3.Connection:
    """store.connect, then give files it created to the state directory's owner: run as root,
    the CLI must not leave a users.sqlite (-wal, -shm) that lookupd's own user cannot write."""
    _check_access(path, os.R_OK | os.W_OK)
    conn = store.connect(path)
    if os.geteuid() == 0:
        owner = path.parent.stat()
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            try:
                st = (path.parent / name).stat()
            except FileNotFoundError:
                continue
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(path.parent / name, owner.st_uid, owner.st_gid)
    return conn


def _read(path: Path) -> sqlite3.Connection | None:
    """A connection for reading; None when there is no state yet (nothing was ever blocked)."""
    if not path.exists():  # PermissionError when the directory is closed to this user
        return None
    _check_access(path, os.R_OK)
    try:
        return _connect(path)
    except (sqlite3.OperationalError, PermissionError):
        return store.connect_readonly(path)  # not writable by this user: read what is there


def _check_access(path: Path, mode: int) -> None:
    """PermissionError before sqlite, whose answer would be "unable to open database file"."""
    if path.exists() and not os.access(path, mode):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _list(path: Path, config: Config) -> int:
    conn = _read(path)
    blocks = {} if conn is None else store.load_blocks(conn)
    if conn is not None:
        conn.close()
    if not blocks:
        print("no blocked users")
        return os.EX_OK
    rows = [(b.user, iso_utc(b.since), str(b.count), b.by, b.reason)
            for b in sorted(blocks.values(), key=lambda b: b.since)]
    header = ("USER", "SINCE", "COUNT", "BY", "REASON")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True))
              + "  " + row[4])
    return os.EX_OK


def _history(path: Path, config: Config, user: str) -> int:
    conn = _read(path)
    if conn is None:
        print(f"no history for {user}")
        return os.EX_OK
    try:
        entries = store.history(conn, user)
        block = store.get_block(conn, user)
        window = config.users.window
        recent = store.events(conn, user, after=time.time() - window)
    finally:
        conn.close()
    if not entries and not recent:
        print(f"no history for {user}")
        return os.EX_OK
    for entry in entries:
        line = f"{iso_utc(entry.at)}  {entry.action:<7}  by {entry.by}"
        print(line + (f": {entry.reason}" if entry.reason else ""))
    print(f"{user} is {'BLOCKED' if block else 'not blocked'}; {len(recent)} invalid "
          f"recipient(s) in the last {window_text(window)} (limit {config.users.limit})")
    for event in recent[-_MAX_EVENTS_SHOWN:]:
        seen = f"  (seen on {event.host})" if event.host else ""
        print(f"  {iso_utc(event.at)}  {event.recipient or '-'}{seen}")
    return os.EX_OK


def _write(path: Path, config: Config, fn: Any) -> Any:
    """Run fn(conn) in one durable transaction, then bring the lsearch file up to date."""
    conn = _connect(path)  # creates the state directory and file (store.secure)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        blocks = store.load_blocks(conn)
    finally:
        conn.close()
    if config.users.lsearch_file is not None:
        try:
            lsearch.write_atomic(config.users.lsearch_file, lsearch.render(blocks))
        except OSError as exc:
            log.warning("cannot write users.lsearch_file %s: %s (the block state itself is "
                        "saved)", config.users.lsearch_file, exc)
    return result


# Added to the confirmation when the change went to Redis.
SHARED = ", and every [cluster] host at once (shared through Redis)"


def _share(config: Config, what: str,
           change: Callable[[SharedUsers], Awaitable[object]]) -> str:
    """[cluster]: send an admin's change to Redis now, so that every host answers it within
    moments. SHARED when it went; "" without [cluster], or when it failed (logged)."""
    if not config.cluster.enabled:
        return ""
    missing = client_problem()
    if missing is not None:
        log.warning("%s is saved here but not shared with the other hosts: %s", what, missing)
        return ""
    try:
        asyncio.run(share_now(config, change))
    except ClusterDown as exc:
        log.warning("%s is saved here, but Redis at %s did not answer (%s): the other hosts "
                    "hear of it when this host's lookupd next reaches Redis (every %gs while "
                    "Redis answers)", what, config.cluster.redis or "the sentinels' primary",
                    exc, RESYNC_EVERY)
        return ""
    return SHARED


def _block(path: Path, config: Config, user: str, reason: str) -> int:
    why = clean_reason(reason.split()) or "blocked by an administrator"
    by = _by()
    block, new = _write(path, config,
                        lambda conn: store.set_block(conn, user, why, now=time.time(), by=by))
    # Shared even when it was there already: a block made here while Redis was down.
    shared = _share(config, f"the block of {user}", lambda s: s.block(block))
    if new:
        print(f"blocked {user}; a running lookupd follows within a second{shared}")
    else:
        print(f"{user} was already blocked since {iso_utc(block.since)}: {block.reason}")
    return os.EX_OK


def _unblock(path: Path, config: Config, user: str) -> int:
    by = _by()
    now = time.time()
    removed = _write(path, config,
                     lambda conn: store.clear_block(conn, user, now=now, by=by))
    # Shared even when this host had no block: another host may have one.
    shared = _share(config, f"the unblock of {user}", lambda s: s.unblock(user, now, by))
    if removed:
        print(f"unblocked {user}; a running lookupd follows within a second{shared}")
    else:
        print(f"{user} was not blocked here (its invalid-recipient count is reset){shared}")
    return os.EX_OK


def _import(path: Path, config: Config, source: Path) -> int:
    try:
        text = source.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        log.error("%s: no such file", source)
        return os.EX_NOINPUT
    except OSError as exc:
        log.error("cannot read %s: %s", source, exc.strerror or exc)
        return os.EX_NOINPUT
    users: list[str] = []
    skipped = 0
    for line in lsearch.parse(text):
        try:
            users.append(_name(line.key, config))
        except BadRequest as exc:
            skipped += 1
            log.warning("%s line %d skipped: %s", source, line.number, exc)
    reason = clean_reason(["imported from", str(source)])
    by = _by()

    def add_all(conn: sqlite3.Connection) -> list[Block]:
        now = time.time()
        made = [store.set_block(conn, u, reason, now=now, by=by) for u in users]
        return [block for block, new in made if new]

    added = _write(path, config, add_all)

    async def share_all(shared: SharedUsers) -> None:
        for block in added:
            await shared.block(block)

    shared = _share(config, f"{len(added)} imported block(s)", share_all) if added else ""
    print(f"imported {len(added)} new block(s) from {source}; {len(users) - len(added)} "
          f"already blocked; {skipped} line(s) skipped")
    if shared:
        print(f"the new blocks hold on this host within a second{shared}")
    return os.EX_DATAERR if skipped else os.EX_OK


def _storage_failed(path: Path, exc: sqlite3.Error) -> int:
    text = str(exc)
    if "locked" in text or "busy" in text:
        log.error("%s is busy (%s); try again", path, text)
        return os.EX_TEMPFAIL
    if "readonly" in text or "unable to open" in text:
        log.error("cannot write %s: %s; run this as the user lookupd runs as (or root)",
                  path, text)
        return os.EX_CANTCREAT
    log.error("%s: %s", path, text)
    return os.EX_IOERR
