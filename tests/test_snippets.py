"""lookupd's Exim snippets in three real configurations, driven by Debian's exim4 with -bh.

- Debian: this machine's own exim4-config split tree (/etc/exim4/conf.d) copied to a temp dir,
  the snippets dropped in, built by Debian's update-exim4.conf into a temp file.
- Sympl: a minimal tree in Sympl's sympl.d layout, concatenated the way Sympl's Makefile does.
- The single-file example.

Each is checked with `exim -bV`, then SMTP sessions run against it with a real lookupd on the
test data (GeoIP, nftfw firewall.db, a DNSBL zone in rbldnsd): what the client sees and what
Exim logs. Builders and helpers here are used by test_fail2ban.py too.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import EXIM, REPO, Lookupd, short_dir
from test_connect_daemon import (
    ALLOWED,
    CLEAN,
    INCIDENTS,
    LISTED,
    SUBMIT_SE,
    SUBMIT_SE_IMAP,
    ConnectLab,
    connect_lab,
    lookupd_config,
)

SNIPPETS = REPO / "exim-snippets"
DEBIAN_CONFD = Path("/etc/exim4/conf.d")
UPDATE_EXIM4_CONF = shutil.which("update-exim4.conf") or "/usr/sbin/update-exim4.conf"
FLAVOURS = ("debian", "sympl", "single")

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

# A test-only authenticator: user NAME, password "secret".
TEST_AUTHENTICATOR = """
test_plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if eq{$auth3}{secret}}
  server_set_id = $auth2
"""


def auth_plain(user: str, password: str = "secret") -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- building the three configurations ---------------------------------------------------------

def build_debian(workdir: Path, local_macros: str = "") -> Path:
    """Debian's conf.d + the snippets -> update-exim4.conf (split) -> workdir/exim4.conf.

    Only the copy is read (-d) and only the output file written (-o; its temp file goes to
    TMPDIR=workdir): /etc/exim4 and /var/lib/exim4 are left alone. 000_localmacros (the admin's
    file, read first) points CONFDIR at the copy and holds `local_macros`.
    """
    if not DEBIAN_CONFD.is_dir() or not Path(UPDATE_EXIM4_CONF).exists():
        pytest.skip("Debian's exim4-config is not installed")
    etc = workdir / "etc"
    shutil.copytree(DEBIAN_CONFD, etc / "conf.d")
    settings = Path("/etc/exim4/update-exim4.conf.conf").read_text()
    settings = re.sub(r"(?m)^dc_use_split_config=.*$", "dc_use_split_config='true'", settings)
    # No reverse DNS of test clients through the machine's resolver (DC_minimaldns).
    settings = re.sub(r"(?m)^dc_minimaldns=.*$", "dc_minimaldns='true'", settings)
    (etc / "update-exim4.conf.conf").write_text(settings)
    shutil.copytree(SNIPPETS / "debian" / "conf.d", etc / "conf.d", dirs_exist_ok=True)
    (etc / "conf.d" / "main" / "000_localmacros").write_text(
        f"CONFDIR = {etc}\n{local_macros}\n")
    (etc / "conf.d" / "auth" / "20_test_plain").write_text(TEST_AUTHENTICATOR)
    out = workdir / "exim4.conf"
    subprocess.run([UPDATE_EXIM4_CONF, "-d", str(etc), "-o", str(out)], check=True,
                   capture_output=True, timeout=60, env={**os.environ, "TMPDIR": str(workdir)})
    os.chmod(out, 0o644)
    return out


# The parts of a Sympl sympl.d tree the snippets sit in (the real one has many more files).
SYMPL_BASE = {
    "00-header": "# Sympl-style test tree, built by lookupd's tests/test_snippets.py\n",
    "00-main/10-basics": """
primary_hostname = test.example
domainlist local_domains = @ : localhost
domainlist relay_to_domains =
hostlist relay_from_hosts = <; 127.0.0.1 ; ::1
acl_smtp_connect = acl_check_connect
acl_smtp_rcpt = acl_check_rcpt
keep_environment =
""",
    "10-acl/00-acl-header": "begin acl\n",
    "10-acl/10-acl-check-connect/00-acl-check-connect-header": "acl_check_connect:\n",
    "10-acl/10-acl-check-connect/20-accept-known": "  accept  hosts = : +relay_from_hosts\n",
    "10-acl/10-acl-check-connect/99-acl-check-connect-footer": "  accept\n",
    "10-acl/50-acl-check-rcpt/00-acl-check-rcpt-header": "acl_check_rcpt:\n  accept  hosts = :\n",
    "10-acl/50-acl-check-rcpt/40-accept-authenticated": """
  accept  authenticated = *
          control = submission/sender_retain
""",
    "10-acl/50-acl-check-rcpt/90-local-domains-only": """
  require message = relay not permitted
          domains = +local_domains
  require verify = recipient
""",
    "10-acl/50-acl-check-rcpt/99-acl-check-rcpt-footer": "  accept\n",
    "20-routers/00-routers-header": "begin routers\n",
    "20-routers/90-local-user": """
local_user:
  driver = accept
  check_local_user
  transport = local_delivery
""",
    "30-transports/00-transports-header": "begin transports\n",
    "30-transports/10-local-delivery": """
local_delivery:
  driver = appendfile
  file = /var/mail/$local_part_data
""",
    "60-authenticators/00-authenticators-header": "begin authenticators\n",
    "60-authenticators/10-test-plain": TEST_AUTHENTICATOR,
}
_SYMPL_NAME = re.compile(r"[a-z0-9][a-z0-9-]+")


def build_sympl(workdir: Path, main_extra: str = "") -> Path:
    """SYMPL_BASE + exim-snippets/sympl -> one file, as Sympl's Makefile makes exim4.conf:
    every file whose name matches [a-z0-9][a-z0-9-]+, in sorted path order, concatenated."""
    tree = workdir / "sympl.d"
    for name, text in SYMPL_BASE.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    if main_extra:
        (tree / "00-main" / "05-test").write_text(main_extra)
    shutil.copytree(SNIPPETS / "sympl" / "sympl.d", tree, dirs_exist_ok=True)
    parts = sorted(str(p) for p in tree.rglob("*")
                   if p.is_file() and _SYMPL_NAME.fullmatch(p.name))
    out = workdir / "exim4.conf"
    out.write_text("".join(f"# {'-' * 70}\n# {p}\n# {'-' * 70}\n\n{Path(p).read_text()}"
                           for p in parts))
    os.chmod(out, 0o644)
    return out


def build_single(workdir: Path, main_extra: str = "") -> Path:
    """The single-file example with its host lookups off and the test authenticator added."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = (SNIPPETS / "single-file" / "exim.conf").read_text()
    out = workdir / "exim.conf"
    out.write_text(f"HOST_LOOKUP =\n{main_extra}\n{text}\n{TEST_AUTHENTICATOR}")
    os.chmod(out, 0o644)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "debian": build_debian, "sympl": build_sympl, "single": build_single}


# --- running Exim ----------------------------------------------------------------------------

@dataclass
class Session:
    """One SMTP session: what the client saw, and the log lines Exim wrote (LOG: ...)."""

    out: str
    log: list[str]

    def codes(self) -> list[str]:
        return [line[:3] for line in self.out.splitlines() if re.match(r"\d{3} ", line)]

    def logged(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]


def bh(config: Path, ip: str, smtp: str = "QUIT\n", *, port: int | None = None,
       sock: Path | str | None = None, defines: Iterable[str] = ()) -> Session:
    """`exim -bh IP` with `-oMi 127.0.0.1.PORT` (how -bh sets $received_port)."""
    cmd = [EXIM, "-C", str(config)]
    if sock is not None:
        cmd.append(f"-DLOOKUPD_SOCKET={sock}")
    cmd += [f"-D{d}" for d in defines]
    if port is not None:
        cmd += ["-oMi", f"127.0.0.1.{port}"]
    cmd += ["-bh", ip]
    proc = subprocess.run(cmd, input=smtp.replace("\n", "\r\n").encode(), capture_output=True,
                          timeout=30, check=False)
    err = proc.stderr.decode(errors="replace")
    # A LOG: entry may go on over indented lines; keep each whole.
    log = [m.replace("\n  ", " ") for m in re.findall(r"(?m)^LOG: (.*(?:\n  .*)*)", err)]
    return Session(proc.stdout.decode(errors="replace"), log)


def user_session(user: str, recipients: Iterable[str]) -> str:
    rcpts = "".join(f"RCPT TO:<{r}>\n" for r in recipients)
    return (f"EHLO client.example\nAUTH PLAIN {auth_plain(user)}\nMAIL FROM:<{user}@example.net>\n"
            f"{rcpts}QUIT\n")


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectLab]:
    for tool in ("rbldnsd", "knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with connect_lab(tmp_path_factory.mktemp("snippets-lab")) as running:
        yield running


@pytest.fixture(scope="module")
def daemon(lab: ConnectLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lookupd]:
    workdir = short_dir()
    lists = tmp_path_factory.mktemp("lists")
    running = Lookupd(workdir, lookupd_config(lab.resolver_port, lists)).start()
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


# --- the configurations are valid --------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_exim_accepts_the_configuration(configs: dict[str, Path], flavour: str) -> None:
    proc = subprocess.run([EXIM, "-C", str(configs[flavour]), "-bV"], capture_output=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"Configuration file is {configs[flavour]}" in proc.stdout.decode()
    assert b"error" not in proc.stderr.lower()


def test_debian_build_leaves_the_system_alone(tmp_path: Path) -> None:
    watched = [Path("/etc/exim4"), Path("/etc/exim4/conf.d"), Path("/var/lib/exim4"),
               Path("/var/lib/exim4/config.autogenerated")]
    before = {p: p.stat().st_mtime_ns for p in watched if p.exists()}
    config = build_debian(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in watched if p.exists()} == before
    text = config.read_text()
    # The snippets are in, in Debian's order: macros before Debian's options use them.
    assert text.index("MAIN_ACL_CHECK_RCPT = acl_lookupd_check_rcpt") < \
        text.index("acl_smtp_rcpt = MAIN_ACL_CHECK_RCPT")
    assert "acl_lookupd_check_connect:" in text and "acl_check_rcpt:" in text


def statements(text: str) -> list[str]:
    """An ACL fragment without comments and blank lines, for comparing copies."""
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def acl_body(text: str, label: str, stop: str) -> list[str]:
    body = text.split(f"\n{label}:\n", 1)[1]
    return statements(body.split(stop, 1)[0])


def test_the_three_flavours_carry_the_same_statements() -> None:
    """The Sympl fragments and the single file are copies of the Debian ACLs: keep them so."""
    debian = SNIPPETS / "debian" / "conf.d" / "acl"
    sympl = SNIPPETS / "sympl" / "sympl.d" / "10-acl"
    single = (SNIPPETS / "single-file" / "exim.conf").read_text()
    connect = acl_body((debian / "35_lookupd_check_connect").read_text(),
                       "acl_lookupd_check_connect", "\n  accept\n")
    assert connect == statements((sympl / "10-acl-check-connect" / "40-lookupd").read_text())
    assert connect == acl_body(single, "acl_check_connect", "\n  accept\n")
    rcpt = acl_body((debian / "35_lookupd_check_rcpt").read_text(), "acl_lookupd_check_rcpt",
                    "\n  # Debian's own RCPT ACL")
    assert rcpt == statements((sympl / "50-acl-check-rcpt" / "05-lookupd-user").read_text())
    assert rcpt == acl_body(single, "acl_check_rcpt", "\n  accept\n    hosts = +relay")[2:]
    auth = acl_body((debian / "35_lookupd_check_auth").read_text(), "acl_lookupd_check_auth",
                    "\nNONE")
    assert auth == acl_body((sympl / "45-acl-lookupd-check-auth" / "10-lookupd-auth").read_text(),
                            "acl_lookupd_check_auth", "\nNONE")
    assert auth == acl_body(single, "acl_check_auth", "\nacl_check_rcpt:")
    quit_ = acl_body((debian / "35_lookupd_check_quit").read_text(), "acl_lookupd_check_quit",
                     "\nNONE")
    assert quit_ == acl_body((sympl / "46-acl-lookupd-check-quit" / "10-lookupd-quit").read_text(),
                             "acl_lookupd_check_quit", "\nNONE")
    assert quit_ == acl_body(single, "acl_check_quit", "\nacl_check_data:")


# --- connect ACL --------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_connect_verdicts(configs: dict[str, Path], daemon: Lookupd, flavour: str) -> None:
    config, sock = configs[flavour], daemon.socket

    clean = bh(config, CLEAN, port=25, sock=sock)
    assert clean.codes() == ["220", "221"], clean.out
    assert clean.logged("lookupd") == []

    denied = bh(config, INCIDENTS, port=25, sock=sock)
    assert "550 Blacklisted: Denied access - history of unwanted activity" in denied.out
    assert denied.logged("lookupd") == [
        f'H=[{INCIDENTS}] rejected connection in "connect" ACL: lookupd deny rule=incidents '
        "country=-- incidents=42 dnsbl=clean: Blacklisted: Denied access - history of "
        "unwanted activity"]

    listed = bh(config, LISTED, port=25, sock=sock)
    assert f"550 Rejected - {LISTED} is listed at bl.test" in listed.out
    assert listed.logged("lookupd deny rule=dnsbl country=-- incidents=0 dnsbl=listed")

    allowed = bh(config, ALLOWED, port=25, sock=sock)  # 11 incidents and listed
    assert allowed.codes() == ["220", "221"], allowed.out

    deferred = bh(config, SUBMIT_SE, port=587, sock=sock)
    assert deferred.codes()[0] == "451", deferred.out
    assert "Submission is not open to 89.160.20.112 now" in deferred.out
    assert deferred.logged(f'H=[{SUBMIT_SE}] temporarily rejected connection in "connect" '
                           "ACL: lookupd defer rule=submission country=SE incidents=0")

    for ip, port in ((SUBMIT_SE_IMAP, 587), (CLEAN, 587), (SUBMIT_SE, 25)):
        session = bh(config, ip, port=port, sock=sock)
        assert session.codes() == ["220", "221"], (ip, port, session.out)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_log_only_refuses_nobody(configs: dict[str, Path], daemon: Lookupd,
                                 flavour: str) -> None:
    for ip, port, what in ((INCIDENTS, 25, "deny rule=incidents"),
                           (SUBMIT_SE, 587, "defer rule=submission")):
        session = bh(configs[flavour], ip, port=port, sock=daemon.socket,
                     defines=["LOOKUPD_LOG_ONLY=yes"])
        assert session.codes() == ["220", "221"], session.out
        assert session.logged(f"lookupd log-only: [{ip}] would {what} ")
        assert session.logged("rejected") == []


# --- lookupd down -------------------------------------------------------------------------------

@pytest.fixture
def refusing_socket() -> Iterator[Path]:
    """A Unix socket file nobody accepts on (bound, never listening): ECONNREFUSED."""
    workdir = short_dir()
    path = workdir / "refusing.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    yield path
    sock.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("how", ["missing", "refusing"])
def test_lookupd_down_accepts_logs_once_and_asks_no_more(
        configs: dict[str, Path], refusing_socket: Path, tmp_path: Path, flavour: str,
        how: str) -> None:
    """Connect, AUTH and RCPT all pass with lookupd unreachable: no 451, one log line, and no
    second ${readsocket} (Exim 4.96 would write to a closed or reused descriptor)."""
    sock = refusing_socket if how == "refusing" else tmp_path / "no-such.sock"
    for ip in (INCIDENTS, "127.0.0.1"):
        smtp = user_session("carol", ["nobody-here@localhost", "nor-here@localhost",
                                      "root@localhost"])
        session = bh(configs[flavour], ip, smtp, port=587, sock=sock)
        codes = session.codes()
        assert "451" not in codes and "421" not in codes, session.out
        if ip == INCIDENTS:  # denied by lookupd when it runs; accepted unchecked now
            assert codes[:2] == ["220", "250"], session.out
            assert session.logged(f"lookupd down: [{ip}] accepted unchecked; {sock} did not "
                                  "answer")
        else:  # AUTH, two unknown recipients refused by Exim itself, one accepted
            assert codes == ["220", "250", "235", "250", "550", "550", "250", "221"], session.out
        assert len(session.logged("lookupd down:")) == 1, session.log
        assert not any("Bad file descriptor" in line or "failed to" in line
                       for line in session.log), session.log


# --- AUTH ACL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_auth_refused_on_port_25_and_without_tls(configs: dict[str, Path], daemon: Lookupd,
                                                 flavour: str) -> None:
    config, sock = configs[flavour], daemon.socket
    smtp = f"EHLO client.example\nAUTH PLAIN {auth_plain('alice')}\nQUIT\n"
    on_25 = bh(config, CLEAN, smtp, port=25, sock=sock)
    assert "503 AUTH is not accepted on port 25: submit mail on port 587 or 465" in on_25.out
    assert on_25.logged(f"H=(client.example) [{CLEAN}] rejected AUTH PLAIN: lookupd auth "
                        "refused port=25 country=GB: AUTH on a port for server-to-server mail")

    plain = bh(config, CLEAN, smtp, port=587, sock=sock)
    assert "503 AUTH needs TLS: send STARTTLS first" in plain.out
    assert plain.logged("rejected AUTH PLAIN: lookupd auth refused port=587 country=GB: "
                        "AUTH without TLS")

    local = bh(config, "127.0.0.1", smtp, port=587, sock=sock)  # LOOKUPD_NOTLS_HOSTS
    assert "235 Authentication succeeded" in local.out

    # The README's way to keep AUTH on port 25 and in clear text for some hosts.
    kept = bh(config, CLEAN, smtp, port=25, sock=sock,
              defines=["LOOKUPD_NOAUTH_PORTS=", f"LOOKUPD_NOTLS_HOSTS=<; {CLEAN}"])
    assert "235 Authentication succeeded" in kept.out, kept.out


# --- QUIT / not-QUIT ACL: strikes ------------------------------------------------------------

def strikes_of(daemon: Lookupd, ip: str) -> int:
    found = re.search(r" strikes=(\d+)$", daemon.query(f"connect {ip} 25"))
    assert found, ip
    return int(found.group(1))


def strike_requests(daemon: Lookupd) -> int:
    """How many `strike` requests lookupd answered (its metrics)."""
    found = re.search(r'(?m)^lookupd_requests_total\{outcome="ok",verb="strike"\} (\S+)$',
                      daemon.query("metrics"))
    return int(float(found.group(1))) if found else 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_strikes_are_sent_when_the_connection_ends(configs: dict[str, Path], daemon: Lookupd,
                                                   flavour: str) -> None:
    """Failed and refused AUTH, a dictionary run of unknown local recipients and a protocol
    error reach lookupd as strikes, in one `strike` per connection; never for a client that
    authenticated in the end, a connection that named an existing recipient or only one
    unknown, a relay host or an allowlisted client."""
    config, sock = configs[flavour], daemon.socket
    ip = {"debian": "81.2.69.161", "sympl": "81.2.69.162", "single": "81.2.69.163"}[flavour]  # GB
    clear = [f"LOOKUPD_NOTLS_HOSTS=<; {ip} ; {ALLOWED} ; 127.0.0.1"]  # AUTH without TLS here
    assert strikes_of(daemon, ip) == 0
    bad = auth_plain("alice", "guess")

    def session(smtp: str, port: int, codes: list[str], strikes: int, calls: int) -> Session:
        before = strike_requests(daemon)
        done = bh(config, ip, smtp, port=port, sock=sock, defines=clear)
        assert done.codes() == codes, done.out
        assert strikes_of(daemon, ip) == strikes
        assert strike_requests(daemon) - before == calls
        return done

    def rcpts(*names: str) -> str:
        return "MAIL FROM:<a@example.net>\n" + "".join(f"RCPT TO:<{n}@localhost>\n"
                                                     for n in names)

    # Two wrong passwords, then QUIT: auth 2, in one call.
    session(f"EHLO x\nAUTH PLAIN {bad}\nAUTH PLAIN {bad}\nQUIT\n", 587,
            ["220", "250", "535", "535", "221"], 2, 1)
    # A wrong password, then the right one: authenticated in the end, not struck.
    session(f"EHLO x\nAUTH PLAIN {bad}\nAUTH PLAIN {auth_plain('alice')}\nQUIT\n", 587,
            ["220", "250", "535", "235", "221"], 2, 0)
    # AUTH refused on port 25 (acl_lookupd_check_auth), then the client hangs up: auth 1.
    refused = session(f"EHLO x\nAUTH PLAIN {bad}\n", 25, ["220", "250", "503", "421"], 3, 1)
    assert "503 AUTH is not accepted on port 25" in refused.out
    # A dictionary run: three unknown local recipients, refused by the ACL that decides.
    session(f"EHLO x\n{rcpts('gone1', 'gone2', 'gone3')}QUIT\n", 25,
            ["220", "250", "250", "550", "550", "550", "221"], 6, 1)
    # Not struck: unknown recipients beside one that exists (a list server's stale
    # members), and a single unknown one (a typo).
    session(f"EHLO x\n{rcpts('gone4', 'root', 'gone5')}QUIT\n", 25,
            ["220", "250", "250", "550", "250", "550", "221"], 6, 0)
    session(f"EHLO x\n{rcpts('gone6')}QUIT\n", 25, ["220", "250", "250", "550", "221"], 6, 0)
    # Dropped for too many unrecognised commands (not-QUIT ACL, bad-commands): proto 1.
    junk = session("EHLO x\n" + "FOO\n" * 4 + "QUIT\n", 25,
                   ["220", "250", "500", "500", "500", "500"], 7, 1)
    assert "500 Too many unrecognized commands" in junk.out, junk.out
    # All at once, in one call: auth 1 rcpt 2.
    both = session(f"EHLO x\nAUTH PLAIN {bad}\n{rcpts('gone7', 'gone8')}QUIT\n", 587,
                   ["220", "250", "535", "250", "550", "550", "221"], 10, 1)
    assert both.logged("lookupd") == []  # strikes are not logged by Exim

    # Never struck, and never asked: a relay host, an allowlisted client.
    for never in ("127.0.0.1", ALLOWED):
        before = strike_requests(daemon)
        bh(config, never, f"EHLO x\nAUTH PLAIN {bad}\n{rcpts('gone9', 'gone10')}QUIT\n",
           port=587, sock=sock, defines=clear)
        assert strikes_of(daemon, never) == 0, never
        assert strike_requests(daemon) == before, never


# --- RCPT ACL: blocked users -------------------------------------------------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_blocked_user_is_frozen(configs: dict[str, Path], daemon: Lookupd, flavour: str) -> None:
    """Three unknown recipients (the test limit) block the user: the message under way and the
    next one are frozen; another user is untouched."""
    config, sock = configs[flavour], daemon.socket
    user, other = f"mallory-{flavour}", f"trent-{flavour}"
    first = bh(config, "127.0.0.1", user_session(user, [
        "gone1@localhost", "gone2@localhost", "root@localhost", "gone3@localhost",
        "root@localhost"]), port=587, sock=sock)
    assert first.codes() == ["220", "250", "235", "250", "550", "550", "250", "550", "250",
                             "221"], first.out
    assert "550 Unknown user" in first.out
    assert len(first.logged("lookupd unknown recipient of authenticated user")) == 3
    assert first.logged(f"lookupd user blocked: {user} [127.0.0.1]: message frozen "
                        "(3 invalid recipients in 1h)")
    assert "blocked - since=" in daemon.query(f"user {user}")

    second = bh(config, "127.0.0.1", user_session(user, ["root@localhost"]), port=587, sock=sock)
    assert second.codes()[-2:] == ["250", "221"]
    assert len(second.logged(f"lookupd user blocked: {user} ")) == 1

    untouched = bh(config, "127.0.0.1", user_session(other, ["gone@localhost", "root@localhost"]),
                   port=587, sock=sock)
    assert untouched.logged("lookupd user blocked") == []
    assert daemon.query(f"user {other}") == "ok"


def test_rules_lookupd_keeps_log_only(configs: dict[str, Path], lab: ConnectLab,
                                      tmp_path: Path) -> None:
    """[connect] log_only: lookupd answers accept would=deny, Exim logs and accepts, and the
    other rules are still enforced."""
    workdir = short_dir()
    daemon = Lookupd(workdir, lookupd_config(lab.resolver_port, tmp_path,
                                             extra='log_only = ["incidents"]')).start()
    try:
        for flavour in FLAVOURS:
            logged = bh(configs[flavour], INCIDENTS, port=25, sock=daemon.socket)
            assert logged.codes() == ["220", "221"], (flavour, logged.out)
            assert logged.logged(f"lookupd log-only: [{INCIDENTS}] would deny rule=incidents "
                                 "country=-- incidents=42 dnsbl=clean: Blacklisted")
            enforced = bh(configs[flavour], LISTED, port=25, sock=daemon.socket)
            assert enforced.codes()[0] == "550", (flavour, enforced.out)
        assert f"connect would deny (log-only): [{INCIDENTS}] port 25" in daemon.log()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- RCPT ACL: the HELO name ([helo], the `helo` verb) ----------------------------------------

def primary_hostname(config: Path) -> str:
    proc = subprocess.run([EXIM, "-C", str(config), "-be", "$primary_hostname"],
                          capture_output=True, timeout=30, check=True)
    return proc.stdout.decode().strip()


def helo_session(helo: str, recipients: Iterable[str] = ("root@localhost",),
                 auth: str = "") -> str:
    rcpts = "".join(f"RCPT TO:<{r}>\n" for r in recipients)
    login = f"AUTH PLAIN {auth_plain(auth)}\n" if auth else ""
    return f"EHLO {helo}\n{login}MAIL FROM:<someone@example.net>\n{rcpts}QUIT\n"


@pytest.fixture(scope="module")
def helo_daemon(lab: ConnectLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lookupd]:
    """A lookupd that enforces its lenient HELO policy ([helo] log_only = false)."""
    workdir = short_dir()
    lists = tmp_path_factory.mktemp("helo-lists")
    running = Lookupd(workdir, lookupd_config(lab.resolver_port, lists,
                                              extra="[helo]\nlog_only = false")).start()
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_helo_spares_real_senders_and_refuses_bots_at_rcpt(
        configs: dict[str, Path], helo_daemon: Lookupd, flavour: str) -> None:
    config, sock = configs[flavour], helo_daemon.socket
    ours = primary_hostname(config)

    # An Exchange server behind a .local name that resolves nowhere: fine under lenient.
    exchange = bh(config, CLEAN, helo_session("EXCHANGE.Airflite.local"), port=25, sock=sock)
    assert exchange.codes() == ["220", "250", "250", "250", "221"], exchange.out
    assert exchange.logged("lookupd helo") == []

    # A bot announcing our own name: refused at RCPT, postmaster and abuse still reachable.
    bot = bh(config, CLEAN, helo_session(ours, ["root@localhost", "postmaster@localhost"]),
             port=25, sock=sock)
    assert bot.codes()[:4] == ["220", "250", "250", "550"], bot.out
    assert f"550 Your HELO name {ours} is one of our own names or addresses" in bot.out
    # (the test Sympl and single-file trees have no postmaster alias: Exim's own 550 there)
    assert bot.out.count("Your HELO name") == 1, bot.out
    assert len(bot.logged("lookupd helo deny")) == 1, bot.log
    assert bot.logged(f"rejected RCPT <root@localhost>: lookupd helo deny check=ours: Your "
                      f"HELO name {ours} is one of our own names or addresses")
    assert f"helo deny: [{CLEAN}] helo {ours} check=ours" in helo_daemon.log()

    # An authenticated user with the same HELO is never refused (and lookupd is not asked).
    user = bh(config, CLEAN, helo_session(ours, auth="alice"), port=587, sock=sock,
              defines=[f"LOOKUPD_NOTLS_HOSTS={CLEAN}"])
    assert user.codes() == ["220", "250", "235", "250", "250", "221"], user.out
    assert user.logged("lookupd helo") == []

    # A relay host (loopback here) neither.
    relay = bh(config, "127.0.0.1", helo_session("localhost"), port=25, sock=sock)
    assert relay.codes()[-2:] == ["250", "221"], relay.out


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_helo_is_log_only_by_default(configs: dict[str, Path], daemon: Lookupd,
                                     flavour: str) -> None:
    config = configs[flavour]
    ours = primary_hostname(config)
    bot = bh(config, CLEAN, helo_session(ours, ["root@localhost", "root@localhost"]), port=25,
             sock=daemon.socket)
    assert bot.codes() == ["220", "250", "250", "250", "250", "221"], bot.out
    assert bot.logged(f"lookupd helo log-only: [{CLEAN}] would deny check=ours: Your HELO name "
                      f"{ours} is one of our own names or addresses")
    assert len(bot.logged("lookupd helo")) == 1


# --- RCPT ACL: relay hosts are blocked by address, as users are ---------------------------

@pytest.fixture
def own_daemon(lab: ConnectLab, tmp_path: Path) -> Iterator[Lookupd]:
    """A lookupd of the test's own: its user state starts empty."""
    workdir = short_dir()
    running = Lookupd(workdir, lookupd_config(lab.resolver_port, tmp_path)).start()
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_relay_host_is_blocked_by_address(configs: dict[str, Path], own_daemon: Lookupd,
                                          flavour: str) -> None:
    """A relay host (loopback: in relay_from_hosts everywhere) that did not authenticate and
    sends to three unknown local recipients (the test limit) is blocked as host:IP and its
    mail frozen; an authenticated user from the same host is still keyed by its name."""
    config, sock = configs[flavour], own_daemon.socket
    smtp = ("EHLO office-pc.example\nMAIL FROM:<pc@example.net>\n"
            + "".join(f"RCPT TO:<{r}>\n" for r in ("gone1@localhost", "gone2@localhost",
                                                     "root@localhost", "gone3@localhost",
                                                     "root@localhost"))
            + "QUIT\n")
    first = bh(config, "127.0.0.1", smtp, port=25, sock=sock)
    assert first.codes() == ["220", "250", "250", "550", "550", "250", "550", "250", "221"], \
        first.out
    assert len(first.logged("lookupd unknown recipient of relay host host:127.0.0.1")) == 3
    assert first.logged("lookupd user blocked: host:127.0.0.1 [127.0.0.1]: message frozen "
                        "(3 invalid recipients in 1h)")
    assert "blocked - since=" in own_daemon.query("user host:127.0.0.1")

    # The next message from that host is frozen at once.
    again = bh(config, "127.0.0.1", "EHLO office-pc.example\nMAIL FROM:<pc@example.net>\n"
               "RCPT TO:<root@localhost>\nQUIT\n", port=25, sock=sock)
    assert again.codes()[-2:] == ["250", "221"], again.out
    assert again.logged("lookupd user blocked: host:127.0.0.1 [127.0.0.1]: message frozen")

    # A user who logs in from that host is judged as itself.
    user = bh(config, "127.0.0.1", user_session("erin", ["root@localhost"]), port=587,
              sock=sock)
    assert user.codes()[-2:] == ["250", "221"], user.out
    assert user.logged("lookupd user blocked") == []

    # A host that is not a relay host is not counted: Exim refuses its unknown recipients.
    stranger = bh(config, CLEAN, smtp.replace("office-pc", "mx"), port=25, sock=sock)
    assert stranger.logged("lookupd unknown recipient") == []
    assert own_daemon.query(f"user host:{CLEAN}") == "ok"


# --- connect ACL: the submission log line, the connection rate limit ---------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_accepted_submission_is_logged_with_its_country(configs: dict[str, Path],
                                                        daemon: Lookupd, flavour: str) -> None:
    config, sock = configs[flavour], daemon.socket
    accepted = bh(config, CLEAN, port=587, sock=sock)
    assert accepted.codes() == ["220", "221"], accepted.out
    assert accepted.logged(f"Submission from {CLEAN} on port 587 GB")
    assert bh(config, CLEAN, port=25, sock=sock).logged("Submission from") == []
    assert bh(config, SUBMIT_SE, port=587, sock=sock).logged("Submission from") == []


@pytest.fixture
def exim_spool() -> Iterator[Path]:
    """A spool directory for Exim's hints databases (ratelimit): Exim's user must reach it,
    so not under pytest's 0700 tmp_path."""
    spool = short_dir() / "spool"
    spool.mkdir()
    shutil.chown(spool, "Debian-exim", "Debian-exim")
    yield spool
    shutil.rmtree(spool.parent, ignore_errors=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_connection_ratelimit(daemon: Lookupd, tmp_path: Path, exim_spool: Path,
                              flavour: str) -> None:
    """LOOKUPD_RATELIMIT = 2 / 1h: the third connection from a host is deferred (log-only:
    logged); relay hosts and allowlisted clients are never limited. The ratelimit hints
    database lives in a spool directory of the test's own."""
    # Debian's configuration and the single file take spool_directory from SPOOLDIR already.
    config = (build_sympl(tmp_path, "spool_directory = SPOOLDIR\n") if flavour == "sympl"
              else BUILDERS[flavour](tmp_path))
    defines = [f"SPOOLDIR={exim_spool}", "LOOKUPD_RATELIMIT=2 / 1h"]
    for ip in ("127.0.0.1", ALLOWED):
        for _ in range(3):
            session = bh(config, ip, port=25, sock=daemon.socket, defines=defines)
            assert session.codes() == ["220", "221"], (ip, session.out)
    for _ in range(2):
        session = bh(config, CLEAN, port=25, sock=daemon.socket, defines=defines)
        assert session.codes() == ["220", "221"], (session.out, session.log)
    limited = bh(config, CLEAN, port=25, sock=daemon.socket, defines=defines)
    assert "451 Too many connections from 81.2.69.142; try again later" in limited.out
    assert limited.logged(f'H=[{CLEAN}] temporarily rejected connection in "connect" ACL: '
                          "lookupd ratelimit: 3.0 connections per 1h (limit 2)")
    logged = bh(config, CLEAN, port=25, sock=daemon.socket,
                defines=[*defines, "LOOKUPD_RATE_LOG_ONLY=yes"])
    assert logged.codes() == ["220", "221"], logged.out
    # leaky (Exim's default): a refused connection does not raise the rate.
    assert logged.logged(f"H=[{CLEAN}] Warning: lookupd ratelimit: 3.0 connections per 1h "
                         "(limit 2)")


# --- RCPT ACL: the DNS lists per recipient (LOOKUPD_DNSBL_AT_RCPT) ------------------------

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dnsbl_at_rcpt_spares_postmaster_and_honours_per_domain_files(
        configs: dict[str, Path], lab: ConnectLab, tmp_path: Path, flavour: str) -> None:
    """lookupd does not refuse at connect (deny_on_dnsbl = false); the RCPT ACL refuses a
    listed client per recipient from the cached answer, never for postmaster; with
    LOOKUPD_DNSBL_OPT_IN only for domains with a file named after the list."""
    workdir = short_dir()
    daemon = Lookupd(workdir, lookupd_config(lab.resolver_port, tmp_path,
                                             extra="deny_on_dnsbl = false")).start()
    optin = short_dir()
    try:
        config, sock = configs[flavour], daemon.socket
        smtp = helo_session("mail.example.net", ["root@localhost", "postmaster@localhost"])
        plain = bh(config, LISTED, smtp, port=25, sock=sock)
        assert plain.codes()[:4] == ["220", "250", "250", "250"], plain.out  # not refused
        assert plain.logged("lookupd dnsbl deny") == []

        at_rcpt = bh(config, LISTED, smtp, port=25, sock=sock,
                     defines=["LOOKUPD_DNSBL_AT_RCPT=yes"])
        assert at_rcpt.codes()[:4] == ["220", "250", "250", "550"], at_rcpt.out
        assert f"550 Rejected - {LISTED} is listed at bl.test" in at_rcpt.out
        assert len(at_rcpt.logged("lookupd dnsbl deny at rcpt: lists=bl.test:")) == 1
        assert at_rcpt.out.count("is listed at") == 1  # postmaster is not refused for it

        clean = bh(config, CLEAN, smtp, port=25, sock=sock,
                   defines=["LOOKUPD_DNSBL_AT_RCPT=yes"])
        assert clean.logged("lookupd dnsbl deny") == []

        defines = ["LOOKUPD_DNSBL_AT_RCPT=yes", f"LOOKUPD_DNSBL_OPT_IN={optin}/$domain"]
        not_opted = bh(config, LISTED, smtp, port=25, sock=sock, defines=defines)
        assert not_opted.codes()[3] == "250", not_opted.out
        (optin / "localhost").mkdir(mode=0o755)
        (optin / "localhost" / "bl.test").write_text("")
        opted = bh(config, LISTED, smtp, port=25, sock=sock, defines=defines)
        assert opted.codes()[3] == "550", opted.out
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(optin, ignore_errors=True)
