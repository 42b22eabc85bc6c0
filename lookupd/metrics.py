"""Metrics in the Prometheus/OpenMetrics text format (prometheus_client), for the `metrics`
verb and the optional loopback HTTP listener ([metrics] listen).

The answer path only adds to plain ints in dicts (everything runs on the event loop's
thread, so no lock is needed); prometheus_client builds its metric families from them and
from status.collect() when scraped. Counting a request costs the answer path about a
microsecond (bench/: `python -m bench core`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from lookupd.outcome import Status

if TYPE_CHECKING:
    from lookupd.connect import Facts, Verdict
    from lookupd.status import Snapshot

log = logging.getLogger(__name__)

UNKNOWN = Status.UNKNOWN

# Seconds, from an answer out of memory (~0.1 ms) to the DNS deadline (seconds).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _row() -> list[float]:
    """A verb's first reply: [ok, error, sum of seconds, count per bucket ..., +Inf]."""
    return [0.0] * (len(BUCKETS) + 4)


class Metrics:
    """Counters kept for the daemon's whole life (a reload keeps them)."""

    def __init__(self) -> None:
        # verb -> [ok, error, sum of seconds, count per bucket ..., +Inf]: one dict lookup
        # and list stores a reply.
        self.by_verb: defaultdict[str, list[float]] = defaultdict(_row)
        self.verdicts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.helo_verdicts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.unknown_facts = {"country": 0, "incidents": 0, "dnsbl": 0, "ptr": 0}
        self.reloads: defaultdict[str, int] = defaultdict(int)
        # Of the replies by verb, how many the compiled front end gave (lookupd/fastpath.py).
        self.kept: defaultdict[str, int] = defaultdict(int)

    def answered(self, verb: str, error: bool, seconds: float) -> None:
        """One reply: its verb ("-" for a request that did not parse) and how long it took."""
        row = self.by_verb[verb]
        row[error] += 1
        row[2] += seconds
        row[3 + bisect.bisect_left(BUCKETS, seconds)] += 1

    def answered_many(self, verb: str, count: int, seconds: float) -> None:
        """`count` replies given by the compiled front end (lookupd/fastpath.py), which took
        `seconds` in all: each is put in the bucket of their mean (all well under 0.5 ms)."""
        row = self.by_verb[verb]
        row[0] += count
        row[2] += seconds
        self.kept[verb] += count
        row[3 + bisect.bisect_left(BUCKETS, seconds / count)] += count

    def verdict(self, verdict: Verdict, facts: Facts, n: int = 1) -> None:
        """`n` connect verdicts (the same one given `n` times); the facts a source could not
        give are counted too."""
        self.verdicts[verdict.action, verdict.rule, verdict.would] += n
        if facts.country.status is UNKNOWN:
            self.unknown_facts["country"] += n
        if facts.incidents.status is UNKNOWN:
            self.unknown_facts["incidents"] += n
        if facts.dnsbl.status is UNKNOWN:
            self.unknown_facts["dnsbl"] += n
        if facts.ptr.status is UNKNOWN:
            self.unknown_facts["ptr"] += n


    def helo_verdict(self, action: str, check: str, would: str) -> None:
        """One `helo` verdict: its action, the check that decided, and a log-only would."""
        self.helo_verdicts[action, check, would] += 1


class _Collector:
    """prometheus_client calls collect() at each scrape."""

    def __init__(self, metrics: Metrics, snapshot: Snapshot) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m, s = self.metrics, self.snapshot
        info = InfoMetricFamily("lookupd", "lookupd's version and configuration file")
        info.add_metric([], {"version": s.version, "config": s.config})
        yield info
        yield GaugeMetricFamily("lookupd_start_time_seconds", "When lookupd started",
                                value=s.started)
        yield GaugeMetricFamily("lookupd_fail_open", "1 while lookupd answers fail-open "
                                "because its configuration cannot be loaded",
                                value=1 if s.fail_open else 0)
        yield GaugeMetricFamily("lookupd_health", "0 ok, 1 degraded, 2 critical (see lookupd "
                                "status)", value={"ok": 0, "warning": 1, "critical": 2}[s.level])
        reloads = CounterMetricFamily("lookupd_reloads", "Reloads by result",
                                      labels=["result"])
        for result, n in sorted(m.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads

        requests = CounterMetricFamily("lookupd_requests", "Requests answered, by verb and "
                                       "whether the answer was an error", labels=["verb",
                                                                                  "outcome"])
        latency = HistogramMetricFamily("lookupd_answer_seconds", "Time from a complete "
                                        "request to its answer", labels=["verb"])
        for verb, row in sorted(m.by_verb.items()):
            for outcome, answered in (("ok", row[0]), ("error", row[1])):
                if answered:
                    requests.add_metric([verb, outcome], answered)
            running, buckets = 0.0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), row[3:], strict=True):
                running += count
                buckets.append((bound, running))
            latency.add_metric([verb], buckets, row[2])
        yield requests
        yield latency
        kept = CounterMetricFamily("lookupd_requests_kept", "Of lookupd_requests, those the "
                                   "compiled front end answered from a kept reply",
                                   labels=["verb"])
        for verb, n in sorted(m.kept.items()):
            kept.add_metric([verb], n)
        yield kept
        verdicts = CounterMetricFamily("lookupd_connect_verdicts", "connect verdicts by "
                                       "action, rule, and what a log-only rule would have done",
                                       labels=["action", "rule", "would"])
        for (action, rule, would), n in sorted(m.verdicts.items()):
            verdicts.add_metric([action, rule, would], n)
        yield verdicts
        helo = CounterMetricFamily("lookupd_helo_verdicts", "helo verdicts by action, the "
                                   "check that decided and what a log-only policy would have "
                                   "done", labels=["action", "check", "would"])
        for (action, check, would), n in sorted(m.helo_verdicts.items()):
            helo.add_metric([action, check, would], n)
        yield helo
        unknown = CounterMetricFamily("lookupd_connect_unknown_facts", "connect answers with "
                                      "a fact its source could not give", labels=["fact"])
        for name, n in sorted(m.unknown_facts.items()):
            if n:
                unknown.add_metric([name], n)
        yield unknown

        yield GaugeMetricFamily("lookupd_connections", "Client connections open",
                                value=s.connections)
        yield CounterMetricFamily("lookupd_connections_shed", "Idle connections closed to "
                                  "stay under the file descriptor limit", value=s.shed)
        loaded = GaugeMetricFamily("lookupd_database_loaded", "1 when the database answers",
                                   labels=["database", "path"])
        age = GaugeMetricFamily("lookupd_database_age_seconds", "Since the database file was "
                                "last written", labels=["database"])
        built = GaugeMetricFamily("lookupd_database_build_time_seconds", "The GeoIP "
                                  "database's own build time", labels=["database"])
        rows = GaugeMetricFamily("lookupd_database_rows", "Rows of the firewall database",
                                 labels=["database"])
        for f in s.files:
            loaded.add_metric([f.name, f.path], 1 if f.loaded else 0)
            if f.age_seconds is not None:
                age.add_metric([f.name], f.age_seconds)
            if f.built is not None:
                built.add_metric([f.name], f.built)
            if f.rows is not None:
                rows.add_metric([f.name], f.rows)
        yield from (loaded, age, built, rows)
        state = GaugeMetricFamily("lookupd_dnsbl_list_up", "1 when the list is trusted (its "
                                  "probes pass), 0 unprobed or quarantined",
                                  labels=["list", "state"])
        counters = {what: CounterMetricFamily(f"lookupd_dnsbl_{what}", f"DNS list {what}",
                                              labels=["list"])
                    for what in ("queries", "hits", "errors", "timeouts")}
        for lst in s.lists:
            state.add_metric([lst.name, lst.state], 1 if lst.state == "ok" else 0)
            for what, family in counters.items():
                family.add_metric([lst.name], getattr(lst, what))
        yield state
        yield from counters.values()
        yield GaugeMetricFamily("lookupd_dnsbl_cache_entries", "DNS answers cached",
                                value=s.dnsbl_cache)
        if s.cluster:
            yield GaugeMetricFamily("lookupd_cluster_up", "1 while Redis ([cluster]) answers",
                                    value=1 if s.cluster.startswith("up") else 0)
        if s.blocked_users is not None:
            yield GaugeMetricFamily("lookupd_users_blocked", "Authenticated users blocked",
                                    value=s.blocked_users)
            yield GaugeMetricFamily("lookupd_users_store_writable", "0 while user-fail cannot "
                                    "record events (fail open)",
                                    value=0 if s.users_problem else 1)


def exposition(metrics: Metrics, snapshot: Snapshot) -> str:
    """The text format Prometheus scrapes (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, snapshot))
    return generate_latest(registry).decode()


async def serve_http(host: str, port: int, render: Callable[[], str]) -> asyncio.Server:
    """A loopback HTTP listener for a Prometheus scraper: GET /metrics, nothing else."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target = (head.split(b" ", 2) + [b"", b""])[:2]
            if method == b"GET" and target.split(b"?")[0] == b"/metrics":
                body = render().encode()
                status = b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"GET /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=16 * 1024)
