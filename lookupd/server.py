"""The listener: connections, bounded reads with a timeout, replies, reload and graceful stop.

Exim opens a new connection for every lookup, so the per-connection cost is the daemon's cost
(bench/NOTES.md has the figures). The listening socket's readiness callback accepts, reads the
request the client has already written, answers from memory, writes and closes, with no
transport or protocol object; only a client whose request has not arrived waits on the loop
(a Connection, under the read timeout), and only a coroutine answer gets a task. On the Unix
socket the compiled front end (lookupd/fastpath.py) does the accepting and reading, and
itself answers a request whose reply is kept; Python sees the others.
"""

from __future__ import annotations

import _socket
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
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from lookupd import systemd
from lookupd.config import EXIM_GROUPS, Config, HostPort
from lookupd.dispatch import Control, Dispatcher
from lookupd.errors import BadRequest, ConfigError, ListenError
from lookupd.fastpath import DRAIN_EVERY, KeptReplies, compiled, describe_fastpath
from lookupd.logsummary import Repeats
from lookupd.metrics import Metrics, exposition, serve_http
from lookupd.peercred import tcp_peer_uid
from lookupd.protocol import (
    ERR_INTERNAL,
    ERR_TIMEOUT,
    ERR_TOO_LONG,
    MAX_DISCARD,
    MAX_REQUEST,
    VERBS,
    Peer,
    check_reply,
    parse_request,
    request_end,
    shown,
)
from lookupd.sources import Sources
from lookupd.status import Snapshot, collect
from lookupd.trust import PeerTrust, exim_group_gid

log = logging.getLogger(__name__)
repeats = Repeats(log)

# A safety net under every source's own deadline: no connection outlives this.
ANSWER_LIMIT = 30.0
FAIL_OPEN_REMINDER = 3600.0
BACKLOG = 1024
_ANONYMOUS = {"unix": Peer("unix"), "tcp": Peer("tcp")}  # for verbs that need no uid
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
Client = _socket.socket  # an accepted connection
_READ = 4096  # a request is at most MAX_REQUEST bytes; more per read only drops faster
_ACCEPT_BATCH = 64  # connections accepted per wake-up before other callbacks get a turn
# Verbs that show counts (`metrics` too: metrics_text drains, for the HTTP page as well).
_READS_COUNTS = frozenset(("status", "stats"))


class Connection:
    """A client not answered at once: its request has not all arrived (it waits on the loop,
    under the read timeout), or its answer is a coroutine (it waits for the task)."""

    __slots__ = ("server", "sock", "fd", "kind", "buffer", "discarded", "answered", "timer",
                 "reading")

    def __init__(self, server: Server, sock: Client, kind: Literal["unix", "tcp"],
                 buffer: bytes = b"") -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.kind: Literal["unix", "tcp"] = kind
        self.buffer = bytearray(buffer)
        self.discarded = -1  # >= 0 once the request is known to be too long
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False
        server.add(self)

    def park(self) -> None:
        """Wait on the loop for the rest of the request, at most read_timeout."""
        if len(self.buffer) > MAX_REQUEST:
            self.discarded = len(self.buffer)
            self.buffer.clear()
        server = self.server
        server.loop.add_reader(self.fd, self._readable)
        self.reading = True
        self.timer = server.loop.call_later(server.read_timeout, self._timed_out)

    def _readable(self) -> None:
        if self.answered:
            return
        try:
            data = self.sock.recv(_READ, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client: nobody to answer
            self.answered = True
            self.close()
            return
        if not data:  # EOF: the request is what came (Exim half-closes after its write)
            self.stop_reading()
            if self.discarded >= 0:
                self._too_long()
            else:
                self.server.answer(self.sock, self.kind, self.buffer, self)
            return
        if self.discarded >= 0:  # too long: drop the rest of it, then say so
            self.discarded += len(data)
            if b"\n" in data or self.discarded > MAX_DISCARD:
                self.stop_reading()
                self._too_long()
            return
        self.buffer += data
        end = request_end(self.buffer)
        if end >= 0:
            self.stop_reading()
            self.server.answer(self.sock, self.kind, self.buffer[: end + 1], self)
        elif len(self.buffer) > MAX_REQUEST:
            self.discarded = len(self.buffer)
            self.buffer.clear()

    def stop_reading(self) -> None:
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fd)

    def _timed_out(self) -> None:
        self.timer = None
        if self.answered:
            return
        repeats.warning("clients that sent no complete request in time",
                        "%s client sent no complete request within %.1fs (%d bytes so far); "
                        "closed it. Exim always sends its request at once: is something else "
                        "connecting?", self.kind, self.server.read_timeout,
                        max(len(self.buffer), self.discarded))
        self.stop_reading()
        self.server.send(self.sock, ERR_TIMEOUT, "", 0.0, self)

    def _too_long(self) -> None:
        repeats.warning("requests that were too long",
                        "%s client sent a request longer than %d bytes; answered with an error",
                        self.kind, MAX_REQUEST)
        self.server.send(self.sock, ERR_TOO_LONG, "", 0.0, self)

    async def finish(self, pending: Awaitable[str], dispatcher: Dispatcher, verb: str,
                     started: float) -> None:
        """Await a coroutine answer (bounded by ANSWER_LIMIT), then send it."""
        try:
            async with asyncio.timeout(ANSWER_LIMIT):
                reply = await pending
        except asyncio.CancelledError:
            self.server.send(self.sock, ERR_INTERNAL, verb, started, self)
            raise
        except Exception:
            log.exception("internal error while answering; please report this")
            reply = ERR_INTERNAL
        finally:
            dispatcher.pending -= 1
            self.server.answered_on(dispatcher)
        self.server.send(self.sock, reply, verb, started, self)

    def close(self) -> None:
        """Forget the connection and close its socket (idempotent)."""
        self.stop_reading()
        self.sock.close()
        self.server.done(self)


class Server:
    """Owns the listeners, the live connections and the dispatcher of the current config.

    A reload swaps `dispatcher` (everything built from one configuration) in one assignment;
    each request keeps the dispatcher it started with. A replaced dispatcher is retired: its
    sources are closed as soon as its last request in flight is answered (at most
    ANSWER_LIMIT later)."""

    def __init__(self, config: Config, dispatcher: Dispatcher) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.dispatcher = dispatcher
        self.read_timeout = config.server.read_timeout
        self.debug = log.isEnabledFor(logging.DEBUG)
        # Oldest first (dicts keep insertion order): the first to go when there are too many.
        self.connections: dict[Connection, None] = {}
        self.max_connections = connection_cap()
        self.shed_total = 0  # idle connections closed to keep room for the others
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[socket.socket] = []
        self.owned_paths: list[tuple[Path, int]] = []  # socket files we bound: (path, inode)
        self.retired: list[Dispatcher] = []  # replaced by a reload, not yet closed
        self.reload_wanted = False
        self.reload_task: asyncio.Task[None] | None = None
        self.last_reload = ""  # what the last reload did: "ok" or "refused: ..."
        self.reload_config: Callable[[], Config] | None = None
        self.metrics = Metrics()
        # The compiled front end and the replies it gives again (lookupd/fastpath.py).
        self.fast = compiled()
        self.kept = KeptReplies(self.metrics)
        self._drain_timer: asyncio.TimerHandle | None = None
        self.started = time.time()
        self.http: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # --- the answer path ---------------------------------------------------------------------
    # No transport or protocol object per connection (bench/NOTES.md, issue 15): the listening
    # socket's readiness callback accepts, reads what the client has already sent, answers
    # from memory, writes and closes, all at once. Only a client whose request has not all
    # arrived becomes a Connection waiting on the loop, and only a coroutine answer a task.

    def _accept(self, listener: socket.socket, kind: Literal["unix", "tcp"]) -> None:
        # The C socket type, not socket.socket: its Python wrapper costs several us a client
        # (enum conversions of family and type in accept(), a Python close()).
        family, type_, proto = int(listener.family), int(listener.type), listener.proto
        accept = listener._accept  # type: ignore[attr-defined]  # (fd, address), no wrapper
        for _ in range(_ACCEPT_BATCH):  # then let the loop run the rest (DNS answers, timers)
            try:
                fd, _addr = accept()
                sock = Client(family, type_, proto, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors although under the cap (something else holds them):
                    # make room, the client waits in the backlog meanwhile.
                    repeats.warning("accepts that failed for want of resources",
                                    "cannot accept a connection: %s", exc.strerror)
                    self.shed_idle(None)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self._serve(sock, kind)

    def _accept_fast(self, listener: socket.socket, kind: Literal["unix", "tcp"]) -> None:
        """As `_accept`, through the compiled front end: it answers the clients whose request
        has a kept reply, and hands the others back with what they sent."""
        serve, kept = self.fast, self.kept
        assert serve is not None
        if kept.table:
            try:
                kept.check(self.dispatcher.token())
            except Exception:
                log.exception("internal error checking the kept replies; please report this")
                kept.clear()
        answered, rest, failed = serve(listener.fileno(), kept.table, time.time(),
                                       _ACCEPT_BATCH)
        if answered and self._drain_timer is None:
            self._drain_timer = self.loop.call_later(DRAIN_EVERY, self._drain)
        if rest:
            family, type_, proto = int(listener.family), int(listener.type), listener.proto
            pending = rest[::-1]
            try:
                while pending:
                    fd, data, ended = pending.pop()
                    self._serve(Client(family, type_, proto, fd), kind, data, ended)
            finally:
                for fd, _, _ in pending:  # not reached: an error answering one before them
                    os.close(fd)
        if failed:
            repeats.warning("accepts that failed for want of resources",
                            "cannot accept a connection: %s", os.strerror(failed))
            self.shed_idle(None)

    def _drain(self) -> None:
        """The kept replies' hits reach the metrics and the sources' figures (DRAIN_EVERY)."""
        self._drain_timer = None
        self.kept.drain()

    def _serve(self, sock: Client, kind: Literal["unix", "tcp"], buffer: bytes = b"",
               ended: bool = False) -> None:
        """Answer a new client at once if its request is there (Exim writes it right after
        connecting), else wait for it on the loop. `buffer`: what was read already (the
        compiled front end's); `ended`: its line end or EOF was read too."""
        while True:
            end = request_end(buffer)
            if end >= 0:
                self.answer(sock, kind, buffer[: end + 1], None)
                return
            if len(buffer) > MAX_REQUEST:
                break  # the Connection drops the rest and says it was too long
            if ended:  # EOF: the request is what came (Exim half-closes after its write)
                self.answer(sock, kind, buffer, None)
                return
            try:
                data = sock.recv(_READ, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset by the client: nobody to answer
                sock.close()
                return
            ended = not data
            buffer += data
        Connection(self, sock, kind, buffer).park()

    def answer(self, sock: Client, kind: Literal["unix", "tcp"],
               data: bytes | bytearray, conn: Connection | None) -> None:
        """Parse, dispatch and send the reply, or start the task that will."""
        started = time.perf_counter()
        try:
            request = parse_request(data)
        except BadRequest as exc:
            repeats.warning("malformed requests", "%s client sent a malformed request %r: %s",
                            kind, shown(bytes(data[:MAX_REQUEST]).decode("ascii", "replace")),
                            exc)
            self.send(sock, str(exc), "-", started, conn)
            return
        if self.debug:  # built only when wanted: this is the hot path
            log.debug("request %s %s", request.verb, shown(" ".join(request.args)))
        verb = request.verb if request.verb in VERBS else "unknown"
        if verb in _READS_COUNTS:
            self.kept.drain()  # the figures it shows include the kept replies' hits
        dispatcher = self.dispatcher
        dispatcher.kept = None
        try:
            reply = dispatcher.handle(request, _peer(sock, kind,
                                                     dispatcher.needs_peer(request.verb)))
        except Exception:
            log.exception("internal error answering %r; please report this",
                          shown(request.verb))
            reply = ERR_INTERNAL
        if isinstance(reply, str):
            keep = dispatcher.kept
            wire = None
            if (keep is not None and conn is None and kind == "unix" and self.fast is not None
                    and not self.debug and not reply.startswith("error")):
                with contextlib.suppress(ValueError):  # send() says what is wrong with it
                    wire = check_reply(reply)
                    self.kept.keep(bytes(data), verb, wire, keep)
            self.send(sock, reply, verb, started, conn, wire)
            return
        if conn is None:
            conn = Connection(self, sock, kind)
        conn.answered = True
        dispatcher.pending += 1
        self.track(self.loop.create_task(conn.finish(reply, dispatcher, verb, started)))

    def send(self, sock: Client, reply: str, verb: str, started: float,
             conn: Connection | None, data: bytes | None = None) -> None:
        """Write the reply and close; count it (`started`: 0 for replies to no request).
        `data`: the reply as `check_reply` encoded it already (a kept one), or None."""
        if sock.fileno() < 0:  # closed already: shed, or stopped
            return
        if data is None:
            try:
                data = check_reply(reply)
            except ValueError:
                log.exception("internal error: a reply had a line break; please report this")
                data = ERR_INTERNAL.encode()
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the client is gone: nobody to tell
            sent = len(data)
        if started:
            self.metrics.answered(verb, reply.startswith("error "),
                                  time.perf_counter() - started)
        if sent >= len(data):
            sock.close()
            if conn is not None:
                self.done(conn)
            return
        # Only a long Document (metrics) can fill the socket buffer: the rest in a task.
        if conn is None:
            conn = Connection(self, sock, "unix" if sock.family == socket.AF_UNIX else "tcp")
            conn.answered = True
        self.track(self.loop.create_task(self._send_rest(conn, data[sent:])))

    async def _send_rest(self, conn: Connection, data: bytes) -> None:
        try:
            sock = conn.sock = socket.socket(conn.sock.family, conn.sock.type, conn.sock.proto,
                                             conn.sock.detach())
            sock.setblocking(False)
            async with asyncio.timeout(ANSWER_LIMIT):
                await self.loop.sock_sendall(sock, data)
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading: nothing more to do for it
        finally:
            conn.close()

    def add(self, conn: Connection) -> None:
        self._idle.clear()
        connections = self.connections
        connections[conn] = None
        if len(connections) > self.max_connections:
            self.shed_idle(conn)

    def done(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        if not self.connections:
            self._idle.set()

    def shed_idle(self, newest: Connection | None) -> None:
        """Too many connections at once (a flood, or clients that never send): close the
        oldest one still waiting for its request, so that the descriptors never run out and
        Exim's connections are always accepted and answered."""
        victim = next((conn for conn in self.connections
                       if conn is not newest and not conn.answered), None)
        if victim is None:
            return
        victim.close()
        self.shed_total += 1
        repeats.warning(
            "idle connections closed because too many were open",
            "%d connections are open at once, the most lookupd keeps (its file "
            "descriptor limit is %d): closed the oldest idle one. A flood of clients "
            "that send nothing? Exim sends its request at once", len(self.connections) + 1,
            _fd_limit())

    def swap(self, dispatcher: Dispatcher) -> None:
        """Make `dispatcher` the one that answers; retire the one it replaces."""
        old, self.dispatcher = self.dispatcher, dispatcher
        # Replies of the old configuration, counted on the old sources; the new one's token.
        self.kept.reset(dispatcher.token())
        self.retired.append(old)
        self.answered_on(old)
        if old in self.retired:  # requests still in flight: close it after them, or later
            self.loop.call_later(ANSWER_LIMIT, self.close_retired, old)

    async def reload(self) -> str:
        """The `reload` verb: reload now (folded with any SIGHUP under way) and say how it
        went, so that `systemctl reload lookupd` fails when the new file is refused."""
        if self.reload_config is None:
            return "error reload is not available: lookupd runs without a configuration file"
        _request_reload(self, self.reload_config)
        assert self.reload_task is not None
        await asyncio.shield(self.reload_task)
        if self.last_reload == "ok":
            return "ok reloaded"
        return "error reload " + " ".join(self.last_reload.split())

    def status(self) -> Snapshot:
        dispatcher = self.dispatcher
        return collect(started=self.started, config=self.config.source,
                       fail_open=dispatcher.problem, last_reload=self.last_reload,
                       listeners=tuple(_describe(s) for s in self.listeners),
                       connections=len(self.connections), shed=self.shed_total,
                       sources=dispatcher.sources)

    def metrics_text(self) -> str:
        self.kept.drain()
        return exposition(self.metrics, self.status())

    def answered_on(self, dispatcher: Dispatcher) -> None:
        if dispatcher.pending <= 0 and dispatcher in self.retired:
            self.close_retired(dispatcher)

    def close_retired(self, dispatcher: Dispatcher) -> None:
        if dispatcher in self.retired:
            self.retired.remove(dispatcher)
            if dispatcher.sources is not None:
                self.track(self.loop.create_task(dispatcher.sources.close()))

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def listen(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            kind: Literal["unix", "tcp"] = "unix" if sock.family == socket.AF_UNIX else "tcp"
            # An inherited socket keeps systemd's backlog; ours may have been made with less:
            # a full backlog makes a burst of Exim processes' non-blocking connects fail.
            sock.listen(BACKLOG)
            sock.setblocking(False)
            # The compiled front end answers kept replies on the Unix socket, where every
            # client is Exim (its permissions decide); TCP goes through Python.
            accept = self._accept_fast if self.fast is not None and kind == "unix" else \
                self._accept
            self.loop.add_reader(sock.fileno(), accept, sock, kind)
            self.listeners.append(sock)

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then drop the rest."""
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.kept.clear()
        if self.http is not None:
            self.http.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                await self._idle.wait()
                while self.tasks:
                    await asyncio.wait(set(self.tasks))
        if self.connections:
            log.warning("stopping with %d connection(s) still open after %.1fs; closing them",
                        len(self.connections), drain_timeout)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        for path, inode in self.owned_paths:
            with contextlib.suppress(OSError):
                if path.lstat().st_ino == inode:
                    path.unlink()


def _peer(sock: Client, kind: Literal["unix", "tcp"], with_credentials: bool) -> Peer:
    if not with_credentials:
        return _ANONYMOUS[kind]
    if kind == "tcp":
        return Peer("tcp", uid=tcp_peer_uid(sock))
    try:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return Peer(kind)
    return Peer(kind, uid=uid, gid=gid, pid=pid)


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
        gid = exim_group_gid()
        if gid is not None:
            return gid
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


def _fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Descriptors kept free for what is not a client: databases, sqlite, DNS sockets, log files.
FD_RESERVE = 256


def connection_cap() -> int:
    """The most client connections lookupd keeps open at once: below the descriptor limit, so
    that accept() never fails with EMFILE (the kernel then resets good clients, unlogged)."""
    return max(32, _fd_limit() - FD_RESERVE)


def raise_fd_limit() -> None:
    """Silent or slow clients each hold an fd until read_timeout: allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# --- the lifecycle ----------------------------------------------------------------------------


async def run(config: Config, reload_config: Callable[[], Config] | None = None,
              ready: Callable[[Server], None] | None = None, *, problem: str = "") -> None:
    """Listen, open the sources, notify ready, serve until SIGTERM/SIGINT, drain, close.

    With `problem` (the configuration could not be loaded; `config` is then the fallback from
    config.fallback_config) lookupd still listens and answers, fail-open: every source unknown,
    every connect accepted, so that Exim always finds the socket connectable. A SIGHUP with a
    good configuration brings it back to normal."""
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
    server = Server(config, Dispatcher.fail_open(problem or "starting", _trust(config)))
    server.reload_config = reload_config
    if problem:
        server.dispatcher.control = server
    else:
        server.dispatcher = await build_dispatcher(config, control=server)
    server.owned_paths = owned
    await server.listen(sockets)
    if config.metrics.listen is not None:
        try:
            server.http = await serve_http(config.metrics.listen.host, config.metrics.listen.port,
                                           server.metrics_text)
        except OSError as exc:
            log.error("metrics.listen: cannot listen on %s (%s); the metrics verb still "
                      "answers", config.metrics.listen, exc.strerror or exc)
    where = ", ".join(_describe(s) for s in sockets)
    log.info("lookupd ready on %s%s; %s", where, " (socket-activated)" if inherited else "",
             describe_fastpath(server.fast is not None))
    if problem:
        _warn_fail_open(problem)
        server.track(loop.create_task(_remind_fail_open(server)))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload_config is not None:
        loop.add_signal_handler(signal.SIGHUP, _request_reload, server, reload_config)
    systemd.notify("READY=1\n" + _status(server.dispatcher))
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        log.info("lookupd stopping: finishing requests in flight (at most %.1fs)",
                 server.config.server.drain_timeout)
        await server.stop(server.config.server.drain_timeout)
        for retired in (*server.retired, server.dispatcher):
            if retired.sources is not None:
                await retired.sources.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def build_dispatcher(config: Config, previous: Dispatcher | None = None, *,
                           control: Control | None = None) -> Dispatcher:
    """Everything built from one configuration, opened: the sources and the dispatcher."""
    sources = Sources.from_config(config, previous.sources if previous else None)
    await sources.open()
    return Dispatcher(sources, trust=_trust(config), control=control)


def _trust(config: Config) -> PeerTrust:
    return PeerTrust(config.server.socket_group, config.users.admin_group)


def _status(dispatcher: Dispatcher) -> str:
    if dispatcher.problem:
        return "STATUS=DEGRADED: configuration not loaded, answering fail-open (nothing " \
               "checked): " + dispatcher.problem[:200]
    return "STATUS=answering"


def _warn_fail_open(problem: str) -> None:
    log.error("configuration error: %s", problem)
    log.error("lookupd is answering FAIL-OPEN until the configuration is fixed: every source "
              "unknown, every connection accepted, nothing recorded. Fix it (lookupd "
              "check-config), then reload (systemctl reload lookupd, or kill -HUP)")


async def _remind_fail_open(server: Server) -> None:
    """One reminder an hour while lookupd runs without its configuration."""
    while server.dispatcher.problem:
        await asyncio.sleep(FAIL_OPEN_REMINDER)
        if server.dispatcher.problem:
            log.error("still answering fail-open, without a configuration: %s",
                      server.dispatcher.problem)


def _request_reload(server: Server, reload_config: Callable[[], Config]) -> None:
    """SIGHUP: reloads never overlap; signals during one are folded into one more reload."""
    server.reload_wanted = True
    if server.reload_task is None or server.reload_task.done():
        server.reload_task = server.loop.create_task(_reload_while_wanted(server,
                                                                          reload_config))
        server.track(server.reload_task)


async def _reload_while_wanted(server: Server, reload_config: Callable[[], Config]) -> None:
    while server.reload_wanted:
        server.reload_wanted = False
        try:
            await _reload(server, reload_config)
        except Exception:
            log.exception("SIGHUP: reload failed unexpectedly, still running on the old "
                          "configuration; please report this")


async def _reload(server: Server, reload_config: Callable[[], Config]) -> None:
    """Read the config again and build everything from it beside the old set, then swap the
    whole set at once; a bad config keeps the old one."""
    # systemd (Type=notify-reload, 253+) waits for READY=1 after RELOADING=1; older ones
    # ignore both.
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = await asyncio.to_thread(reload_config)
    except ConfigError as exc:
        server.last_reload = f"refused: {exc}"
        server.metrics.reloads["refused"] += 1
        systemd.notify("READY=1")
        if server.dispatcher.problem:
            log.error("SIGHUP: configuration still refused, still answering fail-open: %s",
                      exc)
        else:
            log.error("SIGHUP: new configuration refused, still running on the old one: %s",
                      exc)
        return
    old = server.config
    if (config.server.socket, config.server.tcp) != (old.server.socket, old.server.tcp):
        log.warning("SIGHUP: server.socket and server.tcp changes take effect only after a "
                    "restart (systemctl restart lookupd)")
    was_fail_open = bool(server.dispatcher.problem)
    dispatcher = await build_dispatcher(config, server.dispatcher, control=server)
    server.swap(dispatcher)
    server.config = config
    server.read_timeout = config.server.read_timeout
    server.last_reload = "ok"
    server.metrics.reloads["ok"] += 1
    systemd.notify("READY=1\n" + _status(dispatcher))
    if was_fail_open:
        log.warning("SIGHUP: configuration loaded; lookupd checks clients again")
    else:
        log.info("SIGHUP: configuration and databases reloaded")


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(name.decode() if isinstance(name, bytes) else name)
    return f"tcp {name[0]}:{name[1]}"
