"""A real Exim (Debian's exim4, driven with -C, -be and -bh) calling lookupd via ${readsocket}."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import (
    EXIM,
    EXIM_BASE,
    FIREWALL,
    MAXMIND,
    REPO,
    Exim,
    ask,
    free_port,
    with_test_defaults,
)

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

CONFIG = f"""
[server]
socket_group = "Debian-exim"   # exim -bh runs as Debian-exim, as the real daemon does
[geoip]
country_db = "{MAXMIND / 'GeoIP2-Country-Test.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
"""

CONNECT_ACL = """
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  warn  set acl_c_ipcountry = ${readsocket{LOOKUPD_SOCKET}\\
                                {country $sender_host_address}{2s}{}{lookupd-down}}
  warn  set acl_c_incidents = ${readsocket{LOOKUPD_SOCKET}\\
                                {incidents $sender_host_address}{2s}{}{lookupd-down}}
  deny  condition = ${if eq{$acl_c_ipcountry}{SE}}
        message   = Connections from your country ($acl_c_ipcountry) are not accepted
  deny  condition = ${if and{{match{$acl_c_incidents}{\\N^\\d+$\\N}}\\
                               {>{$acl_c_incidents}{10}}}}
        message   = Blacklisted: Denied access - history of unwanted activity
  accept
"""


@pytest.fixture
def exim(tmp_path: Path) -> Exim:
    return Exim(tmp_path / "exim", EXIM_BASE.format(workdir=tmp_path / "exim") + CONNECT_ACL)


@pytest.fixture
def daemon(start_lookupd: StartLookupd):  # type: ignore[no-untyped-def]
    return start_lookupd(CONFIG, tcp_port=free_port())


@pytest.mark.parametrize("options", ["{3s}", "{3s:shutdown=no}", "{<;3s;shutdown=no}"])
@pytest.mark.parametrize("newline", ["", "\\n"])
@pytest.mark.parametrize("via", ["unix", "inet"])
def test_be_readsocket(exim: Exim, daemon, options: str, newline: str,  # type: ignore[no-untyped-def]
                       via: str) -> None:
    if options != "{3s}" and not newline:
        pytest.skip("with shutdown=no the request must end with a newline (documented)")
    target = str(daemon.socket) if via == "unix" else f"inet:127.0.0.1:{daemon.tcp_port}"
    for request, reply in (("country 81.2.69.142", "GB"), ("incidents 2001:db8:1:2::7", "57"),
                           ("country 10.0.0.1", "--"), ("ping", "pong")):
        got = exim.be(f"[${{readsocket{{{target}}}{{{request}{newline}}}{options}{{}}{{FAIL}}}}]")
        assert got == f"[{reply}]", (request, options, newline, via)


def test_be_empty_address_as_for_local_submissions(exim: Exim, daemon) -> None:  # type: ignore[no-untyped-def]
    # Locally submitted mail has no $sender_host_address: `country ` answers --.
    got = exim.be(f"${{readsocket{{{daemon.socket}}}{{country $sender_host_address}}{{2s}}}}")
    assert got == "--"


def test_be_many_lookups_in_one_process(exim: Exim, daemon) -> None:  # type: ignore[no-untyped-def]
    expr = "".join(f"${{readsocket{{{daemon.socket}}}{{country 81.2.69.142}}{{2s}}}}"
                   for _ in range(200))
    assert exim.be(expr) == "GB" * 200


def test_bh_connect_acl(exim: Exim, daemon) -> None:  # type: ignore[no-untyped-def]
    defines = [f"LOOKUPD_SOCKET={daemon.socket}"]
    out, _ = exim.bh("81.2.69.142", "QUIT\n", defines)
    assert "220 " in out and "550" not in out
    out, _ = exim.bh("89.160.20.112", "QUIT\n", defines)
    assert "550 Connections from your country (SE) are not accepted" in out
    out, _ = exim.bh("203.0.113.7", "QUIT\n", defines)  # 42 incidents in the nftfw test db
    assert "550 Blacklisted: Denied access - history of unwanted activity" in out
    out, _ = exim.bh("198.51.100.23", "QUIT\n", defines)  # 3 incidents
    assert "220 " in out and "550" not in out


def test_bh_fails_open_when_lookupd_is_down(exim: Exim, tmp_path: Path) -> None:
    out, err = exim.bh("89.160.20.112", "QUIT\n", [f"LOOKUPD_SOCKET={tmp_path}/absent.sock"])
    assert "220 " in out
    assert "550" not in out and "451" not in out


def test_socket_activation_with_systemd_socket_activate(exim: Exim, sockdir: Path) -> None:
    """systemd-socket-activate holds the socket and starts lookupd on the first connection."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = sockdir / "activated.sock"
    config = sockdir / "c.toml"
    config.write_text(with_test_defaults(CONFIG))
    log = open(sockdir / "log", "wb")
    proc = subprocess.Popen(
        [activate, "-l", str(path), "-E", "PYTHONPATH",
         sys.executable, "-m", "lookupd", "serve", "--config", str(config),
         "--state-dir", str(sockdir)],
        stdout=log, stderr=log, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Nothing is running yet; the first connection starts lookupd and is answered.
        got = exim.be(f"${{readsocket{{{path}}}{{country 81.2.69.142}}{{10s}}{{}}{{FAIL}}}}")
        assert got == "GB"
        assert ask(path, b"incidents 203.0.113.7") == b"42"
        assert "socket-activated" in (sockdir / "log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def readme_macro(name: str) -> str:
    """A macro line as the README's "Exim examples" define it."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith(f"{name} = "):
            return line
    raise AssertionError(f"README defines no {name}")


@pytest.mark.parametrize("fail_string", ["??", "LOOKUPD_RESET??"])
def test_the_readme_reset_clears_exims_stale_socket_handle(tmp_path: Path,
                                                           fail_string: str) -> None:
    """exim-readsocket.md section 10: after a failed connect the next call on the same socket
    string writes to the stale descriptor (EBADF, or a file that took the number). With the
    README's LOOKUPD_RESET in the fail string the next call starts afresh."""
    missing = tmp_path / "absent.sock"
    exim = Exim(tmp_path / "exim", EXIM_BASE.format(workdir=tmp_path / "exim")
                + f"LOOKUPD_SOCKET = {missing}\n" + readme_macro("LOOKUPD_RESET") + "\n")
    first = exim.be(f"${{readsocket{{LOOKUPD_SOCKET}}{{country 1.2.3.4}}{{2s}}{{}}"
                    f"{{{fail_string}}}}}")
    assert first == "??"
    # Two calls in one Exim process: the second shows what the first left in the handle.
    both = exim.be(f"${{readsocket{{LOOKUPD_SOCKET}}{{country 1.2.3.4}}{{2s}}{{}}"
                   f"{{{fail_string}}}}}|${{readsocket{{LOOKUPD_SOCKET}}{{ping}}{{2s}}}}")
    if fail_string == "??":
        assert both == "Failed: request write to socket failed: Bad file descriptor"
    else:
        assert both == f"Failed: failed to connect to socket {missing}: No such file or directory"
