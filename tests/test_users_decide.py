"""The pure parts of user blocking: names, thresholds, who may administer, reply text (read back
by a real Exim's ${extract})."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lookupd.errors import BadRequest
from lookupd.outcome import Status
from lookupd.users.decide import (
    Block,
    FailOutcome,
    after_fail,
    blocked,
    check_name,
    clean_recipient,
    may_administer,
    ok,
    quote_value,
    render_admin,
    render_block,
    render_check,
    unknown,
    window_text,
)

EXIM = shutil.which("exim4") or shutil.which("exim")


@pytest.mark.parametrize("raw, folded", [
    ("alice", "alice"),
    ("Alice@Example.ORG", "alice@example.org"),
    ("x');DROP/**/TABLE/**/events;--", "x');drop/**/table/**/events;--"),
    ("ÄBC", "Äbc"),  # ASCII-only folding, as Exim's lsearch and caseless compares
    ("é" * 128, "é" * 128),  # 256 bytes of UTF-8
])
def test_valid_names_are_folded_ascii_only(raw: str, folded: str) -> None:
    assert check_name(raw, case_insensitive=True) == folded
    assert check_name(raw, case_insensitive=False) == raw


@pytest.mark.parametrize("raw, problem", [
    ("", "empty"),
    ("a b", "space"),
    ("x'); DROP TABLE events;--", "space"),
    ("a\tb", "control"),
    ("a\nb", "control"),
    ("a\r\nBcc: victim@example.org", "control"),
    ("a\x00b", "control"),
    ("a\x7fb", "control"),
    ("a\u200bb", "control"),  # zero-width space (Cf)
    ("a\u202eb", "control"),  # right-to-left override: forges log lines
    ("a\u2028b", "control"),  # line separator
    ("a\u00a0b", "control"),  # no-break space
    ("a\udcffb", "UTF-8"),  # what a lossy decode leaves of a bad byte
    ("x" * 257, "longer"),
    ("x" * 10_000, "longer"),
    ("é" * 129, "longer"),  # 258 bytes
])
def test_bad_names_are_refused(raw: str, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        check_name(raw, case_insensitive=True)


def test_recipients_are_kept_but_made_harmless() -> None:
    assert clean_recipient(None) is None
    assert clean_recipient("") is None
    assert clean_recipient("nobody@example.org") == "nobody@example.org"
    assert clean_recipient("a b\r\nc@x") == "a?b??c@x"
    long = clean_recipient("x" * 10_000)
    assert long is not None and len(long) == 320 and long.endswith("...")


@pytest.mark.parametrize("count, limit, already, outcome", [
    (1, 3, False, FailOutcome.OK),
    (2, 3, False, FailOutcome.OK),
    (3, 3, False, FailOutcome.NEWLY_BLOCKED),
    (4, 3, False, FailOutcome.NEWLY_BLOCKED),
    (1, 3, True, FailOutcome.STILL_BLOCKED),
    (1, 1, False, FailOutcome.NEWLY_BLOCKED),
])
def test_reaching_the_limit_blocks(count: int, limit: int, already: bool,
                                   outcome: FailOutcome) -> None:
    assert after_fail(count, limit, already) is outcome


@pytest.mark.parametrize("seconds, text", [
    (3600, "1h"), (5400, "1h30m"), (90, "1m30s"), (86400, "1d"), (0.5, "0.5s"), (2.5, "2.5s"),
])
def test_window_text(seconds: float, text: str) -> None:
    assert window_text(seconds) == text


def test_only_root_and_the_admin_group_may_administer() -> None:
    assert may_administer(0, frozenset(), None)
    assert may_administer(1000, frozenset({100, 4242}), 4242)
    assert not may_administer(1000, frozenset({100}), 4242)
    assert not may_administer(1000, frozenset({4242}), None)
    assert not may_administer(None, frozenset({4242}), 4242)  # TCP: no credentials


def test_replies() -> None:
    block = Block("alice", 1_700_000_000.0, "3 invalid recipients in 1h", 3)
    assert render_check(ok("alice")) == "ok"
    assert render_check(blocked(block)) == (
        'blocked - since=2023-11-14T22:13:20Z reason="3 invalid recipients in 1h"')
    # user / user-fail fail open; the admin verbs say what went wrong.
    assert render_check(unknown("alice", "disk full")) == "ok"
    assert render_admin(unknown("alice", "disk full")) == "error disk full"
    assert render_admin(ok("alice")) == "ok"
    assert blocked(block).status is Status.FOUND and ok("a").status is Status.NOT_FOUND


def test_quoted_values_are_printable_ascii() -> None:
    assert quote_value('say "hi" \\ now') == '"say \\"hi\\" \\\\ now"'
    assert quote_value("café\n") == '"caf\\xc3\\xa9\\x0a"'
    text = render_block(Block("u", 0.0, 'x"\\\u202e\x00é'))
    assert text.isascii() and text.isprintable()


@pytest.mark.skipif(EXIM is None, reason="needs exim4 (Debian package exim4-daemon-heavy)")
def test_exim_extract_reads_every_field(tmp_path: Path) -> None:
    """The reply, as ${readsocket} would return it, read back with ${extract} by Exim."""
    reason = 'he said "stop" \\N café; x=1 since=never'
    reply = render_block(Block("alice", 1_700_000_000.0, reason))
    (tmp_path / "reply").write_text(reply)
    (tmp_path / "ok").write_text("ok")
    conf = tmp_path / "exim.conf"
    conf.write_text("")
    conf.chmod(0o644)
    expansion = "\n".join([
        f"[${{extract{{since}}{{${{readfile{{{tmp_path}/reply}}}}}}}}]",
        f"[${{extract{{reason}}{{${{readfile{{{tmp_path}/reply}}}}}}}}]",
        f"[${{extract{{blocked}}{{${{readfile{{{tmp_path}/reply}}}}}}{{yes}}{{no}}}}]",
        f"[${{extract{{blocked}}{{${{readfile{{{tmp_path}/ok}}}}}}{{yes}}{{no}}}}]",
        f"[${{extract{{1}}{{ }}{{${{readfile{{{tmp_path}/reply}}}}}}}}]",
    ]) + "\n"
    assert EXIM is not None
    out = subprocess.run([EXIM, "-C", str(conf), "-be"], input=expansion.encode(),
                         capture_output=True, timeout=20, check=True).stdout.decode("utf-8")
    lines = [line.removeprefix("> ") for line in out.splitlines() if line.startswith("> [")]
    assert lines == ["[2023-11-14T22:13:20Z]", f"[{reason}]", "[yes]", "[no]", "[blocked]"]
