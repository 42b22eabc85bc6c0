"""`lookupd users list|block|unblock|history|import` on a real state directory, beside a running
UserState (the daemon's side) that must follow the changes."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookupd.config import Config, load_config
from lookupd.users.cli import add_users_parser, run_users
from lookupd.users.state import UserState

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "lookupd.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[users]\nlimit = 3\nnotify_command = ""\n'
                    f'lsearch_file = "{tmp_path / "blocked"}"\n')
    return load_config(path)


def users(config: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lookupd")
    add_users_parser(parser.add_subparsers(dest="command", required=True))
    return run_users(parser.parse_args(["users", *argv]), config)


def listed(tmp_path: Path) -> list[str]:
    return [ln for ln in (tmp_path / "blocked").read_text().splitlines()
            if not ln.startswith("#")]


def test_block_list_history_unblock(config: Config, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert users(config, "list") == os.EX_OK
    assert capsys.readouterr().out == "no blocked users\n"
    assert not (tmp_path / "state").exists()  # looking creates nothing

    assert users(config, "block", "Bob@Example.org", "--reason", "stolen password") == os.EX_OK
    assert "blocked bob@example.org" in capsys.readouterr().out
    assert listed(tmp_path) == ["bob@example.org"]

    assert users(config, "block", "bob@example.org") == os.EX_OK
    assert "already blocked" in capsys.readouterr().out

    assert users(config, "list") == os.EX_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["USER", "SINCE", "COUNT", "BY", "REASON"]
    assert out[1].startswith("bob@example.org") and out[1].endswith("stolen password")

    assert users(config, "unblock", "BOB@example.org") == os.EX_OK
    assert "unblocked bob@example.org" in capsys.readouterr().out
    assert listed(tmp_path) == []

    assert users(config, "history", "bob@example.org") == os.EX_OK
    lines = capsys.readouterr().out.splitlines()
    assert "block" in lines[0] and "stolen password" in lines[0]
    assert "unblock" in lines[1]
    assert "not blocked" in lines[2]


def test_bad_names_are_usage_errors(config: Config, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("a b", "x\nBcc: y", "x" * 10_000, "x'); DROP TABLE events;--"):
        assert users(config, "block", name) == os.EX_USAGE
    assert "space or a control character" in caplog.text


def test_import_a_classic_file(config: Config, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    classic = tmp_path / "blocked_authenticated_users"
    classic.write_text("# old list\nspammer1\nSpammer2: 2021-01-01\nbad\x01name\n"
                       '"quoted:name"\n')
    assert users(config, "import", str(classic)) == os.EX_DATAERR  # one line skipped
    out = capsys.readouterr().out
    assert "imported 3 new block(s)" in out and "1 line(s) skipped" in out
    assert listed(tmp_path) == ['"quoted:name"', "spammer1", "spammer2"]
    assert users(config, "import", str(classic)) == os.EX_DATAERR
    assert "imported 0 new block(s)" in capsys.readouterr().out
    assert users(config, "import", str(tmp_path / "missing")) == os.EX_NOINPUT


def test_unwritable_state_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lookupd.toml"
    (tmp_path / "file").write_text("")
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "file" / "state"}"\n')
    assert users(load_config(path), "block", "alice") == os.EX_CANTCREAT


async def test_running_daemon_follows_the_cli(config: Config, tmp_path: Path) -> None:
    state = UserState(config.users, config.server.state_dir)
    await state.open()
    try:
        for _ in range(3):
            await state.fail("carol", "x@example.org")
        assert state.status("carol").blocked
        assert listed(tmp_path) == ["carol"]

        code = await asyncio.to_thread(users, config, "unblock", "carol")
        assert code == os.EX_OK
        deadline = time.monotonic() + 3
        while state.status("carol").blocked:
            assert time.monotonic() < deadline, "the daemon did not see the unblock in 3s"
            await asyncio.sleep(0.05)
        # The CLI forgot carol's events too: one more failure does not block again.
        assert not (await state.fail("carol")).blocked

        code = await asyncio.to_thread(users, config, "block", "dave", "--reason", "by hand")
        assert code == os.EX_OK
        await state.fail("someone")  # any write batch also looks for outside changes
        block = state.status("dave").block
        assert block is not None and block.reason == "by hand"
    finally:
        await state.close()


def test_the_lookupd_command_has_users(config: Config, tmp_path: Path) -> None:
    """Mounted in the real CLI: `python -m lookupd users ...`."""
    assert config.source is not None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "lookupd", "users", "--config",
                          str(config.source), "block", "erin"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert run.returncode == os.EX_OK, run.stderr
    run = subprocess.run([sys.executable, "-m", "lookupd", "users", "list", "--config",
                          str(config.source)], capture_output=True, text=True, env=env,
                         timeout=30)
    assert run.returncode == os.EX_OK, run.stderr
    assert "erin" in run.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_leaves_the_state_to_the_daemons_user(tmp_path: Path) -> None:
    """lookupd runs as its own user; `lookupd users` as root must not take its files away."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chown(state_dir, 65534, 65534)
    path = tmp_path / "lookupd.toml"
    path.write_text(f'[server]\nstate_dir = "{state_dir}"\n')
    assert users(load_config(path), "block", "alice") == os.EX_OK
    owners = {(p.name, p.stat().st_uid) for p in state_dir.iterdir()}
    assert owners == {("users.sqlite", 65534)}
