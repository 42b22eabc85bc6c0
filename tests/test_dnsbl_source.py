"""DnsblSource against real servers: rbldnsd zones, knot for reverse DNS, a silent server,
SERVFAIL and REFUSED, all behind a cache-less dnsmasq (see tests/dnsservers.py)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import dns.message
import pytest
from dnsservers import DQS_KEY, DelayProxy, DnsLab, Rbldnsd, ask, dns_lab

from lookupd.config import DnsblConfig, DnsblListConfig, HostPort
from lookupd.dnsbl import (
    Cached,
    DnsblResult,
    DnsblSource,
    PtrResult,
    render_dnsbl,
    render_ptr,
    render_stats,
)
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.snapshot import encode_snapshot
from lookupd.dnsbl.source import SNAPSHOT_NAME
from lookupd.errors import BadRequest
from lookupd.outcome import Status

FOUND, NOT_FOUND, UNKNOWN = Status.FOUND, Status.NOT_FOUND, Status.UNKNOWN

# The test zones list documentation addresses (192.0.2.0/24, 2001:db8::/32) and names under
# .example: internal lists, which lookupd asks about special-use addresses and names only
# when they say so (query_special).
BL = DnsblListConfig(zone="bl.test", codes=("127.0.0.[2..11]",), query_special=True)
COP = DnsblListConfig(zone="cop.test", codes=("127.0.0.2",), families=("ipv4",),
                      query_special=True)
MASK = DnsblListConfig(zone="mask.test", codes=("&0x04",), families=("ipv4",),
                       query_special=True)
EVERYTHING = DnsblListConfig(zone="everything.test", query_special=True)
DBL = DnsblListConfig(zone="dbl.test", kind="domain", codes=("127.0.1.[2..99]",),
                      query_special=True)
SLOW = DnsblListConfig(zone="slow.test", query_special=True)
BROKEN = DnsblListConfig(zone="broken.test", query_special=True)
ZEN_DQS = DnsblListConfig(zone="zen.spamhaus.org", codes=("127.0.0.[2..11]",), spamhaus=True,
                          query_special=True)
DBL_DQS = DnsblListConfig(zone="dbl.spamhaus.org", kind="domain", codes=("127.0.1.[2..99]",),
                          spamhaus=True, query_special=True)
# Any 127/8 answer counts, but the error codes.
ANY_CODE = DnsblListConfig(zone="bl.test", query_special=True)

OpenSource = Callable[..., Awaitable[DnsblSource]]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def all_logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record of this module, at every level: the DQS key must be in none."""
    handler = _Collect()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler.records
    root.removeHandler(handler)
    root.setLevel(level)
    leaked = [r.getMessage() for r in handler.records if DQS_KEY in r.getMessage().lower()]
    assert leaked == []
    assert handler.records, "the log capture saw nothing: the DQS check would be empty"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with dns_lab(tmp_path_factory.mktemp("dnslab")) as started:
        yield started


@pytest.fixture
async def open_source(lab: DnsLab, tmp_path: Path) -> AsyncIterator[OpenSource]:
    """Open DnsblSources on the lab's resolver (probed once before use); closed afterwards."""
    opened: list[DnsblSource] = []

    async def start(*lists: DnsblListConfig, state_dir: Path | None = None,
                    clock: Callable[[], float] = time.time, port: int | None = None,
                    **settings: object) -> DnsblSource:
        settings.setdefault("deadline", 1.0)
        config = DnsblConfig(lists=lists, nameservers=(
            HostPort("127.0.0.1", port or lab.resolver_port),), **settings)  # type: ignore[arg-type]
        source = DnsblSource(config, state_dir or tmp_path / "state", clock=clock)
        await source.open()
        opened.append(source)
        await source.probe()
        return source

    yield start
    for source in opened:
        await source.close()


def count(lab: DnsLab, qname: str, qtype: str = "A") -> int:
    return len(lab.rbldnsd.queries(qname, qtype))


# --- verdicts -----------------------------------------------------------------------------


async def test_listed_with_several_codes_and_the_lists_txt(open_source: OpenSource) -> None:
    source = await open_source(BL, COP)
    result = await source.check_ip("192.0.2.20")
    assert result.status is FOUND and result.score == 1
    assert [(a.name, a.codes) for a in result.listed] == \
        [("bl.test", ("127.0.0.2", "127.0.0.10"))]
    assert render_dnsbl(result) == (
        'verdict=listed score=1 lists=bl.test:127.0.0.2,bl.test:127.0.0.10 unknown="" '
        'text="bl.test: Spam source 192.0.2.20 Dynamic range 192.0.2.20" skipped=""')

    both = await source.check_ip("192.0.2.4")
    assert both.score == 2
    assert render_dnsbl(both).startswith(
        "verdict=listed score=2 lists=bl.test:127.0.0.4,cop.test:127.0.0.2 unknown=\"\" ")
    # The TXT's quote and backslash come out escaped for Exim, in one line.
    assert 'text="bl.test: Exploited host 192.0.2.4 \\"quoted\\" \\\\ backslash; cop.test: ' \
        'Blocked, see https://cop.test/query?ip=192.0.2.4"' in render_dnsbl(both)


async def test_clean_and_ipv6(open_source: OpenSource) -> None:
    source = await open_source(BL, COP)
    clean = await source.check_ip("192.0.2.99")
    assert render_dnsbl(clean) == \
        'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
    v6 = await source.check_ip("2001:db8::4")
    assert v6.status is FOUND
    # cop.test serves IPv4 only: it is not asked about an IPv6 client.
    assert [a.name for a in v6.answers] == ["bl.test"]
    mapped = await source.check_ip("::ffff:192.0.2.4")
    assert [a.name for a in mapped.listed] == ["bl.test", "cop.test"]
    with pytest.raises(BadRequest):
        await source.check_ip("192.0.2.999")


async def test_bitmask_codes(open_source: OpenSource) -> None:
    source = await open_source(MASK)
    assert (await source.check_ip("192.0.2.4")).listed[0].codes == ("127.0.0.6",)
    assert (await source.check_ip("192.0.2.40")).status is NOT_FOUND  # 127.0.0.10: no 0x04


@pytest.mark.parametrize(("ip", "code"), [
    ("192.0.2.254", "127.255.255.254"), ("192.0.2.255", "127.255.255.255"),
    ("192.0.2.100", "10.0.0.1"), ("192.0.2.1", "127.0.0.1"),
])
async def test_error_answers_are_never_listed(open_source: OpenSource, ip: str, code: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # No codes configured: any 127/8 answer would count, except the error codes.
    source = await open_source(ANY_CODE)
    caplog.set_level(logging.WARNING, logger="lookupd")
    first = await source.check_ip(ip)
    assert first.status is UNKNOWN
    assert render_dnsbl(first).startswith(
        f'verdict=unknown score=0 lists="" unknown=bl.test:error-code-{code} ')
    again = await source.check_ip(ip)
    assert again.status is UNKNOWN
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and code in r.getMessage()]
    assert len(warnings) == 1  # once per list and period, not per query
    assert "bl.test" in warnings[0] and "not a listing" in warnings[0]
    if code == "127.255.255.254":
        assert "run a local resolver such as unbound, or set dnsbl.dqs_key" in warnings[0]


async def test_domain_list(open_source: OpenSource) -> None:
    source = await open_source(BL, DBL)
    spam = await source.check_domain("Spam.Example.")
    assert [(a.name, a.codes) for a in spam.listed] == [("dbl.test", ("127.0.1.2",))]
    assert [a.name for a in spam.answers] == ["dbl.test"]  # IP lists are not asked
    assert (await source.check_domain("phish.example")).listed[0].codes == ("127.0.1.4",)
    assert (await source.check_domain("a.b.malware.example")).status is FOUND
    assert (await source.check_domain("clean.example")).status is NOT_FOUND
    # 127.0.1.102 is outside the configured codes; 127.0.1.255 is an error.
    assert (await source.check_domain("abused.example")).status is NOT_FOUND
    ipq = await source.check_domain("ipquery.example")
    assert (ipq.status, ipq.reason) == (UNKNOWN, "dbl.test:error-code-127.0.1.255")
    with pytest.raises(BadRequest):
        await source.check_domain("192.0.2.1")


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "reason"), [
    ("192.0.2.201", "timeout"), ("192.0.2.202", "servfail"), ("192.0.2.203", "refused"),
])
async def test_failures_are_unknown_never_clean(open_source: OpenSource, ip: str,
                                                reason: str) -> None:
    # Deadlines of 1s here: a loaded machine's round trip through dnsmasq and knot stays far
    # below it, so a slow answer is not taken for a timeout.
    source = await open_source(BL, deadline=1.0)
    started = time.monotonic()
    result = await source.check_ip(ip)
    elapsed = time.monotonic() - started
    assert render_dnsbl(result) == \
        f'verdict=unknown score=0 lists="" unknown=bl.test:{reason} text="" skipped=""'
    if reason == "timeout":
        assert 0.95 <= elapsed < 2.0
    else:
        assert elapsed < 0.5  # an answer, not the deadline


async def test_at_the_deadline_it_answers_with_what_it_has(open_source: OpenSource) -> None:
    source = await open_source(BL, COP, deadline=1.0)
    started = time.monotonic()
    result = await source.check_ip("192.0.2.201")  # bl.test times out, cop.test lists it
    assert time.monotonic() - started < 2.0
    assert render_dnsbl(result).startswith(
        "verdict=listed score=1 lists=cop.test:127.0.0.2 unknown=bl.test:timeout ")
    # With a threshold the missing list could have reached, the verdict is unknown.
    strict = await open_source(BL, COP, deadline=1.0, threshold=2.0)
    assert (await strict.check_ip("192.0.2.201")).status is UNKNOWN


async def test_refused_by_a_real_server_directly(open_source: OpenSource, lab: DnsLab) -> None:
    # knot itself (no forwarder) refuses a zone it does not serve.
    source = await open_source(BL, port=lab.knot.port)
    result = await source.check_ip("192.0.2.4")
    # Its probes were refused too: out of service, it leaves the decision (to no one here).
    assert render_dnsbl(result) == 'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
    assert result.answers == ()
    assert source.stats().lists[0].quarantine == "not-answering"


# --- health ---------------------------------------------------------------------------------


async def test_a_list_that_lists_everything_is_quarantined(
        open_source: OpenSource, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lookupd")
    source = await open_source(EVERYTHING, COP)
    result = await source.check_ip("192.0.2.4")
    # Out of service, it leaves the decision to cop.test: listed, or clean (never unknown).
    assert render_dnsbl(result).startswith(
        'verdict=listed score=1 lists=cop.test:127.0.0.2 unknown="" ')
    assert [a.name for a in result.answers] == ["cop.test"]
    clean = await source.check_ip("192.0.2.99")
    assert clean.status is NOT_FOUND and [a.name for a in clean.answers] == ["cop.test"]
    await source.probe()
    quarantined = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(quarantined) == 1 and quarantined[0].levelno == logging.WARNING
    assert "everything.test" in quarantined[0].getMessage()
    assert "127.0.0.1" in quarantined[0].getMessage()
    assert "state:quarantined-lists-everything" in render_stats(source.stats())


async def test_odd_test_points_are_said_once(open_source: OpenSource,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # A domain list configured as an IP list does not list 127.0.0.2: the admin hears it
    # once, and the list stays in service.
    caplog.set_level(logging.WARNING, logger="lookupd")
    source = await open_source(DnsblListConfig(zone="dbl.test"))
    await source.probe()
    await source.probe()
    notes = [r.getMessage() for r in caplog.records if "test point" in r.getMessage()]
    assert notes == ["DNSBL dbl.test: it does not list its RFC 5782 test point 127.0.0.2: "
                     "check the zone name in [[dnsbl.list]]"]
    assert source.stats().lists[0].quarantine == ""


@pytest.mark.parametrize("dead", [SLOW, BROKEN])
async def test_a_list_that_stops_answering_is_quarantined(open_source: OpenSource,
                                                          dead: DnsblListConfig) -> None:
    source = await open_source(dead, BL, deadline=1.0)
    started = time.monotonic()
    result = await source.check_ip("192.0.2.4")
    assert time.monotonic() - started < 0.5  # the dead list is not even asked (deadline 1s)
    assert [a.name for a in result.answers] == ["bl.test"] and result.reason == ""
    assert source.stats().lists[0].quarantine == "not-answering"


async def test_quarantine_ends_when_the_probes_pass_again(
        tmp_path: Path, open_source: OpenSource, caplog: pytest.LogCaptureFixture) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "flaky.zone").write_text("$SOA 60 ns.flaky.test. h.flaky.test. 1 600 60 3600 45\n"
                                      "0.0.0.0/0 :127.0.0.2:\n")
    server = Rbldnsd(tmp_path / "rbl", zones=(("flaky.test", "ip4trie", "flaky.zone"),),
                     source_dir=zones).start()
    try:
        caplog.set_level(logging.WARNING, logger="lookupd")
        source = await open_source(DnsblListConfig(zone="flaky.test", query_special=True),
                                   port=server.port, probe_interval=0.2)
        out = await source.check_ip("192.0.2.99")  # out of service: left out, not unknown
        assert (out.status, out.answers) == (NOT_FOUND, ())
        server.zone_file("flaky.zone").write_text(
            "$SOA 60 ns.flaky.test. h.flaky.test. 2 600 60 3600 45\n127.0.0.2/32 :127.0.0.2:\n")
        server.reload()
        # No probe() call here: the source's own probe loop finds out.
        for _ in range(150):
            if source.stats().lists[0].quarantine == "":
                break
            await asyncio.sleep(0.02)
        assert ask(server.port, "1.0.0.127.flaky.test").answer == []
        assert source.stats().lists[0].quarantine == ""
        assert (await source.check_ip("192.0.2.99")).status is NOT_FOUND
        messages = [r.getMessage() for r in caplog.records]
        assert sum("quarantined" in m for m in messages) == 1
        assert sum("back in service" in m for m in messages) == 1
    finally:
        server.stop()


# --- cache ----------------------------------------------------------------------------------


async def test_a_second_query_within_the_ttl_sends_no_packet(open_source: OpenSource,
                                                             lab: DnsLab) -> None:
    source = await open_source(BL, COP)
    names = [("30.2.0.192.bl.test", "A"), ("30.2.0.192.cop.test", "A"),
             ("30.2.0.192.cop.test", "TXT")]
    before = [count(lab, n, t) for n, t in names]
    first = await source.check_ip("192.0.2.30")
    assert [count(lab, n, t) for n, t in names] == [b + 1 for b in before]
    second = await source.check_ip("192.0.2.30")
    assert [count(lab, n, t) for n, t in names] == [b + 1 for b in before]
    assert first == second and second.status is FOUND
    assert [s.cache_hit_rate for s in source.stats().lists[:2]] == [0.5, 0.5]


async def test_concurrent_identical_queries_send_one_packet(open_source: OpenSource,
                                                            lab: DnsLab) -> None:
    source = await open_source(BL)
    before = count(lab, "31.2.0.192.bl.test")
    results = await asyncio.gather(*(source.check_ip("192.0.2.31") for _ in range(20)))
    assert {r.status for r in results} == {NOT_FOUND}
    assert count(lab, "31.2.0.192.bl.test") == before + 1


async def test_entries_expire_with_their_ttl(open_source: OpenSource, lab: DnsLab) -> None:
    now = [time.time()]
    source = await open_source(BL, clock=lambda: now[0], error_ttl=30.0)
    listed, clean = "10.2.0.192.bl.test", "97.2.0.192.bl.test"
    servfail = lab.dnsmasq.queries("A", "202.2.0.192.bl.test")
    base = count(lab, listed), count(lab, clean), len(servfail)

    async def asked() -> tuple[int, int, int]:
        for ip in ("192.0.2.10", "192.0.2.97", "192.0.2.202"):
            await source.check_ip(ip)
        return (count(lab, listed) - base[0], count(lab, clean) - base[1],
                len(lab.dnsmasq.queries("A", "202.2.0.192.bl.test")) - base[2])

    assert await asked() == (1, 1, 1)
    now[0] += 29  # all still cached: listed 120 s, NXDOMAIN 45 s (SOA minimum), error 30 s
    assert await asked() == (1, 1, 1)
    now[0] += 2  # the SERVFAIL is asked again
    assert await asked() == (1, 1, 2)
    now[0] += 15  # 46 s: the NXDOMAIN too (the SERVFAIL asked at 31 s is kept until 61 s)
    assert await asked() == (1, 2, 2)
    now[0] += 75  # 121 s: and the listing
    assert (await asked())[0] == 2


async def test_negative_ttl_is_bounded(open_source: OpenSource, lab: DnsLab) -> None:
    now = [time.time()]
    source = await open_source(BL, clock=lambda: now[0], negative_ttl_max=10.0)
    before = count(lab, "96.2.0.192.bl.test")
    await source.check_ip("192.0.2.96")
    now[0] += 11
    await source.check_ip("192.0.2.96")
    assert count(lab, "96.2.0.192.bl.test") == before + 2


# --- snapshot -------------------------------------------------------------------------------


async def test_the_cache_survives_a_restart(open_source: OpenSource, lab: DnsLab,
                                            tmp_path: Path) -> None:
    state = tmp_path / "snap"
    first = await open_source(BL, state_dir=state)
    before = count(lab, "32.2.0.192.bl.test"), count(lab, "4.2.0.192.bl.test", "TXT")
    await first.check_ip("192.0.2.32")
    listed = await first.check_ip("192.0.2.4")
    await first.close()
    assert (state / SNAPSHOT_NAME).stat().st_size > 0
    second = await open_source(BL, state_dir=state)
    assert await second.check_ip("192.0.2.4") == listed
    await second.check_ip("192.0.2.32")
    assert (count(lab, "32.2.0.192.bl.test"), count(lab, "4.2.0.192.bl.test", "TXT")) == \
        (before[0] + 1, before[1] + 1)
    await second.close()
    # Loaded later than the entries' TTL, the snapshot brings nothing back.
    later = await open_source(BL, state_dir=state, clock=lambda: time.time() + 200)
    await later.check_ip("192.0.2.32")
    assert count(lab, "32.2.0.192.bl.test") == before[0] + 2


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty"])
async def test_a_bad_snapshot_is_ignored_with_one_warning(
        open_source: OpenSource, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        damage: str) -> None:
    state = tmp_path / "snap"
    state.mkdir()
    path = state / SNAPSHOT_NAME
    if damage != "missing":
        writer = await open_source(BL, state_dir=state)
        for i in range(40, 60):
            await writer.check_ip(f"192.0.2.{i}")
        await writer.close()
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not msgpack",
                          "empty": b""}[damage])
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="lookupd")
    source = await open_source(BL, state_dir=state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if damage == "missing":  # normal on a first start: said at INFO, no warning
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert str(path) in warnings[0]
        assert "truncated or corrupt" in warnings[0]
    assert (await source.check_ip("192.0.2.4")).status is FOUND
    await source.close()
    assert path.stat().st_size > 20  # rewritten whole on close


# --- Spamhaus DQS ----------------------------------------------------------------------------


async def test_dqs_key_is_used_but_never_shown(open_source: OpenSource, lab: DnsLab,
                                               caplog: pytest.LogCaptureFixture,
                                               tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    source = await open_source(ZEN_DQS, DBL_DQS, dqs_key=DQS_KEY, state_dir=tmp_path / "dqs")
    result = await source.check_ip("192.0.2.4")
    reply = render_dnsbl(result)
    assert reply.startswith("verdict=listed score=1 lists=zen.spamhaus.org:127.0.0.4 ")
    # The queries went to KEY.zen.dq.spamhaus.net...
    assert count(lab, f"4.2.0.192.{DQS_KEY}.zen.dq.spamhaus.net") >= 1
    # ...whose TXT names the key: it is blanked out.
    assert "<key>.zen.dq.spamhaus.net" in reply
    domain = render_dnsbl(await source.check_domain("spam.example"))
    assert domain.startswith("verdict=listed score=1 lists=dbl.spamhaus.org:127.0.1.2 ")
    refused = await source.check_ip("192.0.2.254")
    assert refused.reason == "zen.spamhaus.org:error-code-127.255.255.254"
    everything = [reply, domain, render_dnsbl(refused), render_stats(source.stats()),
                  *(r.getMessage() for r in caplog.records)]
    assert any("zen.spamhaus.org" in line for line in everything[4:])  # it did log
    assert not [line for line in everything if DQS_KEY in line.lower()]
    await source.close()
    snapshot = (tmp_path / "dqs" / SNAPSHOT_NAME).read_bytes()
    assert b"zen.spamhaus.org" in snapshot and DQS_KEY.encode() not in snapshot


# --- reverse DNS ----------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "reply"), [
    ("192.0.2.1", "name=mail.example.test fcrdns=yes"),
    ("192.0.2.2", "name=liar.example.test fcrdns=no"),
    ("192.0.2.3", "name=nowhere.example.test fcrdns=no"),
    ("192.0.2.4", 'name="" fcrdns=no'),
    ("192.0.2.5", "name=host.slow.test fcrdns=unknown"),
    ("192.0.2.6", "name=host.broken.test fcrdns=unknown"),
    ("192.0.2.7", "name=mail7.example.test fcrdns=yes"),
    ("2001:db8::25", "name=mail6.example.test fcrdns=yes"),
    ("198.51.100.1", 'name="" fcrdns=unknown'),
])
async def test_ptr(open_source: OpenSource, ip: str, reply: str) -> None:
    source = await open_source(deadline=1.0)  # two round trips (PTR, then A) on a loaded box
    assert render_ptr(await source.ptr(ip)) == reply


async def test_ptr_answers_are_cached(open_source: OpenSource, lab: DnsLab) -> None:
    source = await open_source()
    first = await source.ptr("192.0.2.1")
    ptrs = len(lab.dnsmasq.queries("PTR", "1.2.0.192.in-addr.arpa"))
    forwards = len(lab.dnsmasq.queries("A", "mail.example.test"))
    assert await source.ptr("192.0.2.1") == first
    assert len(lab.dnsmasq.queries("PTR", "1.2.0.192.in-addr.arpa")) == ptrs
    assert len(lab.dnsmasq.queries("A", "mail.example.test")) == forwards
    ptr_stats = source.stats().lists[-1]
    assert (ptr_stats.name, ptr_stats.queries, ptr_stats.hits) == ("reverse-dns", 2, 2)


# --- stats and latency --------------------------------------------------------------------


async def test_stats(open_source: OpenSource) -> None:
    source = await open_source(BL, COP, deadline=0.3)
    for ip in ("192.0.2.4", "192.0.2.4", "192.0.2.99", "192.0.2.202", "192.0.2.201"):
        await source.check_ip(ip)
    bl, cop, _ = source.stats().lists
    assert (bl.queries, bl.hits, bl.errors, bl.timeouts) == (5, 2, 1, 1)
    assert (cop.queries, cop.hits, cop.errors, cop.timeouts) == (5, 3, 0, 0)
    assert bl.cache_hit_rate == pytest.approx(0.2)
    assert 0 < bl.p50_ms <= bl.p99_ms < 300
    line = render_stats(source.stats())
    assert "bl.test=queries:5,hits:2,errors:1,timeouts:1,cache_hit_rate:0.20,state:ok," in line


async def test_cold_queries_to_three_lists_cost_one_round_trip(open_source: OpenSource,
                                                               lab: DnsLab) -> None:
    # 0.3s: what a loaded machine adds to a round trip is small beside it (the DNS client
    # asks again only at half the 1s deadline).
    delay = 0.3
    proxy = DelayProxy(lab.rbldnsd.port, delay)
    try:
        one = await open_source(BL, port=proxy.port)
        three = await open_source(BL, COP, MASK, port=proxy.port)
        timings: dict[str, list[float]] = {"one": [], "three": []}
        for i in range(5):
            for name, source in (("one", one), ("three", three)):
                started = time.monotonic()
                result = await source.check_ip(f"192.0.2.{110 + i}")  # cold, not listed
                timings[name].append(time.monotonic() - started)
                assert result.status is NOT_FOUND
    finally:
        proxy.stop()
    t1, t3 = statistics.median(timings["one"]), statistics.median(timings["three"])
    print(f"\ncold dnsbl, {delay * 1000:.0f} ms per DNS answer: one list {t1 * 1000:.1f} ms, "
          f"three lists in parallel {t3 * 1000:.1f} ms (sequential would be "
          f"~{3 * delay * 1000:.0f} ms)")
    assert t3 < 1.75 * delay  # sequential asking would take 3 * delay
    assert t3 < t1 + delay / 2


# --- answers from the cache alone (what the server answers inline, without a task) ----------

Kind = str  # "ip", "domain" or "ptr": which lookup
Figures = list[tuple[float, ...]]


async def through_dns(source: DnsblSource, kind: Kind, key: str) -> DnsblResult | PtrResult:
    if kind == "ip":
        return await source.check_ip(key)
    if kind == "domain":
        return await source.check_domain(key)
    return await source.ptr(key)


def peek(source: DnsblSource, kind: Kind,
         key: str) -> Cached[DnsblResult] | Cached[PtrResult] | None:
    if kind == "ip":
        return source.peek_ip(key)
    if kind == "domain":
        return source.peek_domain(key)
    return source.peek_ptr(key)


def from_cache(source: DnsblSource, kind: Kind, key: str) -> DnsblResult | PtrResult | None:
    if kind == "ip":
        return source.cached_ip(key)
    if kind == "domain":
        return source.cached_domain(key)
    return source.cached_ptr(key)


def figures(source: DnsblSource) -> Figures:
    """Every list's counters (cache hits as a count) and latency percentiles."""
    return [(s.queries, s.hits, s.errors, s.timeouts, round(s.cache_hit_rate * s.queries),
             s.p50_ms, s.p99_ms) for s in source.stats().lists]


def change(after: Figures, before: Figures) -> Figures:
    return [tuple(a - b for a, b in zip(x, y, strict=True))
            for x, y in zip(after, before, strict=True)]


@pytest.mark.parametrize(("lists", "kind", "key"), [
    pytest.param((BL, COP), "ip", "192.0.2.20", id="listed-with-txt"),
    pytest.param((BL, COP), "ip", "192.0.2.4", id="listed-by-two"),
    pytest.param((BL, COP), "ip", "192.0.2.99", id="clean"),
    pytest.param((BL, COP), "ip", "2001:db8::4", id="ipv6-one-list"),
    pytest.param((ANY_CODE,), "ip", "192.0.2.254", id="error-code"),
    pytest.param((BL, COP), "ip", "192.0.2.202", id="servfail"),
    pytest.param((BL, COP), "ip", "192.0.2.201", id="timeout"),
    pytest.param((EVERYTHING, COP), "ip", "192.0.2.4", id="quarantined-list"),
    pytest.param((BL, DBL), "domain", "spam.example", id="domain-listed"),
    pytest.param((BL, DBL), "domain", "ipquery.example", id="domain-error-code"),
    pytest.param((), "ptr", "192.0.2.1", id="ptr-fcrdns"),
    pytest.param((), "ptr", "192.0.2.2", id="ptr-no-fcrdns"),
    pytest.param((), "ptr", "192.0.2.4", id="no-ptr"),
    pytest.param((), "ptr", "192.0.2.5", id="ptr-forward-timeout"),
    pytest.param((), "ptr", "192.0.2.6", id="ptr-forward-servfail"),
    pytest.param((), "ptr", "192.0.2.7", id="ptr-second-name"),
    pytest.param((), "ptr", "2001:db8::25", id="ptr-ipv6"),
    pytest.param((), "ptr", "198.51.100.1", id="ptr-refused"),
])
async def test_a_cached_answer_is_the_answer_through_dns(
        open_source: OpenSource, lists: tuple[DnsblListConfig, ...], kind: Kind,
        key: str) -> None:
    """Same result and same stats from the cache alone as from the DNS path (which also
    answers from the cache here, after its tasks and waits)."""
    source = await open_source(*lists, deadline=0.3)
    cold = figures(source)
    assert peek(source, kind, key) is None and from_cache(source, kind, key) is None
    assert figures(source) == cold  # a miss counts nothing: the DNS path counts the query
    await through_dns(source, kind, key)
    for _ in range(100):  # a timed-out question lands in the cache when the resolver gives up
        if peek(source, kind, key) is not None:
            break
        await asyncio.sleep(0.02)
    warm = figures(source)
    fast = from_cache(source, kind, key)
    after_fast = figures(source)
    # Asked again: what was decided from the same cached answers is reused (issue 15), the
    # very same result, counted as the first was.
    again = from_cache(source, kind, key)
    after_again = figures(source)
    slow = await through_dns(source, kind, key)
    after_slow = figures(source)
    assert fast is not None
    assert fast == slow and again is fast
    assert change(after_fast, warm) == change(after_again, after_fast) == \
        change(after_slow, after_again)
    # One query counted per list asked (per PTR lookup), each answered from the cache.
    asked = len(fast.answers) if isinstance(fast, DnsblResult) else 1
    assert asked >= 1 and sum(c[0] for c in change(after_fast, warm)) == asked


class Withheld(DelayProxy):
    """Relays every question to rbldnsd at once, but never answers the names in `withheld`
    (while there are any): a list whose must-not-list test point goes unanswered."""

    def __init__(self, upstream: int) -> None:
        super().__init__(upstream, 0.0)
        self.withheld: set[str] = set()

    def _relay(self, data: bytes, client: tuple[str, int]) -> None:
        qname = dns.message.from_wire(data).question[0].name.to_text().lower()
        if qname not in self.withheld:
            super()._relay(data, client)


@pytest.mark.parametrize("ip", ["192.0.2.4", "192.0.2.20", "192.0.2.99"],
                         ids=["listed-by-both", "listed-by-one", "clean"])
async def test_cached_answers_follow_health_changes_and_expiry(
        open_source: OpenSource, lab: DnsLab, ip: str) -> None:
    """What is decided from cached answers is reused only while it is still what the DNS
    path says: a list that stops being trusted (its must-not-list test point unanswered)
    leaves the verdict at once and comes back when probed right again; expired answers are
    asked again, never answered from what was decided on them."""
    proxy = Withheld(lab.rbldnsd.port)
    now = [time.time()]
    try:
        source = await open_source(BL, COP, port=proxy.port, clock=lambda: now[0],
                                   deadline=0.3)

        async def both_ways() -> DnsblResult:
            """The answer from the cache (taken twice: the second from the memos) and
            through DNS: the same, counted the same."""
            before = figures(source)
            fast = source.cached_ip(ip)
            mid = figures(source)
            again = source.cached_ip(ip)
            mid2 = figures(source)
            slow = await source.check_ip(ip)
            assert fast is not None and fast == again == slow
            assert change(mid, before) == change(mid2, mid) == change(figures(source), mid2)
            return fast

        def peeked() -> tuple[int, float]:
            """The generation and the expiry that say how long a result from the cache alone
            holds (what the `connect` reply cache keeps), and that it holds now."""
            generation = source.generation
            taken = source.peek_ip(ip)
            assert taken is not None and source.holds(generation, taken.expires)
            return generation, taken.expires

        assert source.cached_ip(ip) is None
        await source.check_ip(ip)
        trusted = await both_ways()
        assert [a.name for a in trusted.answers] == ["bl.test", "cop.test"]
        held = peeked()
        await source.probe()  # a probe round that changes no list's standing changes nothing
        assert source.holds(*held)

        # cop.test's must-not-list test point goes unanswered: nothing shows it does not
        # list everything, so it is out of service, left out of the verdict.
        proxy.withheld = {"1.0.0.127.cop.test."}
        await source.probe()
        assert source.stats().lists[1].quarantine == "not-answering"
        assert not source.holds(*held)
        alone = await both_ways()
        assert [a.name for a in alone.answers] == ["bl.test"]
        assert alone.score == sum(a.weight for a in alone.listed)
        held = peeked()

        proxy.withheld = set()
        await source.probe()
        assert source.stats().lists[1].quarantine == ""
        assert not source.holds(*held)
        assert await both_ways() == trusted
        held = peeked()

        # Every answer expired (a day is longer than any TTL): nothing comes from the
        # cache, the lists are asked again, and the answers are decided again.
        qname = ".".join(reversed(ip.split("."))) + ".bl.test"
        asked = len(lab.rbldnsd.queries(qname, "A"))
        now[0] += 86400 + 1
        assert not source.holds(*held)
        assert source.peek_ip(ip) is None
        await source.check_ip(ip)
        assert len(lab.rbldnsd.queries(qname, "A")) == asked + 1
        assert await both_ways() == trusted
        held = peeked()
        # An unexpired answer replaced (or evicted from a full cache): no longer holds.
        key = ("bl.test", "A", qname.removesuffix(".bl.test"))
        source._cache.put(key, source._cache.get(key))  # type: ignore[arg-type]
        assert not source.holds(*held)
        held = peeked()
        await source.close()  # closed: nothing is answered from the cache
        assert not source.holds(*held) and source.peek_ip(ip) is None
    finally:
        proxy.stop()


async def test_cached_reverse_dns_follows_its_answers(open_source: OpenSource) -> None:
    """The reverse-DNS result decided from cached PTR and forward answers is reused while
    they are the very answers cached, and decided again from new answers (expired and asked
    again, or replaced)."""
    now = [time.time()]
    source = await open_source(clock=lambda: now[0])
    for ip in ("192.0.2.1", "192.0.2.7"):
        await source.ptr(ip)
        first = source.cached_ptr(ip)
        assert first is not None and source.cached_ptr(ip) is first
    now[0] += 86400 + 1
    assert source.peek_ptr("192.0.2.1") is None and source.peek_ptr("192.0.2.7") is None
    fresh = await source.ptr("192.0.2.7")
    again = source.cached_ptr("192.0.2.7")
    assert again == fresh == first and again is not first
    assert render_ptr(again) == "name=mail7.example.test fcrdns=yes"
    # A PTR answer that changes while the forward answers stay cached (a refresh with other
    # records, as a shared answer from another host may bring): decided again.
    source._cache.put(("", "PTR", "7.2.0.192.in-addr.arpa"), DnsAnswer(
        FOUND, ("other.example.test",), expires=now[0] + 300))
    changed = source.cached_ptr("192.0.2.7")
    assert changed == await source.ptr("192.0.2.7")
    assert render_ptr(changed) == "name=other.example.test fcrdns=no"  # type: ignore[arg-type]


async def test_a_quarantined_list_needs_nothing_cached(open_source: OpenSource) -> None:
    source = await open_source(EVERYTHING)
    before = figures(source)
    fast = source.cached_ip("192.0.2.99")
    after_fast = figures(source)
    assert fast == await source.check_ip("192.0.2.99")
    # Out of service, it is not asked: nothing from it in the verdict, nothing counted.
    assert fast is not None and (fast.status, fast.answers) == (NOT_FOUND, ())
    assert change(after_fast, before) == change(figures(source), after_fast)
    assert change(after_fast, before)[0][:5] == (0, 0, 0, 0, 0)


async def test_a_partly_cached_answer_goes_to_dns(open_source: OpenSource,
                                                  tmp_path: Path) -> None:
    """The cache holds some of what a query needs (an A without its TXT, one list of two,
    an expired entry, a PTR without one of its forward answers): None, nothing counted, and
    the DNS path fills in the rest."""
    now = time.time()
    kept, soon = now + 100, now + 5
    state = tmp_path / "partial"
    state.mkdir()
    (state / SNAPSHOT_NAME).write_bytes(encode_snapshot([
        (("bl.test", "A", "20.2.0.192"), DnsAnswer(FOUND, ("127.0.0.2",), expires=kept)),
        (("cop.test", "A", "20.2.0.192"), DnsAnswer(NOT_FOUND, expires=kept)),
        (("bl.test", "A", "99.2.0.192"), DnsAnswer(NOT_FOUND, expires=kept)),
        (("bl.test", "A", "98.2.0.192"), DnsAnswer(NOT_FOUND, expires=soon)),
        (("cop.test", "A", "98.2.0.192"), DnsAnswer(NOT_FOUND, expires=kept)),
        (("", "PTR", "7.2.0.192.in-addr.arpa"),
         DnsAnswer(FOUND, ("other.example.test", "mail7.example.test"), expires=kept)),
        (("", "A", "other.example.test"), DnsAnswer(FOUND, ("198.51.100.8",), expires=kept)),
    ]))
    clock = [now]
    source = await open_source(BL, COP, state_dir=state, clock=lambda: clock[0])
    clock[0] = now + 10  # 98.2.0.192.bl.test has expired
    queries = [("ip", "192.0.2.20"), ("ip", "192.0.2.99"), ("ip", "192.0.2.98"),
               ("ptr", "192.0.2.7")]
    before = figures(source)
    for kind, key in queries:
        assert peek(source, kind, key) is None, key
        assert from_cache(source, kind, key) is None, key
    assert figures(source) == before
    answers = [await through_dns(source, kind, key) for kind, key in queries]
    assert [from_cache(source, kind, key) for kind, key in queries] == answers
    assert render_dnsbl(answers[0]).startswith(  # type: ignore[arg-type]
        'verdict=listed score=1 lists=bl.test:127.0.0.2 unknown="" text="bl.test: Spam source')
    assert render_ptr(answers[3]) == "name=mail7.example.test fcrdns=yes"  # type: ignore[arg-type]


async def test_a_cached_error_code_warns_once(open_source: OpenSource, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """An answer from the cache alone logs what the DNS path logs: here the warning about a
    list's error code, from a cache loaded from the snapshot (no DNS query at all)."""
    state = tmp_path / "codes"
    state.mkdir()
    (state / SNAPSHOT_NAME).write_bytes(encode_snapshot([
        (("bl.test", "A", "254.2.0.192"),
         DnsAnswer(FOUND, ("127.255.255.254",), expires=time.time() + 100)),
    ]))
    source = await open_source(ANY_CODE, state_dir=state)
    caplog.set_level(logging.WARNING, logger="lookupd")
    first = source.cached_ip("192.0.2.254")
    assert first is not None and first.reason == "bl.test:error-code-127.255.255.254"
    assert source.cached_ip("192.0.2.254") == first == await source.check_ip("192.0.2.254")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("DNSBL bl.test answered 127.255.255.254, which is not a "
                                  "listing: ")
    assert source.stats().lists[0].errors == 3


async def test_a_peek_counts_only_when_taken(open_source: OpenSource) -> None:
    source = await open_source(BL)
    await source.check_ip("192.0.2.4")
    before = figures(source)
    peeked = source.peek_ip("192.0.2.4")
    assert peeked is not None and figures(source) == before
    assert peeked.take() == peeked.result and peeked.take() == peeked.result
    assert change(figures(source), before)[0][:5] == (1, 1, 0, 0, 1)  # counted once
    with pytest.raises(BadRequest):
        source.peek_ip("192.0.2.999")
    with pytest.raises(BadRequest):
        source.cached_domain("192.0.2.1")

