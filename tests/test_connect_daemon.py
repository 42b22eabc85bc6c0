"""`connect` answered by a real lookupd from real sources: the GeoIP and nftfw test data, a DNSBL
zone in rbldnsd, reverse DNS in knot, both behind dnsmasq; and a DNS server that never answers.

The lab and the lookupd configuration here are also used by test_snippets.py and
test_fail2ban.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Dnsmasq, Knot, Rbldnsd, SilentServer, ask
from support import FIREWALL, MAXMIND, Lookupd

from lookupd.config import load_config
from lookupd.connect import parse_args
from lookupd.dispatch import Dispatcher
from lookupd.dnsbl.stats import ListStats
from lookupd.ipaddr import parse_ip
from lookupd.protocol import Peer, Request
from lookupd.sources import Sources

pytestmark = pytest.mark.skipif(not Path(RBLDNSD).exists(), reason="rbldnsd is not installed")

# The DNSBL of these tests. 127.0.0.2 is its RFC 5782 test point (lookupd probes it).
BL_ZONE = """\
$SOA 60 ns.bl.test. hostmaster.bl.test. 1 600 60 3600 45
$NS 60 ns.bl.test.
$TTL 120
:127.0.0.2:Listed in bl.test, see https://bl.test/lookup?ip=$
127.0.0.2
192.0.2.20
192.0.2.21
203.0.113.9
"""

# The clients of the tests (GeoIP2-Country-Test, nftfw-firewall.db, BL_ZONE):
CLEAN = "81.2.69.142"            # GB, no incidents, not listed
INCIDENTS = "203.0.113.7"        # 42 incidents
LISTED = "192.0.2.20"            # in bl.test
ALLOWED = "203.0.113.9"          # 11 incidents and in bl.test, but in the allowlist
SUBMIT_SE = "89.160.20.112"      # SE: not a submission country
SUBMIT_SE_IMAP = "89.160.20.130"  # SE, but in the IMAP-before-submission access file
PTR_OK = "192.0.2.1"             # knot: PTR mail.example.test, which points back


@dataclass
class ConnectLab:
    """The DNS side: `resolver_port` is dnsmasq, routing bl.test to rbldnsd and the
    192.0.2.0/24 reverse zone and example.test to knot."""

    rbldnsd: Rbldnsd
    knot: Knot
    dnsmasq: Dnsmasq

    @property
    def resolver_port(self) -> int:
        return self.dnsmasq.port


@contextmanager
def connect_lab(workdir: Path) -> Iterator[ConnectLab]:
    zones = workdir / "zones"
    zones.mkdir(parents=True)
    (zones / "connect-bl.zone").write_text(BL_ZONE)
    with ExitStack() as stack:
        rbl = Rbldnsd(workdir / "rbldnsd", zones=(("bl.test", "ip4set", "connect-bl.zone"),),
                      source_dir=zones)
        stack.callback(rbl.stop)
        rbl.start()
        knot = Knot(workdir / "knot", broken=())
        stack.callback(knot.stop)
        knot.start()
        routes = {"bl.test": rbl.port} | {zone: knot.port for zone in knot.zones}
        forwarder = Dnsmasq(workdir / "dnsmasq", routes)
        stack.callback(forwarder.stop)
        forwarder.start()
        yield ConnectLab(rbl, knot, forwarder)


def lookupd_config(resolver_port: int, workdir: Path, *, dnsbl_deadline: str = "1s",
                   connect_deadline: str = "2s", extra: str = "") -> str:
    """lookupd's configuration for the connect tests; list files live in `workdir`."""
    allow = workdir / "whitelist_connect_hosts"
    access = workdir / "imap_before_submission"
    if not allow.exists():
        allow.write_text(f"# clients no connect check may refuse\n{ALLOWED}\n")
    if not access.exists():
        access.write_text(f"{SUBMIT_SE_IMAP}: 1700000000\n")
    # Exim -bh with -D macros gives up root: it connects as Debian-exim.
    return f"""
[server]
socket_mode = "0666"
[geoip]
country_db = "{MAXMIND / 'GeoIP2-Country-Test.mmdb'}"
asn_db = "{MAXMIND / 'GeoLite2-ASN-Test.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
[dnsbl]
nameservers = ["127.0.0.1:{resolver_port}"]
deadline = "{dnsbl_deadline}"
[[dnsbl.list]]
zone = "bl.test"
families = ["ipv4"]
query_special = true   # an internal test list: it lists documentation addresses
[connect]
allowlist_files = ["{allow}"]
submission_countries = ["GB"]
submission_access_file = "{access}"
deadline = "{connect_deadline}"
{extra}
[users]
limit = 3
notify_command = ""
"""


def fields(reply: str) -> dict[str, str]:
    """key=value pairs of a reply (values without spaces only: for the simple keys)."""
    return dict(pair.split("=", 1) for pair in reply.split() if "=" in pair)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectLab]:
    for tool in ("knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with connect_lab(tmp_path_factory.mktemp("connect-lab")) as running:
        yield running


def test_connect_gathers_every_source(start_lookupd: StartLookupd, lab: ConnectLab,
                                      tmp_path: Path) -> None:
    daemon = start_lookupd(lookupd_config(lab.resolver_port, tmp_path))
    got = fields(daemon.query(f"connect {CLEAN} 25"))
    assert got | {"reason": ""} == {
        "action": "accept", "rule": "none", "would": "none", "reason": "", "country": "GB",
        "asn": "--", "incidents": "0", "dnsbl": "clean", "dnsbl_lists": '""',
        "ptr": "??", "fcrdns": "unknown", "allowlisted": "no", "helo_dbl": "clean",
        "strikes": "0"}
    got = fields(daemon.query(f"connect {PTR_OK} 25"))
    assert (got["ptr"], got["fcrdns"]) == ("mail.example.test", "yes")
    got = fields(daemon.query(f"connect {LISTED} 25"))
    assert (got["action"], got["rule"], got["dnsbl"], got["dnsbl_lists"]) == \
        ("deny", "dnsbl", "listed", "bl.test:127.0.0.2")
    reply = daemon.query(f"connect {INCIDENTS} 25")
    assert reply.startswith("action=deny rule=incidents would=none reason=\"Blacklisted: "
                            "Denied access - history of unwanted activity\" ")
    assert fields(reply)["incidents"] == "42"
    got = fields(daemon.query(f"connect {ALLOWED} 25"))
    assert (got["action"], got["rule"], got["allowlisted"], got["dnsbl"], got["incidents"]) == \
        ("accept", "allowlist", "yes", "listed", "11")
    got = fields(daemon.query(f"connect {SUBMIT_SE} 587"))
    assert (got["action"], got["rule"], got["country"], got["asn"]) == \
        ("defer", "submission", "SE", "AS29518")
    assert fields(daemon.query(f"connect {SUBMIT_SE_IMAP} 587"))["action"] == "accept"
    assert fields(daemon.query(f"connect {SUBMIT_SE} 25"))["action"] == "accept"
    assert fields(daemon.query(f"connect {CLEAN} 587"))["action"] == "accept"
    # One INFO line per refusal, saying why.
    log = daemon.log()
    assert f"connect deny: [{INCIDENTS}] port 25 rule=incidents country=-- incidents=42" in log
    assert f"connect defer: [{SUBMIT_SE}] port 587 rule=submission country=SE" in log
    assert f"[{CLEAN}]" not in log


def test_connect_without_address_and_bad_requests(start_lookupd: StartLookupd, lab: ConnectLab,
                                                  tmp_path: Path) -> None:
    daemon = start_lookupd(lookupd_config(lab.resolver_port, tmp_path))
    assert fields(daemon.query("connect"))["action"] == "accept"
    assert daemon.query("connect mail.example.com 25") == \
        'error not an IP address: "mail.example.com"'


def test_connect_answers_within_its_deadline_when_dns_hangs(start_lookupd: StartLookupd,
                                                            tmp_path: Path) -> None:
    """Every DNS question goes to a server that never answers; the DNSBL source's own deadline
    is longer than connect's: the answer still comes at connect's deadline, with what the
    memory sources know, and the unknown DNS facts refuse nobody."""
    silent = SilentServer()
    try:
        daemon = start_lookupd(lookupd_config(silent.port, tmp_path, dnsbl_deadline="10s",
                                              connect_deadline="400ms"))
        for ip, action in ((INCIDENTS, "deny"), (CLEAN, "accept"), (LISTED, "accept")):
            started = time.monotonic()
            got = fields(daemon.query(f"connect {ip} 25"))
            took = time.monotonic() - started
            assert 0.35 < took < 5, took  # connect's deadline, not the DNSBL one (10s)
            assert (got["action"], got["dnsbl"], got["ptr"], got["fcrdns"]) == \
                (action, "unknown", "??", "unknown")
        # A second request for the same client waits no longer than the first.
        started = time.monotonic()
        daemon.query(f"connect {CLEAN} 25")
        assert time.monotonic() - started < 5
    finally:
        silent.stop()


def test_allowlist_change_is_picked_up_while_running(start_lookupd: StartLookupd,
                                                     lab: ConnectLab, tmp_path: Path) -> None:
    daemon = start_lookupd(lookupd_config(lab.resolver_port, tmp_path))
    assert fields(daemon.query(f"connect {INCIDENTS} 25"))["action"] == "deny"
    allow = tmp_path / "whitelist_connect_hosts"
    allow.write_text(f"{ALLOWED}\n203.0.113.0/29\n")
    deadline = time.monotonic() + 5
    while fields(daemon.query(f"connect {INCIDENTS} 25"))["action"] != "accept":
        assert time.monotonic() < deadline, "the new allowlist entry was not picked up"
        time.sleep(0.2)
    assert "whitelist_connect_hosts reloaded: 2 entries" in daemon.log()


# --- answered at once when every DNS answer is cached -------------------------------------------

# A domain list for `dbl` (bl.test is an IP set: every name is simply not listed there).
DOMAIN_LIST = """
[[dnsbl.list]]
zone = "bl.test"
name = "domains"
kind = "domain"
query_special = true   # asked about names under .example too
"""
PEER = Peer("unix")


@pytest.fixture
async def dispatcher(lab: ConnectLab, tmp_path: Path) -> AsyncIterator[Dispatcher]:
    """The daemon's own dispatch on the lab's sources, in this process."""
    path = tmp_path / "lookupd.toml"
    path.write_text(lookupd_config(lab.resolver_port, tmp_path, extra=DOMAIN_LIST))
    sources = Sources.from_config(load_config(
        path, overrides={"server.state_dir": str(tmp_path / "state")}))
    await sources.open()
    try:
        yield Dispatcher(sources)
    finally:
        await sources.close()


async def test_warm_requests_are_answered_inline_with_the_same_reply(
        dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture) -> None:
    """The first request of each kind needs DNS (a coroutine: the server makes a task); the
    same request again finds every answer cached and gets the same reply as a plain str,
    with the same log line."""
    caplog.set_level(logging.INFO, logger="lookupd.connect")
    requests = [Request("connect", (LISTED, "25")), Request("connect", (CLEAN, "25")),
                Request("connect", (PTR_OK, "25", "helo.example")),
                Request("connect", (INCIDENTS, "25")), Request("connect", (ALLOWED, "25")),
                Request("dnsbl", ("192.0.2.21",)), Request("ptr", ("192.0.2.7",)),
                Request("dbl", ("spam.example",))]
    cold: list[str] = []
    for request in requests:
        pending = dispatcher.handle(request, PEER)
        assert not isinstance(pending, str), request
        cold.append(await pending)
    assert fields(cold[0])["dnsbl"] == "listed" and fields(cold[2])["fcrdns"] == "yes"
    assert cold[5].startswith("verdict=listed score=1 lists=bl.test:127.0.0.2 ")
    assert cold[6] == "name=mail7.example.test fcrdns=yes"
    assert cold[7] == 'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
    warm = [dispatcher.handle(request, PEER) for request in requests]
    assert warm == cold
    denies = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connect ")]
    assert len(denies) == 4  # LISTED and INCIDENTS, cold and warm: the same line
    assert denies[0] == denies[2] and denies[1] == denies[3]
    assert denies[0].startswith(f"connect deny: [{LISTED}] port 25 rule=dnsbl ")


def figures(stats: ListStats) -> tuple[int, int, int]:
    """queries, cache hits, hits"""
    return stats.queries, round(stats.cache_hit_rate * stats.queries), stats.hits


async def test_connect_asks_dns_only_for_what_is_not_cached(dispatcher: Dispatcher) -> None:
    """DNSBL cached, PTR not: no answer at once and nothing counted for it; the DNS path
    takes the DNSBL answer from the cache (counted once) and asks only for the PTR."""
    dnsbl, checker = dispatcher.sources.dnsbl, dispatcher.connect_checker
    request = parse_args(("192.0.2.21", "25"))  # listed in bl.test, no PTR
    assert checker.answer_now(request) is None
    await dnsbl.check_ip("192.0.2.21")
    bl, _, ptr = dnsbl.stats().lists
    assert checker.answer_now(request) is None
    assert dnsbl.stats().lists == (bl, _, ptr)
    reply = await checker.answer(request)
    assert (fields(reply)["action"], fields(reply)["ptr"]) == ("deny", '""')
    bl2, _, ptr2 = dnsbl.stats().lists
    assert figures(bl2) == (bl.queries + 1, figures(bl)[1] + 1, bl.hits + 1)
    assert figures(ptr2) == (ptr.queries + 1, figures(ptr)[1], ptr.hits)  # asked DNS
    assert checker.answer_now(request) == reply
    bl3, _, ptr3 = dnsbl.stats().lists
    assert figures(bl3) == (bl.queries + 2, figures(bl)[1] + 2, bl.hits + 2)
    assert figures(ptr3) == (ptr.queries + 2, figures(ptr)[1] + 1, ptr.hits)



async def test_warm_answers_kept_beside_the_cache_still_count_and_log(
        dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture) -> None:
    """Warm answers reuse what was decided from the same cached answers (issue 15): every
    request still gets the same reply, its deny line and its count in the lists' figures."""
    caplog.set_level(logging.INFO, logger="lookupd.connect")
    dnsbl = dispatcher.sources.dnsbl
    connect, check = Request("connect", (LISTED, "25")), Request("dnsbl", (LISTED,))
    replies = []
    for request in (connect, check):
        pending = dispatcher.handle(request, PEER)
        replies.append(pending if isinstance(pending, str) else await pending)
    bl, _, ptr = dnsbl.stats().lists
    for _ in range(3):
        assert [dispatcher.handle(connect, PEER), dispatcher.handle(check, PEER)] == replies
    bl2, _, ptr2 = dnsbl.stats().lists
    assert figures(bl2) == (bl.queries + 6, figures(bl)[1] + 6, bl.hits + 6)
    assert (ptr2.queries, figures(ptr2)[1]) == (ptr.queries + 3, figures(ptr)[1] + 3)
    denies = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connect ")]
    assert len(denies) == 4 and len(set(denies)) == 1


async def _open_dispatcher(resolver_port: int, tmp_path: Path, text: str = "",
                           ) -> tuple[Sources, Dispatcher]:
    path = tmp_path / "lookupd.toml"
    path.write_text(text or lookupd_config(resolver_port, tmp_path))
    sources = Sources.from_config(load_config(
        path, overrides={"server.state_dir": str(tmp_path / "state")}))
    await sources.open()
    return sources, Dispatcher(sources)


def _inline(dispatcher: Dispatcher, *words: str) -> dict[str, str]:
    """A connect answered at once (from the caches), as key=value pairs."""
    reply = dispatcher.handle(Request("connect", words), PEER)
    assert isinstance(reply, str), words
    return fields(reply)


async def _warm(dispatcher: Dispatcher, *words: str) -> dict[str, str]:
    """Ask until the reply is kept and reused (DNS, then the caches, then the reply cache)."""
    replies = []
    for _ in range(3):
        pending = dispatcher.handle(Request("connect", words), PEER)
        replies.append(pending if isinstance(pending, str) else await pending)
    assert replies[1] == replies[2]
    return fields(replies[2])


async def test_a_warm_connect_follows_strikes_and_the_firewall_database(
        lab: ConnectLab, tmp_path: Path) -> None:
    """A connect reused from the reply cache is never staler than its sources: a strike
    counts in the very next reply, and so does a change the firewall writes, as soon as
    lookupd has read it."""
    db = tmp_path / "firewall.db"
    shutil.copyfile(FIREWALL / "nftfw-firewall.db", db)
    past = time.time() - 10
    os.utime(db, (past, past))
    text = lookupd_config(lab.resolver_port, tmp_path, extra="strikes_threshold = 1\n")
    text = text.replace(f'db = "{FIREWALL / "nftfw-firewall.db"}"',
                        f'db = "{db}"\ncheck_interval = "50ms"')
    sources, dispatcher = await _open_dispatcher(lab.resolver_port, tmp_path, text)
    try:
        assert (await _warm(dispatcher, CLEAN, "25"))["strikes"] == "0"
        for count in ("1", "2"):
            pending = dispatcher.handle(Request("strike", (CLEAN, "auth")), PEER)
            assert not isinstance(pending, str) and await pending == f"strikes={count}"
            after = _inline(dispatcher, CLEAN, "25")
            assert after["strikes"] == count
        assert (after["action"], after["rule"]) == ("deny", "strikes")

        denied = await _warm(dispatcher, INCIDENTS, "25")
        assert (denied["action"], denied["incidents"]) == ("deny", "42")
        with closing(sqlite3.connect(db)) as con, con:  # closed: Python 3.13 warns
            con.execute("UPDATE blacklist SET matchcount = 5 WHERE ip = ?", (INCIDENTS,))
        deadline = time.monotonic() + 5
        while sources.incidents.count(parse_ip(INCIDENTS)).count != 5:
            assert time.monotonic() < deadline, "the firewall's change was not read"
            await asyncio.sleep(0.02)
        accepted = _inline(dispatcher, INCIDENTS, "25")
        assert (accepted["action"], accepted["incidents"]) == ("accept", "5")
    finally:
        await sources.close()


async def test_a_warm_connect_follows_the_lists_health(tmp_path: Path) -> None:
    """A list that starts listing its must-not-list test point is out of service at the
    next probe round: the very next connect and dnsbl replies, reused until then, no longer
    count it; back in service, it counts again."""
    for tool in ("knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with connect_lab(tmp_path / "lab") as own:
        sources, dispatcher = await _open_dispatcher(own.resolver_port, tmp_path)
        zone = own.rbldnsd.zone_file("connect-bl.zone")

        async def serve(text: str, test_point_listed: bool) -> None:
            zone.write_text(text)
            own.rbldnsd.reload()
            deadline = time.monotonic() + 5
            while bool(ask(own.rbldnsd.port, "1.0.0.127.bl.test").answer) != test_point_listed:
                assert time.monotonic() < deadline, "rbldnsd did not reload the zone"
                await asyncio.sleep(0.02)
            await sources.dnsbl.probe()

        def dnsbl() -> str:
            reply = dispatcher.handle(Request("dnsbl", (LISTED,)), PEER)
            assert isinstance(reply, str)  # from the cache: reused, or decided again
            return reply

        try:
            listed = await _warm(dispatcher, LISTED, "25")
            assert (listed["action"], listed["dnsbl"]) == ("deny", "listed")
            check = dnsbl()
            assert check.startswith("verdict=listed score=1 ") and dnsbl() == check
            await serve(BL_ZONE + "127.0.0.1\n", True)
            assert sources.dnsbl.stats().lists[0].quarantine == "lists-everything"
            out = _inline(dispatcher, LISTED, "25")
            assert (out["action"], out["dnsbl"], out["dnsbl_lists"]) == ("accept", "clean", '""')
            assert dnsbl() == 'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
            await serve(BL_ZONE, False)
            assert sources.dnsbl.stats().lists[0].quarantine == ""
            assert _inline(dispatcher, LISTED, "25") == listed
            assert dnsbl() == check
        finally:
            await sources.close()


# --- the compiled front end (lookupd/fastpath.py) ------------------------------------------


def _metric(daemon: Lookupd, name: str, **labels: str) -> float:
    """One sample of `metrics` (0 when absent), its labels in any order."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in daemon.query("metrics").splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, rest = sample.partition("{")
        if metric == name and sorted(rest.rstrip("}").split(",") if rest else []) == want:
            return float(value)
    return 0.0


def _queries(daemon: Lookupd, zone: str) -> int:
    figures = fields(daemon.query("stats"))[zone]
    return int(dict(f.split(":", 1) for f in figures.split(","))["queries"])


@pytest.mark.parametrize("front_end", ["compiled", "python"])
def test_repeated_lookups_get_the_same_answers_counted_and_logged_as_new_ones(
        start_lookupd: StartLookupd, lab: ConnectLab, tmp_path: Path, front_end: str) -> None:
    """Each request asked 11 times: the same reply every time; every one counted in the
    metrics (requests, connect verdicts) and the lists' figures, and every refusal logged,
    whether the compiled front end gave it again (lookupd_requests_kept says how many) or
    Python did (LOOKUPD_NO_FASTPATH set: none kept)."""
    env = {} if front_end == "compiled" else {"LOOKUPD_NO_FASTPATH": "1"}
    daemon = start_lookupd(lookupd_config(lab.resolver_port, tmp_path), env=env)
    requests = {"ping": "ping", "country": f"country {CLEAN}", "dnsbl": f"dnsbl {LISTED}",
                "connect": f"connect {CLEAN} 25", "deny": f"connect {INCIDENTS} 25"}
    first = {name: daemon.query(text) for name, text in requests.items()}  # DNS asked here
    asked = {verb: _metric(daemon, "lookupd_requests_total", verb=verb, outcome="ok")
             for verb in ("ping", "country", "dnsbl", "connect")}
    accepted = _metric(daemon, "lookupd_connect_verdicts_total", action="accept", rule="none",
                       would="none")
    listed_before = _queries(daemon, "bl.test")
    for _ in range(10):
        for name, text in requests.items():
            assert daemon.query(text) == first[name], name
    assert first["dnsbl"].startswith("verdict=listed ")
    assert fields(first["connect"])["action"] == "accept"
    assert fields(first["deny"])["action"] == "deny"
    for verb, n in (("ping", 10), ("country", 10), ("dnsbl", 10), ("connect", 20)):
        got = _metric(daemon, "lookupd_requests_total", verb=verb, outcome="ok")
        assert got - asked[verb] == n, verb
    assert _metric(daemon, "lookupd_connect_verdicts_total", action="accept", rule="none",
                   would="none") - accepted == 10
    assert _queries(daemon, "bl.test") - listed_before == 30  # dnsbl, and both connects
    assert daemon.log().count(f"connect deny: [{INCIDENTS}] port 25") == 11
    kept = {verb: _metric(daemon, "lookupd_requests_kept_total", verb=verb)
            for verb in ("ping", "country", "dnsbl", "connect")}
    if front_end == "compiled":
        assert "repeated lookups answered by the compiled front end" in daemon.log()
        # The accepted connect is given again; a refusal never is (its line is logged), or
        # connect's could reach 19. The first dnsbl and connect went to DNS: the second, from
        # the DNS cache, is Python's, which keeps it for the other nine. Python also answers
        # a client whose request was not there yet when it was accepted (on a loaded machine
        # the client may not have run its write yet: 16 of 38 in one run), and the
        # next one after any change in the DNS cache empties the table. So at least one each.
        most = {"ping": 10, "country": 10, "dnsbl": 9, "connect": 9}
        assert all(1 <= kept[verb] <= most[verb] for verb in most), kept
    else:
        assert "compiled front end switched off (LOOKUPD_NO_FASTPATH is set)" in daemon.log()
        assert kept == {"ping": 0, "country": 0, "dnsbl": 0, "connect": 0}, kept


def test_a_kept_reply_ends_with_the_dns_answer_it_came_from(start_lookupd: StartLookupd,
                                                             tmp_path: Path) -> None:
    """A listing with a TTL of 2s, then delisted at the list: the compiled front end gives
    the kept `listed` until the answer expires, then lookupd asks again and says clean."""
    zones = tmp_path / "zones"
    zones.mkdir()
    zone = BL_ZONE.replace("$TTL 120", "$TTL 2")
    (zones / "short.zone").write_text(zone)
    rbl = Rbldnsd(tmp_path / "rbldnsd", zones=(("bl.test", "ip4set", "short.zone"),),
                  source_dir=zones).start()
    try:
        daemon = start_lookupd(f"""
[dnsbl]
nameservers = ["127.0.0.1:{rbl.port}"]
min_ttl = "1s"
[[dnsbl.list]]
zone = "bl.test"
families = ["ipv4"]
query_special = true
""")
        # Asked until the compiled front end gives it again (the first probe round, which
        # changes the list's standing, empties the table once).
        deadline = time.monotonic() + 10
        while _metric(daemon, "lookupd_requests_kept_total", verb="dnsbl") < 2:
            assert daemon.query(f"dnsbl {LISTED}").startswith("verdict=listed ")
            assert time.monotonic() < deadline, "the compiled front end never answered"
        rbl.zone_file("short.zone").write_text(zone.replace(f"{LISTED}\n", ""))
        rbl.reload()
        deadline = time.monotonic() + 10
        while daemon.query(f"dnsbl {LISTED}").startswith("verdict=listed "):
            assert time.monotonic() < deadline, "the kept reply outlived its DNS answer"
            time.sleep(0.05)
        assert daemon.query(f"dnsbl {LISTED}").startswith("verdict=clean ")
    finally:
        rbl.stop()
