"""What lookupd is doing, for `lookupd status`, the `status` verb and the metrics.

`collect()` reads the state of the running sources (no DNS, no database query: stat calls and
figures already in memory) into plain frozen values; `health()` decides, as a pure function,
whether that is OK, degraded (WARNING) or critical, with the reasons in an admin's words.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lookupd import __version__
from lookupd.sources import Sources

Level = Literal["ok", "warning", "critical"]


@dataclass(frozen=True)
class FileFacts:
    """A database file a source answers from (or why it has none)."""

    name: str  # "country", "asn", "incidents", "users"
    path: str = ""
    loaded: bool = False
    problem: str = ""  # why it is not loaded, or what is wrong with it
    age_seconds: float | None = None  # since the file was last written
    built: float | None = None  # the database's own build time (GeoIP), epoch seconds
    kind: str = ""  # GeoIP database type, firewall schema
    rows: int | None = None
    optional: bool = False  # its absence is no fault: not every host has one


@dataclass(frozen=True)
class ListFacts:
    name: str
    state: str  # "ok", "unprobed", "quarantined-REASON"
    queries: int
    hits: int
    errors: int
    timeouts: int


@dataclass(frozen=True)
class Snapshot:
    version: str
    pid: int
    started: float
    config: str
    fail_open: str  # why lookupd answers fail-open; "" when it does not
    last_reload: str
    listeners: tuple[str, ...]
    connections: int
    shed: int
    files: tuple[FileFacts, ...] = ()
    lists: tuple[ListFacts, ...] = ()
    dnsbl_cache: int = 0
    blocked_users: int | None = None
    users_problem: str = ""
    geoip_stale_after: float = 0.0  # [geoip] stale_after
    cluster: str = ""  # "" without [cluster]; else "up" or "down", then where Redis is

    health: tuple[str, ...] = field(default=())  # filled by with_health()
    level: Level = "ok"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def collect(*, started: float, config: Path | None, fail_open: str, last_reload: str,
            listeners: tuple[str, ...], connections: int, shed: int,
            sources: Sources | None) -> Snapshot:
    """The state of a running lookupd; `sources` None when it answers fail-open."""
    base = Snapshot(__version__, os.getpid(), started,
                    str(config) if config else "embedded defaults", fail_open, last_reload,
                    listeners, connections, shed)
    if sources is None:
        return with_health(base)
    now = time.time()
    files = [_geoip("country", sources.geoip.country_db, sources.geoip.country_problem, now),
             _geoip("asn", sources.geoip.asn_db, sources.geoip.asn_problem, now,
                    optional=sources.config.geoip.asn_db is None),
             _incidents(sources, now)]
    stats = sources.dnsbl.stats()
    lists = tuple(ListFacts(s.name, f"quarantined-{s.quarantine}" if s.quarantine else "ok",
                            s.queries, s.hits, s.errors, s.timeouts)
                  for s in stats.lists if s.kind != "ptr")
    users = sources.users
    snapshot = Snapshot(
        base.version, base.pid, base.started, base.config, fail_open, last_reload, listeners,
        connections, shed, tuple(files), lists, stats.cache_entries,
        blocked_users=users.blocked_count, users_problem=users.problem,
        geoip_stale_after=sources.config.geoip.stale_after,
        cluster="" if sources.cluster is None else
        f"{'up' if sources.cluster.up else 'down'} {sources.cluster.where}")
    return with_health(snapshot)


def _geoip(name: str, db: Any, problem: str, now: float, optional: bool = False) -> FileFacts:
    if db is None:
        return FileFacts(name, problem=problem, optional=optional)
    return FileFacts(name, str(db.path), True, age_seconds=_age(db.path, now),
                     built=float(db.build_epoch), kind=db.database_type)


def _incidents(sources: Sources, now: float) -> FileFacts:
    source = sources.incidents
    loaded, path = source.loaded, source.path
    if loaded is None or path is None:
        # Not every host runs nftfw or Sympl's firewall: only a configured or found database
        # that cannot be read is a fault.
        return FileFacts("incidents", str(path or ""), problem=source.problem,
                         optional=path is None and sources.config.incidents.db is None)
    return FileFacts("incidents", str(path), True, age_seconds=_age(path, now),
                     kind=loaded.schema, rows=loaded.index.rows)


def _age(path: Path, now: float) -> float | None:
    try:
        return max(0.0, now - path.stat().st_mtime)
    except OSError:
        return None


def with_health(s: Snapshot) -> Snapshot:
    """The snapshot with its level and the reasons for it (pure)."""
    critical, warning = [], []
    if s.fail_open:
        critical.append(f"answering fail-open, nothing checked: {s.fail_open}")
    for f in s.files:
        if not f.loaded and f.optional:
            continue
        if not f.loaded:
            warning.append(f"{f.name}: {f.problem or 'not loaded'}")
        elif (f.name == "country" and f.built and s.geoip_stale_after
              and time.time() - f.built > s.geoip_stale_after):
            days = (time.time() - f.built) / 86400
            warning.append(f"country: {f.path} was built {days:.0f} days ago: is geoipupdate "
                           "still running?")
    for lst in s.lists:
        if lst.state != "ok":
            warning.append(f"DNS list {lst.name}: {lst.state}")
    if s.users_problem:
        warning.append(f"users: {s.users_problem}")
    if s.cluster.startswith("down"):
        warning.append(f"cluster: Redis at {s.cluster.split(' ', 1)[1]} does not answer: this "
                       "host decides alone, and merges when it is back")
    level: Level = "critical" if critical else "warning" if warning else "ok"
    return Snapshot(**{**asdict(s), "files": s.files, "lists": s.lists,
                       "health": tuple(critical + warning), "level": level})


def render_text(s: dict[str, Any]) -> str:
    """`lookupd status` for a terminal, from the status verb's JSON."""
    up = time.time() - s["started"]
    lines = [f"lookupd {s['version']} (pid {s['pid']}), running for {_duration(up)}: "
             f"{s['level'].upper()}",
             f"  configuration: {s['config']}"
             + (f" (last reload: {s['last_reload']})" if s["last_reload"] else ""),
             f"  listening on:  {', '.join(s['listeners'])}",
             f"  connections:   {s['connections']} open, {s['shed']} idle ones closed for room"]
    if s["fail_open"]:
        lines.append(f"  FAIL-OPEN:     {s['fail_open']}")
    for f in s["files"]:
        if f["loaded"]:
            extra = [f["kind"]] if f["kind"] else []
            if f["rows"] is not None:
                extra.append(f"{f['rows']} rows")
            if f["built"]:
                extra.append(f"built {_duration(time.time() - f['built'])} ago")
            if f["age_seconds"] is not None:
                extra.append(f"written {_duration(f['age_seconds'])} ago")
            lines.append(f"  {f['name'] + ':':<14} {f['path']} ({', '.join(extra)})")
        else:
            lines.append(f"  {f['name'] + ':':<14} none: {f['problem']}")
    for lst in s["lists"]:
        lines.append(f"  {'DNS list:':<14} {lst['name']}: {lst['state']} ({lst['queries']} "
                     f"queries, {lst['hits']} hits, {lst['errors']} errors, "
                     f"{lst['timeouts']} timeouts)")
    if s.get("cluster"):
        lines.append(f"  {'cluster:':<14} Redis {s['cluster']}")
    if s["blocked_users"] is not None:
        lines.append(f"  {'users:':<14} {s['blocked_users']} blocked"
                     + (f"; {s['users_problem']}" if s["users_problem"] else ""))
    for reason in s["health"]:
        lines.append(f"  ! {reason}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
