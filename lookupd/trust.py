"""Who may ask for user state over loopback TCP, where every local user can connect.

On the Unix socket the file's group and mode are the gate (Exim's group). On TCP the peer's
uid is found through the kernel (lookupd.peercred) and must be root, lookupd's own user, or a
member of that same group: no shell user may record `user-fail` events for someone else (and
get that user's mail frozen) or read user state.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import time

from lookupd.config import EXIM_GROUPS
from lookupd.protocol import Peer

_CACHE_SECONDS = 60.0


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
    """Decides, per uid (cached a minute), whether a TCP peer may use the user verbs."""

    def __init__(self, socket_group: str = "auto", admin_group: str = "") -> None:
        self._gids = frozenset(gid for gid in (group_gid(socket_group), group_gid(admin_group))
                               if gid is not None)
        self._admin_gid = group_gid(admin_group) if admin_group else None
        self._own_uid = os.getuid()
        self._cache: dict[int, tuple[float, bool]] = {}

    def may_use_users(self, peer: Peer) -> bool:
        uid = peer.uid
        if uid is None:  # the owner could not be found: never trust it
            return False
        if uid in (0, self._own_uid):
            return True
        now = time.monotonic()
        cached = self._cache.get(uid)
        if cached is not None and cached[0] > now:
            return cached[1]
        allowed = bool(groups_of(uid) & self._gids)
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[uid] = (now + _CACHE_SECONDS, allowed)
        return allowed

    def may_administer(self, peer: Peer) -> bool:
        """Control verbs (reload): on the Unix socket only, root, lookupd's own user (systemd's
        ExecReload) or a member of users.admin_group."""
        if peer.transport != "unix" or peer.uid is None:
            return False
        if peer.uid in (0, self._own_uid):
            return True
        return self._admin_gid is not None and self._admin_gid in groups_of(peer.uid, peer.gid)
