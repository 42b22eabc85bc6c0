"""IP/CIDR list files in Exim's net-iplsearch style, reloaded when they change.

The files admins already keep for Exim (whitelist_connect_hosts, relay_from_hosts, an
IMAP-before-submission access file) work as they are: one IP or network a line, `#` comments,
blank lines, and the iplsearch forms `1.2.3.4: data`, `1.2.3.0/24  data` and
`"2001:db8::/32": data` (Exim wants IPv6 keys quoted; lookupd also takes them bare). Host
names, wildcards and `!` negations cannot be matched on an address alone; they are skipped
with one warning a load (a negated entry instead makes every address it covers unlisted: the
safe reading of Exim's first-match rule).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from lookupd.outcome import Status
from lookupd.regularfile import open_regular

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# How often a list file is looked at (one stat) for a change, at most.
CHECK_INTERVAL = 1.0
# List files are small; a bigger one is a mistake (wrong path) and is not read.
MAX_FILE_BYTES = 16 * 1024 * 1024
_MAPPED = IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True)
class NetSet:
    """A set of networks for fast membership: per prefix length, the network numbers."""

    v4: Mapping[int, frozenset[int]] = field(default_factory=dict)
    v6: Mapping[int, frozenset[int]] = field(default_factory=dict)
    # Addresses covered by a `!` entry are never members.
    not_v4: Mapping[int, frozenset[int]] = field(default_factory=dict)
    not_v6: Mapping[int, frozenset[int]] = field(default_factory=dict)
    size: int = 0

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, IPv4Address):
            return _covered(int(ip), 32, self.v4) and not _covered(int(ip), 32, self.not_v4)
        if isinstance(ip, IPv6Address):
            if ip.ipv4_mapped is not None:
                return ip.ipv4_mapped in self
            return _covered(int(ip), 128, self.v6) and not _covered(int(ip), 128, self.not_v6)
        return False


def _covered(value: int, bits: int, table: Mapping[int, frozenset[int]]) -> bool:
    return any((value >> (bits - plen)) in nets for plen, nets in table.items())


@dataclass(frozen=True)
class Parsed:
    """A list file's networks, and the lines that could not be used (line number, text)."""

    nets: NetSet
    skipped: tuple[tuple[int, str], ...] = ()


def parse_key(line: str) -> tuple[Network, bool] | None:
    """The network a line names and whether it is negated; None for blank and comment lines.
    ValueError (saying why) when the line names something that is not an address."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    negated = text.startswith("!")
    if negated:
        text = text[1:].lstrip()
    if text.startswith('"'):
        end = text.find('"', 1)
        if end < 0:
            raise ValueError("unbalanced quote")
        key = text[1:end]
    else:
        token = text.split(None, 1)[0]
        # `1.2.3.4`, `1.2.3.4:` (then data), `1.2.3.4:data`; a bare IPv6 key keeps its colons.
        candidates = (token, token.rstrip(":"), token.split(":", 1)[0])
        key = next((c for c in candidates if _is_network(c)), token)
    try:
        net = ipaddress.ip_network(key, strict=False)
    except ValueError:
        raise ValueError("not an IP address or network (host names and wildcards need "
                         "Exim, not lookupd)") from None
    if isinstance(net, IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        net = IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net, negated


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_lines(lines: Iterable[str]) -> Parsed:
    """Parse a list file's lines (pure)."""
    tables: dict[tuple[int, bool], dict[int, set[int]]] = {
        (4, False): {}, (6, False): {}, (4, True): {}, (6, True): {}}
    skipped: list[tuple[int, str]] = []
    size = 0
    for number, line in enumerate(lines, 1):
        try:
            parsed = parse_key(line)
        except ValueError:
            skipped.append((number, line.strip()[:80]))
            continue
        if parsed is None:
            continue
        net, negated = parsed
        bits = net.max_prefixlen
        table = tables[(net.version, negated)]
        table.setdefault(net.prefixlen, set()).add(
            int(net.network_address) >> (bits - net.prefixlen))
        size += 1

    def frozen(key: tuple[int, bool]) -> dict[int, frozenset[int]]:
        return {plen: frozenset(v) for plen, v in sorted(tables[key].items())}

    nets = NetSet(frozen((4, False)), frozen((6, False)), frozen((4, True)), frozen((6, True)),
                  size)
    return Parsed(nets, tuple(skipped))


_Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


class ListFile:
    """One list file, re-read when it changes (looked at no more than once a CHECK_INTERVAL).

    `status` is FOUND once the file has been read, NOT_FOUND while it does not exist (an
    empty list: e.g. nobody has logged in by IMAP yet), UNKNOWN when it could never be read.
    A file that becomes unreadable keeps its last content.
    """

    def __init__(self, path: Path, *, check_interval: float = CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._next_check = float("-inf")
        self._signature: _Signature | None = None
        self._nets = NetSet()
        self.status = Status.UNKNOWN
        self._problem = ""
        # Bumped whenever what the file lists (or whether it can tell) may have changed.
        self.changes = 0

    @property
    def nets(self) -> NetSet:
        self.refresh()
        return self._nets

    def __contains__(self, ip: object) -> bool:
        return ip in self.nets

    def refresh(self) -> None:
        """Re-read the file if it changed. A stat and, on change, a read of a small local file:
        bounded work, done inline rather than in a thread."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._check_interval
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.status is not Status.NOT_FOUND:
                if self._signature is not None:
                    log.warning("list file %s was removed: it now lists nobody", self.path)
                else:
                    log.info("list file %s does not exist (yet): it lists nobody", self.path)
            self._set(NetSet(), None, Status.NOT_FOUND)
            return
        except OSError as exc:
            self._failed(f"cannot stat it: {exc.strerror}")
            return
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return
        if st.st_size > MAX_FILE_BYTES:
            self._failed(f"it is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB", "Is the "
                         "path right?")
            return
        try:
            with open(open_regular(self.path), encoding="utf-8", errors="replace") as fh:
                parsed = parse_lines(fh)
        except OSError as exc:
            # EINVAL: not a regular file (regularfile says so, and what to do).
            self._failed(f"cannot read it: {exc.strerror}",
                         "" if exc.errno == errno.EINVAL else "Make it readable by lookupd")
            return
        if parsed.skipped:
            number, text = parsed.skipped[0]
            log.warning("list file %s: %d line(s) skipped, not an IP address or network "
                        "(first: line %d %r); lookupd matches addresses only",
                        self.path, len(parsed.skipped), number, text)
        first_load = self._signature is None
        self._set(parsed.nets, signature, Status.FOUND)
        log.info("list file %s %s: %d entries", self.path,
                 "loaded" if first_load else "reloaded", parsed.nets.size)

    def _set(self, nets: NetSet, signature: _Signature | None, status: Status) -> None:
        # A file still missing is set again (to nothing) at every check: no change.
        if status is Status.FOUND or status is not self.status:
            self.changes += 1
        self._nets, self._signature, self.status, self._problem = nets, signature, status, ""

    def _failed(self, problem: str, fix: str = "Make it readable by lookupd") -> None:
        if problem != self._problem:
            kept = ("keeping the entries read before" if self.status is Status.FOUND
                    else "it counts as unknown until it can be read")
            log.warning("list file %s: %s; %s%s", self.path, problem, kept,
                        f". {fix}" if fix else "")
        self._problem = problem
        if self.status is not Status.FOUND:
            if self.status is not Status.UNKNOWN:
                self.changes += 1
            self.status = Status.UNKNOWN
            self._signature = None


@dataclass(frozen=True)
class Match:
    """Whether an address is in a group of list files. FOUND: in `path`; NOT_FOUND: in none;
    UNKNOWN: in none of the readable ones while some file could never be read."""

    status: Status
    path: Path | None = None


class ListFiles:
    """Several list files seen as one (e.g. [connect] allowlist_files)."""

    def __init__(self, paths: Iterable[Path], *, check_interval: float = CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.files = tuple(ListFile(p, check_interval=check_interval, clock=clock)
                           for p in paths)

    def __bool__(self) -> bool:
        return bool(self.files)

    def version(self) -> int:
        """Changes whenever `match` may answer differently (a file re-read, gone, unreadable);
        looks for changes as `match` does."""
        total = 0
        for listed in self.files:
            listed.refresh()
            total += listed.changes
        return total

    def match(self, ip: IPAddress) -> Match:
        unknown = False
        for listed in self.files:
            if ip in listed:
                return Match(Status.FOUND, listed.path)
            unknown = unknown or listed.status is Status.UNKNOWN
        return Match(Status.UNKNOWN if unknown else Status.NOT_FOUND)
