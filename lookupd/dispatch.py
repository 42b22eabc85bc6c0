"""The explicit table from request verb to source, and from each outcome to its reply text.

Handlers answer synchronously (a plain `str`) when the source answers from memory (GeoIP,
incidents, user state), so the server writes the reply inline with no task per request; they
return a coroutine when the source needs the network or the disk (DNS, writes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from lookupd import __version__
from lookupd.errors import BadRequest
from lookupd.geoip import AsnResult, CountryResult
from lookupd.incidents import IncidentsResult
from lookupd.ipaddr import parse_ip
from lookupd.outcome import Status
from lookupd.protocol import Peer, Request, error_reply, shown
from lookupd.sources import Sources

log = logging.getLogger(__name__)

Reply = str | Awaitable[str]
HandlerFn = Callable[[tuple[str, ...], Peer], Reply]

# Replies for "no such thing" and "cannot tell" (documented in the README).
NONE = "--"
UNKNOWN = "??"


@dataclass(frozen=True, slots=True)
class Handler:
    """One verb: its function, how many arguments it takes, whether it needs the peer's uid."""

    fn: HandlerFn
    min_args: int
    max_args: int
    usage: str
    needs_peer: bool = False


class Dispatcher:
    """Answers parsed requests from the sources it was built with."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.table: dict[str, Handler] = {
            "ping": Handler(lambda a, p: "pong", 0, 0, "ping"),
            "version": Handler(lambda a, p: f"lookupd {__version__}", 0, 0, "version"),
            # Exim sends an empty argument for local submissions: `country ` answers --.
            "country": Handler(self.country, 0, 1, "country IP"),
            "asn": Handler(self.asn, 0, 1, "asn IP"),
            "incidents": Handler(self.incidents, 0, 1, "incidents IP"),
        }

    def needs_peer(self, verb: str) -> bool:
        handler = self.table.get(verb)
        return handler is not None and handler.needs_peer

    def handle(self, request: Request, peer: Peer) -> Reply:
        """The reply (or a coroutine producing it) for one request; bad requests get `error`."""
        handler = self.table.get(request.verb)
        if handler is None:
            log.warning("unknown verb %r from %s client: check the Exim expansion that sent it",
                        shown(request.verb), peer.transport)
            return error_reply(f'unknown verb "{shown(request.verb)}"')
        if not handler.min_args <= len(request.args) <= handler.max_args:
            log.warning("bad request %r from %s client: usage is %r", shown(" ".join(
                (request.verb, *request.args))), peer.transport, handler.usage)
            return error_reply(f"usage: {handler.usage}")
        try:
            return handler.fn(request.args, peer)
        except BadRequest as exc:
            log.warning("bad request %r from %s client: %s",
                        shown(" ".join((request.verb, *request.args))), peer.transport, exc)
            return error_reply(str(exc))

    # --- GeoIP ---------------------------------------------------------------------------

    def country(self, args: tuple[str, ...], peer: Peer) -> str:
        return render_country(self.sources.geoip.country(_optional_ip(args)))

    def asn(self, args: tuple[str, ...], peer: Peer) -> str:
        return render_asn(self.sources.geoip.asn(_optional_ip(args)))

    # --- firewall incidents --------------------------------------------------------------

    def incidents(self, args: tuple[str, ...], peer: Peer) -> str:
        ip = _optional_ip(args)
        if ip is None:
            return "0"
        return render_incidents(self.sources.incidents.count(ip))


def _optional_ip(args: tuple[str, ...]) -> IPv4Address | IPv6Address | None:
    """The IP argument, None when Exim sent none (local submission); BadRequest when malformed."""
    if not args:
        return None
    try:
        return parse_ip(args[0])
    except ValueError:
        raise BadRequest(f'not an IP address: "{shown(args[0])}"') from None


def render_country(result: CountryResult) -> str:
    if result.status is Status.FOUND and result.code:
        return result.code
    return NONE if result.status is Status.NOT_FOUND else UNKNOWN


def render_asn(result: AsnResult) -> str:
    if result.status is Status.FOUND:
        org = " ".join(shown(word) for word in (result.organisation or "").split())
        return f"AS{result.number} {org}".rstrip()
    return NONE if result.status is Status.NOT_FOUND else UNKNOWN


def render_incidents(result: IncidentsResult) -> str:
    if result.status is Status.UNKNOWN:
        return UNKNOWN
    return str(result.count if result.status is Status.FOUND else 0)
