"""The DNSBL / DBL / reverse-DNS source: asks every list of a query in parallel under one
deadline, through one shared cache, keeps lists that misbehave out of service (quarantined:
they leave the decision to the others), trusts no list before a probe of it has come back
(on reload, `take_over` carries the verdicts over), and tells the resolver's failures from a
list's (a dead resolver quarantines no list: every list is unknown until it answers again).

The decisions (codes, verdicts, health, FCrDNS) live in the pure modules beside this one;
this class only fetches, times, counts and logs. When every answer a query needs is already
in the cache, `peek_*` / `cached_*` give the same result synchronously: the server then
answers from its read callback, without a task and a timed wait per request. What they
decide is kept with the answers it came from (each list's verdict in the cache entry, the
combined and reverse-DNS results beside), and `generation` with `Cached.expires` says how
long a result holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lookupd.cluster import Cluster
from lookupd.config import DnsblConfig
from lookupd.dnsbl.answers import DnsAnswer
from lookupd.dnsbl.cache import AnswerCache, CacheKey, carry_over
from lookupd.dnsbl.health import (
    FAIL_STREAK,
    FAILURES,
    LOG_PERIOD,
    NOT_ANSWERING,
    QUARANTINED,
    RESOLVER_DOWN,
    UNPROBED,
    Dqs,
    Health,
    OncePer,
    advice,
    judge,
    lone_list,
    own_failure,
    resolver_fault,
    standing,
)
from lookupd.dnsbl.names import (
    IPAddress,
    normalize_domain,
    parse_ip,
    probe_points,
    query_zone,
    redact,
    reverse_ip,
)
from lookupd.dnsbl.resolver import DnsClient, make_nameservers
from lookupd.dnsbl.shared import SharedAnswers
from lookupd.dnsbl.snapshot import (
    SNAPSHOT_NAME,
    Refused,
    encode_snapshot,
    read_snapshot,
    size_limit,
    write_atomically,
)
from lookupd.dnsbl.special import NUMERIC_TLD, numeric_tld, smtp_name, special_address, special_name
from lookupd.dnsbl.stats import DnsblStats, ListCounters, list_stats
from lookupd.dnsbl.verdict import (
    DnsblResult,
    KeptVerdict,
    ListAnswer,
    ListSpec,
    PtrResult,
    combine,
    decide_fcrdns,
    interpret,
    ptr_names,
    with_text,
)
from lookupd.errors import BadRequest
from lookupd.outcome import Count, Status

logger = logging.getLogger(__name__)

# Quarantined lists are probed again after this long (or probe_interval, if shorter).
QUARANTINE_RECHECK = 30.0
# Readiness waits this long at most for the cache snapshot; a snapshot still loading then
# goes on in the background (the cache warms up from DNS meanwhile).
SNAPSHOT_WAIT = 0.5

# While the resolver is at fault it is asked again this often (one probe round).
RESOLVER_RECHECK = 5.0

# The OncePer key of the periodic line about the lists out of service.
_OUT_OF_SERVICE = ("out-of-service",)

# What to tell the admin, once per list and period, when a list cannot answer.
_FAILURE_ADVICE = {
    "timeout": "did not answer within dnsbl.deadline ({deadline:g}s): check that {resolver} "
               "is up and can reach the list",
    "servfail": "got SERVFAIL from {resolver}: the list's servers are down or unreachable "
                "from it",
    "refused": "got REFUSED from {resolver}: allow this host in the resolver's access "
               "control, or point dnsbl.nameservers at one that serves it",
    "unreachable": "cannot reach {resolver} (network error): check dnsbl.nameservers or "
                   "/etc/resolv.conf",
    "error": "got an answer from {resolver} that lookupd cannot use (malformed)",
}


@dataclass(eq=False)  # one per list: compared by identity
class _ListState:
    spec: ListSpec
    qzone: str  # the zone actually asked; holds the DQS key: never log it
    counters: ListCounters = field(default_factory=ListCounters)
    # None until a probe round of this list has come back in this process (or was handed
    # over by `take_over`): until then its answers do not count.
    health: Health | None = None
    # Set when a probe round came back for it: with a verdict, or blaming the resolver.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    # Its questions (to the wire, not the cache) that failed in a row, since when
    # (time.monotonic), and when it last gave an answer (real question or probe).
    streak: int = 0
    streak_since: float = 0.0
    last_answer: float = -math.inf
    # Since when (wall clock) it has been out of service, while it is.
    out_since: float = 0.0
    # The test points its last probe got no answer for (their labels, in probe order).
    unanswered: tuple[str, ...] = ()

    def set_health(self, health: Health) -> None:
        if health.quarantined != (self.health is not None and self.health.quarantined):
            self.streak = 0
        self.health = health
        self.settled.set()


@dataclass
class _Handover:
    """What `take_over` copied from the running source; `open` applies it when its resolver
    asks the same servers (the system resolver's may have changed with the reload)."""

    servers: tuple[str, ...]
    nameservers: tuple[tuple[int, bool], ...]  # DnsClient.standing() of the running source
    fault: str  # the running source's resolver fault and silent nameservers
    silent: tuple[str, ...]
    # index into _lists -> the running source's verdict, and since when it is out of service
    health: dict[int, tuple[Health, float]]
    answers: list[tuple[CacheKey, DnsAnswer]]
    # The running source was still loading the snapshot: this one loads it instead.
    snapshot_pending: bool


R = TypeVar("R")


def _counted(n: int = 1) -> None:
    """What a Cached result counts once it has been taken: nothing more."""


class Cached(Generic[R]):
    """A result found whole in the cache, not yet counted. `take()` counts it in the stats
    (and logs a failing list's warning) exactly as the lookup through DNS would, once, and
    returns it; dropping it untaken leaves no trace (the caller then asks through DNS).

    `expires`: the earliest expiry of the cached answers it was decided from. While that has
    not passed and the source's `generation` is the same, the same lookup gives this result
    again, and `counter` counts it again as `take()` did (the `connect` reply cache)."""

    __slots__ = ("_count", "counter", "expires", "result")

    def __init__(self, result: R, count: Count,
                 expires: float = math.inf) -> None:
        self.result = result
        self.counter = count
        self.expires = expires
        self._count = count

    def take(self) -> R:
        count, self._count = self._count, _counted
        count()
        return self.result


# What `_peek_check` decided from cached answers, reused while the same lists (in service)
# give the same verdicts: the lists asked, their verdicts, the result, and its count.
_Combined = tuple[tuple["_ListState", ...], tuple[ListAnswer, ...], DnsblResult, Count]
# What `peek_ptr` decided: the PTR answer and the forward answers (by name) it came from,
# the result, and its count.
_PtrMemo = tuple[DnsAnswer, tuple[tuple[str, DnsAnswer], ...], PtrResult, Count]


class DnsblSource:
    """DNSBL verdicts for IPs (`check_ip`), domains (`check_domain`) and reverse DNS (`ptr`)."""

    def __init__(self, config: DnsblConfig, state_dir: Path, *,
                 clock: Callable[[], float] = time.time,
                 log_period: float = LOG_PERIOD, cluster: Cluster | None = None) -> None:
        self._config = config
        # [cluster]: answers shared with the other hosts, behind the in-memory cache.
        self._shared = (SharedAnswers(cluster, config.negative_ttl_max, clock)
                        if cluster is not None else None)
        self._snapshot_path = state_dir / SNAPSHOT_NAME
        self._clock = clock
        self._lists = tuple(
            _ListState(spec, query_zone(spec.zone, spamhaus=spec.spamhaus,
                                        dqs_key=config.dqs_key))
            for spec in (ListSpec.from_config(c) for c in config.lists))
        # Cache keys use the configured zone; the question goes to the DQS one.
        self._qzones = {state.spec.zone: state.qzone for state in self._lists}
        # The lists each kind of query asks, in configuration order.
        self._ip_lists = {
            family: [s for s in self._lists if s.spec.kind == "ip" and family in s.spec.families]
            for family in ("ipv4", "ipv6")}
        # Of those, the ones also asked about special-use addresses (internal lists).
        self._special_ip_lists = {family: [s for s in lists if s.spec.query_special]
                                  for family, lists in self._ip_lists.items()}
        self._domain_lists = [s for s in self._lists if s.spec.kind == "domain"]
        self._special_domain_lists = [s for s in self._domain_lists if s.spec.query_special]
        self._ptr_counters = ListCounters()
        self._cache = AnswerCache(config.cache_size, clock)
        # What was decided from cached answers, reused while they are the same (issue 15);
        # each bounded as the cache is.
        self._combined: dict[tuple[str, str], _Combined] = {}
        self._ptr_memo: dict[str, _PtrMemo] = {}
        # Bumped when a list's standing (in service, quarantined, unprobed) changes, and
        # when the source closes: see `generation`.
        self._changes = 0
        # Repeated warnings (a list's failures, the lists out of service) once per period.
        self._once = OncePer(log_period)
        self._client: DnsClient | None = None
        self._handover: _Handover | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # True once the snapshot is loaded (or known absent, refused, unreadable): only then
        # may the cache be written over it, or a start cut short would lose the file.
        self._snapshot_settled = False
        # Why the resolver, not any list, is to blame for the failures ("" while it is not):
        # the lists are then unknown without a question, and none is quarantined for it.
        self._fault = ""
        # The nameservers that did not reply to the last probe round's liveness question.
        self._silent: tuple[str, ...] = ()
        # Set to run a probe round now (a list failing with nothing to tell whose fault).
        self._wake = asyncio.Event()
        if config.nameservers:
            self._resolver_name = "the resolver " + ", ".join(str(n) for n in
                                                              config.nameservers)
        else:
            self._resolver_name = "the system resolver (/etc/resolv.conf)"

    # -- lifecycle -------------------------------------------------------------------------

    def take_over(self, previous: DnsblSource) -> None:
        """On reload, before `open()` and while `previous` (the running source) is open: keep
        what it knows that still holds under this config. A list a probe would see the same
        keeps its verdict (trusted or quarantined, no untrusted window), the cached answers
        of the same resolver and zones are kept. Only values are copied: `previous` is left
        untouched, to be closed whenever the caller likes."""
        if self._client is not None:
            raise RuntimeError("DnsblSource.take_over() must come before open()")
        client = previous._client
        if client is None:
            return  # not open: what it knew is not current
        known = {previous._probe_identity(s): (s.health, s.out_since) for s in previous._lists
                 if s.health is not None}
        health = {i: h for i, s in enumerate(self._lists)
                  if (h := known.get(self._probe_identity(s))) is not None}
        answers: list[tuple[CacheKey, DnsAnswer]] = []
        if previous._config.nameservers == self._config.nameservers:
            # The cache is keyed by the configured zone: a zone now asked under another name
            # (DQS key set or changed) may answer differently.
            zones = {z for z, q in self._qzones.items() if previous._qzones.get(z) == q}
            answers = carry_over(previous._cache.items(), self._clock(), zones={"", *zones},
                                 negative_ttl_max=self._config.negative_ttl_max,
                                 error_ttl=self._config.error_ttl)
        self._handover = _Handover(client.servers, client.standing(), previous._fault,
                                   previous._silent, health, answers,
                                   snapshot_pending=not previous._snapshot_settled)

    def _probe_identity(self, state: _ListState) -> tuple[object, ...]:
        """Everything that changes what a probe of the list says (qzone: zone and DQS key)."""
        return (state.qzone, state.spec.kind, state.spec.families, self._config.nameservers,
                self._config.deadline)

    async def open(self) -> None:
        """Start the probes, load the cache snapshot, start the periodic jobs.

        The first probe round starts at once but is not waited for: readiness (and a reload)
        must not wait on a list that times out. Until a list's first probe has come back a
        query waits for it, within dnsbl.deadline, and then counts the list as unprobed.
        """
        client = DnsClient(make_nameservers(self._config.nameservers, self._config.deadline),
                           negative_ttl_max=self._config.negative_ttl_max,
                           error_ttl=self._config.error_ttl, min_ttl=self._config.min_ttl,
                           clock=self._clock)
        self._client = client
        handover, self._handover = self._handover, None
        if handover is not None:
            if handover.servers == client.servers:
                client.resume(handover.nameservers)
                self._fault, self._silent = handover.fault, handover.silent
                for i, (health, out_since) in handover.health.items():
                    self._set_health(self._lists[i], health)
                    self._lists[i].out_since = out_since
                self._cache.load(handover.answers)
            else:
                logger.info("DNSBL resolver changed (%s): every list is probed again, "
                            "cached answers are dropped", self._resolver_name)
        # Probes first: every query of an unprobed list waits for them.
        self._tasks = [asyncio.create_task(self._probe_loop())]
        if handover is None or handover.snapshot_pending:
            # A snapshot of a normal size is in the cache before the first query; a big one
            # (or a slow disk) must not hold up readiness: it goes on loading in the
            # background and joins the cache under what it has learnt meanwhile.
            loading = asyncio.create_task(self._load_snapshot())
            self._tasks.append(loading)
            await asyncio.wait({loading}, timeout=SNAPSHOT_WAIT)
            if not loading.done():
                logger.info("the DNSBL cache snapshot %s is still loading after %gs: it joins "
                            "the cache when it is read", self._snapshot_path, SNAPSHOT_WAIT)
        else:
            # After a take_over the running source's cache is newer than the snapshot.
            self._snapshot_settled = True
        self._tasks.append(asyncio.create_task(self._snapshot_loop()))

    @property
    def generation(self) -> int:
        """Changes when a result from the cache alone could change before the earliest
        expiry of the answers it came from (`Cached.expires`): a list's standing changed, an
        unexpired answer left the cache or was replaced, or the source closed."""
        return self._changes + self._cache.changes

    def holds(self, generation: int, expires: float) -> bool:
        """Whether results from the cache alone taken at `generation`, from answers whose
        earliest expiry is `expires` (`Cached.expires`), are still what a lookup gives."""
        return generation == self._changes + self._cache.changes and self._clock() < expires

    async def close(self) -> None:
        """Stop the periodic jobs and the questions on the wire, write the snapshot."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._cache.aclose()
        if self._shared is not None:
            await self._shared.aclose()
        if self._client is not None:
            if self._snapshot_settled:
                await self.save_snapshot()
            self._client = None
            self._changes += 1  # nothing is answered from the cache any more

    async def _probe_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.probe()
            except Exception:
                logger.exception("DNSBL probe round failed; it runs again in %gs",
                                 self._next_probe())
            # Woken early by a list that keeps failing with nothing to tell whose fault.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_probe()):
                    await self._wake.wait()

    def _next_probe(self) -> float:
        """Seconds to the next probe round: sooner while something is wrong, so that a
        resolver or list that was down for a moment is back in service soon."""
        interval = self._config.probe_interval
        if self._fault:
            return min(interval, RESOLVER_RECHECK)
        if self._silent or any(standing(s.health) for s in self._lists):
            return min(interval, QUARANTINE_RECHECK)
        return interval

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.snapshot_interval)
            if not self._snapshot_settled:
                continue  # still loading: the file holds more than the cache
            try:
                await self.save_snapshot()
            except Exception:
                logger.exception("DNSBL cache snapshot failed; it is tried again in %gs",
                                 self._config.snapshot_interval)

    # -- lookups ---------------------------------------------------------------------------

    async def check_ip(self, ip: str | IPAddress) -> DnsblResult:
        """Every IP list serving the address's family, in parallel, within dnsbl.deadline."""
        return await self._check(*self._ip_query(ip))

    async def check_domain(self, name: str) -> DnsblResult:
        """Every domain list (Spamhaus DBL and the like), in parallel, within the deadline.
        BadRequest when `name` is no domain name (an IP address, say)."""
        return await self._check(*self._domain_query(_domain(name)))

    async def check_smtp_name(self, text: str, client: IPAddress | None = None) -> DnsblResult:
        """`check_domain` for a HELO name or a sender domain (or address) as the client gave
        it: what no list can hold (an address literal, a numeric TLD, no domain name at all)
        is clean without a question, and the bounce's empty sender is clean. The names a
        `client` on a special-use address (the LAN) gives are internal: they are asked only
        of internal lists (query_special), as its address is."""
        return await self._check(*self._smtp_name_query(text, client))

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        """One plain question (A, AAAA, MX of a HELO name) through the shared cache, within
        the deadline; UNKNOWN when nothing came back in time."""
        loop = asyncio.get_running_loop()
        answer = await self._within(loop.time() + self._config.deadline,
                                    self._lookup("", rdtype, name, None))
        return DnsAnswer(Status.UNKNOWN, reason="timeout") if answer is None else answer

    async def ptr(self, ip: str | IPAddress) -> PtrResult:
        """The PTR name of an address and whether it resolves back to it (FCrDNS)."""
        address = _address(ip)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.deadline
        self._ptr_counters.queries += 1
        ptr = await self._within(deadline, self._lookup(
            "", "PTR", _ptr_label(address), self._ptr_counters, count_hit=True))
        if ptr is None:
            self._ptr_counters.timeouts += 1
            return PtrResult(Status.UNKNOWN, fcrdns="unknown", reason="timeout")
        rdtype = _forward_type(address)
        names = ptr_names(ptr) if ptr.status is Status.FOUND else ()
        tasks = {n: asyncio.create_task(self._lookup("", rdtype, n, self._ptr_counters))
                 for n in names}
        if tasks:
            await self._wait_all(deadline, set(tasks.values()))
        forwards = {n: t.result() for n, t in tasks.items() if t.done() and not t.cancelled()}
        result = decide_fcrdns(address, ptr, forwards)
        self._account_ptr(result)
        return result

    # -- the same lookups from the cache alone (synchronous) ------------------------------

    def peek_ip(self, ip: str | IPAddress) -> Cached[DnsblResult] | None:
        """`check_ip`'s result when every answer it needs is cached and unexpired, else None.
        Nothing is counted until the result is taken."""
        return self._peek_check(*self._ip_query(ip))

    def peek_domain(self, name: str) -> Cached[DnsblResult] | None:
        """`check_domain`'s result from the cache alone, else None (see `peek_ip`)."""
        return self._peek_check(*self._domain_query(_domain(name)))

    def peek_smtp_name(self, text: str,
                       client: IPAddress | None = None) -> Cached[DnsblResult] | None:
        """`check_smtp_name`'s result from the cache alone, else None (see `peek_ip`)."""
        return self._peek_check(*self._smtp_name_query(text, client))

    def peek_ptr(self, ip: str | IPAddress) -> Cached[PtrResult] | None:
        """`ptr`'s result when the PTR answer and every forward answer it leads to are cached,
        else None (see `peek_ip`)."""
        if self._client is None:
            return None  # before open() and after close(): the DNS path says why
        address = _address(ip)
        label = _ptr_label(address)
        cache = self._cache
        now = self._clock()
        entry = cache.entry(("", "PTR", label), now)
        if entry is None:
            return None
        ptr = entry.answer
        expires = ptr.expires
        rdtype = _forward_type(address)
        known = self._ptr_memo.get(label)
        if known is not None and known[0] is ptr:
            # Decided from this very PTR answer before: the same result while the forward
            # answers are the very ones it was decided from, too.
            for name, forward in known[1]:
                found = cache.entry(("", rdtype, name), now)
                if found is None or found.answer is not forward:
                    break
                expires = min(expires, forward.expires)
            else:
                return Cached(known[2], known[3], expires)
            expires = ptr.expires
        forwards: dict[str, DnsAnswer] = {}
        if ptr.status is Status.FOUND:
            for name in ptr_names(ptr):
                found = cache.entry(("", rdtype, name), now)
                if found is None:
                    return None
                forwards[name] = found.answer
                expires = min(expires, found.answer.expires)
        result = decide_fcrdns(address, ptr, forwards)

        used = (("", "PTR", label), *(("", rdtype, name) for name in forwards))

        def count(n: int = 1) -> None:
            # As `ptr` counts an answer without a packet: a query and a cache hit; the
            # answers are used again, as a lookup uses them.
            self._ptr_counters.queries += n
            self._ptr_counters.cache_hits += n
            self._account_ptr(result, n)
            cache.touch(used)

        memo = self._ptr_memo
        if len(memo) >= self._config.cache_size:
            memo.clear()  # bounded as the cache is; what is still cached is decided again
        memo[label] = (ptr, tuple(forwards.items()), result, count)
        return Cached(result, count, expires)

    def cached_ip(self, ip: str | IPAddress) -> DnsblResult | None:
        """`check_ip`'s result, counted, when the cache holds all of it; else None."""
        return _take(self.peek_ip(ip))

    def cached_domain(self, name: str) -> DnsblResult | None:
        """`check_domain`'s result, counted, when the cache holds all of it; else None."""
        return _take(self.peek_domain(name))

    def cached_smtp_name(self, text: str) -> DnsblResult | None:
        """`check_smtp_name`'s result, counted, when the cache holds all of it; else None."""
        return _take(self.peek_smtp_name(text))

    def cached_ptr(self, ip: str | IPAddress) -> PtrResult | None:
        """`ptr`'s result, counted, when the cache holds all of it; else None."""
        return _take(self.peek_ptr(ip))

    def _peek_check(self, lists: Sequence[_ListState], label: str,
                    skipped: str = "") -> Cached[DnsblResult] | None:
        if self._client is None:
            return None  # before open() and after close(): the DNS path says why
        cache = self._cache
        now = self._clock()
        expires = math.inf
        asked: list[_ListState] = []
        verdicts: list[ListAnswer] = []
        for state in lists:
            reason = standing(state.health)
            if reason == UNPROBED:
                return None  # `_check` waits for its first probe, within the deadline
            if reason:
                continue  # out of service: it leaves the decision to the others
            spec = state.spec
            entry = cache.entry((spec.zone, "A", label), now)
            if entry is None:
                return None
            expires = min(expires, entry.answer.expires)
            # The list's verdict on this answer is kept with it: decided once, not again on
            # every request (codes classified, the TXT's text cleaned).
            kept = entry.verdict
            if kept is None or kept.spec is not spec:
                bare = interpret(spec, entry.answer)
                kept = entry.verdict = KeptVerdict(spec, bare, bare)
            if kept.bare.status is Status.FOUND:
                # `_check` asks a hit's TXT too, and waits for it within the deadline.
                txt = cache.entry((spec.zone, "TXT", label), now)
                if txt is None:
                    return None
                expires = min(expires, txt.answer.expires)
                if kept.txt is not txt.answer:
                    kept = entry.verdict = KeptVerdict(
                        spec, kept.bare, with_text(spec, kept.bare, txt.answer), txt.answer)
            asked.append(state)
            verdicts.append(kept.answer)

        # The same lists with the same verdicts as last time: the same result, and the same
        # count (the identical result lets the `dnsbl` reply be reused as well).
        who, said = tuple(asked), tuple(verdicts)
        key = (label, skipped)
        known = self._combined.get(key)
        if known is not None and known[0] == who and known[1] == said:
            return Cached(known[2], known[3], expires)

        used = tuple((s.spec.zone, rdtype, label) for s, said_one in zip(who, said, strict=True)
                     for rdtype in (("A", "TXT") if said_one.status is Status.FOUND else ("A",)))

        def count(n: int = 1) -> None:
            # As `_check` counts answers without a packet: a query and a cache hit per list
            # asked (one out of service is not asked), and each answer's hit or failure; the
            # answers are used again, as a lookup uses them.
            for state in who:
                state.counters.queries += n
                state.counters.cache_hits += n
            self._account_all(who, said, n)
            cache.touch(used)

        result = combine(said, self._config.threshold, skipped)
        memo = self._combined
        if len(memo) >= self._config.cache_size:
            memo.clear()  # bounded as the cache is; what is still cached is decided again
        memo[key] = (who, said, result, count)
        return Cached(result, count, expires)

    # -- lookups through DNS -----------------------------------------------------------------

    def _ip_query(self, ip: str | IPAddress) -> tuple[list[_ListState], str, str]:
        """The lists to ask about an address, its label, and why other lists serving its
        family are not asked ("" when none is left out)."""
        address = _address(ip)
        family = "ipv4" if isinstance(address, ipaddress.IPv4Address) else "ipv6"
        lists = self._ip_lists[family]
        special = special_address(address)
        if not special:
            return lists, reverse_ip(address), ""
        # Never sent to the Internet's lists: only internal ones (query_special) hear of it.
        asked = self._special_ip_lists[family]
        return asked, reverse_ip(address), special if len(asked) < len(lists) else ""

    def _domain_query(self, name: str) -> tuple[list[_ListState], str, str]:
        """The lists to ask about a normalized domain name, its label, and why other domain
        lists are not asked ("" when none is left out)."""
        lists = self._domain_lists
        if numeric_tld(name):
            return [], name, NUMERIC_TLD if lists else ""
        special = special_name(name)
        if not special:
            return lists, name, ""
        asked = self._special_domain_lists
        return asked, name, special if len(asked) < len(lists) else ""

    def _smtp_name_query(self, text: str,
                         client: IPAddress | None) -> tuple[list[_ListState], str, str]:
        name, why = smtp_name(text)
        if not name:
            return [], "", why if self._domain_lists else ""
        lists, label, skipped = self._domain_query(name)
        special = special_address(client) if client is not None else ""
        if not special or not lists:
            return lists, label, skipped
        asked = [s for s in lists if s.spec.query_special]
        return asked, label, special if len(asked) < len(lists) else skipped

    async def _check(self, every: Sequence[_ListState], label: str,
                     skipped: str = "") -> DnsblResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.deadline
        # A list out of service is not asked: it leaves the decision to the others.
        lists = [state for state in every if standing(state.health) != QUARANTINED]
        answers: dict[int, ListAnswer | None] = {}
        a_tasks: dict[asyncio.Task[Any], int] = {}
        for i, state in enumerate(lists):
            a_tasks[asyncio.create_task(self._list_answer(state, label))] = i
        # A hit's TXT is asked as soon as its A answer is in, still within the deadline; a
        # TXT that comes too late only costs the text.
        txt_tasks: dict[asyncio.Task[Any], int] = {}
        pending: set[asyncio.Task[Any]] = set(a_tasks)
        try:
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=remaining,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = a_tasks.get(task, -1)
                    if i < 0:
                        continue
                    answer = task.result()
                    assert answer is None or isinstance(answer, ListAnswer)
                    answers[i] = answer
                    if answer is not None and answer.status is Status.FOUND:
                        state = lists[i]
                        txt = asyncio.create_task(
                            self._lookup(state.spec.zone, "TXT", label, None))
                        txt_tasks[txt] = i
                        pending.add(txt)
        finally:
            await self._cancel(pending)
        for txt_task, i in txt_tasks.items():
            listed = answers[i]
            assert listed is not None
            if txt_task.done() and not txt_task.cancelled():
                answers[i] = with_text(lists[i].spec, listed, txt_task.result())
            else:
                answers[i] = with_text(lists[i].spec, listed, None)
        asked: list[_ListState] = []
        ordered: list[ListAnswer] = []
        for i, state in enumerate(lists):
            if i in answers:
                answer = answers[i]
            elif standing(state.health) == QUARANTINED:
                answer = None  # its first probe found it out of service, just now
            else:  # missing at the deadline: unprobed still, else it timed out
                answer = _unusable(state, self._missing(state))
            if answer is not None:
                state.counters.queries += 1
                asked.append(state)
                ordered.append(answer)
        self._account_all(asked, ordered)
        return combine(ordered, self._config.threshold, skipped)

    def _missing(self, state: _ListState) -> str:
        """Why a list asked about a client has not answered by the deadline."""
        if state.health is None:
            return RESOLVER_DOWN if self._fault else UNPROBED
        return "timeout"

    async def _list_answer(self, state: _ListState, label: str) -> ListAnswer | None:
        """The list's say, or None when its first probe (waited for here) finds it out of
        service: then it leaves the decision to the others."""
        if state.health is None:
            # Not asked before its first probe is back: a list that lists everything must
            # neither answer a client nor fill the cache with listings meanwhile.
            if not self._fault:
                await state.settled.wait()
            if state.health is None:  # the probe round blamed the resolver
                return _unusable(state, RESOLVER_DOWN)
        if standing(state.health) == QUARANTINED:
            # Its first probe came back (just now, or between `_check` choosing the lists
            # and this task starting) and put it out of service.
            return None
        answer = await self._lookup(state.spec.zone, "A", label, state.counters,
                                    count_hit=True, track=state)
        return interpret(state.spec, answer)

    async def _lookup(self, zone: str, rdtype: str, label: str,
                      counters: ListCounters | None, *, count_hit: bool = False,
                      track: _ListState | None = None) -> DnsAnswer:
        """One question through the shared cache; `zone` "" asks `label` as it is. An answer
        from the wire counts in `track`'s run of failures."""
        client = self._client
        if client is None:
            raise RuntimeError("DnsblSource used before open()")
        qzone = self._qzones.get(zone, zone)
        qname = f"{label}.{qzone}." if qzone else f"{label}."

        key = (zone, rdtype, label)
        shared = self._shared

        async def ask() -> DnsAnswer:
            if shared is not None:
                known = await shared.get(key)
                if known is not None:
                    return known
            if self._fault:
                # No nameserver answers (the probe rounds ask again): no client waits for
                # one, and nothing is cached (expires at once).
                return DnsAnswer(Status.UNKNOWN, reason=RESOLVER_DOWN)
            started = time.monotonic()
            # Redacted before it is cached: the snapshot on disk must not hold the key either.
            answer = self._redacted(await client.ask(qname, rdtype, self._config.deadline))
            if counters is not None and answer.reason != "timeout":
                counters.latencies.append(time.monotonic() - started)
            if track is not None:
                self._track(track, answer, started)
            if shared is not None:
                shared.put(key, answer)
            return answer

        answer, without_packet = await self._cache.fetch(key, ask)
        if counters is not None and count_hit and without_packet:
            counters.cache_hits += 1
        return answer

    def _redacted(self, answer: DnsAnswer) -> DnsAnswer:
        key = self._config.dqs_key
        if not key or not any(key.lower() in r.lower() for r in answer.records):
            return answer
        return DnsAnswer(answer.status, tuple(redact(r, key) for r in answer.records),
                         answer.reason, answer.expires)

    def _account_all(self, lists: Sequence[_ListState], answers: Sequence[ListAnswer],
                     n: int = 1) -> None:
        for state, answer in zip(lists, answers, strict=True):
            self._account(state, answer, n)

    def _account_ptr(self, result: PtrResult, n: int = 1) -> None:
        # A hit is "has a PTR"; a failed PTR or forward lookup is a timeout or an error (not
        # while the resolver is down: that is said once, for everything).
        if result.status is Status.FOUND:
            self._ptr_counters.hits += n
        if result.fcrdns == "unknown" and result.reason != RESOLVER_DOWN:
            if result.reason == "timeout":
                self._ptr_counters.timeouts += n
            else:
                self._ptr_counters.errors += n

    def _account(self, state: _ListState, answer: ListAnswer, n: int = 1) -> None:
        counters = state.counters
        if answer.status is Status.FOUND:
            counters.hits += n
            return
        if answer.status is not Status.UNKNOWN or answer.reason in (QUARANTINED, UNPROBED,
                                                                     RESOLVER_DOWN):
            return
        if answer.reason == "timeout":
            counters.timeouts += n
        else:
            counters.errors += n
        if not self._once((state.spec.name, answer.reason)):
            return
        if answer.reason.startswith("error-code-"):
            code = answer.reason.removeprefix("error-code-")
            logger.warning("DNSBL %s answered %s, which is not a listing: %s; its answers "
                           "count as unknown meanwhile", state.spec.name, code,
                           advice(code, self._dqs(state), state.spec.errors))
        else:
            failure = _FAILURE_ADVICE.get(answer.reason, _FAILURE_ADVICE["error"]).format(
                deadline=self._config.deadline, resolver=self._resolver_name)
            logger.warning("DNSBL %s %s; its answers count as unknown meanwhile",
                           state.spec.name, failure)

    # -- health ----------------------------------------------------------------------------

    async def probe(self) -> None:
        """Ask every list its RFC 5782 test points and every nameserver whether it is there;
        quarantine or release each list accordingly, unless the resolver is to blame.

        A list whose test points got answers is judged as soon as they are in (a query may be
        waiting for it); one that got none waits for the whole round, which tells whether
        it is the list or the resolver that does not answer."""
        client = self._client
        if client is None:
            return
        started = time.monotonic()
        ping = asyncio.create_task(client.ping(self._config.deadline))
        try:
            verdicts = await asyncio.gather(*(self._probe_list(client, state)
                                              for state in self._lists))
            silent = await ping
        finally:
            if not ping.done():  # cancelled (close)
                await self._cancel({ping})
        fault = resolver_fault(client.last_reply >= started, verdicts)
        self._note_nameservers(silent, fault)
        self._note_fault(fault)
        for state, health in zip(self._lists, verdicts, strict=True):
            if health.quarantine != NOT_ANSWERING:
                continue  # judged already
            if fault:
                # Not the list's doing: it keeps its standing (unprobed stays unprobed), and
                # a query waiting for its first probe stops waiting.
                state.settled.set()
            elif len(self._lists) == 1 and len(state.unanswered) == len(
                    probe_points(state.spec.kind, state.spec.families)):
                # No test point answered and no other list to compare with.
                self._judged(state, lone_list(
                    health, state.spec.zone, state.unanswered[0],
                    [(n.host, n.port) for n in self._config.nameservers],
                    dqs=state.qzone != state.spec.zone))
            else:
                self._judged(state, health)
        self._remind()

    def _remind(self) -> None:
        """One line a period (LOG_PERIOD) naming the lists out of service, while any is."""
        out = [s for s in self._lists if s.health is not None and s.health.quarantined]
        if not out or not self._once(_OUT_OF_SERVICE):
            return
        now = self._clock()
        named = ", ".join(f"{s.spec.name} ({_quarantine(s)} for "
                          f"{_duration(now - s.out_since)})" for s in out)
        logger.warning("DNSBL lists out of service, left out of every verdict: %s; probed "
                       "again every %gs", named,
                       min(self._config.probe_interval, QUARANTINE_RECHECK))

    async def _probe_list(self, client: DnsClient, state: _ListState) -> Health:
        """One list's probe verdict; applied at once unless no test point got an answer."""
        points = probe_points(state.spec.kind, state.spec.families)
        # Probes bypass the cache: they are about the list now, not about a client.
        answers = await asyncio.gather(*(
            client.ask(f"{p.label}.{state.qzone}.", "A", self._config.deadline)
            for p in points))
        health = judge(list(zip(points, answers, strict=True)), self._dqs(state),
                       state.spec.errors)
        state.unanswered = tuple(p.label for p, a in zip(points, answers, strict=True)
                                 if a.status is Status.UNKNOWN)
        if health.quarantine != NOT_ANSWERING:
            # It answered: the resolver reaches the lists, whatever it did before.
            state.last_answer = time.monotonic()
            self._note_fault("")
            self._judged(state, health)
        return health

    def _dqs(self, state: _ListState) -> Dqs:
        if not self._config.dqs_key:
            return ""
        return "used" if state.qzone != state.spec.zone else "unused"

    def _judged(self, state: _ListState, health: Health) -> None:
        """Give a list its new health and say so when that changes."""
        name = state.spec.name
        before = state.health or Health()  # a first probe: as if it had been in service
        if health.quarantined and not before.quarantined:
            logger.warning("DNSBL %s quarantined: %s; it is out of service, left out of "
                           "every verdict, until its test points are right again (probed "
                           "every %gs)", name, health.note,
                           min(self._config.probe_interval, QUARANTINE_RECHECK))
            state.out_since = self._clock()
            self._once(_OUT_OF_SERVICE)  # the reminder comes a period after this line
        elif before.quarantined and not health.quarantined:
            logger.warning("DNSBL %s answers its test points correctly again: back in "
                           "service", name)
        elif health.note and health.note != before.note:
            # Said when it starts (or changes), not every round: a list that merely lacks
            # its positive test point would otherwise nag forever.
            logger.warning("DNSBL %s: %s", name, health.note)
        self._set_health(state, health)

    def _set_health(self, state: _ListState, health: Health) -> None:
        if standing(health) != standing(state.health):
            self._changes += 1  # what was decided with it in or out of service is stale
        state.set_health(health)

    def _track(self, state: _ListState, answer: DnsAnswer, started: float) -> None:
        """Count a list's answer from the wire: after FAIL_STREAK failures in a row that are
        its own doing it is quarantined at once, not at the next probe round."""
        if answer.status is not Status.UNKNOWN:
            state.streak = 0
            state.last_answer = time.monotonic()
            return
        if answer.reason not in FAILURES or standing(state.health):
            return
        if state.streak == 0:
            state.streak_since = started
        state.streak += 1
        if state.streak < FAIL_STREAK:
            return
        peers = [s.last_answer for s in self._lists
                 if s is not state and s.health is not None and not s.health.quarantined]
        client = self._client
        last_reply = client.last_reply if client is not None else -math.inf
        if own_failure(state.streak_since, peers, last_reply):
            self._judged(state, Health(NOT_ANSWERING, (
                f"{state.streak} questions in a row got no answer ({answer.reason}) while "
                f"{self._resolver_name} answers others")))
        else:
            self._wake.set()  # a probe round tells whose fault it is

    def _note_fault(self, fault: str) -> None:
        """One line when the resolver becomes (or stops being) the one to blame."""
        before, self._fault = self._fault, fault
        if fault == before:
            return
        if before == "no-nameserver":
            self._silent = ()  # none was named alone; this round's liveness question tells
        if fault == "no-nameserver":
            logger.warning("DNSBL: no nameserver of %s answers at all: every list is unknown "
                           "(unknown=LIST:%s) until one does, and none is quarantined for it; "
                           "asked again every %gs", self._resolver_name, RESOLVER_DOWN,
                           min(self._config.probe_interval, RESOLVER_RECHECK))
        elif fault == "no-list-answers":
            logger.warning("DNSBL: %s answers, but none of the %d lists answered its test "
                           "points through it: it cannot reach them (its network or "
                           "forwarders); every list is unknown (unknown=LIST:%s) meanwhile, and "
                           "none is quarantined for it; asked again every %gs",
                           self._resolver_name, len(self._lists), RESOLVER_DOWN,
                           min(self._config.probe_interval, RESOLVER_RECHECK))
        else:
            logger.warning("DNSBL: %s answers again: the lists are asked again",
                           self._resolver_name)

    def _note_nameservers(self, silent: tuple[str, ...], fault: str) -> None:
        """One line when one of several nameservers stops (or starts again) answering; while
        none answers, the line about the resolver says it for all."""
        before, self._silent = self._silent, silent
        if fault == "no-nameserver":
            return
        for label in silent:
            if label not in before:
                logger.warning("DNSBL nameserver %s does not answer: the other nameservers "
                               "are asked first until it does", label)
        for label in before:
            if label not in silent:
                logger.warning("DNSBL nameserver %s answers again", label)

    # -- snapshot --------------------------------------------------------------------------

    async def save_snapshot(self) -> None:
        """Write the cache to state_dir (temp file, fsync, rename) in a worker thread."""
        entries = self._cache.items()
        path = self._snapshot_path
        try:
            await asyncio.to_thread(lambda: write_atomically(path, encode_snapshot(entries)))
        except OSError as exc:
            logger.warning("cannot write the DNSBL cache snapshot %s: %s; make state_dir "
                           "writable by lookupd (the cache then survives restarts)",
                           path, exc.strerror or exc)

    async def _load_snapshot(self) -> None:
        """Read the snapshot in a thread into a cache of its own, then take that in whole.

        Bounded: only a regular file of at most size_limit(cache_size) bytes is read (a FIFO
        or a device is never opened to wait on), at most cache_size entries are decoded, and
        only those of the configured zones are kept, no longer than the TTL bounds allow."""
        path = self._snapshot_path
        config = self._config
        stop = threading.Event()
        started = time.monotonic()

        def load() -> tuple[AnswerCache, int]:
            now = self._clock()
            snapshot = read_snapshot(path, now, max_bytes=size_limit(config.cache_size),
                                     max_entries=config.cache_size, stop=stop)
            loaded = AnswerCache(config.cache_size, self._clock)
            loaded.load(carry_over(snapshot.entries, now, zones={"", *self._qzones},
                                   negative_ttl_max=config.negative_ttl_max,
                                   error_ttl=config.error_ttl))
            return loaded, snapshot.dropped

        try:
            loaded, dropped = await asyncio.to_thread(load)
        except FileNotFoundError:
            logger.info("no DNSBL cache snapshot at %s (normal on a first start): "
                        "starting with an empty cache", path)
        except Refused as exc:
            logger.warning("the DNSBL cache snapshot %s %s: not read, starting with an empty "
                           "cache; remove it (lookupd writes a new one on stop and every "
                           "dnsbl.snapshot_interval)", path, exc)
        except OSError as exc:
            logger.warning("cannot read the DNSBL cache snapshot %s: %s; starting with an "
                           "empty cache", path, exc.strerror or exc)
        except ValueError as exc:
            logger.warning("the DNSBL cache snapshot %s is truncated or corrupt (%s): "
                           "ignored, starting with an empty cache; it is rewritten on stop",
                           path, exc)
        except Exception:
            logger.exception("loading the DNSBL cache snapshot %s failed unexpectedly; "
                             "starting with an empty cache", path)
        else:
            count = len(loaded)
            self._cache.absorb(loaded)
            logger.info("DNSBL cache snapshot %s: %d answers loaded in %.2fs%s", path,
                        count, time.monotonic() - started,
                        f", {dropped} more than dnsbl.cache_size dropped" if dropped else "")
        finally:
            stop.set()  # cancelled (close() during the load): the thread stops soon
        self._snapshot_settled = True

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> DnsblStats:
        lists = [list_stats(s.spec.name, s.spec.kind, s.counters,
                            s.health.quarantine if s.health is not None else UNPROBED)
                 for s in self._lists]
        lists.append(list_stats("reverse-dns", "ptr", self._ptr_counters, ""))
        return DnsblStats(tuple(lists), len(self._cache), self._cache.maxsize,
                          self._cache.inflight, self._fault, self._silent)

    # -- helpers ---------------------------------------------------------------------------

    async def _within(self, deadline: float, lookup: Awaitable[DnsAnswer]) -> DnsAnswer | None:
        task = asyncio.ensure_future(lookup)
        await self._wait_all(deadline, {task})
        return task.result() if task.done() and not task.cancelled() else None

    async def _wait_all(self, deadline: float, tasks: set[asyncio.Task[DnsAnswer]]) -> None:
        """Wait until `tasks` are done or the deadline passed; cancel the stragglers."""
        remaining = deadline - asyncio.get_running_loop().time()
        pending = tasks
        try:
            if remaining > 0:
                _, pending = await asyncio.wait(tasks, timeout=remaining)
        finally:
            await self._cancel({t for t in tasks if not t.done()} | pending)

    @staticmethod
    async def _cancel(tasks: Collection[asyncio.Task[Any]]) -> None:
        # Only the waiting wrappers are cancelled; the DNS question itself runs on in the
        # cache's task and its answer is kept for the next client.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _address(ip: str | IPAddress) -> IPAddress:
    try:
        return parse_ip(ip)
    except ValueError:
        raise BadRequest("not an IP address") from None


def _domain(name: str) -> str:
    try:
        return normalize_domain(name)
    except ValueError:
        raise BadRequest("not a domain name") from None


def _ptr_label(address: IPAddress) -> str:
    suffix = "in-addr.arpa" if isinstance(address, ipaddress.IPv4Address) else "ip6.arpa"
    return f"{reverse_ip(address)}.{suffix}"


def _forward_type(address: IPAddress) -> str:
    return "A" if isinstance(address, ipaddress.IPv4Address) else "AAAA"


def _unusable(state: _ListState, reason: str) -> ListAnswer:
    return ListAnswer(state.spec.name, state.spec.weight, Status.UNKNOWN, reason=reason)


def _quarantine(state: _ListState) -> str:
    """Why a list is quarantined ("lists-everything", "not-answering"), else ""."""
    return state.health.quarantine if state.health is not None else ""


def _duration(seconds: float) -> str:
    """"45s", "12m", "3h" for a log line."""
    if seconds < 120:
        return f"{max(0, round(seconds))}s"
    if seconds < 7200:
        return f"{round(seconds / 60)}m"
    return f"{round(seconds / 3600)}h"


def _take(cached: Cached[R] | None) -> R | None:
    return None if cached is None else cached.take()
