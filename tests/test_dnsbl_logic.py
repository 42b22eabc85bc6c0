"""The DNSBL decisions without sockets: codes, names, verdicts, FCrDNS, health, cache, replies."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from lookupd.config import DnsblListConfig
from lookupd.dnsbl.answers import DnsAnswer, negative_ttl, positive_ttl
from lookupd.dnsbl.cache import AnswerCache, carry_over
from lookupd.dnsbl.codes import classify, error_advice, parse_code, parse_codes
from lookupd.dnsbl.health import Health, OncePer, judge, standing
from lookupd.dnsbl.names import (
    Probe,
    normalize_domain,
    parse_ip,
    probe_points,
    query_zone,
    redact,
    reverse_ip,
)
from lookupd.dnsbl.render import exim_value, printable, render_dnsbl, render_ptr, render_stats
from lookupd.dnsbl.snapshot import decode_snapshot, encode_snapshot
from lookupd.dnsbl.special import numeric_tld, smtp_name, special_address, special_name
from lookupd.dnsbl.stats import DnsblStats, ListStats, percentile
from lookupd.dnsbl.verdict import (
    DnsblResult,
    KeptVerdict,
    ListAnswer,
    ListSpec,
    PtrResult,
    combine,
    decide_fcrdns,
    interpret,
    with_text,
)
from lookupd.outcome import Status

FOUND, NOT_FOUND, UNKNOWN = Status.FOUND, Status.NOT_FOUND, Status.UNKNOWN


def spec(zone: str = "zen.spamhaus.org", codes: tuple[str, ...] = ("127.0.0.[2..11]",),
         weight: float = 1.0, spamhaus: bool = False) -> ListSpec:
    return ListSpec.from_config(DnsblListConfig(zone=zone, codes=codes, weight=weight,
                                                spamhaus=spamhaus))


def hit(*records: str) -> DnsAnswer:
    return DnsAnswer(FOUND, records)


# --- codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "listed", "not_listed"), [
    ("127.0.0.2", ["127.0.0.2"], ["127.0.0.3", "127.0.0.20"]),
    ("127.0.0.[2..11]", ["127.0.0.2", "127.0.0.4", "127.0.0.11"],
     ["127.0.0.12", "127.0.1.2", "127.0.0.0"]),
    ("127.0.1.[2..99]", ["127.0.1.2", "127.0.1.99"], ["127.0.1.102", "127.0.0.2"]),
    ("&0x04", ["127.0.0.4", "127.0.0.6", "127.0.0.254"], ["127.0.0.2", "127.0.0.10"]),
    ("&8", ["127.0.0.8", "127.0.0.10"], ["127.0.0.4"]),
    # postscreen's syntax: a range (or a list of numbers and ranges) in any octet.
    ("127.0.[0..255].[1..3]", ["127.0.0.2", "127.0.10.3", "127.0.255.1"],
     ["127.0.10.0", "127.0.0.255", "127.1.10.2"]),
    ("127.0.[2..20].[0..3]", ["127.0.2.0", "127.0.20.3"], ["127.0.1.0", "127.0.21.1"]),
    ("127.0.0.[2;4;9..11]", ["127.0.0.2", "127.0.0.4", "127.0.0.9", "127.0.0.11"],
     ["127.0.0.3", "127.0.0.8", "127.0.0.12"]),
    ("127.[0..1].[0;2].[5]", ["127.0.0.5", "127.1.2.5"], ["127.0.1.5", "127.2.0.5"]),
    # A network: what a prefix fixes, per octet.
    ("127.0.2.0/24", ["127.0.2.0", "127.0.2.252"], ["127.0.1.255", "127.0.3.0"]),
    ("127.0.16.0/20", ["127.0.16.0", "127.0.31.255"], ["127.0.15.255", "127.0.32.0"]),
])
def test_code_rules_match_what_they_say(code: str, listed: list[str],
                                        not_listed: list[str]) -> None:
    rules = parse_codes([code])
    assert classify(listed, rules).hits == tuple(listed)
    assert classify(not_listed, rules).hits == ()


@pytest.mark.parametrize("bad", ["127.0.0.256", "127.0.0.[5..2]", "127.0.0.[2..300]", "&0",
                                 "&0x100", "zen", "127.0.0.2/24", "", "127.0.[0..255]",
                                 "127.0.[3..1].2", "127.0.0.[2;x]", "127.0.0.[]",
                                 "127.0.0.[2..3", "127.0.0.[[2]]", "10.0.0.[1..3]",
                                 "[0..126].0.0.2", "10.0.0.0/8", "127.0.0.0/33"])
def test_bad_codes_are_refused_with_the_forms_that_work(bad: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0|1\.\.255|low to high|bitmask"):
        parse_code(bad)


@pytest.mark.parametrize("answer", [
    "127.255.255.254", "127.255.255.255", "127.255.255.252", "127.255.255.0", "127.0.1.255",
    "127.0.0.1", "10.0.0.1", "192.0.2.1", "0.0.0.0", "::1", "not-an-address",
])
def test_error_codes_are_never_a_listing_whatever_the_codes(answer: str) -> None:
    for rules in ((), parse_codes(["&0xff"]), parse_codes(["127.255.255.[0..255]"])):
        sorted_out = classify([answer], rules)
        assert sorted_out.hits == ()
        assert sorted_out.errors == (answer,)
    assert error_advice(answer)


def test_spamhaus_error_advice_says_what_to_do() -> None:
    assert "dqs_key" in (error_advice("127.255.255.254") or "")
    assert "unbound" in (error_advice("127.255.255.254") or "")
    assert "DQS key" in (error_advice("127.255.255.255") or "")
    assert error_advice("127.0.0.2") is None
    assert error_advice("127.0.1.2") is None


def test_a_lists_own_error_answers_are_errors_of_that_list_only() -> None:
    """DNSWL answers 127.0.0.255 to resolvers it blocks: built in for list.dnswl.org, which
    a loose filter would otherwise count as an allow-list hit; another list's 127.0.0.255 is
    a code like any other, unless its error_codes say so."""
    dnswl = ListSpec.from_config(DnsblListConfig(zone="list.dnswl.org", weight=-1,
                                                 codes=("127.0.[0..255].[0..255]",)))
    blocked = interpret(dnswl, hit("127.0.0.255"))
    assert (blocked.status, blocked.reason) == (UNKNOWN, "error-code-127.0.0.255")
    assert interpret(dnswl, hit("127.0.10.2")).codes == ("127.0.10.2",)
    assert "dnswl.org" in (error_advice("127.0.0.255", dnswl.errors) or "")
    other = spec("wl.test", codes=(), weight=-1)
    assert interpret(other, hit("127.0.0.255")).status is FOUND
    assert error_advice("127.0.0.255") is None
    own = ListSpec.from_config(DnsblListConfig(zone="wl.test", weight=-1,
                                               error_codes=("127.0.0.255", "127.0.9.0/24")))
    assert interpret(own, hit("127.0.9.7")).reason == "error-code-127.0.9.7"
    assert "error_codes" in (error_advice("127.0.9.7", own.errors) or "")
    # The shared error answers stay errors whatever a list adds.
    assert interpret(own, hit("127.255.255.254")).reason == "error-code-127.255.255.254"
    # An error answer beside a hit: the list did not really look.
    assert interpret(dnswl, hit("127.0.10.2", "127.0.0.255")).status is UNKNOWN


def test_a_blocked_allow_list_never_makes_a_listed_client_clean() -> None:
    """The bug of issue 11: a client on a block list, DNSWL answering "blocked" (127.0.0.255)
    under a loose filter, came out clean with score -1. The allow list's say is unknown now:
    it could have pulled the score under the threshold, so the verdict is unknown."""
    block = spec("bl.test", codes=("127.0.0.2",))
    dnswl = ListSpec.from_config(DnsblListConfig(zone="list.dnswl.org", weight=-1,
                                                 codes=("127.0.[0..255].[0..255]",)))
    result = combine([interpret(block, hit("127.0.0.2")),
                      interpret(dnswl, hit("127.0.0.255"))], 1)
    assert (result.status, result.score, result.reason) == \
        (UNKNOWN, 1, "list.dnswl.org:error-code-127.0.0.255")
    allowed = combine([interpret(block, hit("127.0.0.2")),
                       interpret(dnswl, hit("127.0.10.3"))], 1)
    assert (allowed.status, allowed.score) == (NOT_FOUND, 0)


def test_empty_codes_take_any_loopback_answer_but_errors() -> None:
    sorted_out = classify(["127.0.0.10", "127.0.0.2", "127.255.255.254"], ())
    assert sorted_out.hits == ("127.0.0.2", "127.0.0.10")
    assert sorted_out.errors == ("127.255.255.254",)


# --- names ---------------------------------------------------------------------------------


def test_reversed_addresses() -> None:
    assert reverse_ip(ipaddress.IPv4Address("192.0.2.4")) == "4.2.0.192"
    assert reverse_ip(ipaddress.IPv6Address("2001:db8::4")) == \
        "4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert parse_ip("::ffff:192.0.2.4") == ipaddress.IPv4Address("192.0.2.4")
    assert parse_ip(ipaddress.IPv6Address("::ffff:192.0.2.4")) == \
        ipaddress.IPv4Address("192.0.2.4")
    with pytest.raises(ValueError):
        parse_ip("192.0.2.300")


@pytest.mark.parametrize(("given", "expected"), [
    ("Spam.Example.", "spam.example"), ("a-b.example", "a-b.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"), ("bücher.example", "xn--bcher-kva.example"),
])
def test_domains_are_normalized(given: str, expected: str) -> None:
    assert normalize_domain(given) == expected


@pytest.mark.parametrize("bad", ["192.0.2.1", "localhost", "-a.example", "a..example",
                                 "a b.example", "", ".", "a" * 64 + ".example", "x." * 120])
def test_bad_domains_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(bad)


def test_dqs_rewrites_spamhaus_zones_only_with_a_key() -> None:
    key = "abcdefghijklmnopqrstuvwxyz"
    assert query_zone("zen.spamhaus.org", spamhaus=True, dqs_key=key) == \
        f"{key}.zen.dq.spamhaus.net"
    assert query_zone("dbl.spamhaus.org.", spamhaus=True, dqs_key=key) == \
        f"{key}.dbl.dq.spamhaus.net"
    assert query_zone("zen.dq.spamhaus.net", spamhaus=True, dqs_key=key) == \
        f"{key}.zen.dq.spamhaus.net"
    assert query_zone("zen.spamhaus.org", spamhaus=True, dqs_key="") == "zen.spamhaus.org"
    assert query_zone("bl.spamcop.net", spamhaus=False, dqs_key=key) == "bl.spamcop.net"
    assert redact(f"see https://{key.upper()}.zen.dq.spamhaus.net/x", key) == \
        "see https://<key>.zen.dq.spamhaus.net/x"


def test_rfc5782_test_points() -> None:
    v4 = probe_points("ip", ("ipv4",))
    assert [(p.label, p.listed) for p in v4] == [("2.0.0.127", True), ("1.0.0.127", False)]
    both = probe_points("ip", ("ipv4", "ipv6"))
    assert both[2].label == reverse_ip(ipaddress.IPv6Address("::ffff:7f00:2"))
    assert [p.listed for p in both] == [True, False, True, False]
    assert [(p.label, p.listed) for p in probe_points("domain", ())] == \
        [("test", True), ("invalid", False)]


# --- special-use addresses -----------------------------------------------------------------


@pytest.mark.parametrize(("address", "word"), [
    ("0.0.0.0", "this-network"), ("10.255.255.255", "private"), ("100.127.0.1", "shared"),
    ("127.1.2.3", "loopback"), ("169.254.0.1", "link-local"), ("172.31.255.1", "private"),
    ("192.0.0.170", "ietf-protocol"), ("192.0.2.0", "documentation"),
    ("192.168.0.1", "private"), ("198.19.255.255", "benchmarking"),
    ("198.51.100.1", "documentation"), ("203.0.113.255", "documentation"),
    ("239.255.255.250", "multicast"), ("255.255.255.255", "reserved"),
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("febf:ffff::1", "link-local"), ("fc00::1", "private"), ("fdff::1", "private"),
    ("fec0::1", "site-local"), ("ff05::2", "multicast"), ("64:ff9b:1::a00:1", "private"),
    ("100::1", "discard-only"), ("2001:2::1", "benchmarking"),
    ("2001:db8:ffff::1", "documentation"), ("3fff:fff::1", "documentation"),
    ("::ffff:10.1.2.3", "private"), ("::ffff:192.0.2.1", "documentation"),
    # On the Internet: asked.
    ("81.2.69.142", ""), ("100.63.255.255", ""), ("100.128.0.0", ""), ("172.32.0.1", ""),
    ("192.0.1.255", ""), ("192.0.3.0", ""), ("192.88.99.1", ""), ("198.20.0.1", ""),
    ("223.255.255.255", ""), ("1.1.1.1", ""), ("2001:218::1", ""), ("2a00:1450::1", ""),
    ("64:ff9b::81.2.69.142", ""), ("2002:c000:201::1", ""), ("2001:db9::1", ""),
    ("::ffff:81.2.69.142", ""), ("fbff::1", ""), ("2001::1", ""),
])
def test_special_use_addresses(address: str, word: str) -> None:
    assert special_address(ipaddress.ip_address(address)) == word


@pytest.mark.parametrize(("name", "special"), [
    ("test", True), ("spam.example", True), ("a.b.localhost", True), ("laptop.local", True),
    ("x.home.arpa", True), ("www.example.com", True), ("example.org", True),
    ("svc.internal", True), ("foo.onion", True), ("foo.alt", True), ("bad.invalid", True),
    ("example.co.uk", False), ("notexample.com", False), ("localdomain", False),
    ("test.example.net.au", False), ("mail.example.test.net", False), ("arpa", False),
    ("spam-helo.net", False), ("latest", False),
])
def test_special_use_names(name: str, special: bool) -> None:
    assert special_name(name) == ("special-use-name" if special else "")


@pytest.mark.parametrize(("text", "expected"), [
    # A HELO name, a sender domain or a whole sender address: the domain to ask.
    ("Mail.Example.NET.", ("mail.example.net", "")),
    ("alice@Spam-Sender.net", ("spam-sender.net", "")),
    ("<alice@spam-sender.net>", ("spam-sender.net", "")),
    ('"a b"@spam-sender.net', ("spam-sender.net", "")),
    ("bücher.example", ("xn--bcher-kva.example", "")),
    # Special-use names are asked (of the lists that take them): the source decides.
    ("laptop.local", ("laptop.local", "")),
    # Nothing to ask: the bounce's empty sender.
    ("", ("", "")), ("<>", ("", "")), ("  ", ("", "")),
    # Never asked: address literals, numeric TLDs (bare IPs too), no domain name at all.
    ("[192.0.2.1]", ("", "address-literal")), ("[IPv6:2001:db8::1]", ("", "address-literal")),
    ("alice@[192.0.2.1]", ("", "address-literal")),
    ("192.0.2.1", ("", "numeric-tld")), ("host.123", ("", "numeric-tld")),
    ("alice@host.123.", ("", "numeric-tld")), ("localhost", ("", "not-a-domain")),
    ("2001:db8::1", ("", "not-a-domain")), ("two words.example", ("", "not-a-domain")),
    ("a..example", ("", "not-a-domain")), ("-bad.example", ("", "not-a-domain")),
])
def test_smtp_names(text: str, expected: tuple[str, str]) -> None:
    assert smtp_name(text) == expected


def test_numeric_tld() -> None:
    assert numeric_tld("192.0.2.1") and numeric_tld("host.123") and numeric_tld("1.2.3.")
    assert not numeric_tld("host.123a") and not numeric_tld("123.example")


# --- one list's verdict ---------------------------------------------------------------------


def test_interpret_hits_errors_and_failures() -> None:
    zen = spec()
    assert interpret(zen, hit("127.0.0.10", "127.0.0.4")).codes == ("127.0.0.4", "127.0.0.10")
    assert interpret(zen, hit("127.0.0.4")).status is FOUND
    assert interpret(zen, hit("127.0.0.200")).status is NOT_FOUND  # a code that does not count
    assert interpret(zen, DnsAnswer(NOT_FOUND)).status is NOT_FOUND
    failed = interpret(zen, DnsAnswer(UNKNOWN, reason="timeout"))
    assert (failed.status, failed.reason) == (UNKNOWN, "timeout")
    refused = interpret(zen, hit("127.255.255.254"))
    assert (refused.status, refused.reason) == (UNKNOWN, "error-code-127.255.255.254")
    # An error code beside a real one still means "did not really look".
    assert interpret(zen, hit("127.0.0.2", "127.255.255.255")).status is UNKNOWN
    assert interpret(zen, hit("10.0.0.1")).status is UNKNOWN
    assert interpret(zen, hit("127.0.0.1")).status is UNKNOWN


def test_text_comes_from_txt_or_spamhaus_meanings() -> None:
    zen = spec(spamhaus=True)
    listed = interpret(zen, hit("127.0.0.4", "127.0.0.10"))
    assert with_text(zen, listed, DnsAnswer(FOUND, ("See https://x/1.2.3.4",))).text == \
        "See https://x/1.2.3.4"
    assert "XBL" in with_text(zen, listed, None).text
    assert "PBL" in with_text(zen, listed, DnsAnswer(UNKNOWN, reason="timeout")).text
    assert with_text(spec(), listed, None).text == ""


# --- combining lists ------------------------------------------------------------------------


def la(name: str, status: Status, weight: float = 1.0, reason: str = "") -> ListAnswer:
    return ListAnswer(name, weight, status, codes=("127.0.0.2",) if status is FOUND else (),
                      reason=reason)


@pytest.mark.parametrize(("answers", "threshold", "verdict", "score"), [
    ([la("a", FOUND), la("b", NOT_FOUND)], 1, FOUND, 1),
    ([la("a", FOUND), la("b", FOUND)], 2, FOUND, 2),
    ([la("a", FOUND), la("b", NOT_FOUND)], 2, NOT_FOUND, 1),
    ([la("a", NOT_FOUND), la("b", NOT_FOUND)], 1, NOT_FOUND, 0),
    ([], 1, NOT_FOUND, 0),
    # An unknown list that could have tipped the verdict makes it unknown...
    ([la("a", NOT_FOUND), la("b", UNKNOWN, reason="timeout")], 1, UNKNOWN, 0),
    ([la("a", UNKNOWN, reason="timeout"), la("b", UNKNOWN, reason="quarantined")], 1,
     UNKNOWN, 0),
    # ...one that could not have does not.
    ([la("a", FOUND, 2), la("b", UNKNOWN, reason="timeout")], 1, FOUND, 2),
    ([la("a", NOT_FOUND), la("b", UNKNOWN, 0.5, "timeout")], 1, NOT_FOUND, 0),
    # Allow lists (negative weight) pull the score down; unknown ones leave it open.
    ([la("a", FOUND, 2), la("wl", FOUND, -2)], 1, NOT_FOUND, 0),
    ([la("a", FOUND, 2), la("wl", UNKNOWN, -2, "timeout")], 1, UNKNOWN, 2),
    ([la("a", FOUND, 3), la("wl", UNKNOWN, -1, "timeout")], 1, FOUND, 3),
])
def test_combine(answers: list[ListAnswer], threshold: float, verdict: Status,
                 score: float) -> None:
    result = combine(answers, threshold)
    assert (result.status, result.score) == (verdict, score)


def test_result_names_hits_unknowns_and_text_in_list_order() -> None:
    result = combine([ListAnswer("a", 1, FOUND, ("127.0.0.4",), text="A says"),
                      la("b", UNKNOWN, reason="timeout"), la("c", FOUND),
                      la("d", UNKNOWN, reason="servfail")], 1)
    assert [a.name for a in result.listed] == ["a", "c"]
    assert result.reason == "b:timeout,d:servfail"
    assert result.text == "a: A says"


# --- reverse DNS ----------------------------------------------------------------------------

ADDR = ipaddress.IPv4Address("192.0.2.1")


@pytest.mark.parametrize(("ptr", "forwards", "expected"), [
    (DnsAnswer(FOUND, ("mail.example.",)), {"mail.example": hit("192.0.2.1")},
     (FOUND, "mail.example", "yes")),
    (DnsAnswer(FOUND, ("mail.example",)), {"mail.example": hit("192.0.2.9")},
     (FOUND, "mail.example", "no")),
    (DnsAnswer(FOUND, ("mail.example",)), {"mail.example": DnsAnswer(NOT_FOUND)},
     (FOUND, "mail.example", "no")),
    (DnsAnswer(FOUND, ("a.example", "b.example")),
     {"a.example": DnsAnswer(NOT_FOUND), "b.example": hit("192.0.2.9", "192.0.2.1")},
     (FOUND, "b.example", "yes")),
    (DnsAnswer(FOUND, ("mail.example",)), {"mail.example": DnsAnswer(UNKNOWN, reason="servfail")},
     (FOUND, "mail.example", "unknown")),
    (DnsAnswer(FOUND, ("mail.example",)), {}, (FOUND, "mail.example", "unknown")),
    (DnsAnswer(NOT_FOUND), {}, (NOT_FOUND, "", "no")),
    (DnsAnswer(UNKNOWN, reason="timeout"), {}, (UNKNOWN, "", "unknown")),
])
def test_fcrdns(ptr: DnsAnswer, forwards: dict[str, DnsAnswer],
                expected: tuple[Status, str, str]) -> None:
    result = decide_fcrdns(ADDR, ptr, forwards)
    assert (result.status, result.name, result.fcrdns) == expected


def test_fcrdns_compares_ipv6_addresses_not_strings() -> None:
    addr = ipaddress.IPv6Address("2001:db8::25")
    result = decide_fcrdns(addr, DnsAnswer(FOUND, ("m6.example",)),
                           {"m6.example": hit("2001:0db8:0:0::25")})
    assert result.fcrdns == "yes"


# --- TTLs, health, rate limit ----------------------------------------------------------------


def test_ttls() -> None:
    assert negative_ttl(3600, 45, 900) == 45
    assert negative_ttl(30, 3600, 900) == 30
    assert negative_ttl(86400, 86400, 900) == 900
    assert negative_ttl(None, None, 900) == 0  # RFC 2308: no SOA, no negative caching
    assert positive_ttl(120) == 120
    assert positive_ttl(10**9) == 86400


def _points() -> tuple[Probe, ...]:
    return probe_points("ip", ("ipv4",))


def test_health_quarantines_a_list_that_lists_everything() -> None:
    listed, unlisted = _points()
    verdict = judge([(listed, hit("127.0.0.2")), (unlisted, hit("127.0.0.2"))])
    assert verdict.quarantine == "lists-everything"
    assert "127.0.0.1" in verdict.note


def test_health_quarantines_a_list_that_does_not_answer() -> None:
    listed, unlisted = _points()
    verdict = judge([(listed, DnsAnswer(UNKNOWN, reason="timeout")),
                     (unlisted, DnsAnswer(UNKNOWN, reason="servfail"))])
    assert verdict.quarantine == "not-answering"


def test_health_keeps_healthy_or_merely_odd_lists_in_service() -> None:
    listed, unlisted = _points()
    assert judge([(listed, hit("127.0.0.2")), (unlisted, DnsAnswer(NOT_FOUND))]) == Health()
    odd = judge([(listed, DnsAnswer(NOT_FOUND)), (unlisted, DnsAnswer(NOT_FOUND))])
    assert not odd.quarantined and "test point 127.0.0.2" in odd.note
    refused = judge([(listed, hit("127.255.255.254")), (unlisted, hit("127.255.255.254"))])
    assert not refused.quarantined and "dqs_key" in refused.note
    # Half an answer is not enough: test_a_list_whose_must_not_list_test_point_got_no_answer.
    half = judge([(listed, DnsAnswer(UNKNOWN, reason="timeout")), (unlisted,
                                                                   DnsAnswer(NOT_FOUND))])
    assert not half.quarantined


def test_a_list_counts_only_once_a_probe_has_passed() -> None:
    listed, unlisted = _points()
    assert standing(None) == "unprobed"  # no probe back yet: it may list everything
    assert standing(judge([(listed, hit("127.0.0.2")), (unlisted, hit("127.0.0.2"))])) == \
        "quarantined"
    assert standing(judge([(listed, hit("127.0.0.2")), (unlisted, DnsAnswer(NOT_FOUND))])) == ""
    assert standing(Health(note="it does not list its RFC 5782 test point")) == ""


def test_once_per_period() -> None:
    now = [0.0]
    once = OncePer(600, clock=lambda: now[0])
    assert once(("zen", "timeout")) and once(("zen", "servfail")) and once(("cop", "timeout"))
    assert not once(("zen", "timeout"))
    now[0] = 599
    assert not once(("zen", "timeout"))
    now[0] = 601
    assert once(("zen", "timeout"))


def test_percentile() -> None:
    assert percentile([], 50) == 0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3


# --- cache and snapshot ---------------------------------------------------------------------


async def test_cache_keeps_answers_until_they_expire() -> None:
    now = [1000.0]
    cache = AnswerCache(10, clock=lambda: now[0])
    key = ("bl.test", "A", "4.2.0.192")
    cache.put(key, DnsAnswer(FOUND, ("127.0.0.2",), expires=1120))
    cache.put(("bl.test", "A", "x"), DnsAnswer(UNKNOWN, reason="timeout", expires=1000))
    assert cache.get(key) is not None
    assert cache.get(("bl.test", "A", "x")) is None  # expired at once: not kept
    now[0] = 1121
    assert cache.get(key) is None
    assert len(cache) == 0


async def test_cache_merges_identical_questions_and_survives_bugs() -> None:
    cache = AnswerCache(10, clock=lambda: 0.0)
    asked = 0
    release = asyncio.Event()

    async def ask() -> DnsAnswer:
        nonlocal asked
        asked += 1
        await release.wait()
        return DnsAnswer(FOUND, ("127.0.0.2",), expires=100)

    key = ("bl.test", "A", "1")
    waiters = [asyncio.create_task(cache.fetch(key, ask)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert cache.inflight == 1
    release.set()
    results = await asyncio.gather(*waiters)
    assert asked == 1
    assert [merged for _, merged in results] == [False, True, True, True, True]
    assert (await cache.fetch(key, ask)) == (results[0][0], True)

    async def broken() -> DnsAnswer:
        raise RuntimeError("bug")

    answer, _ = await cache.fetch(("bl.test", "A", "2"), broken)
    assert (answer.status, answer.reason) == (UNKNOWN, "error")


async def test_a_caller_giving_up_does_not_cancel_the_question() -> None:
    cache = AnswerCache(10, clock=lambda: 0.0)
    release = asyncio.Event()

    async def ask() -> DnsAnswer:
        await release.wait()
        return DnsAnswer(NOT_FOUND, expires=50)

    key = ("bl.test", "A", "3")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cache.fetch(key, ask), 0.01)
    release.set()
    await asyncio.sleep(0.01)
    assert cache.get(key) == DnsAnswer(NOT_FOUND, expires=50)


def test_absorb_takes_a_loaded_cache_under_the_newer_answers() -> None:
    """The snapshot, loaded in a thread into a cache of its own, joins the live cache: what
    the live one learnt meanwhile wins."""
    live = AnswerCache(3, clock=lambda: 0.0)
    asked, new = DnsAnswer(NOT_FOUND, expires=50), DnsAnswer(NOT_FOUND, expires=60)
    live.put(("bl.test", "A", "1"), asked)
    live.put(("bl.test", "A", "9"), new)
    loaded = AnswerCache(3, clock=lambda: 0.0)
    old = DnsAnswer(FOUND, ("127.0.0.2",), expires=90)
    loaded.load([(("bl.test", "A", str(i)), old) for i in range(3)])
    live.absorb(loaded)
    # Full: the snapshot's least recent answer made room for the live ones.
    assert dict(live.items()) == {("bl.test", "A", "1"): asked, ("bl.test", "A", "9"): new,
                                  ("bl.test", "A", "2"): old}
    with pytest.raises(ValueError):
        live.absorb(AnswerCache(4, clock=lambda: 0.0))


def test_a_full_cache_drops_the_expired_then_the_least_recently_used() -> None:
    """What a full cache lets go, and `changes`: it counts only the answers that leave (or
    are replaced) before their expiry, which is what makes results decided from cached
    answers stale before the earliest expiry of those answers."""
    now = [0.0]
    cache = AnswerCache(3, clock=lambda: now[0])
    short, long = DnsAnswer(NOT_FOUND, expires=10), DnsAnswer(NOT_FOUND, expires=100)
    cache.put(("z", "A", "short"), short)
    cache.put(("z", "A", "a"), long)
    cache.put(("z", "A", "b"), long)
    assert cache.changes == 0
    now[0] = 20  # "short" has expired: it goes first, the others are kept
    cache.put(("z", "A", "c"), long)
    assert sorted(k[2] for k, _ in cache.items()) == ["a", "b", "c"] and cache.changes == 0
    assert cache.get(("z", "A", "a")) is long  # now the most recently used
    cache.put(("z", "A", "d"), long)  # none expired: "b", the least recently used, goes
    assert sorted(k[2] for k, _ in cache.items()) == ["a", "c", "d"] and cache.changes == 1
    cache.put(("z", "A", "a"), DnsAnswer(FOUND, ("127.0.0.2",), expires=100))  # replaced
    assert cache.changes == 2
    cache.put(("z", "A", "c"), DnsAnswer(UNKNOWN, reason="timeout", expires=0))  # removed
    assert cache.get(("z", "A", "c")) is None and cache.changes == 3
    now[0] = 100  # expiring changes nothing: results end at the answers' expiry anyway
    assert len(cache) == 0 and cache.changes == 3


def test_a_cached_answer_keeps_what_a_list_decided_from_it() -> None:
    """The entry of an answer carries a list's verdict on it; a new answer for the same key
    (refreshed, replaced) comes in a new entry, without it."""
    cache = AnswerCache(10, clock=lambda: 0.0)
    key = ("bl.test", "A", "4.2.0.192")
    cache.put(key, DnsAnswer(FOUND, ("127.0.0.2",), expires=100))
    entry = cache.entry(key, 0.0)
    assert entry is not None and entry.verdict is None
    spec = ListSpec.from_config(DnsblListConfig(zone="bl.test"))
    listed = interpret(spec, entry.answer)
    entry.verdict = KeptVerdict(spec, listed, listed)
    assert cache.entry(key, 50.0) is entry and entry.verdict.answer is listed
    assert cache.entry(key, 100.0) is None  # expired: gone with its verdict
    cache.put(key, DnsAnswer(FOUND, ("127.0.0.2",), expires=200))
    again = cache.entry(key, 100.0)
    assert again is not None and again is not entry and again.verdict is None


def test_snapshot_round_trip_drops_expired_entries() -> None:
    entries = [(("bl.test", "A", "4.2.0.192"), DnsAnswer(FOUND, ("127.0.0.4",), "", 2000.0)),
               (("bl.test", "TXT", "4.2.0.192"), DnsAnswer(FOUND, ("why",), "", 2000.0)),
               (("", "PTR", "1.2.0.192.in-addr.arpa"), DnsAnswer(NOT_FOUND, (), "", 1500.0)),
               (("cop.test", "A", "9"), DnsAnswer(UNKNOWN, (), "timeout", 1010.0))]
    data = encode_snapshot(entries)
    assert decode_snapshot(data, 1000.0).entries == entries
    assert [k for k, _ in decode_snapshot(data, 1600.0).entries] == [entries[0][0], entries[1][0]]


def test_carry_over_keeps_the_zones_asked_the_same_within_the_new_bounds() -> None:
    """A reload keeps the answers of zones asked the same way (and reverse DNS, zone ""),
    a NXDOMAIN no longer than negative_ttl_max from now, a failure no longer than error_ttl,
    a listing no longer than a day (a snapshot can say anything)."""
    entries = [(("bl.test", "A", "4"), DnsAnswer(FOUND, ("127.0.0.4",), "", 5000.0)),
               (("bl.test", "A", "3"), DnsAnswer(FOUND, ("127.0.0.2",), "", 9e9)),
               (("bl.test", "A", "5"), DnsAnswer(NOT_FOUND, (), "", 1800.0)),
               (("bl.test", "A", "6"), DnsAnswer(UNKNOWN, (), "timeout", 1030.0)),
               (("bl.test", "A", "7"), DnsAnswer(NOT_FOUND, (), "", 999.0)),
               (("", "PTR", "1.2.0.192.in-addr.arpa"), DnsAnswer(NOT_FOUND, (), "", 1100.0)),
               (("gone.test", "A", "4"), DnsAnswer(FOUND, ("127.0.0.2",), "", 5000.0))]
    kept = carry_over(entries, 1000.0, zones={"", "bl.test"}, negative_ttl_max=300.0,
                      error_ttl=10.0)
    assert kept == [
        (("bl.test", "A", "4"), DnsAnswer(FOUND, ("127.0.0.4",), "", 5000.0)),
        (("bl.test", "A", "3"), DnsAnswer(FOUND, ("127.0.0.2",), "", 1000.0 + 86400)),
        (("bl.test", "A", "5"), DnsAnswer(NOT_FOUND, (), "", 1300.0)),
        (("bl.test", "A", "6"), DnsAnswer(UNKNOWN, (), "timeout", 1010.0)),
        (("", "PTR", "1.2.0.192.in-addr.arpa"), DnsAnswer(NOT_FOUND, (), "", 1100.0)),
    ]
    assert carry_over(entries, 1000.0, zones=set(), negative_ttl_max=300.0,
                      error_ttl=10.0) == []


@pytest.mark.parametrize("corrupt", [
    b"", b"\xc1", b"garbage", b"\x81\xa1v\x02",  # {"v": 2}
])
def test_corrupt_snapshots_are_refused(corrupt: bytes) -> None:
    with pytest.raises(ValueError):
        decode_snapshot(corrupt, 0.0)


def test_truncated_snapshot_is_refused() -> None:
    data = encode_snapshot([(("bl.test", "A", str(i)), DnsAnswer(FOUND, ("127.0.0.2",), "",
                                                                 9e9)) for i in range(50)])
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            decode_snapshot(data[:cut], 0.0)


# --- replies ---------------------------------------------------------------------------------


def test_dnsbl_reply() -> None:
    result = combine([
        ListAnswer("zen.spamhaus.org", 1, FOUND, ("127.0.0.4", "127.0.0.10"),
                   text='Exploited "host"\n\\ see https://x/é'),
        ListAnswer("bl.spamcop.net", 1, FOUND, ("127.0.0.2",)),
        ListAnswer("b.barracudacentral.org", 1, UNKNOWN, reason="timeout"),
    ], 1)
    assert render_dnsbl(result) == (
        "verdict=listed score=2 lists=zen.spamhaus.org:127.0.0.4,zen.spamhaus.org:127.0.0.10,"
        "bl.spamcop.net:127.0.0.2 unknown=b.barracudacentral.org:timeout "
        'text="zen.spamhaus.org: Exploited \\"host\\" \\\\ see https://x/?" skipped=""')


def test_empty_values_are_quoted_so_exim_does_not_read_the_next_pair() -> None:
    assert render_dnsbl(DnsblResult(NOT_FOUND)) == \
        'verdict=clean score=0 lists="" unknown="" text="" skipped=""'
    assert render_ptr(PtrResult(NOT_FOUND, fcrdns="no")) == 'name="" fcrdns=no'
    assert render_ptr(PtrResult(FOUND, "mail.example", "yes")) == "name=mail.example fcrdns=yes"


def test_text_is_bounded_printable_ascii() -> None:
    text = printable("a\tb\r\nc\x00d" + "x" * 500, 200)
    assert len(text) == 200 and text.startswith("a b c?d") and text.endswith("...")
    assert exim_value("plain-token:1,2") == "plain-token:1,2"
    assert exim_value('a "b" \\c') == '"a \\"b\\" \\\\c"'


def test_stats_line() -> None:
    stats = DnsblStats((ListStats("zen.spamhaus.org", "ip", 10, 2, 1, 1, 0.5, "", 12.3, 40.0),
                        ListStats("dead.example", "ip", 3, 0, 0, 0, 0.0, "not-answering", 0, 0),
                        ListStats("new.example", "ip", 0, 0, 0, 0, 0.0, "unprobed", 0, 0)),
                       cache_entries=7, cache_size=100, inflight=1)
    line = render_stats(stats)
    assert line.startswith("dnsbl_cache=7/100 dnsbl_inflight=1 zen.spamhaus.org=queries:10,")
    assert "hits:2,errors:1,timeouts:1,cache_hit_rate:0.50,state:ok,p50_ms:12.3,p99_ms:40.0" \
        in line
    assert "dead.example=queries:3,hits:0,errors:0,timeouts:0,cache_hit_rate:0.00," \
        "state:quarantined-not-answering" in line
    assert "new.example=queries:0,hits:0,errors:0,timeouts:0,cache_hit_rate:0.00," \
        "state:unprobed," in line
    assert "\n" not in line


def test_a_lists_own_error_answer_to_its_test_point_is_no_listing_of_everything() -> None:
    """DNSWL answers 127.0.0.255 ("your resolver is blocked") to every question, its
    127.0.0.1 test point included: that is its error answer, not a list of everything."""
    from lookupd.dnsbl.codes import parse_codes
    from lookupd.dnsbl.health import judge
    from lookupd.dnsbl.names import probe_points

    points = probe_points("ip", ("ipv4",))
    blocked = [(p, DnsAnswer(Status.FOUND, ("127.0.0.255",), "", 0.0)) for p in points]
    own = parse_codes(("127.0.0.255",))
    assert judge(blocked, "", own).quarantine == ""
    assert "127.0.0.255" in judge(blocked, "", own).note
    assert judge(blocked).quarantine == "lists-everything"


def test_a_list_whose_must_not_list_test_point_got_no_answer_is_not_trusted() -> None:
    """A list that lists everything, whose 127.0.0.1 answer was lost (a loaded machine, a
    dropped packet), must not come out trusted on its 127.0.0.2 answer alone."""
    from lookupd.dnsbl.health import judge, standing
    from lookupd.dnsbl.names import probe_points

    listed, must_not = probe_points("ip", ("ipv4",))
    outcomes = [(listed, DnsAnswer(Status.FOUND, ("127.0.0.2",), "", 0.0)),
                (must_not, DnsAnswer(Status.UNKNOWN, (), "timeout", 0.0))]
    health = judge(outcomes)
    assert health.quarantine == "not-answering" and standing(health) == "quarantined"
    assert "(127.0.0.1) got no answer (timeout)" in health.note
