"""The classic blocked_authenticated_users file: written so a real Exim's lsearch finds every
name, replaced atomically, and read back for `lookupd users import`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lookupd.users import lsearch

EXIM = shutil.which("exim4") or shutil.which("exim")
NAMES = ["plain", "with:colon", 'quo"te', "#hash", "back\\slash", "Mixed@Example.org", "café"]


def test_render_parse_round_trip() -> None:
    text = lsearch.render(NAMES)
    assert text.startswith("# ")
    assert [line.key for line in lsearch.parse(text)] == sorted(NAMES)


def test_parse_a_classic_file() -> None:
    text = ("# blocked by the old ACL\n"
            "\n"
            "spammer1\n"
            "spammer2: blocked 2021-03-04\n"
            "spammer3 some data\n"
            "   continuation of spammer3's data\n"
            '"quoted: name"\n')
    parsed = lsearch.parse(text)
    assert [(line.number, line.key) for line in parsed] == [
        (3, "spammer1"), (4, "spammer2"), (5, "spammer3"), (7, "quoted: name")]


def test_write_atomic_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "blocked_authenticated_users"
    lsearch.write_atomic(target, "a\n")
    assert target.read_text() == "a\n"
    assert target.stat().st_mode & 0o777 == 0o644
    target.chmod(0o640)
    lsearch.write_atomic(target, "b\n")
    assert target.read_text() == "b\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["blocked_authenticated_users"]


def test_write_atomic_failure_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "file"
    with pytest.raises(OSError):
        lsearch.write_atomic(target, "x\n")
    assert not target.exists()


@pytest.mark.skipif(EXIM is None, reason="needs exim4 (Debian package exim4-daemon-heavy)")
def test_exim_lsearch_finds_every_name(tmp_path: Path) -> None:
    target = tmp_path / "blocked"
    lsearch.write_atomic(target, lsearch.render(NAMES))
    conf = tmp_path / "exim.conf"
    conf.write_text("")
    conf.chmod(0o644)
    # Exim expands the keys given here: escape its specials ($, \\, braces) for -be.
    probes = [*NAMES, "PLAIN", "not-there"]
    lines = []
    for name in probes:
        escaped = "".join("\\" + c if c in "\\${}" else c for c in name)
        lines.append(f"[${{lookup{{{escaped}}}lsearch{{{target}}}{{yes}}{{no}}}}]")
    assert EXIM is not None
    out = subprocess.run([EXIM, "-C", str(conf), "-be"], input="\n".join(lines).encode() + b"\n",
                         capture_output=True, timeout=20, check=True).stdout.decode()
    answers = [line.removeprefix("> ") for line in out.splitlines() if line.startswith("> [")]
    assert answers == ["[yes]"] * len(NAMES) + ["[yes]", "[no]"]
