"""The compiled front end (lookupd/_fastpath.c) on a real listening Unix socket, and the table
of kept replies (lookupd/fastpath.py). The daemon's own use of it is tested with every verb
by the rest of the suite, and in test_connect_daemon (counted, logged, expired, switched off).
"""

from __future__ import annotations

import importlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import short_dir

from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.cache import AnswerCache
from lookupd.fastpath import MAX_ENTRIES, Keep, KeptReplies, compiled
from lookupd.metrics import Metrics
from lookupd.outcome import Status

serve = compiled()
needs_compiled = pytest.mark.skipif(serve is None, reason="the compiled front end is not built")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    where = short_dir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(where / "s"))
    sock.listen(64)
    sock.setblocking(False)
    yield sock
    sock.close()
    (where / "s").unlink()
    where.rmdir()


def _client(listener: socket.socket, data: bytes, *, half_close: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(listener.getsockname())
    if data:
        sock.sendall(data)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    return sock


def _reply(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


@needs_compiled
def test_a_kept_reply_is_given_and_counted_the_rest_handed_back(
        listener: socket.socket) -> None:
    assert serve is not None
    table = {b"ping\n": [b"pong", float("inf"), 0, 0.0],
             b"dnsbl 192.0.2.4": [b"verdict=listed", time.time() + 60, 0, 0.0],
             b"old": [b"stale", time.time() - 1, 0, 0.0],
             b"odd": ["not bytes", float("inf"), 0, 0.0]}
    clients = [_client(listener, b"ping\n"), _client(listener, b"ping\nmore"),
               _client(listener, b"dnsbl 192.0.2.4"), _client(listener, b"old"),
               _client(listener, b"odd"), _client(listener, b"country 81.2.69.142\n"),
               _client(listener, b"pi", half_close=False), _client(listener, b""),
               _client(listener, b"x" * 5000, half_close=False)]
    answered, rest, failed = serve(listener.fileno(), table, time.time(), 64)
    assert (answered, failed) == (3, 0)
    assert [_reply(c) for c in clients[:3]] == [b"pong", b"pong", b"verdict=listed"]
    assert table[b"ping\n"][2] == 2 and table[b"dnsbl 192.0.2.4"][2] == 1
    assert table[b"ping\n"][3] > 0.0
    # Expired, not a kept shape, not kept, not all there, nothing sent, too long: Python's.
    assert [(data, complete) for _, data, complete in rest] == [
        (b"old", True), (b"odd", True), (b"country 81.2.69.142\n", True), (b"pi", False),
        (b"", False), (b"x" * 4096, False)]
    assert table[b"old"][2] == 0
    for fd, _, _ in rest:
        socket.socket(fileno=fd).close()
    for client in clients[3:]:
        client.close()


@needs_compiled
def test_nobody_waiting_and_a_batch_limit(listener: socket.socket) -> None:
    assert serve is not None
    table = {b"ping": [b"pong", float("inf"), 0, 0.0]}
    assert serve(listener.fileno(), table, time.time(), 64) == (0, [], 0)
    clients = [_client(listener, b"ping") for _ in range(5)]
    assert serve(listener.fileno(), table, time.time(), 3)[0] == 3
    assert serve(listener.fileno(), table, time.time(), 3)[0] == 2
    assert [_reply(c) for c in clients] == [b"pong"] * 5


def test_the_hits_reach_the_metrics_and_the_counts_once_each() -> None:
    metrics = Metrics()
    kept = KeptReplies(metrics)
    kept.check("t1")  # the token the replies below are kept under
    counted: list[tuple[str, int]] = []
    kept.keep(b"dnsbl 192.0.2.4", "dnsbl", b"verdict=listed",
              Keep(100.0, (lambda n=1: counted.append(("a", n)),
                           lambda n=1: counted.append(("b", n)))))
    kept.table[b"dnsbl 192.0.2.4"][2:] = [3, 0.0003]  # as the C code counts three hits
    kept.drain()
    assert counted == [("a", 3), ("b", 3)]  # one call each for all the hits
    assert metrics.by_verb["dnsbl"][0] == 3 and metrics.kept["dnsbl"] == 3
    kept.drain()
    assert len(counted) == 2  # counted once
    # The same token keeps it; a new one empties it, after counting what it still owed.
    kept.check("t1")
    kept.table[b"dnsbl 192.0.2.4"][2] = 1
    kept.check("t2")
    assert counted[2:] == [("a", 1), ("b", 1)] and not kept.table


def test_the_table_stays_bounded_and_long_replies_are_not_kept() -> None:
    kept = KeptReplies(Metrics())
    kept.keep(b"metrics", "metrics", b"x" * 5000, Keep())
    assert not kept.table
    for i in range(MAX_ENTRIES + 10):
        kept.keep(f"country 10.0.{i // 256}.{i % 256}".encode(), "country", b"--", Keep())
    assert 0 < len(kept.table) <= MAX_ENTRIES


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKUPD_NO_FASTPATH", "1")
    assert compiled() is None


def test_the_module_is_built_where_the_tests_run() -> None:
    """scripts/test installs gcc and python3-dev: the suite must run the compiled path (a
    build that silently fell back would leave it untested)."""
    assert serve is not None, Path(__file__).parent.parent / "lookupd" / "_fastpath.c"


def test_the_module_is_built_for_the_stable_abi() -> None:
    """One file for Python 3.11 and every later one: a dist-upgrade of python3 keeps the
    compiled front end, and the Debian package does not pin python3 (<< 3.12)."""
    module = importlib.import_module("lookupd._fastpath")
    assert (module.__file__ or "").endswith(".abi3.so"), module.__file__


def test_answers_used_again_by_kept_replies_stay_the_most_recently_used() -> None:
    """A kept reply's hits touch its DNS answers when they are counted: the busiest clients'
    answers are not the first a full cache drops (each drop would also empty the table)."""
    cache = AnswerCache(2, clock=lambda: 1000.0)
    listed = DnsAnswer(Status.FOUND, ("127.0.0.2",), expires=2000.0)
    cache.put(("bl.test", "A", "busy"), listed)
    cache.put(("bl.test", "A", "once"), listed)
    cache.touch([("bl.test", "A", "busy"), ("bl.test", "A", "gone")])
    cache.put(("bl.test", "A", "new"), listed)  # full: the least recently used goes
    assert cache.get(("bl.test", "A", "busy")) is listed
    assert cache.get(("bl.test", "A", "once")) is None
