"""systemd integration: inherited sockets, readiness notification, and the shipped units."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from support import REPO

from lookupd.errors import ListenError
from lookupd.systemd import listen_fds, notify


def test_no_variables_no_sockets() -> None:
    assert listen_fds({}) == []


def test_variables_for_another_process_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(env, pid=4242) == []
    assert env == {}


@pytest.mark.parametrize("env", [{"LISTEN_PID": "x", "LISTEN_FDS": "1"},
                                 {"LISTEN_PID": "4242", "LISTEN_FDS": "one"},
                                 {"LISTEN_FDS": "1"}])
def test_malformed_variables_are_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(ListenError, match="malformed socket activation"):
        listen_fds(env, pid=4242)


def test_inherited_socket_on_fd_3(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    saved = os.dup(3) if _fd_open(3) else None
    os.dup2(listener.fileno(), 3)
    try:
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
        socks = listen_fds(env)
        assert len(socks) == 1 and socks[0].family == socket.AF_UNIX
        assert env == {}
        socks[0].detach()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        listener.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_notify(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(100) == b"READY=1"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit in ("lookupd.socket", "lookupd.service"):
        text = (REPO / "systemd" / unit).read_text()
        # verify checks that ExecStart exists: point it at this checkout's lookupd.
        text = text.replace("/usr/local/bin/lookupd", shutil.which("lookupd") or
                            str(REPO / ".venv" / "bin" / "lookupd"))
        (tmp_path / unit).write_text(text)
    # --man=no: the Documentation= pages are in man/, installed by the Debian package
    # (test_debian_package verifies the installed units with them).
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", "lookupd.socket",
                          "lookupd.service"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "lookupd" not in out.stderr, out.stderr


def test_units_document_pages_of_man() -> None:
    for unit in ("lookupd.socket", "lookupd.service"):
        text = (REPO / "systemd" / unit).read_text()
        pages = re.findall(r"man:([\w.-]+)\((\d)\)", text)
        assert pages, unit
        for name, section in pages:
            assert (REPO / "man" / f"{name}.{section}.md").exists(), f"{unit}: {name}({section})"


def test_service_unit_exposure(tmp_path: Path) -> None:
    """systemd-analyze security --offline: no worse than 1.8 (issue 12), with
    MemoryDenyWriteExecute=yes (lookupd needs no writable executable memory)."""
    text = (REPO / "systemd" / "lookupd.service").read_text()
    assert "\nMemoryDenyWriteExecute=yes\n" in text
    unit = tmp_path / "lookupd.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for lookupd.service: (\d+\.\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found.group(1)) <= 1.8, out.stdout
