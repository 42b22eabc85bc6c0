"""What lookupd asks of which list, and how it reads the answers, against real servers: zones
of this module's own in rbldnsd, reverse DNS in knot, both behind dnsmasq (tests/dnsservers.py).

- Special-use addresses (private, loopback, link-local, documentation, ..., and their
  IPv4-mapped forms) are never sent to a list, unless it is an internal one that asks for
  them (`query_special`); their reverse DNS is still asked of the local resolver.
- Allow lists: postscreen's filters with ranges in every octet, and a list's own error
  answers (DNSWL's 127.0.0.255, built in; `error_codes`), never taken as an allow-list hit.
- Domain lists for names a client gives: `dbl`, `sender` for the MAIL ACL (a bounce, an
  address literal, a numeric TLD: clean, never asked), and the HELO name of `connect`
  (`helo_dbl=`, the `helo_dbl` rule); special-use names are not asked either. The README's
  HELO and MAIL ACLs, run by a real Exim (-bh) against a real lookupd.

The public addresses here (81.2.69.160-169, from the MaxMind test data's network) are only
ever asked of the local rbldnsd: dnsmasq forwards nothing off loopback.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Dnsmasq, Knot, Rbldnsd, SilentServer
from support import EXIM, EXIM_BASE, REPO, Exim, Lookupd

from lookupd.config import load_config
from lookupd.dispatch import Dispatcher
from lookupd.dnsbl.names import reverse_ip
from lookupd.protocol import Peer, Request
from lookupd.sources import Sources

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
81.2.69.165
# Special-use addresses: listed, so that a question about one would come back "listed".
# lookupd must never ask.
0.1.2.3
10.1.2.3
100.64.1.1
127.0.0.5
169.254.1.1
172.16.0.9
192.0.0.8
192.0.2.55
192.168.1.5
198.18.0.1
198.51.100.55
203.0.113.55
224.1.1.1
240.1.1.1
255.255.255.255
"""),
    "block6.zone": ("block.lists.test", "ip6trie", """\
:127.0.0.2:Blocked, see https://block.lists.test/?$
::ffff:7f00:2
2001:218::25
::1
fe80::1
fd00::25
fec0::1
ff02::1
64:ff9b:1::1
100::1
2001:2::1
2001:db8::55
3fff::1
"""),
    # An internal list: it lists the LAN, and says so (query_special).
    "internal.zone": ("internal.lists.test", "ip4set", SOA.format("internal.lists.test") + """\
:127.0.0.3:Internal: $
127.0.0.2
10.1.2.3
192.168.1.5
"""),
    "internal6.zone": ("internal.lists.test", "ip6trie", """\
:127.0.0.3:Internal: $
::ffff:7f00:2
fd00::25
"""),
    # A DBL-like domain list for HELO names and sender domains.
    "dbl.zone": ("dbl.lists.test", "dnset", SOA.format("dbl.lists.test") + """\
:127.0.1.2:Spam domain $
test
spam-helo.net
spam-sender.net
.spam-sender.net
# Names no list may be asked about, listed so that a question would come back "listed".
laptop.local
spam.example
localhost.test
host.123
192.0.2.1
"""),
    # An internal domain list: it lists the LAN's names, and says so (query_special).
    "corpdbl.zone": ("corpdbl.lists.test", "dnset", SOA.format("corpdbl.lists.test") + """\
:127.0.1.3:Internal name $
test
laptop.local
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

# Reverse DNS of the LAN, served by the local resolver (as RFC 6303 has resolvers do).
KNOT_ZONES = {
    "168.192.in-addr.arpa": """
$TTL 300
@ SOA ns.corp.lists.test. hostmaster.corp.lists.test. 1 600 60 3600 60
@ NS ns.corp.lists.test.
5.1 PTR mail.corp.lists.test.
""",
    "corp.lists.test": """
$TTL 300
@ SOA ns.corp.lists.test. hostmaster.corp.lists.test. 1 600 60 3600 60
@ NS ns.corp.lists.test.
ns A 127.0.0.1
mail A 192.168.1.5
""",
}


@dataclass
class ListsLab:
    """`resolver_port` is dnsmasq: the zones above to rbldnsd, KNOT_ZONES to knot, and
    silent.lists.test to a server that never answers."""

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
        knot = Knot(workdir / "knot", zones=dict(KNOT_ZONES), broken=())
        stack.callback(knot.stop)
        knot.start()
        silent = SilentServer()
        stack.callback(silent.stop)
        routes = {zone: rbl.port for zone, _, _ in ZONES.values()}
        routes |= {zone: knot.port for zone in knot.zones}
        routes["silent.lists.test"] = silent.port
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


# --- special-use addresses ----------------------------------------------------------------------

# (address as Exim may give it, the `skipped=` word)
SPECIAL = [
    ("0.1.2.3", "this-network"), ("10.1.2.3", "private"), ("100.64.1.1", "shared"),
    ("127.0.0.5", "loopback"), ("169.254.1.1", "link-local"), ("172.16.0.9", "private"),
    ("192.0.0.8", "ietf-protocol"), ("192.0.2.55", "documentation"),
    ("192.168.1.5", "private"), ("198.18.0.1", "benchmarking"),
    ("198.51.100.55", "documentation"), ("203.0.113.55", "documentation"),
    ("224.1.1.1", "multicast"), ("240.1.1.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::1", "loopback"), ("fe80::1", "link-local"), ("fd00::25", "private"),
    ("fec0::1", "site-local"), ("ff02::1", "multicast"), ("64:ff9b:1::1", "private"),
    ("100::1", "discard-only"), ("2001:2::1", "benchmarking"),
    ("2001:db8::55", "documentation"), ("3fff::1", "documentation"),
    # IPv4-mapped IPv6, as a dual-stack listener hands IPv4 clients over.
    ("::ffff:10.1.2.3", "private"), ("::ffff:192.168.1.5", "private"),
    ("::ffff:127.0.0.5", "loopback"), ("0:0:0:0:0:ffff:a9fe:101", "link-local"),
]


def label(ip: str) -> str:
    """The name a list is asked for an address (reversed octets or nibbles)."""
    return reverse_ip(ip_address(ip))


TEST_POINTS = {label(ip) for ip in ("127.0.0.2", "127.0.0.1", "::ffff:7f00:2", "::ffff:7f00:1")}
INTERNAL = """
[[dnsbl.list]]
zone = "internal.lists.test"
query_special = true   # it lists the LAN
"""


def test_special_use_addresses_are_never_sent_to_a_list(start_lookupd: StartLookupd,
                                                       lab: ListsLab) -> None:
    daemon = start_lookupd(config(lab, BLOCK))
    seen = len(lab.asked("block.lists.test"))
    for ip, word in SPECIAL:
        assert daemon.query(f"dnsbl {ip}") == \
            f'verdict=clean score=0 lists="" unknown="" text="" skipped={word}', ip
        got = fields(daemon.query(f"connect {ip} 25"))
        assert (got["action"], got["dnsbl"], got["dnsbl_lists"]) == ("accept", "clean", '""')
    # The list works, and is asked about Internet addresses of both families.
    assert daemon.query("dnsbl 81.2.69.165").startswith(
        "verdict=listed score=1 lists=block.lists.test:127.0.0.2 ")
    assert daemon.query("dnsbl ::ffff:81.2.69.165").startswith("verdict=listed ")
    v6 = daemon.query("dnsbl 2001:218::25")
    assert v6.startswith("verdict=listed ") and v6.endswith(' skipped=""')
    # rbldnsd heard of none of the special addresses: only test points and those clients.
    asked = set(lab.asked("block.lists.test")[seen:])
    assert asked - TEST_POINTS == {label("81.2.69.165"), label("2001:218::25")}


def test_an_internal_list_is_asked_about_special_addresses(start_lookupd: StartLookupd,
                                                          lab: ListsLab) -> None:
    daemon = start_lookupd(config(lab, BLOCK + INTERNAL))
    seen = len(lab.asked("block.lists.test"))
    lan = daemon.query("dnsbl 10.1.2.3")
    # Listed by the internal list; the other one was left out, and the reply says why.
    assert lan == ('verdict=listed score=1 lists=internal.lists.test:127.0.0.3 unknown="" '
                   'text="internal.lists.test: Internal: 10.1.2.3" skipped=private')
    assert daemon.query("dnsbl ::ffff:192.168.1.5").startswith(
        "verdict=listed score=1 lists=internal.lists.test:127.0.0.3 ")
    assert daemon.query("dnsbl fd00::25").startswith(
        "verdict=listed score=1 lists=internal.lists.test:127.0.0.3 ")
    assert daemon.query("dnsbl 192.0.2.55") == \
        'verdict=clean score=0 lists="" unknown="" text="" skipped=documentation'
    assert fields(daemon.query("connect 10.1.2.3 25"))["dnsbl"] == "listed"
    # An Internet address: both are asked, nothing is left out.
    assert daemon.query("dnsbl 81.2.69.165").endswith(' skipped=""')
    assert set(lab.asked("block.lists.test")[seen:]) - TEST_POINTS <= {label("81.2.69.165")}
    assert label("10.1.2.3") in lab.asked("internal.lists.test")
    # Only internal lists: nothing is left out.
    alone = start_lookupd(config(lab, INTERNAL))
    assert alone.query("dnsbl 10.1.2.3").endswith(" skipped=\"\"")


def test_reverse_dns_of_a_private_address_is_asked_of_the_local_resolver(
        start_lookupd: StartLookupd, lab: ListsLab) -> None:
    """PTR questions go to lookupd's own resolver, never to a list operator; a LAN's reverse
    zone lives there (RFC 6303 has resolvers answer the private ones locally)."""
    daemon = start_lookupd(config(lab, BLOCK))
    assert daemon.query("ptr 192.168.1.5") == "name=mail.corp.lists.test fcrdns=yes"
    assert lab.dnsmasq.queries("PTR", "5.1.168.192.in-addr.arpa")
    got = fields(daemon.query("connect ::ffff:192.168.1.5 25"))
    assert (got["dnsbl"], got["ptr"], got["fcrdns"]) == ("clean", "mail.corp.lists.test", "yes")


# --- domain lists: dbl and sender ----------------------------------------------------------------

DBL = """
[[dnsbl.list]]
zone = "dbl.lists.test"
kind = "domain"
codes = ["127.0.1.[2..99]"]
"""
CORPDBL = """
[[dnsbl.list]]
zone = "corpdbl.lists.test"
kind = "domain"
query_special = true   # it lists the LAN's names
"""
CLEAN = 'verdict=clean score=0 lists="" unknown="" text="" skipped='


def test_sender_domains_are_checked_but_what_no_list_holds(start_lookupd: StartLookupd,
                                                          lab: ListsLab) -> None:
    daemon = start_lookupd(config(lab, BLOCK + DBL))
    seen = len(lab.asked("dbl.lists.test"))
    listed = ("verdict=listed score=1 lists=dbl.lists.test:127.0.1.2 unknown=\"\" "
              "text=\"dbl.lists.test: Spam domain {}\" skipped=\"\"")
    # $sender_address_domain, or the whole $sender_address: the domain after the last "@".
    for request, name in (("sender spam-sender.net", "spam-sender.net"),
                          # (rbldnsd's text names the entry that matched)
                          ("sender Alice@Mail.Spam-Sender.NET", "spam-sender.net"),
                          ('sender "a b"@spam-sender.net', "spam-sender.net"),
                          ("dbl spam-helo.net", "spam-helo.net")):
        assert daemon.query(request) == listed.format(name), request
    assert daemon.query("sender clean-sender.net") == CLEAN + '""'
    # The bounce's empty sender: nothing to check, clean.
    assert daemon.query("sender") == CLEAN + '""'
    assert daemon.query("sender <>") == CLEAN + '""'
    # Never asked of any list: no list holds them, or they are special-use names.
    for request, why in (("sender alice@[192.0.2.1]", "address-literal"),
                         ("sender 192.0.2.1", "numeric-tld"),
                         ("sender alice@host.123", "numeric-tld"),
                         ("sender localhost", "not-a-domain"),
                         ("sender alice@laptop.local", "special-use-name"),
                         ("sender spam.example", "special-use-name"),
                         ("dbl localhost.test", "special-use-name"),
                         ("dbl host.123", "numeric-tld")):
        assert daemon.query(request) == CLEAN + why, request
    assert daemon.query("dbl 192.0.2.1") == 'error not a domain name: "192.0.2.1"'
    asked = set(lab.asked("dbl.lists.test")[seen:]) - {"test", "invalid"}
    assert asked == {"spam-sender.net", "mail.spam-sender.net", "spam-helo.net",
                     "clean-sender.net"}
    # The IP lists are never asked about names.
    assert not [n for n in lab.asked("block.lists.test") if "spam" in n]


def test_an_internal_domain_list_is_asked_about_special_names(start_lookupd: StartLookupd,
                                                             lab: ListsLab) -> None:
    daemon = start_lookupd(config(lab, DBL + CORPDBL))
    seen = len(lab.asked("dbl.lists.test"))
    assert daemon.query("sender bob@laptop.local") == (
        "verdict=listed score=1 lists=corpdbl.lists.test:127.0.1.3 unknown=\"\" "
        "text=\"corpdbl.lists.test: Internal name laptop.local\" skipped=special-use-name")
    assert daemon.query("dbl spam-helo.net").endswith(' skipped=""')
    assert daemon.query("sender alice@host.123") == CLEAN + "numeric-tld"
    assert set(lab.asked("dbl.lists.test")[seen:]) - {"test", "invalid"} == {"spam-helo.net"}
    assert "laptop.local" in lab.asked("corpdbl.lists.test")
    assert "host.123" not in lab.asked("corpdbl.lists.test")


# --- the HELO name in connect ---------------------------------------------------------------------

def wait_out_of_service(daemon: Lookupd, name: str) -> None:
    """Until the list's probes have found it silent (stats: state:quarantined-...)."""
    deadline = time.monotonic() + 15
    while f"{name}=" not in (stats := daemon.query("stats")) or \
            "state:quarantined-not-answering" not in stats.split(f"{name}=", 1)[1].split()[0]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


SILENT_DBL = """
[[dnsbl.list]]
zone = "silent.lists.test"
kind = "domain"
"""


def test_connect_checks_the_helo_name(start_lookupd: StartLookupd, lab: ListsLab) -> None:
    daemon = start_lookupd(config(lab, BLOCK + DBL))
    seen = len(lab.asked("dbl.lists.test"))
    listed = daemon.query("connect 81.2.69.170 25 Spam-HELO.net")
    assert listed.startswith('action=deny rule=helo_dbl would=none reason="Rejected - HELO '
                             'name Spam-HELO.net is listed at dbl.lists.test" '), listed
    got = fields(listed)
    assert (got["dnsbl"], got["dnsbl_lists"], got["helo_dbl"]) == ("clean", '""', "listed")
    assert "connect deny: [81.2.69.170] port 25 helo Spam-HELO.net rule=helo_dbl " in \
        daemon.log()
    for helo in ("mail.clean-helo.net", "[81.2.69.170]", "[IPv6:2001:218::25]", "81.2.69.170",
                 "laptop.local", "localhost", "two words.net", ""):
        got = fields(daemon.query(f"connect 81.2.69.170 25 {helo}"))
        assert (got["action"], got["rule"], got["helo_dbl"]) == ("accept", "none", "clean"), helo
    # The address's lists decide first; dnsbl= keeps its meaning, helo_dbl= says the rest.
    both = fields(daemon.query("connect 81.2.69.165 25 spam-helo.net"))
    assert (both["action"], both["rule"], both["dnsbl"], both["helo_dbl"]) == \
        ("deny", "dnsbl", "listed", "listed")
    assert set(lab.asked("dbl.lists.test")[seen:]) - {"test", "invalid"} == \
        {"spam-helo.net", "mail.clean-helo.net"}


def test_a_lan_clients_helo_is_asked_only_of_internal_lists(start_lookupd: StartLookupd,
                                                            lab: ListsLab) -> None:
    """A client on a special-use address is inside the network: its HELO name is as
    internal as its address, and goes only where its address may go."""
    daemon = start_lookupd(config(lab, DBL + CORPDBL))
    seen = len(lab.asked("dbl.lists.test")), len(lab.asked("corpdbl.lists.test"))
    got = fields(daemon.query("connect 192.168.1.5 25 spam-helo.net"))
    assert (got["action"], got["helo_dbl"]) == ("accept", "clean")
    got = fields(daemon.query("connect ::ffff:10.1.2.3 25 laptop.local"))
    assert (got["action"], got["rule"], got["helo_dbl"]) == ("deny", "helo_dbl", "listed")
    assert set(lab.asked("dbl.lists.test")[seen[0]:]) - {"test", "invalid"} == set()
    assert {"spam-helo.net", "laptop.local"} <= set(lab.asked("corpdbl.lists.test")[seen[1]:])
    # From the Internet, the same name goes to every list.
    got = fields(daemon.query("connect 81.2.69.170 25 spam-helo.net"))
    assert (got["action"], got["helo_dbl"]) == ("deny", "listed")
    assert "spam-helo.net" in lab.asked("dbl.lists.test")[seen[0]:]


def test_helo_rule_settings_and_an_unknown_helo(start_lookupd: StartLookupd,
                                                lab: ListsLab) -> None:
    logged = start_lookupd(config(lab, BLOCK + DBL) + '[connect]\nlog_only = ["helo_dbl"]\n')
    got = fields(logged.query("connect 81.2.69.170 25 spam-helo.net"))
    assert (got["action"], got["rule"], got["would"], got["helo_dbl"]) == \
        ("accept", "helo_dbl", "deny", "listed")
    off = start_lookupd(config(lab, BLOCK + DBL) + "[connect]\ndeny_on_helo_dbl = false\n")
    got = fields(off.query("connect 81.2.69.170 25 spam-helo.net"))
    assert (got["action"], got["rule"], got["helo_dbl"]) == ("accept", "none", "listed")
    # A domain list that never answers goes out of service once its probes find it out: it
    # leaves the decision (issue 11 item 5), and refuses nobody...
    silent = start_lookupd(config(lab, BLOCK + SILENT_DBL).replace(
        'deadline = "1s"', 'deadline = "300ms"'))
    wait_out_of_service(silent, "silent.lists.test")
    got = fields(silent.query("connect 81.2.69.170 25 spam-helo.net"))
    assert (got["action"], got["rule"], got["helo_dbl"]) == ("accept", "none", "clean")
    # ...while a list that answers still decides (within the 1s deadline the silent one
    # runs out).
    both = start_lookupd(config(lab, BLOCK + DBL + SILENT_DBL))
    got = fields(both.query("connect 81.2.69.170 25 spam-helo.net"))
    assert (got["action"], got["rule"], got["helo_dbl"]) == ("deny", "helo_dbl", "listed")


@pytest.fixture
async def dispatcher(lab: ListsLab, tmp_path: Path) -> AsyncIterator[Dispatcher]:
    """The daemon's own dispatch on the lab's lists, in this process."""
    path = tmp_path / "lookupd.toml"
    path.write_text(config(lab, BLOCK + DBL))
    sources = Sources.from_config(load_config(
        path, overrides={"server.state_dir": str(tmp_path / "state")}))
    await sources.open()
    try:
        yield Dispatcher(sources)
    finally:
        await sources.close()


async def test_cached_helo_and_sender_answers_are_the_answers_through_dns(
        dispatcher: Dispatcher) -> None:
    """Asked again, the same HELO and sender are answered inline from the cache (a plain str,
    no task), with the same reply; what needs no list is answered at once even cold."""
    peer = Peer("unix")
    asked = [Request("connect", ("81.2.69.171", "25", "spam-helo.net")),
             Request("connect", ("81.2.69.171", "25", "ok-helo.net")),
             Request("sender", ("alice@spam-sender.net",)),
             Request("sender", ("bob@ok-sender.net",))]
    cold = []
    for request in asked:
        pending = dispatcher.handle(request, peer)
        assert not isinstance(pending, str), request
        cold.append(await pending)
    assert [fields(r).get("helo_dbl", fields(r).get("verdict")) for r in cold] == \
        ["listed", "clean", "listed", "clean"]
    assert [dispatcher.handle(request, peer) for request in asked] == cold
    for request in (Request("connect", ("81.2.69.171", "25", "[81.2.69.171]")),
                    Request("sender", ("bob@[192.0.2.1]",)), Request("sender", ())):
        assert isinstance(dispatcher.handle(request, peer), str), request


# --- the README's HELO and MAIL ACLs, in a real Exim ----------------------------------------------


def readme_exim_block(first_line: str) -> str:
    """The README's fenced Exim block that starts with `first_line`, as it is printed."""
    blocks = re.findall(r"^```\n(.*?)^```$", (REPO / "README.md").read_text(), re.S | re.M)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"one README block starting {first_line!r}"
    return found[0]


def smtp_replies(out: str) -> list[str]:
    """Exim's replies to the session's commands, one per command: "CODE text", the lines of
    a multi-line reply joined (Exim wraps long messages)."""
    replies: list[str] = []
    texts: list[str] = []
    for line in out.splitlines():
        if m := re.match(r"(\d{3})([- ])(.*)", line):
            texts.append(m.group(3))
            if m.group(2) == " ":
                replies.append(f"{m.group(1)} {' '.join(texts)}")
                texts = []
    return replies


@pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")
def test_the_readme_helo_and_mail_acls_in_exim(start_lookupd: StartLookupd, lab: ListsLab,
                                               sockdir: Path) -> None:
    acls = readme_exim_block("acl_smtp_helo = acl_check_helo")
    # At MAIL, -bh checks its spool as Debian-exim: a directory it can reach (tmp_path is 0700).
    # allow_domain_literals: so that Exim takes a sender at an address literal at all.
    workdir = sockdir / "exim"
    exim = Exim(workdir, EXIM_BASE.format(workdir=workdir) + "allow_domain_literals = true\n"
                + acls)

    def session(socket: Path, smtp: str) -> tuple[list[str], str]:
        """An SMTP session of client 81.2.69.170, the ACLs asking lookupd on `socket`."""
        exim.write(exim.config_text.replace("/run/lookupd/lookupd.sock", str(socket)))
        out, err = exim.bh("81.2.69.170", smtp)
        return smtp_replies(out), err

    daemon = start_lookupd(config(lab, BLOCK + DBL))
    seen = len(lab.asked("dbl.lists.test"))

    replies, _ = session(daemon.socket, "EHLO spam-helo.net\nQUIT\n")
    assert replies[1] == "550 Rejected - HELO name spam-helo.net is listed at dbl.lists.test"

    replies, _ = session(daemon.socket, "\n".join((
        "EHLO mail.clean-helo.net", "MAIL FROM:<alice@spam-sender.net>", "MAIL FROM:<>",
        "RSET", "MAIL FROM:<bob@[192.0.2.1]>", "RSET", "MAIL FROM:<carol@clean-sender.net>",
        "QUIT", "")))
    assert [r[:3] for r in replies] == ["220", "250", "550", "250", "250", "250", "250",
                                        "250", "221"], replies
    assert replies[2] == ("550 spam-sender.net is listed (dbl.lists.test:127.0.1.2): "
                          "dbl.lists.test: Spam domain spam-sender.net")

    for helo in ("[81.2.69.170]", "laptop.local"):
        replies, err = session(daemon.socket, f"EHLO {helo}\nQUIT\n")
        assert replies[1].startswith("250 ") and "domain lists" not in err, (helo, replies)
    # Only the names the lists could hold were asked.
    assert set(lab.asked("dbl.lists.test")[seen:]) - {"test", "invalid"} == \
        {"spam-helo.net", "mail.clean-helo.net", "spam-sender.net", "clean-sender.net"}

    # The only domain list is out of service: it leaves the decision, accepted, no line.
    silent = start_lookupd(config(lab, BLOCK + SILENT_DBL).replace(
        'deadline = "1s"', 'deadline = "300ms"'))
    wait_out_of_service(silent, "silent.lists.test")
    replies, err = session(silent.socket, "EHLO spam-helo.net\nQUIT\n")
    assert replies[1].startswith("250 ")
    assert "domain lists" not in err
    # lookupd down: the fail string reads as unknown; accepted, and logged.
    replies, err = session(sockdir / "absent.sock", "EHLO spam-helo.net\nQUIT\n")
    assert replies[1].startswith("250 ")
    assert "domain lists unknown, accepted" in err
