"""systemd integration without extra dependencies: inherited sockets and readiness notification.

Socket activation (sd_listen_fds(3)): when LISTEN_PID is this process and LISTEN_FDS >= 1, the
listening sockets are fds 3, 4, ... . The variables are unset afterwards so that children do
not take them too. With the socket held by systemd, Exim always finds lookupd connectable,
even while it restarts: the main defence against Exim's stale-fd bug after a failed connect.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from lookupd.errors import ListenError

SD_LISTEN_FDS_START = 3


def listen_fds(environ: MutableMapping[str, str] | None = None,
               pid: int | None = None) -> list[socket.socket]:
    """The sockets systemd passed to this process (empty when not socket-activated)."""
    env = os.environ if environ is None else environ
    raw_pid = env.get("LISTEN_PID")
    raw_fds = env.get("LISTEN_FDS")
    if raw_pid is None and raw_fds is None:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    try:
        listen_pid = int(raw_pid or "")
        count = int(raw_fds or "")
    except ValueError:
        raise ListenError(
            f"malformed socket activation variables LISTEN_PID={raw_pid!r} "
            f"LISTEN_FDS={raw_fds!r}: start lookupd from lookupd.socket or without them"
        ) from None
    if listen_pid != (os.getpid() if pid is None else pid):
        return []  # meant for another process (e.g. our parent)
    if count < 0:
        raise ListenError(f"malformed socket activation variable LISTEN_FDS={raw_fds!r}")
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenError(f"inherited fd {fd} is not a socket ({exc.strerror}): "
                              "check ListenStream= in lookupd.socket") from None
        if sock.type != socket.SOCK_STREAM:
            raise ListenError(f"inherited fd {fd} is not a stream socket: lookupd.socket must "
                              "use ListenStream=")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's notify socket; False when there is none."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
