"""No list is trusted before its RFC 5782 probe has come back, and a reload (`take_over`)
keeps the verdicts and the answers of the lists it does not change. Real rbldnsd zones made
here, behind loopback relays that make the lists (or only their test points) slow."""

from __future__ import annotations

import asyncio
import shlex
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import dns.message
import pytest
from dnsservers import RBLDNSD, DelayProxy, Rbldnsd

from lookupd.config import ConnectConfig, DnsblConfig, DnsblListConfig, HostPort
from lookupd.connect import ConnectChecker, ConnectRequest
from lookupd.dnsbl import DnsblSource, render_dnsbl, render_stats
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.snapshot import encode_snapshot
from lookupd.dnsbl.source import SNAPSHOT_NAME
from lookupd.geoip import AsnResult, CountryResult
from lookupd.incidents import IncidentsResult
from lookupd.outcome import Status

pytestmark = pytest.mark.skipif(not Path(RBLDNSD).exists(), reason="rbldnsd is not installed")

SOA = "$SOA 60 ns.{0}. hostmaster.{0}. 1 600 60 3600 45\n$TTL 300\n"
ZONES = {
    # A list gone bad: it lists every address, its test points 127.0.0.1 and .2 included.
    "all.zone": SOA.format("all.test") + "0.0.0.0/0 :127.0.0.2:Everything is listed\n",
    # The same for domains: TEST, INVALID and every name under example.
    "dball.zone": SOA.format("dball.test") + ":127.0.1.2:Everything is listed\n"
                  "test\ninvalid\n.example\n",
    "good.zone": SOA.format("good.test") + ":127.0.0.2:Listed in good.test: $\n"
                 "127.0.0.2\n192.0.2.4\n192.0.2.5\n192.0.2.6\n192.0.2.7\n",
    "other.zone": SOA.format("other.test") + ":127.0.0.3:Listed in other.test\n"
                  "127.0.0.2\n192.0.2.4\n",
    "moved.zone": SOA.format("moved.test") + ":127.0.0.4:Listed in moved.test\n"
                  "127.0.0.2\n192.0.2.5\n",
    "dblgood.zone": SOA.format("dblgood.test") + ":127.0.1.2:Spam domain $\n"
                    "test\nspam.example\n",
}
RBL_ZONES = (("all.test", "ip4trie", "all.zone"), ("dball.test", "dnset", "dball.zone"),
             ("good.test", "ip4set", "good.zone"), ("other.test", "ip4set", "other.zone"),
             ("moved.test", "ip4set", "moved.zone"), ("dblgood.test", "dnset", "dblgood.zone"))

# Internal test lists of documentation addresses and .example names: they ask to be asked
# (query_special).
ALL = DnsblListConfig(zone="all.test", families=("ipv4",), query_special=True)
DBALL = DnsblListConfig(zone="dball.test", kind="domain", query_special=True)
GOOD = DnsblListConfig(zone="good.test", codes=("127.0.0.2",), families=("ipv4",),
                       query_special=True)
OTHER = DnsblListConfig(zone="other.test", families=("ipv4",), query_special=True)
DBLGOOD = DnsblListConfig(zone="dblgood.test", kind="domain", codes=("127.0.1.[2..99]",),
                          query_special=True)

# A list found out of service (it lists everything) leaves the decision to the others: here
# there are none, so the verdict is clean (never listed).
QUARANTINED_ALL = QUARANTINED_DBALL = ('verdict=clean score=0 lists="" unknown="" text="" '
                                       'skipped=""')


class ProbeDelay(DelayProxy):
    """A relay that holds back only the questions about RFC 5782 test points (lookupd's
    probes) by `delay` and passes every other question at once: a probe round still under
    way while client questions are answered."""

    def _relay(self, data: bytes, client: tuple[str, int]) -> None:
        qname = dns.message.from_wire(data).question[0].name.to_text().lower()
        if qname.startswith(("2.0.0.127.", "1.0.0.127.", "test.", "invalid.")):
            time.sleep(self.delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2.0)
            try:
                up.sendto(data, ("127.0.0.1", self.upstream))
                self.sock.sendto(up.recv(4096), client)
            except OSError:
                return


class ListDelay(DelayProxy):
    """A relay that holds back the questions about the lists' zones (*.test) by `delay` and
    passes the others (the liveness question about the root) at once: slow lists behind a
    resolver that is there."""

    def _relay(self, data: bytes, client: tuple[str, int]) -> None:
        qname = dns.message.from_wire(data).question[0].name.to_text().lower()
        if qname.endswith(".test."):
            time.sleep(self.delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2.0)
            try:
                up.sendto(data, ("127.0.0.1", self.upstream))
                self.sock.sendto(up.recv(4096), client)
            except OSError:
                return


@pytest.fixture(scope="module")
def rbl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rbldnsd]:
    zones = tmp_path_factory.mktemp("probezones")
    for name, text in ZONES.items():
        (zones / name).write_text(text)
    server = Rbldnsd(tmp_path_factory.mktemp("proberbl"), zones=RBL_ZONES,
                     source_dir=zones).start()
    yield server
    server.stop()


MakeSource = Callable[..., DnsblSource]
T = TypeVar("T")


@pytest.fixture
async def make_source(tmp_path: Path) -> AsyncIterator[MakeSource]:
    """DnsblSources built (not opened) on 127.0.0.1:`port`; closed afterwards."""
    made: list[DnsblSource] = []

    def make(*lists: DnsblListConfig, port: int, state: str = "state",
             **settings: object) -> DnsblSource:
        config = DnsblConfig(lists=lists, nameservers=(HostPort("127.0.0.1", port),),
                             **settings)  # type: ignore[arg-type]
        source = DnsblSource(config, tmp_path / state)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


def states(source: DnsblSource) -> list[str]:
    """Each list's `state:` in the stats reply (reverse-dns left out)."""
    pairs = [p for p in render_stats(source.stats()).split() if ",state:" in p]
    return [p.split(",state:")[1].split(",")[0] for p in pairs
            if not p.startswith("reverse-dns=")]


async def timed(lookup: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await lookup
    return result, time.monotonic() - started


class _NoGeoIP:
    def country(self, ip: object) -> CountryResult:
        return CountryResult(Status.NOT_FOUND)

    def asn(self, ip: object) -> AsnResult:
        return AsnResult(Status.NOT_FOUND)


class _NoIncidents:
    def count(self, ip: object) -> IncidentsResult:
        return IncidentsResult(Status.NOT_FOUND)


def connect_checker(source: DnsblSource) -> ConnectChecker:
    return ConnectChecker(ConnectConfig(), _NoGeoIP(), _NoIncidents(), source)


def connect_fields(reply: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(reply))


# --- a new source trusts no list before its probe -----------------------------------------


async def test_a_list_that_lists_everything_is_never_listed_while_its_probe_is_slow(
        rbl: Rbldnsd, make_source: MakeSource, tmp_path: Path) -> None:
    """Issue 9 item 2: the first queries after start said `listed`. Here every answer of
    the lists takes 0.3 s, the snapshot holds listings of the client from before the
    restart, and the very first query is asked while open() is still starting the probes."""
    proxy = DelayProxy(rbl.port, 0.3)
    try:
        state = tmp_path / "state"
        state.mkdir()
        expires = time.time() + 300
        (state / SNAPSHOT_NAME).write_bytes(encode_snapshot([
            (("all.test", "A", "4.2.0.192"), DnsAnswer(Status.FOUND, ("127.0.0.2",),
                                                       expires=expires)),
            (("all.test", "TXT", "4.2.0.192"), DnsAnswer(Status.FOUND, ("Everything",),
                                                         expires=expires)),
            (("dball.test", "A", "spam.example"), DnsAnswer(Status.FOUND, ("127.0.1.2",),
                                                            expires=expires)),
        ]))
        source = make_source(ALL, DBALL, port=proxy.port, deadline=1.5)
        opening = asyncio.create_task(source.open())
        first = [asyncio.create_task(source.check_ip("192.0.2.4")),
                 asyncio.create_task(source.check_domain("spam.example"))]
        await opening
        # Nothing is answered inline from the snapshot while the lists are unprobed.
        assert source.cached_ip("192.0.2.4") is None
        assert source.peek_ip("192.0.2.4") is None
        assert source.cached_domain("spam.example") is None
        assert states(source) == ["unprobed", "unprobed"]
        checker = connect_checker(source)
        request = ConnectRequest(ip_address("192.0.2.4"), 25)
        assert checker.answer_now(request) is None
        burst = [source.check_ip("192.0.2.4") for _ in range(5)]
        burst += [source.check_ip("192.0.2.77"), source.check_domain("spam.example")]
        connect, (ips, elapsed) = await asyncio.gather(
            checker.answer(request), timed(asyncio.gather(*first, *burst)))
        replies = [render_dnsbl(r) for r in ips]
        assert replies == [QUARANTINED_ALL, QUARANTINED_DBALL, *[QUARANTINED_ALL] * 6,
                           QUARANTINED_DBALL]
        assert 0.2 < elapsed < 1.0  # they waited for the probe, not for the deadline
        assert (connect_fields(connect)["dnsbl"], connect_fields(connect)["action"]) == \
            ("clean", "accept")
        assert states(source) == ["quarantined-lists-everything",
                                  "quarantined-lists-everything"]
        # Probed, the inline path answers too, with the same verdict.
        cached = source.cached_ip("192.0.2.4")
        assert cached is not None and render_dnsbl(cached) == QUARANTINED_ALL
        # The bad list was never asked about a client, so it cached no listing either.
        assert rbl.queries("4.2.0.192.all.test") == []
        assert rbl.queries("77.2.0.192.all.test") == []
        assert rbl.queries("spam.example.dball.test") == []
    finally:
        proxy.stop()


async def test_a_probe_that_outlasts_the_deadline_leaves_the_list_unprobed(
        rbl: Rbldnsd, make_source: MakeSource) -> None:
    """The probe of a list that answers in 1 s gives up at the deadline (0.3 s); a query
    whose deadline passes before that calls the list unprobed, never listed. (The resolver
    itself answers at once: a resolver that answers nothing in time is not the list's fault.)"""
    proxy = ListDelay(rbl.port, 1.0)
    try:
        source = make_source(ALL, port=proxy.port, deadline=0.3)
        # Asked just before open(): its deadline passes before the probe gives up.
        first = asyncio.create_task(source.check_ip("192.0.2.4"))
        await asyncio.sleep(0.1)
        await source.open()
        assert render_dnsbl(await first) == \
            'verdict=unknown score=0 lists="" unknown=all.test:unprobed text="" skipped=""'
        for _ in range(100):
            if states(source) != ["unprobed"]:
                break
            await asyncio.sleep(0.02)
        assert states(source) == ["quarantined-not-answering"]
        assert render_dnsbl(await source.check_ip("192.0.2.4")) == QUARANTINED_ALL
        assert source.stats().lists[0].timeouts == 0  # unprobed is not the list's timeout
    finally:
        proxy.stop()


async def test_a_healthy_list_is_listed_once_its_probe_has_passed(
        rbl: Rbldnsd, make_source: MakeSource) -> None:
    proxy = ProbeDelay(rbl.port, 0.4)
    try:
        source = make_source(GOOD, DBLGOOD, port=proxy.port, deadline=1.5)
        seen = len(rbl.log_path.read_text().splitlines())
        await source.open()
        assert states(source) == ["unprobed", "unprobed"]
        assert source.cached_ip("192.0.2.4") is None
        result, elapsed = await timed(source.check_ip("192.0.2.4"))
        assert render_dnsbl(result) == (
            'verdict=listed score=1 lists=good.test:127.0.0.2 unknown="" '
            'text="good.test: Listed in good.test: 192.0.2.4" skipped=""')
        assert elapsed >= 0.35  # it waited for the probe (0.4 s), then asked
        assert states(source)[0] == "ok"  # (the domain list's probe runs on its own)
        # The list was asked about the client only after its test points had answered.
        log = rbl.log_path.read_text().splitlines()[seen:]
        probe = next(i for i, line in enumerate(log) if "1.0.0.127.good.test" in line)
        asked = next(i for i, line in enumerate(log) if "4.2.0.192.good.test" in line)
        assert probe < asked
        domain = await source.check_domain("spam.example")
        assert render_dnsbl(domain) == (
            'verdict=listed score=1 lists=dblgood.test:127.0.1.2 unknown="" '
            'text="dblgood.test: Spam domain spam.example" skipped=""')
        assert states(source) == ["ok", "ok"]
        connect = connect_fields(await connect_checker(source).answer(
            ConnectRequest(ip_address("192.0.2.5"), 25)))
        assert (connect["dnsbl"], connect["dnsbl_lists"], connect["action"]) == \
            ("listed", "good.test:127.0.0.2", "deny")
    finally:
        proxy.stop()


# --- reload: take_over ------------------------------------------------------------------------


async def test_take_over_keeps_unchanged_lists_trusted_and_the_cache(
        rbl: Rbldnsd, make_source: MakeSource) -> None:
    proxy = ProbeDelay(rbl.port, 0.6)
    try:
        old = make_source(GOOD, ALL, OTHER, port=proxy.port, deadline=1.5, state="old")
        await old.open()
        await old.probe()
        assert states(old) == ["ok", "quarantined-lists-everything", "ok"]
        names = [("4.2.0.192.good.test", "A"), ("4.2.0.192.good.test", "TXT"),
                 ("4.2.0.192.other.test", "A"), ("4.2.0.192.other.test", "TXT")]
        before = [len(rbl.queries(n, t)) for n, t in names]
        listed = render_dnsbl(await old.check_ip("192.0.2.4"))
        assert listed == ('verdict=listed score=2 lists=good.test:127.0.0.2,'
                          'other.test:127.0.0.3 unknown="" '
                          'text="good.test: Listed in good.test: 192.0.2.4; other.test: '
                          'Listed in other.test" skipped=""')
        asked = [len(rbl.queries(n, t)) for n, t in names]
        assert [a - b for a, b in zip(asked, before, strict=True)] == [1, 1, 1, 1]

        new = make_source(GOOD, ALL, OTHER, port=proxy.port, deadline=1.5, state="new")
        new.take_over(old)
        await new.open()
        # At once, without a probe of its own (those take 0.6 s here): the same verdicts...
        assert states(new) == ["ok", "quarantined-lists-everything", "ok"]
        # ...and the same answer, inline from the carried cache, with no DNS question.
        cached = new.cached_ip("192.0.2.4")
        assert cached is not None and render_dnsbl(cached) == listed
        assert render_dnsbl(await new.check_ip("192.0.2.4")) == listed
        assert [len(rbl.queries(n, t)) for n, t in names] == asked
        # A new client: the trusted list is asked at once, not after a probe.
        fresh, elapsed = await timed(new.check_ip("192.0.2.5"))
        assert render_dnsbl(fresh) == (
            'verdict=listed score=1 lists=good.test:127.0.0.2 unknown="" '
            'text="good.test: Listed in good.test: 192.0.2.5" skipped=""')
        assert elapsed < 0.5  # not after a probe (0.6 s)
        with pytest.raises(RuntimeError, match="before open"):
            new.take_over(old)
        # The old source is closed by the caller; the new one shares nothing it closes.
        await old.close()
        after = await new.check_ip("192.0.2.6")
        assert render_dnsbl(after).startswith(
            'verdict=listed score=1 lists=good.test:127.0.0.2 unknown="" ')
        await new.probe()
        assert states(new) == ["ok", "quarantined-lists-everything", "ok"]
    finally:
        proxy.stop()


@pytest.mark.parametrize(("change", "expect_states", "carried"), [
    # other.test's list now asks another zone under the same name: probed anew.
    ("zone", ["ok", "unprobed"], True),
    # What a probe looks at is unchanged: codes, weight and name are not part of it.
    ("codes", ["ok", "ok"], True),
    ("deadline", ["unprobed", "unprobed"], True),
    # Another resolver: neither its verdicts nor its answers are the old one's.
    ("nameservers", ["unprobed", "unprobed"], False),
])
async def test_take_over_starts_changed_lists_unprobed(
        rbl: Rbldnsd, make_source: MakeSource, change: str, expect_states: list[str],
        carried: bool) -> None:
    proxy = ProbeDelay(rbl.port, 0.6)
    other_proxy = ProbeDelay(rbl.port, 0.6)
    try:
        old = make_source(GOOD, OTHER, port=proxy.port, deadline=1.5, state="old")
        await old.open()
        await old.probe()
        await old.check_ip("192.0.2.4")
        lists = {
            "zone": (GOOD, DnsblListConfig(zone="moved.test", name="other.test",
                                           families=("ipv4",), query_special=True)),
            "codes": (DnsblListConfig(zone="good.test", name="good", weight=2.0,
                                      families=("ipv4",), query_special=True), OTHER),
        }.get(change, (GOOD, OTHER))
        new = make_source(*lists, state="new",
                          port=other_proxy.port if change == "nameservers" else proxy.port,
                          deadline=1.2 if change == "deadline" else 1.5)
        new.take_over(old)
        await new.open()
        assert states(new) == expect_states
        assert (new.peek_ip("192.0.2.4") is not None) == (change == "codes")
        assert (new.stats().cache_entries > 0) == carried
        result, elapsed = await timed(new.check_ip("192.0.2.5"))
        if change == "zone":  # good.test at once, moved.test after its probe (0.6 s)
            assert elapsed >= 0.55
            assert render_dnsbl(result).startswith(
                "verdict=listed score=2 lists=good.test:127.0.0.2,other.test:127.0.0.4 "
                'unknown="" ')
        elif change == "codes":
            assert elapsed < 0.5  # not after a probe (0.6 s)
            assert render_dnsbl(result).startswith(
                'verdict=listed score=2 lists=good:127.0.0.2 unknown="" ')
        else:
            assert elapsed >= 0.55
            assert render_dnsbl(result).startswith(
                'verdict=listed score=1 lists=good.test:127.0.0.2 unknown="" ')
    finally:
        proxy.stop()
        other_proxy.stop()


async def test_a_list_the_old_source_had_not_probed_yet_starts_unprobed(
        rbl: Rbldnsd, make_source: MakeSource) -> None:
    proxy = ProbeDelay(rbl.port, 0.6)
    try:
        old = make_source(ALL, port=proxy.port, deadline=1.5, state="old")
        await old.open()  # a reload just after the start: the first probe is under way
        new = make_source(ALL, port=proxy.port, deadline=1.5, state="new")
        new.take_over(old)
        await new.open()
        assert states(new) == ["unprobed"]
        assert render_dnsbl(await new.check_ip("192.0.2.4")) == QUARANTINED_ALL
        assert states(new) == ["quarantined-lists-everything"]
    finally:
        proxy.stop()
