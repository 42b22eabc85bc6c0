"""The listener: connections, bounded reads with a timeout, replies, reload and graceful stop.

Connections are asyncio.Protocol objects rather than streams: Exim opens a new connection for
every lookup, so the per-connection cost is the daemon's cost (bench/NOTES.md has the figures).
A request answered from memory is written from the read callback itself, without a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import resource
import signal
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, cast

from lookupd import systemd
from lookupd.config import EXIM_GROUPS, Config, HostPort
from lookupd.dispatch import Dispatcher
from lookupd.errors import BadRequest, ConfigError, ListenError
from lookupd.protocol import (
    ERR_INTERNAL,
    ERR_TIMEOUT,
    ERR_TOO_LONG,
    MAX_DISCARD,
    MAX_REQUEST,
    Peer,
    check_reply,
    parse_request,
    request_end,
    shown,
)
from lookupd.sources import Sources

log = logging.getLogger(__name__)

# A safety net under every source's own deadline: no connection outlives this.
ANSWER_LIMIT = 30.0
BACKLOG = 1024
_ANONYMOUS = {"unix": Peer("unix"), "tcp": Peer("tcp")}  # for verbs that need no uid
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class Connection(asyncio.Protocol):
    """One client connection: read one request, answer it, close."""

    __slots__ = ("server", "kind", "transport", "buffer", "discarded", "answered", "timer")

    def __init__(self, server: Server, kind: Literal["unix", "tcp"]) -> None:
        self.server = server
        self.kind: Literal["unix", "tcp"] = kind
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.discarded = -1  # >= 0 once the request is known to be too long
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.timer = self.server.loop.call_later(self.server.read_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        if self.discarded >= 0:  # too long: drop the rest of it, then say so
            self.discarded += len(data)
            if b"\n" in data or self.discarded > MAX_DISCARD:
                self._too_long()
            return
        self.buffer += data
        end = request_end(self.buffer)
        if end >= 0:
            self._answer(self.buffer[: end + 1])
        elif len(self.buffer) > MAX_REQUEST:
            self.discarded = len(self.buffer)
            self.buffer.clear()

    def eof_received(self) -> bool:
        if not self.answered:
            if self.discarded >= 0:
                self._too_long()
            else:
                self._answer(self.buffer)
        return True  # keep the transport open to write the reply; _reply closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.answered = True
        self.server.connection_done(self)

    def _timed_out(self) -> None:
        if self.answered:
            return
        log.warning("%s client sent no complete request within %.1fs (%d bytes so far); closed "
                    "it. Exim always sends its request at once: is something else connecting?",
                    self.kind, self.server.read_timeout, max(len(self.buffer), self.discarded))
        self.answered = True
        self._reply(ERR_TIMEOUT)

    def _too_long(self) -> None:
        log.warning("%s client sent a request longer than %d bytes; answered with an error",
                    self.kind, MAX_REQUEST)
        self.answered = True
        self._reply(ERR_TOO_LONG)

    def _answer(self, data: bytes | bytearray) -> None:
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
        try:
            request = parse_request(data)
        except BadRequest as exc:
            log.warning("%s client sent a malformed request %r: %s", self.kind,
                        shown(bytes(data[:MAX_REQUEST]).decode("ascii", "replace")), exc)
            self._reply(str(exc))
            return
        if self.server.debug:  # built only when wanted: this is the hot path
            log.debug("request %s %s", request.verb, shown(" ".join(request.args)))
        dispatcher = self.server.dispatcher
        try:
            reply = dispatcher.handle(request, self._peer(dispatcher.needs_peer(request.verb)))
        except Exception:
            log.exception("internal error answering %r; please report this",
                          shown(request.verb))
            reply = ERR_INTERNAL
        if isinstance(reply, str):
            self._reply(reply)
        else:
            self.server.track(self.server.loop.create_task(self._finish(reply)))

    async def _finish(self, pending: Awaitable[str]) -> None:
        try:
            async with asyncio.timeout(ANSWER_LIMIT):
                reply = await pending
        except asyncio.CancelledError:
            self._reply(ERR_INTERNAL)
            raise
        except Exception:
            log.exception("internal error while answering; please report this")
            reply = ERR_INTERNAL
        self._reply(reply)

    def _peer(self, with_credentials: bool) -> Peer:
        if self.kind == "tcp" or not with_credentials or self.transport is None:
            return _ANONYMOUS[self.kind]
        sock = self.transport.get_extra_info("socket")
        try:
            pid, uid, gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return Peer(self.kind)
        return Peer(self.kind, uid=uid, gid=gid, pid=pid)

    def _reply(self, reply: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            data = check_reply(reply)
        except ValueError:
            log.exception("internal error: a reply had a line break; please report this")
            data = ERR_INTERNAL.encode()
        transport.write(data)
        transport.close()


class Server:
    """Owns the listeners, the live connections and the dispatcher of the current config."""

    def __init__(self, config: Config, dispatcher: Dispatcher) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.dispatcher = dispatcher
        self.read_timeout = config.server.read_timeout
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[asyncio.Server] = []
        self.owned_paths: list[tuple[Path, int]] = []  # socket files we bound: (path, inode)
        self.retired: list[Sources] = []  # replaced by SIGHUP, closed ANSWER_LIMIT later
        self._idle = asyncio.Event()
        self._idle.set()

    def connection_done(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    def close_retired(self, sources: Sources) -> None:
        if sources in self.retired:
            self.retired.remove(sources)
            self.track(self.loop.create_task(sources.close()))

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            kind: Literal["unix", "tcp"] = "unix" if sock.family == socket.AF_UNIX else "tcp"

            def factory(kind: Literal["unix", "tcp"] = kind) -> Connection:
                self._idle.clear()
                return Connection(self, kind)

            # asyncio calls listen() again, by default with a backlog of 100: too few for a
            # burst of Exim processes (a full backlog makes non-blocking connects fail).
            if kind == "unix":
                listener = await self.loop.create_unix_server(factory, sock=sock,
                                                              backlog=BACKLOG)
            else:
                listener = await self.loop.create_server(factory, sock=sock, backlog=BACKLOG)
            self.listeners.append(listener)

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then drop the rest."""
        for listener in self.listeners:
            listener.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                await self._idle.wait()
                while self.tasks:
                    await asyncio.wait(set(self.tasks))
        if self.connections:
            log.warning("stopping with %d connection(s) still open after %.1fs; closing them",
                        len(self.connections), drain_timeout)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        for path, inode in self.owned_paths:
            with contextlib.suppress(OSError):
                if path.lstat().st_ino == inode:
                    path.unlink()


# --- listening sockets ---------------------------------------------------------------------


def bind_unix(path: Path, mode: int, group: str) -> socket.socket:
    """Bind the Unix socket, removing a stale file left by a dead daemon, never a live one's."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ListenError(f"cannot create {path.parent} for the socket: {exc.strerror}; "
                          "create it or choose another --socket") from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{path} exists and is not a socket: move it away or choose "
                              "another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.warning("removed stale socket %s left by a lookupd that did not stop cleanly",
                        path)
        except OSError as exc:
            raise ListenError(f"{path} exists and cannot be checked ({exc.strerror}); "
                              "remove it by hand if no lookupd runs") from None
        else:
            raise ListenError(f"another lookupd is already answering on {path}: stop it first "
                              "(systemctl stop lookupd.socket lookupd) or choose another --socket")
        finally:
            probe.close()
    gid = socket_gid(group)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if gid >= 0:
            os.chown(path, -1, gid)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def socket_gid(group: str) -> int:
    """The gid for server.socket_group ("auto": Exim's group, if any); -1 leaves it alone."""
    if group == "auto":
        for name in EXIM_GROUPS:
            with contextlib.suppress(KeyError):
                return grp.getgrnam(name).gr_gid
        log.warning("server.socket_group = \"auto\" found none of the groups Exim runs as "
                    "(%s): the socket keeps lookupd's group, and Exim may not be allowed to "
                    "connect; set server.socket_group", ", ".join(EXIM_GROUPS))
        return -1
    if not group:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"server.socket_group: there is no group {group!r}: use the group "
                          "Exim runs as (Debian: Debian-exim, Sympl/cPanel: exim or mail)") \
            from None


def bind_tcp(address: HostPort) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        sock = socket.create_server((address.host, address.port), family=family, backlog=BACKLOG)
    except OSError as exc:
        hint = " (another program uses the port?)" if exc.errno == errno.EADDRINUSE else ""
        raise ListenError(f"cannot listen on {address}: {exc.strerror}{hint}") from None
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> None:
    """Silent or slow clients each hold an fd until read_timeout: allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# --- the lifecycle ----------------------------------------------------------------------------


async def run(config: Config, reload_config: Callable[[], Config] | None = None,
              ready: Callable[[Server], None] | None = None) -> None:
    """Listen, open the sources, notify ready, serve until SIGTERM/SIGINT, drain, close."""
    loop = asyncio.get_running_loop()
    raise_fd_limit()
    inherited = systemd.listen_fds()
    sockets = list(inherited)
    owned: list[tuple[Path, int]] = []
    if not sockets:
        if config.server.socket is None and config.server.tcp is None:
            raise ConfigError("neither server.socket nor server.tcp is set: lookupd would not "
                              "listen anywhere")
        if config.server.socket is not None:
            sock = bind_unix(config.server.socket, config.server.socket_mode,
                             config.server.socket_group)
            sockets.append(sock)
            owned.append((config.server.socket, config.server.socket.lstat().st_ino))
        if config.server.tcp is not None:
            sockets.append(bind_tcp(config.server.tcp))
    sources = Sources.from_config(config)
    await sources.open()
    server = Server(config, Dispatcher(sources))
    server.owned_paths = owned
    await server.listen(sockets)
    where = ", ".join(_describe(s) for s in sockets)
    log.info("lookupd ready on %s%s", where, " (socket-activated)" if inherited else "")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload_config is not None:
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: server.track(loop.create_task(_reload(server,
                                                                              reload_config))))
    systemd.notify("READY=1\nSTATUS=answering")
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        log.info("lookupd stopping: finishing requests in flight (at most %.1fs)",
                    config.server.drain_timeout)
        await server.stop(config.server.drain_timeout)
        for sources in (*server.retired, server.dispatcher.sources):
            await sources.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _reload(server: Server, reload_config: Callable[[], Config]) -> None:
    """SIGHUP: read the config again and reopen every source; a bad config keeps the old one."""
    try:
        config = await asyncio.to_thread(reload_config)
    except ConfigError as exc:
        log.error("SIGHUP: new configuration refused, still running on the old one: %s", exc)
        return
    old = server.dispatcher.sources
    if (config.server.socket, config.server.tcp) != (old.config.server.socket,
                                                     old.config.server.tcp):
        log.warning("SIGHUP: server.socket and server.tcp changes take effect only after a "
                    "restart (systemctl restart lookupd)")
    sources = Sources.from_config(config)
    await sources.open()
    server.dispatcher.sources = sources
    server.config = config
    server.read_timeout = config.server.read_timeout
    log.info("SIGHUP: configuration and databases reloaded")
    # Requests already in flight may still use the old sources: close them a little later
    # (or at stop, whichever comes first).
    server.retired.append(old)
    server.loop.call_later(ANSWER_LIMIT, server.close_retired, old)


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(name.decode() if isinstance(name, bytes) else name)
    return f"tcp {name[0]}:{name[1]}"
