"""Exhaustion: a real `lookupd serve` with 1,024 file descriptors against thousands of idle
connections, and a flood of bad clients against the log."""

from __future__ import annotations

import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, ask, short_dir, with_test_defaults


@pytest.fixture
def small_daemon() -> Iterator[tuple[Path, Path]]:
    """lookupd under `prlimit --nofile=1024:1024`: it cannot raise its descriptor limit."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    workdir = short_dir()
    config = workdir / "c.toml"
    config.write_text(with_test_defaults('[server]\nread_timeout = "30s"\n'))
    sock, log_path = workdir / "s", workdir / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["prlimit", "--nofile=1024:1024", sys.executable, "-m",
                                 "lookupd", "serve", "--config", str(config), "--socket",
                                 str(sock), "--state-dir", str(workdir)],
                                stdout=log, stderr=log, cwd=REPO)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if ask(sock, b"ping", 1.0) == b"pong":
                    break
            except OSError:
                time.sleep(0.05)
        yield sock, log_path
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(workdir, ignore_errors=True)


def test_idle_connection_flood_never_costs_a_good_client(
        small_daemon: tuple[Path, Path]) -> None:
    sock, log_path = small_daemon
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 5_200
    if hard < need:
        pytest.skip(f"this test needs {need} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    idle: list[socket.socket] = []
    good, failed = 0, []
    try:
        for i in range(5_000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(sock))
            except BlockingIOError:  # the backlog is full for a moment: retry it blocking
                s.setblocking(True)
                s.settimeout(5)
                s.connect(str(sock))
            idle.append(s)
            if i % 50 == 0:  # a good client, all along the flood
                try:
                    reply = ask(sock, b"ping", 5.0)
                except OSError as exc:
                    failed.append(repr(exc))
                    continue
                if reply == b"pong":
                    good += 1
                else:
                    failed.append(repr(reply))
        for _ in range(50):
            assert ask(sock, b"version", 5.0).startswith(b"lookupd ")
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failed == [] and good == 100, failed
    log = log_path.read_text()
    shed = [line for line in log.splitlines() if "closed the oldest idle one" in line]
    assert len(shed) == 1, shed  # said once, summarised after
    assert "the most lookupd keeps (its file descriptor limit is 1024)" in shed[0]
    assert "Traceback" not in log and "Too many open files" not in log


def test_bad_clients_are_summarised_in_the_log(small_daemon: tuple[Path, Path]) -> None:
    sock, log_path = small_daemon
    for i in range(300):
        assert ask(sock, f"frobnicate{i}".encode()).startswith(b"error unknown verb")
        assert ask(sock, f"country bad{i}".encode()).startswith(b"error not an IP address")
    lines = log_path.read_text().splitlines()
    assert len([line for line in lines if "unknown verb" in line]) == 1
    assert len([line for line in lines if "not an IP address" in line]) == 1
