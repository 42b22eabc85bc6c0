"""A real Exim (-bh, a test plaintext authenticator, a router that knows a few local users)
counting invalid recipients of authenticated users in lookupd and freezing a blocked user's
mail; `lookupd users unblock` lets the user send again."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import EXIM, EXIM_BASE, REPO, Exim, Lookupd, short_dir

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

# The recipe this replaces counted with ratelimit and ran `${run{/bin/sh -c "echo ... >>
# blocked_authenticated_users"}}`. Here: `user-fail` for each invalid recipient of an
# authenticated user, `user` before accepting any recipient of one. ${escape:} keeps what
# the client typed (a quoted local part, 8-bit bytes) printable ASCII on one line. The FAIL
# string `ok` fails open when lookupd is down.
EXIM_CONFIG = r"""
domainlist local_domains = example.org
acl_smtp_rcpt = acl_rcpt
auth_advertise_hosts = *

begin acl
acl_rcpt:
  # A blocked user's mail is frozen (kept for the admin to look at), not refused.
  warn  authenticated = *
        set acl_m_user = ${readsocket{LOOKUPD_SOCKET}\
                           {user ${escape:$authenticated_id}\n}{3s}{}{ok}}
        condition = ${extract{blocked}{$acl_m_user}{yes}{no}}
        control   = freeze/no_tell
        logwrite  = lookupd: froze mail of blocked user $authenticated_id \
                    since ${extract{since}{$acl_m_user}}: ${extract{reason}{$acl_m_user}}
  # Each invalid recipient of an authenticated user counts towards the block.
  deny  authenticated = *
        !verify   = recipient
        set acl_m_fail = ${readsocket{LOOKUPD_SOCKET}{user-fail ${escape:$authenticated_id} \
                           ${escape:$local_part@$domain}\n}{3s}{}{ok}}
        logwrite  = lookupd: invalid recipient $local_part@$domain from $authenticated_id: \
                    ${extract{1}{ }{$acl_m_fail}}
        message   = no such user here
  accept authenticated = *
  deny  message   = authentication required

begin routers
known_users:
  driver = accept
  domains = +local_domains
  local_parts = alice : bob : carol : postmaster
  transport = devnull

begin transports
devnull:
  driver = appendfile
  file = /dev/null

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{match{$auth2}{\N^(alice|bob)$\N}}{eq{$auth3}{secret}}}}
  server_set_id = $auth2
"""


def session(user: str, *recipients: str) -> str:
    token = base64.b64encode(f"\0{user}\0secret".encode()).decode()
    lines = ["EHLO client.example", f"AUTH PLAIN {token}", f"MAIL FROM:<{user}@example.org>"]
    lines += [f"RCPT TO:<{r}>" for r in recipients]
    lines += ["DATA", "Subject: test", "", "hello", ".", "QUIT"]
    return "\n".join(lines) + "\n"


def log_lines(stderr: str, marker: str = "lookupd:") -> list[str]:
    return [line.removeprefix("LOG: ") for line in stderr.splitlines()
            if line.startswith("LOG: ") and marker in line]


def cli_config(daemon: Lookupd, tmp_path: Path) -> Path:
    """A config for `lookupd users` naming the daemon's state directory."""
    path = tmp_path / "cli.toml"
    path.write_text(f'[server]\nstate_dir = "{daemon.workdir / "state"}"\n')
    return path


@pytest.fixture
def daemon(start_lookupd: StartLookupd) -> Lookupd:
    return start_lookupd('[server]\nsocket_group = "Debian-exim"\n'
                         '[users]\nlimit = 3\nnotify_command = ""\n')


@pytest.fixture
def exim() -> Iterator[Exim]:
    # -bh takes DATA into its spool as Debian-exim: a directory it can reach (tmp_path is 0700).
    workdir = short_dir("lkdx")
    yield Exim(workdir, EXIM_BASE.format(workdir=workdir) + EXIM_CONFIG)
    shutil.rmtree(workdir, ignore_errors=True)


def test_blocked_user_is_frozen_until_unblocked(exim: Exim, daemon: Lookupd,
                                                tmp_path: Path) -> None:
    defines = [f"LOOKUPD_SOCKET={daemon.socket}"]

    # Alice's password was stolen: the spammer sends to a harvested list full of dead addresses.
    out, err = exim.bh("192.0.2.10", session("alice", "nosuch1@example.org",
                                             "nosuch2@example.org", "nosuch3@example.org",
                                             "bob@example.org"), defines)
    assert "235 Authentication succeeded" in out
    assert out.count("550 no such user here") == 3
    assert log_lines(err, "lookupd: invalid") == [
        "lookupd: invalid recipient nosuch1@example.org from alice: ok",
        "lookupd: invalid recipient nosuch2@example.org from alice: ok",
        "lookupd: invalid recipient nosuch3@example.org from alice: blocked",
    ]
    # The third one blocked her at once: the valid recipient of the same message is frozen.
    frozen = log_lines(err, "lookupd: froze")
    assert len(frozen) == 1
    assert "blocked user alice since 20" in frozen[0]
    assert frozen[0].endswith(": 3 invalid recipients in 1h")

    assert len(log_lines(err, "frozen by ACL")) == 1  # Exim's own line for the message

    # Her next message hits the freeze branch from its first recipient.
    out, err = exim.bh("192.0.2.10", session("alice", "carol@example.org"), defines)
    assert "250 Accepted" in out
    assert len(log_lines(err, "lookupd: froze")) == 1
    assert len(log_lines(err, "frozen by ACL")) == 1

    # Bob is untouched, even after invalid recipients of his own; a quoted local part with a
    # space still counts (the rest of the request line is the recipient).
    out, err = exim.bh("192.0.2.11", session("bob", "nosuch9@example.org",
                                             '"no such"@example.org', "carol@example.org"),
                       defines)
    assert log_lines(err, "lookupd: froze") == [] and log_lines(err, "frozen by ACL") == []
    assert log_lines(err, "lookupd: invalid") == [
        "lookupd: invalid recipient nosuch9@example.org from bob: ok",
        "lookupd: invalid recipient no such@example.org from bob: ok"]
    history = subprocess.run(
        [sys.executable, "-m", "lookupd", "users", "--config", str(cli_config(daemon, tmp_path)),
         "history", "bob"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert "2 invalid recipient(s)" in history.stdout, history.stderr
    assert "no?such@example.org" in history.stdout

    # The admin checks the account and unblocks it with the CLI, beside the running daemon.
    run = subprocess.run([sys.executable, "-m", "lookupd", "users", "--config",
                          str(cli_config(daemon, tmp_path)), "unblock", "alice"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert run.returncode == os.EX_OK, run.stderr
    # The daemon follows within a second (data_version, looked at on lookups).
    deadline = time.monotonic() + 5
    while daemon.query("user alice\n") != "ok":
        assert time.monotonic() < deadline, "the daemon did not see the unblock"
        time.sleep(0.1)

    out, err = exim.bh("192.0.2.10", session("alice", "carol@example.org"), defines)
    assert "250 Accepted" in out
    assert log_lines(err, "lookupd: froze") == [] and log_lines(err, "frozen by ACL") == []


def test_lookupd_down_fails_open(exim: Exim, tmp_path: Path) -> None:
    """No daemon: the FAIL string `ok` lets authenticated users send (and count nothing)."""
    defines = [f"LOOKUPD_SOCKET={tmp_path / 'no-such.sock'}"]
    out, err = exim.bh("192.0.2.10", session("alice", "nosuch1@example.org", "bob@example.org"),
                       defines)
    assert "550 no such user here" in out and "250 Accepted" in out
    assert log_lines(err, "lookupd: froze") == []
