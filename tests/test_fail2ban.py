"""The shipped fail2ban filters and jails, run by the real fail2ban.

Each filter is installed as an admin installs it: copied into a `filter.d` beside fail2ban's own
exim-common.conf, which it includes. The refusal filter (exim-lookupd.conf) must match every
refusal line with its host and nothing else: no defer (those go to the opt-in
exim-lookupd-defer.conf), no log-only, lookupd down or no verdict line, no accepted session,
no per-user line. The lines come from a real Exim (Debian's config with lookupd's snippets,
built as in test_snippets.py) writing its own mainlog with and without the +pid and
+incoming_port log selectors, and from the README's "Log lines" put behind Exim's mainlog
prefixes and behind the syslog and journal prefixes of upstream fail2ban's exim test sample,
with host names that have dots and hyphens.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support import EXIM, Lookupd, short_dir
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
from test_snippets import SNIPPETS, auth_plain, build_debian, user_session

FAIL2BAN_REGEX = shutil.which("fail2ban-regex") or "/usr/bin/fail2ban-regex"
FAIL2BAN_CLIENT = shutil.which("fail2ban-client") or "/usr/bin/fail2ban-client"
# The fail2ban package's own configuration: only read, and only its .conf files.
FAIL2BAN_ETC = Path("/etc/fail2ban")
EXIM_COMMON = FAIL2BAN_ETC / "filter.d" / "exim-common.conf"
# Upstream's test sample for its exim filter, as Debian's fail2ban package ships it.
UPSTREAM_SAMPLE = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs/exim")

FILTER = SNIPPETS / "fail2ban" / "filter.d" / "exim-lookupd.conf"
DEFER_FILTER = SNIPPETS / "fail2ban" / "filter.d" / "exim-lookupd-defer.conf"
JAILS = SNIPPETS / "fail2ban" / "jail.d"

pytestmark = [
    pytest.mark.skipif(not Path(FAIL2BAN_REGEX).exists(), reason="fail2ban is not installed"),
    pytest.mark.skipif(not EXIM_COMMON.exists(), reason="fail2ban's exim-common.conf is absent"),
]


# --- running fail2ban-regex -------------------------------------------------------------------

def fail2ban_hits(log_text: str, filter_path: Path | None = None,
                  *options: str) -> list[tuple[str, str]]:
    """(host, line) for each line of log_text that the filter (default: the shipped refusal
    filter) matches, in log order, as the real fail2ban-regex reads them. `options` go to
    fail2ban-regex (e.g. "-d", "{NONE}" for journal lines, which carry no date)."""
    filter_path = FILTER if filter_path is None else filter_path
    with tempfile.TemporaryDirectory() as tmp:
        # A filter in a directory named filter.d is read as fail2ban reads an installed one,
        # [INCLUDES] resolved beside it (a .local there too, but there is none).
        filter_d = Path(tmp) / "filter.d"
        filter_d.mkdir()
        shutil.copy(EXIM_COMMON, filter_d)
        installed = filter_d / filter_path.name
        shutil.copy(filter_path, installed)
        log = Path(tmp) / "log"
        log.write_text(log_text)
        proc = subprocess.run(
            [FAIL2BAN_REGEX, *options, "--out", "<ip> <msg>", str(log), str(installed)],
            capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [(row.partition(" ")[0], row.partition(" ")[2]) for row in proc.stdout.splitlines()]


def fail2ban_matched(log_text: str, filter_path: Path | None = None) -> list[str]:
    """The lines of log_text that the shipped refusal filter (or filter_path) matches, through
    the real fail2ban-regex."""
    return [line for _, line in fail2ban_hits(log_text, filter_path)]


# --- the README's log lines behind every prefix -----------------------------------------------

# The refusals, with the host to ban: the lines after Exim's own prefix (date, [pid]), in the
# host field forms log_selector gives (+incoming_port, +incoming_interface, ident, host name).
REFUSAL_LINES = {
    'H=[203.0.113.7] rejected connection in "connect" ACL: lookupd deny rule=incidents '
    "country=GB incidents=42 dnsbl=clean: Blacklisted: Denied access - history of unwanted "
    "activity": "203.0.113.7",
    "H=mail-7.example.net [192.0.2.20]:41234 I=[192.0.2.1]:25 rejected connection in "
    '"connect" ACL: lookupd deny rule=dnsbl country=-- incidents=0 dnsbl=listed: Rejected - '
    "192.0.2.20 is listed at bl.test": "192.0.2.20",
    'H=[2001:db8::7]:41234 rejected connection in "connect" ACL: lookupd deny rule=no_ptr '
    "country=?? incidents=?? dnsbl=unknown: No reverse DNS for 2001:db8::7": "2001:db8::7",
    "H=(client.example) [198.51.100.23] rejected AUTH PLAIN: lookupd auth refused port=25 "
    "country=--: AUTH on a port for server-to-server mail": "198.51.100.23",
    "H=host-81-2-69-161.example.co.uk (client.example) [81.2.69.161]:41234 U=root rejected "
    "AUTH LOGIN: lookupd auth refused port=587 country=GB: AUTH without TLS": "81.2.69.161",
}
# The submission rule's defers: for the defer filter only.
DEFER_LINES = {
    'H=[89.160.20.112] temporarily rejected connection in "connect" ACL: lookupd defer '
    "rule=submission country=SE incidents=0 dnsbl=clean: Submission is not open to "
    "89.160.20.112 now; log in to your mailbox (IMAP) first, or ask postmaster": "89.160.20.112",
    "H=ip-89-160-20-113.example.se [89.160.20.113]:41234 I=[192.0.2.1]:587 temporarily "
    'rejected connection in "connect" ACL: lookupd defer rule=submission country=SE '
    "incidents=0 dnsbl=clean: Submission is not open to 89.160.20.113 now; log in to your "
    "mailbox (IMAP) first, or ask postmaster": "89.160.20.113",
}
# Nobody refused, or a user (not a host) at fault: no filter may match these.
OTHER_LINES = (
    "lookupd log-only: [192.0.2.21] would deny rule=dnsbl country=-- incidents=0 dnsbl=listed: "
    "Rejected - 192.0.2.21 is listed at bl.test",
    "lookupd down: [198.51.100.99] accepted unchecked; /run/lookupd/lookupd.sock did not answer",
    "lookupd down: [198.51.100.99] AUTH checked without lookupd; /run/lookupd/lookupd.sock did "
    "not answer",
    "lookupd down: [198.51.100.99] user alice not checked; /run/lookupd/lookupd.sock did not "
    "answer",
    "lookupd down: [198.51.100.99] invalid recipient of alice not counted; "
    "/run/lookupd/lookupd.sock did not answer",
    "lookupd no verdict: [198.51.100.98] accepted unchecked; lookupd said: error unknown request",
    "lookupd user blocked: alice [81.2.69.142]: message frozen (3 invalid recipients in 1h)",
    "H=(client.example) [81.2.69.142]:41234 F=<alice@example.net> A=plain:alice rejected RCPT "
    "<gone@example.net>: lookupd unknown recipient of authenticated user alice",
    "1tXyZa-000Abc-Qr <= alice@example.net H=(client.example) [81.2.69.142]:41234 "
    "P=esmtpsa X=TLS1.3:TLS_AES_256_GCM_SHA384:256 CV=no A=plain:alice S=1234 "
    "id=1@example.net",
    "SMTP connection from (client.example) [81.2.69.142]:41234 closed by QUIT",
)

DATE = "2026-03-14 09:26:53"
# Exim's own log file: plain, and with log_selector +pid.
MAINLOG_PREFIXES = {"mainlog": f"{DATE} ", "mainlog+pid": f"{DATE} [29786] "}
# Exim logging to syslog: the forms of upstream fail2ban's exim sample (gh-2553, gh-3060), and
# what rsyslog writes with Exim's syslog_timestamp on (its default) and off; host names with
# dots and hyphens.
SYSLOG_PREFIXES = {
    "syslog": f"{DATE} mx1.fqdn.local exim[29786]: ",
    "syslog-ng+pid": f"{DATE} mail-gw.example.net exim[8001]: [8001] ",
    "rsyslog+exim-date": f"Mar 14 09:26:53 mx-1.example.org exim[29786]: {DATE} ",
    "rsyslog": "Mar 14 09:26:53 mx1.fqdn.local exim[29786]: ",
}
PREFIXES = {**MAINLOG_PREFIXES, **SYSLOG_PREFIXES}
# fail2ban's systemd backend: "HOST IDENT[PID]: MESSAGE", the date apart (gh-3060).
JOURNAL_PREFIX = f"mail.example.com exim[3751842]: {DATE} "
JOURNAL = ("-d", "{NONE}")  # fail2ban-regex: no date to look for, the journal gives it apart


def logged(prefix: str, lines: Iterable[str]) -> list[str]:
    return [f"{prefix}{line}" for line in lines]


def everything(prefix: str) -> str:
    return "".join(f"{line}\n" for line in logged(
        prefix, [*REFUSAL_LINES, *DEFER_LINES, *OTHER_LINES]))


def prefix_shape(prefix: str) -> str:
    """A prefix with its dates, syslog host name and process ids made generic."""
    shape = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", prefix)
    shape = re.sub(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d", "DATE", shape)
    shape = re.sub(r"[\w.-]+ exim\[\d+\]:", "HOST exim[PID]:", shape)
    return re.sub(r"\[\d+\]", "[PID]", shape)


def test_syslog_prefixes_cover_upstreams_sample() -> None:
    """Every syslog/journal prefix form of upstream's exim sample is one the tests use."""
    if not UPSTREAM_SAMPLE.exists():
        pytest.skip("fail2ban's test sample files are not installed")
    upstream = {prefix_shape(m[1]) for m in re.finditer(
        r"(?m)^(?!#)(.*? exim\[\d+\]: (?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |\[\d+\] )?)",
        UPSTREAM_SAMPLE.read_text())}
    assert upstream, "no syslog prefix in upstream's sample"
    ours = {prefix_shape(p) for p in (*SYSLOG_PREFIXES.values(), JOURNAL_PREFIX)}
    assert upstream <= ours, upstream


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_refusal_filter_matches_each_refusal_with_its_host(prefix: str) -> None:
    hits = fail2ban_hits(everything(prefix))
    expected = [(host, f"{prefix}{line}") for line, host in REFUSAL_LINES.items()]
    assert hits == expected
    assert len(hits) == 5


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
def test_defer_filter_matches_the_defers_only(prefix: str) -> None:
    hits = fail2ban_hits(everything(prefix), DEFER_FILTER)
    assert hits == [(host, f"{prefix}{line}") for line, host in DEFER_LINES.items()]
    assert len(hits) == 2


def test_filters_read_journal_lines() -> None:
    text = everything(JOURNAL_PREFIX)
    assert fail2ban_hits(text, FILTER, *JOURNAL) == [
        (host, f"{JOURNAL_PREFIX}{line}") for line, host in REFUSAL_LINES.items()]
    assert fail2ban_hits(text, DEFER_FILTER, *JOURNAL) == [
        (host, f"{JOURNAL_PREFIX}{line}") for line, host in DEFER_LINES.items()]


def test_fail2ban_matched_reads_a_whole_mixed_log() -> None:
    """All the forms in one file, as a log that changed format on the way would be."""
    prefixes = list(PREFIXES.values())
    text = "".join(everything(prefix) for prefix in prefixes)
    matched = fail2ban_matched(text)
    assert len(matched) == len(prefixes) * len(REFUSAL_LINES) == 30
    assert matched == [line for prefix in prefixes for line in logged(prefix, REFUSAL_LINES)]


# --- a real Exim's mainlog --------------------------------------------------------------------

AUTH_ON_25 = "198.51.100.23"   # 3 incidents: connects fine, then tries AUTH on port 25
AUTH_NO_TLS = "81.2.69.161"    # GB: may use 587, but tries AUTH without TLS
LOG_ONLY = "192.0.2.21"        # listed, with LOOKUPD_LOG_ONLY: logged, not refused
DOWN = "198.51.100.99"         # while lookupd cannot be reached
USER_HOST = CLEAN              # an authenticated user with unknown recipients: blocked

REFUSED = {INCIDENTS, LISTED, AUTH_ON_25, AUTH_NO_TLS}
DEFERRED = {SUBMIT_SE}
ACCEPTED = {CLEAN, ALLOWED, SUBMIT_SE_IMAP, LOG_ONLY, DOWN, USER_HOST}

# Debian's default, and what busy servers often add.
SELECTORS = {"plain": "", "pid-port": "+pid +incoming_port +incoming_interface"}


@pytest.fixture(scope="module")
def exim_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConnectLab, Lookupd]]:
    if not Path(EXIM).exists():
        pytest.skip("exim4 is not installed")
    for tool in ("rbldnsd", "knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    base = tmp_path_factory.mktemp("fail2ban-lab")
    workdir = short_dir()
    with connect_lab(base / "lab") as lab:
        daemon = Lookupd(workdir, lookupd_config(lab.resolver_port, base)).start()
        try:
            yield lab, daemon
        finally:
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module", params=sorted(SELECTORS))
def mainlog(request: pytest.FixtureRequest, exim_lab: tuple[ConnectLab, Lookupd],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mainlog a real Exim wrote for the sessions of run_sessions, with the log_selector
    SELECTORS[request.param]."""
    selectors = SELECTORS[request.param]
    base = tmp_path_factory.mktemp(f"fail2ban-{request.param}")
    # Exim writes its log as Debian-exim: outside pytest's private tmp, world-writable.
    logs = short_dir()
    for sub in ("log", "spool"):
        (logs / sub).mkdir()
        (logs / sub).chmod(0o777)
    config = build_debian(base / "exim", local_macros=(
        f"SPOOLDIR = {logs / 'spool'}\nlog_file_path = {logs / 'log'}/%slog\n"
        f"MAIN_LOG_SELECTOR = +smtp_protocol_error +smtp_syntax_error +tls_peerdn {selectors}\n"))
    try:
        run_sessions(config, exim_lab[1].socket, f"mallory-{request.param}")
        yield (logs / "log" / "mainlog").read_text()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def bs(config: Path, ip: str, port: int, smtp: str, sock: Path | str,
       defines: tuple[str, ...] = ()) -> str:
    """A real SMTP session on stdin/stdout (-bs) as if from ip:41234 to port: Exim receives
    and logs as it does for a network client."""
    proc = subprocess.run(
        [EXIM, "-C", str(config), f"-DLOOKUPD_SOCKET={sock}", *(f"-D{d}" for d in defines),
         "-oMa", f"{ip}.41234", "-oMi", f"127.0.0.1.{port}", "-bs"],
        input=smtp.replace("\n", "\r\n").encode(), capture_output=True, timeout=30, check=False)
    return proc.stdout.decode(errors="replace")


def run_sessions(config: Path, sock: Path, user: str) -> None:
    auth = f"EHLO client.example\nAUTH PLAIN {auth_plain('alice')}\nQUIT\n"
    expect = {
        (INCIDENTS, 25, "QUIT\n"): "550 Blacklisted",
        (LISTED, 25, "QUIT\n"): "550 Rejected",
        (SUBMIT_SE, 587, "QUIT\n"): "451",
        (AUTH_ON_25, 25, auth): "503 AUTH is not accepted on port 25",
        (AUTH_NO_TLS, 587, auth): "503 AUTH needs TLS",
        (CLEAN, 25, "EHLO client.example\nQUIT\n"): "221",
        (ALLOWED, 25, "QUIT\n"): "221",
        (SUBMIT_SE_IMAP, 587, "QUIT\n"): "221",
    }
    for (ip, port, smtp), seen in expect.items():
        out = bs(config, ip, port, smtp, sock)
        assert seen in out, (ip, out)
    assert "221" in bs(config, LOG_ONLY, 25, "QUIT\n", sock, ("LOOKUPD_LOG_ONLY=yes",))
    assert "221" in bs(config, DOWN, 25, "QUIT\n", sock.parent / "absent.sock")
    # Three unknown recipients (lookupd's limit in these tests) block the user: per-user lines.
    session = user_session(user, ["gone1@localhost", "gone2@localhost", "gone3@localhost",
                                  "root@localhost"])
    out = bs(config, USER_HOST, 587, session, sock, (f"LOOKUPD_NOTLS_HOSTS={USER_HOST}",))
    assert out.count("550 Unknown user") == 3, out


def test_mainlog_has_every_kind_of_line(mainlog: str) -> None:
    for pattern in (
            rf'\[{INCIDENTS}\]\S* .*rejected connection in "connect" ACL: lookupd deny '
            "rule=incidents ",
            rf"\[{SUBMIT_SE}\]\S* .*temporarily rejected connection in \"connect\" ACL: "
            "lookupd defer rule=submission ",
            rf"\[{AUTH_ON_25}\]\S* .*rejected AUTH PLAIN: lookupd auth refused port=25 ",
            rf"\[{AUTH_NO_TLS}\]\S* .*rejected AUTH PLAIN: lookupd auth refused port=587 ",
            rf"lookupd log-only: \[{LOG_ONLY}\] would deny rule=dnsbl ",
            rf"lookupd down: \[{DOWN}\] accepted unchecked",
            rf"\[{USER_HOST}\]\S* .*rejected RCPT <gone1@localhost>: lookupd unknown recipient",
            rf"lookupd user blocked: mallory-\S+ \[{USER_HOST}\]: message frozen"):
        assert re.search(pattern, mainlog), (pattern, mainlog)


def test_mainlog_log_selectors(mainlog: str, request: pytest.FixtureRequest) -> None:
    """The two runs differ as intended: [pid], :port and I= only with the selectors."""
    line = next(line for line in mainlog.splitlines() if f"[{INCIDENTS}]" in line)
    if request.node.callspec.params["mainlog"] == "plain":
        assert re.search(rf"^\S+ \S+ H=\[{INCIDENTS}\] U=root rejected ", line), line
    else:
        assert re.search(rf"^\S+ \S+ \[\d+\] H=\[{INCIDENTS}\]:41234 I=\[127\.0\.0\.1\]:25 ",
                         line), line


def test_refusal_filter_on_a_real_mainlog(mainlog: str) -> None:
    hits = fail2ban_hits(mainlog)
    assert sorted(host for host, _ in hits) == sorted(REFUSED), hits
    # Every refusal line matched; nothing else.
    refusals = [line for line in mainlog.splitlines()
                if "lookupd deny " in line or "lookupd auth refused " in line]
    assert [line for _, line in hits] == refusals
    assert fail2ban_matched(mainlog) == refusals
    assert len(refusals) == 4


def test_defer_filter_on_a_real_mainlog(mainlog: str) -> None:
    hits = fail2ban_hits(mainlog, DEFER_FILTER)
    assert [host for host, _ in hits] == [SUBMIT_SE]
    assert "lookupd defer rule=submission " in hits[0][1]
    assert not {host for host, _ in hits} & (REFUSED | ACCEPTED)


# --- the jails --------------------------------------------------------------------------------

def jail_settings(tmp_path: Path, local: str) -> dict[str, dict[str, str]]:
    """What `fail2ban-client --dump` makes of the shipped jails (and filters), installed in a
    copy of the package's configuration (no .local of the machine) with `local` as a jail.d
    .local: per started jail, its settings and those of its action."""
    etc = tmp_path / "fail2ban"
    etc.mkdir(parents=True)
    for conf in (FAIL2BAN_ETC / "fail2ban.conf", FAIL2BAN_ETC / "jail.conf",
                 *FAIL2BAN_ETC.glob("paths-*.conf")):
        shutil.copy(conf, etc)
    shutil.copytree(FAIL2BAN_ETC / "action.d", etc / "action.d",
                    ignore=shutil.ignore_patterns("*.local"))
    (etc / "filter.d").mkdir()
    shutil.copy(EXIM_COMMON, etc / "filter.d")
    for path in (FILTER, DEFER_FILTER):
        shutil.copy(path, etc / "filter.d")
    shutil.copytree(JAILS, etc / "jail.d")
    (etc / "jail.d" / "zz-test.local").write_text(local)
    proc = subprocess.run([FAIL2BAN_CLIENT, "-c", str(etc), "--dump"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jails: dict[str, dict[str, str]] = {}
    started = set()
    # One command a line, pretty-printed over more lines when long.
    for row in re.split(r"\n(?=\S)", proc.stdout.strip()):
        command = ast.literal_eval(row)
        if command[0] == "set" and len(command) == 4:
            jails.setdefault(command[1], {})[command[2]] = str(command[3])
        elif command[0] == "multi-set" and command[2] == "action":
            jails.setdefault(command[1], {}).update((k, str(v)) for k, v in command[4])
        elif command[0] == "start":
            started.add(command[1])
    return {name: settings for name, settings in jails.items() if name in started}


def seconds(duration: str) -> int:
    """fail2ban's "10m", "1h", "1d" in seconds (the forms the shipped jails use)."""
    match = re.fullmatch(r"(\d+)([smhd])", duration)
    assert match, duration
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def test_jails_load_and_the_defer_jail_is_opt_in_and_lax(tmp_path: Path) -> None:
    log = tmp_path / "mainlog"
    log.touch()
    paths = f"[exim-lookupd]\nlogpath = {log}\n[exim-lookupd-defer]\nlogpath = {log}\n"
    assert set(jail_settings(tmp_path / "shipped", paths)) == {"exim-lookupd"}

    jails = jail_settings(tmp_path / "enabled", paths + "enabled = true\n")
    refusals, defers = jails["exim-lookupd"], jails["exim-lookupd-defer"]
    assert refusals["port"] == "smtp,submissions,submission"
    # Only the submission ports: a deferred user can still log in by IMAP, and mail from the
    # same address to port 25 still arrives.
    assert defers["port"] == "submissions,submission"
    assert int(defers["maxretry"]) >= 5 * int(refusals["maxretry"])
    assert seconds(defers["findtime"]) <= seconds(refusals["findtime"])
    assert seconds(defers["bantime"]) * 24 <= seconds(refusals["bantime"])


def test_the_readmes_ratelimit_failregex_matches_the_ratelimit_line(tmp_path: Path) -> None:
    """exim-snippets/README.md gives a one-line filter for the connection rate limit's 451;
    put after the defer filter's [INCLUDES] and pid, it matches that line and no defer."""
    readme = (SNIPPETS / "README.md").read_text()
    failregex = re.search(r'(?m)^failregex = .*lookupd ratelimit: $', readme)
    assert failregex is not None
    text = re.sub(r"(?m)^failregex = .*$", lambda _: failregex.group(0),
                  DEFER_FILTER.read_text())
    ratelimit_filter = tmp_path / "exim-lookupd-ratelimit.conf"
    ratelimit_filter.write_text(text)
    line = ('2026-12-01 20:00:00 H=[192.0.2.7] temporarily rejected connection in "connect" '
            "ACL: lookupd ratelimit: 11.0 connections per 15m (limit 10)\n")
    defer = ('2026-12-01 20:00:01 H=[192.0.2.8] temporarily rejected connection in "connect" '
             "ACL: lookupd defer rule=submission country=SE incidents=0 dnsbl=clean: x\n")
    assert fail2ban_hits(line + defer, ratelimit_filter) == [("192.0.2.7", line.rstrip("\n"))]
