"""Reload and start-up as a first-class path, against real `lookupd serve` processes.

- A SIGHUP swaps everything built from the configuration at once: every verb answers from the
  new configuration, and still does after the old set has been closed.
- SIGHUPs that overlap are folded together and leave no thread, descriptor or source set
  behind.
- A configuration lookupd cannot load never leaves Exim a socket that refuses: lookupd
  listens, answers fail-open (every source unknown, every connect accepted), says why once,
  and a SIGHUP with a good configuration brings it back.
- On loopback TCP only Exim (or root) may read or record user state.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import FIREWALL, MAXMIND, REPO, Lookupd, ask, ask_tcp, free_port, short_dir
from test_connect_daemon import CLEAN, INCIDENTS, LISTED, PTR_OK, ConnectLab, connect_lab, fields

NOBODY = 65534


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectLab]:
    for tool in ("rbldnsd", "knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with connect_lab(tmp_path_factory.mktemp("reload-lab")) as running:
        yield running


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def open_files(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(fd))
        except OSError:
            pass
    return found


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


# --- every verb from the new configuration after a reload ------------------------------------

def config_a(lab: ConnectLab, workdir: Path) -> str:
    return f"""
[server]
socket_mode = "0666"
[geoip]
country_db = "{MAXMIND / 'GeoIP2-Country-Test.mmdb'}"
asn_db = "{MAXMIND / 'GeoLite2-ASN-Test.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
[dnsbl]
nameservers = ["127.0.0.1:{lab.resolver_port}"]
deadline = "1s"
[[dnsbl.list]]
zone = "bl.test"
families = ["ipv4"]
query_special = true
[connect]
incidents_threshold = 10
deadline = "2s"
[users]
limit = 3
notify_command = ""
"""


def config_b(lab: ConnectLab, workdir: Path) -> str:
    """Every section changed so that each verb's answer differs from config_a's."""
    return f"""
[server]
socket_mode = "0666"
[geoip]
country_db = "{MAXMIND / 'GeoIP2-Country-Test.mmdb'}"
country_field = "registered_country"
asn_db = "{workdir / 'no-asn.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
nftfw_column = "incidents"
[dnsbl]
nameservers = ["127.0.0.1:{lab.resolver_port}"]
deadline = "1s"
[[dnsbl.list]]
zone = "bl.test"
families = ["ipv4"]
codes = ["127.0.0.3"]
query_special = true
[connect]
incidents_threshold = 10
deny_countries = ["US"]
deadline = "2s"
[users]
limit = 2
notify_command = ""
"""


def answers(daemon: Lookupd, tag: str) -> dict[str, str]:
    """One request of every verb (user verbs on a user of its own per call)."""
    return {
        "ping": daemon.query("ping"),
        "version": daemon.query("version"),
        "country": daemon.query(f"country {CLEAN}"),
        "asn": daemon.query("asn 1.128.0.1"),
        "incidents": daemon.query(f"incidents {INCIDENTS}"),
        "dnsbl": fields(daemon.query(f"dnsbl {LISTED}"))["verdict"],
        "dbl": fields(daemon.query("dbl example.test"))["verdict"],
        "ptr": daemon.query(f"ptr {PTR_OK}"),
        "stats": daemon.query("stats").split()[2].split("=")[0],
        "connect-clean": fields(daemon.query(f"connect {CLEAN} 25"))["action"],
        "connect-incidents": fields(daemon.query(f"connect {INCIDENTS} 25"))["action"],
        "user-fail": " ".join(daemon.query(f"user-fail u-{tag} gone{i}@example.test")
                              .split()[0] for i in range(2)),
        "user": daemon.query(f"user u-{tag}").split()[0],
        "user-block": daemon.query(f"user-block b-{tag} testing"),
        "user-unblock": daemon.query(f"user-unblock b-{tag}"),
    }


def test_sighup_swaps_every_verb_and_keeps_answering_after_the_old_set_closes(
        start_lookupd: StartLookupd, lab: ConnectLab, sockdir: Path) -> None:
    daemon = start_lookupd(config_a(lab, sockdir))
    assert daemon.proc is not None
    before = answers(daemon, "a1")
    assert before == {
        "ping": "pong", "version": before["version"], "country": "GB",
        "asn": "AS1221 Telstra Pty Ltd", "incidents": "42", "dnsbl": "listed",
        "dbl": "clean", "ptr": "name=mail.example.test fcrdns=yes", "stats": "bl.test",
        "connect-clean": "accept", "connect-incidents": "deny", "user-fail": "ok ok",
        "user": "ok", "user-block": before["user-block"], "user-unblock": before["user-unblock"],
    }
    assert before["user-block"].startswith("blocked")
    assert before["user-unblock"].startswith("ok")
    # Asked again, connect and dnsbl come from their reply caches: a reload must not keep them.
    for _ in range(2):
        assert fields(daemon.query(f"connect {CLEAN} 25"))["action"] == "accept"
        assert fields(daemon.query(f"dnsbl {LISTED}"))["verdict"] == "listed"

    daemon.config_path.write_text(config_b(lab, sockdir))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration and databases reloaded" in daemon.log())
    expected = {
        # registered_country: 81.2.69.142 is registered in the US
        "country": "US", "asn": "??", "incidents": "8",
        # 127.0.0.2 is no longer a listing code; US is denied; 8 incidents are under 10
        "dnsbl": "clean", "connect-clean": "deny", "connect-incidents": "accept",
        # limit 2: the second invalid recipient blocks
        "user-fail": "ok blocked", "user": "blocked",
    }
    after = answers(daemon, "b1")
    assert {k: after[k] for k in expected} == expected, after
    assert after["ptr"] == before["ptr"] and after["ping"] == "pong"
    assert after["user-block"].startswith("blocked") and after["user-unblock"].startswith("ok")

    # The old set is closed as soon as nothing in flight uses it: its ASN database goes.
    asn_db = str(MAXMIND / "GeoLite2-ASN-Test.mmdb")
    wait_for(lambda: asn_db not in open_files(daemon.proc.pid))  # type: ignore[union-attr]
    later = answers(daemon, "b2")
    assert {k: later[k] for k in expected} == expected, later
    assert "Traceback" not in daemon.log() and "ERROR" not in daemon.log()


def test_overlapping_sighups_are_folded_and_leak_nothing(
        start_lookupd: StartLookupd, lab: ConnectLab, sockdir: Path) -> None:
    daemon = start_lookupd(config_a(lab, sockdir))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    assert daemon.query(f"connect {INCIDENTS} 25").startswith("action=deny")
    # A first burst of reloads starts the worker threads (and the sqlite handles they keep)
    # that later reloads reuse: the baseline is a daemon that has already reloaded in a burst.
    for _ in range(10):
        daemon.signal(signal.SIGHUP)
        time.sleep(0.04)
    wait_for(lambda: daemon.log().count("configuration and databases reloaded") >= 1)
    time.sleep(3.0)
    warmed_up = daemon.log().count("configuration and databases reloaded")
    threads_before, files_before = threads(pid), sorted(open_files(pid))
    fds_before = len(files_before)

    stop = threading.Event()
    replies: list[str] = []

    def client() -> None:
        while not stop.is_set():
            replies.append(daemon.query(f"connect {INCIDENTS} 25"))

    runner = threading.Thread(target=client)
    runner.start()
    try:
        for _ in range(50):
            daemon.signal(signal.SIGHUP)
            time.sleep(0.04)
    finally:
        stop.set()
        runner.join()
    def reloads() -> int:
        return daemon.log().count("configuration and databases reloaded") - warmed_up

    wait_for(lambda: reloads() >= 1, timeout=10)  # a loaded machine may still be at it
    assert reloads() < 50, reloads()  # folded, yet the signals were honoured
    # Every retired set is closed: no thread or descriptor per reload is left. Allowed slack:
    # asyncio's worker pool may still grow to its bound (min(32, cores + 4) threads), and
    # sqlite keeps the descriptor of a closed connection open while another connection of
    # the process still locks the same file (it closes it later): one descriptor.
    def settled() -> bool:
        files = open_files(pid)
        # A retired set writes its DNS cache snapshot as it closes: wait for that too.
        return (threads(pid) <= threads_before + 2 and len(files) <= fds_before + 1
                and set(files) <= set(files_before))

    try:
        wait_for(settled, timeout=20)
    except AssertionError:
        now = sorted(open_files(pid))
        raise AssertionError(f"threads {threads_before} -> {threads(pid)}, fds {fds_before} -> "
                             f"{len(now)}: {files_before} -> {now}") from None
    assert replies and all(r.startswith("action=deny rule=incidents") for r in replies), \
        {r for r in replies if not r.startswith("action=deny rule=incidents")}
    assert "Traceback" not in daemon.log()


# --- a configuration that cannot be loaded ---------------------------------------------------

BROKEN = '[geoip]\ncountry_db = "x.mmdb"\n[connect]\nincidents_treshold = 5\n'


def assert_fail_open(query: Callable[[str], str]) -> None:
    assert query("ping") == "pong"
    connect = query(f"connect {INCIDENTS} 25")
    assert fields(connect) | {"reason": ""} == {
        "action": "accept", "rule": "none", "would": "none", "reason": "", "country": "??",
        "asn": "??", "incidents": "??", "dnsbl": "unknown", "dnsbl_lists": '""',
        "ptr": "??", "fcrdns": "unknown", "allowlisted": "no", "helo_dbl": "clean",
        "strikes": "0"}, connect
    # A HELO cannot be checked either: unknown, never a reason to refuse.
    helo = fields(query(f"connect {INCIDENTS} 25 mail.example.net"))
    assert (helo["action"], helo["helo_dbl"]) == ("accept", "unknown")
    assert 'reason="lookupd runs without its configuration: nothing checked"' in connect
    assert query(f"country {CLEAN}") == "??"
    assert query(f"incidents {INCIDENTS}") == "??"
    assert fields(query(f"dnsbl {LISTED}"))["verdict"] == "unknown"
    for _ in range(5):
        assert query("user-fail mallory gone@example.test") == "ok"
    assert query("user mallory") == "ok"
    assert query("user-block mallory x").startswith("error lookupd runs without its "
                                                    "configuration")
    assert query("country not-an-ip") == 'error not an IP address: "not-an-ip"'


def test_broken_config_answers_fail_open_then_recovers_on_sighup(
        start_lookupd: StartLookupd, sockdir: Path) -> None:
    daemon = start_lookupd(BROKEN)
    assert_fail_open(daemon.query)
    for _ in range(20):
        daemon.query(f"connect {CLEAN} 25")
    log = daemon.log()
    assert log.count("connect.incidents_treshold") == 1, log  # once, not per connection
    assert "answering FAIL-OPEN" in log and "Traceback" not in log

    daemon.signal(signal.SIGHUP)  # still broken
    wait_for(lambda: "configuration still refused" in daemon.log())
    assert_fail_open(daemon.query)

    daemon.config_path.write_text(
        f'[geoip]\ncountry_db = "{MAXMIND / "GeoIP2-Country-Test.mmdb"}"\n'
        f'[incidents]\ndb = "{FIREWALL / "nftfw-firewall.db"}"\n'
        '[dnsbl]\nlist = []\nnameservers = ["127.0.0.1:9"]\n[users]\nnotify_command = ""\n')
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration loaded; lookupd checks clients again" in daemon.log())
    assert daemon.query(f"country {CLEAN}") == "GB"
    assert daemon.query(f"connect {INCIDENTS} 25").startswith("action=deny rule=incidents")


def test_broken_config_keeps_the_files_server_section(sockdir: Path) -> None:
    """The socket of a broken file is still the admin's (its [server] is valid on its own)."""
    workdir = short_dir()
    try:
        sock = workdir / "admins.sock"
        config = workdir / "c.toml"
        config.write_text(f'[server]\nsocket = "{sock}"\nsocket_mode = "0600"\n'
                          '[dnsbl]\ndeadline = "forever"\n')
        log = open(workdir / "log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "lookupd", "serve", "--config",
                                 str(config), "--state-dir", str(workdir)],
                                stdout=log, stderr=log, cwd=REPO)
        try:
            wait_for(sock.exists)
            wait_for(lambda: _answers(sock))
            assert ask(sock, b"connect 203.0.113.7").startswith(b"action=accept")
            assert sock.stat().st_mode & 0o777 == 0o600
            assert "dnsbl.deadline" in (workdir / "log").read_text()
        finally:
            proc.terminate()
            assert proc.wait(10) == 0
            log.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _answers(path: Path) -> bool:
    try:
        return ask(path, b"ping", 1.0) == b"pong"
    except OSError:
        return False


def test_broken_config_under_socket_activation(sockdir: Path) -> None:
    """systemd-socket-activate holds the socket; lookupd with a broken configuration still
    takes it and answers fail-open, and says why once, not once per connection."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = sockdir / "activated.sock"
    config = sockdir / "c.toml"
    config.write_text(BROKEN)
    log_path = sockdir / "log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [activate, "-l", str(path), "-E", "PYTHONPATH",
         sys.executable, "-m", "lookupd", "serve", "--config", str(config),
         "--state-dir", str(sockdir)],
        stdout=log, stderr=log, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(path.exists)
        # The first connection starts lookupd; it is answered, fail-open.
        assert ask(path, f"connect {INCIDENTS} 25".encode(), 15.0).startswith(b"action=accept")
        assert_fail_open(lambda q: ask(path, q.encode()).decode())
        for _ in range(20):
            assert ask(path, b"ping") == b"pong"
        text = log_path.read_text()
        assert text.count("connect.incidents_treshold") == 1, text
        assert "socket-activated" in text and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# --- user state over loopback TCP: Exim and root only ----------------------------------------

def as_nobody(port: int, request: str) -> str:
    """One request over TCP from a process running as uid nobody."""
    code = ("import socket,sys\n"
            f"s=socket.create_connection(('127.0.0.1',{port}),timeout=5)\n"
            f"s.sendall({request.encode()!r}); s.shutdown(socket.SHUT_WR)\n"
            "d=b''\n"
            "while (c:=s.recv(4096)): d+=c\n"
            "sys.stdout.write(d.decode())\n")
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", sys.executable, "-c", code],
                         capture_output=True, timeout=20, check=True)
    return out.stdout.decode()


@pytest.fixture
def tcp_daemon(start_lookupd: StartLookupd) -> Iterator[tuple[Lookupd, int]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    port = free_port()
    daemon = start_lookupd('[users]\nlimit = 3\nnotify_command = ""\n', tcp_port=port)
    yield daemon, port


def test_other_local_users_cannot_touch_user_state_over_tcp(
        tcp_daemon: tuple[Lookupd, int]) -> None:
    daemon, port = tcp_daemon
    # Another local user can ask what any local user could find out anyway...
    assert as_nobody(port, "ping") == "pong"
    assert as_nobody(port, f"connect {CLEAN} 25").startswith("action=accept")
    # ...but can neither record events (which would get alice's mail frozen) nor read state.
    for i in range(5):
        assert as_nobody(port, f"user-fail alice gone{i}@example.test") == \
            "error not permitted"
    assert as_nobody(port, "user alice") == "error not permitted"
    assert as_nobody(port, "user-block alice x") == "error not permitted"
    assert daemon.query("user alice") == "ok"  # nothing was counted
    assert "user-fail refused on TCP: the client (uid 65534) is not Exim or root" in daemon.log()

    # Root (and Exim's own user) may, on TCP as on the socket.
    for i in range(3):
        reply = ask_tcp(port, f"user-fail alice gone{i}@example.test".encode()).decode()
    assert reply.startswith("blocked")
    assert ask_tcp(port, b"user alice").decode().startswith("blocked")
    # Administrative verbs stay on the Unix socket.
    assert ask_tcp(port, b"user-unblock alice") == b"error not permitted"


def test_exims_user_may_use_user_state_over_tcp(tcp_daemon: tuple[Lookupd, int]) -> None:
    import pwd

    daemon, port = tcp_daemon
    try:
        exim = pwd.getpwnam("Debian-exim")
    except KeyError:
        pytest.skip("no Debian-exim user")
    code = ("import socket,sys\n"
            f"s=socket.create_connection(('127.0.0.1',{port}),timeout=5)\n"
            "s.sendall(b'user-fail bob gone@example.test'); s.shutdown(socket.SHUT_WR)\n"
            "sys.stdout.write(s.recv(4096).decode())\n")
    out = subprocess.run(["setpriv", f"--reuid={exim.pw_uid}", f"--regid={exim.pw_gid}",
                          "--init-groups", sys.executable, "-c", code],
                         capture_output=True, timeout=20, check=True)
    assert out.stdout.decode() == "ok"
    assert "refused on TCP" not in daemon.log()


def test_tcp_owner_lookup_sees_the_peer() -> None:
    """The kernel lookup behind the check, on a plain loopback connection of this process."""
    from lookupd.peercred import tcp_peer_uid

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert tcp_peer_uid(conn) == os.geteuid()


# --- `lookupd reload`: what systemctl reload runs, and it says whether the file was taken ----

def lookupd_cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return subprocess.run([*prefix, sys.executable, "-m", "lookupd", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_reload_command_says_whether_the_configuration_was_taken(
        start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd('[server]\nsocket_mode = "0666"\n'
                           f'[geoip]\ncountry_db = "{MAXMIND / "GeoIP2-Country-Test.mmdb"}"\n')
    taken = lookupd_cli("reload", "--socket", str(daemon.socket))
    assert (taken.returncode, taken.stdout) == (0, f"lookupd at {daemon.socket}: "
                                                   "configuration reloaded\n"), taken.stderr
    daemon.config_path.write_text('[geoip]\ncountry_fieldd = "x"\n')
    refused = lookupd_cli("reload", "--socket", str(daemon.socket))
    assert refused.returncode == os.EX_CONFIG, refused
    assert "refused" in refused.stderr and "geoip.country_fieldd" in refused.stderr
    assert daemon.query(f"country {CLEAN}") == "GB"  # still the old configuration
    if os.geteuid() == 0:
        other = lookupd_cli("reload", "--socket", str(daemon.socket), user=NOBODY)
        assert other.returncode == os.EX_NOPERM, other
        assert "not permitted" in other.stderr


def test_reload_command_brings_a_fail_open_daemon_back(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd(BROKEN)
    assert daemon.query(f"country {CLEAN}") == "??"
    daemon.config_path.write_text(
        f'[geoip]\ncountry_db = "{MAXMIND / "GeoIP2-Country-Test.mmdb"}"\n'
        '[dnsbl]\nlist = []\nnameservers = ["127.0.0.1:9"]\n[users]\nnotify_command = ""\n')
    taken = lookupd_cli("reload", "--socket", str(daemon.socket))
    assert taken.returncode == 0, taken.stderr
    assert daemon.query(f"country {CLEAN}") == "GB"


def test_query_help_lists_every_verb() -> None:
    from lookupd.dispatch import Dispatcher

    shown = lookupd_cli("query", "--help").stdout
    for verb in Dispatcher.fail_open("test").table:
        assert f"\n  {verb}" in shown, verb
