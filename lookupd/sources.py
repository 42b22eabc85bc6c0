"""Every source lookupd answers from, built from one Config and opened and closed together."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from lookupd.cluster import Cluster, client_problem
from lookupd.config import Config
from lookupd.dnsbl import DnsblSource
from lookupd.geoip import GeoIPSource
from lookupd.incidents import IncidentsSource
from lookupd.strikes import Strikes
from lookupd.users.state import UserState

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the daemon needs of a source besides its lookups."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Sources:
    """The sources of one configuration. A source that cannot open answers "unknown"."""

    config: Config
    geoip: GeoIPSource
    incidents: IncidentsSource
    dnsbl: DnsblSource
    users: UserState
    strikes: Strikes
    cluster: Cluster | None = None

    @classmethod
    def from_config(cls, config: Config, previous: Sources | None = None) -> Sources:
        """The sources of `config`, not yet open. On a reload, `previous` (still open) hands
        over what must not be lost or re-learnt: the DNS lists' health and answer cache."""
        cluster = Cluster(config.cluster) if config.cluster.enabled else None
        missing = client_problem() if cluster is not None else None
        if missing is not None:
            # Fail open: this host decides alone, as while Redis is down, rather than refuse
            # the whole configuration (which would check nothing at all).
            log.error("cluster: %s; until then this host decides alone (everything local) "
                      "and shares nothing", missing)
            cluster = None
        sources = cls(
            config=config,
            cluster=cluster,
            geoip=GeoIPSource(config.geoip),
            incidents=IncidentsSource(config.incidents),
            dnsbl=DnsblSource(config.dnsbl, config.server.state_dir, cluster=cluster),
            users=UserState(config.users, config.server.state_dir, cluster=cluster),
            strikes=Strikes(config.connect.strikes_window, config.server.state_dir, cluster,
                            ipv6_prefix=config.connect.strikes_ipv6_prefix),
        )
        if previous is not None:
            sources.dnsbl.take_over(previous.dnsbl)
            sources.strikes.take_over(previous.strikes)
        return sources

    def all(self) -> tuple[Source, ...]:
        return (self.geoip, self.incidents, self.dnsbl, self.users, self.strikes)

    async def open(self) -> None:
        """Open every source; if one fails, close the others again and raise its error (a
        reload then keeps the old set, and nothing of the new one is left running)."""
        results = await asyncio.gather(*(source.open() for source in self.all()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                await self.close()
                raise result
        if self.cluster is not None:
            # After the sources that use it, so its first merge finds them open.
            await self.cluster.open()

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        results = await asyncio.gather(*(source.close() for source in self.all()),
                                       return_exceptions=True)
        for source, result in zip(self.all(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing %s failed: %s", type(source).__name__, result,
                          exc_info=result)
