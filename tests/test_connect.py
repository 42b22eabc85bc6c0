"""The `connect` policy, reply and log line (pure, no sockets), and the list files behind it."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from support import EXIM

from lookupd.allowlist import ListFile, ListFiles, Match, parse_key, parse_lines
from lookupd.config import ConnectConfig
from lookupd.connect import (
    INCIDENTS_MESSAGE,
    ConnectChecker,
    ConnectRequest,
    Facts,
    Verdict,
    decide,
    log_line,
    parse_args,
    render,
)
from lookupd.dnsbl.source import Cached
from lookupd.dnsbl.verdict import DnsblResult, ListAnswer, PtrResult
from lookupd.errors import BadRequest
from lookupd.geoip import AsnResult, CountryResult
from lookupd.incidents import IncidentsResult
from lookupd.outcome import Status

FOUND, NOT_FOUND, UNKNOWN = Status.FOUND, Status.NOT_FOUND, Status.UNKNOWN
LISTED = DnsblResult(FOUND, 1.0, (ListAnswer("bl.test", 1.0, FOUND, ("127.0.0.2",)),
                                  ListAnswer("cop.test", 1.0, FOUND, ("127.0.0.2", "127.0.0.4"))))


def facts(ip: str = "81.2.69.142", port: int | None = 25, *, country: str | Status = "GB",
          incidents: int | Status = 0, dnsbl: DnsblResult | Status = NOT_FOUND,
          ptr: PtrResult | None = None, allow: Match | None = None,
          access: Match | None = None, helo: DnsblResult | Status = NOT_FOUND,
          helo_name: str = "") -> Facts:
    """Facts as the sources would have fetched them; a Status means "no value, this status"."""
    return Facts(
        ConnectRequest(ip_address(ip), port, helo_name or ("" if helo is NOT_FOUND
                                                           else "mail.spam-helo.net")),
        CountryResult(FOUND, country) if isinstance(country, str) else CountryResult(country),
        AsnResult(FOUND, 64496, "Example Net"),
        (IncidentsResult(FOUND if incidents else NOT_FOUND, incidents)
         if isinstance(incidents, int) else IncidentsResult(incidents)),
        dnsbl if isinstance(dnsbl, DnsblResult) else DnsblResult(dnsbl),
        ptr or PtrResult(FOUND, "mail.example.net", "yes"),
        allow or Match(NOT_FOUND),
        access,
        helo if isinstance(helo, DnsblResult) else DnsblResult(helo),
    )


CONFIG = ConnectConfig()
SUBMISSION = ConnectConfig(submission_countries=("GB",))


# --- parsing ---------------------------------------------------------------------------------

def test_parse_args() -> None:
    assert parse_args(("192.0.2.1",)) == ConnectRequest(ip_address("192.0.2.1"))
    assert parse_args(("::ffff:192.0.2.1", "587")) == ConnectRequest(ip_address("192.0.2.1"), 587)
    # exim -bh without -oMi gives $received_port -1: no port, not an error.
    assert parse_args(("2001:db8::1", "-1")).port is None
    assert parse_args(("192.0.2.1", "25", "helo.example", "x")).helo == "helo.example x"
    assert parse_args(()).ip is None
    with pytest.raises(BadRequest, match="not an IP address"):
        parse_args(("mail.example.com", "25"))


# --- the policy --------------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "config", "expect"), [
    (facts(), CONFIG, ("accept", "none")),
    (facts(incidents=42), CONFIG, ("deny", "incidents")),
    (facts(incidents=10), CONFIG, ("accept", "none")),  # more than the threshold: 11
    (facts(incidents=11), CONFIG, ("deny", "incidents")),
    (facts(incidents=500), ConnectConfig(incidents_threshold=0), ("accept", "none")),
    (facts(dnsbl=LISTED), CONFIG, ("deny", "dnsbl")),
    (facts(dnsbl=LISTED), ConnectConfig(deny_on_dnsbl=False), ("accept", "none")),
    (facts(country="SE"), ConnectConfig(deny_countries=("SE",)), ("deny", "country")),
    (facts(country="SE"), ConnectConfig(allow_countries=("GB",)), ("deny", "country")),
    (facts(country="GB"), ConnectConfig(allow_countries=("GB",)), ("accept", "none")),
    (facts(country=NOT_FOUND), ConnectConfig(allow_countries=("GB",)), ("accept", "none")),
    (facts(ptr=PtrResult(NOT_FOUND, fcrdns="no")), ConnectConfig(deny_no_ptr=True),
     ("deny", "no_ptr")),
    (facts(ptr=PtrResult(NOT_FOUND, fcrdns="no")), CONFIG, ("accept", "none")),
    # Both rules match: the first in policy order gives the reason.
    (facts(incidents=42, dnsbl=LISTED), CONFIG, ("deny", "incidents")),
    # The allowlist bypasses everything.
    (facts(incidents=42, dnsbl=LISTED, allow=Match(FOUND, Path("/etc/exim4/relay_from_hosts"))),
     ConnectConfig(deny_countries=("GB",), deny_no_ptr=True), ("accept", "allowlist")),
])
def test_decide(case: Facts, config: ConnectConfig, expect: tuple[str, str]) -> None:
    verdict = decide(case, config)
    assert (verdict.action, verdict.rule) == expect
    assert verdict.would == "none"


HELO_LISTED = DnsblResult(FOUND, 1.0, (ListAnswer("dbl.test", 1.0, FOUND, ("127.0.1.2",)),))


@pytest.mark.parametrize(("case", "config", "expect"), [
    (facts(helo=HELO_LISTED), CONFIG, ("deny", "helo_dbl", "none")),
    (facts(helo=HELO_LISTED), ConnectConfig(deny_on_helo_dbl=False), ("accept", "none", "none")),
    (facts(helo=HELO_LISTED), ConnectConfig(log_only=("helo_dbl",)),
     ("accept", "helo_dbl", "deny")),
    # The IP's lists come first; the HELO rule does not replace them.
    (facts(dnsbl=LISTED, helo=HELO_LISTED), CONFIG, ("deny", "dnsbl", "none")),
    # A HELO the lists cannot judge refuses nobody; the allowlist bypasses it.
    (facts(helo=UNKNOWN), CONFIG, ("accept", "none", "none")),
    (facts(helo=HELO_LISTED, allow=Match(FOUND, Path("/x"))), CONFIG,
     ("accept", "allowlist", "none")),
])
def test_helo_rule(case: Facts, config: ConnectConfig, expect: tuple[str, str, str]) -> None:
    verdict = decide(case, config)
    assert (verdict.action, verdict.rule, verdict.would) == expect


def test_helo_is_its_own_key_and_dnsbl_keeps_its_meaning() -> None:
    case = facts(helo=HELO_LISTED, helo_name="Mail.Spam-HELO.net")
    verdict = decide(case, CONFIG)
    assert verdict.reason == "Rejected - HELO name Mail.Spam-HELO.net is listed at dbl.test"
    line = render(verdict, case)
    assert " dnsbl=clean dnsbl_lists=\"\" " in line  # the IP's lists: nothing
    assert line.endswith(" allowlisted=no helo_dbl=listed strikes=0")
    assert log_line(verdict, case) == (
        "connect deny: [81.2.69.142] port 25 helo Mail.Spam-HELO.net rule=helo_dbl country=GB "
        "incidents=0 dnsbl=clean: Rejected - HELO name Mail.Spam-HELO.net is listed at "
        "dbl.test")
    assert render(decide(facts(helo=UNKNOWN), CONFIG), facts(helo=UNKNOWN)).endswith(
        " helo_dbl=unknown strikes=0")


def test_incidents_reason_is_the_classic_message() -> None:
    assert decide(facts(incidents=42), CONFIG).reason == INCIDENTS_MESSAGE
    assert INCIDENTS_MESSAGE == "Blacklisted: Denied access - history of unwanted activity"


def test_dnsbl_reason_names_each_list_once() -> None:
    assert decide(facts(dnsbl=LISTED), CONFIG).reason == \
        "Rejected - 81.2.69.142 is listed at bl.test, cop.test"


def test_a_source_that_cannot_answer_never_refuses() -> None:
    """Every source unknown, every rule on: accept."""
    strict = ConnectConfig(deny_countries=("GB",), allow_countries=("SE",), deny_no_ptr=True,
                           submission_countries=("SE",))
    unknown = facts(port=587, country=UNKNOWN, incidents=UNKNOWN, dnsbl=UNKNOWN,
                    ptr=PtrResult(UNKNOWN, fcrdns="unknown"), access=Match(UNKNOWN))
    assert decide(unknown, strict) == Verdict("accept", "none", "no rule matched")


@pytest.mark.parametrize(("case", "config", "action"), [
    (facts("89.160.20.112", 587, country="SE"), SUBMISSION, "defer"),
    (facts("89.160.20.112", 465, country="SE"), SUBMISSION, "defer"),
    (facts("89.160.20.112", 587, country="SE", access=Match(NOT_FOUND)), SUBMISSION, "defer"),
    (facts("81.2.69.142", 587, country="GB"), SUBMISSION, "accept"),
    # IMAP-before-submission: logged in from here, so allowed from any country.
    (facts("89.160.20.112", 587, country="SE", access=Match(FOUND, Path("/x"))), SUBMISSION,
     "accept"),
    # Not a submission port, no rule for submission, or cannot tell: never deferred.
    (facts("89.160.20.112", 25, country="SE"), SUBMISSION, "accept"),
    (facts("89.160.20.112", None, country="SE"), SUBMISSION, "accept"),
    (facts("89.160.20.112", 587, country="SE"), CONFIG, "accept"),
    (facts("89.160.20.112", 587, country=UNKNOWN), SUBMISSION, "accept"),
    (facts("89.160.20.112", 587, country="SE", access=Match(UNKNOWN)), SUBMISSION, "accept"),
    # A LAN client has no country: the country rules do not apply to it.
    (facts("192.168.1.20", 587, country=NOT_FOUND), SUBMISSION, "accept"),
    # A public address without a country (anycast) is not in the allowed countries.
    (facts("214.1.1.1", 587, country=NOT_FOUND), SUBMISSION, "defer"),
])
def test_submission_ports(case: Facts, config: ConnectConfig, action: str) -> None:
    verdict = decide(case, config)
    assert verdict.action == action
    if action == "defer":
        assert verdict.rule == "submission"
        assert "IMAP" in verdict.reason


def test_deny_rules_come_before_the_submission_rule() -> None:
    verdict = decide(facts("89.160.20.112", 587, country="SE", incidents=42), SUBMISSION)
    assert (verdict.action, verdict.rule) == ("deny", "incidents")


def test_log_only_rules_say_what_they_would_do() -> None:
    config = ConnectConfig(log_only=("dnsbl", "submission"), submission_countries=("GB",))
    verdict = decide(facts(dnsbl=LISTED), config)
    assert (verdict.action, verdict.rule, verdict.would) == ("accept", "dnsbl", "deny")
    verdict = decide(facts("89.160.20.112", 587, country="SE"), config)
    assert (verdict.action, verdict.rule, verdict.would) == ("accept", "submission", "defer")
    # A rule that is enforced still refuses, even after a log-only one matched.
    verdict = decide(facts(dnsbl=LISTED, incidents=42), ConnectConfig(log_only=("dnsbl",)))
    assert (verdict.action, verdict.rule, verdict.would) == ("deny", "incidents", "none")


def test_unreadable_allowlist_turns_a_deny_into_log_only() -> None:
    verdict = decide(facts(incidents=42, allow=Match(UNKNOWN)), CONFIG)
    assert (verdict.action, verdict.rule, verdict.would) == ("accept", "incidents", "deny")
    assert "allowlist" in verdict.reason


def test_no_address_is_accepted() -> None:
    local = dataclasses.replace(facts(incidents=42), request=ConnectRequest(None))
    assert decide(local, CONFIG).action == "accept"


# --- the reply ---------------------------------------------------------------------------------

KEYS = ["action", "rule", "would", "reason", "country", "asn", "incidents", "dnsbl",
        "dnsbl_lists", "ptr", "fcrdns", "allowlisted", "helo_dbl", "strikes"]


def test_render_has_every_key_in_order() -> None:
    line = render(decide(facts(incidents=42, dnsbl=LISTED), CONFIG),
                  facts(incidents=42, dnsbl=LISTED))
    assert line == (
        'action=deny rule=incidents would=none reason="Blacklisted: Denied access - history of '
        'unwanted activity" country=GB asn=AS64496 incidents=42 dnsbl=listed '
        'dnsbl_lists=bl.test:127.0.0.2,cop.test:127.0.0.2,cop.test:127.0.0.4 '
        'ptr=mail.example.net fcrdns=yes allowlisted=no helo_dbl=clean strikes=0')


def test_render_unknown_and_empty_fields() -> None:
    case = facts(country=UNKNOWN, incidents=UNKNOWN, dnsbl=UNKNOWN,
                 ptr=PtrResult(UNKNOWN, fcrdns="unknown"))
    case = dataclasses.replace(case, asn=AsnResult(NOT_FOUND))
    line = render(decide(case, CONFIG), case)
    assert line == ('action=accept rule=none would=none reason="no rule matched" country=?? '
                    'asn=-- incidents=?? dnsbl=unknown dnsbl_lists="" ptr=?? fcrdns=unknown '
                    'allowlisted=no helo_dbl=clean strikes=0')
    no_ptr = facts(country=NOT_FOUND, ptr=PtrResult(NOT_FOUND, fcrdns="no"))
    assert 'country=-- ' in render(decide(no_ptr, CONFIG), no_ptr)
    assert ' ptr="" fcrdns=no ' in render(decide(no_ptr, CONFIG), no_ptr)


@pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")
def test_render_reads_back_with_exims_extract(tmp_path: Path) -> None:
    """Every field comes back from Exim's own ${extract}, quotes and backslashes included."""
    tricky = Verdict("deny", "dnsbl", 'Listed: "spam" \\ see http://x.test/?a=b c=d')
    case = facts(ptr=PtrResult(FOUND, 'we"ird name', "no"), dnsbl=LISTED, helo=UNKNOWN)
    line = render(tricky, case)
    config = tmp_path / "exim.conf"
    config.write_text("")
    os.chmod(config, 0o644)
    # One expansion a line on stdin: Exim caps each -be command-line argument at 256 bytes.
    exprs = "".join(f"${{extract{{{key}}}{{\\N{line}\\N}}}}\n" for key in KEYS)
    out = subprocess.run([EXIM, "-C", str(config), "-be"], input=exprs.encode(),
                         capture_output=True, check=True, timeout=20).stdout.decode()
    assert [v.removeprefix("> ") for v in out.splitlines()][:len(KEYS)] == [
        "deny", "dnsbl", "none", 'Listed: "spam" \\ see http://x.test/?a=b c=d', "GB",
        "AS64496", "0", "listed", "bl.test:127.0.0.2,cop.test:127.0.0.2,cop.test:127.0.0.4",
        'we"ird name', "no", "no", "unknown", "0"]


def test_reply_is_printable_ascii_and_bounded() -> None:
    verdict = Verdict("deny", "dnsbl", "\u00e9\x00\n" + "x" * 1000)
    line = render(verdict, facts())
    assert line.isascii() and line.isprintable()
    assert len(line) < 512


def test_log_line_for_refusals_only() -> None:
    deny = facts(incidents=42)
    assert log_line(decide(deny, CONFIG), deny) == (
        "connect deny: [81.2.69.142] port 25 rule=incidents country=GB incidents=42 "
        "dnsbl=clean: Blacklisted: Denied access - history of unwanted activity")
    assert log_line(decide(facts(), CONFIG), facts()) is None
    logged = decide(facts(dnsbl=LISTED), ConnectConfig(log_only=("dnsbl",)))
    line = log_line(logged, facts(dnsbl=LISTED))
    assert line is not None and line.startswith("connect would deny (log-only): ")


# --- list files ----------------------------------------------------------------------------------

def test_parse_lines_takes_exims_iplsearch_forms() -> None:
    parsed = parse_lines([
        "# relay_from_hosts", "", "192.0.2.1", "10.0.0.0/8: office", '"2001:db8::/32": v6',
        "2001:db8:ffff::/48 bare v6 key", "198.51.100.7:no-space-data", "!10.9.0.0/16",
        "::ffff:203.0.113.0/120", "203.0.113.200/24 host bits set",
        "mail.example.com", "*", '"unbalanced'])
    assert [n for n, _ in parsed.skipped] == [11, 12, 13]
    member = {ip: ip_address(ip) in parsed.nets for ip in (
        "192.0.2.1", "192.0.2.2", "10.1.2.3", "10.9.0.1", "2001:db8::25", "2001:db9::1",
        "198.51.100.7", "203.0.113.7", "::ffff:10.1.2.3")}
    assert member == {
        "192.0.2.1": True, "192.0.2.2": False, "10.1.2.3": True,
        "10.9.0.1": False,  # negated: never listed
        "2001:db8::25": True, "2001:db9::1": False, "198.51.100.7": True,
        "203.0.113.7": True, "::ffff:10.1.2.3": True}


def test_parse_key_blank_and_comment_lines() -> None:
    assert parse_key("   ") is None
    assert parse_key("  # 192.0.2.1") is None


def test_list_file_reloads_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "whitelist_connect_hosts"
    listed = ListFile(path, check_interval=0)
    assert ip_address("192.0.2.1") not in listed
    assert listed.status is NOT_FOUND  # missing: lists nobody
    path.write_text("192.0.2.1\n")
    assert ip_address("192.0.2.1") in listed
    assert listed.status is FOUND
    path.write_text("192.0.2.2\n# and a longer file\n")
    assert ip_address("192.0.2.1") not in listed
    assert ip_address("192.0.2.2") in listed
    path.unlink()
    assert ip_address("192.0.2.2") not in listed
    assert listed.status is NOT_FOUND


def test_list_files_version_changes_with_what_they_list(tmp_path: Path) -> None:
    """ListFiles.version() changes whenever `match` may answer differently, and only then:
    a file still missing, or unchanged, keeps it."""
    now = [100.0]
    missing, hosts = tmp_path / "imap_before_submission", tmp_path / "hosts"
    hosts.write_text("192.0.2.1\n")
    files = ListFiles((hosts, missing), check_interval=1.0, clock=lambda: now[0])
    seen = [files.version()]
    for _ in range(3):  # looked at again: nothing changed
        now[0] += 1.0
        assert files.version() == seen[-1]
    hosts.write_text("192.0.2.2\n")
    now[0] += 1.0
    seen.append(files.version())
    missing.write_text("192.0.2.3\n")
    now[0] += 1.0
    seen.append(files.version())
    missing.unlink()
    now[0] += 1.0
    seen.append(files.version())
    hosts.unlink()
    hosts.mkdir()  # unreadable now: it keeps its entries, so `match` answers the same
    now[0] += 1.0
    seen.append(files.version())
    missing.mkdir()  # a missing file that cannot be read: `match` may not say "not listed"
    now[0] += 1.0
    seen.append(files.version())
    assert seen[:4] == sorted(set(seen[:4])) and seen[4] == seen[3] and seen[5] > seen[4]
    assert files.match(ip_address("192.0.2.2")).status is FOUND
    assert files.match(ip_address("192.0.2.9")).status is UNKNOWN


def test_list_file_looks_for_changes_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "hosts"
    path.write_text("192.0.2.1\n")
    listed = ListFile(path, check_interval=1.0, clock=lambda: now[0])
    assert ip_address("192.0.2.1") in listed
    path.write_text("192.0.2.99\n")
    assert ip_address("192.0.2.1") in listed  # not looked at again yet
    now[0] += 1.0
    assert ip_address("192.0.2.1") not in listed


def test_unreadable_list_file_is_unknown_then_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.mkdir()  # reading a directory fails: what an unreadable file looks like to lookupd
    files = ListFiles([path], check_interval=0)
    assert files.match(ip_address("192.0.2.1")) == Match(UNKNOWN)
    path.rmdir()
    path.write_text("192.0.2.1\n")
    assert files.match(ip_address("192.0.2.1")) == Match(FOUND, path)
    path.unlink()
    path.mkdir()
    assert files.match(ip_address("192.0.2.1")) == Match(FOUND, path)  # last good content


def test_list_files_first_match_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("192.0.2.0/24\n")
    second.write_text("192.0.2.1\n198.51.100.0/24\n")
    files = ListFiles([first, second], check_interval=0)
    assert files.match(ip_address("192.0.2.1")) == Match(FOUND, first)
    assert files.match(ip_address("198.51.100.9")) == Match(FOUND, second)
    assert files.match(ip_address("203.0.113.1")) == Match(NOT_FOUND)
    assert not ListFiles([])


def test_strikes_rule_denies_above_the_threshold_log_only_first() -> None:
    struck = dataclasses.replace(facts(), strikes=6)
    config = ConnectConfig(strikes_threshold=5)
    verdict = decide(struck, config)
    assert (verdict.action, verdict.rule) == ("deny", "strikes")
    assert render(verdict, struck).endswith(" strikes=6")
    assert decide(dataclasses.replace(facts(), strikes=5), config).action == "accept"
    logged = decide(struck, ConnectConfig(strikes_threshold=5, log_only=("strikes",)))
    assert (logged.action, logged.rule, logged.would) == ("accept", "strikes", "deny")
    assert decide(struck, ConnectConfig()).action == "accept"  # 0: off


# --- warm replies: reused only while no source would answer differently ------------------------


class FakeDns:
    """The DNS source's answers from its cache, with its generation and its own clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.generation = 0
        self.expires = 2000.0  # the earliest expiry of the cached answers
        self.dnsbl = DnsblResult(NOT_FOUND)
        self.counted = 0

    def _cached(self, result: Any) -> Cached[Any]:
        def count() -> None:
            self.counted += 1

        return Cached(result, count, self.expires)

    def peek_ip(self, ip: object) -> Cached[DnsblResult]:
        return self._cached(self.dnsbl)

    def peek_ptr(self, ip: object) -> Cached[PtrResult]:
        return self._cached(PtrResult(FOUND, "mail.example.net", "yes"))

    def peek_smtp_name(self, text: str, client: object = None) -> Cached[DnsblResult]:
        return self._cached(DnsblResult(NOT_FOUND))

    def holds(self, generation: int, expires: float) -> bool:
        return generation == self.generation and self.now < expires


class FakeGeoIP:
    def __init__(self) -> None:
        self.code, self.file = "GB", 1
        self.broken = False

    def country(self, ip: object) -> CountryResult:
        if self.broken:
            raise RuntimeError("a bug")
        return CountryResult(FOUND, self.code)

    def asn(self, ip: object) -> AsnResult:
        return AsnResult(FOUND, 64496, "Example Net")

    def version(self) -> object:
        return self.file


class FakeIncidents:
    def __init__(self) -> None:
        self.count_, self.index, self.until = 0, 1, float("inf")

    def count(self, ip: object) -> IncidentsResult:
        return IncidentsResult(FOUND if self.count_ else NOT_FOUND, self.count_,
                               until=self.until)

    def version(self) -> object:
        return self.index


class FakeStrikes:
    def __init__(self) -> None:
        self.strikes = 0

    def count(self, ip: object) -> int:
        return self.strikes

    def key(self, ip: object) -> str:
        return str(ip)

    def count_key(self, key: str) -> int:
        return self.strikes


def test_a_warm_reply_is_reused_only_while_every_source_would_say_the_same(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`replay` gives the reply `answer_now` gave the same words, counted and logged again,
    until any source it came from changes: the DNS results' generation or expiry, the GeoIP
    file, the incidents index or its window, the allowlist or access file, the strikes. Then
    it gives nothing, and `answer_now` decides again from the sources."""
    caplog.set_level(logging.INFO, logger="lookupd.connect")
    dns, geoip, incidents, strikes = FakeDns(), FakeGeoIP(), FakeIncidents(), FakeStrikes()
    allow, access = tmp_path / "allowlist", tmp_path / "imap_before_submission"
    config = ConnectConfig(allowlist_files=(allow,), submission_access_file=access,
                           deny_countries=("KR",), strikes_threshold=1,
                           submission_countries=("SE",))
    actions: list[str] = []
    checker = ConnectChecker(config, geoip, incidents, dns, strikes=strikes,
                             on_verdict=lambda verdict, facts, n: actions.append(verdict.action))
    # The list files are looked at on every request here, not once a second.
    checker.allowlist = ListFiles((allow,), check_interval=0)
    checker.access = ListFiles((access,), check_interval=0)
    words = ("81.2.69.142", "25")

    def fresh(words: tuple[str, ...] = words) -> dict[str, str]:
        """After a change: no reuse; decided again, then reused."""
        assert checker.replay(words) is None
        reply = checker.answer_now(parse_args(words), words)
        assert reply is not None and checker.replay(words) == reply
        return dict(pair.split("=", 1) for pair in shlex.split(reply))

    assert checker.replay(words) is None
    first = checker.answer_now(parse_args(words), words)
    assert first is not None and dns.counted == 2  # DNSBL and PTR taken (no HELO yet)
    assert [checker.replay(words) for _ in range(3)] == [first] * 3
    assert dns.counted == 8 and actions == ["accept"] * 4  # counted for every reply

    dns.generation += 1  # a list quarantined, an answer evicted or replaced
    dns.dnsbl = LISTED
    assert fresh()["dnsbl"] == "listed"
    dns.now = dns.expires  # the earliest DNS answer expired: asked again, a new expiry
    dns.dnsbl, dns.expires = DnsblResult(NOT_FOUND), dns.expires + 1000
    assert fresh()["dnsbl"] == "clean"

    geoip.code, geoip.file = "KR", 2  # a new database file
    assert fresh()["action"] == "deny"
    denies = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("connect deny: [81.2.69.142] port 25 rule=country ")]
    assert len(denies) == 2  # each deny, new or reused, logs its line
    geoip.code, geoip.file = "GB", 3

    incidents.count_, incidents.index = 42, 2  # the firewall wrote the database
    assert fresh()["incidents"] == "42"
    # A Sympl window: the count holds until its oldest row leaves the window.
    incidents.until, incidents.index = time.time() + 0.2, 3
    assert fresh()["incidents"] == "42"
    time.sleep(0.25)
    assert checker.replay(words) is None
    incidents.count_, incidents.until, incidents.index = 0, float("inf"), 4
    assert fresh()["incidents"] == "0"

    allow.write_text("81.2.69.0/24\n")
    assert fresh()["allowlisted"] == "yes"
    allow.unlink()
    assert fresh()["allowlisted"] == "no"
    submission = ("81.2.69.142", "587")  # a GB client, submission open to SE only
    assert fresh(submission)["action"] == "defer"
    access.write_text("81.2.69.142\n")  # in the IMAP-before-submission file now
    assert fresh(submission)["action"] == "accept"

    strikes.strikes = 2  # struck meanwhile: not a file, counted again on every request
    assert fresh()["rule"] == "strikes"
    strikes.strikes = 0
    assert fresh()["action"] == "accept"

    geoip.broken = True  # a lookup that fails: its fact unknown, the reply not kept
    broken = checker.answer_now(parse_args(words), words)
    assert broken is not None and "country=??" in broken and checker.replay(words) is None
    geoip.broken = False
    assert fresh()["country"] == "GB"
