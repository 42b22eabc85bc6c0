"""Minimal Python servers in several designs, for the server-design study (`designs` suite).

Each reads a request until a newline or EOF (at most 512 bytes) and answers "pong", the same
work as bench/baseline.c, so the study measures the floor each design puts under lookupd.
Run one with `python -m bench.toyservers DESIGN SOCKET_PATH`.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

ANSWER = b"pong"
MAX_REQUEST = 512
READ_TIMEOUT = 5.0


def _listen(path: str) -> socket.socket:
    """A bound, listening Unix socket (a stale file at PATH is removed first)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1024)
    return sock


def _complete(buf: bytes | bytearray) -> bool:
    return b"\n" in buf or len(buf) >= MAX_REQUEST


# --- asyncio streams --------------------------------------------------------------------------


async def _streams_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buf = b""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            while not _complete(buf):
                chunk = await reader.read(MAX_REQUEST)
                if not chunk:
                    break
                buf += chunk
        writer.write(ANSWER)
        await writer.drain()
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def _streams(path: str) -> None:
    server = await asyncio.start_unix_server(_streams_handler, sock=_listen(path), backlog=1024)
    async with server:
        await server.serve_forever()


# --- asyncio.Protocol -------------------------------------------------------------------------


class _PongProtocol(asyncio.Protocol):
    """Answers once the request is complete; no timer (the cheapest Protocol server)."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: an isinstance check fails.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if _complete(self.buf):
            self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return True  # we close the transport ourselves, after the write

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ANSWER)
            self.transport.close()


class _TimedPongProtocol(_PongProtocol):
    """As _PongProtocol plus a per-connection read timeout, as the real server needs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class _SweptPongProtocol(_PongProtocol):
    """As _PongProtocol; the read timeout is one shared sweep per second over open
    connections instead of a timer per connection."""

    open_since: dict[_SweptPongProtocol, float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.open_since[self] = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_since.pop(self, None)

    @classmethod
    def sweep(cls) -> None:
        loop = asyncio.get_running_loop()
        limit = loop.time() - READ_TIMEOUT
        for proto, since in list(cls.open_since.items()):
            if since < limit and proto.transport is not None:
                proto.transport.close()
        loop.call_later(1.0, cls.sweep)


async def _swept(path: str) -> None:
    asyncio.get_running_loop().call_soon(_SweptPongProtocol.sweep)
    await _protocol(path, _SweptPongProtocol)


class _TaskPongProtocol(_TimedPongProtocol):
    """As _TimedPongProtocol, but the answer comes from a task per request, as when the
    lookup is a coroutine (an awaited cache or DNS call)."""

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            asyncio.get_running_loop().create_task(self._respond(self.transport))

    async def _respond(self, transport: asyncio.Transport) -> None:
        await asyncio.sleep(0)  # stands for an await that finds its answer in a cache
        if not transport.is_closing():
            transport.write(ANSWER)
            transport.close()


class _ThreadPongProtocol(_TaskPongProtocol):
    """As _TaskPongProtocol, but each answer goes through asyncio.to_thread, as a per-request
    blocking call (sqlite) would."""

    async def _respond(self, transport: asyncio.Transport) -> None:
        answer = await asyncio.to_thread(bytes, ANSWER)
        if not transport.is_closing():
            transport.write(answer)
            transport.close()


async def _protocol(path: str, factory: Callable[[], asyncio.Protocol]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(factory, sock=_listen(path), backlog=1024)
    async with server:
        await server.serve_forever()


# --- plain selectors loop ---------------------------------------------------------------------


def _selectors(path: str) -> None:
    """A hand-written epoll loop in Python: accept, read to newline/EOF, answer, close."""
    lsock = _listen(path)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    bufs: dict[socket.socket, bytes] = {}

    def on_readable(conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = bufs.get(conn, b"") + data
        if data and not _complete(buf):
            bufs[conn] = buf
            return
        bufs.pop(conn, None)
        if conn in sel.get_map():
            sel.unregister(conn)
        try:
            conn.send(ANSWER)
        except OSError:
            pass
        conn.close()

    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        conn, _addr = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    bufs[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, True)
            else:
                on_readable(key.fileobj)  # type: ignore[arg-type]


def _blocking(path: str) -> None:
    """A blocking accept loop: fast, but one silent client stalls everyone (not deployable)."""
    lsock = _listen(path)
    while True:
        conn, _addr = lsock.accept()
        with conn:
            conn.settimeout(READ_TIMEOUT)
            buf = b""
            try:
                while not _complete(buf):
                    chunk = conn.recv(MAX_REQUEST)
                    if not chunk:
                        break
                    buf += chunk
                conn.sendall(ANSWER)
            except OSError:
                pass


# --- runners ----------------------------------------------------------------------------------


def _run_asyncio(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _prefork_uvloop(path: str, workers: int) -> None:
    """WORKERS processes, each a uvloop Protocol server, sharing one listening socket."""
    import uvloop

    lsock = _listen(path)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(_TimedPongProtocol, sock=lsock, backlog=1024)
        async with server:
            await server.serve_forever()

    children = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve())
            os._exit(0)  # a forked child must not run the parent's cleanup
        children.append(pid)

    def stop(_signum: int, _frame: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    uvloop.run(serve())


DESIGNS: dict[str, tuple[str, Callable[[str], None]]] = {
    "streams": (
        "asyncio streams (start_unix_server), default loop",
        lambda p: _run_asyncio(_streams(p), use_uvloop=False),
    ),
    "streams-uvloop": (
        "asyncio streams (start_unix_server), uvloop",
        lambda p: _run_asyncio(_streams(p), use_uvloop=True),
    ),
    "protocol": (
        "asyncio.Protocol, default loop",
        lambda p: _run_asyncio(_protocol(p, _PongProtocol), use_uvloop=False),
    ),
    "protocol-uvloop": (
        "asyncio.Protocol, uvloop",
        lambda p: _run_asyncio(_protocol(p, _PongProtocol), use_uvloop=True),
    ),
    "protocol-uvloop-timer": (
        "asyncio.Protocol + per-connection call_later timeout, uvloop",
        lambda p: _run_asyncio(_protocol(p, _TimedPongProtocol), use_uvloop=True),
    ),
    "protocol-uvloop-sweep": (
        "asyncio.Protocol + one timeout sweep per second for all connections, uvloop",
        lambda p: _run_asyncio(_swept(p), use_uvloop=True),
    ),
    "protocol-uvloop-task": (
        "as above + a task per request (the lookup is a coroutine), uvloop",
        lambda p: _run_asyncio(_protocol(p, _TaskPongProtocol), use_uvloop=True),
    ),
    "protocol-uvloop-thread": (
        "as above + asyncio.to_thread per request (a blocking call such as sqlite), uvloop",
        lambda p: _run_asyncio(_protocol(p, _ThreadPongProtocol), use_uvloop=True),
    ),
    "prefork2-uvloop": (
        "2 processes sharing the listener, each Protocol + timeout on uvloop",
        lambda p: _prefork_uvloop(p, 2),
    ),
    "selectors": ("plain selectors/epoll loop in Python", _selectors),
    "blocking": ("blocking accept loop in Python (one silent client stalls it)", _blocking),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in DESIGNS:
        print(f"usage: python -m bench.toyservers {{{','.join(DESIGNS)}}} SOCKET", file=sys.stderr)
        return 2
    DESIGNS[argv[0]][1](argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
