"""Strikes: lookupd's own memory of what a client address did wrong (a failed or refused AUTH,
an invalid recipient, a protocol error), counted in a sliding window and given to `connect`
as `strikes=N` (rule `strikes_threshold`).

    strike IP KIND [COUNT] [KIND [COUNT]]...  ->  strikes=N

(COUNT: how many such strikes at once, at most MAX_COUNT in all, more counting as that many;
the snippets send all of a connection's strikes in one call when it ends, e.g.
`strike 192.0.2.1 auth 3 rcpt 12`.)

An IPv6 client is struck and counted by its network (`connect.strikes_ipv6_prefix`, /64 by
default): one end site has a /64 or more, and a guesser hopping through it would otherwise
start every address at zero. IPv4 clients count per address.

In memory on one host (a snapshot in the state directory keeps it across restarts); with
[cluster], every strike also goes to Redis (a sorted set per address, members "HOST:ID") and
to the other hosts by pub/sub, so each host's memory holds the strikes of all of them and
`connect` still answers from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import msgpack

from lookupd.cluster import Cluster, ClusterDown, finite
from lookupd.errors import BadRequest
from lookupd.ipaddr import IPAddress, parse_ip

log = logging.getLogger(__name__)

# auth: a failed or refused AUTH; rcpt: an invalid recipient from an unauthenticated client;
# proto: a protocol error. Other names are taken as they come (the snippets may add kinds).
KIND = re.compile(r"[a-z][a-z0-9_-]{0,15}")
# Strikes one `strike` call may record at once (a connection's AUTH attempts or recipients).
MAX_COUNT = 100
# Addresses remembered at most (the oldest-struck go first), and strikes per address.
MAX_ADDRESSES = 100_000
MAX_PER_ADDRESS = 1_000
SNAPSHOT_NAME = "strikes.msgpack"
# How many addresses the merge after a reconnect reads back from Redis at most.
MERGE_MAX = 100_000

# KEYS: the address's set. ARGV: now, window, channel, message, then the members to add.
STRIKE_SCRIPT = """
for i = 5, #ARGV do redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return redis.call('ZCARD', KEYS[1])
"""


def strike_key(ip: IPAddress, ipv6_prefix: int) -> str:
    """What a strike of `ip` is counted under: the address, or its IPv6 network."""
    if isinstance(ip, IPv6Address) and ipv6_prefix < 128:
        return str(IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def fit_key(text: str, ipv6_prefix: int) -> str | None:
    """A key read back (the snapshot, Redis, another host's message) in the form this host
    counts by: an address, or an IPv6 network that contains it. None when it is malformed,
    or an IPv6 network wider than `ipv6_prefix` (it cannot be split into ours)."""
    if "/" in text:
        try:
            net = IPv6Network(text) if len(text) <= 50 else None
        except ValueError:
            return None
        if net is None or net.prefixlen < ipv6_prefix:
            return None
        return str(net.supernet(new_prefix=ipv6_prefix))
    try:
        return strike_key(parse_ip(text), ipv6_prefix)
    except ValueError:
        return None


def check_kind(raw: str) -> str:
    if not KIND.fullmatch(raw):
        raise BadRequest("strike KIND is a short lower-case word such as auth, rcpt, proto")
    return raw


def check_count(raw: str) -> int:
    """A COUNT: a whole number from 1 up; above MAX_COUNT it counts as MAX_COUNT (a dictionary
    run of thousands of recipients is struck, not refused as a bad request)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or int(raw) < 1:
        raise BadRequest("strike COUNT is a whole number from 1 up")
    return min(int(raw), MAX_COUNT)


# At most this many KIND [COUNT] pairs in one request.
MAX_KINDS = 4


def parse_strikes(args: tuple[str, ...]) -> tuple[str, int]:
    """`KIND [COUNT] [KIND [COUNT]]...` -> ("auth,rcpt", total count)."""
    pairs: list[tuple[str, int]] = []
    counted = False
    for arg in args:
        if KIND.fullmatch(arg):
            pairs.append((arg, 1))
            counted = False
        elif arg[:1] in "-0123456789":
            if not pairs or counted:
                raise BadRequest("strike takes KIND [COUNT] pairs: e.g. strike IP auth 3 rcpt 2")
            pairs[-1] = (pairs[-1][0], check_count(arg))
            counted = True
        else:
            check_kind(arg)  # raises: says what a KIND is
    if not 1 <= len(pairs) <= MAX_KINDS:
        raise BadRequest(f"strike takes 1 to {MAX_KINDS} KIND [COUNT] pairs")
    total = min(sum(count for _, count in pairs), MAX_COUNT)
    return ",".join(kind for kind, _ in pairs), total


class Strikes:
    """The strikes of every client address in the window, in memory."""

    def __init__(self, window: float, state_dir: Path, cluster: Cluster | None = None, *,
                 ipv6_prefix: int = 64) -> None:
        self.window = window
        self.ipv6_prefix = ipv6_prefix
        self.path = state_dir / SNAPSHOT_NAME
        self.cluster = cluster
        # strike_key -> {strike id: time}; ordered by the last strike, oldest first.
        self._seen: OrderedDict[str, dict[str, float]] = OrderedDict()
        # Strikes added (here or by another host): shared with the set a reload replaces.
        self._added = [0]
        self._taken_over = False
        # Strikes Redis did not take (down): published to the other hosts by the next merge.
        self._unsent: list[str] = []
        self._misfit_logged = False
        if cluster is not None:
            cluster.subscribe("strike", self._remote)
            cluster.on_up(self._merge)

    def take_over(self, previous: Strikes) -> None:
        """On a reload: the same memory (requests still in flight on the old set count);
        counted again by the new IPv6 prefix if it changed."""
        self._taken_over = True
        self._added = previous._added
        if previous.ipv6_prefix == self.ipv6_prefix:
            self._seen = previous._seen
            return
        for key, strikes in list(previous._seen.items()):
            for sid, at in strikes.items():
                self._add_fitted(key, sid, at)

    async def open(self) -> None:
        if self._taken_over:
            return
        try:
            rows = await asyncio.to_thread(_load, self.path)
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("strikes: cannot read %s (%s); starting without strikes",
                            self.path, exc)
            return
        cutoff = time.time() - self.window
        for key, strikes in rows:
            for sid, at in strikes:
                if at > cutoff:
                    self._add_fitted(key, sid, at)

    async def close(self) -> None:
        cutoff = time.time() - self.window
        rows = [(a, [(sid, at) for sid, at in s.items() if at > cutoff])
                for a, s in self._seen.items()]
        try:
            await asyncio.to_thread(_save, self.path, [r for r in rows if r[1]])
        except OSError as exc:
            log.warning("strikes: cannot write %s: %s; the strikes are forgotten on restart",
                        self.path, exc)

    def count(self, ip: IPAddress) -> int:
        """Strikes of `ip` (or its IPv6 network) in the window, from memory."""
        return self.count_key(self.key(ip))

    def key(self, ip: IPAddress) -> str:
        """What `ip`'s strikes are counted under (the connect reply cache keeps it)."""
        return strike_key(ip, self.ipv6_prefix)

    def count_key(self, key: str) -> int:
        """`count` by `key(ip)`."""
        strikes = self._seen.get(key)
        if not strikes:
            return 0
        cutoff = time.time() - self.window
        for sid in [sid for sid, at in strikes.items() if at <= cutoff]:
            del strikes[sid]
        return len(strikes)

    async def strike(self, ip: IPAddress, kind: str, count: int = 1) -> int:
        """Record `count` strikes; the count after them (across hosts when Redis answers)."""
        address = strike_key(ip, self.ipv6_prefix)
        now = time.time()
        host = self.cluster.host if self.cluster is not None else "local"
        sids = [f"{host}:{uuid.uuid4().hex[:16]}" for _ in range(max(1, min(count, MAX_COUNT)))]
        for sid in sids:
            self._add(address, sid, now)
        local = self.count(ip)
        cluster = self.cluster
        if cluster is None:
            return local
        message = json.dumps({"op": "strike", "ip": address, "kind": kind, "at": now,
                              "ids": sids, "host": cluster.host}, separators=(",", ":"))
        if not cluster.up:
            self._keep(message)
            return local
        try:
            shared = await cluster.run(lambda r: r.register_script(STRIKE_SCRIPT)(
                keys=[cluster.keys.strikes(address)],
                args=[repr(now), repr(self.window), cluster.keys.channel, message, *sids]))
        except ClusterDown:
            self._keep(message)
            return local
        return shared if isinstance(shared, int) and shared >= local else local

    # --- memory ----------------------------------------------------------------------------

    def _keep(self, message: str) -> None:
        if len(self._unsent) < MAX_ADDRESSES:  # past that, the others read them at the merge
            self._unsent.append(message)

    def _add_fitted(self, text: str, sid: str, at: float) -> None:
        """Add a strike whose key was read back; one that does not fit is left out."""
        key = fit_key(text, self.ipv6_prefix)
        if key is not None:
            self._add(key, sid, at)
        elif not self._misfit_logged:
            self._misfit_logged = True
            log.warning("strikes: ignoring strikes counted under %s: it is not an address or "
                        "an IPv6 network of /%d or longer; give every host the same "
                        "connect.strikes_ipv6_prefix", text[:60], self.ipv6_prefix)

    @property
    def changes(self) -> int:
        """Grows with every strike added (a count that only falls with time is not one)."""
        return self._added[0]

    def _add(self, address: str, sid: str, at: float) -> None:
        self._added[0] += 1
        strikes = self._seen.get(address)
        if strikes is None:
            strikes = self._seen[address] = {}
            while len(self._seen) > MAX_ADDRESSES:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(address)
        strikes[sid] = at
        if len(strikes) > MAX_PER_ADDRESS:
            del strikes[min(strikes, key=strikes.__getitem__)]

    def _remote(self, message: dict[str, Any]) -> None:
        ip, at = message.get("ip"), finite(message.get("at"))
        # "ids" (several strikes at once); "id" from hosts before COUNT existed.
        sids = message.get("ids", [message.get("id")])
        if (not isinstance(ip, str) or fit_key(ip, 0) is None or at is None
                or not isinstance(sids, list) or not 1 <= len(sids) <= MAX_COUNT
                or not all(isinstance(sid, str) and len(sid) <= 100 for sid in sids)):
            assert self.cluster is not None
            self.cluster.bad_value("a strike message")
            return
        if at > time.time() - self.window:
            for sid in sids:
                self._add_fitted(ip, sid, at)

    async def _merge(self, reconnected: bool) -> None:
        """Redis answers again: send the strikes recorded meanwhile, read the others'."""
        cluster = self.cluster
        if cluster is None or not reconnected:
            return
        now = time.time()
        cutoff = now - self.window

        unsent, self._unsent = self._unsent, []

        async def push(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for message in unsent:
                    pipe.publish(cluster.keys.channel, message)
                for address, strikes in list(self._seen.items()):
                    members = {sid: at for sid, at in strikes.items() if at > cutoff}
                    if members:
                        key = cluster.keys.strikes(address)
                        pipe.zadd(key, members)
                        pipe.pexpire(key, int(self.window * 1000) + 1000)
                await pipe.execute()

        async def pull(r: Any) -> dict[str, list[tuple[str, float]]]:
            found: dict[str, list[tuple[str, float]]] = {}
            async for key in r.scan_iter(match=cluster.keys.strikes("*"), count=1000):
                found[key[len(cluster.keys.strikes("")):]] = await r.zrangebyscore(
                    key, cutoff, "+inf", withscores=True)
                if len(found) >= MERGE_MAX:
                    break
            return found

        try:
            await cluster.run(push, timeout=10.0)
        except ClusterDown:
            self._unsent = unsent + self._unsent
            raise
        for address, members in (await cluster.run(pull, timeout=10.0)).items():
            self._remote_rows(address, members)

    def _remote_rows(self, key: str, members: list[tuple[str, float]]) -> None:
        if fit_key(key, 0) is None:
            assert self.cluster is not None
            self.cluster.bad_value("a strikes key")
            return
        for sid, at in members:
            if isinstance(sid, str) and finite(at) is not None:
                self._add_fitted(key, sid, float(at))


def _load(path: Path) -> list[tuple[str, list[tuple[str, float]]]]:
    with open(path, "rb") as fh:
        raw = msgpack.unpackb(fh.read(16 * 1024 * 1024), strict_map_key=False)
    rows: list[tuple[str, list[tuple[str, float]]]] = []
    if not isinstance(raw, dict) or raw.get("v") != 1 or not isinstance(raw.get("rows"), list):
        raise ValueError("not a strikes snapshot")
    for row in raw["rows"]:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
                and isinstance(row[1], list)):
            continue
        rows.append((row[0], [(pair[0], float(pair[1])) for pair in row[1]
                               if isinstance(pair, list) and len(pair) == 2
                               and isinstance(pair[0], str)
                               and isinstance(pair[1], int | float)]))
    return rows


def _save(path: Path, rows: list[tuple[str, list[tuple[str, float]]]]) -> None:
    data = msgpack.packb({"v": 1, "rows": [[a, [[s, at] for s, at in r]] for a, r in rows]})
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o640)
