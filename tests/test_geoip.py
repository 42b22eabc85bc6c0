"""GeoIP source against MaxMind's own test databases, broken ones, and live replacement."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from geoip_expect import NO_COUNTRY, asn_expectations, country_expectations

from lookupd import geoip
from lookupd.config import GeoIPConfig
from lookupd.geoip import (
    AsnResult,
    CountryResult,
    GeoIPSource,
    Refused,
    check_search_tree,
    open_verified,
)
from lookupd.ipaddr import is_public, parse_ip
from lookupd.outcome import Status

MAXMIND = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "maxmind"
BAD = sorted((MAXMIND / "bad").glob("*.mmdb"))
# An address whose answer differs between these two, to see which one is serving.
MARKER = "2001:220::"
MARKER_BEFORE, MARKER_AFTER = "SE", "KR"
BEFORE_DB, AFTER_DB = "GeoIP2-Country-Test.mmdb", "GeoLite2-City-Test.mmdb"


def config(tmp_path: Path, country: Path | None, asn: Path | None = None,
           **kw: Any) -> GeoIPConfig:
    # Always name both files: unset would look in /var/lib/GeoIP on the test machine.
    return GeoIPConfig(country_db=country, asn_db=asn or tmp_path / "no-asn.mmdb", **kw)


@pytest.fixture
async def make_source() -> AsyncIterator[Callable[[GeoIPConfig], Awaitable[GeoIPSource]]]:
    sources: list[GeoIPSource] = []

    async def make(cfg: GeoIPConfig) -> GeoIPSource:
        src = GeoIPSource(cfg)
        await src.open()
        sources.append(src)
        return src

    yield make
    for src in sources:
        await src.close()


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lookupd.geoip" and r.levelno == logging.WARNING
            and text in r.getMessage()]


def code_of(result: CountryResult) -> str:
    assert result.status is not Status.UNKNOWN, result
    return result.code if result.status is Status.FOUND else NO_COUNTRY


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def replace(src: Path, dst: Path) -> None:
    """Put a copy of src at dst by rename, as geoipupdate does."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# Every network of the test databases.


@pytest.mark.parametrize("name", ["GeoIP2-Country-Test", "GeoLite2-Country-Test",
                                  "GeoIP2-City-Test", "GeoLite2-City-Test"])
@pytest.mark.parametrize("field", ["country", "registered_country"])
async def test_every_network_answers_right(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, name: str, field: str) -> None:
    src = await make_source(config(tmp_path, MAXMIND / f"{name}.mmdb", country_field=field))
    expected = country_expectations(MAXMIND / f"{name}.json", field)
    assert len(expected) > 400
    wrong = [(addr, want, code_of(src.country(parse_ip(addr))))
             for addr, want in expected if code_of(src.country(parse_ip(addr))) != want]
    assert wrong == []
    assert {want for _, want in expected} >= {NO_COUNTRY, "GB", "JP"}


async def test_known_answers(make_source: Callable[[GeoIPConfig], Awaitable[GeoIPSource]],
                             tmp_path: Path) -> None:
    src = await make_source(config(tmp_path, MAXMIND / "GeoIP2-Country-Test.mmdb"))
    assert src.country(parse_ip("81.2.69.142")) == CountryResult(Status.FOUND, "GB")
    assert src.country(parse_ip("::ffff:81.2.69.142")) == CountryResult(Status.FOUND, "GB")
    assert src.country(parse_ip("89.160.20.112")).code == "SE"
    assert src.country(parse_ip("2001:218::1")).code == "JP"
    # Anycast: a record without a country is "no country", not a failure.
    assert src.country(parse_ip("214.1.1.1")).status is Status.NOT_FOUND
    assert src.country(parse_ip("1.1.1.1")).status is Status.NOT_FOUND  # not in the database
    assert src.country(None).status is Status.NOT_FOUND
    for private in ("10.1.2.3", "127.0.0.1", "192.168.1.1", "::1", "fe80::1", "fd00::1"):
        assert src.country(parse_ip(private)).status is Status.NOT_FOUND
    assert src.country_db is not None and src.country_db.database_type == "GeoIP2-Country"

    reg = await make_source(config(tmp_path, MAXMIND / "GeoIP2-Country-Test.mmdb",
                                   country_field="registered_country"))
    assert reg.country(parse_ip("81.2.69.142")).code == "US"


async def test_asn(make_source: Callable[[GeoIPConfig], Awaitable[GeoIPSource]],
                   tmp_path: Path) -> None:
    src = await make_source(config(tmp_path, MAXMIND / "GeoIP2-Country-Test.mmdb",
                                   asn=MAXMIND / "GeoLite2-ASN-Test.mmdb"))
    expected = asn_expectations(MAXMIND / "GeoLite2-ASN-Test.json")
    assert len(expected) > 1000
    for addr, number, org in expected:
        got = src.asn(parse_ip(addr))
        want = AsnResult(Status.FOUND, number, org) if number is not None \
            else AsnResult(Status.NOT_FOUND)
        assert got == want, addr
    assert src.asn(parse_ip("1.0.0.1")) == AsnResult(Status.FOUND, 15169, "Google Inc.")
    assert src.asn(parse_ip("81.2.69.142")).status is Status.NOT_FOUND
    assert src.asn(None).status is Status.NOT_FOUND


async def test_no_asn_database_is_unknown(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = await make_source(config(tmp_path, MAXMIND / "GeoIP2-Country-Test.mmdb"))
    result = src.asn(parse_ip("1.0.0.1"))
    assert result.status is Status.UNKNOWN and result.reason == "no ASN database"
    assert len(warnings_about(caplog, "no-asn.mmdb")) == 1


# ---------------------------------------------------------------------------------------------
# Missing and broken databases.


async def test_missing_configured_database(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "GeoLite2-Country.mmdb"
    src = await make_source(config(tmp_path, path, check_interval=0.02))
    for _ in range(5):
        result = src.country(parse_ip("81.2.69.142"))
        assert result.status is Status.UNKNOWN and result.reason == "no country database"
        await asyncio.sleep(0.03)
    msgs = warnings_about(caplog, str(path))
    assert len(msgs) == 1 and "geoipupdate" in msgs[0] and "??" in msgs[0]
    # It appears later: picked up without restart.
    replace(MAXMIND / BEFORE_DB, path)
    await eventually(lambda: src.country(parse_ip("81.2.69.142")).code == "GB")


async def test_no_database_found_anywhere(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = (tmp_path / "a" / "GeoLite2-Country.mmdb", tmp_path / "b" / "dbip.mmdb")
    monkeypatch.setattr(geoip, "GEOIP_COUNTRY_PATHS", candidates)
    src = await make_source(GeoIPConfig(asn_db=tmp_path / "none.mmdb", check_interval=0.02))
    assert src.country(parse_ip("81.2.69.142")).status is Status.UNKNOWN
    msgs = warnings_about(caplog, "no GeoIP country database found")
    assert len(msgs) == 1
    assert "apt install geoipupdate" in msgs[0] and "DB-IP" in msgs[0] and "??" in msgs[0]
    candidates[1].parent.mkdir()
    replace(MAXMIND / BEFORE_DB, candidates[1])
    await eventually(lambda: src.country(parse_ip("81.2.69.142")).code == "GB")


@pytest.mark.parametrize("bad", BAD, ids=[p.name for p in BAD])
async def test_bad_database_refused_at_open(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Path) -> None:
    src = await make_source(config(tmp_path, bad, check_interval=0.02))
    for _ in range(4):  # checks come and go: the same bad file is not retried or re-logged
        result = src.country(parse_ip("81.2.69.142"))
        assert result.status is Status.UNKNOWN
        assert result.reason == "country database unusable"
        await asyncio.sleep(0.03)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 2  # the refused file, and the missing ASN file
    assert len(warnings_about(caplog, f"{bad} refused")) == 1
    assert "geoipupdate" in warnings_about(caplog, f"{bad} refused")[0]


@pytest.mark.parametrize("bad", BAD, ids=[p.name for p in BAD])
async def test_bad_replacement_keeps_old_database(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Path) -> None:
    path = tmp_path / "GeoIP2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    src = await make_source(config(tmp_path, path, check_interval=0.02))
    assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE

    replace(bad, path)
    await eventually(lambda: bool(src.country(parse_ip(MARKER)) and
                                  warnings_about(caplog, "refused")))
    for _ in range(5):  # several more checks: still the old answers, no further warnings
        assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE
        assert src.country(parse_ip("81.2.69.142")).code == "GB"
        await asyncio.sleep(0.03)
    msgs = warnings_about(caplog, "refused")
    assert len(msgs) == 1 and str(path) in msgs[0] and "previous file" in msgs[0]

    replace(MAXMIND / AFTER_DB, path)  # a good one next week: picked up without restart
    await eventually(lambda: src.country(parse_ip(MARKER)).code == MARKER_AFTER)
    assert src.country_db is not None and src.country_db.database_type == "GeoLite2-City"


def corrupt_copies(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Same-type databases broken the ways a bad download or disk breaks them."""
    good = (MAXMIND / BEFORE_DB).read_bytes()
    node_count, node_bytes = 1704, 7  # GeoIP2-Country-Test: 28-bit records
    data = bytearray(good)

    def write(name: str, content: bytes) -> tuple[str, Path]:
        path = tmp_path / f"{name}.mmdb"
        path.write_bytes(content)
        return name, path

    yield write("truncated", good[:len(good) // 2])
    yield write("empty", b"")
    yield write("zeroed-root", bytes(node_bytes) + good[node_bytes:])
    past = bytearray(data)
    past[100 * node_bytes:100 * node_bytes + 3] = b"\xff\xff\xff"  # left record of node 100
    yield write("record-past-data", bytes(past))
    tail = bytearray(data)
    tree = node_count * node_bytes
    tail[tree:tree + 16] = b"\x01" * 16
    yield write("no-separator", bytes(tail))
    yield write("asn-as-country", (MAXMIND / "GeoLite2-ASN-Test.mmdb").read_bytes())
    marker = good.rfind(b"\xab\xcd\xefMaxMind.com")
    blank = bytearray(good)
    blank[tree + 16:marker] = bytes(marker - tree - 16)  # zeroes decode as empty maps
    yield write("blank-data", bytes(blank))
    noise = bytearray(good)
    noise[tree + 16:marker] = random.Random(7).randbytes(marker - tree - 16)
    yield write("random-data", bytes(noise))


async def test_same_type_corruption_refused(make_source: Callable[[GeoIPConfig], Awaitable[
        GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name, path in corrupt_copies(tmp_path):
        with pytest.raises(Refused) as info:
            open_verified(path, "country")
        assert str(info.value), name
        caplog.clear()
        src = await make_source(config(tmp_path, path))
        assert src.country(parse_ip("81.2.69.142")).status is Status.UNKNOWN, name
        assert len(warnings_about(caplog, f"{path} refused")) == 1, name


def write_in_place(src: Path, dst: Path) -> None:
    """Overwrite dst's contents in place, keeping its inode, as `cp src dst` does."""
    with open(dst, "r+b") as fh:
        fh.truncate(0)
        fh.write(src.read_bytes())


@pytest.fixture
def open_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths open_verified is called with, from now on."""
    calls: list[Path] = []
    real = geoip.open_verified

    def counted(path: Path, kind: geoip.Kind) -> geoip.OpenedDb:
        calls.append(path)
        return real(path, kind)

    monkeypatch.setattr(geoip, "open_verified", counted)
    return calls


async def test_file_written_in_place_is_taken_once_settled(make_source: Callable[[GeoIPConfig],
        Awaitable[GeoIPSource]], tmp_path: Path, open_calls: list[Path]) -> None:
    path = tmp_path / "GeoIP2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    src = await make_source(config(tmp_path, path, check_interval=0.05))
    open_calls.clear()
    assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE
    write_in_place(MAXMIND / AFTER_DB, path)
    await asyncio.sleep(0.06)
    # The first check sees the file changed in place (a cp may still be writing): not read.
    assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE
    await asyncio.sleep(0.02)
    assert open_calls == []
    await asyncio.sleep(0.06)
    # The next check sees it unchanged: read, verified and taken.
    await eventually(lambda: src.country(parse_ip(MARKER)).code == MARKER_AFTER)
    assert open_calls == [path]


async def test_unsettled_bad_file_is_reported_only_once_settled(make_source: Callable[
        [GeoIPConfig], Awaitable[GeoIPSource]], tmp_path: Path, open_calls: list[Path],
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "GeoIP2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    src = await make_source(config(tmp_path, path, check_interval=0.05))
    open_calls.clear()
    half = tmp_path / "half.mmdb"
    half.write_bytes((MAXMIND / AFTER_DB).read_bytes()[:10_000])
    os.replace(half, path)  # a new file, caught half-written: tried at once...
    await asyncio.sleep(0.06)
    assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE
    await eventually(lambda: len(open_calls) == 1 and src._country._task is not None
                     and src._country._task.done())
    assert warnings_about(caplog, "refused") == []  # ...but not reported: it may be growing
    await asyncio.sleep(0.06)
    # Unchanged at the next check: tried again and refused, once.
    await eventually(lambda: bool(src.country(parse_ip(MARKER))) and
                     bool(warnings_about(caplog, "refused")))
    for _ in range(4):
        assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE
        await asyncio.sleep(0.06)
    msgs = warnings_about(caplog, "refused")
    assert len(msgs) == 1 and "still being written?" in msgs[0], msgs
    assert open_calls == [path, path]


def test_database_is_read_from_a_private_copy(tmp_path: Path) -> None:
    """The reader maps a sealed copy in memory, not the file: cutting the file cannot cut it."""
    path = tmp_path / "GeoIP2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    opened = open_verified(path, "country")
    try:
        maps = Path("/proc/self/maps").read_text()
        assert "memfd:lookupd-geoip:GeoIP2-Country.mmdb" in maps
        assert str(path) not in maps
        path.write_bytes(b"")
        record = opened.reader.get(IPv4Address("81.2.69.142"))
        assert geoip.country_from_record(record, "country") == CountryResult(Status.FOUND, "GB")
    finally:
        opened.reader.close()


def test_no_memory_copy_is_a_clear_refusal(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str, flags: int = 0) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refuse)  # as a seccomp filter without @ipc would
    with pytest.raises(Refused, match="^cannot make a copy in memory: Operation not permitted$"):
        open_verified(MAXMIND / BEFORE_DB, "country")


async def test_sighup_reload_retries_and_picks_up(make_source: Callable[[GeoIPConfig],
        Awaitable[GeoIPSource]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "GeoIP2-Country.mmdb"
    shutil.copyfile(MAXMIND / BEFORE_DB, path)
    src = await make_source(config(tmp_path, path, check_interval=3600))
    replace(MAXMIND / AFTER_DB, path)
    before = src.version()  # what answers were kept beside (the connect reply cache)
    assert src.country(parse_ip(MARKER)).code == MARKER_BEFORE  # next check is an hour away
    assert src.version() == before
    await src.reload()
    assert src.country(parse_ip(MARKER)).code == MARKER_AFTER
    after = src.version()
    assert after != before
    replace(BAD[1], path)
    await src.reload()
    await src.reload()  # asked twice: tried (and reported) twice
    assert len(warnings_about(caplog, "refused")) == 2
    assert src.country(parse_ip(MARKER)).code == MARKER_AFTER
    assert src.version() == after  # refused: the same database answers


async def test_lookup_without_running_loop_does_not_fail(tmp_path: Path) -> None:
    src = GeoIPSource(config(tmp_path, MAXMIND / BEFORE_DB, check_interval=0.01))
    await src.open()
    try:
        result = await asyncio.to_thread(src.country, parse_ip("81.2.69.142"))
        assert result.code == "GB"
    finally:
        await src.close()
    assert src.country(parse_ip("81.2.69.142")).status is Status.UNKNOWN


# ---------------------------------------------------------------------------------------------
# The search-tree check on synthetic trees, for every record size.


def pack(records: list[int], record_size: int) -> bytes:
    out = bytearray()
    for left, right in zip(records[0::2], records[1::2], strict=True):
        if record_size == 28:
            out += left.to_bytes(4, "big")[1:]
            out.append((left >> 24) << 4 | right >> 24)
            out += right.to_bytes(4, "big")[1:]
        else:
            width = record_size // 8
            out += left.to_bytes(width, "big") + right.to_bytes(width, "big")
    return bytes(out)


@pytest.mark.parametrize("record_size", [24, 28, 32])
def test_search_tree_check_finds_each_fault(record_size: int) -> None:
    rng = random.Random(record_size)
    node_count, data_size = 70_000, 5_000  # more than one chunk of nodes
    top = (1 << record_size) - 1

    def tree(records: list[int]) -> str | None:
        return check_search_tree(pack(records, record_size), node_count, record_size, data_size)

    # A chain: node i links to i+1 (the last one to data); every other record is data or empty.
    good = []
    for i in range(node_count):
        good.append(i + 1 if i + 1 < node_count else node_count + 16)
        good.append(rng.choice([node_count, node_count + 16 + rng.randrange(data_size)]))
    assert tree(good) is None
    for index, value, problem in [
        (rng.randrange(2 * node_count), node_count + 16 + data_size, "past the data"),
        (rng.randrange(2 * node_count), top, "past the data"),
        (rng.randrange(2 * node_count), node_count + 7, "separator"),
        (2 * rng.randrange(1, node_count) + 1, 0, "root"),
        (2 * rng.randrange(node_count - 1), node_count, "links"),
    ]:
        broken = list(good)
        broken[index] = value
        assert problem in (tree(broken) or ""), (index, value)


# ---------------------------------------------------------------------------------------------
# Address parsing shared by the sources.


def test_parse_ip() -> None:
    assert parse_ip("192.0.2.1") == IPv4Address("192.0.2.1")
    assert parse_ip("::ffff:192.0.2.1") == IPv4Address("192.0.2.1")
    assert parse_ip("::FFFF:c000:201") == IPv4Address("192.0.2.1")
    assert parse_ip("2001:DB8:0:0:0:0:0:1") == IPv6Address("2001:db8::1")
    for text, reason in [("", "empty"), ("[2001:db8::1]", "not an IP"), ("fe80::1%eth0", "zone"),
                         ("192.0.2.0/24", "prefix"), (" 192.0.2.1", "not an IP"),
                         ("192.0.2.01", "not an IP"), ("example.com", "not an IP"),
                         ("1" * 46, "too long"), ("１.2.3.4", "not an IP")]:
        with pytest.raises(ValueError, match=reason):
            parse_ip(text)


def test_is_public() -> None:
    for text in ("192.0.2.1", "203.0.113.7", "2001:db8::1", "8.8.8.8", "2a00:1450::1"):
        assert is_public(ip_address(text)), text
    for text in ("10.0.0.1", "172.16.5.4", "192.168.0.1", "127.0.0.1", "169.254.1.1", "0.0.0.0",
                 "100.64.0.1", "224.0.0.1", "::", "::1", "fe80::1", "fc00::1", "ff02::1",
                 "::ffff:10.0.0.1"):
        assert not is_public(ip_address(text)), text
