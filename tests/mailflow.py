"""A mail-flow harness: a real Exim daemon (-bdf, queue only) with lookupd's snippets, real SMTP
clients on loopback, and a read-back of exactly what Exim stored in its spool and logs.

Why: with lookupd down on a Unix socket, Exim 4.96 keeps a closed descriptor after the failed
connect; a file opened later (the main log for a logwrite) takes its number, search_tidyup()
closes it at DATA, the spool -D file is opened on that number and Exim writes its `<=` log
line into the message body (docs/exim-readsocket.md section 10). A session that "worked" from
the client's side can still have lost its body, so the only proof is to read the spool back.

Used by test_mailflow.py. Nothing here touches the system's Exim: every directory is a temp dir.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.rcode
from support import EXIM, FIREWALL, REPO, Lookupd, ask, free_port, with_test_defaults

EXIM_USER = "Debian-exim"  # Debian's exim_user: the daemon's children write spool and logs as it
LOCAL_RECIPIENT = "root@localhost"  # a local recipient every layout verifies
UNKNOWN_RECIPIENT = "nobody-here@localhost"  # a local domain, no such user
RELAY_IP = "127.0.0.1"  # relay_from_hosts and LOOKUPD_NOTLS_HOSTS in all three layouts
LISTED_IP = "127.0.0.66"  # in the harness's firewall database with 42 matches
LISTED_MATCHES = 42
SMTP_TIMEOUT = 30.0


# --- clients and messages ----------------------------------------------------------------------

_next_client = iter(range(1, 250 * 250))


def client_ip() -> str:
    """A fresh loopback source address (127.1.X.Y) per session, so that each Exim log line
    that names [IP] belongs to exactly one session."""
    n = next(_next_client)
    return f"127.1.{n // 250}.{n % 250 + 1}"


# Lines that SMTP transparency (RFC 5321 4.5.2) and mbox habits could mangle.
_AWKWARD_LINES = (b".", b"..two dots at the start", b".a leading dot",
                  b"From the start of a line, as mbox fears", b">From an escaped one", b"",
                  b"trailing blanks   ", b"\ta leading tab")


@dataclass(frozen=True)
class Message:
    """One complete RFC 5322 message with a unique random body."""

    subject: str
    message_id: str
    wire: bytes  # what smtplib.data() gets: CRLF lines, not dot-stuffed (smtplib stuffs)
    body: bytes  # the body as Exim stores it after the -D file's first line: LF lines

    @classmethod
    def make(cls, sender: str, recipient: str, tag: str) -> Message:
        token = secrets.token_hex(8)
        subject = f"mailflow {tag} {token}"
        message_id = f"<{token}.{tag}@mailflow.example>"
        lines = [secrets.token_urlsafe(52).encode() for _ in range(90)]  # 70 chars a line
        for i, awkward in enumerate(_AWKWARD_LINES):
            lines.insert(5 + 11 * i, awkward)
        lines.append(b"-- end " + token.encode())
        headers = [f"From: <{sender}>", f"To: <{recipient}>", f"Subject: {subject}",
                   f"Message-ID: {message_id}", "Date: Mon, 01 Jan 2024 00:00:00 +0000",
                   "MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii"]
        wire = ("\r\n".join(headers) + "\r\n\r\n").encode() + b"".join(
            line + b"\r\n" for line in lines)
        body = b"".join(line + b"\n" for line in lines)
        assert len(body) > 4096
        return cls(subject, message_id, wire, body)


@dataclass(frozen=True)
class Reply:
    stage: str  # connect, ehlo, auth, mail, rcpt <address>, data, quit
    code: int  # 0: the connection was lost (or timed out) without a reply
    text: str


@dataclass
class Sent:
    """One message of a session and what happened to it."""

    message: Message
    recipients: tuple[str, ...]
    refusal_expected: tuple[str, ...] = ()  # recipients the test expects refused
    replies: list[Reply] = field(default_factory=list)  # MAIL, RCPT, DATA
    exim_id: str | None = None  # from "250 OK id=..."


@dataclass
class Session:
    ip: str
    replies: list[Reply]  # session-level: connect, ehlo, auth, quit
    sent: list[Sent]
    seconds: float
    expect_down: int | None = 0  # `lookupd down:` lines expected; None: 0 or 1 (a race)
    listed: bool = False  # the client lookupd denies when it runs

    def codes(self) -> list[int]:
        return [r.code for r in (*self.replies, *(r for s in self.sent for r in s.replies))]


class _Lost(Exception):
    pass


def smtp_session(port: int, ip: str, messages: Sequence[Message], *,
                 recipients: Sequence[str] = (LOCAL_RECIPIENT,),
                 refusal_expected: Sequence[str] = (), auth_user: str | None = None,
                 after_auth: Callable[[], None] | None = None,
                 sender: str = "sender@example.net") -> Session:
    """One SMTP session from `ip` to Exim on 127.0.0.1:port: EHLO, AUTH PLAIN if asked, then
    each message in turn (MAIL, RCPT..., DATA), QUIT. Every reply is kept; a refusal or a
    deferral ends that message (RSET), a lost connection ends the session."""
    replies: list[Reply] = []
    sent = [Sent(m, tuple(recipients), tuple(refusal_expected)) for m in messages]
    smtp = smtplib.SMTP(local_hostname="client.example", timeout=SMTP_TIMEOUT,
                        source_address=(ip, 0))
    started = time.monotonic()

    def step(into: list[Reply], stage: str, call: Callable[[], tuple[int, bytes]]) -> int:
        try:
            code, text = call()
        except smtplib.SMTPResponseException as exc:  # smtplib.data() on a non-354 DATA
            code, text = exc.smtp_code, exc.smtp_error
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            into.append(Reply(stage, 0, f"connection lost: {exc!r}"))
            raise _Lost from None
        into.append(Reply(stage, code, text.decode(errors="replace")))
        return code

    try:
        if step(replies, "connect", lambda: smtp.connect("127.0.0.1", port)) != 220:
            raise _Lost  # Exim closes the connection after a connect-time refusal
        if step(replies, "ehlo", lambda: smtp.ehlo()) != 250:
            raise _Lost
        if auth_user is not None:
            step(replies, "auth", lambda: smtp.docmd("AUTH", f"PLAIN {auth_plain(auth_user)}"))
        if after_auth is not None:
            after_auth()
        for item in sent:
            _send_one(smtp, item, sender, step)
        step(replies, "quit", lambda: smtp.docmd("QUIT"))
    except _Lost:
        pass
    finally:
        smtp.close()
    return Session(ip, replies, sent, time.monotonic() - started)


def _send_one(smtp: smtplib.SMTP, item: Sent, sender: str,
              step: Callable[[list[Reply], str, Callable[[], tuple[int, bytes]]], int]) -> None:
    if step(item.replies, "mail", lambda: smtp.mail(sender)) != 250:
        step(item.replies, "rset", lambda: smtp.rset())
        return
    accepted = [r for r in item.recipients
                if step(item.replies, f"rcpt {r}", lambda r=r: smtp.rcpt(r)) == 250]
    if not accepted:
        step(item.replies, "rset", lambda: smtp.rset())
        return
    code = step(item.replies, "data", lambda: smtp.data(item.message.wire))
    if code == 250:
        found = re.search(r"\bid=(\S+)", item.replies[-1].text)
        item.exim_id = found.group(1) if found else None


def auth_plain(user: str, password: str = "secret") -> str:
    """The SASL PLAIN response for test_snippets.py's test authenticator."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- the Exim daemon ---------------------------------------------------------------------------

@dataclass
class EximDaemon:
    """`exim -bdf -odq` (a foreground daemon that only queues: every accepted message stays in
    the spool untouched) on 127.0.0.1:port, with spool, logs and pid file in `workdir`.

    The configuration must take `spool_directory` and `log_file_path` from the macros SPOOLDIR
    and LOGFILEPATH, which the command line defines (Debian honours SPOOLDIR itself; the
    others get them from the builder's extra main text)."""

    config: Path
    workdir: Path
    defines: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def logdir(self) -> Path:
        return self.workdir / "log"

    @property
    def mainlog(self) -> Path:
        return self.logdir / "mainlog"

    @property
    def paniclog(self) -> Path:
        return self.logdir / "paniclog"

    def command(self) -> list[str]:
        defines = {"SPOOLDIR": str(self.spool), "LOGFILEPATH": f"{self.logdir}/%slog",
                   **self.defines}
        # Exim 4.96 garbles the value of a -D macro whose name is longer than 23 characters.
        assert all(len(name) <= 23 for name in defines), defines
        return [EXIM, "-C", str(self.config), *(f"-D{k}={v}" for k, v in defines.items()),
                "-bdf", "-odq", "-oX", f"127.0.0.1.{self.port}",
                "-oP", str(self.workdir / "exim.pid")]

    def start(self, timeout: float = 20.0) -> EximDaemon:
        for sub in (self.spool, self.logdir):
            sub.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:  # the daemon's children run as the Exim user
                shutil.chown(sub, EXIM_USER, EXIM_USER)
            else:
                sub.chmod(0o777)
        with open(self.workdir / "exim.out", "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"exim did not listen on port {self.port}:\n"
                                     f"{(self.workdir / 'exim.out').read_text(errors='replace')}"
                                     f"\n{self.read_log()}")
            time.sleep(0.05)
        return self

    def children(self) -> list[int]:
        """The daemon's live children: one per SMTP session in progress."""
        if self.proc is None:
            return []
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                # the command name may hold blanks: fields after its closing ")"
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found.append(int(stat.parent.name))
        return found

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until every session's process has ended (and so written all its log lines)."""
        deadline = time.monotonic() + timeout
        while self.children() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children():  # none expected; never leave a session process behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def log_size(self) -> int:
        return self.mainlog.stat().st_size if self.mainlog.exists() else 0

    def read_log(self, offset: int = 0) -> str:
        if not self.mainlog.exists():
            return ""
        with open(self.mainlog, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def panics(self) -> str:
        return self.paniclog.read_text(errors="replace") if self.paniclog.exists() else ""

    def spool_files(self, exim_id: str) -> tuple[bytes | None, bytes | None]:
        """The message's -D (body) and -H (envelope and headers) files, None if missing."""
        def read(path: Path) -> bytes | None:
            return path.read_bytes() if path.exists() else None
        return (read(self.spool / "input" / f"{exim_id}-D"),
                read(self.spool / "input" / f"{exim_id}-H"))


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:port (read from /proc: connecting would start a session)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":  # 0A: LISTEN
                return True
    return False


# --- what Exim stored ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    verdict: str  # intact, damaged
    detail: str = ""


def check_stored(exim: EximDaemon, item: Sent) -> Stored:
    """Compare the spool with what was sent: the -D file must be `ID-D\\n` and then the body
    byte for byte (Exim stores LF line ends, undoes dot-stuffing, and leaves "From " lines
    alone); the -H file must hold the Subject and Message-ID as sent."""
    assert item.exim_id is not None
    data, header = exim.spool_files(item.exim_id)
    if data is None or header is None:
        return Stored("damaged", f"{item.exim_id}: spool file missing (-D {data is not None}, "
                                 f"-H {header is not None})")
    expected = f"{item.exim_id}-D\n".encode() + item.message.body
    if data != expected:
        at = next((i for i, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
                  min(len(data), len(expected)))
        return Stored("damaged", f"{item.exim_id}-D differs from byte {at} "
                                 f"({len(data)} bytes, {len(expected)} sent): "
                                 f"{data[max(0, at - 10):at + 110]!r}")
    text = header.decode(errors="replace")
    for wanted in (f"Subject: {item.message.subject}\n",
                   f"Message-ID: {item.message.message_id}\n"):
        if wanted not in text:
            return Stored("damaged", f"{item.exim_id}-H lacks {wanted.strip()!r}")
    return Stored("intact")


@dataclass
class Row:
    """One line of the summary table: what happened to the clean clients' messages in one
    lookupd state, and whether the listed client was refused."""

    layout: str
    transport: str
    state: str
    sent: int = 0
    intact: int = 0
    damaged: int = 0
    deferred: int = 0
    refused: int = 0
    listed: str = "-"  # refused / accepted / deferred / - (not tried)
    down_lines: int = 0
    extra_seconds: float | None = None
    problems: list[str] = field(default_factory=list)

    HEADER = ("layout", "transport", "state", "sent", "intact", "damaged", "deferred",
              "refused", "listed", "down", "extra_s")

    def cells(self) -> tuple[str, ...]:
        extra = "-" if self.extra_seconds is None else f"{self.extra_seconds:+.2f}"
        return (self.layout, self.transport, self.state, str(self.sent), str(self.intact),
                str(self.damaged), str(self.deferred), str(self.refused), self.listed,
                str(self.down_lines), extra)


def message_outcome(session: Session, item: Sent) -> str:
    """accepted / deferred (a 4xx, or the connection lost, anywhere on its way) / refused (a
    5xx anywhere, other than for a recipient the test expects refused)."""
    if item.exim_id is not None:
        return "accepted"
    relevant = [*session.replies, *item.replies]
    expected = {f"rcpt {r}" for r in item.refusal_expected}
    codes = [r.code for r in relevant if r.stage not in expected and r.stage != "quit"]
    if any(c == 0 or 400 <= c < 500 for c in codes):
        return "deferred"
    if any(c >= 500 for c in codes):
        return "refused"
    return "deferred"  # never reached DATA without a refusal: as good as lost


LOG_TROUBLE = ("Bad file descriptor", "failed to write to main log", "Unexpected failure",
               "errno=9", "panic")


def evaluate(exim: EximDaemon, row: Row, sessions: Sequence[Session], log_text: str) -> Row:
    """Fill `row` from the sessions and the main log lines they produced; list every way the
    state fell short in row.problems (empty: mail survived it)."""
    listed: set[str] = set()
    for session in sessions:
        if session.listed:
            listed |= {message_outcome(session, s) for s in session.sent}
            row.listed = "/".join(sorted(listed))
            for item in session.sent:
                if item.exim_id is not None:
                    stored = check_stored(exim, item)
                    if stored.verdict != "intact":
                        row.problems.append(f"listed client's message {stored.detail}")
        else:
            for item in session.sent:
                row.sent += 1
                outcome = message_outcome(session, item)
                if outcome == "accepted":
                    stored = check_stored(exim, item)
                    if stored.verdict == "intact":
                        row.intact += 1
                    else:
                        row.damaged += 1
                        row.problems.append(f"[{session.ip}] {stored.detail}")
                else:
                    setattr(row, outcome, getattr(row, outcome) + 1)
                    row.problems.append(f"[{session.ip}] {outcome}: "
                                        f"{[(r.stage, r.code, r.text) for r in session.replies]}"
                                        f" {[(r.stage, r.code, r.text) for r in item.replies]}")
        down = log_text.count(f"lookupd down: [{session.ip}] ")
        row.down_lines += down
        if session.expect_down is not None and down != session.expect_down:
            row.problems.append(f"[{session.ip}] {down} 'lookupd down:' lines, expected "
                                f"{session.expect_down}")
        elif session.expect_down is None and down > 1:
            row.problems.append(f"[{session.ip}] {down} 'lookupd down:' lines, expected at "
                                "most 1")
        for item in session.sent:
            if item.exim_id is not None and f"{item.exim_id} <= " not in log_text:
                row.problems.append(f"{item.exim_id}: no '<=' line in the main log")
    for line in log_text.splitlines():
        if any(t in line for t in LOG_TROUBLE):
            row.problems.append(f"mainlog: {line}")
    if panics := exim.panics():
        row.problems.append(f"paniclog is not empty: {panics[-500:]!r}")
    return row


# --- lookupd, and what stands in for it when it is down -----------------------------------------

FIREWALL_SCHEMA_DB = FIREWALL / "nftfw-firewall.db"


def nftfw_db(path: Path, entries: dict[str, int]) -> Path:
    """An nftfw firewall.db with the real schema (copied from the shared test data), holding
    `entries` (IP -> matchcount)."""
    with contextlib.closing(sqlite3.connect(f"file:{FIREWALL_SCHEMA_DB}?mode=ro",
                                            uri=True)) as src:
        schema = [sql for (sql,) in src.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")]
    with contextlib.closing(sqlite3.connect(path)) as db:
        for sql in schema:
            db.execute(sql)
        now = int(time.time())
        db.executemany("INSERT INTO blacklist VALUES (?, 'exim-auth', ?, ?, ?, ?, "
                       "'25,465,587', 1, 0, 0)",
                       [(ip, max(1, n // 5), n, now - 86400, now) for ip, n in entries.items()])
        db.commit()
    path.chmod(0o644)
    return path


def lookupd_config(firewall_db: Path, dns_port: int, extra: str = "") -> str:
    """Deny above 10 firewall matches; no DNSBL lists; PTR look-ups to a server that says
    NXDOMAIN at once. `extra` goes into [connect] (a broken key, for one state)."""
    return with_test_defaults(f"""
[server]
socket_mode = "0666"
[incidents]
db = "{firewall_db}"
[dnsbl]
list = []
nameservers = ["127.0.0.1:{dns_port}"]
[connect]
incidents_threshold = 10
deadline = "1s"
{extra}
""")


@dataclass
class PinnedLookupd(Lookupd):
    """support.Lookupd whose socket is a fixed path (Exim's LOOKUPD_SOCKET), not workdir/s:
    each start gets its own workdir (config, state, log) but listens where Exim looks."""

    socket_path: Path = Path()

    @property
    def socket(self) -> Path:
        return self.socket_path


@dataclass
class Activated:
    """lookupd under `systemd-socket-activate -l ADDRESS`, which binds the socket and hands it
    over (LISTEN_FDS) as lookupd.socket would."""

    workdir: Path
    listen: str  # a socket path or 127.0.0.1:PORT
    config_text: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "lookupd.log"

    def start(self) -> Activated:
        activate = shutil.which("systemd-socket-activate")
        assert activate is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "lookupd.toml"
        config.write_text(self.config_text)
        (self.workdir / "state").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [activate, "-l", self.listen, "-E", "PYTHONPATH", sys.executable, "-m",
                 "lookupd", "serve", "--config", str(config), "--state-dir",
                 str(self.workdir / "state")],
                stdout=log, stderr=log, env=env, cwd=REPO)
        deadline = time.monotonic() + 10
        while not self._bound() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.listen.startswith("/"):
            # What SocketMode= does in lookupd.socket: Exim's user must be able to connect
            # (systemd-socket-activate leaves the file 0644 whatever the umask).
            os.chmod(self.listen, 0o666)
        return self

    def _bound(self) -> bool:
        if self.listen.startswith("/"):
            return Path(self.listen).exists()
        return listening(int(self.listen.rsplit(":", 1)[1]))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ping(target: Path | int, timeout: float = 1.0) -> bytes:
    """lookupd's `ping` over the Unix socket (a path) or loopback TCP (a port); b"" on failure."""
    try:
        if isinstance(target, Path):
            return ask(target, b"ping", timeout)
        with socket.create_connection(("127.0.0.1", target), timeout=timeout) as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


def refusing_listener(where: Path | int) -> socket.socket:
    """A socket bound but never listening: connecting to it gets ECONNREFUSED, as when a
    systemd socket unit failed (a Unix path) or nothing listens (a loopback port)."""
    if isinstance(where, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(where))
        where.chmod(0o666)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", where))
    return sock


class NxdomainDns:
    """A UDP DNS server on 127.0.0.1 that answers NXDOMAIN to everything: lookupd's PTR look-up
    of a loopback client then ends at once (a silent server would cost [connect] deadline on
    every session and blur the timing)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="nxdomain-dns", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, client = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = dns.message.make_response(dns.message.from_wire(data))
                reply.set_rcode(dns.rcode.NXDOMAIN)
                reply.flags |= dns.flags.RA
                self.sock.sendto(reply.to_wire(), client)
            except (dns.exception.DNSException, ValueError):
                continue  # a malformed query gets no answer

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


# --- the summary table ----------------------------------------------------------------------------

def table(rows: Sequence[Row]) -> str:
    lines = [Row.HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(Row.HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)
