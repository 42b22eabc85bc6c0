"""The real daemon on a real socket: golden replies, bad and hostile clients, lifecycle."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import FIREWALL, MAXMIND, REPO, ask, ask_tcp, free_port, read_all, with_test_defaults

from lookupd import __version__
from lookupd.config import Config
from lookupd.dispatch import Dispatcher
from lookupd.protocol import Document
from lookupd.server import Server

GOLDEN = REPO / "tests" / "data" / "golden.tsv"


def golden_rows() -> list[tuple[bytes, str]]:
    rows = []
    for line in GOLDEN.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        request, reply = line.split("\t", 1)
        rows.append((ast.literal_eval(f"b'{request}'"), reply))
    return rows


CONFIG = f"""
[geoip]
country_db = "{MAXMIND / 'GeoIP2-Country-Test.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
"""


@pytest.fixture
def daemon(start_lookupd: StartLookupd):  # type: ignore[no-untyped-def]
    return start_lookupd(CONFIG, tcp_port=free_port())


def test_golden_table(daemon) -> None:  # type: ignore[no-untyped-def]
    rows = golden_rows()
    assert len(rows) > 30
    failures = []
    for request, expected in rows:
        got = ask(daemon.socket, request).decode()
        if got != expected:
            failures.append((request, expected, got))
    assert not failures
    assert daemon.query("version") == f"lookupd {__version__}"


def test_tcp_listener_answers_like_the_socket(daemon) -> None:  # type: ignore[no-untyped-def]
    assert ask_tcp(daemon.tcp_port, b"country 81.2.69.142") == b"GB"
    assert ask_tcp(daemon.tcp_port, b"incidents 203.0.113.7\n") == b"42"


def test_split_writes_are_joined(daemon) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        for part in (b"coun", b"try 81.2", b".69.142"):
            sock.sendall(part)
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"GB"


def test_newline_without_half_close_is_answered_at_once(daemon) -> None:  # type: ignore[no-untyped-def]
    # Exim with shutdown=no: the request ends at the newline, the reply must not wait for EOF.
    started = time.monotonic()
    assert ask(daemon.socket, b"country 81.2.69.142\n", half_close=False) == b"GB"
    assert time.monotonic() - started < 2.0


def test_bytes_after_the_newline_are_ignored(daemon) -> None:  # type: ignore[no-untyped-def]
    assert ask(daemon.socket, b"ping\ncountry 81.2.69.142\n") == b"pong"


def _timeout_case(daemon, send: list[bytes], gap: float) -> bytes:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        for part in send:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # lookupd gave up on us: read its answer
            time.sleep(gap)
        return read_all(sock)


@pytest.mark.parametrize(
    ("name", "send", "gap"),
    [
        ("silent", [], 0.0),
        ("no newline, never half-closes", [b"country 81.2.69.142"], 0.0),
        ("slow drip", [b"c", b"o", b"u", b"n", b"t", b"r", b"y"], 0.3),
    ],
)
def test_clients_that_never_finish_are_closed_after_the_read_timeout(
        start_lookupd: StartLookupd, name: str, send: list[bytes], gap: float) -> None:
    daemon = start_lookupd(CONFIG + "[server]\nread_timeout = \"1s\"\n")
    started = time.monotonic()
    # Another client is answered at once while this one hangs.
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(_timeout_case(daemon, send, gap)))
    thread.start()
    time.sleep(0.2)
    assert daemon.query("ping") == "pong"
    thread.join(10)
    assert result == [b"error request not received in time"]
    assert 0.9 < time.monotonic() - started < 5
    assert daemon.log().count("no complete request within 1.0s") == 1


def test_oversized_requests(daemon) -> None:  # type: ignore[no-untyped-def]
    assert ask(daemon.socket, b"x" * 513) == b"error request longer than 512 bytes"
    assert ask(daemon.socket, b"country " + b"1" * 600 + b"\n") == \
        b"error request longer than 512 bytes"
    # 10 MB: the daemon drops the excess and answers once; the client may see EPIPE.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        try:
            sock.sendall(b"A" * 10_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert daemon.query("ping") == "pong"
    # Said once for each of the two ways it happens (ended in time, or still sending); the
    # repeats are summarised (test_flood.py).
    assert 1 <= daemon.log().count("longer than 512 bytes") <= 2


def test_client_that_leaves_before_the_answer(daemon) -> None:  # type: ignore[no-untyped-def]
    for _ in range(50):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(daemon.socket))
            sock.sendall(b"country 81.2.69.142")
            sock.shutdown(socket.SHUT_WR)
        # closed without reading
    assert daemon.query("ping") == "pong"
    assert "Traceback" not in daemon.log()


def test_many_idle_clients_do_not_block_others(daemon) -> None:  # type: ignore[no-untyped-def]
    idle = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(daemon.socket))
        idle.append(sock)
    try:
        started = time.monotonic()
        assert daemon.query("country 81.2.69.142") == "GB"
        # Far below read_timeout (3s), which answering behind the idle clients would take.
        assert time.monotonic() - started < 2.5
    finally:
        for sock in idle:
            sock.close()


def test_each_bad_request_logs_one_line(daemon) -> None:  # type: ignore[no-untyped-def]
    before = len(daemon.log().splitlines())
    assert daemon.query(b"frobnicate") == 'error unknown verb "frobnicate"'
    assert daemon.query(b"ping\x00") == "error request is not printable ASCII"
    assert daemon.query(b"country bogus") == 'error not an IP address: "bogus"'
    time.sleep(0.2)
    new = daemon.log().splitlines()[before:]
    assert len(new) == 3, new
    assert all("WARNING" in line for line in new)
    assert "\x00" not in "".join(new)


def test_stale_socket_is_removed(start_lookupd: StartLookupd, sockdir: Path) -> None:
    daemon = start_lookupd(CONFIG, wait=False)
    daemon.stop()
    # A socket file nobody listens on, as a killed daemon leaves it.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.socket))
    stale.close()
    assert daemon.socket.exists()
    with pytest.raises(ConnectionRefusedError):
        ask(daemon.socket, b"ping")
    daemon.start()
    assert daemon.query("ping") == "pong"
    assert "removed stale socket" in daemon.log()


def test_live_socket_is_not_stolen(start_lookupd: StartLookupd) -> None:
    first = start_lookupd(CONFIG)
    proc = subprocess.run(
        [sys.executable, "-m", "lookupd", "serve", "--socket", str(first.socket),
         "--state-dir", str(first.workdir / "state")],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert proc.returncode == os.EX_UNAVAILABLE
    assert "another lookupd is already answering on" in proc.stderr
    assert first.query("ping") == "pong"


def test_sigterm_stops_cleanly_and_removes_the_socket(daemon) -> None:  # type: ignore[no-untyped-def]
    assert daemon.query("ping") == "pong"
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "Traceback" not in daemon.log()


def test_sighup_reloads_config_and_refuses_a_bad_one(daemon) -> None:  # type: ignore[no-untyped-def]
    assert daemon.query("country 81.2.69.142") == "GB"
    # 81.2.69.142 is in GB but registered in the US (MaxMind's test data).
    daemon.config_path.write_text(CONFIG.replace(
        "[geoip]", '[geoip]\ncountry_field = "registered_country"'))
    daemon.signal(signal.SIGHUP)
    _wait_for(lambda: daemon.query("country 81.2.69.142") == "US")
    daemon.config_path.write_text("[geoip]\nbogus = 1\n")
    daemon.signal(signal.SIGHUP)
    _wait_for(lambda: "new configuration refused" in daemon.log())
    assert "geoip.bogus" in daemon.log()
    assert daemon.query("country 81.2.69.142") == "US"


def test_no_databases_answers_unknown_and_says_why(start_lookupd: StartLookupd,
                                                   sockdir: Path) -> None:
    daemon = start_lookupd(f'[geoip]\ncountry_db = "{sockdir}/none.mmdb"\n'
                           f'[incidents]\ndb = "{sockdir}/none.db"\n')
    assert daemon.query("country 81.2.69.142") == "??"
    assert daemon.query("incidents 203.0.113.7") == "??"
    assert daemon.query("country 10.0.0.1") in ("--", "??")
    assert "none.mmdb" in daemon.log()


def test_query_command(daemon, sockdir: Path) -> None:  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "lookupd", "query", "--socket", str(daemon.socket)]
    out = subprocess.run([*cmd, "country", "81.2.69.142"], capture_output=True, text=True,
                         cwd=REPO, timeout=30, check=False)
    assert (out.returncode, out.stdout) == (0, "GB\n")
    assert " ms" in out.stderr
    out = subprocess.run([*cmd, "frobnicate"], capture_output=True, text=True, cwd=REPO,
                         timeout=30, check=False)
    assert out.returncode == os.EX_DATAERR
    out = subprocess.run([sys.executable, "-m", "lookupd", "query", "--socket",
                          str(sockdir / "nothing"), "ping"], capture_output=True, text=True,
                         cwd=REPO, timeout=30, check=False)
    assert out.returncode == os.EX_UNAVAILABLE
    assert "lookupd is not answering on" in out.stderr
    assert "systemctl start lookupd.socket" in out.stderr
    out = subprocess.run([sys.executable, "-m", "lookupd", "query", "--tcp",
                          f"127.0.0.1:{daemon.tcp_port}", "ping"], capture_output=True,
                         text=True, cwd=REPO, timeout=30, check=False)
    assert (out.returncode, out.stdout) == (0, "pong\n")


def test_query_local_needs_no_daemon(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    # Its own state dir: never the system's /var/lib/lookupd.
    config.write_text(with_test_defaults(f'[server]\nstate_dir = "{tmp_path}/state"\n'
                                         + CONFIG))
    out = subprocess.run([sys.executable, "-m", "lookupd", "query", "--config", str(config),
                          "--local", "incidents", "203.0.113.7"], capture_output=True,
                         text=True, cwd=REPO, timeout=30, check=False)
    assert (out.returncode, out.stdout) == (0, "42\n")


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_sigterm_lets_requests_in_flight_finish(start_lookupd: StartLookupd) -> None:
    # A nameserver that never answers keeps a dnsbl request in flight until its deadline.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        daemon = start_lookupd(CONFIG + f"""
[dnsbl]
nameservers = ["127.0.0.1:{port}"]
deadline = "3s"
[[dnsbl.list]]
zone = "bl.test"
query_special = true  # 192.0.2.1 is a documentation address: asked only so
""")
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(daemon.query("dnsbl 192.0.2.1")))
        thread.start()
        time.sleep(1.0)  # the request is in (even on a loaded machine) and waits for 3s
        assert daemon.stop() == 0
        thread.join(10)
    assert len(result) == 1 and result[0].startswith("verdict=unknown"), result
    assert "finishing requests in flight" in daemon.log()


@pytest.mark.parametrize(("db", "field"), [("GeoIP2-Country-Test", "country"),
                                           ("GeoLite2-Country-Test", "country"),
                                           ("GeoIP2-Country-Test", "registered_country")])
def test_every_maxmind_test_network_through_the_socket(start_lookupd: StartLookupd, db: str,
                                                       field: str) -> None:
    """Each network's first and last address in MaxMind's JSON, asked over the socket."""
    from geoip_expect import country_expectations

    daemon = start_lookupd(f'[geoip]\ncountry_db = "{MAXMIND / (db + ".mmdb")}"\n'
                           f'country_field = "{field}"\n')
    expected = country_expectations(MAXMIND / (db + ".json"), field)
    assert len(expected) > 400
    wrong = [(ip, want, got) for ip, want in expected
             if (got := daemon.query(f"country {ip}")) != want]
    assert not wrong, wrong[:10]


def test_asn_through_the_socket(start_lookupd: StartLookupd) -> None:
    from geoip_expect import asn_expectations

    daemon = start_lookupd(f'[geoip]\nasn_db = "{MAXMIND / "GeoLite2-ASN-Test.mmdb"}"\n')
    expected = asn_expectations(MAXMIND / "GeoLite2-ASN-Test.json")
    checked = 0
    for ip, number, organisation in expected[::7]:
        got = daemon.query(f"asn {ip}")
        if number is None:
            assert got == "--", ip
        else:
            assert got == f"AS{number} {organisation}".rstrip(), (ip, got)
        checked += 1
    assert checked > 100
    assert daemon.query("asn 10.0.0.1") == "--"


def test_a_burst_of_connections_waits_in_the_backlog(daemon) -> None:  # type: ignore[no-untyped-def]
    """While lookupd cannot accept (stopped here with SIGSTOP; in life: busy, restarting),
    500 connections queue in the listen backlog instead of failing."""
    daemon.signal(signal.SIGSTOP)
    waiting = []
    try:
        for _ in range(500):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            sock.connect(str(daemon.socket))  # BlockingIOError when the backlog is full
            waiting.append(sock)
    finally:
        daemon.signal(signal.SIGCONT)
        for sock in waiting:
            sock.close()
    assert len(waiting) == 500
    assert daemon.query("ping") == "pong"


def test_bad_clients_leak_no_connection(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd(CONFIG + "[server]\nread_timeout = \"500ms\"\n")
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    for request, half_close in [(b"", True), (b"x" * 5000, True), (b"ping\x00", True),
                                (b"\xff\xfe", True), (b"frobnicate", True),
                                (b"country", False), (b"", False)]:
        for _ in range(20):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(daemon.socket))
                try:
                    sock.sendall(request)
                    if half_close:
                        sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if half_close:
                    read_all(sock)
    time.sleep(1.0)  # the ones that never half-closed time out after 0.5 s
    _wait_for(lambda: len(list(fds.iterdir())) <= before)
    assert daemon.query("ping") == "pong"


def test_socket_belongs_to_exims_group_by_default(daemon) -> None:  # type: ignore[no-untyped-def]
    import grp

    from lookupd.config import EXIM_GROUPS

    st = daemon.socket.stat()
    assert oct(st.st_mode & 0o777) == oct(0o660)
    expected = next((g.gr_gid for name in EXIM_GROUPS
                     for g in grp.getgrall() if g.gr_name == name), os.getgid())
    assert st.st_gid == expected


async def test_a_reply_longer_than_the_socket_buffer_is_sent_whole() -> None:
    """A reply the socket cannot take at once (a long `metrics` Document, a slow reader) is
    finished by a task, which then closes the connection and forgets it."""
    server = Server(Config(), Dispatcher.fail_open("test"))
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reply = Document("x" * 4_000_000 + "\n")
    server.send(ours, reply, "metrics", 1.0, None)
    assert len(server.connections) == 1 and server.tasks  # the rest waits for the reader
    got = bytearray()
    loop = asyncio.get_running_loop()
    with theirs:
        while chunk := await loop.sock_recv(theirs, 1 << 16):
            got += chunk
    assert got == reply.encode()
    await asyncio.gather(*server.tasks)
    assert not server.connections
    assert server.metrics.by_verb["metrics"][0] == 1
