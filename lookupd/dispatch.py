"""The explicit table from request verb to source, and from each outcome to its reply text.

Handlers answer synchronously (a plain `str`) when the source answers from memory (GeoIP,
incidents, user state, DNS answers already cached), so the server writes the reply inline with
no task per request; they return a coroutine when the source needs the network or the disk
(DNS, writes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol, TypeVar

from lookupd import __version__
from lookupd.allowlist import ListFiles
from lookupd.connect import ConnectChecker, ConnectRequest, Verdict, parse_args, unknown_facts
from lookupd.connect import render as render_connect
from lookupd.dnsbl import Cached, DnsblResult, render_dnsbl, render_ptr, render_stats
from lookupd.dnsbl.names import normalize_domain
from lookupd.dnsbl.verdict import PtrResult
from lookupd.errors import BadRequest
from lookupd.fastpath import ALWAYS, Keep
from lookupd.geoip import AsnResult, CountryResult
from lookupd.helo import HELO_FAIL_OPEN, HeloChecker
from lookupd.helo import parse_args as parse_helo
from lookupd.incidents import IncidentsResult
from lookupd.ipaddr import parse_ip
from lookupd.logsummary import Repeats
from lookupd.metrics import Metrics
from lookupd.outcome import Count, Status
from lookupd.protocol import VERBS, Document, Peer, Request, error_reply, shown
from lookupd.replies import render_asn, render_country, render_incidents
from lookupd.sources import Sources
from lookupd.status import Snapshot
from lookupd.strikes import MAX_KINDS, parse_strikes
from lookupd.trust import PeerTrust
from lookupd.users.state import render_admin, render_check

log = logging.getLogger(__name__)
repeats = Repeats(log)

Reply = str | Awaitable[str]
HandlerFn = Callable[[tuple[str, ...], Peer], Reply]
R = TypeVar("R")
_REPLIES_MAX = 4096  # replies from the DNS cache kept


@dataclass(frozen=True, slots=True)
class _Kept:
    """A reply from the DNS cache alone: the source's generation and the earliest expiry of
    the answers it came from (how long it holds), what taking it counted, the result."""

    generation: int
    expires: float
    counter: Count
    result: object
    reply: str



@dataclass(frozen=True, slots=True)
class Handler:
    """One verb: its function, how many arguments it takes, and who may ask it.

    `needs_peer`: administrative, answered only for root or users.admin_group on the Unix
    socket. `exim_only`: reads or changes user state; on the Unix socket its permissions are
    the gate (Exim's group), on loopback TCP, where every local user can connect, the peer's
    uid is looked up and must be Exim's (or root's)."""

    fn: HandlerFn
    min_args: int
    max_args: int
    needs_peer: bool = False
    exim_only: bool = False


class Dispatcher:
    """Answers parsed requests from the sources it was built with.

    Everything built from one configuration (the sources, the connect policy, the verb table)
    lives here, so a reload swaps one Dispatcher for another and nothing keeps a pointer into
    an older set. `Dispatcher.fail_open(problem)` is the one lookupd runs when it cannot load
    its configuration: same verbs, every source unknown, every connect accepted."""

    def __init__(self, sources: Sources | None, *, problem: str = "",
                 trust: PeerTrust | None = None, control: Control | None = None) -> None:
        self.sources = sources
        self.control = control
        self.problem = problem  # why lookupd runs fail-open ("" when it does not)
        self.trust = trust or PeerTrust()
        self.pending = 0  # coroutine answers in flight (the server closes a retired set at 0)
        # Set by a handler whose reply the same request would get again (lookupd/fastpath.py);
        # the server takes it after each request.
        self.kept: Keep | None = None
        # (verb, arguments) -> the reply last answered from the DNS cache alone.
        self._replies: dict[tuple[str, tuple[str, ...]], _Kept] = {}
        self.connect_checker = None if sources is None else ConnectChecker(
            sources.config.connect, sources.geoip, sources.incidents, sources.dnsbl,
            on_verdict=control.metrics.verdict if control is not None else None,
            strikes=sources.strikes)
        self.helo_checker = None if sources is None else HeloChecker(
            sources.config.helo, sources.dnsbl, ListFiles(sources.config.connect.allowlist_files),
            on_verdict=control.metrics.helo_verdict if control is not None else None)
        self.table: dict[str, Handler] = {
            "ping": Handler(self.ping, 0, 0),
            "version": Handler(lambda a, p: f"lookupd {__version__}", 0, 0),
            # Exim sends an empty argument for local submissions: `country ` answers --.
            "country": Handler(self.country, 0, 1),
            "asn": Handler(self.asn, 0, 1),
            "incidents": Handler(self.incidents, 0, 1),
            # No address (local submission) or no domain (bounce sender): nothing to list.
            "dnsbl": Handler(self.dnsbl, 0, 1),
            "dbl": Handler(self.dbl, 0, 1),
            # The MAIL ACL's sender domain ($sender_address_domain, or the whole address):
            # lenient, as a client gave it; a bounce (empty) or an address literal is clean.
            "sender": Handler(self.sender, 0, 64),
            "ptr": Handler(self.ptr, 0, 1),
            "stats": Handler(self.stats, 0, 0),
            # One verdict per SMTP connection from every source at once. HELO is optional
            # (none yet at connect time); whatever follows PORT is taken as the HELO name.
            "connect": Handler(self.connect, 0, 64),
            # The RCPT ACL's HELO check (once per connection, unauthenticated clients only).
            "helo": Handler(self.helo, 3, 64),
            # What a client did wrong (AUTH, recipients, protocol), for connect's strikes=N.
            "strike": Handler(self.strike, 2, 1 + 2 * MAX_KINDS, exim_only=True),
            # Authenticated-user block state. No user (an unauthenticated session): `ok`.
            "user": Handler(self.user, 0, 1, exim_only=True),
            # The recipient is the rest of the line: a quoted local part may hold spaces, and
            # a request that failed to parse would let that recipient go uncounted.
            "user-fail": Handler(self.user_fail, 0, 64, exim_only=True),
            "user-block": Handler(self.user_block, 1, 64, needs_peer=True),
            "user-unblock": Handler(self.user_unblock, 1, 1, needs_peer=True),
            "reload": Handler(self.reload, 0, 0, needs_peer=True),
            "status": Handler(self.status, 0, 0),
            "metrics": Handler(self.metrics, 0, 0),
        }
        if sources is None:
            self.table = {verb: replace(handler, fn=_FAIL_OPEN.get(verb, handler.fn))
                          for verb, handler in self.table.items()}

    @classmethod
    def fail_open(cls, problem: str, trust: PeerTrust | None = None,
                  control: Control | None = None) -> Dispatcher:
        """Answers for a lookupd without a usable configuration: nothing is checked, nothing
        refused, nothing recorded; `problem` says why (shown by admin verbs and stats)."""
        return cls(None, problem=problem, trust=trust, control=control)

    @property
    def live(self) -> Sources:
        """The sources; only handlers of a configured Dispatcher run, so they are there."""
        assert self.sources is not None
        return self.sources

    def needs_peer(self, verb: str) -> bool:
        """Does this verb need the peer's uid (SO_PEERCRED, or the TCP owner lookup)?"""
        handler = self.table.get(verb)
        return handler is not None and (handler.needs_peer or handler.exim_only)

    def token(self) -> Hashable:
        """Changes whenever a reply a handler said to keep (`self.kept`) may change: the DNS
        cache's generation, the versions of the GeoIP files, the incidents index and the list
        files, the strikes' changes. Each looks for changes as a lookup does."""
        sources = self.sources
        checker = self.connect_checker
        if sources is None or checker is None:
            return id(self)
        return (id(self), checker.versions(), sources.strikes.changes)

    def handle(self, request: Request, peer: Peer) -> Reply:
        """The reply (or a coroutine producing it) for one request; bad requests get `error`."""
        handler = self.table.get(request.verb)
        if handler is None:
            repeats.warning("requests with an unknown verb",
                            "unknown verb %r from %s client: check the Exim expansion that "
                            "sent it", shown(request.verb), peer.transport)
            return error_reply(f'unknown verb "{shown(request.verb)}"')
        if not handler.min_args <= len(request.args) <= handler.max_args:
            repeats.warning("requests with the wrong number of arguments",
                            "bad request %r from %s client: usage is %r", shown(" ".join(
                                (request.verb, *request.args))), peer.transport,
                            VERBS[request.verb][0])
            return error_reply(f"usage: {VERBS[request.verb][0]}")
        if handler.exim_only and peer.transport == "tcp":
            allowed = self.trust.known_use(peer)
            if allowed is None:  # the peer's groups are not known yet: looked up in a thread
                return self._trusted_then(request, handler, peer)
            if not allowed:
                return self._not_trusted(request, peer)
        return self._call(request, handler, peer)

    def _call(self, request: Request, handler: Handler, peer: Peer) -> Reply:
        try:
            return handler.fn(request.args, peer)
        except BadRequest as exc:
            repeats.warning("requests with a malformed argument",
                            "bad request %r from %s client: %s",
                            shown(" ".join((request.verb, *request.args))), peer.transport, exc)
            return error_reply(str(exc))

    async def _trusted_then(self, request: Request, handler: Handler, peer: Peer) -> str:
        if not await self.trust.check_use(peer):
            return self._not_trusted(request, peer)
        reply = self._call(request, handler, peer)
        return reply if isinstance(reply, str) else await reply

    def _not_trusted(self, request: Request, peer: Peer) -> str:
        repeats.warning("user-state requests refused on TCP",
                        "%s refused on TCP: the client (uid %s) is not Exim or root; only "
                        "Exim may read or record user state (use the Unix socket, or run "
                        "the command as root)", request.verb, peer.uid)
        return error_reply("not permitted")

    def ping(self, args: tuple[str, ...], peer: Peer) -> str:
        self.kept = ALWAYS
        return "pong"

    # --- GeoIP ---------------------------------------------------------------------------

    def country(self, args: tuple[str, ...], peer: Peer) -> str:
        reply = render_country(self.live.geoip.country(_optional_ip(args)))
        self.kept = ALWAYS  # while the GeoIP files are the same (the token)
        return reply

    def asn(self, args: tuple[str, ...], peer: Peer) -> str:
        reply = render_asn(self.live.geoip.asn(_optional_ip(args)))
        self.kept = ALWAYS
        return reply

    # --- firewall incidents --------------------------------------------------------------

    def incidents(self, args: tuple[str, ...], peer: Peer) -> str:
        ip = _optional_ip(args)
        if ip is None:
            return "0"
        result = self.live.incidents.count(ip)
        self.kept = Keep(result.until)  # while the same index answers (the token)
        return render_incidents(result)

    # --- DNSBL, DBL, reverse DNS (from the DNS cache at once; else a coroutine) ------------

    def dnsbl(self, args: tuple[str, ...], peer: Peer) -> Reply:
        reply = self._replay("dnsbl", args)
        if reply is not None:
            return reply
        ip = _optional_ip(args)
        if ip is None:
            return render_dnsbl(DnsblResult(Status.NOT_FOUND))
        dnsbl = self.live.dnsbl
        reply = self._answered("dnsbl", args, lambda: dnsbl.peek_ip(ip), render_dnsbl)
        return self._dnsbl(ip) if reply is None else reply

    async def _dnsbl(self, ip: IPv4Address | IPv6Address) -> str:
        return render_dnsbl(await self.live.dnsbl.check_ip(ip))

    def dbl(self, args: tuple[str, ...], peer: Peer) -> Reply:
        reply = self._replay("dbl", args)
        if reply is not None:
            return reply
        if not args:
            return render_dnsbl(DnsblResult(Status.NOT_FOUND))
        try:
            domain = normalize_domain(args[0])
        except ValueError:
            raise BadRequest(f'not a domain name: "{shown(args[0])}"') from None
        dnsbl = self.live.dnsbl
        reply = self._answered("dbl", args, lambda: dnsbl.peek_domain(domain), render_dnsbl)
        return self._dbl(domain) if reply is None else reply

    async def _dbl(self, domain: str) -> str:
        return render_dnsbl(await self.live.dnsbl.check_domain(domain))

    def sender(self, args: tuple[str, ...], peer: Peer) -> Reply:
        reply = self._replay("sender", args)
        if reply is not None:
            return reply
        # The rest of the line: a quoted local part may hold spaces; the domain is what
        # follows the last "@".
        text = " ".join(args)
        dnsbl = self.live.dnsbl
        reply = self._answered("sender", args, lambda: dnsbl.peek_smtp_name(text),
                               render_dnsbl)
        return self._sender(text) if reply is None else reply

    async def _sender(self, text: str) -> str:
        return render_dnsbl(await self.live.dnsbl.check_smtp_name(text))

    def ptr(self, args: tuple[str, ...], peer: Peer) -> Reply:
        reply = self._replay("ptr", args)
        if reply is not None:
            return reply
        ip = _optional_ip(args)
        if ip is None:
            return render_ptr(PtrResult(Status.UNKNOWN, fcrdns="unknown"))
        dnsbl = self.live.dnsbl
        reply = self._answered("ptr", args, lambda: dnsbl.peek_ptr(ip), render_ptr)
        return self._ptr(ip) if reply is None else reply

    async def _ptr(self, ip: IPv4Address | IPv6Address) -> str:
        return render_ptr(await self.live.dnsbl.ptr(ip))

    def _replay(self, verb: str, args: tuple[str, ...]) -> str | None:
        """The reply last given to the same request from the DNS cache alone, while the
        DNS source says every answer it came from is still there, unexpired, and the lists'
        standing is the same (issue 15); counted in the lists' figures as a new one is."""
        kept = self._replies.get((verb, args))
        if kept is None or not self.live.dnsbl.holds(kept.generation, kept.expires):
            return None
        kept.counter()
        self.kept = Keep(kept.expires, (kept.counter,))
        return kept.reply

    def _answered(self, verb: str, args: tuple[str, ...], peek: Callable[[], Cached[R] | None],
                  render: Callable[[R], str]) -> str | None:
        """The reply from the DNS cache alone, counted, and kept for `_replay`; None when the
        cache does not hold every answer (ask DNS). The text of the same result object as
        last time is not rendered again (the source reuses results while their answers and
        the lists' verdicts are the same: a listed client's text is cleaned once)."""
        generation = self.live.dnsbl.generation  # before the lookup: a change shows after
        cached = peek()
        if cached is None:
            return None
        result = cached.take()
        kept = self._replies.get((verb, args))
        reply = kept.reply if kept is not None and kept.result is result else render(result)
        if len(self._replies) >= _REPLIES_MAX:
            self._replies.clear()
        self._replies[verb, args] = _Kept(generation, cached.expires, cached.counter, result,
                                          reply)
        self.kept = Keep(cached.expires, (cached.counter,))
        return reply

    def stats(self, args: tuple[str, ...], peer: Peer) -> str:
        return render_stats(self.live.dnsbl.stats())

    # --- connect: every fact and the policy's verdict (at once when DNS is cached) ----------

    def connect(self, args: tuple[str, ...], peer: Peer) -> Reply:
        checker = self.connect_checker
        assert checker is not None
        checker.kept = None
        reply = checker.replay(args)  # the same request, and no source would say otherwise
        if reply is None:
            request = parse_args(args)
            reply = checker.answer_now(request, args)
            if reply is None:
                return self._connect(request)
        self.kept, checker.kept = checker.kept, None
        return reply

    async def _connect(self, request: ConnectRequest) -> str:
        assert self.connect_checker is not None
        return await self.connect_checker.answer(request)

    # --- helo: the HELO policy, asked at RCPT ------------------------------------------------

    def helo(self, args: tuple[str, ...], peer: Peer) -> Reply:
        request = parse_helo(args)
        assert self.helo_checker is not None
        return self.helo_checker.answer(request)

    # --- strikes: lookupd's own incident memory -----------------------------------------

    def strike(self, args: tuple[str, ...], peer: Peer) -> Reply:
        try:
            ip = parse_ip(args[0])
        except ValueError:
            raise BadRequest(f'not an IP address: "{shown(args[0])}"') from None
        kind, count = parse_strikes(args[1:])
        checker = self.connect_checker
        assert checker is not None
        if checker.allowlist.match(ip).status is not Status.NOT_FOUND:
            return "strikes=0"  # allowlisted (or the list unreadable): never struck
        return self._strike(ip, kind, count)

    async def _strike(self, ip: IPv4Address | IPv6Address, kind: str, count: int) -> str:
        return f"strikes={await self.live.strikes.strike(ip, kind, count)}"

    # --- authenticated-user block state (reads from memory, writes through the disk) -----

    def user(self, args: tuple[str, ...], peer: Peer) -> str:
        if not args:
            return "ok"
        return render_check(self.live.users.status(args[0]))

    def user_fail(self, args: tuple[str, ...], peer: Peer) -> Reply:
        if not args:
            return "ok"
        self.live.users.check(args[0])  # a bad name gets its `error` reply here
        return self._user_fail(args[0], " ".join(args[1:]) or None)

    async def _user_fail(self, user: str, recipient: str | None) -> str:
        return render_check(await self.live.users.fail(user, recipient))

    def user_block(self, args: tuple[str, ...], peer: Peer) -> Reply:
        self.live.users.check(args[0])
        return self._user_admin(peer, args[0], " ".join(args[1:]))

    def user_unblock(self, args: tuple[str, ...], peer: Peer) -> Reply:
        self.live.users.check(args[0])
        return self._user_admin(peer, args[0], None)

    async def _user_admin(self, peer: Peer, user: str, reason: str | None) -> str:
        """user-block (reason given, maybe "") or user-unblock: root or admin_group only."""
        users = self.live.users
        verb = "user-unblock" if reason is None else "user-block"
        if peer.transport != "unix" or not await users.admin_allowed(peer.uid, peer.gid):
            log.warning("%s %s refused: the %s client (uid %s, pid %s) is neither root nor in "
                        "users.admin_group; run `lookupd users` as root instead", verb,
                        shown(user), peer.transport, peer.uid, peer.pid)
            return error_reply("not permitted")
        by = await users.describe_peer(peer.uid, peer.pid)
        if reason is None:
            return render_admin(await users.unblock(user, by=by))
        return render_admin(await users.block(user, reason, by=by))


    # --- control ---------------------------------------------------------------------------

    def reload(self, args: tuple[str, ...], peer: Peer) -> Reply:
        """Reload now and say whether the new configuration was taken (systemctl reload)."""
        allowed = self.trust.known_admin(peer)
        if allowed is None:
            return self._reload_after_check(peer)
        return self._reload(peer, allowed)

    async def _reload_after_check(self, peer: Peer) -> str:
        reply = self._reload(peer, await self.trust.check_admin(peer))
        return reply if isinstance(reply, str) else await reply

    def _reload(self, peer: Peer, allowed: bool) -> Reply:
        if not allowed:
            log.warning("reload refused: the %s client (uid %s, pid %s) is not root, lookupd's "
                        "user or in users.admin_group; use systemctl reload lookupd",
                        peer.transport, peer.uid, peer.pid)
            return error_reply("not permitted")
        if self.control is None:
            return error_reply("reload is not available here")
        return self.control.reload()

    def status(self, args: tuple[str, ...], peer: Peer) -> str:
        if self.control is None:
            return error_reply("status is not available here")
        return json.dumps(self.control.status().to_json(), separators=(",", ":"))

    def metrics(self, args: tuple[str, ...], peer: Peer) -> str:
        if self.control is None:
            return error_reply("metrics are not available here")
        return Document(self.control.metrics_text())


class Control(Protocol):
    """What the server offers the control verbs."""

    @property
    def metrics(self) -> Metrics: ...

    def reload(self) -> Awaitable[str]: ...

    def status(self) -> Snapshot: ...

    def metrics_text(self) -> str: ...


def _optional_ip(args: tuple[str, ...]) -> IPv4Address | IPv6Address | None:
    """The IP argument, None when Exim sent none (local submission); BadRequest when malformed."""
    if not args:
        return None
    try:
        return parse_ip(args[0])
    except ValueError:
        raise BadRequest(f'not an IP address: "{shown(args[0])}"') from None


# --- fail-open answers (no usable configuration) ----------------------------------------------

FAIL_OPEN_REASON = "lookupd runs without its configuration: nothing checked"


def _fail_open_connect(args: tuple[str, ...], peer: Peer) -> str:
    request = parse_args(args)  # a malformed request still gets its error
    return render_connect(Verdict("accept", "none", FAIL_OPEN_REASON), unknown_facts(request))


def _fail_open_ip(reply: str) -> HandlerFn:
    def answer(args: tuple[str, ...], peer: Peer) -> str:
        _optional_ip(args)
        return reply
    return answer


def _fail_open_refused(args: tuple[str, ...], peer: Peer) -> str:
    return error_reply("lookupd runs without its configuration; fix it (lookupd check-config) "
                       "and reload (systemctl reload lookupd)")


# Every source unknown, every connect accepted, user state "ok" and nothing recorded.
_FAIL_OPEN: dict[str, HandlerFn] = {
    "country": _fail_open_ip(render_country(CountryResult(Status.UNKNOWN))),
    "asn": _fail_open_ip(render_asn(AsnResult(Status.UNKNOWN))),
    "incidents": _fail_open_ip(render_incidents(IncidentsResult(Status.UNKNOWN))),
    "dnsbl": lambda a, p: render_dnsbl(DnsblResult(Status.UNKNOWN)),
    "dbl": lambda a, p: render_dnsbl(DnsblResult(Status.UNKNOWN)),
    "sender": lambda a, p: render_dnsbl(DnsblResult(Status.UNKNOWN)),
    "ptr": _fail_open_ip(render_ptr(PtrResult(Status.UNKNOWN, fcrdns="unknown"))),
    "stats": _fail_open_refused,
    "connect": _fail_open_connect,
    "helo": lambda a, p: HELO_FAIL_OPEN,
    "user": lambda a, p: "ok",
    "user-fail": lambda a, p: "ok",
    "strike": lambda a, p: "strikes=0",
    "user-block": _fail_open_refused,
    "user-unblock": _fail_open_refused,
}
