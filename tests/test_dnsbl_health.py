"""DNSBL health against real servers (issue 11): a dead nameserver among several costs a
share of the deadline, not all of it; a resolver that answers nothing (or reaches no list)
quarantines no list; a list whose questions keep failing is quarantined before its next
probe; a list out of service leaves the decision to the others; log lines say what is true;
answers with TTL 0 are kept dnsbl.min_ttl.

Every zone and address here is this module's own: rbldnsd serves one.test and two.test,
which list 198.51.100.20 (TEST-NET-2), all.test, which lists everything, flaky.test, which
tests take down, and zen.spamhaus.org (and its DQS zone) refusing everything; knot serves a
reverse zone of 203.0.113.0/24 (TEST-NET-3) whose records have TTL 0; dnsmasq (no cache,
every question logged) forwards as a local resolver does; a bound UDP socket that never
reads (SilentServer) is a dead nameserver.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import StartLookupd
from dnsservers import DQS_KEY, KNOTD, RBLDNSD, Dnsmasq, Knot, Rbldnsd, SilentServer
from support import EXIM, EXIM_BASE, Exim
from test_dnsbl_exim import CONNECT_ACL

from lookupd.config import DnsblConfig, DnsblListConfig, HostPort
from lookupd.dnsbl import DnsblSource, render_dnsbl, render_ptr, render_stats
from lookupd.dnsbl.answers import negative_ttl, positive_ttl
from lookupd.dnsbl.health import NOT_ANSWERING, Health, own_failure, resolver_fault

T = TypeVar("T")

# --- rbldnsd: this module's lists -------------------------------------------------------------

SOA = "$SOA 60 ns.{0}. hostmaster.{0}. 1 600 60 3600 45\n$TTL 300\n"
ZONES = {
    "one.zone": SOA.format("one.test") + ":127.0.0.2:Listed in one.test\n"
                "127.0.0.2\n198.51.100.20\n",
    "two.zone": SOA.format("two.test") + ":127.0.0.3:Listed in two.test\n"
                "127.0.0.2\n198.51.100.20\n198.51.100.21\n",
    # Gone bad: it lists every address, its 127.0.0.1 test point included.
    "all.zone": SOA.format("all.test") + "0.0.0.0/0 :127.0.0.2:Everything is listed\n",
    # Spamhaus refusing every query (127.255.255.254), its test points included.
    "refused.zone": SOA.format("zen.spamhaus.org") + "0.0.0.0/0 :127.255.255.254:Refused\n",
}
RBL_ZONES = (("one.test", "ip4set", "one.zone"), ("two.test", "ip4set", "two.zone"),
             ("all.test", "ip4trie", "all.zone"),
             # What lookupd asks for zen.spamhaus.org without, and with the DQS key.
             ("zen.spamhaus.org", "ip4trie", "refused.zone"),
             (f"{DQS_KEY}.zen.dq.spamhaus.net", "ip4trie", "refused.zone"))
ONE = DnsblListConfig(zone="one.test", families=("ipv4",), query_special=True)
TWO = DnsblListConfig(zone="two.test", families=("ipv4",), query_special=True)
ALL = DnsblListConfig(zone="all.test", families=("ipv4",), query_special=True)
CLEAN = 'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
LISTED_BY_BOTH = ('verdict=listed score=2 lists=one.test:127.0.0.2,two.test:127.0.0.3 '
                  'unknown="" text="one.test: Listed in one.test; two.test: Listed in two.test" '
                  'skipped=""')


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


@pytest.fixture
def forwarders(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], Dnsmasq]]:
    """Start dnsmasq forwarders (no cache) with the given routes; stopped afterwards."""
    started: list[Dnsmasq] = []

    def start(routes: dict[str, int]) -> Dnsmasq:
        forwarder = Dnsmasq(tmp_path / f"dnsmasq{len(started)}", routes)
        started.append(forwarder)
        return forwarder.start()

    yield start
    for forwarder in started:
        forwarder.stop()


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def resolver_state(source: DnsblSource) -> tuple[str, str]:
    """dnsbl_resolver= and dnsbl_silent= of the stats reply."""
    pairs = dict(p.split("=", 1) for p in render_stats(source.stats()).split()
                 if p.startswith(("dnsbl_resolver=", "dnsbl_silent=")))
    return pairs["dnsbl_resolver"], pairs["dnsbl_silent"]


async def first_round(source: DnsblSource) -> None:
    """Until the probe round that open() started has come back (or blamed the resolver)."""
    for _ in range(200):
        if source.stats().resolver or "unprobed" not in standing(source):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the first probe round did not come back")


def standing(source: DnsblSource) -> list[str]:
    """Each list's ListStats.quarantine (reverse-dns left out)."""
    return [s.quarantine for s in source.stats().lists[:-1]]


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
                  log_period: float = 600.0, **settings: object) -> DnsblSource:
    ports = port if isinstance(port, list) else [port]
    config = DnsblConfig(lists=lists, nameservers=tuple(HostPort("127.0.0.1", p) for p in ports),
                         **settings)  # type: ignore[arg-type]
    source = DnsblSource(config, tmp_path / f"state{len(opened)}", clock=clock,
                         log_period=log_period)
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
        assert render_dnsbl(clean) == 'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
    assert elapsed < 0.45  # one round trip to rbldnsd, not the dead one's share (0.5 s)
    (listed, elapsed) = await timed(source.check_ip("198.51.100.21"))
    assert listed.status.name == "FOUND" and elapsed < 0.45
    await source.probe()
    assert states(source) == ["ok", "ok"]


async def test_no_nameserver_answers_the_resolver_is_down_not_the_lists(
        rbl: Rbldnsd, silent: SilentServer, sources: list[DnsblSource], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Both nameservers drop every packet: one log line says so, no list is quarantined for
    it, every list is unknown at once (no client waits for a nameserver) and so is reverse
    DNS. When a nameserver answers again (a real rbldnsd on the dead one's address), the next
    probe round probes the lists and they answer."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    other = SilentServer()
    try:
        source = await open_on(sources, tmp_path, [silent.port, other.port], ONE, TWO,
                               deadline=0.5)
        await first_round(source)
        labels = f"127.0.0.1:{silent.port},127.0.0.1:{other.port}"
        assert resolver_state(source) == ("no-nameserver", labels)
        assert standing(source) == ["unprobed", "unprobed"]
        (result, elapsed) = await timed(source.check_ip("198.51.100.20"))
        assert render_dnsbl(result) == ('verdict=unknown score=0 lists="" '
                                        'unknown=one.test:resolver-down,two.test:resolver-down '
                                        'text="" skipped=""')
        assert elapsed < 0.1
        (ptr, elapsed) = await timed(source.ptr("198.51.100.20"))
        assert render_ptr(ptr) == 'name="" fcrdns=unknown' and elapsed < 0.1
        await source.probe()  # still down: nothing more is said
        assert standing(source) == ["unprobed", "unprobed"]
        said = warnings(caplog, "DNSBL")
        assert len(said) == 1 and said[0].startswith(
            f"DNSBL: no nameserver of the resolver 127.0.0.1:{silent.port}, "
            f"127.0.0.1:{other.port} answers at all: every list is unknown")
        assert "none is quarantined for it" in said[0]
        assert source.stats().lists[0].timeouts == source.stats().lists[0].errors == 0

        other.stop()
        back = Rbldnsd(tmp_path / "back", zones=RBL_ZONES, source_dir=rbl.source_dir,
                       port=other.port).start()
        try:
            await source.probe()
            assert resolver_state(source) == ("ok", f"127.0.0.1:{silent.port}")
            assert states(source) == ["ok", "ok"]
            assert render_dnsbl(await source.check_ip("198.51.100.20")) == LISTED_BY_BOTH
            assert warnings(caplog, "answers again") == [
                f"DNSBL: the resolver 127.0.0.1:{silent.port}, 127.0.0.1:{other.port} answers "
                "again: the lists are asked again"]
            assert warnings(caplog, "does not answer") == [
                f"DNSBL nameserver 127.0.0.1:{silent.port} does not answer: the other "
                "nameservers are asked first until it does"]
            assert warnings(caplog, "quarantined:") == []
        finally:
            back.stop()
    finally:
        other.stop()


@pytest.mark.parametrize("reachable", [(), ("one.test",)])
async def test_a_resolver_that_reaches_no_list_quarantines_none(
        rbl: Rbldnsd, silent: SilentServer, sources: list[DnsblSource], tmp_path: Path,
        forwarders: Callable[[dict[str, int]], Dnsmasq], caplog: pytest.LogCaptureFixture,
        reachable: tuple[str, ...]) -> None:
    """dnsmasq answers (REFUSED for the root: it is there) but forwards the lists' zones to a
    server that never answers (its upstream is cut off): with no list answering, the resolver
    is to blame and none is quarantined. With one.test reachable, two.test alone fails: that
    is two.test's own doing, and it is quarantined."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    forwarder = forwarders({zone: rbl.port if zone in reachable else silent.port
                            for zone in ("one.test", "two.test")})
    source = await open_on(sources, tmp_path, forwarder.port, ONE, TWO, deadline=0.5)
    await first_round(source)
    (result, elapsed) = await timed(source.check_ip("198.51.100.21"))
    if not reachable:
        assert resolver_state(source) == ("no-list-answers", '""')
        assert standing(source) == ["unprobed", "unprobed"]
        assert render_dnsbl(result) == ('verdict=unknown score=0 lists="" '
                                        'unknown=one.test:resolver-down,'
                                        'two.test:resolver-down text="" skipped=""')
        assert elapsed < 0.1
        said = warnings(caplog, "DNSBL")
        assert len(said) == 1 and "none of the 2 lists answered its test points" in said[0]
    else:
        assert resolver_state(source) == ("ok", '""')
        assert states(source) == ["ok", "quarantined-not-answering"]
        # Quarantined lists are probed every 30 s (probe_interval is 300 s, the default).
        assert warnings(caplog, "quarantined") == [
            "DNSBL two.test quarantined: no test-point query got an answer (timeout); it is "
            "out of service, left out of every verdict, until its test points are right "
            "again (probed every 30s)"]


# --- item 4: an outage seen by real queries -----------------------------------------------------

FLAKY_ZONE = (("flaky.test", "ip4set", "flaky.zone"),)
FLAKY = DnsblListConfig(zone="flaky.test", families=("ipv4",), query_special=True)


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[Rbldnsd]:
    """rbldnsd serving flaky.test (127.0.0.2, 198.51.100.20 and .22), which tests take down."""
    zones = tmp_path / "flakyzones"
    zones.mkdir()
    (zones / "flaky.zone").write_text(SOA.format("flaky.test") + ":127.0.0.4:Listed in flaky\n"
                                      "127.0.0.2\n198.51.100.20\n198.51.100.22\n")
    server = Rbldnsd(tmp_path / "flaky", zones=FLAKY_ZONE, source_dir=zones).start()
    yield server
    server.stop()


def silence(port: int) -> socket.socket:
    """A socket bound on `port` that never reads: whatever served there is dead now, its
    packets dropped (not refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(100):
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError:  # the server is still going away
            time.sleep(0.02)
    sock.close()
    raise RuntimeError(f"port {port} stays busy")


async def until(check: Callable[[], bool], seconds: float) -> float:
    """Seconds it took `check` to become true (AssertionError after `seconds`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("lists", [(ONE, FLAKY), (FLAKY,)], ids=["beside-one.test", "alone"])
async def test_a_list_that_stops_answering_is_quarantined_by_real_queries(
        rbl: Rbldnsd, flaky: Rbldnsd, sources: list[DnsblSource], tmp_path: Path,
        forwarders: Callable[[dict[str, int]], Dnsmasq], caplog: pytest.LogCaptureFixture,
        lists: tuple[DnsblListConfig, ...]) -> None:
    """flaky.test's server dies between two probe rounds (every 5 min): after 3 clients in a
    row waited the deadline for it, it is quarantined at once; the next client waits for
    nothing. Beside one.test, which answers meanwhile, that is plainly flaky.test's doing;
    alone, a probe round run at once tells (the resolver answers its liveness question).
    When flaky.test is back, a probe round puts it back in service (shown beside one.test)."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    forwarder = forwarders({"one.test": rbl.port, "flaky.test": flaky.port})
    source = await open_on(sources, tmp_path, forwarder.port, *lists, deadline=0.5,
                           probe_interval=300.0)
    await first_round(source)
    assert states(source) == ["ok"] * len(lists)
    assert (await source.check_ip("198.51.100.20")).status.name == "FOUND"
    flaky.stop()
    dead = silence(flaky.port)
    try:
        waits = []
        for i in (40, 41, 42):
            (result, elapsed) = await timed(source.check_ip(f"198.51.100.{i}"))
            assert "flaky.test:timeout" in render_dnsbl(result)
            waits.append(elapsed)
        assert min(waits) > 0.45  # each waited the whole deadline
        took = await until(lambda: states(source)[-1] == "quarantined-not-answering", 1.0)
        if len(lists) == 2:
            assert took < 0.45  # at the third timeout: no probe round (0.5 s) was needed
        (result, elapsed) = await timed(source.check_ip("198.51.100.43"))
        assert elapsed < 0.3  # out of service: left out, not waited for (its deadline, 0.5 s)
        assert render_dnsbl(result) == CLEAN
        assert [a.name for a in result.answers] == [c.zone for c in lists[:-1]]
        said = warnings(caplog, "quarantined")
        assert len(said) == 1
        if len(lists) == 2:
            assert said[0].startswith(
                "DNSBL flaky.test quarantined: 3 questions in a row got no answer (timeout) "
                f"while the resolver 127.0.0.1:{forwarder.port} answers others; ")
        else:
            assert said[0].startswith(
                "DNSBL flaky.test quarantined: no test-point query got an answer (timeout); "
                "with no other list to compare, lookupd cannot tell that from a resolver that "
                "reaches no list at all: try dig @127.0.0.1 -p "
                f"{forwarder.port} 2.0.0.127.flaky.test A, and a name you know, through it; ")
        assert resolver_state(source) == ("ok", '""')
        assert states(source)[:-1] == ["ok"] * (len(lists) - 1)
    finally:
        dead.close()
    if len(lists) == 1:
        # The probe round asked the test points during the outage, and dnsmasq holds such
        # questions for 10 s, answering nothing to new ones meanwhile: no quick comeback.
        return
    flaky.start()  # back, on its own address
    await source.probe()
    assert states(source) == ["ok"] * len(lists)
    listed = await source.check_ip("198.51.100.22")
    assert [a.name for a in listed.listed] == ["flaky.test"]
    assert len(warnings(caplog, "back in service")) == 1


async def test_a_dead_resolver_quarantines_no_list_by_real_queries(
        rbl: Rbldnsd, flaky: Rbldnsd, sources: list[DnsblSource], tmp_path: Path,
        forwarders: Callable[[dict[str, int]], Dnsmasq],
        caplog: pytest.LogCaptureFixture) -> None:
    """The resolver itself dies: both lists time out for 3 clients in a row, and neither
    has anything to show it is its own doing; the probe round run at once finds no
    nameserver answering, and the lists stay in service, unknown without a wait."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    forwarder = forwarders({"one.test": rbl.port, "flaky.test": flaky.port})
    source = await open_on(sources, tmp_path, forwarder.port, ONE, FLAKY, deadline=0.5,
                           probe_interval=300.0)
    await first_round(source)
    assert states(source) == ["ok", "ok"]
    forwarder.stop()
    dead = silence(forwarder.port)
    try:
        for i in (50, 51, 52):
            result = render_dnsbl(await source.check_ip(f"198.51.100.{i}"))
            assert "one.test:timeout" in result and "flaky.test:timeout" in result
        await until(lambda: resolver_state(source)[0] == "no-nameserver", 1.0)
        (result, elapsed) = await timed(source.check_ip("198.51.100.53"))
        assert render_dnsbl(result) == ('verdict=unknown score=0 lists="" unknown=one.test:'
                                        'resolver-down,flaky.test:resolver-down text="" skipped=""')
        assert elapsed < 0.1
        assert states(source) == ["ok", "ok"]
        assert warnings(caplog, "quarantined:") == []
    finally:
        dead.close()


# --- item 5: a list out of service leaves the decision ----------------------------------------


async def test_a_list_out_of_service_leaves_the_decision_and_is_reported(
        rbl: Rbldnsd, sources: list[DnsblSource], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """all.test lists everything, for good: it is out of service, and one.test alone
    decides: clean stays clean (not unknown), listed stays listed, and all.test is never
    asked about a client. stats says so, and one line a period (0.5 s here, 10 min by
    default) names it, besides the one warning when it went out."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    source = await open_on(sources, tmp_path, rbl.port, ONE, ALL, deadline=0.5,
                           probe_interval=0.2, log_period=0.5)
    before = len(rbl.queries())
    clean = await source.check_ip("198.51.100.99")  # asked at once: waits for the probes
    assert render_dnsbl(clean) == CLEAN
    assert [a.name for a in clean.answers] == ["one.test"]
    listed = await source.check_ip("198.51.100.20")
    assert render_dnsbl(listed) == ('verdict=listed score=1 lists=one.test:127.0.0.2 '
                                    'unknown="" text="one.test: Listed in one.test" skipped=""')
    cached = source.cached_ip("198.51.100.99")
    assert cached is not None and render_dnsbl(cached) == CLEAN
    assert states(source) == ["ok", "quarantined-lists-everything"]
    line = render_stats(source.stats())
    assert "all.test=queries:0,hits:0,errors:0,timeouts:0," in line  # never asked
    assert not [q for q in rbl.queries()[before:] if ".100.51.198.all.test" in q]
    await asyncio.sleep(1.3)  # probe rounds every 0.2 s; the reminder every 0.5 s
    assert states(source) == ["ok", "quarantined-lists-everything"]
    went = warnings(caplog, "quarantined:")
    assert len(went) == 1 and went[0].startswith(
        "DNSBL all.test quarantined: it lists the RFC 5782 test point that must never be "
        "listed (127.0.0.1), so it would list every client; it is out of service, left out of "
        "every verdict, until its test points are right again")
    reminders = warnings(caplog, "DNSBL lists out of service")
    assert 1 <= len(reminders) <= 3
    assert reminders[0].startswith("DNSBL lists out of service, left out of every verdict: "
                                   "all.test (lists-everything for ")
    assert reminders[0].endswith("s); probed again every 0.2s")


def test_the_readme_acl_logs_no_line_for_a_list_out_of_service(
        rbl: Rbldnsd, start_lookupd: StartLookupd, tmp_path: Path) -> None:
    """The README's ACL (as in test_dnsbl_exim) through a real lookupd and a real Exim: with
    a list that lists everything among the lists, a clean client is accepted without the
    "verdict unknown" line, a listed one is refused naming the list that listed it."""
    if not Path(EXIM).exists():
        pytest.skip("exim4 is not installed")
    daemon = start_lookupd(f"""
[server]
socket_group = "Debian-exim"   # exim -bh runs as Debian-exim, as the real daemon does
[dnsbl]
nameservers = ["127.0.0.1:{rbl.port}"]
deadline = "500ms"
[[dnsbl.list]]
zone = "one.test"
families = ["ipv4"]
query_special = true
[[dnsbl.list]]
zone = "all.test"
families = ["ipv4"]
query_special = true
""")
    limit = time.monotonic() + 5
    while "state:quarantined-lists-everything" not in daemon.query("stats"):
        assert time.monotonic() < limit, daemon.query("stats")
        time.sleep(0.05)
    exim = Exim(tmp_path / "exim", EXIM_BASE.format(workdir=tmp_path / "exim") + CONNECT_ACL)
    defines = [f"LOOKUPD_SOCKET={daemon.socket}"]
    out, err = exim.bh("198.51.100.99", "QUIT\n", defines)
    assert "220 " in out and "550" not in out
    assert "DNSBL verdict unknown" not in err
    out, err = exim.bh("198.51.100.20", "QUIT\n", defines)
    assert "550 198.51.100.20 is listed (one.test:127.0.0.2): one.test: Listed in one.test" \
        in out
    assert "DNSBL verdict unknown" not in err
    assert "DNSBL all.test quarantined" in daemon.log()


# --- item 8: log lines that say what is true -------------------------------------------------


@pytest.mark.parametrize(("spamhaus", "key", "advice"), [
    (True, DQS_KEY, "Spamhaus does not take these queries although they go through DQS with "
                    "dnsbl.dqs_key: check in your Spamhaus account that the key is right and "
                    "still active"),
    (False, DQS_KEY, "dnsbl.dqs_key is set, but this list is not asked through DQS: for a "
                     "Spamhaus zone set spamhaus = true in its [[dnsbl.list]], otherwise run a "
                     "local resolver such as unbound"),
    (True, "", "Spamhaus refuses queries from public/open resolvers: run a local resolver "
               "such as unbound, or set dnsbl.dqs_key"),
], ids=["through-dqs", "key-set-not-used", "no-key"])
async def test_127_255_255_254_advice_knows_the_dqs_key(
        rbl: Rbldnsd, sources: list[DnsblSource], tmp_path: Path,
        caplog: pytest.LogCaptureFixture, spamhaus: bool, key: str, advice: str) -> None:
    """Spamhaus answers 127.255.255.254 to everything (the test points and a client): with a
    DQS key set, "set dnsbl.dqs_key" is not the cure, and the key is never logged."""
    caplog.set_level(logging.WARNING, logger="lookupd")
    zen = DnsblListConfig(zone="zen.spamhaus.org", codes=("127.0.0.[2..11]",),
                          spamhaus=spamhaus, query_special=True)
    asked = "20.100.51.198." + (f"{DQS_KEY}.zen.dq.spamhaus.net" if spamhaus and key
                                else "zen.spamhaus.org")
    before = len(rbl.queries(asked))
    source = await open_on(sources, tmp_path, rbl.port, zen, dqs_key=key)
    result = await source.check_ip("198.51.100.20")
    assert render_dnsbl(result) == ('verdict=unknown score=0 lists="" '
                                    'unknown=zen.spamhaus.org:error-code-127.255.255.254 text="" '
                                    'skipped=""')
    assert warnings(caplog, "DNSBL") == [
        f"DNSBL zen.spamhaus.org: it answers 127.255.255.254 to its test points: {advice}",
        f"DNSBL zen.spamhaus.org answered 127.255.255.254, which is not a listing: {advice}; "
        "its answers count as unknown meanwhile"]
    assert len(rbl.queries(asked)) == before + 1
    assert not [r for r in caplog.records if DQS_KEY in r.getMessage()]


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


def test_whose_fault() -> None:
    bad, good = Health(NOT_ANSWERING, "no test-point query got an answer"), Health()
    assert resolver_fault(False, [bad, bad]) == "no-nameserver"
    assert resolver_fault(False, []) == "no-nameserver"
    assert resolver_fault(True, [bad, bad]) == "no-list-answers"
    assert resolver_fault(True, [bad, good]) == ""  # the resolver reaches good: bad's doing
    assert resolver_fault(True, [bad]) == ""  # one list alone cannot tell: its own
    everything = Health("lists-everything", "...")
    assert resolver_fault(True, [bad, everything]) == ""


def test_whose_failures() -> None:
    # A run of failures since t=10: another list answered at 12, so the run is the list's own.
    assert own_failure(10.0, [5.0, 12.0], last_reply=12.0)
    # Other lists, none answered since: nothing tells (a probe round will).
    assert not own_failure(10.0, [5.0, 9.0], last_reply=11.0)
    # No other list in service: the resolver replying to anything since (a SERVFAIL of this
    # very list, a PTR) shows it is there.
    assert own_failure(10.0, [], last_reply=11.0)
    assert not own_failure(10.0, [], last_reply=9.0)


def test_lone_list_hint() -> None:
    from lookupd.dnsbl.health import lone_list

    silent = Health(NOT_ANSWERING, "no test-point query got an answer (timeout)")
    said = lone_list(silent, "bl.example", "2.0.0.127", [("127.0.0.1", 5353)]).note
    assert said.endswith("try dig @127.0.0.1 -p 5353 2.0.0.127.bl.example A, and a name you "
                         "know, through it")
    assert "dig 2.0.0.127.bl.example A" in lone_list(silent, "bl.example", "2.0.0.127", []).note
    dqs = lone_list(silent, "zen.spamhaus.org", "2.0.0.127", [], dqs=True).note
    assert "dig" not in dqs and dqs.endswith("reaches Spamhaus' dq.spamhaus.net")
    assert lone_list(Health(), "bl.example", "2.0.0.127", []) == Health()
