"""A named pipe, a directory or a device where lookupd expects a file it reads (an allowlist,
the firewall database, a GeoIP database, the configuration): a clear refusal, never a hang
(a FIFO blocks open() until a writer comes; on the event loop that stops every answer)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import FIREWALL, MAXMIND, with_test_defaults

from lookupd.allowlist import ListFiles
from lookupd.config import IncidentsConfig, load_config
from lookupd.errors import ConfigError
from lookupd.geoip import Refused, open_verified
from lookupd.incidents import Unreadable, load
from lookupd.ipaddr import parse_ip
from lookupd.outcome import Status
from lookupd.regularfile import open_regular


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("what", ["fifo", "dir", "dev"])
def test_open_regular_refuses_what_is_not_a_file(fifo: Path, tmp_path: Path, what: str) -> None:
    path = {"fifo": fifo, "dir": tmp_path, "dev": Path("/dev/null")}[what]
    name = {"fifo": "a named pipe", "dir": "a directory", "dev": "a character device"}[what]
    started = time.monotonic()
    with pytest.raises(OSError) as caught:
        os.close(open_regular(path))
    assert caught.value.strerror == f"it is {name}, not a file: point the setting at the file " \
                                    "itself"
    assert time.monotonic() - started < 1.0
    regular = tmp_path / "file"
    regular.write_text("x")
    fd = open_regular(regular)
    assert os.read(fd, 10) == b"x"
    os.close(fd)


def test_each_reader_refuses_a_fifo(fifo: Path) -> None:
    lists = ListFiles([fifo], check_interval=0)
    assert lists.match(parse_ip("192.0.2.1")).status is Status.UNKNOWN
    with pytest.raises(Refused, match="cannot read it: it is a named pipe, not a file"):
        open_verified(fifo, "country")
    with pytest.raises(Unreadable, match="cannot read it: it is a named pipe, not a file"):
        load(fifo, IncidentsConfig(db=fifo))
    with pytest.raises(ConfigError, match="cannot read: it is a named pipe, not a file"):
        load_config(fifo, required=True)


def test_daemon_with_fifos_for_files_answers(start_lookupd: StartLookupd, fifo: Path,
                                             tmp_path: Path) -> None:
    """A FIFO as allowlist, firewall database and GeoIP database: lookupd starts, answers
    every verb at once, says what is wrong, and takes the real files after a reload."""
    allow = tmp_path / "allow"
    config = (f'[connect]\nallowlist_files = ["{fifo}"]\n[incidents]\ndb = "{fifo}"\n'
              f'[geoip]\ncountry_db = "{fifo}"\n')
    daemon = start_lookupd(config)
    started = time.monotonic()
    assert daemon.query("country 81.2.69.142", timeout=3) == "??"
    reply = daemon.query("connect 81.2.69.142 25", timeout=3)
    assert reply.startswith("action=accept") and "allowlisted=no" in reply, reply
    assert daemon.query("incidents 81.2.69.142", timeout=3) == "??"
    assert time.monotonic() - started < 3
    log = daemon.log()
    said = re.findall(rf"list file {fifo}: .*", log)
    assert said and "it is a named pipe, not a file: point the setting at the file itself; it " \
        "counts as unknown until it can be read" in said[0], log
    assert "readable" not in said[0]
    allow.write_text("81.2.69.142\n")
    daemon.config_path.write_text(with_test_defaults(
        f'[connect]\nallowlist_files = ["{allow}"]\n[incidents]\n'
        f'db = "{FIREWALL / "nftfw-firewall.db"}"\n'
        f'[geoip]\ncountry_db = "{MAXMIND / "GeoIP2-Country-Test.mmdb"}"\n'))
    assert daemon.query("reload", timeout=10) == "ok reloaded"
    assert daemon.query("country 81.2.69.142") == "GB"
    assert "allowlisted=yes" in daemon.query("connect 81.2.69.142 25")
