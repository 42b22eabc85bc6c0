"""`strike IP KIND` and connect's strikes=N on a real `lookupd serve`: in memory on one host
(kept across a restart), shared by three hosts through a real redis-server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from redisserver import RedisServer, cluster_hosts
from support import EXIM

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
    # COUNT: a connection's strikes of one kind at once, and several kinds in one call.
    assert daemon.query("strike 192.0.2.3 rcpt 7\n") == "strikes=7"
    assert daemon.query("strike 192.0.2.3 auth 1\n") == "strikes=8"
    assert daemon.query("strike 192.0.2.3 auth 2 rcpt 3 proto \n") == "strikes=14"
    for bad in ("0", "-1", "1.5", "1e2", "9999999999"):
        reply = daemon.query(f"strike 192.0.2.3 auth {bad}\n")
        assert reply == "error strike COUNT is a whole number from 1 up", (bad, reply)
    pairs = "error strike takes KIND [COUNT] pairs: e.g. strike IP auth 3 rcpt 2"
    assert daemon.query("strike 192.0.2.3 3\n") == pairs
    assert daemon.query("strike 192.0.2.3 auth 2 3\n") == pairs
    assert daemon.query("strike 192.0.2.3 a b c d e\n") == \
        "error strike takes 1 to 4 KIND [COUNT] pairs"
    # A dictionary run of thousands of recipients is struck, as 100 at most per call.
    assert daemon.query("strike 192.0.2.4 auth 60 rcpt 5000\n") == "strikes=100"
    assert daemon.query("strike 192.0.2.9 auth 5\n") == "strikes=0"
    assert fields(daemon.query("connect 192.0.2.3 25\n"))["strikes"] == "14"
    # A warm connect reply of an IPv6 client is not reused past a strike on its /64.
    for _ in range(2):
        assert fields(daemon.query("connect 2001:db8:1:2::20 25\n"))["strikes"] == "0"
    assert daemon.query("strike 2001:db8:1:2::10 auth\n") == "strikes=1"
    assert fields(daemon.query("connect 2001:db8:1:2::20 25\n"))["strikes"] == "1"
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
    try:
        with cluster_hosts(redis, "abc") as hosts:
            a, b, c = hosts
            assert a.query("strike 203.0.113.5 auth\n") == "strikes=1"
            assert b.query("strike 203.0.113.5 auth 2\n") == "strikes=3"
            _wait(lambda: fields(c.query("connect 203.0.113.5 25\n"))["strikes"] == "3")
            redis.stop()
            assert a.query("strike 203.0.113.5 rcpt\n") == "strikes=4"  # a alone knows
            assert c.query("strike 203.0.113.5 rcpt\n") == "strikes=4"  # c too, its own
            redis.start()
            # After the merge every host has all five, each counted once.
            for daemon in hosts:
                _wait(lambda d=daemon: fields(  # type: ignore[misc]
                    d.query("connect 203.0.113.5 25\n"))["strikes"] == "5")
            assert redis.cli("ZCARD", "lookupd:strikes:203.0.113.5") == 5
            # IPv6: one /64 across the hosts, under one key in Redis.
            assert a.query("strike 2001:db8:5:6::1 auth\n") == "strikes=1"
            assert b.query("strike 2001:db8:5:6::2 auth\n") == "strikes=2"
            assert c.query("strike 2001:db8:5:6:ab::3 rcpt\n") == "strikes=3"
            _wait(lambda: fields(a.query("connect 2001:db8:5:6::99 25\n"))["strikes"] == "3")
            assert redis.cli("ZCARD", "lookupd:strikes:2001:db8:5:6::/64") == 3
            assert fields(b.query("connect 2001:db8:5:7::1 25\n"))["strikes"] == "0"
    finally:
        redis.stop()


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.01)


@pytest.mark.skipif(not Path(EXIM).exists() or shutil.which("redis-server") is None,
                    reason="needs exim4 and redis-server")
def test_exim_strikes_on_host_a_refuse_the_client_on_host_c(tmp_path: Path) -> None:
    """The shipped single-file snippets on two hosts sharing Redis: a password guesser's
    failed AUTHs and dead recipients on host a (sent by the QUIT ACL), then its next
    connection to host c is refused at connect; a real user is never struck."""
    from test_snippets import auth_plain, bh, build_single

    redis = RedisServer(tmp_path / "redis").start()
    try:
        with cluster_hosts(redis, "ac", '[server]\nsocket_mode = "0666"\n'
                                        '[connect]\nstrikes_threshold = 2\n') as hosts:
            a, c = hosts
            config = build_single(tmp_path / "exim")
            guesser, user = "192.0.2.55", "192.0.2.56"
            clear = [f"LOOKUPD_NOTLS_HOSTS=<; {guesser} ; {user}"]
            bad = auth_plain("alice", "guess")
            on_a = bh(config, guesser, f"EHLO x\nAUTH PLAIN {bad}\nAUTH PLAIN {bad}\n"
                      "MAIL FROM:<a@b.example>\nRCPT TO:<gone@localhost>\n"
                      "RCPT TO:<gone2@localhost>\nQUIT\n", port=587, sock=a.socket, defines=clear)
            assert on_a.codes() == ["220", "250", "535", "535", "250", "550", "550", "221"], \
                on_a.out
            assert a.query(f"connect {guesser} 25").endswith(" strikes=4")
            _wait(lambda: c.query(f"connect {guesser} 25").endswith(" strikes=4"))
            on_c = bh(config, guesser, "EHLO x\nQUIT\n", port=25, sock=c.socket)
            assert on_c.codes() == ["550"], on_c.out
            assert on_c.logged(f"H=[{guesser}] rejected connection in \"connect\" ACL: lookupd "
                               "deny rule=strikes")
            # A real user: one typo, then the right password; never struck, on either host.
            typo = bh(config, user, f"EHLO x\nAUTH PLAIN {bad}\nAUTH PLAIN {auth_plain('alice')}\n"
                      "QUIT\n", port=587, sock=a.socket, defines=clear)
            assert typo.codes() == ["220", "250", "535", "235", "221"], typo.out
            assert c.query(f"connect {user} 25").endswith(" strikes=0")
    finally:
        redis.stop()
