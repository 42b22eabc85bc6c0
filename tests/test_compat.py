"""The shims for Debian 12's own libraries (dnspython 2.3, uvloop 0.17), exercised on any
version: scripts/test-bookworm runs the real old libraries, these force the old code paths."""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path

import pytest
import uvloop
from dnsservers import Rbldnsd

import lookupd.dnsbl.resolver as resolver_module
from lookupd.cli import _run_loop
from lookupd.config import HostPort
from lookupd.dnsbl.resolver import DnsClient, make_nameservers
from lookupd.outcome import Status

NEW_API = pytest.param(True, id="dnspython>=2.4", marks=pytest.mark.skipif(
    not resolver_module._NAMESERVER_OBJECTS, reason="dnspython < 2.4: no dns.nameserver"))
OLD_API = pytest.param(False, id="dnspython-2.3-style")


def test_run_loop_without_uvloop_run_still_uses_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    old = types.ModuleType("uvloop")  # uvloop 0.17: new_event_loop and install, no run
    old.new_event_loop = uvloop.new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", old)
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    _run_loop(main())
    assert isinstance(seen[0], uvloop.Loop)
    assert seen[0].is_closed()


@pytest.mark.parametrize("objects", [NEW_API, OLD_API])
def test_servers_differ_by_port(monkeypatch: pytest.MonkeyPatch, objects: bool) -> None:
    # A reload keeps the cache only while the servers are the same: a new port is a change.
    monkeypatch.setattr(resolver_module, "_NAMESERVER_OBJECTS", objects)
    one = DnsClient(make_nameservers((HostPort("127.0.0.1", 5353),), 1.0),
                    negative_ttl_max=60, error_ttl=30)
    same = DnsClient(make_nameservers((HostPort("127.0.0.1", 5353),), 1.0),
                     negative_ttl_max=60, error_ttl=30)
    other = DnsClient(make_nameservers((HostPort("127.0.0.1", 5354),), 1.0),
                      negative_ttl_max=60, error_ttl=30)
    assert one.servers == same.servers
    assert one.servers != other.servers


@pytest.mark.parametrize("objects", [NEW_API, OLD_API])
async def test_configured_nameserver_port_is_asked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, objects: bool) -> None:
    monkeypatch.setattr(resolver_module, "_NAMESERVER_OBJECTS", objects)
    server = Rbldnsd(tmp_path / "rbl").start()
    try:
        client = DnsClient(make_nameservers((HostPort("127.0.0.1", server.port),), 2.0),
                           negative_ttl_max=60, error_ttl=30)
        answer = await client.ask("2.0.0.127.bl.test", "A", 2.0)
    finally:
        server.stop()
    assert answer.status is Status.FOUND, answer
