"""DNSBL health against real servers (issue 11): a dead nameserver among several costs a
share of the deadline, not all of it; answers with TTL 0 are kept dnsbl.min_ttl.

Every zone and address here is this module's own: rbldnsd serves one.test and two.test,
which list 198.51.100.20 (TEST-NET-2); knot serves a reverse zone of 203.0.113.0/24
(TEST-NET-3) whose records have TTL 0, behind a cache-less dnsmasq that logs every question
it forwards; a bound UDP socket that never reads (SilentServer) is a dead nameserver.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from dnsservers import KNOTD, RBLDNSD, Dnsmasq, Knot, Rbldnsd, SilentServer

from lookupd.config import DnsblConfig, DnsblListConfig, HostPort
from lookupd.dnsbl import DnsblSource, render_dnsbl, render_ptr, render_stats
from lookupd.dnsbl.answers import negative_ttl, positive_ttl

T = TypeVar("T")

# --- rbldnsd: this module's lists -------------------------------------------------------------

SOA = "$SOA 60 ns.{0}. hostmaster.{0}. 1 600 60 3600 45\n$TTL 300\n"
ZONES = {
    "one.zone": SOA.format("one.test") + ":127.0.0.2:Listed in one.test\n"
                "127.0.0.2\n198.51.100.20\n",
    "two.zone": SOA.format("two.test") + ":127.0.0.3:Listed in two.test\n"
                "127.0.0.2\n198.51.100.20\n198.51.100.21\n",
}
RBL_ZONES = (("one.test", "ip4set", "one.zone"), ("two.test", "ip4set", "two.zone"))
ONE = DnsblListConfig(zone="one.test", families=("ipv4",))
TWO = DnsblListConfig(zone="two.test", families=("ipv4",))
LISTED_BY_BOTH = ('verdict=listed score=2 lists=one.test:127.0.0.2,two.test:127.0.0.3 '
                  'unknown="" text="one.test: Listed in one.test; two.test: Listed in two.test"')


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("healthzones")
    for name, text in ZONES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory, zones: Path) -> Iterator[Rbldnsd]:
    if not Path(RBLDNSD).exists():
        pytest.skip("rbldnsd is not installed")
    server = Rbldnsd(tmp_path_factory.mktemp("healthrbl"), zones=RBL_ZONES,
                     source_dir=zones).start()
    yield server
    server.stop()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.stop()


def states(source: DnsblSource) -> list[str]:
    """Each list's `state:` in the stats reply (reverse-dns left out)."""
    pairs = [p for p in render_stats(source.stats()).split() if ",state:" in p]
    return [p.split(",state:")[1].split(",")[0] for p in pairs
            if not p.startswith("reverse-dns=")]


async def timed(lookup: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await lookup
    return result, time.monotonic() - started

# --- knot: records with TTL 0 -------------------------------------------------------------

ZERO_ZONES = {
    "113.0.203.in-addr.arpa": """
$TTL 0
@ SOA ns.zero.test. hostmaster.zero.test. 1 600 60 3600 0
@ NS ns.zero.test.
10 PTR mail.zero.test.
""",
    "zero.test": """
$TTL 0
@ SOA ns.zero.test. hostmaster.zero.test. 1 600 60 3600 0
@ NS ns.zero.test.
ns A 127.0.0.1
mail A 203.0.113.10
""",
}


@pytest.fixture(scope="module")
def zero_ttl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """dnsmasq (no cache, logs every query) in front of knot serving ZERO_ZONES."""
    if not Path(KNOTD).exists():
        pytest.skip("knot is not installed")
    knot = Knot(tmp_path_factory.mktemp("zeroknot"), zones=dict(ZERO_ZONES), broken=())
    knot.start()
    try:
        forwarder = Dnsmasq(tmp_path_factory.mktemp("zerofwd"),
                            {zone: knot.port for zone in ZERO_ZONES})
        forwarder.start()
        try:
            yield forwarder
        finally:
            forwarder.stop()
    finally:
        knot.stop()


@pytest.fixture
async def sources(tmp_path: Path) -> AsyncIterator[list[DnsblSource]]:
    """Sources a test opened; closed afterwards."""
    opened: list[DnsblSource] = []
    yield opened
    for source in opened:
        await source.close()


async def open_on(opened: list[DnsblSource], tmp_path: Path, port: int | list[int],
                  *lists: DnsblListConfig, clock: Callable[[], float] = time.time,
                  **settings: object) -> DnsblSource:
    ports = port if isinstance(port, list) else [port]
    config = DnsblConfig(lists=lists, nameservers=tuple(HostPort("127.0.0.1", p) for p in ports),
                         **settings)  # type: ignore[arg-type]
    source = DnsblSource(config, tmp_path / f"state{len(opened)}", clock=clock)
    await source.open()
    opened.append(source)
    return source


# --- item 1: a dead first nameserver --------------------------------------------------------


async def test_a_dead_first_nameserver_costs_a_share_of_the_deadline(
        rbl: Rbldnsd, silent: SilentServer, sources: list[DnsblSource],
        tmp_path: Path) -> None:
    """nameservers = [dead, rbldnsd]: the probes and the first query reach rbldnsd within the
    deadline (the dead one had its half, 0.5 s), no list is quarantined and a listed client is
    listed; once the dead one has left a few questions unanswered it is asked last, and a new
    client costs one round trip to rbldnsd."""
    source = await open_on(sources, tmp_path, [silent.port, rbl.port], ONE, TWO, deadline=1.0)
    (result, elapsed) = await timed(source.check_ip("198.51.100.20"))
    assert render_dnsbl(result) == LISTED_BY_BOTH
    assert 0.4 < elapsed < 1.0  # the probe (and then the query) waited for the first share
    assert states(source) == ["ok", "ok"]
    for i in range(30, 36):  # new clients, not listed
        (clean, elapsed) = await timed(source.check_ip(f"198.51.100.{i}"))
        assert render_dnsbl(clean) == 'verdict=clean score=0 lists="" unknown="" text=""'
    assert elapsed < 0.2
    (listed, elapsed) = await timed(source.check_ip("198.51.100.21"))
    assert listed.status.name == "FOUND" and elapsed < 0.2
    await source.probe()
    assert states(source) == ["ok", "ok"]


# --- item 7: a floor under TTLs ---------------------------------------------------------------


async def test_a_ttl_0_ptr_is_kept_min_ttl(zero_ttl: Dnsmasq, sources: list[DnsblSource],
                                           tmp_path: Path) -> None:
    """The PTR and A of 203.0.113.10 and the NXDOMAIN of .11 all have TTL 0: with the default
    min_ttl (30 s) a second `connect` of the client sends no packet and is answered inline;
    after 30 s they are asked again. With min_ttl 0, every lookup asks again."""
    now = [time.time()]
    source = await open_on(sources, tmp_path, zero_ttl.port, clock=lambda: now[0])
    assert source._config.min_ttl == 30.0  # the default

    def asked() -> tuple[int, int, int]:
        return (len(zero_ttl.queries("PTR", "10.113.0.203.in-addr.arpa")),
                len(zero_ttl.queries("A", "mail.zero.test")),
                len(zero_ttl.queries("PTR", "11.113.0.203.in-addr.arpa")))

    before = asked()
    assert render_ptr(await source.ptr("203.0.113.10")) == "name=mail.zero.test fcrdns=yes"
    assert render_ptr(await source.ptr("203.0.113.11")) == 'name="" fcrdns=no'
    first = asked()
    assert [a - b for a, b in zip(first, before, strict=True)] == [1, 1, 1]
    now[0] += 29
    cached = source.cached_ptr("203.0.113.10")
    assert cached is not None and render_ptr(cached) == "name=mail.zero.test fcrdns=yes"
    assert source.cached_ptr("203.0.113.11") is not None
    await source.ptr("203.0.113.10")
    assert asked() == first
    now[0] += 2  # 31 s: the floor has passed
    assert source.cached_ptr("203.0.113.10") is None
    await source.ptr("203.0.113.10")
    await source.ptr("203.0.113.11")
    assert [a - b for a, b in zip(asked(), first, strict=True)] == [1, 1, 1]

    off = await open_on(sources, tmp_path, zero_ttl.port, min_ttl=0.0)
    again = asked()
    for _ in range(2):
        await off.ptr("203.0.113.10")
        assert off.cached_ptr("203.0.113.10") is None
    assert [a - b for a, b in zip(asked(), again, strict=True)] == [2, 2, 0]


def test_the_floor_stays_under_the_caps() -> None:
    assert positive_ttl(0, 30) == 30 and positive_ttl(120, 30) == 120
    assert positive_ttl(10**9, 30) == 86400
    assert negative_ttl(0, 0, 900, 30) == 30
    assert negative_ttl(3600, 45, 900, 30) == 45
    assert negative_ttl(0, 0, 10, 30) == 10  # negative_ttl_max is the admin's word
    assert negative_ttl(None, None, 900, 30) == 0  # RFC 2308: no SOA, not cached at all
