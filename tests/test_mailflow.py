"""Issue 9: does mail survive every state lookupd can be in? A real Exim daemon per layout
(Debian's split conf.d, Sympl, the single file) and transport (Unix socket, inet:), real SMTP
clients, and the spool read back byte for byte.

States: lookupd running; its socket absent; a stale socket (lookupd SIGKILLed); lookupd hung
(SIGSTOP); restarted during a run of sessions; killed in the middle of an authenticated
session; a socket that refuses (bound, not listening: a failed socket unit); started with a
broken configuration (directly, and under systemd-socket-activate). In every one: no message
lost or altered, no clean client deferred or refused, the listed client refused only while
lookupd runs, one `lookupd down:` line per session that found lookupd unreachable.

The table of what happened is printed at the end of the module and written to
mailflow-summary.txt in pytest's base temp dir (or $LOOKUPD_MAILFLOW_SUMMARY).
$LOOKUPD_MAILFLOW_SNIPPETS=DIR runs the same test against another exim-snippets tree (for
instance `git archive HEAD exim-snippets | tar -x -C /tmp/head`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import test_snippets
from mailflow import (
    LISTED_IP,
    LISTED_MATCHES,
    LOCAL_RECIPIENT,
    RELAY_IP,
    UNKNOWN_RECIPIENT,
    Activated,
    EximDaemon,
    Message,
    NxdomainDns,
    PinnedLookupd,
    Row,
    Session,
    check_stored,
    client_ip,
    evaluate,
    lookupd_config,
    nftfw_db,
    ping,
    refusing_listener,
    smtp_session,
    table,
)
from support import EXIM, free_port, short_dir

pytestmark = [
    pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="an Exim daemon (-bd) needs root"),
]

LAYOUTS = ("debian", "sympl", "single")
TRANSPORTS = ("unix", "inet")
STATES = ("running", "absent", "stale", "hung", "restarted", "killed-mid-session", "refusing",
          "broken-config", "broken-config-activated")
TIMEOUT = 2  # LOOKUPD_TIMEOUT in seconds (the snippets' default is 3s): the hung state's cost
BROKEN_KEY = "bogus_mailflow_key"  # an unknown key in [connect]
AUTH_USER = "carol"
STRIKE_USER = "mallory"  # AUTH refused (no TLS): a strike when the session ends

# spool_directory and log_file_path from the command line's -D macros (EximDaemon sets them).
# Debian's main/02_exim4-config_options honours SPOOLDIR itself; it has no log_file_path.
MAIN_EXTRA = {
    "debian": "log_file_path = LOGFILEPATH",
    "sympl": "spool_directory = SPOOLDIR\nlog_file_path = LOGFILEPATH\n",
    "single": "",  # has SPOOLDIR and LOGFILEPATH macros of its own
}


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def configs() -> Iterator[Callable[[str], Path]]:
    """Each layout built once, on first use, from this checkout's exim-snippets (or
    $LOOKUPD_MAILFLOW_SNIPPETS), in a directory Exim's user can traverse."""
    workdir = short_dir("mfcfg")
    built: dict[str, Path] = {}

    def config(layout: str) -> Path:
        if layout not in built:
            where = workdir / layout
            where.mkdir()
            if layout == "debian":
                built[layout] = test_snippets.build_debian(where, local_macros=MAIN_EXTRA[layout])
            else:
                built[layout] = test_snippets.BUILDERS[layout](where, MAIN_EXTRA[layout])
        return built[layout]

    with pytest.MonkeyPatch.context() as mp:
        if other := os.environ.get("LOOKUPD_MAILFLOW_SNIPPETS"):
            mp.setattr(test_snippets, "SNIPPETS", Path(other))
        yield config
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Path, int]]:
    """The firewall database (LISTED_IP over the threshold) and an NXDOMAIN DNS server."""
    workdir = short_dir("mfdb")
    db = nftfw_db(workdir / "firewall.db", {LISTED_IP: LISTED_MATCHES})
    dns = NxdomainDns()
    yield db, dns.port
    dns.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Lab:
    """One Exim daemon (one layout, one transport) and whatever stands at LOOKUPD_SOCKET."""

    layout: str
    transport: str
    workdir: Path
    firewall_db: Path
    dns_port: int
    lookupd_port: int = field(default_factory=free_port)
    exim: EximDaemon | None = None
    # Session seconds by number of messages, with lookupd running (the "running" state).
    healthy: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a state's choreography found wrong
    lookupds: list[PinnedLookupd] = field(default_factory=list)
    activated: list[Activated] = field(default_factory=list)
    refusing: list[socket.socket] = field(default_factory=list)
    started: int = 0  # lookupd instances so far: each gets its own workdir

    @property
    def socket_path(self) -> Path:
        return self.workdir / "lookupd.sock"

    @property
    def target(self) -> str:
        """Exim's LOOKUPD_SOCKET."""
        if self.transport == "unix":
            return str(self.socket_path)
        return f"inet:127.0.0.1:{self.lookupd_port}"

    @property
    def where(self) -> Path | int:
        """What Exim connects to: the socket path, or the loopback port."""
        return self.socket_path if self.transport == "unix" else self.lookupd_port

    @property
    def smtp(self) -> EximDaemon:
        assert self.exim is not None
        return self.exim

    def config(self, extra: str = "") -> str:
        return lookupd_config(self.firewall_db, self.dns_port, extra)

    def start_lookupd(self, extra: str = "", wait: bool = True) -> PinnedLookupd:
        """`lookupd serve` on the lab's socket path (and its port, for inet)."""
        self.started += 1
        daemon = PinnedLookupd(self.workdir / f"lookupd{self.started}", self.config(extra),
                               tcp_port=self.lookupd_port if self.transport == "inet" else None,
                               socket_path=self.socket_path)
        daemon.workdir.mkdir()
        self.lookupds.append(daemon)
        daemon.start(wait=False)
        if wait and not self.wait_answering(daemon):
            raise AssertionError(f"lookupd did not start:\n{daemon.log()}")
        return daemon

    def wait_answering(self, daemon: PinnedLookupd, timeout: float = 15.0) -> bool:
        """Until lookupd answers ping where Exim asks; False if it exits or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.where) == b"pong":
                return True
            if daemon.proc is not None and daemon.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def kill(self, daemon: PinnedLookupd, sig: int = signal.SIGKILL) -> None:
        assert daemon.proc is not None
        daemon.proc.send_signal(sig)
        daemon.proc.wait(15)

    def reset(self) -> None:
        """Nothing at LOOKUPD_SOCKET: every lookupd gone, no socket file, nothing on the port."""
        for daemon in self.lookupds:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)
                daemon.proc.kill()
            if daemon.proc is not None:
                daemon.proc.wait(15)
        for activated in self.activated:
            activated.stop()
        for sock in self.refusing:
            sock.close()
        self.lookupds, self.activated, self.refusing, self.notes = [], [], [], []
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # --- traffic ---

    def session(self, n_messages: int = 1, *, ip: str | None = None, expect_down: int | None = 0,
                listed: bool = False, strike: bool = False) -> Session:
        """`strike`: the client tries AUTH first (refused: no TLS), so the QUIT ACL sends
        lookupd a strike when the session ends; its mail goes on unauthenticated."""
        ip = ip or client_ip()
        sender = f"sender@{ip.replace('.', '-')}.example.net"
        messages = [Message.make(sender, LOCAL_RECIPIENT, f"{self.layout}-{self.transport}-{i}")
                    for i in range(n_messages)]
        done = smtp_session(self.smtp.port, ip, messages, sender=sender,
                            auth_user=STRIKE_USER if strike else None)
        done.expect_down, done.listed = expect_down, listed
        return done

    def standard(self, expect_down: int) -> list[Session]:
        """Two clean clients (one message; two messages in one session after a refused AUTH:
        a strike at QUIT) and the listed one."""
        return [self.session(1, expect_down=expect_down),
                self.session(2, expect_down=expect_down, strike=True),
                self.session(1, ip=LISTED_IP, expect_down=expect_down, listed=True)]


@pytest.fixture(scope="module", params=[(lay, tr) for lay in LAYOUTS for tr in TRANSPORTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def lab(request: pytest.FixtureRequest, configs: Callable[[str], Path],
        shared: tuple[Path, int]) -> Iterator[Lab]:
    layout, transport = request.param
    workdir = short_dir("mf")
    running = Lab(layout, transport, workdir, *shared)
    running.exim = EximDaemon(configs(layout), workdir / "exim",
                              {"LOOKUPD_SOCKET": running.target,
                               "LOOKUPD_TIMEOUT": f"{TIMEOUT}s"})
    try:
        running.exim.start()
        yield running
    finally:
        running.reset()
        running.smtp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Row]]:
    """Rows of the table, printed (past output capture) and written at the module's end."""
    rows: list[Row] = []
    yield rows
    if not rows:
        return
    notes = [f"  {r.layout} {r.transport} {r.state}: {len(r.problems)} problem(s), first: "
             f"{r.problems[0][:300]}" for r in rows if r.problems]
    text = table(rows) + ("\n\nproblems:\n" + "\n".join(notes) if notes else "") + "\n"
    path = Path(os.environ.get("LOOKUPD_MAILFLOW_SUMMARY")
                or tmp_path_factory.getbasetemp() / "mailflow-summary.txt")
    path.write_text(text)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_sep("-", "mail flow per lookupd state (tests/test_mailflow.py)")
            reporter.write(text)
            reporter.write_line(f"(written to {path})")


# --- the states -------------------------------------------------------------------------------

def state_running(lab: Lab) -> list[Session]:
    daemon = lab.start_lookupd()
    # Twice: the first session after a start is slower (cold caches), and the fastest of each
    # kind is the baseline the other states' extra seconds are measured against.
    sessions = lab.standard(expect_down=0) + lab.standard(expect_down=0)
    for s in sessions:  # the QUIT ACL's strike reached lookupd: one per refused AUTH
        want = 1 if len(s.sent) == 2 else 0
        got = daemon.query(f"connect {s.ip} 25").rsplit(" strikes=", 1)[-1]
        if not s.listed and got != str(want):
            lab.notes.append(f"[{s.ip}] strikes={got}, expected {want}")
    for n in (1, 2):
        lab.healthy[n] = min(s.seconds for s in sessions if len(s.sent) == n and not s.listed)
    return sessions


def state_absent(lab: Lab) -> list[Session]:
    assert not lab.socket_path.exists() and ping(lab.where) == b""
    return lab.standard(expect_down=1)


def state_stale(lab: Lab) -> list[Session]:
    lab.kill(lab.start_lookupd())
    if lab.transport == "unix":
        assert lab.socket_path.exists(), "SIGKILL should leave the socket file behind"
    return lab.standard(expect_down=1)


def state_hung(lab: Lab) -> list[Session]:
    daemon = lab.start_lookupd()
    daemon.signal(signal.SIGSTOP)
    sessions = lab.standard(expect_down=1)
    for s in sessions:  # it really waited for lookupd: Exim's timeout, not a refusal
        if s.seconds < TIMEOUT - 0.2:
            lab.notes.append(f"[{s.ip}] took {s.seconds:.2f}s: lookupd did not seem hung")
        if s.seconds > 2 * TIMEOUT + 2:
            lab.notes.append(f"[{s.ip}] took {s.seconds:.2f}s: more than twice LOOKUPD_TIMEOUT")
    return sessions


def state_restarted(lab: Lab) -> list[Session]:
    """24 sessions; lookupd stopped (SIGTERM) and started again after the 6th, then SIGKILLed
    and started again after the 15th. Sessions while it is surely gone must log one `lookupd
    down:` line; sessions while it answers, none; the ones racing its start, at most one."""
    sessions: list[Session] = []

    def run(count: int, expect: int | None = 0) -> None:
        for _ in range(count):
            expected = expect
            if expect is None and ping(lab.where) == b"pong":
                expected = 0  # it answers now, and nothing stops it before the session ends
            sessions.append(lab.session(1, expect_down=expected, strike=len(sessions) % 2 == 0))

    daemon = lab.start_lookupd()
    run(6)
    lab.kill(daemon, signal.SIGTERM)  # a clean stop: the socket file is removed
    run(2, expect=1)
    daemon = lab.start_lookupd(wait=False)
    run(5, expect=None)
    assert lab.wait_answering(daemon)
    run(2)
    lab.kill(daemon)  # SIGKILL: the socket file stays, refusing
    run(2, expect=1)
    daemon = lab.start_lookupd(wait=False)
    run(4, expect=None)
    assert lab.wait_answering(daemon)
    run(3)
    return sessions


def state_killed_mid_session(lab: Lab) -> list[Session]:
    """A local webmail's session (127.0.0.1, AUTH without TLS) passes the connect and AUTH
    ACLs with lookupd running; lookupd is SIGKILLed before MAIL; then an unknown local
    recipient (`user-fail`) and a valid one. The RCPT ACL finds lookupd down."""
    daemon = lab.start_lookupd()
    sessions = [lab.session(1, expect_down=0)]
    sender = f"{AUTH_USER}@example.net"
    message = Message.make(sender, LOCAL_RECIPIENT, f"{lab.layout}-{lab.transport}-auth")
    auth = smtp_session(lab.smtp.port, RELAY_IP, [message], sender=sender,
                        recipients=(UNKNOWN_RECIPIENT, LOCAL_RECIPIENT),
                        refusal_expected=(UNKNOWN_RECIPIENT,), auth_user=AUTH_USER,
                        after_auth=lambda: lab.kill(daemon))
    auth.expect_down = 1
    got = [(r.stage, r.code) for r in (*auth.replies[:3], *auth.sent[0].replies[:3])]
    if got != [("connect", 220), ("ehlo", 250), ("auth", 235), ("mail", 250),
               (f"rcpt {UNKNOWN_RECIPIENT}", 550), (f"rcpt {LOCAL_RECIPIENT}", 250)]:
        lab.notes.append(f"authenticated session went otherwise: {auth.replies} "
                         f"{auth.sent[0].replies}")
    sessions.append(auth)
    sessions.append(lab.session(1, ip=LISTED_IP, expect_down=1, listed=True))
    return sessions


def state_refusing(lab: Lab) -> list[Session]:
    lab.refusing.append(refusing_listener(lab.where))
    return lab.standard(expect_down=1)


def state_broken_config(lab: Lab) -> list[Session]:
    lab.start_lookupd(extra=f"{BROKEN_KEY} = 1", wait=False)
    lab.wait_answering(lab.lookupds[-1])  # or not: what Exim then meets is the test
    return lab.standard(expect_down=0)


def state_broken_config_activated(lab: Lab) -> list[Session]:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed")
    listen = str(lab.socket_path) if lab.transport == "unix" else f"127.0.0.1:{lab.lookupd_port}"
    lab.started += 1
    activated = Activated(lab.workdir / f"activated{lab.started}", listen,
                          lab.config(f"{BROKEN_KEY} = 1"))
    lab.activated.append(activated)
    activated.start()
    # As when lookupd.service is up before Exim's first connection (a first connection would
    # wait for Python to start: within LOOKUPD_TIMEOUT, but that is not what is tested here).
    ping(lab.where, timeout=15.0)
    return lab.standard(expect_down=0)


STATE_RUNNERS: dict[str, Callable[[Lab], list[Session]]] = {
    "running": state_running, "absent": state_absent, "stale": state_stale,
    "hung": state_hung, "restarted": state_restarted,
    "killed-mid-session": state_killed_mid_session, "refusing": state_refusing,
    "broken-config": state_broken_config,
    "broken-config-activated": state_broken_config_activated,
}


# --- the test ---------------------------------------------------------------------------------

@pytest.mark.parametrize("state", STATES)
def test_mail_survives_every_lookupd_state(lab: Lab, state: str, summary: list[Row]) -> None:
    lab.reset()
    offset = lab.smtp.log_size()
    try:
        sessions = STATE_RUNNERS[state](lab)
        lab.smtp.wait_idle()
        log_text = lab.smtp.read_log(offset)
        row = evaluate(lab.smtp, Row(lab.layout, lab.transport, state), sessions, log_text)
        row.problems += lab.notes
        # Compare sessions like for like (one message or two) for the time lookupd costs.
        extra = [s.seconds - lab.healthy[len(s.sent)] for s in sessions
                 if not s.listed and len(s.sent) in lab.healthy]
        row.extra_seconds = sum(extra) / len(extra) if extra and state != "running" else None
        if state == "running":
            row.extra_seconds = 0.0

        if state == "killed-mid-session" and not any(w in log_text for w in (
                f"lookupd down: [{RELAY_IP}] user {AUTH_USER} not checked",
                f"lookupd down: [{RELAY_IP}] invalid recipient of {AUTH_USER} not counted")):
            row.problems.append(f"no RCPT-time 'lookupd down:' line for {AUTH_USER}")
        listed = [s for s in sessions if s.listed]
        for session in listed:
            if state == "running" and [r.code for r in session.replies[:1]] != [550]:
                row.problems.append(f"the listed client was not refused 550 at connect: "
                                    f"{session.replies}")
            elif state != "running" and row.listed != "accepted":
                row.problems.append(f"the listed client was {row.listed} with lookupd {state} "
                                    f"(fail open means accepted): {session.replies}")
        if state.startswith("broken-config"):
            row.problems += broken_config_problems(lab)
    finally:
        lab.reset()
    summary.append(row)
    assert not row.problems, "\n".join(row.problems)


def broken_config_problems(lab: Lab) -> list[str]:
    """lookupd with a config error must still run, answering fail-open, and say what is wrong
    once (at start), not once per connection."""
    problems = []
    if lab.lookupds:
        proc, log = lab.lookupds[-1].proc, lab.lookupds[-1].log()
    else:
        proc, log = lab.activated[-1].proc, lab.activated[-1].log()
    assert proc is not None
    if proc.poll() is not None:
        problems.append(f"lookupd exited ({proc.returncode}) on the config error instead of "
                        f"answering fail-open: {log.strip().splitlines()[-1:]}")
    if log.count(BROKEN_KEY) != 1:
        problems.append(f"lookupd's log names {BROKEN_KEY} {log.count(BROKEN_KEY)} times, "
                        "expected once")
    return problems


# --- the harness can see damage -----------------------------------------------------------------

NAIVE_CONFIG = """\
primary_hostname = test.example
spool_directory = SPOOLDIR
log_file_path = LOGFILEPATH
keep_environment =
domainlist local_domains = @ : localhost
acl_smtp_connect = acl_connect
acl_smtp_rcpt = acl_rcpt

begin acl

# The naive pattern: one readsocket with a fail string, then a logwrite when it failed.
acl_connect:
  warn  set acl_c_lookupd = ${readsocket{LOOKUPD_SOCKET}{connect $sender_host_address}\\
                                        {2s}{}{lookupd-down}}
.ifdef NAIVE_LOGWRITE
  warn  condition = ${if eq{$acl_c_lookupd}{lookupd-down}}
        logwrite = naive: lookupd down
.endif
  accept

acl_rcpt:
  accept  domains = +local_domains

begin routers

local_user:
  driver = accept
  check_local_user
  transport = local_delivery

begin transports

local_delivery:
  driver = appendfile
  file = /dev/null
"""


@pytest.mark.parametrize(("socket_kind", "logwrite", "expected"), [
    ("unix", True, "damaged"),   # docs/exim-readsocket.md section 10
    ("unix", False, "intact"),   # nothing opened between the failure and DATA
    ("inet", True, "intact"),    # a failed inet: connect leaves no stale descriptor
])
def test_the_harness_sees_exims_stale_descriptor_damage(socket_kind: str, logwrite: bool,
                                                        expected: str) -> None:
    """Guard: on this Exim, a failed readsocket to a missing Unix socket followed by a logwrite
    puts the `<=` log line into the message body, and check_stored() says so."""
    workdir = short_dir("mfnaive")
    config = workdir / "exim.conf"
    config.write_text(NAIVE_CONFIG)
    config.chmod(0o644)
    target = (str(workdir / "missing.sock") if socket_kind == "unix"
              else f"inet:127.0.0.1:{free_port()}")
    defines = {"LOOKUPD_SOCKET": target} | ({"NAIVE_LOGWRITE": "yes"} if logwrite else {})
    exim = EximDaemon(config, workdir / "exim", defines)
    try:
        exim.start()
        ip = client_ip()
        session = smtp_session(exim.port, ip, [Message.make("a@example.net", LOCAL_RECIPIENT,
                                                            "naive")])
        exim.wait_idle()
        item = session.sent[0]
        assert item.exim_id is not None, session  # the client sees success either way
        stored = check_stored(exim, item)
        assert stored.verdict == expected, stored.detail
        if expected == "damaged":
            data, _ = exim.spool_files(item.exim_id)
            assert data is not None and f"{item.exim_id} <= ".encode() in data
            assert f"{item.exim_id} <= " not in exim.read_log()
    finally:
        exim.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- fail2ban on the mainlog of all the states above ------------------------------------------

def test_fail2ban_bans_exactly_the_refusals_of_these_sessions(lab: Lab) -> None:
    """Runs after the states of its lab (pytest groups the tests of one lab together): the
    shipped refusal filter, through the real fail2ban-regex, on everything Exim logged. Every
    refusal matched (the listed client while lookupd ran, the AUTH refused to the striking
    clients), and nothing else: no 'lookupd down', no accepted session, no defer."""
    from test_fail2ban import fail2ban_hits

    log_text = lab.smtp.read_log()
    denied = [line for line in log_text.splitlines()
              if 'rejected connection in "connect" ACL: lookupd deny' in line]
    assert denied and all(f"[{LISTED_IP}]" in line for line in denied), denied
    auth = [line for line in log_text.splitlines() if ": lookupd auth refused " in line]
    assert auth and all(line.endswith(": AUTH without TLS") for line in auth), auth
    assert "lookupd down:" in log_text  # the other states were logged too
    hits = fail2ban_hits(log_text)
    assert sorted(line for _, line in hits) == sorted(denied + auth)
    assert LISTED_IP in {host for host, _ in hits}
