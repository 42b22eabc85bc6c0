"""Authenticated-user block state: the `user`, `user-fail`, `user-block`, `user-unblock` source.

Replaces the classic RCPT-ACL recipe (ratelimit on invalid recipients, `${run{/bin/sh -c "echo
$user >> blocked_authenticated_users"}}`, freeze later mail): events and blocks live in
STATE_DIR/users.sqlite, written by one thread; `user` answers from an in-memory mirror.

Changes made by `lookupd users ...` while the daemon runs reach it through sqlite's
data_version, looked at on every write batch and, on lookups, at most once a second.

In Exim's RCPT ACL (${escape:} keeps what the client typed printable ASCII on one line; the
FAIL string `ok` fails open when lookupd is down):

    warn  authenticated = *
          set acl_m_user = ${readsocket{/run/lookupd/lookupd.sock}\
                             {user ${escape:$authenticated_id}\n}{3s}{}{ok}}
          condition = ${extract{blocked}{$acl_m_user}{yes}{no}}
          control   = freeze/no_tell
          logwrite  = froze mail of blocked user $authenticated_id: \
                      ${extract{reason}{$acl_m_user}} since ${extract{since}{$acl_m_user}}
    deny  authenticated = *
          !verify   = recipient
          set acl_m_fail = ${readsocket{/run/lookupd/lookupd.sock}{user-fail \
                             ${escape:$authenticated_id} ${escape:$local_part@$domain}\n}\
                             {3s}{}{ok}}
          message   = no such user here
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from lookupd.cluster import Cluster, ClusterDown
from lookupd.config import UsersConfig
from lookupd.trust import group_gid, groups_of
from lookupd.users import lsearch, store
from lookupd.users.decide import (
    MAX_REASON_CHARS,
    Block,
    FailOutcome,
    UserStatus,
    blocked,
    check_name,
    clean_recipient,
    clean_text,
    command,
    may_administer,
    ok,
    render_admin,
    render_check,
    unknown,
)
from lookupd.users.notify import Notice, Notifier, setuid_is_blocked
from lookupd.users.shared import SharedUsers

__all__ = ["UserState", "UserStatus", "render_admin", "render_check"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long an answer waits for its commit. Exim's readsocket timeout is a few seconds; past
# this the answer is `ok` (fail open) and the event is still committed when the disk wakes up.
WRITE_DEADLINE = 2.0
# More queued writes than this means the disk cannot keep up: answer `ok` at once.
MAX_PENDING = 10_000
# Look for changes by `lookupd users` at most this often on lookups.
REFRESH_EVERY = 1.0
# Storage problems are logged at most this often (with a count of the requests meanwhile).
WARN_EVERY = 60.0
# How long close() lets notifications under way finish.
NOTIFY_GRACE = 2.0


class UserState:
    """Blocked users and their invalid-recipient events, built from [users]."""

    def __init__(self, config: UsersConfig, state_dir: Path, *,
                 notify_backoff: float = 5.0, cluster: Cluster | None = None) -> None:
        self.config = config
        # [cluster]: the window and the blocks shared through Redis; sqlite is the journal.
        self._shared = SharedUsers(cluster, config) if cluster is not None else None
        if cluster is not None:
            cluster.on_up(self._merge)
            cluster.subscribe("block", self._remote_block)
            cluster.subscribe("unblock", self._remote_unblock)
        self.path = store.db_path(state_dir)
        self._blocked: dict[str, Block] = {}
        self._writer = store.Writer(self.path, config.window, store.WriterHooks(
            blocks_written=self._write_lsearch, external_change=self._external_change))
        self._notifier = Notifier(config.notify_command, config.notify_to,
                                  retries=config.notify_retries,
                                  timeout=config.notify_timeout, backoff=notify_backoff,
                                  smtp=config.notify_smtp)
        self._admin_gid: int | None = None
        self._last_refresh = 0.0
        self._last_warning = -WARN_EVERY
        self._suppressed = 0
        self._open = False

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self._admin_gid = group_gid(self.config.admin_group)
        if self.config.notify_smtp is None and setuid_is_blocked(self._notifier.argv):
            log.warning("users: notify_command %r is a setuid program, but lookupd runs with "
                        "NoNewPrivileges (systemd): it could not queue the block "
                        "notifications. Set users.notify_smtp = \"127.0.0.1:25\" to send them "
                        "through the local Exim instead", self.config.notify_command)
        blocks = await self._writer.start()
        self._open = True
        if blocks is not None:
            self._blocked = blocks
            await asyncio.to_thread(self._write_lsearch, blocks)
            await self._resend_notifications()
            log.info("users: %d blocked user(s) in %s", len(blocks), self.path)
            return
        # Fail open, but keep the blocks we can still read: a read-only disk must not unblock.
        self._blocked = await asyncio.to_thread(_read_blocks, self.path)
        # open_error names the file, sqlite's or the OS's error and the fix (store.explain);
        # last on the line, so that a command at its end can be copied as it is.
        log.warning("users: user-fail answers ok (fail open) and blocks nobody new until this "
                    "is fixed (lookupd tries again at most every %gs); %d existing block(s) "
                    "still hold: %s", store.Writer.REOPEN_EVERY, len(self._blocked),
                    self._writer.open_error or f"cannot open {self.path}")

    @property
    def blocked_count(self) -> int:
        return len(self._blocked)

    @property
    def problem(self) -> str:
        """Why user-fail cannot record events now ("" when it can)."""
        return self._writer.open_error

    async def close(self) -> None:
        if not self._open:
            return
        await self._notifier.drain(NOTIFY_GRACE)  # a mail taken meanwhile is still marked
        self._open = False
        await self._writer.stop()

    # --- lookups -------------------------------------------------------------------------

    def check(self, user: str) -> str:
        """The stored form of `user`, or BadRequest: lets a caller refuse a bad name before it
        starts a coroutine."""
        return check_name(user, case_insensitive=self.config.case_insensitive)

    def status(self, user: str) -> UserStatus:
        """`user USER`: from memory, no sqlite. BadRequest for an invalid name."""
        name = self.check(user)
        now = time.monotonic()
        if self._open and now - self._last_refresh >= REFRESH_EVERY:
            self._last_refresh = now
            self._writer.poke()
        block = self._blocked.get(name)
        return blocked(block) if block is not None else ok(name)

    async def refresh(self) -> None:
        """Pick up changes made by other processes now (tests, and after `users import`)."""
        if self._open:
            await self._writer.submit(lambda tx: None)

    async def fail(self, user: str, recipient: str | None = None) -> UserStatus:
        """`user-fail USER [RECIPIENT]`: one invalid-recipient event, and the state after it."""
        name = self.check(user)
        rcpt = clean_recipient(recipient)
        cfg = self.config
        if not self._open:
            return unknown(name, "the user state is not open")
        if self._writer.pending >= MAX_PENDING:
            return self._storage_problem(name, f"{MAX_PENDING} writes are waiting for the disk "
                                               f"under {self.path.parent}")

        shared = self._shared
        eid = shared.new_eid() if shared is not None else None
        if shared is not None and shared.cluster.up:
            shared_status = await self._shared_fail(shared, name, rcpt, eid or "")
            if shared_status is not None:
                return shared_status

        def op(tx: store.Tx) -> store.FailRecord:
            record = store.record_fail(tx.conn, name, rcpt, now=time.time(),
                                       window=cfg.window, limit=cfg.limit, eid=eid,
                                       by=shared.by if shared is not None else "lookupd")
            tx.blocks_changed = record.outcome is FailOutcome.NEWLY_BLOCKED
            return record

        result = await self._commit(name, self._writer.submit(op, self._apply_fail))
        if isinstance(result, UserStatus):
            return result
        if result.block is not None:
            return blocked(result.block, result.count)
        return ok(name, result.count)

    async def _shared_fail(self, shared: SharedUsers, name: str, rcpt: str | None,
                           eid: str) -> UserStatus | None:
        """Count in Redis, journal here. None: Redis did not answer, decide locally."""
        now = time.time()
        try:
            count, block, new = await shared.fail(name, [(now, eid)], now)
        except ClusterDown:
            return None
        window = self.config.window

        def op(tx: store.Tx) -> store.FailRecord:
            store.record_event(tx.conn, name, rcpt, now=now, eid=eid)
            if block is None:
                return store.FailRecord(FailOutcome.OK, count, None)
            adopted = store.adopt_block(tx.conn, block, unblocked_after=False, notified=not new)
            tx.blocks_changed = adopted
            if not new:
                return store.FailRecord(FailOutcome.STILL_BLOCKED, count, block)
            return store.FailRecord(FailOutcome.NEWLY_BLOCKED, count, block,
                                    store.recent_recipients(tx.conn, name, now - window))

        if block is not None and not new:
            self._blocked.setdefault(name, block)
        # Durable here before the answer; a slow disk is logged, Redis' answer stands.
        await self._commit(name, self._writer.submit(op, self._apply_fail))
        return blocked(block, count) if block is not None else ok(name, count)

    # --- [cluster]: merging and the other hosts' messages ------------------------------

    async def _merge(self, reconnected: bool) -> None:
        """Redis answers (again): push what this host recorded meanwhile, take what the
        others did. Block against unblock: the later one wins. Events carry their ids, so
        pushing one twice counts it once."""
        shared = self._shared
        if shared is None or not self._open:
            return
        window = self.config.window
        remote, unblocked = await shared.snapshot()

        def read(tx: store.Tx) -> tuple[dict[str, list[tuple[float, str]]], dict[str, Block],
                                        dict[str, float]]:
            after = time.time() - window
            events = store.window_events(tx.conn, after=after) if reconnected else {}
            return events, store.load_blocks(tx.conn), store.last_unblocks(tx.conn)

        events, local, local_unblocks = await self._writer.submit(read)
        for user, block in list(remote.items()):
            at = local_unblocks.get(user)
            if user not in local and at is not None and at >= block.since:
                await shared.unblock(user, at, f"unblocked on {shared.cluster.host}")
                del remote[user]
                unblocked[user] = at
        for user, block in local.items():
            if user in remote or unblocked.get(user, -1.0) >= block.since:
                continue
            held = await shared.block(block)
            if held is not None:
                remote[user] = held
        new_blocks: list[store.FailRecord] = []
        for user, evs in events.items():
            if user in remote:
                continue
            evs = [e for e in evs if e[0] > unblocked.get(user, -1.0)]
            if not evs:
                continue
            count, made, new = await shared.fail(user, evs, time.time())
            if made is not None:
                remote[user] = made
                if new:
                    new_blocks.append(store.FailRecord(FailOutcome.NEWLY_BLOCKED, count, made))

        def apply(tx: store.Tx) -> dict[str, Block]:
            changed = False
            for user, at in unblocked.items():
                block = store.get_block(tx.conn, user)
                if block is not None and user not in remote and block.since <= at:
                    changed |= store.adopt_unblock(tx.conn, user, at=at, by="unblocked on "
                                                   "another host")
            for block in remote.values():
                changed |= store.adopt_block(tx.conn, block)
            tx.blocks_changed = changed
            return store.load_blocks(tx.conn)

        blocks = await self._writer.submit(apply)
        self._blocked = blocks
        for record in new_blocks:
            self._apply_fail(record)

    def _remote_block(self, message: dict[str, object]) -> None:
        """Another host blocked a user: answered here at once, journalled after."""
        if self._shared is None or not self._open:
            return
        block = self._shared.decode_block(message)
        if block is None or block.user in self._blocked:
            return
        self._blocked[block.user] = block

        def op(tx: store.Tx) -> bool:
            tx.blocks_changed = store.adopt_block(tx.conn, block, unblocked_after=False)
            return tx.blocks_changed

        def keep(_: bool) -> None:
            # Again after the commit: a merge finishing meanwhile may have replaced the mirror.
            self._blocked.setdefault(block.user, block)

        self._writer.submit(op, keep)

    def _remote_unblock(self, message: dict[str, object]) -> None:
        if self._shared is None or not self._open:
            return
        found = self._shared.decode_unblock(message)
        if found is None:
            return
        user, at, by = found
        block = self._blocked.get(user)
        if block is not None and block.since <= at:
            del self._blocked[user]

        def op(tx: store.Tx) -> bool:
            tx.blocks_changed = store.adopt_unblock(tx.conn, user, at=at, by=by)
            return tx.blocks_changed

        def forget(_: bool) -> None:
            held = self._blocked.get(user)
            if held is not None and held.since <= at:
                del self._blocked[user]

        self._writer.submit(op, forget)

    async def _share(self, call: Awaitable[object]) -> None:
        """An admin's change, sent to Redis; if it does not answer, the merge sends it."""
        try:
            await call
        except ClusterDown:
            pass

    async def block(self, user: str, reason: str, *, by: str = "admin") -> UserStatus:
        """`user-block USER [REASON]` (the caller checked the peer). Durable before it returns."""
        name = self.check(user)
        why = clean_text(reason, MAX_REASON_CHARS) or "blocked by an administrator"

        def op(tx: store.Tx) -> tuple[Block, bool]:
            result = store.set_block(tx.conn, name, why, now=time.time(), by=by)
            tx.blocks_changed = result[1]
            return result

        result = await self._commit(name, self._writer.submit(op, self._apply_block),
                                    admin=True)
        if isinstance(result, UserStatus):
            return result
        if self._shared is not None and result[1]:
            await self._share(self._shared.block(result[0]))
        return blocked(result[0])

    async def unblock(self, user: str, *, by: str = "admin") -> UserStatus:
        """`user-unblock USER` (the caller checked the peer). Durable before it returns."""
        name = self.check(user)

        now = time.time()

        def op(tx: store.Tx) -> bool:
            removed = store.clear_block(tx.conn, name, now=now, by=by)
            tx.blocks_changed = removed
            return removed

        result = await self._commit(name, self._writer.submit(op, lambda _: self._forget(name)),
                                    admin=True)
        if isinstance(result, UserStatus):
            return result
        if self._shared is not None:
            await self._share(self._shared.unblock(name, now, by))
        return ok(name)

    async def admin_allowed(self, uid: int | None, gid: int | None) -> bool:
        """May this peer run user-block / user-unblock? Root or admin_group; TCP (no uid) never."""
        if uid is None:
            return False
        if uid == 0 or self._admin_gid is None:
            return may_administer(uid, frozenset(), self._admin_gid)
        groups = await asyncio.to_thread(groups_of, uid, gid)
        return may_administer(uid, groups, self._admin_gid)

    async def describe_peer(self, uid: int | None, pid: int | None) -> str:
        """Who sent an admin verb, for the history: "alice (uid 1000, pid 4242)"."""
        return await asyncio.to_thread(_describe_peer, uid, pid)

    # --- commits and the mirror ----------------------------------------------------------

    async def _commit(self, name: str, future: asyncio.Future[T], *,
                         admin: bool = False) -> T | UserStatus:
        try:
            async with asyncio.timeout(WRITE_DEADLINE):
                return await asyncio.shield(future)
        except TimeoutError:
            problem = (f"{self.path} did not answer within {WRITE_DEADLINE:g}s (a slow or "
                       f"failing disk?)")
        except store.StorageError as exc:
            problem = str(exc)
        if admin:
            log.warning("users: cannot change %s: %s", name, problem)
            return unknown(name, "state not writable, see the lookupd log")
        return self._storage_problem(name, problem)

    def _storage_problem(self, name: str, problem: str) -> UserStatus:
        """Fail open: `ok` (or the block we know of), and a loud line at most once a minute."""
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY:
            more = f" ({self._suppressed} more since the last warning)" if self._suppressed \
                else ""
            # The problem last: it may end with the command that fixes it (store.explain).
            log.warning("users: cannot record an invalid-recipient event%s; answering ok "
                        "(fail open), nobody new gets blocked until this is fixed: %s", more,
                        problem)
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        block = self._blocked.get(name)
        return blocked(block) if block is not None else unknown(name, problem)

    def _apply_fail(self, record: store.FailRecord) -> None:
        if record.block is None:
            return
        self._blocked[record.block.user] = record.block
        if record.outcome is not FailOutcome.NEWLY_BLOCKED:
            return
        block = record.block
        # The command last on the line, shell-quoted: a name may hold `;`, `$(...)`, quotes.
        log.warning("users: blocked %s: %s; their mail is frozen until an admin unblocks "
                    "them with: %s", block.user, block.reason, command("unblock", block.user))
        self._notify(Notice(block.user, record.count, self.config.window, block.since,
                            block.reason, record.recipients))

    def _apply_block(self, result: tuple[Block, bool]) -> None:
        block, new = result
        self._blocked[block.user] = block
        if new:
            log.info("users: %s blocked by %s: %s", block.user, block.by, block.reason)

    def _forget(self, name: str) -> None:
        if self._blocked.pop(name, None) is not None:
            log.info("users: %s unblocked", name)

    def _external_change(self, blocks: dict[str, Block]) -> None:
        """On the loop: `lookupd users` changed the state; the database is authoritative."""
        if blocks.keys() != self._blocked.keys():
            log.info("users: blocked users changed outside the daemon; now %d", len(blocks))
        self._blocked = blocks

    def _notify(self, notice: Notice) -> None:
        if not self._notifier.enabled:
            return
        user, since = notice.user, notice.since

        def sent() -> None:
            if self._open:
                self._writer.submit(lambda tx: store.mark_notified(tx.conn, user, since))

        self._notifier.send(notice, sent)

    async def _resend_notifications(self) -> None:
        if not self._notifier.enabled:
            return
        try:
            pending = await self._writer.submit(lambda tx: store.unnotified(tx.conn))
        except store.StorageError as exc:
            log.warning("users: cannot look for unsent block notifications: %s", exc)
            return
        for block, recipients in pending:
            log.info("users: sending the notification about %s again (lookupd stopped before "
                     "it went out)", block.user)
            self._notify(Notice(block.user, block.count, self.config.window, block.since,
                                block.reason, recipients))

    def _write_lsearch(self, blocks: dict[str, Block]) -> None:
        """On the writer thread (or at open): the compatibility file, if configured."""
        target = self.config.lsearch_file
        if target is None:
            return
        try:
            lsearch.write_atomic(target, lsearch.render(blocks))
        except OSError as exc:
            log.warning("users: cannot write users.lsearch_file %s: %s; Exim ACLs that read it "
                        "see an old list until this is fixed", target, exc)


def _describe_peer(uid: int | None, pid: int | None) -> str:
    if uid is None:
        return "unknown peer"
    try:
        name = pwd.getpwuid(uid).pw_name  # NSS: may be slow (LDAP), hence the thread
    except KeyError:
        name = "uid"
    return f"{name} (uid {uid}, pid {pid})" if pid is not None else f"{name} (uid {uid})"


def _read_blocks(path: Path) -> dict[str, Block]:
    try:
        conn = store.connect_readonly(path)
    except Exception as exc:  # sqlite3.Error or OSError: nothing to read
        log.debug("users: cannot read %s either: %s", path, exc)
        return {}
    try:
        return store.load_blocks(conn)
    finally:
        conn.close()
