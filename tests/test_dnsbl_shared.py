"""The DNS answers shared through Redis ([cluster]): three real `lookupd serve` hosts, one
rbldnsd (logging every question), one redis-server. A question one host asked is not asked
by the others within its TTL; without Redis each host asks for itself."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsservers import Rbldnsd
from redisserver import PASSWORD, RedisServer
from support import Lookupd, short_dir, stop_all

from lookupd.cluster import Cluster
from lookupd.config import ClusterConfig, DnsblConfig, DnsblListConfig, HostPort
from lookupd.dnsbl import DnsblSource
from lookupd.outcome import Status

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or
                                shutil.which("rbldnsd") is None,
                                reason="needs redis-server and rbldnsd")

CLIENTS = [f"192.0.2.{i}" for i in range(101, 141)] + ["192.0.2.4", "192.0.2.20"]


@pytest.fixture
def rbldnsd(tmp_path: Path) -> Iterator[Rbldnsd]:
    server = Rbldnsd(tmp_path / "rbldnsd").start()
    yield server
    server.stop()


def run_hosts(rbl: Rbldnsd, cluster: str) -> int:
    """Every client asked on three hosts in turn: how many questions reached the list."""
    hosts: list[Lookupd] = []
    config = (f'[dnsbl]\nnameservers = ["127.0.0.1:{rbl.port}"]\ndeadline = 1.0\n'
              '[[dnsbl.list]]\nzone = "bl.test"\ncodes = ["127.0.0.[2..11]"]\n'
              f"query_special = true\n{cluster}")
    before = len(_client_questions(rbl))
    try:
        for name in "abc":
            hosts.append(Lookupd(short_dir(), config.replace("HOST", name)).start())
        if cluster:
            for daemon in hosts:
                deadline = time.monotonic() + 5
                while "sharing state through Redis" not in daemon.log():
                    assert time.monotonic() < deadline, daemon.log()
                    time.sleep(0.02)
        for daemon in hosts:
            for ip in CLIENTS:
                reply = daemon.query(f"dnsbl {ip}\n")
                assert reply.startswith("verdict=listed" if ip in ("192.0.2.4", "192.0.2.20")
                                        else "verdict=clean"), reply
        time.sleep(0.3)  # rbldnsd's log is unbuffered, but give it a moment
    finally:
        stop_all(hosts, remove=True)
    return len(_client_questions(rbl)) - before


def _client_questions(rbl: Rbldnsd) -> list[str]:
    names = {".".join(reversed(ip.split("."))) + ".bl.test" for ip in CLIENTS}
    return [q for q in rbl.queries(qtype="A") if q.split()[2].lower().rstrip(".") in names]


def test_three_hosts_ask_each_question_once(rbldnsd: Rbldnsd, tmp_path: Path) -> None:
    alone = run_hosts(rbldnsd, "")
    assert alone == 3 * len(CLIENTS)
    redis = RedisServer(tmp_path / "redis").start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    # A hostile value is treated as missing: the first host asks DNS itself and answers
    # right (run_hosts checks every verdict), and its answer replaces the bad one.
    redis.cli("SET", "lookupd:dns:A:101.2.0.192.bl.test", '{"s":"found","r":["x"],"e":1e99}')
    try:
        shared = run_hosts(rbldnsd, f'[cluster]\nredis = "{redis.url}"\npassword_file = "{pw}"\n'
                                    'host_name = "HOST"\ntimeout = "2s"\n')  # loaded CI
        keys = redis.cli("KEYS", "lookupd:dns:A:*")
    finally:
        redis.stop()
    print(f"\nDNSBL questions for {len(CLIENTS)} clients on 3 hosts: {alone} alone, "
          f"{shared} with the shared cache")
    assert shared == len(CLIENTS)
    assert len(keys) == len(CLIENTS)


async def test_an_answer_shared_by_another_host_replaces_what_was_decided(
        rbldnsd: Rbldnsd, tmp_path: Path) -> None:
    """What this host decided from its cached answers holds only while they are cached:
    once its answer expired, another host's newer answer from Redis (here: the client got
    listed meanwhile) is what the next lookup takes, no DNS question asked, and what the
    answers from the cache alone say from then on."""
    redis = RedisServer(tmp_path / "redis").start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    cluster = Cluster(ClusterConfig(redis=redis.url, password_file=pw, host_name="a"))
    now = [time.time()]
    config = DnsblConfig(lists=(DnsblListConfig(zone="bl.test", query_special=True),),
                         nameservers=(HostPort("127.0.0.1", rbldnsd.port),), deadline=1.0)
    source = DnsblSource(config, tmp_path / "state", clock=lambda: now[0], cluster=cluster)
    try:
        await source.open()
        await source.probe()
        await cluster.open()
        for _ in range(100):
            if cluster.up:
                break
            await asyncio.sleep(0.05)
        assert cluster.up
        clean = await source.check_ip("192.0.2.99")
        assert clean.status is Status.NOT_FOUND and source.cached_ip("192.0.2.99") == clean
        # This host shares its answer in the background: wait until it is in Redis, so
        # that it cannot land after (and over) the other host's newer one below.
        key = "lookupd:dns:A:99.2.0.192.bl.test"
        for _ in range(200):
            if redis.cli("GET", key):
                break
            await asyncio.sleep(0.01)
        assert redis.cli("GET", key), "this host's answer never reached Redis"
        # Another host learnt meanwhile that the client is listed.
        later = now[0] + 86400 + 1
        redis.cli("SET", key,
                  json.dumps({"s": "found", "r": ["127.0.0.2"], "e": later + 600}),
                  "PX", "600000")
        assert source.cached_ip("192.0.2.99") == clean  # this host's answer is still valid
        asked = len(rbldnsd.queries("99.2.0.192.bl.test", "A"))
        now[0] = later  # this host's answer expired
        assert source.peek_ip("192.0.2.99") is None
        listed = await source.check_ip("192.0.2.99")
        assert listed.status is Status.FOUND
        assert len(rbldnsd.queries("99.2.0.192.bl.test", "A")) == asked
        assert source.cached_ip("192.0.2.99") == listed
    finally:
        await source.close()
        await cluster.close()
        redis.stop()
