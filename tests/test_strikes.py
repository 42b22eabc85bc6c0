"""`strike IP KIND` and connect's strikes=N on a real `lookupd serve`: in memory on one host
(kept across a restart), shared by three hosts through a real redis-server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from redisserver import PASSWORD, RedisServer
from support import Lookupd, short_dir


def fields(reply: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in reply.split(" ") if "=" in part)


def test_strikes_count_and_deny_at_connect(start_lookupd: StartLookupd, tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text("192.0.2.9\n")
    daemon = start_lookupd(f'[connect]\nstrikes_threshold = 2\nallowlist_files = ["{allow}"]\n'
                           '[dnsbl]\nlist = []\nnameservers = ["127.0.0.1:9"]\ndeadline = 0.2\n')
    assert daemon.query("strike 192.0.2.1 auth\n") == "strikes=1"
    assert daemon.query("strike 192.0.2.1 rcpt\n") == "strikes=2"
    assert fields(daemon.query("connect 192.0.2.1 25\n"))["action"] == "accept"
    assert daemon.query("strike 192.0.2.1 proto\n") == "strikes=3"
    got = fields(daemon.query("connect 192.0.2.1 25\n"))
    assert (got["action"], got["rule"], got["strikes"]) == ("deny", "strikes", "3")
    assert fields(daemon.query("connect 192.0.2.2 25\n"))["strikes"] == "0"
    # Allowlisted clients are never struck.
    assert daemon.query("strike 192.0.2.9 auth\n") == "strikes=0"
    assert daemon.query("strike nonsense auth\n").startswith("error")
    assert daemon.query("strike 192.0.2.1 AUTH;x\n").startswith("error")
    assert daemon.stop() == 0
    daemon.start()  # the strikes survive a restart
    assert fields(daemon.query("connect 192.0.2.1 25\n"))["strikes"] == "3"


def test_strikes_log_only(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd('[connect]\nstrikes_threshold = 1\nlog_only = ["strikes"]\n')
    daemon.query("strike 198.51.100.7 auth\n")
    daemon.query("strike 198.51.100.7 auth\n")
    got = fields(daemon.query("connect 198.51.100.7 25\n"))
    assert (got["action"], got["rule"], got["would"]) == ("accept", "strikes", "deny")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_strikes_shared_across_hosts(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    hosts: list[Lookupd] = []
    try:
        for name in "abc":
            hosts.append(Lookupd(short_dir(), (
                f'[cluster]\nredis = "{redis.url}"\npassword_file = "{pw}"\n'
                f'host_name = "{name}"\ntimeout = "300ms"\n')).start())
        for daemon in hosts:
            _wait(lambda d=daemon: "sharing state through Redis" in d.log())  # type: ignore[misc]
        a, b, c = hosts
        assert a.query("strike 203.0.113.5 auth\n") == "strikes=1"
        assert b.query("strike 203.0.113.5 auth\n") == "strikes=2"
        _wait(lambda: fields(c.query("connect 203.0.113.5 25\n"))["strikes"] == "2")
        redis.stop()
        assert a.query("strike 203.0.113.5 rcpt\n") == "strikes=3"  # a alone knows
        assert c.query("strike 203.0.113.5 rcpt\n") == "strikes=3"  # c too, its own
        redis.start()
        # After the merge every host has all four, each counted once.
        for daemon in hosts:
            _wait(lambda d=daemon: fields(  # type: ignore[misc]
                d.query("connect 203.0.113.5 25\n"))["strikes"] == "4")
        assert redis.cli("ZCARD", "lookupd:strikes:203.0.113.5") == 4
    finally:
        for daemon in hosts:
            daemon.stop()
            shutil.rmtree(daemon.workdir, ignore_errors=True)
        redis.stop()


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.01)
