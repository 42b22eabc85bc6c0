"""The HELO policy without sockets: facts from the name, facts from DNS, and decide()."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from support import Lookupd, short_dir
from test_connect_daemon import ConnectLab, connect_lab, lookupd_config

from lookupd.config import HeloConfig
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.verdict import DnsblResult
from lookupd.helo import HeloFacts, HeloRequest, decide, dns_facts, parse_args, syntax_facts
from lookupd.outcome import Status

CLIENT = ip_address("198.51.100.7")
OURS = HeloRequest(CLIENT, "", ("mx.example.org",), ip_address("192.0.2.25"))


def facts_of(helo: str, client: str = "198.51.100.7") -> set[str]:
    request = HeloRequest(ip_address(client), helo, OURS.own_names, OURS.own_address)
    return set(syntax_facts(request, ("alias.example.org",)))


@pytest.mark.parametrize(("helo", "expected"), [
    ("mail.example.net", set()),
    ("EXCHANGE.Airflite.local", set()),
    ("MX.example.org", {"ours"}),
    ("alias.example.org.", {"ours"}),
    ("[192.0.2.25]", {"ours", "literal_mismatch"}),
    ("localhost", {"localhost", "no_dot"}),
    ("[127.0.0.1]", {"localhost", "literal_mismatch"}),
    ("198.51.100.7", {"bare_ip"}),
    ("[198.51.100.7]", set()),
    ("[IPv6:2001:db8::1]", {"literal_mismatch"}),
    ("exchange", {"no_dot"}),
    ("bad_name.example", {"not_domain"}),
    ("", {"not_domain"}),
])
def test_syntax_facts(helo: str, expected: set[str]) -> None:
    assert facts_of(helo) == expected


def test_a_local_client_may_say_localhost() -> None:
    assert facts_of("localhost", "127.0.0.1") == {"no_dot"}


A = DnsAnswer(Status.FOUND, ("198.51.100.7",))
OTHER = DnsAnswer(Status.FOUND, ("203.0.113.1",))
NONE = DnsAnswer(Status.NOT_FOUND)
LOST = DnsAnswer(Status.UNKNOWN, reason="timeout")
CLEAN = DnsblResult(Status.NOT_FOUND)


def test_dns_facts() -> None:
    assert dns_facts(CLIENT, A, NONE, NONE, CLEAN) == (set(), set())
    assert dns_facts(CLIENT, OTHER, NONE, NONE, CLEAN) == ({"not_client"}, set())
    assert dns_facts(CLIENT, NONE, NONE, NONE, CLEAN) == ({"no_resolve", "not_client"}, set())
    # A timeout is not "does not resolve".
    assert dns_facts(CLIENT, LOST, NONE, NONE, CLEAN) == (set(), {"no_resolve", "not_client"})
    assert dns_facts(CLIENT, A, NONE, NONE, DnsblResult(Status.FOUND))[0] == {"listed"}


def verdict(found: set[str], policy: str, log_only: bool = False) -> tuple[str, str, str]:
    facts = HeloFacts(HeloRequest(CLIENT, "x.example"), frozenset(found))  # type: ignore[arg-type]
    v = decide(facts, HeloConfig(policy=policy, log_only=log_only))  # type: ignore[arg-type]
    return v.action, v.check, v.would


def test_policies() -> None:
    exchange = {"no_resolve", "not_client"}
    assert verdict(exchange, "lenient") == ("accept", "none", "none")
    assert verdict(exchange, "rfc") == ("deny", "no_resolve", "none")
    assert verdict({"not_client"}, "rfc") == ("accept", "none", "none")
    assert verdict({"not_client"}, "strict") == ("deny", "not_client", "none")
    assert verdict({"ours"}, "lenient") == ("deny", "ours", "none")
    assert verdict({"ours"}, "lenient", log_only=True) == ("accept", "ours", "deny")


def test_allowlisted_is_never_refused() -> None:
    facts = HeloFacts(HeloRequest(CLIENT, "x"), frozenset({"ours"}))
    assert decide(facts, HeloConfig(log_only=False), allowlisted=True).action == "accept"


def test_parse_args() -> None:
    request = parse_args(("198.51.100.7", "mx.example.org", "-", "EXCHANGE.Airflite.local"))
    assert request == HeloRequest(CLIENT, "EXCHANGE.Airflite.local", ("mx.example.org",), None)


# --- the helo verb of a real daemon, with a real DNS server (knot behind dnsmasq) -------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnectLab]:
    for tool in ("rbldnsd", "knotd", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed")
    with connect_lab(tmp_path_factory.mktemp("helo-lab")) as running:
        yield running


@pytest.mark.parametrize(("policy", "request_args", "expected"), [
    # (client, HELO): forward-confirmed, elsewhere, nowhere, our own name or address
    ("strict", "192.0.2.1 mx.ours.example - mail.example.test", ("accept", "none")),
    ("strict", "203.0.113.50 mx.ours.example - liar.example.test", ("deny", "not_client")),
    ("rfc", "203.0.113.50 mx.ours.example - liar.example.test", ("accept", "none")),
    ("rfc", "203.0.113.50 mx.ours.example - nowhere.example.test", ("deny", "no_resolve")),
    ("lenient", "203.0.113.50 mx.ours.example - nowhere.example.test", ("accept", "none")),
    ("lenient", "203.0.113.50 mx.ours.example - MX.ours.example", ("deny", "ours")),
    ("lenient", "203.0.113.50 mx.ours.example 192.0.2.25 [192.0.2.25]", ("deny", "ours")),
])
def test_helo_verb_through_dns(lab: ConnectLab, tmp_path: Path, policy: str,
                               request_args: str, expected: tuple[str, str]) -> None:
    workdir = short_dir()
    daemon = Lookupd(workdir, lookupd_config(
        lab.resolver_port, tmp_path, extra=f'[helo]\npolicy = "{policy}"\nlog_only = false'
    )).start()
    try:
        reply = daemon.query(f"helo {request_args}")
        metrics = daemon.query("metrics").splitlines()
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    got = dict(pair.split("=", 1) for pair in reply.split() if "=" in pair)
    assert (got["action"], got["check"]) == expected, reply
    action, check = expected
    assert f'lookupd_helo_verdicts_total{{action="{action}",check="{check}",would="none"}} 1.0' \
        in metrics, [m for m in metrics if "helo" in m]


def test_helo_fails_open_without_a_configuration() -> None:
    from lookupd.dispatch import Dispatcher
    from lookupd.protocol import Peer, Request

    reply = Dispatcher.fail_open("broken").handle(
        Request("helo", ("198.51.100.7", "mx.example.org", "-", "mx.example.org")), Peer("unix"))
    assert reply == 'action=accept would=none check=none facts="" reason=""'
