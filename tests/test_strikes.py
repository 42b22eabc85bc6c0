"""`strike IP KIND` and connect's strikes=N on a real `lookupd serve`: in memory on one host
(kept across a restart), shared by three hosts through a real redis-server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from redisserver import PASSWORD, RedisServer
from support import EXIM, EXIM_BASE, Exim, Lookupd, short_dir

from lookupd.ipaddr import parse_ip
from lookupd.strikes import Strikes, fit_key, strike_key


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


def test_ipv6_clients_are_struck_by_their_64(start_lookupd: StartLookupd) -> None:
    """A guesser hopping through the addresses of its /64 is one client; the next /64 and
    IPv4 neighbours are others. Kept across a restart, and under IPv4-mapped IPv6 too."""
    daemon = start_lookupd('[connect]\nstrikes_threshold = 2\n'
                           '[dnsbl]\nlist = []\nnameservers = ["127.0.0.1:9"]\ndeadline = 0.2\n')
    assert daemon.query("strike 2001:db8:1:2::1 auth\n") == "strikes=1"
    assert daemon.query("strike 2001:db8:1:2:ffff:ffff:ffff:fffe auth\n") == "strikes=2"
    assert daemon.query("strike 2001:db8:1:2:a::9 rcpt\n") == "strikes=3"
    got = fields(daemon.query("connect 2001:db8:1:2::77 25\n"))
    assert (got["action"], got["rule"], got["strikes"]) == ("deny", "strikes", "3")
    assert fields(daemon.query("connect 2001:db8:1:3::1 25\n"))["strikes"] == "0"
    assert daemon.query("strike 192.0.2.1 auth\n") == "strikes=1"
    assert daemon.query("strike ::ffff:192.0.2.2 auth\n") == "strikes=1"
    assert daemon.query("strike 192.0.2.2 auth\n") == "strikes=2"
    assert daemon.stop() == 0
    daemon.start()
    assert fields(daemon.query("connect 2001:db8:1:2:dead::1 25\n"))["strikes"] == "3"


def test_ipv6_prefix_128_counts_each_address(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd("[connect]\nstrikes_ipv6_prefix = 128\n")
    assert daemon.query("strike 2001:db8:1:2::1 auth\n") == "strikes=1"
    assert daemon.query("strike 2001:db8:1:2::2 auth\n") == "strikes=1"
    assert daemon.query("strike 2001:db8:1:2::1 auth\n") == "strikes=2"


def test_strike_keys_and_a_changed_prefix(tmp_path: Path) -> None:
    """What a strike counts under, and what a key read back (snapshot, Redis, another host)
    becomes under this host's prefix: a reload to a shorter prefix folds the addresses into
    their networks; a wider network cannot be split and is left out."""
    ip = parse_ip("2001:db8:1:2:3:4:5:6")
    assert strike_key(ip, 64) == "2001:db8:1:2::/64"
    assert strike_key(ip, 128) == "2001:db8:1:2:3:4:5:6"
    assert strike_key(parse_ip("::ffff:192.0.2.1"), 64) == "192.0.2.1"
    assert fit_key("2001:db8:1:2:3::/80", 64) == "2001:db8:1:2::/64"
    assert fit_key("2001:db8:1:2::5", 48) == "2001:db8:1::/48"
    assert fit_key("2001:db8::/48", 64) is None
    assert fit_key("192.0.2.0/24", 64) is None and fit_key("nonsense", 64) is None
    before = Strikes(3600, tmp_path, ipv6_prefix=128)
    before._add("2001:db8:1:2::1", "x:1", time.time())
    before._add("2001:db8:1:2::2", "x:2", time.time())
    assert before.count(parse_ip("2001:db8:1:2::1")) == 1
    after = Strikes(3600, tmp_path, ipv6_prefix=64)
    after.take_over(before)
    assert after.count(parse_ip("2001:db8:1:2::3")) == 2


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
        # IPv6: one /64 across the hosts, under one key in Redis.
        assert a.query("strike 2001:db8:5:6::1 auth\n") == "strikes=1"
        assert b.query("strike 2001:db8:5:6::2 auth\n") == "strikes=2"
        assert c.query("strike 2001:db8:5:6:ab::3 rcpt\n") == "strikes=3"
        _wait(lambda: fields(a.query("connect 2001:db8:5:6::99 25\n"))["strikes"] == "3")
        assert redis.cli("ZCARD", "lookupd:strikes:2001:db8:5:6::/64") == 3
        assert fields(b.query("connect 2001:db8:5:7::1 25\n"))["strikes"] == "0"
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


# Exim 4.96 raises no auth:fail event for a server's failed AUTH in -bh: the strike goes in
# server_condition's "no" branch instead (a side effect of the expansion, on every version).
EXIM_STRIKES = r"""
domainlist local_domains = example.org
acl_smtp_connect = acl_connect
acl_smtp_rcpt = acl_rcpt
auth_advertise_hosts = *

begin acl
acl_connect:
  deny  set acl_c_l = ${readsocket{LOOKUPD_SOCKET}\
                        {connect $sender_host_address $received_port\n}{3s}{}{}}
        condition = ${if eq{${extract{action}{$acl_c_l}}}{deny}}
        message   = ${extract{reason}{$acl_c_l}}
  accept
acl_rcpt:
  accept authenticated = *
  deny  !verify   = recipient
        set acl_m_s = ${readsocket{LOOKUPD_SOCKET}{strike $sender_host_address rcpt\n}{3s}{}{}}
        message   = no such user here
  accept domains  = +local_domains

begin routers
known_users:
  driver = accept
  domains = +local_domains
  local_parts = alice
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
  server_condition = ${if and{{eq{$auth2}{alice}}{eq{$auth3}{secret}}}{yes}\
    {${if eq{${readsocket{LOOKUPD_SOCKET}{strike $sender_host_address auth\n}{3s}{}{}}}{}\
    {no}{no}}}}
  server_set_id = $auth2
"""


@pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")
def test_exim_strikes_a_failed_auth_and_an_invalid_recipient(start_lookupd: StartLookupd
                                                              ) -> None:
    import base64

    daemon = start_lookupd('[server]\nsocket_group = "Debian-exim"\n'
                           '[connect]\nstrikes_threshold = 1\n')
    workdir = short_dir("lkdx")
    try:
        exim = Exim(workdir, EXIM_BASE.format(workdir=workdir) + EXIM_STRIKES)
        defines = [f"LOOKUPD_SOCKET={daemon.socket}"]
        token = base64.b64encode(b"\0alice\0guess").decode()
        out, _ = exim.bh("192.0.2.55", f"EHLO x\nAUTH PLAIN {token}\nQUIT\n", defines)
        assert "535 Incorrect authentication data" in out
        out, _ = exim.bh("192.0.2.55", "EHLO x\nMAIL FROM:<a@b.example>\n"
                         "RCPT TO:<nobody@example.org>\nQUIT\n", defines)
        assert "550 no such user here" in out
        assert fields(daemon.query("connect 192.0.2.55 25\n"))["strikes"] == "2"
        out, _ = exim.bh("192.0.2.55", "EHLO x\nQUIT\n", defines)
        assert "550 Denied access - too many failed logins or invalid recipients" in out, out
        # A good login is never struck.
        ok = base64.b64encode(b"\0alice\0secret").decode()
        exim.bh("192.0.2.56", f"EHLO x\nAUTH PLAIN {ok}\nQUIT\n", defines)
        assert fields(daemon.query("connect 192.0.2.56 25\n"))["strikes"] == "0"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
