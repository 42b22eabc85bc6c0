"""What lookupd asks of which list, and how it reads the answers, against real servers: zones
of this module's own in rbldnsd, reverse DNS in knot, both behind dnsmasq (tests/dnsservers.py).

- Allow lists: postscreen's filters with ranges in every octet, and a list's own error
  answers (DNSWL's 127.0.0.255, built in; `error_codes`), never taken as an allow-list hit.

The public addresses here (81.2.69.160-169, from the MaxMind test data's network) are only
ever asked of the local rbldnsd: dnsmasq forwards nothing off loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Dnsmasq, Knot, Rbldnsd

pytestmark = pytest.mark.skipif(not Path(RBLDNSD).exists(), reason="rbldnsd is not installed")

SOA = "$SOA 60 ns.{0}. hostmaster.{0}. 1 600 60 3600 45\n$NS 60 ns.{0}.\n$TTL 120\n"
ZONES: dict[str, tuple[str, str, str]] = {
    # file: (zone, rbldnsd dataset, text)
    "block.zone": ("block.lists.test", "ip4set", SOA.format("block.lists.test") + """\
:127.0.0.2:Blocked, see https://block.lists.test/?$
127.0.0.2
# listed here, and on the allow lists below
81.2.69.160
81.2.69.161
81.2.69.162
81.2.69.163
81.2.69.164
"""),
    # dnswl.org's list as lookupd sees it: 127.0.CATEGORY.TRUST, and 127.0.0.255 for a
    # resolver it blocks (here answered for one client only, so the list stays healthy).
    "dnswl.zone": ("list.dnswl.org", "ip4set", SOA.format("list.dnswl.org") + """\
127.0.0.2 :127.0.10.1:test point
81.2.69.160 :127.0.0.255:Blocked or over the limit
81.2.69.161 :127.0.10.2:Trust medium
81.2.69.162 :127.0.10.0:Trust none
"""),
    # Another allow list, with an error answer of its own set in error_codes.
    "wl.zone": ("wl.lists.test", "ip4set", SOA.format("wl.lists.test") + """\
127.0.0.2 :127.0.5.3:test point
81.2.69.163 :127.0.0.254:Not for you
81.2.69.164 :127.0.5.3:Trusted
"""),
}


@dataclass
class ListsLab:
    rbldnsd: Rbldnsd
    knot: Knot
    dnsmasq: Dnsmasq

    @property
    def resolver_port(self) -> int:
        return self.dnsmasq.port

    def asked(self, zone: str) -> list[str]:
        """The names rbldnsd was asked under `zone` (without the zone), in order."""
        suffix = "." + zone
        return [line.split()[2].lower().rstrip(".").removesuffix(suffix)
                for line in self.rbldnsd.queries()
                if line.split()[2].lower().rstrip(".").endswith(suffix)]


@contextmanager
def lists_lab(workdir: Path) -> Iterator[ListsLab]:
    zones = workdir / "zones"
    zones.mkdir(parents=True)
    for name, (_, _, text) in ZONES.items():
        (zones / name).write_text(text)
    with ExitStack() as stack:
        rbl = Rbldnsd(workdir / "rbldnsd", zones=tuple((zone, kind, name) for name, (
            zone, kind, _) in ZONES.items()), source_dir=zones)
        stack.callback(rbl.stop)
        rbl.start()
        knot = Knot(workdir / "knot", broken=())
        stack.callback(knot.stop)
        knot.start()
        routes = {zone: rbl.port for zone, _, _ in ZONES.values()}
        routes |= {zone: knot.port for zone in knot.zones}
        forwarder = Dnsmasq(workdir / "dnsmasq", routes)
        stack.callback(forwarder.stop)
        forwarder.start()
        yield ListsLab(rbl, knot, forwarder)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListsLab]:
    for tool in ("knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with lists_lab(tmp_path_factory.mktemp("lists-lab")) as running:
        yield running


def config(lab: ListsLab, lists: str) -> str:
    return f"""
[server]
socket_group = "Debian-exim"   # exim -bh runs as Debian-exim, as the real daemon does
[dnsbl]
nameservers = ["127.0.0.1:{lab.resolver_port}"]
deadline = "1s"
{lists}"""


def fields(reply: str) -> dict[str, str]:
    """key=value pairs of a reply (values without spaces only: for the simple keys)."""
    return dict(pair.split("=", 1) for pair in reply.split() if "=" in pair)


# --- allow lists: postscreen filters, and their own error answers ------------------------------

BLOCK = """
[[dnsbl.list]]
zone = "block.lists.test"
codes = ["127.0.0.[2..11]"]
"""


@pytest.mark.parametrize("dnswl_codes", [
    # postscreen's usual filter for DNSWL: trust 1 to 3, any category.
    '["127.0.[0..255].[1..3]"]',
    # A loose filter, which once counted the "blocked" answer 127.0.0.255 as an allow hit.
    '["127.0.[0..255].[0..255]"]',
    "[]",
])
def test_dnswl_blocked_answer_is_never_an_allow_hit(start_lookupd: StartLookupd,
                                                    lab: ListsLab, dnswl_codes: str) -> None:
    daemon = start_lookupd(config(lab, BLOCK + f"""
[[dnsbl.list]]
zone = "list.dnswl.org"
codes = {dnswl_codes}
weight = -1
families = ["ipv4"]
"""))
    # Blocked by DNSWL: its say is unknown, and it could have tipped the verdict.
    blocked = daemon.query("dnsbl 81.2.69.160")
    assert blocked.startswith("verdict=unknown score=1 lists=block.lists.test:127.0.0.2 "
                              "unknown=list.dnswl.org:error-code-127.0.0.255 "), blocked
    assert "dnswl.org answers this to resolvers it blocks" in daemon.log()
    # Trust 2: allowed, whatever the block list says.
    allowed = daemon.query("dnsbl 81.2.69.161")
    assert allowed.startswith("verdict=clean score=0 lists=block.lists.test:127.0.0.2,"
                              'list.dnswl.org:127.0.10.2 unknown="" '), allowed
    # Trust 0 counts only under a filter that takes it.
    none = fields(daemon.query("dnsbl 81.2.69.162"))
    if dnswl_codes.startswith('["127.0.[0..255].[1..3]'):
        assert (none["verdict"], none["score"]) == ("listed", "1")
    else:
        assert (none["verdict"], none["score"]) == ("clean", "0")


def test_a_lists_error_codes_are_its_own(start_lookupd: StartLookupd, lab: ListsLab) -> None:
    lists = BLOCK + """
[[dnsbl.list]]
zone = "wl.lists.test"
codes = ["127.0.[0..255].[1..3]"]
weight = -1
families = ["ipv4"]
"""
    plain = start_lookupd(config(lab, lists))
    # Without error_codes, 127.0.0.254 has trust "254": not in the filter, not an allow hit.
    assert fields(plain.query("dnsbl 81.2.69.163"))["verdict"] == "listed"
    own = start_lookupd(config(lab, lists + 'error_codes = ["127.0.0.254"]\n'))
    assert own.query("dnsbl 81.2.69.163").startswith(
        "verdict=unknown score=1 lists=block.lists.test:127.0.0.2 "
        "unknown=wl.lists.test:error-code-127.0.0.254 ")
    assert "one of the list's own error answers (error_codes)" in own.log()
    assert fields(own.query("dnsbl 81.2.69.164"))["verdict"] == "clean"
