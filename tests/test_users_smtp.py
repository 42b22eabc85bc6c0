"""Block notifications by SMTP (users.notify_smtp) to a real Exim daemon on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import EXIM, EXIM_BASE, free_port, short_dir

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

EXIM_MTA = """\
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
qualify_domain = test.example
acl_smtp_rcpt = acl_rcpt
begin acl
acl_rcpt:
  accept
begin routers
everything:
  driver = accept
  transport = mailbox
begin transports
mailbox:
  driver = appendfile
  file = {workdir}/mailbox
  user = Debian-exim
  envelope_to_add = true
"""


@pytest.fixture
def mta() -> Iterator[tuple[int, Path]]:
    """A real Exim listening on 127.0.0.1:PORT that appends every message to one file."""
    workdir = short_dir("mta")
    for sub in ("spool", "log"):
        (workdir / sub).mkdir()
        os.chmod(workdir / sub, 0o777)
    os.chmod(workdir, 0o777)
    port = free_port()
    config = workdir / "exim.conf"
    config.write_text(EXIM_BASE.format(workdir=workdir)
                      + EXIM_MTA.format(port=port, workdir=workdir))
    proc = subprocess.Popen([EXIM, "-C", str(config), "-bd", "-oX", str(port), "-oP",
                             str(workdir / "pid"), "-odi"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (workdir / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (workdir / "pid").exists(), (workdir / "log" / "paniclog").read_text() \
            if (workdir / "log" / "paniclog").exists() else "exim -bd did not start"
        yield port, workdir
    finally:
        pid = int((workdir / "pid").read_text()) if (workdir / "pid").exists() else proc.pid
        os.kill(pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_block_notification_by_smtp(start_lookupd: StartLookupd,
                                    mta: tuple[int, Path]) -> None:
    port, workdir = mta
    daemon = start_lookupd(f"""
[users]
limit = 2
notify_command = ""
notify_smtp = "127.0.0.1:{port}"
notify_to = "abuse@test.example"
""")
    assert daemon.query("user-fail mallory@example.com ghost1@test.example") == "ok"
    assert daemon.query("user-fail mallory@example.com ghost2@test.example").startswith(
        "blocked")
    mailbox = workdir / "mailbox"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "mallory" not in (
            mailbox.read_text() if mailbox.exists() else ""):
        time.sleep(0.1)
    mail = mailbox.read_text()
    assert "Subject: lookupd on " in mail and "blocked authenticated user mallory@example.com" \
        in mail
    assert "Envelope-to: abuse@test.example" in mail
    assert "ghost2@test.example" in mail
    assert "lookupd users unblock mallory@example.com" in mail
    assert "notification about blocked user" not in daemon.log()


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_unreachable_smtp_is_logged_and_does_not_delay_answers(
        start_lookupd: StartLookupd, server: str) -> None:
    """Nothing listening, or a server that takes the connection and never speaks (for
    notify_timeout, 3s): the answer that blocks comes back far sooner than either."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # never accepted: connects land in the backlog, nobody greets
        port = silent.getsockname()[1] if server == "silent" else free_port()
        daemon = start_lookupd(f"""
[users]
limit = 1
notify_command = ""
notify_smtp = "127.0.0.1:{port}"
notify_retries = 0
notify_timeout = "3s"
""")
        started = time.monotonic()
        assert daemon.query("user-fail eve x@y").startswith("blocked")
        assert time.monotonic() - started < 2.0  # its own fsync, even on a loaded machine
        deadline = time.monotonic() + 10
        while "notification about blocked user eve" not in daemon.log() and \
                time.monotonic() < deadline:
            time.sleep(0.1)
    assert "SMTP to 127.0.0.1:" in daemon.log() and "users.notify_smtp" in daemon.log()
