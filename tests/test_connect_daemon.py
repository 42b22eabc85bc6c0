"""`connect` answered by a real lookupd from real sources: the GeoIP and nftfw test data, a DNSBL
zone in rbldnsd, reverse DNS in knot, both behind dnsmasq; and a DNS server that never answers.

The lab and the lookupd configuration here are also used by test_snippets.py and
test_fail2ban.py.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Dnsmasq, Knot, Rbldnsd, SilentServer
from support import FIREWALL, MAXMIND

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
        "ptr": "??", "fcrdns": "unknown", "allowlisted": "no"}
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
            assert 0.35 < took < 1.5, took
            assert (got["action"], got["dnsbl"], got["ptr"], got["fcrdns"]) == \
                (action, "unknown", "??", "unknown")
        # A second request for the same client waits no longer than the first.
        started = time.monotonic()
        daemon.query(f"connect {CLEAN} 25")
        assert time.monotonic() - started < 1.5
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
