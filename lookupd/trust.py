"""Who may ask for user state over loopback TCP, where every local user can connect.

On the Unix socket the file's group and mode are the gate (Exim's group). On TCP the peer's
uid is found through the kernel (lookupd.peercred) and must be root, lookupd's own user, or a
member of that same group: no shell user may record `user-fail` events for someone else (and
get that user's mail frozen) or read user state.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import time

from lookupd.config import EXIM_GROUPS
from lookupd.logsummary import Repeats
from lookupd.protocol import Peer

repeats = Repeats(logging.getLogger(__name__))
_CACHE_SECONDS = 60.0
# How long a request waits for a uid's groups (NSS) before that peer counts as not trusted.
_LOOKUP_SECONDS = 5.0


def exim_group_gid() -> int | None:
    """The gid of the first group Exim runs as on this system (Debian-exim, exim, ...)."""
    for name in EXIM_GROUPS:
        with contextlib.suppress(KeyError):
            return grp.getgrnam(name).gr_gid
    return None


def group_gid(name: str) -> int | None:
    """A group name (or number) as a gid ("auto": Exim's group); None for "" or an unknown
    group (config.py refuses those, so only a group deleted since gets here)."""
    if name == "auto":
        return exim_group_gid()
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return int(name) if name.isdigit() else None


def groups_of(uid: int, gid: int | None = None) -> frozenset[int]:
    """The groups of `uid` (its primary and supplementary ones, from NSS), and `gid` (a
    peer's primary gid from SO_PEERCRED). Blocking: an NSS lookup."""
    groups = {gid} if gid is not None else set()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset(groups)
    groups.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return frozenset(groups)


class PeerTrust:
    """Decides whether a TCP peer may use the user verbs (per uid, cached a minute), and who
    may run the control verbs. A uid's groups come from NSS, which may be LDAP and slow: the
    lookup runs in a thread, never on the event loop; `known_*` answer from memory or None."""

    def __init__(self, socket_group: str = "auto", admin_group: str = "") -> None:
        self._gids = frozenset(gid for gid in (group_gid(socket_group), group_gid(admin_group))
                               if gid is not None)
        self._admin_gid = group_gid(admin_group) if admin_group else None
        self._own_uid = os.getuid()
        self._cache: dict[int, tuple[float, frozenset[int]]] = {}
        self._pending: dict[int, asyncio.Future[frozenset[int]]] = {}

    def known_use(self, peer: Peer) -> bool | None:
        """May this TCP peer use the user verbs? None: its groups must be looked up first
        (`check_use`)."""
        if peer.uid is None:  # the owner could not be found: never trust it
            return False
        if peer.uid in (0, self._own_uid):
            return True
        groups = self._cached(peer.uid)
        return None if groups is None else bool(groups & self._gids)

    async def check_use(self, peer: Peer) -> bool:
        known = self.known_use(peer)
        if known is not None:
            return known
        assert peer.uid is not None
        return bool(await self._groups(peer.uid) & self._gids)

    def known_admin(self, peer: Peer) -> bool | None:
        """Control verbs (reload): on the Unix socket only, root, lookupd's own user (systemd's
        ExecReload) or a member of users.admin_group. None: look the groups up (`check_admin`).
        """
        if peer.transport != "unix" or peer.uid is None:
            return False
        if peer.uid in (0, self._own_uid):
            return True
        if self._admin_gid is None:
            return False
        if peer.gid == self._admin_gid:
            return True
        groups = self._cached(peer.uid)
        return None if groups is None else self._admin_gid in groups

    async def check_admin(self, peer: Peer) -> bool:
        known = self.known_admin(peer)
        if known is not None:
            return known
        assert peer.uid is not None
        return self._admin_gid in await self._groups(peer.uid)

    def _cached(self, uid: int) -> frozenset[int] | None:
        cached = self._cache.get(uid)
        return cached[1] if cached is not None and cached[0] > time.monotonic() else None

    async def _groups(self, uid: int) -> frozenset[int]:
        """The uid's groups; one lookup at a time per uid, and none waited for longer than
        _LOOKUP_SECONDS (a hung LDAP): then no groups, not remembered, asked again later."""
        pending = self._pending.get(uid)
        if pending is None:
            pending = self._pending[uid] = asyncio.ensure_future(
                asyncio.to_thread(groups_of, uid))
            pending.add_done_callback(lambda _: self._pending.pop(uid, None))
        try:
            async with asyncio.timeout(_LOOKUP_SECONDS):
                groups = await asyncio.shield(pending)
        except TimeoutError:
            repeats.warning("slow group lookups",
                            "looking up the groups of uid %s took more than %gs (NSS: is "
                            "LDAP or sssd slow?); it is not trusted until it answers", uid,
                            _LOOKUP_SECONDS)
            return frozenset()
        except Exception as exc:  # noqa: BLE001  (NSS modules raise what they like)
            repeats.warning("failed group lookups", "cannot look up the groups of uid %s "
                            "(%s); it is not trusted", uid, exc)
            return frozenset()
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[uid] = (time.monotonic() + _CACHE_SECONDS, groups)
        return groups
