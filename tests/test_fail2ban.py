"""The shipped fail2ban filter against a real Exim mainlog.

Exim (Debian's config with lookupd's snippets, built as in test_snippets.py) runs real SMTP
sessions with -bs, the client address and port given with -oMa/-oMi, and writes its own
mainlog (with the +pid and +incoming_port log selectors, as busy servers often have).
`fail2ban-regex` then reads that log with exim-snippets/fail2ban/filter.d/exim-lookupd.conf:
every refusal must be matched with the right host, and no accepted client at all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
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
from test_snippets import SNIPPETS, auth_plain, build_debian

FAIL2BAN_REGEX = shutil.which("fail2ban-regex") or "/usr/bin/fail2ban-regex"
FILTER = SNIPPETS / "fail2ban" / "filter.d" / "exim-lookupd.conf"

pytestmark = [
    pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed"),
    pytest.mark.skipif(not Path(FAIL2BAN_REGEX).exists(), reason="fail2ban is not installed"),
]

AUTH_ON_25 = "198.51.100.23"   # 3 incidents: connects fine, then tries AUTH on port 25
AUTH_NO_TLS = "81.2.69.161"    # GB: may use 587, but tries AUTH without TLS
LOG_ONLY = "192.0.2.21"        # listed, with LOOKUPD_LOG_ONLY: logged, not refused
DOWN = "198.51.100.99"         # while lookupd cannot be reached

REFUSED = {INCIDENTS, LISTED, SUBMIT_SE, AUTH_ON_25, AUTH_NO_TLS}
ACCEPTED = {CLEAN, ALLOWED, SUBMIT_SE_IMAP, LOG_ONLY, DOWN}


@pytest.fixture(scope="module")
def mainlog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    for tool in ("rbldnsd", "knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    base = tmp_path_factory.mktemp("fail2ban")
    # Exim writes its log as Debian-exim: outside pytest's private tmp, world-writable.
    logs = short_dir()
    for sub in ("log", "spool"):
        (logs / sub).mkdir()
        (logs / sub).chmod(0o777)
    config = build_debian(base / "exim", local_macros=(
        f"SPOOLDIR = {logs / 'spool'}\nlog_file_path = {logs / 'log'}/%slog\n"
        "MAIN_LOG_SELECTOR = +smtp_protocol_error +smtp_syntax_error +tls_peerdn +pid "
        "+incoming_port\n"))
    workdir = short_dir()
    with connect_lab(base / "lab") as lab:
        daemon = Lookupd(workdir, lookupd_config(lab.resolver_port, base)).start()
        try:
            run_sessions(config, daemon.socket, lab)
        finally:
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    yield logs / "log" / "mainlog"
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


def run_sessions(config: Path, sock: Path, lab: ConnectLab) -> None:
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


def test_mainlog_has_every_kind_of_line(mainlog: Path) -> None:
    text = mainlog.read_text()
    for line in (f'[{INCIDENTS}]:41234 U=root rejected connection in "connect" ACL: lookupd '
                 "deny rule=incidents",
                 f"[{SUBMIT_SE}]:41234 U=root temporarily rejected connection in \"connect\" "
                 "ACL: lookupd defer rule=submission",
                 f"[{AUTH_ON_25}]:41234 U=root rejected AUTH PLAIN: lookupd auth refused "
                 "port=25",
                 f"lookupd log-only: [{LOG_ONLY}] would deny rule=dnsbl",
                 f"lookupd down: [{DOWN}] accepted unchecked"):
        assert line in text, (line, text)


def test_filter_matches_every_refusal_and_nothing_else(mainlog: Path) -> None:
    proc = subprocess.run([FAIL2BAN_REGEX, "-o", "ip", str(mainlog), str(FILTER)],
                          capture_output=True, timeout=60, check=True)
    matched = proc.stdout.decode().split()
    assert sorted(matched) == sorted(REFUSED), proc.stdout.decode()
    assert not set(matched) & ACCEPTED


def test_filter_reports_no_missed_refusal(mainlog: Path) -> None:
    """Every line fail2ban did not match is one that refused nobody."""
    proc = subprocess.run([FAIL2BAN_REGEX, "--print-all-missed", str(mainlog), str(FILTER)],
                          capture_output=True, timeout=60, check=True)
    out = proc.stdout.decode()
    missed = out.split("Missed line(s):", 1)[1] if "Missed line(s):" in out else ""
    assert "rejected" not in missed, missed
    assert f"Lines: {len(mainlog.read_text().splitlines())} lines" in out
