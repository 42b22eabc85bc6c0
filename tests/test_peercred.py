"""peercred: the uid behind a loopback TCP client, asked of the real kernel with real sockets
(clients as root and as nobody), and the pure request builder and reply parser on bytes."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from support import REPO

from lookupd import peercred
from lookupd.peercred import build_request, parse_reply, tcp_peer_uid

NOBODY = 65534
DAEMON = 1  # a second unprivileged uid; numeric, so no passwd entry is needed
SETPRIV = shutil.which("setpriv")
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to run clients as nobody")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")

# (listener family, listener address, client family, address the client connects to,
#  client's own address or "" for the kernel's choice)
V4 = (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1", "")
# Source and destination differ, so a request with the two swapped would find nothing.
V4_OTHER_SOURCE = (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1", "127.0.0.2")
V6 = (socket.AF_INET6, "::1", socket.AF_INET6, "::1", "")
# An AF_INET6 listener bound to ::ffff:127.0.0.1 stays on loopback and sees its IPv4 clients
# as ::ffff:127.0.0.1, as a dual-stack listener does; the clients are IPv4 sockets, or IPv6
# sockets that connect to the mapped address.
MAPPED = (socket.AF_INET6, "::ffff:127.0.0.1", socket.AF_INET, "127.0.0.1", "")
MAPPED_V6_CLIENT = (socket.AF_INET6, "::ffff:127.0.0.1", socket.AF_INET6, "::ffff:127.0.0.1", "")
SETUPS = [
    pytest.param(V4, id="ipv4"),
    pytest.param(V4_OTHER_SOURCE, id="ipv4-127.0.0.2"),
    pytest.param(V6, id="ipv6", marks=needs_ipv6),
    pytest.param(MAPPED, id="mapped-ipv4-client"),
    pytest.param(MAPPED_V6_CLIENT, id="mapped-ipv6-client"),
]
Setup = tuple[int, str, int, str, str]

CLIENT = """
import socket, sys
s = socket.socket(int(sys.argv[1]), socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if s.family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
if sys.argv[5]:
    s.bind((sys.argv[5], 0))
s.connect((sys.argv[2], int(sys.argv[3])))
if sys.argv[4] == "half-close":
    s.shutdown(socket.SHUT_WR)  # as Exim's ${readsocket} does before it reads
print("connected", flush=True)
sys.stdin.read()  # hold the connection until the test closes our stdin
"""


def _as_user(uid: int, *args: str) -> subprocess.Popen[str]:
    assert SETPRIV is not None
    return subprocess.Popen(
        [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-B", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")


@contextmanager
def _listener(family: int, host: str) -> Iterator[socket.socket]:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, 0))
        sock.listen()
        sock.settimeout(10)
        yield sock


@contextmanager
def _client_as(uid: int, family: int, host: str, port: int, mode: str = "hold",
               source: str = "") -> Iterator[subprocess.Popen[str]]:
    """A client process running as `uid`, connected and holding the connection open."""
    proc = _as_user(uid, "-c", CLIENT, str(family), host, str(port), mode, source)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "connected\n"
        yield proc
    finally:
        proc.communicate(timeout=10)


@contextmanager
def _accepted(listener: socket.socket) -> Iterator[socket.socket]:
    conn, _ = listener.accept()
    with conn:
        yield conn


@pytest.mark.parametrize("setup", SETUPS)
def test_root_client(setup: Setup) -> None:
    lfamily, lhost, cfamily, chost, source = setup
    with _listener(lfamily, lhost) as listener, socket.socket(cfamily) as client:
        if source:
            client.bind((source, 0))
        client.connect((chost, listener.getsockname()[1]))
        with _accepted(listener) as conn:
            # ::ffff:127.0.0.1 for the mapped setups
            assert conn.getpeername()[0] == (source or lhost)
            assert tcp_peer_uid(conn) == os.getuid()


@as_root
@pytest.mark.parametrize("setup", SETUPS)
def test_nobody_client(setup: Setup) -> None:
    lfamily, lhost, cfamily, chost, source = setup
    with _listener(lfamily, lhost) as listener:
        port = listener.getsockname()[1]
        with _client_as(NOBODY, cfamily, chost, port, source=source), \
                _accepted(listener) as conn:
            assert conn.getpeername()[0] == (source or lhost)
            assert tcp_peer_uid(conn) == NOBODY


@as_root
def test_half_closed_client_still_known() -> None:
    """Exim shuts down its write side before reading the answer: the owner stays known."""
    with _listener(socket.AF_INET, "127.0.0.1") as listener:
        port = listener.getsockname()[1]
        with _client_as(NOBODY, socket.AF_INET, "127.0.0.1", port, "half-close"), \
                _accepted(listener) as conn:
            assert conn.recv(1) == b""  # the client's FIN has arrived
            assert tcp_peer_uid(conn) == NOBODY


@as_root
def test_departed_client_is_nobody_known() -> None:
    """Once the client has closed, its socket lingers (FIN_WAIT2, TIME_WAIT) with no owner;
    sock_diag reports uid 0 for TIME_WAIT, which must not come back as root."""
    with _listener(socket.AF_INET, "127.0.0.1") as listener:
        with _client_as(NOBODY, socket.AF_INET, "127.0.0.1", listener.getsockname()[1]):
            conn, _ = listener.accept()
        with conn:  # the client process has exited
            assert tcp_peer_uid(conn) is None


@as_root
def test_unprivileged_caller() -> None:
    """sock_diag needs no privilege: a daemon running as nobody learns the uid of a root
    client and of a client of another user."""
    server = (
        "import socket, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from lookupd.peercred import tcp_peer_uid\n"
        "with socket.create_server(('127.0.0.1', 0)) as listener:\n"
        "    print(listener.getsockname()[1], flush=True)\n"
        "    for _ in range(2):\n"
        "        conn, _ = listener.accept()\n"
        "        with conn:\n"
        "            print(tcp_peer_uid(conn), flush=True)\n"
    )
    proc = _as_user(NOBODY, "-c", server)
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert proc.stdout.readline() == "0\n"
        with _client_as(DAEMON, socket.AF_INET, "127.0.0.1", port):
            assert proc.stdout.readline() == f"{DAEMON}\n"
    finally:
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_not_a_tcp_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert tcp_peer_uid(a) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        assert tcp_peer_uid(unconnected) is None


def test_netlink_failure_is_none_and_warns(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """As under RestrictAddressFamilies= without AF_NETLINK: no socket, a WARNING, None."""
    monkeypatch.setattr(peercred, "NETLINK_SOCK_DIAG", 32)  # >= MAX_LINKS: EPROTONOSUPPORT
    with _listener(socket.AF_INET, "127.0.0.1") as listener, \
            socket.create_connection(listener.getsockname()), _accepted(listener) as conn:
        with caplog.at_level(logging.WARNING, logger="lookupd.peercred"):
            assert tcp_peer_uid(conn) is None
    assert "sock_diag" in caplog.text


# --- the pure request builder --------------------------------------------------------------

@pytest.mark.parametrize("peer", [
    "192.0.2.7", "10.0.0.1", "0.0.0.0", "2001:db8::7", "fe80::1%lo", "::", "::ffff:192.0.2.7",
    "::127.0.0.1", "not-an-address", "",
])
def test_request_refuses_non_loopback_peers(peer: str) -> None:
    assert build_request((peer, 40000), ("127.0.0.1", 2525)) is None


def test_request_refuses_mixed_families() -> None:
    assert build_request(("::1", 40000), ("127.0.0.1", 2525)) is None


def test_request_v4_layout() -> None:
    data = build_request(("127.0.0.2", 40000), ("127.0.0.1", 2525), seq=7)
    assert data is not None and len(data) == 16 + 56
    assert struct.unpack_from("=IHHII", data) == (72, 20, 1, 7, 0)
    family, proto, ext, states = struct.unpack_from("=BBBxI", data, 16)
    assert (family, proto, ext, states) == (socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
    # The client's socket: its source is our peer, its destination our local address.
    assert data[24:28] == (40000).to_bytes(2, "big") + (2525).to_bytes(2, "big")
    assert data[28:44] == bytes([127, 0, 0, 2]) + bytes(12)
    assert data[44:60] == bytes([127, 0, 0, 1]) + bytes(12)
    assert struct.unpack_from("=III", data, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)


def test_request_v6_and_mapped() -> None:
    v6 = build_request(("::1", 40000), ("::1", 2525))
    assert v6 is not None and v6[16] == socket.AF_INET6
    assert v6[28:44] == v6[44:60] == socket.inet_pton(socket.AF_INET6, "::1")
    mapped = build_request(("::ffff:127.0.0.1", 40000), ("::ffff:127.0.0.1", 2525))
    assert mapped == build_request(("127.0.0.1", 40000), ("127.0.0.1", 2525))


# --- the pure reply parser -----------------------------------------------------------------

def _message(kind: int, body: bytes, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 4242) + body


def _diag_msg(uid: int, inode: int, state: int = 1) -> bytes:
    sockid = bytes(48)
    return struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + sockid + struct.pack(
        "=IIIII", 0, 0, 0, uid, inode) + bytes(8)  # an attribute's worth of tail


def test_parse_answer() -> None:
    assert parse_reply(_message(20, _diag_msg(uid=105, inode=99))) == 105
    assert parse_reply(_message(20, _diag_msg(uid=0, inode=99), seq=9), seq=9) == 0


def test_parse_no_live_owner() -> None:
    """TIME_WAIT (state 6) and orphaned sockets have inode 0; their uid means nothing."""
    assert parse_reply(_message(20, _diag_msg(uid=0, inode=0, state=6))) is None
    assert parse_reply(_message(20, _diag_msg(uid=1000, inode=0, state=5))) is None


def test_parse_error_done_and_empty() -> None:
    enoent = struct.pack("=i", -errno.ENOENT) + struct.pack("=IHHII", 72, 20, 1, 1, 0)
    assert parse_reply(_message(2, enoent)) is None
    assert parse_reply(_message(3, struct.pack("=i", 0))) is None
    assert parse_reply(b"") is None


def test_parse_malformed() -> None:
    good = _message(20, _diag_msg(uid=105, inode=99))
    assert parse_reply(good[:40]) is None  # truncated
    assert parse_reply(_message(20, bytes(20))) is None  # too short for inet_diag_msg
    assert parse_reply(struct.pack("=IHHII", 4, 20, 0, 1, 0) + bytes(72)) is None  # bad length
    assert parse_reply(_message(20, _diag_msg(uid=105, inode=99), seq=2)) is None  # not ours


# --- PeerTrust: who may use the user verbs on TCP, and the control verbs ----------------------

def test_peer_trust_looks_groups_up_off_the_loop_and_remembers_them() -> None:
    """A uid's groups come from NSS in a thread (LDAP may be slow); until then `known_use`
    says None, afterwards it answers from memory."""
    import asyncio
    import grp
    import pwd
    import threading

    from lookupd import trust as trust_module
    from lookupd.protocol import Peer
    from lookupd.trust import PeerTrust

    try:
        exim_uid = pwd.getpwnam("Debian-exim").pw_uid
        grp.getgrnam("Debian-exim")
    except KeyError:
        pytest.skip("no Debian-exim user")
    nobody = pwd.getpwnam("nobody").pw_uid
    trust = PeerTrust(socket_group="Debian-exim", admin_group="Debian-exim")
    looked_up_in: list[str] = []
    real = trust_module.groups_of

    def recording(uid: int, gid: int | None = None) -> frozenset[int]:
        looked_up_in.append(threading.current_thread().name)
        return real(uid, gid)

    async def run() -> None:
        loop_thread = threading.current_thread().name
        exim, other = Peer("tcp", exim_uid), Peer("tcp", nobody)
        assert trust.known_use(Peer("tcp", 0)) is True and trust.known_use(Peer("tcp")) is False
        assert trust.known_use(exim) is None and trust.known_use(other) is None
        assert await trust.check_use(exim) is True
        assert await trust.check_use(other) is False
        assert trust.known_use(exim) is True and trust.known_use(other) is False
        assert loop_thread not in looked_up_in and len(looked_up_in) == 2
        # Control verbs: Unix socket only; the admin group's members (cached the same way).
        assert trust.known_admin(Peer("tcp", 0)) is False
        assert trust.known_admin(Peer("unix", exim_uid)) is True
        assert await trust.check_admin(Peer("unix", nobody)) is False
        assert len(looked_up_in) == 2

    trust_module.groups_of = recording  # type: ignore[assignment]
    try:
        asyncio.run(run())
    finally:
        trust_module.groups_of = real


def test_a_hung_group_lookup_is_not_waited_for_and_not_trusted(
        caplog: pytest.LogCaptureFixture) -> None:
    """NSS that hangs (an LDAP server gone): the request waits at most the lookup timeout,
    the peer is not trusted, nothing is remembered, and one lookup runs per uid."""
    import asyncio
    import threading

    from lookupd import trust as trust_module
    from lookupd.protocol import Peer
    from lookupd.trust import PeerTrust

    release = threading.Event()
    calls: list[int] = []

    def hung(uid: int, gid: int | None = None) -> frozenset[int]:
        calls.append(uid)
        release.wait(10)
        return frozenset({0})

    async def run() -> None:
        trust = PeerTrust(socket_group="root")
        peer = Peer("tcp", 4242)
        results = await asyncio.gather(trust.check_use(peer), trust.check_use(peer))
        assert results == [False, False]
        assert calls == [4242]  # one lookup for both requests
        assert trust.known_use(peer) is None  # not remembered: asked again next time
        release.set()

    real, seconds = trust_module.groups_of, trust_module._LOOKUP_SECONDS
    trust_module.groups_of = hung  # type: ignore[assignment]
    trust_module._LOOKUP_SECONDS = 0.2
    try:
        asyncio.run(run())
    finally:
        trust_module.groups_of, trust_module._LOOKUP_SECONDS = real, seconds
        release.set()
    assert "took more than 0.2s (NSS: is LDAP or sssd slow?)" in caplog.text
