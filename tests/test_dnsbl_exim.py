"""A real Exim (-be, -bh) reading `dnsbl`/`dbl`/`ptr` answers of a real `lookupd serve` with
${extract}, the lists served by rbldnsd and knot behind dnsmasq (tests/dnsservers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import DnsLab, dns_lab
from support import EXIM, EXIM_BASE, Exim, Lookupd

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

# Internal test lists of documentation addresses and .example names: asked about them only
# because they say so.
BL = """
[[dnsbl.list]]
zone = "bl.test"
codes = ["127.0.0.[2..11]"]
query_special = true
"""
COP = """
[[dnsbl.list]]
zone = "cop.test"
codes = ["127.0.0.2"]
families = ["ipv4"]
query_special = true
"""
DBL = """
[[dnsbl.list]]
zone = "dbl.test"
kind = "domain"
codes = ["127.0.1.[2..99]"]
query_special = true
"""

# The ACL of the issue: deny listed clients, accept clean ones, accept (and log) when the
# lists cannot tell, and when lookupd is down (the FAIL string reads verdict=unknown).
CONNECT_ACL = r"""
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  warn  set acl_c_dnsbl = ${readsocket{LOOKUPD_SOCKET}{dnsbl $sender_host_address}\
                                      {2s}{}{verdict=unknown unknown=lookupd-down}}
  warn  condition = ${if eq{${extract{verdict}{$acl_c_dnsbl}}}{unknown}}
        logwrite  = DNSBL verdict unknown for $sender_host_address \
                    (${extract{unknown}{$acl_c_dnsbl}}): accepted
  deny  condition = ${if eq{${extract{verdict}{${readsocket{LOOKUPD_SOCKET}\
                         {dnsbl $sender_host_address}{2s}{}{verdict=unknown}}}}}{listed}}
        message   = $sender_host_address is listed (${extract{lists}{$acl_c_dnsbl}}): \
                    ${extract{text}{$acl_c_dnsbl}}
  accept
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with dns_lab(tmp_path_factory.mktemp("dnslab")) as started:
        yield started


def lookupd_config(lab: DnsLab, lists: str, deadline: str = "500ms") -> str:
    return f"""
[server]
socket_group = "Debian-exim"   # exim -bh runs as Debian-exim, as the real daemon does
[dnsbl]
nameservers = ["127.0.0.1:{lab.resolver_port}"]
deadline = "{deadline}"
{lists}"""


@pytest.fixture
def exim(tmp_path: Path) -> Exim:
    return Exim(tmp_path / "exim", EXIM_BASE.format(workdir=tmp_path / "exim") + CONNECT_ACL)


@pytest.fixture
def daemon(start_lookupd: StartLookupd, lab: DnsLab) -> Lookupd:
    return start_lookupd(lookupd_config(lab, BL + COP + DBL))


def test_extract_reads_every_field_back(exim: Exim, daemon: Lookupd) -> None:
    sock = daemon.socket

    def field(request: str, key: str) -> str:
        return exim.be(f"[${{extract{{{key}}}{{${{readsocket{{{sock}}}{{{request}}}{{2s}}"
                       f"{{}}{{verdict=unknown}}}}}}}}]")

    listed = "dnsbl 192.0.2.4"
    assert field(listed, "verdict") == "[listed]"
    assert field(listed, "score") == "[2]"
    assert field(listed, "lists") == "[bl.test:127.0.0.4,cop.test:127.0.0.2]"
    assert field(listed, "unknown") == "[]"  # an empty value does not swallow the next pair
    # The list's TXT has a double quote and a backslash: Exim reads them back unescaped.
    assert field(listed, "text") == (
        '[bl.test: Exploited host 192.0.2.4 "quoted" \\ backslash; '
        "cop.test: Blocked, see https://cop.test/query?ip=192.0.2.4]")
    assert field("dnsbl 192.0.2.99", "verdict") == "[clean]"
    assert field("dnsbl 192.0.2.99", "text") == "[]"
    assert field("dnsbl 192.0.2.254", "unknown") == "[bl.test:error-code-127.255.255.254]"
    assert field("dbl spam.example", "lists") == "[dbl.test:127.0.1.2]"
    assert field("ptr 192.0.2.1", "name") == "[mail.example.test]"
    assert field("ptr 192.0.2.1", "fcrdns") == "[yes]"
    assert field("ptr 192.0.2.4", "name") == "[]"
    assert field("ptr 192.0.2.4", "fcrdns") == "[no]"
    assert field("ptr 192.0.2.2", "fcrdns") == "[no]"


def rejection(out: str) -> str:
    """The 550 reply text, its continuation lines joined (Exim wraps long messages)."""
    return " ".join(line[4:] for line in out.splitlines() if line.startswith("550"))


def test_bh_denies_listed_and_accepts_clean_clients(exim: Exim, daemon: Lookupd) -> None:
    defines = [f"LOOKUPD_SOCKET={daemon.socket}"]
    out, _ = exim.bh("192.0.2.4", "QUIT\n", defines)
    assert rejection(out) == (
        "192.0.2.4 is listed (bl.test:127.0.0.4,cop.test:127.0.0.2): bl.test: Exploited host "
        '192.0.2.4 "quoted" \\ backslash; cop.test: Blocked, see '
        "https://cop.test/query?ip=192.0.2.4")
    out, _ = exim.bh("192.0.2.20", "QUIT\n", defines)
    assert rejection(out).startswith(
        "192.0.2.20 is listed (bl.test:127.0.0.2,bl.test:127.0.0.10): ")
    out, err = exim.bh("192.0.2.99", "QUIT\n", defines)
    assert "220 " in out and "550" not in out
    assert "DNSBL verdict unknown" not in err


def test_bh_accepts_and_logs_when_every_list_is_unknown(
        exim: Exim, start_lookupd: StartLookupd, lab: DnsLab, tmp_path: Path) -> None:
    daemon = start_lookupd(lookupd_config(lab, BL, deadline="1s"))  # servfail is an answer
    defines = [f"LOOKUPD_SOCKET={daemon.socket}"]
    for ip, why in (("192.0.2.201", "bl.test:timeout"), ("192.0.2.202", "bl.test:servfail"),
                    ("192.0.2.254", "bl.test:error-code-127.255.255.254")):
        out, err = exim.bh(ip, "QUIT\n", defines)
        assert "220 " in out and "550" not in out and "451" not in out, (ip, out)
        assert f"DNSBL verdict unknown for {ip} ({why}): accepted" in err
    # lookupd down: the FAIL string says unknown, Exim accepts.
    out, err = exim.bh("192.0.2.4", "QUIT\n", [f"LOOKUPD_SOCKET={tmp_path}/absent.sock"])
    assert "220 " in out and "550" not in out
    assert "DNSBL verdict unknown for 192.0.2.4 (lookupd-down): accepted" in err
