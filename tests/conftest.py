"""Fixtures shared by the test modules: short socket dirs and a real running lookupd."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import MAXMIND, Lookupd, short_dir, stop_all


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for Unix sockets, removed afterwards."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


StartLookupd = Callable[..., Lookupd]


@pytest.fixture
def start_lookupd(sockdir: Path) -> Iterator[StartLookupd]:
    """Start real `lookupd serve` processes (config text, extra args); all stopped afterwards."""
    started: list[Lookupd] = []

    def start(config_text: str = "", *args: str, wait: bool = True,
              tcp_port: int | None = None, env: dict[str, str] | None = None) -> Lookupd:
        workdir = sockdir / str(len(started))
        workdir.mkdir()
        daemon = Lookupd(workdir, config_text, list(args), env or {}, tcp_port)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    stop_all(started)


@pytest.fixture
def country_db() -> Path:
    return MAXMIND / "GeoIP2-Country-Test.mmdb"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main() sets up logging for a process; in tests, undo it after each test."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
