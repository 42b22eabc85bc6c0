"""GeoIP source: country and AS number from MaxMind GeoIP2/GeoLite2 or DB-IP .mmdb files.

Lookups are synchronous on purpose: with maxminddb's C extension one takes 5-10 us, so the server
calls them inline. geoipupdate replaces the files by rename every week, admins often with `cp` over
the old file; a lookup notices a new file at most once per check_interval and a background thread
copies it into private memory, verifies the copy and only then swaps it in, so a broken download
never replaces a working database.

The C reader maps that private copy (a sealed memfd), never the file itself: a file mapped
directly and then overwritten or truncated in place kills the process with SIGBUS on the next
lookup that touches a page past its new end. Lookups on the copy are as fast as on the file;
maxminddb's pure-Python MODE_MEMORY reader would be 7-8 times slower. The copy costs memory the
size of the file, not shared and not reclaimable without swap (9.3 MiB for a 9.7 MB Country, 63
MiB for a 66 MB City database), twice that while a replacement is verified. A file written in
place is read only once two checks in a row see it unchanged, so a `cp` in progress is not read
half-written; a file that fails verification while still changing is looked at again at the next
check, and only one that fails once it has stopped changing is refused and reported.

Verification (open_verified) is metadata sanity, a check of every search-tree record done on
whole byte planes (`_record_lanes`), decoding the data records of a sample of nodes, and probe
lookups. Measured on the 2-core project machine (warm page cache): real GeoLite2-Country (9.7 MB,
1.6 M nodes) 0.12 s, GeoLite2-City (66 MB, 6.1 M nodes) 0.5 s; copying the file into memory
first adds about 0.01 s and 0.05 s. A full walk decoding every network with the C reader's
iterator took 11.9 s for Country alone, so it is not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import mmap
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Generic, Literal, TypeVar

import maxminddb
from maxminddb.decoder import Decoder
from maxminddb.types import Record

from lookupd.config import GEOIP_ASN_PATHS, GEOIP_COUNTRY_PATHS, GeoIPConfig, find_existing
from lookupd.ipaddr import IPAddress, is_public
from lookupd.outcome import Status
from lookupd.regularfile import open_regular

log = logging.getLogger(__name__)

Kind = Literal["country", "asn"]
# What tells one version of a file from the next: (st_dev, st_ino, st_size, st_mtime_ns,
# st_ctime_ns); ctime as well because a chmod that makes a refused file readable changes only it.
Identity = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class CountryResult:
    """FOUND with an upper-case ISO 3166 code; NOT_FOUND: no country; UNKNOWN: cannot tell."""

    status: Status
    code: str = ""
    reason: str = ""


@dataclass(frozen=True)
class AsnResult:
    """FOUND with the AS number (and organisation, "" when the database has none)."""

    status: Status
    number: int = 0
    organisation: str = ""
    reason: str = ""


_NO_COUNTRY = CountryResult(Status.NOT_FOUND)
_NO_ASN = AsnResult(Status.NOT_FOUND)
_ISO_CODE = re.compile(r"[A-Za-z]{2}")


# ---------------------------------------------------------------------------------------------
# Decisions over records already fetched.


def country_from_record(record: Record | None, field: str) -> CountryResult:
    """The answer a raw mmdb record gives for `field` ("country" or "registered_country").

    MaxMind Country and City databases and DB-IP's lite ones share this layout. Anycast and
    satellite networks have records without the field: that is "no country", not a failure.
    """
    if record is None:
        return _NO_COUNTRY
    if not isinstance(record, dict):
        return CountryResult(Status.UNKNOWN, reason="unexpected record in database")
    entry = record.get(field)
    code = entry.get("iso_code") if isinstance(entry, dict) else entry
    if code is None or code == "":
        return _NO_COUNTRY
    if not isinstance(code, str) or not _ISO_CODE.fullmatch(code):
        return CountryResult(Status.UNKNOWN, reason="odd country code in database")
    return CountryResult(Status.FOUND, code=code.upper())


def asn_from_record(record: Record | None) -> AsnResult:
    """The answer a raw GeoLite2-ASN / GeoIP2-ISP / DB-IP ASN record gives."""
    if record is None:
        return _NO_ASN
    if not isinstance(record, dict):
        return AsnResult(Status.UNKNOWN, reason="unexpected record in database")
    number = record.get("autonomous_system_number")
    if number is None:
        return _NO_ASN
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        return AsnResult(Status.UNKNOWN, reason="odd AS number in database")
    org = record.get("autonomous_system_organization")
    return AsnResult(Status.FOUND, number=number, organisation=org if isinstance(org, str) else "")


# ---------------------------------------------------------------------------------------------
# Verification of a database file (runs in a worker thread).


class Refused(Exception):
    """A database file lookupd will not use; str() says why, `identity` which file it was."""

    def __init__(self, reason: str, identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.identity = identity


@dataclass(frozen=True)
class OpenedDb:
    """A verified database: its reader and which version of the file it is."""

    reader: maxminddb.Reader
    path: Path
    identity: Identity
    database_type: str
    build_epoch: int
    ipv4_only: bool


# database_type values each source accepts: MaxMind's GeoIP2/GeoLite2-Country, -City and
# Enterprise, DB-IP's DBIP-Country-Lite / DBIP-City-Lite; GeoLite2-ASN, GeoIP2-ISP, DBIP-ASN-Lite.
_TYPES = {
    "country": re.compile(r"country|city|enterprise", re.IGNORECASE),
    "asn": re.compile(r"asn|isp", re.IGNORECASE),
}
_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
_METADATA_MAX = 128 * 1024  # the spec puts the metadata within the last 128 KiB
_SEPARATOR = 16  # zero bytes between the search tree and the data section
_DATA_SAMPLE_NODES = 512  # nodes whose data records are decoded
# Fields of which a sound database has some in its records.
_FIELDS = {
    "country": ("country", "registered_country", "continent"),
    "asn": ("autonomous_system_number",),
}
_CHUNK_NODES = 1 << 16  # nodes per step: bounds memory and how long the GIL is held
_COPY_STEP = 1 << 24  # bytes per sendfile() call when copying a database into memory
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
# Addresses looked up to exercise the decoder: one in every IPv4 /8 (1-223), 64 across 2000::/4.
_PROBES: tuple[IPAddress, ...] = (
    *(IPv4Address(f"{a}.{a * 73 % 256}.{a * 151 % 256}.{a * 29 % 256}") for a in range(1, 224)),
    *(IPv6Address(f"2{i:03x}:{i * 40503 & 0xFFFF:x}::1") for i in range(0, 0x1000, 64)),
)


def identity_of(path: Path) -> Identity:
    return _identity(os.stat(path))


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_verified(path: Path, kind: Kind) -> OpenedDb:
    """Copy `path` into private memory, check the copy is a sound `kind` database and open a
    reader on it; raise Refused saying why not.

    Blocking (up to about a second for a 70 MB City database): call it through to_thread.
    """
    for _ in range(3):
        try:
            copied = _private_copy(path)
        except FileNotFoundError:
            raise Refused("no such file") from None
        except PermissionError:
            raise Refused("permission denied: make it readable by the lookupd user") from None
        except OSError as exc:
            raise Refused(f"cannot read it: {exc.strerror}") from None
        if copied is None:
            continue  # written to while copied: look again
        fd, identity = copied
        try:
            return _open_copy(fd, path, identity, kind)
        finally:
            os.close(fd)  # the reader's own mapping keeps the copy alive
    raise Refused("the file kept changing while lookupd read it")


def _private_copy(path: Path) -> tuple[int, Identity] | None:
    """A sealed memfd holding the bytes of `path`, and which version of the file they are;
    None when the file changed while it was copied.

    Sealed against writing, shrinking and growing, so no one, lookupd included, can change the
    copy or cut pages from under a mapping of it (the SIGBUS a shared mapping of the file risks).
    """
    with open(open_regular(path), "rb") as fh:
        before = _identity(os.fstat(fh.fileno()))
        try:
            # The name shows in /proc/PID/maps; the kernel takes up to 249 bytes.
            fd = os.memfd_create(f"lookupd-geoip:{path.name[:200]}",
                                 os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise Refused(f"cannot make a copy in memory: {exc.strerror}") from None
        try:
            while os.sendfile(fd, fh.fileno(), None, _COPY_STEP):
                pass  # until EOF, not st_size: the file may have grown meanwhile
            if _identity(os.fstat(fh.fileno())) != before:
                os.close(fd)
                return None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                        | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError as exc:
            os.close(fd)
            raise Refused(f"cannot copy it into memory: {exc.strerror}", before) from None
        except BaseException:
            os.close(fd)
            raise
    return fd, before


def _open_copy(fd: int, path: Path, identity: Identity, kind: Kind) -> OpenedDb:
    """Open a reader on the private copy `fd` of `path` and verify it; raise Refused if bad."""
    if os.fstat(fd).st_size == 0:
        raise Refused("the file is empty (truncated, or still being written?)", identity)
    try:
        # The C extension opens a path only; /proc/self/fd names the memfd. It maps the copy,
        # then closes its descriptor.
        reader = maxminddb.open_database(f"/proc/self/fd/{fd}", maxminddb.MODE_AUTO)
    except (maxminddb.InvalidDatabaseError, ValueError) as exc:
        log.debug("%s: %s", path, exc)
        raise Refused("not a valid MaxMind DB file (corrupt, truncated, or still being "
                      "written?)", identity) from None
    except OSError as exc:  # no /proc mounted, for one
        raise Refused(f"cannot open its copy in memory: {exc}", identity) from None
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
            problem = _verify(buf, reader, kind)
    except BaseException:
        reader.close()
        raise
    if problem:
        reader.close()
        raise Refused(problem, identity)
    meta = reader.metadata()
    log.debug("%s: %s reader for %s", path, type(reader).__module__, meta.database_type)
    return OpenedDb(reader, path, identity, meta.database_type, meta.build_epoch,
                    meta.ip_version == 4)


def _verify(buf: mmap.mmap, reader: maxminddb.Reader, kind: Kind) -> str | None:
    meta = reader.metadata()
    if meta.binary_format_major_version != 2:
        return f"unsupported format version {meta.binary_format_major_version}"
    if meta.record_size not in (24, 28, 32) or meta.ip_version not in (4, 6):
        return "invalid metadata (record_size or ip_version)"
    problem = check_layout(buf, meta.node_count, meta.record_size)
    if problem:
        return problem
    if not isinstance(meta.database_type, str) or not _TYPES[kind].search(meta.database_type):
        want = "a Country or City" if kind == "country" else "an ASN"
        return f"it is a {meta.database_type!r} database, not {want} database"
    problem = check_data(buf, meta.node_count, meta.record_size, kind)
    return problem or check_probes(reader, meta.ip_version)


def check_layout(buf: bytes | mmap.mmap, node_count: int, record_size: int) -> str | None:
    """Check the search tree against the file: sizes, the separator and every record."""
    size = len(buf)
    marker = buf.rfind(_METADATA_MARKER, max(0, size - _METADATA_MAX))
    if marker < 0:
        return "no metadata section (truncated file?)"
    tree_size = node_count * record_size // 4
    if node_count <= 0 or tree_size + _SEPARATOR > marker:
        return f"node_count {node_count} does not fit the file (truncated file?)"
    if buf[tree_size:tree_size + _SEPARATOR] != bytes(_SEPARATOR):
        return "no data section separator after the search tree"
    return check_search_tree(buf, node_count, record_size, marker - tree_size - _SEPARATOR)


def check_search_tree(buf: bytes | mmap.mmap, node_count: int, record_size: int,
                      data_size: int) -> str | None:
    """Every record must point to a node, be "empty" (== node_count) or point into the data.

    A sound tree links every node but the root from at least one record (aliases such as
    ::ffff:0:0/96 add a few links, never fewer), and nothing links back to the root.
    """
    node_bytes = record_size // 4
    links = to_root = in_separator = past_data = 0
    for first in range(0, node_count, _CHUNK_NODES):
        chunk = buf[first * node_bytes:min(node_count, first + _CHUNK_NODES) * node_bytes]
        counter = _LaneCounter(*_record_lanes(chunk, record_size))
        links += counter.count - counter.at_least(node_count)
        to_root += counter.count - counter.at_least(1)
        in_separator += counter.at_least(node_count + 1) - counter.at_least(
            node_count + _SEPARATOR)
        past_data += counter.at_least(node_count + _SEPARATOR + data_size)
    if past_data:
        return f"{past_data} search tree record(s) point past the data section"
    if in_separator:
        return f"{in_separator} search tree record(s) point into the data separator"
    if to_root:
        return f"{to_root} search tree record(s) loop back to the root node"
    if links < node_count - 1:
        return f"only {links} links for {node_count} search tree nodes (corrupt search tree)"
    return None


def _record_lanes(tree: bytes, record_size: int) -> tuple[int, int, int]:
    """Both records of every node in `tree` as one big integer of fixed-width lanes.

    Built from strided byte slices, so the work per record happens in C. Returns the integer,
    the number of records and the lane width in bits (32, or 64 for 32-bit records, so that the
    top bit of every lane is free for `_LaneCounter`).
    """
    node_bytes = record_size // 4
    lane = 4 if record_size < 32 else 8
    step = 2 * lane
    nodes = len(tree) // node_bytes
    buf = bytearray(nodes * step)
    places: tuple[tuple[int, int], ...]
    if record_size == 28:
        # The middle byte's high nibble tops the left record, its low nibble the right one.
        middle = tree[3::7]
        buf[0::step] = middle.translate(_HIGH_NIBBLE)
        buf[lane::step] = middle.translate(_LOW_NIBBLE)
        places = ((0, 1), (1, 2), (2, 3), (4, lane + 1), (5, lane + 2), (6, lane + 3))
    else:
        width = record_size // 8
        places = tuple((i, i // width * lane + lane - width + i % width)
                       for i in range(2 * width))
    for src, dst in places:
        buf[dst::step] = tree[src::node_bytes]
    return int.from_bytes(buf, "big"), 2 * nodes, lane * 8


class _LaneCounter:
    """Counts lanes of a big integer holding a value >= t, with a few whole-integer operations.

    Adding 2**(w-1) - t to every lane sets a lane's top bit exactly when its value is >= t; the
    values are below 2**(w-1), so no carry crosses into the next lane.
    """

    def __init__(self, lanes: int, count: int, bits: int) -> None:
        self.lanes, self.count, self._bits = lanes, count, bits
        self._top = 1 << (bits - 1)
        self._mask = self._repeat(self._top)

    def _repeat(self, value: int) -> int:
        return int.from_bytes(value.to_bytes(self._bits // 8, "big") * self.count, "big")

    def at_least(self, threshold: int) -> int:
        if threshold <= 0:
            return self.count
        if threshold >= self._top:
            return 0
        return ((self.lanes + self._repeat(self._top - threshold)) & self._mask).bit_count()


def check_data(buf: bytes | mmap.mmap, node_count: int, record_size: int,
               kind: Kind) -> str | None:
    """Decode the records that a spread of search-tree nodes point to.

    Each must be a map, and some must carry the fields of a `kind` database: a zeroed data
    section, for one, decodes as nothing but empty maps.
    """
    tree_size = node_count * record_size // 4
    decoder = Decoder(buf, tree_size + _SEPARATOR)
    step = max(1, node_count // _DATA_SAMPLE_NODES)
    pointers = {record for node in range(0, node_count, step)
                for record in _node_records(buf, node, record_size) if record > node_count}
    with_fields = 0
    for pointer in sorted(pointers):
        try:
            value, _ = decoder.decode(pointer - node_count + tree_size)
        except Exception as exc:  # noqa: BLE001 - corrupt bytes can upset the decoder anyhow
            return f"the data section is corrupt ({type(exc).__name__}: {exc})"
        if not isinstance(value, dict):
            return f"the data section holds a {type(value).__name__} where a map belongs"
        with_fields += any(key in value for key in _FIELDS[kind])
    if pointers and not with_fields:
        return f"none of {len(pointers)} sampled records has {kind} data (blank data section?)"
    return None


def _node_records(buf: bytes | mmap.mmap, node: int, record_size: int) -> tuple[int, int]:
    size = record_size // 4
    raw = buf[node * size:(node + 1) * size]
    if record_size == 28:
        return (raw[3] >> 4) << 24 | int.from_bytes(raw[:3], "big"), \
            (raw[3] & 0x0F) << 24 | int.from_bytes(raw[4:], "big")
    return int.from_bytes(raw[:size // 2], "big"), int.from_bytes(raw[size // 2:], "big")


def check_probes(reader: maxminddb.Reader, ip_version: int) -> str | None:
    """Look up a spread of addresses: each must decode to nothing or to a map."""
    for ip in _PROBES:
        if ip.version == 6 and ip_version == 4:
            continue
        try:
            record = reader.get(ip)
        except (maxminddb.InvalidDatabaseError, ValueError, TypeError) as exc:
            return f"looking up {ip} fails: {exc}"
        if record is not None and not isinstance(record, dict):
            return f"looking up {ip} gives a {type(record).__name__}, not a map"
    return None


# ---------------------------------------------------------------------------------------------
# The source.


class _LookupFailed(Exception):
    """Internal: the database could not answer this lookup; str() is the reason."""


_WHAT = {"country": "country", "asn": "ASN"}
_HOW_TO_GET = (
    "install geoipupdate (apt install geoipupdate), put a free MaxMind GeoLite2 account's "
    "AccountID and LicenseKey in /etc/GeoIP.conf with EditionIDs GeoLite2-Country "
    "GeoLite2-ASN and run geoipupdate; or put DB-IP's free dbip-country-lite .mmdb in "
    "/var/lib/GeoIP/. lookupd picks the file up by itself, no restart needed"
)


class _Database:
    """One watched .mmdb file: the reader answering now, and the look-out for a newer file."""

    def __init__(self, kind: Kind, configured: Path | None, candidates: tuple[Path, ...],
                 interval: float) -> None:
        self.kind: Kind = kind
        self._configured = configured
        self._candidates = candidates
        self._interval = interval
        self.opened: OpenedDb | None = None
        self.reason = f"{_WHAT[kind]} database not opened"
        # The file last tried, good or refused: a refused file is not retried until it changes.
        self._tried: tuple[Path, Identity] | None = None
        # What the previous check found: a file written in place must look the same twice.
        self._seen: tuple[Path, Identity] | None = None
        self._next_check = 0.0
        self._task: asyncio.Task[None] | None = None
        self._gone_warned = False
        self._error_warned = False
        self._closed = False

    def current(self) -> OpenedDb | None:
        """The database to answer from; at most once per interval, look for a newer file."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._interval
            self._poll()
        return self.opened

    def get(self, ip: IPAddress) -> Record | None:
        """The raw record for `ip`; raise _LookupFailed when the database cannot say."""
        opened = self.current()
        if opened is None:
            raise _LookupFailed(self.reason)
        if opened.ipv4_only and ip.version == 6:
            raise _LookupFailed(f"{_WHAT[self.kind]} database has no IPv6 data")
        try:
            return opened.reader.get(ip)
        except (maxminddb.InvalidDatabaseError, ValueError, TypeError) as exc:
            if not self._error_warned:
                self._error_warned = True
                log.warning("GeoIP %s database %s fails on lookups (%s): it is corrupt in a "
                            "way verification missed; run geoipupdate again or put a good copy "
                            "in place", _WHAT[self.kind], opened.path, exc)
            log.debug("%s lookup of %s failed: %s", self.kind, ip, exc)
            raise _LookupFailed(f"{_WHAT[self.kind]} database error") from None

    def _find(self) -> tuple[Path, Identity] | None:
        path = find_existing(self._configured, self._candidates)
        if path is None:
            return None
        try:
            return path, identity_of(path)
        except OSError:
            return None

    def _poll(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        found = self._find()
        seen, self._seen = self._seen, found
        if found is None:
            if self.opened is not None and not self._gone_warned:
                self._gone_warned = True
                log.warning("GeoIP %s database %s has disappeared; still answering from the "
                            "copy loaded earlier: restore it or run geoipupdate",
                            _WHAT[self.kind], self.opened.path)
            return
        if found == self._tried:
            return
        settled = found == seen
        if not settled and self._written_in_place(found):
            # `cp new.mmdb GeoLite2-Country.mmdb` truncates the file, then fills it: wait
            # until it stops changing rather than read it half-written.
            log.debug("GeoIP %s database %s changed in place; waiting for it to settle",
                      self.kind, found[0])
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the daemon's loop: nothing to schedule on
        self._task = loop.create_task(self.load(settled=settled),
                                      name=f"geoip-{self.kind}-load")

    def _written_in_place(self, found: tuple[Path, Identity]) -> bool:
        """Is `found` the file tried last (same path, device and inode) with new contents?"""
        tried = self._tried
        return tried is not None and tried[0] == found[0] and tried[1][:2] == found[1][:2]

    async def load(self, *, force: bool = False, starting: bool = False,
                   settled: bool = True) -> None:
        """Open and verify the current file if it is new (or `force`), then swap it in.

        A file that is not `settled` (it changed since the previous check) and fails
        verification may still be being written: it is looked at again at the next check, and
        refused (and reported) only if it fails once it has stopped changing.
        """
        found = self._find()
        if found is None:
            self._missing(starting)
            return
        if found == self._tried and not force:
            return
        path = found[0]
        try:
            opened = await asyncio.to_thread(open_verified, path, self.kind)
        except Refused as exc:
            if not settled:
                log.debug("GeoIP %s database %s not usable yet (%s); looking again at the "
                          "next check", self.kind, path, exc)
                return
            self._tried = (path, exc.identity or found[1])
            self._refused(path, str(exc))
            return
        old, self.opened = self.opened, opened
        self._tried = (path, opened.identity)
        self.reason = ""
        self._gone_warned = self._error_warned = False
        if old is not None:
            old.reader.close()  # safe: lookups run on this loop's thread, none is in progress
        built = time.strftime("%Y-%m-%d", time.gmtime(opened.build_epoch))
        log.info("GeoIP %s database %s (%s, built %s) %s", _WHAT[self.kind], path,
                 opened.database_type, built, "loaded" if old is None else "replaced")

    def problem(self) -> str:
        """Why no database answers, with where it was looked for ("" when one answers)."""
        if self.opened is not None:
            return ""
        if self.reason != f"no {_WHAT[self.kind]} database":
            return self.reason
        if self._configured is not None:
            return f"{self.reason}: {self._configured} does not exist"
        return f"{self.reason} in {', '.join(sorted({str(p.parent) for p in self._candidates}))}"

    def _missing(self, starting: bool) -> None:
        what = _WHAT[self.kind]
        if self.opened is not None:
            return  # _poll warns that the file is gone; keep serving the loaded copy
        self.reason = f"no {what} database"
        if not starting:
            return
        if self._configured is not None:
            log.warning("GeoIP %s database %s does not exist: %s answers are ?? until it does. "
                        "Check [geoip] %s_db, or %s", what, self._configured, what, self.kind,
                        _HOW_TO_GET)
        elif self.kind == "country":
            log.warning("no GeoIP country database found (looked for %s): country answers are "
                        "?? until one is installed. To get one, %s",
                        ", ".join(str(p) for p in self._candidates), _HOW_TO_GET)
        else:
            log.info("no GeoIP ASN database found (looked for %s): the asn verb answers ??",
                     ", ".join(str(p) for p in self._candidates))

    def _refused(self, path: Path, problem: str) -> None:
        what = _WHAT[self.kind]
        if self.opened is not None:
            log.warning("GeoIP %s database %s refused: %s. Still answering from the previous "
                        "file; run geoipupdate again or put a good copy in place. lookupd "
                        "tries again when the file changes", what, path, problem)
            return
        self.reason = f"{what} database unusable"
        log.warning("GeoIP %s database %s refused: %s. %s answers are ?? until it is replaced: "
                    "run geoipupdate again or put a good copy in place; lookupd "
                    "tries again when the file changes", what, path, problem, what.capitalize())

    async def open(self) -> None:
        self._next_check = time.monotonic() + self._interval
        await self.load(starting=True)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.opened is not None:
            self.opened.reader.close()
            self.opened = None
        self.reason = f"{_WHAT[self.kind]} database closed"

    async def reload(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._next_check = time.monotonic() + self._interval
        await self.load(force=True)


class GeoIPSource:
    """Country and ASN lookups over .mmdb files that are replaced without a restart."""

    def __init__(self, config: GeoIPConfig) -> None:
        self._country = _Database("country", config.country_db, GEOIP_COUNTRY_PATHS,
                                  config.check_interval)
        self._asn = _Database("asn", config.asn_db, GEOIP_ASN_PATHS, config.check_interval)
        self._decode_country = functools.partial(country_from_record,
                                                 field=config.country_field)
        self._country_cache: _ResultCache[CountryResult] = _ResultCache()
        self._asn_cache: _ResultCache[AsnResult] = _ResultCache()

    async def open(self) -> None:
        """Find, open and verify both databases; a missing or bad one only logs a WARNING."""
        for db in (self._country, self._asn):
            await db.open()

    async def close(self) -> None:
        await self._country.close()
        await self._asn.close()

    async def reload(self) -> None:
        """SIGHUP: look at the files now, and retry even a file refused before."""
        await self._country.reload()
        await self._asn.reload()

    @property
    def country_db(self) -> OpenedDb | None:
        """The country database answering now (for status output)."""
        return self._country.opened

    @property
    def asn_db(self) -> OpenedDb | None:
        return self._asn.opened

    @property
    def country_problem(self) -> str:
        """Why no country database answers ("" when one does), for status output."""
        return self._country.problem()

    @property
    def asn_problem(self) -> str:
        return self._asn.problem()

    def version(self) -> tuple[object, ...]:
        """Equal while every answer stays the same: the same database files answer (or the
        same reason why none does). Looks for newer files as a lookup does."""
        country, asn = self._country, self._asn
        return (country.current(), country.reason, asn.current(), asn.reason)

    def country(self, ip: IPAddress | None) -> CountryResult:
        """Country of `ip`; None (empty argument) and non-public addresses have none."""
        return _answer(ip, self._country, self._country_cache, _NO_COUNTRY, CountryResult,
                       self._decode_country)

    def asn(self, ip: IPAddress | None) -> AsnResult:
        """AS number and organisation of `ip`; None and non-public addresses have none."""
        return _answer(ip, self._asn, self._asn_cache, _NO_ASN, AsnResult, asn_from_record)


_Result = TypeVar("_Result", CountryResult, AsnResult)


class _ResultCache(Generic[_Result]):
    """Answers of one database by address. Decoding an mmdb record costs microseconds (a City
    record much more), and the same client asks again and again (every verb, every
    connection of a spam run). Emptied whenever another database file takes over; UNKNOWN
    answers are never kept."""

    def __init__(self, size: int = 65536) -> None:
        # Least recently used first: a plain dict costs a fraction of cachetools' LRUCache
        # on this path, asked for every country, asn and connect.
        self._entries: dict[IPAddress, _Result] = {}
        self._size = size
        self.db: OpenedDb | None = None

    def get(self, ip: IPAddress) -> _Result | None:
        entries = self._entries
        result = entries.pop(ip, None)
        if result is not None:
            entries[ip] = result  # now the most recently used
        return result

    def put(self, ip: IPAddress, db: OpenedDb | None, result: _Result) -> _Result:
        entries = self._entries
        if db is not self.db:
            entries.clear()
            self.db = db
        if result.status is not Status.UNKNOWN:
            entries.pop(ip, None)
            if len(entries) >= self._size:
                del entries[next(iter(entries))]  # the least recently used
            entries[ip] = result
        return result


def _answer(ip: IPAddress | None, db: _Database, cache: _ResultCache[_Result], none: _Result,
            kind: type[_Result], decode: Callable[[Record | None], _Result]) -> _Result:
    """One lookup: from the cache while the same database file answers, else decoded from
    the database (UNKNOWN, never cached, when it cannot say)."""
    if ip is None:
        return none
    current = db.current()
    cached = cache.get(ip)
    if cached is not None and current is cache.db:
        return cached
    if not is_public(ip):
        result = none
    else:
        try:
            result = decode(db.get(ip))
        except _LookupFailed as exc:
            result = kind(Status.UNKNOWN, reason=str(exc))
    return cache.put(ip, current, result)
