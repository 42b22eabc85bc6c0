"""UserState over a real sqlite file: counting, the sliding window, exact counts under
concurrency, durability across kill -9, fail-open on read-only or full storage, changes made
by other processes, and the lsearch file kept in sync."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lookupd.config import UsersConfig
from lookupd.errors import BadRequest
from lookupd.outcome import Status
from lookupd.users import store
from lookupd.users.state import UserState, render_check

ROOT = Path(__file__).resolve().parents[1]


def users_config(**kw: object) -> UsersConfig:
    kw.setdefault("notify_command", "")
    return UsersConfig(**kw)  # type: ignore[arg-type]


@pytest.fixture
async def state(tmp_path: Path) -> object:
    s = UserState(users_config(limit=3, lsearch_file=tmp_path / "blocked"), tmp_path / "state")
    await s.open()
    yield s
    await s.close()


async def test_limit_blocks_and_unblock_resets(state: UserState) -> None:
    assert render_check(state.status("Alice")) == "ok"
    counts = [(await state.fail("Alice", f"r{i}@example.org")).count for i in range(2)]
    assert counts == [1, 2]
    third = await state.fail("ALICE", "r2@example.org")
    assert third.blocked and third.count == 3 and third.user == "alice"
    assert third.block is not None and third.block.reason == "3 invalid recipients in 1h"
    assert state.status("alice").blocked
    assert not state.status("bob").blocked  # others untouched
    assert (await state.fail("alice")).status is Status.FOUND  # stays blocked

    assert not (await state.unblock("alice")).blocked
    assert not state.status("alice").blocked
    # The events went with the block: one more failure does not block again.
    again = await state.fail("alice")
    assert not again.blocked and again.count == 1


async def test_admin_block_keeps_the_first_since(state: UserState) -> None:
    first = await state.block("mallory", "stolen password")
    second = await state.block("Mallory", "again")
    assert first.block is not None and second.block is not None
    assert second.block.since == first.block.since
    assert second.block.reason == "stolen password"
    assert state.status("MALLORY").blocked


async def test_sliding_window(tmp_path: Path) -> None:
    s = UserState(users_config(limit=3, window=0.4), tmp_path)
    await s.open()
    try:
        await s.fail("u")
        await s.fail("u")
        await asyncio.sleep(0.5)
        result = await s.fail("u")
        assert result.count == 1 and not result.blocked
    finally:
        await s.close()


async def test_case_sensitive_names(tmp_path: Path) -> None:
    s = UserState(users_config(limit=1, case_insensitive=False), tmp_path)
    await s.open()
    try:
        assert (await s.fail("Bob")).blocked
        assert not s.status("bob").blocked
        assert s.status("Bob").blocked
    finally:
        await s.close()


async def test_concurrent_failures_count_exactly(tmp_path: Path) -> None:
    """16 tasks x 50 failures of one user: every answer sees a distinct count, 1..800."""
    s = UserState(users_config(limit=10_000), tmp_path)
    await s.open()
    try:
        async def worker(n: int) -> list[int]:
            return [(await s.fail("busy", f"t{n}-{i}@example.org")).count for i in range(50)]

        started = time.perf_counter()
        results = await asyncio.gather(*(worker(n) for n in range(16)))
        elapsed = time.perf_counter() - started
        counts = sorted(c for r in results for c in r)
        assert counts == list(range(1, 801))
        assert elapsed < 10, f"800 concurrent user-fail took {elapsed:.2f}s"
    finally:
        await s.close()
    conn = sqlite3.connect(store.db_path(tmp_path))
    assert conn.execute("SELECT count(*) FROM events WHERE user = 'busy'").fetchone() == (800,)
    conn.close()


async def test_concurrent_failures_block_once(tmp_path: Path) -> None:
    s = UserState(users_config(limit=10), tmp_path)
    await s.open()
    try:
        results = await asyncio.gather(*(s.fail("eve", f"x{i}@example.org") for i in range(40)))
        assert sum(r.blocked for r in results) == 31  # the 10th event and every one after it
    finally:
        await s.close()
    conn = sqlite3.connect(store.db_path(tmp_path))
    assert conn.execute("SELECT count(*) FROM history WHERE user = 'eve'").fetchone() == (1,)
    conn.close()


@pytest.mark.parametrize("name", [
    "a b", "a\tb", "a\x00b", "x\r\nBcc: x@example.org", "x" * 10_000,
    "x'); DROP TABLE events;--",
])
async def test_bad_names_are_refused_everywhere(state: UserState, name: str) -> None:
    with pytest.raises(BadRequest):
        state.status(name)
    with pytest.raises(BadRequest):
        await state.fail(name)
    with pytest.raises(BadRequest):
        await state.block(name, "x")
    with pytest.raises(BadRequest):
        await state.unblock(name)


async def test_sql_metacharacters_are_only_data(tmp_path: Path) -> None:
    s = UserState(users_config(limit=1), tmp_path)
    await s.open()
    name = "x');DROP/**/TABLE/**/events;--"
    try:
        result = await s.fail(name, "y');DELETE/**/FROM/**/blocks;--@example.org")
        assert result.blocked and result.user == name.lower()
        assert s.status(name).blocked
    finally:
        await s.close()
    conn = sqlite3.connect(store.db_path(tmp_path))
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "blocks", "history"} <= tables
    assert conn.execute("SELECT user FROM blocks").fetchall() == [(name.lower(),)]
    conn.close()


async def test_lsearch_file_follows_the_blocks(state: UserState, tmp_path: Path) -> None:
    target = tmp_path / "blocked"
    assert target.exists()  # written at open, empty
    await state.block("Mallory", "x")
    for _ in range(3):
        await state.fail("trent")
    assert [ln for ln in target.read_text().splitlines() if not ln.startswith("#")] == [
        "mallory", "trent"]
    await state.unblock("mallory")
    assert [ln for ln in target.read_text().splitlines() if not ln.startswith("#")] == ["trent"]


async def test_changes_by_another_process_are_seen(state: UserState, tmp_path: Path) -> None:
    """What `lookupd users` does: its own connection, commit; the daemon follows data_version."""
    conn = store.connect(store.db_path(tmp_path / "state"))
    conn.execute("BEGIN IMMEDIATE")
    store.set_block(conn, "oscar", "by hand", now=time.time(), by="test")
    conn.execute("COMMIT")
    await state.refresh()
    assert state.status("oscar").blocked

    # Without an explicit refresh: a lookup looks at most once a second.
    conn.execute("BEGIN IMMEDIATE")
    store.clear_block(conn, "oscar", now=time.time(), by="test")
    conn.execute("COMMIT")
    conn.close()
    deadline = time.monotonic() + 3
    while state.status("oscar").blocked:
        assert time.monotonic() < deadline, "unblock by another process not seen in 3s"
        await asyncio.sleep(0.05)
    # ... and the lsearch file was rewritten by the daemon.
    assert "oscar" not in (tmp_path / "blocked").read_text()


# --- real processes ------------------------------------------------------------------------

STORE_SCRIPT = textwrap.dedent("""
    import asyncio, json, logging, sys
    from pathlib import Path
    from lookupd.users.state import UserState
    from lookupd.config import UsersConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        state = UserState(UsersConfig(limit=3, notify_command=""), Path(sys.argv[1]))
        await state.open()
        mode = sys.argv[2]
        if mode == "block":
            result = await state.block("mallory", "kill test")
            print("answered", result.blocked, flush=True)
            await asyncio.sleep(60)
        elif mode == "fail":
            n = 0
            while True:
                users = [f"user{n + j}" for j in range(8)]
                results = await asyncio.gather(*(state.fail(u) for u in users for _ in range(3)))
                for r in results:
                    if r.blocked:
                        print(r.user, flush=True)
                n += 8
        elif mode == "probe":
            names = sys.argv[3:]
            out = {}
            for name in names:
                out[name] = (await state.fail(name, "x@example.org")).status.value
            out["status"] = {n: state.status(n).status.value for n in names}
            print(json.dumps(out), flush=True)
            await state.close()

    asyncio.run(main())
""")


def run_store(state_dir: Path, *args: str, prefix: tuple[str, ...] = (),
              preexec: object = None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([*prefix, sys.executable, "-c", STORE_SCRIPT, str(state_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=preexec)  # type: ignore[arg-type]


async def reopened(state_dir: Path) -> UserState:
    s = UserState(users_config(limit=3), state_dir)
    await s.open()
    return s


async def test_answered_block_survives_kill_9(tmp_path: Path) -> None:
    proc = run_store(tmp_path, "block")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "answered True"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    s = await reopened(tmp_path)
    try:
        assert s.status("mallory").blocked
    finally:
        await s.close()


async def test_kill_9_under_load_loses_no_answered_block(tmp_path: Path) -> None:
    proc = run_store(tmp_path, "fail")
    answered: list[str] = []
    try:
        assert proc.stdout is not None
        while len(answered) < 300:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "store process died"
            answered.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    s = await reopened(tmp_path)
    try:
        missing = [u for u in answered if not s.status(u).blocked]
        assert not missing
    finally:
        await s.close()
    conn = sqlite3.connect(store.db_path(tmp_path))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def _without_write_permission() -> tuple[str, ...]:
    """Root ignores file modes; root without capabilities does not."""
    if os.geteuid() == 0:
        return ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    return ()


def test_read_only_state_dir_fails_open(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # An existing block, made while the directory was writable...
    conn = store.connect(store.db_path(state_dir))
    conn.execute("BEGIN IMMEDIATE")
    store.set_block(conn, "mallory", "earlier", now=time.time(), by="test")
    conn.execute("COMMIT")
    conn.close()
    state_dir.chmod(0o555)
    store.db_path(state_dir).chmod(0o444)
    try:
        proc = run_store(state_dir, "probe", "alice", "mallory",
                         prefix=_without_write_permission())
        out, err = proc.communicate(timeout=30)
    finally:
        state_dir.chmod(0o755)
    assert proc.returncode == 0, err
    answers = json.loads(out)
    # ...still holds; everybody else may send (fail open), and the log says so loudly.
    assert answers["alice"] == "unknown" and answers["mallory"] == "found"
    assert answers["status"] == {"alice": "not_found", "mallory": "found"}
    assert "WARNING" in err and "fail open" in err and "Traceback" not in err


FULL_SCRIPT = textwrap.dedent("""
    import asyncio, json, logging, resource, signal, sys
    from pathlib import Path
    from lookupd.users.state import UserState, render_check
    from lookupd.config import UsersConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        state = UserState(UsersConfig(limit=1000, notify_command=""), Path(sys.argv[1]))
        await state.open()
        await state.block("mallory", "before the disk filled")
        # The file size limit stands in for a full disk: a write past it fails (EFBIG).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = sum(p.stat().st_size for p in Path(sys.argv[1]).iterdir())
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 4096, resource.RLIM_INFINITY))
        replies = set()
        for i in range(300):
            result = await state.fail("alice", "x" * 300 + f"{i}@example.org")
            replies.add(render_check(result) + ":" + result.status.value)
        mallory = render_check(await state.fail("mallory"))
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        after = await state.fail("alice")
        print(json.dumps({"replies": sorted(replies), "mallory": mallory,
                          "after": after.status.value, "count": after.count}), flush=True)
        await state.close()

    asyncio.run(main())
""")


def test_full_disk_fails_open_and_recovers(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", FULL_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "ok:unknown" in result["replies"]  # writes failed: answered ok
    assert result["mallory"].startswith("blocked")  # known blocks still hold
    assert result["after"] == "not_found" and result["count"] >= 1  # recording again
    assert "fail open" in proc.stderr and "Traceback" not in proc.stderr
    # The warning is rate-limited: not one line a request.
    assert proc.stderr.count("fail open") <= 2
