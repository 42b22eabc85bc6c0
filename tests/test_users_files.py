"""The user state's files on a real `lookupd serve` and the real CLI: private whatever the umask,
looser modes tightened with one warning, refused (cleanly) to other users, and a read-only
state after a kill -9 named with its cause and its fix."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO, Lookupd, stop_all, with_test_defaults

from lookupd.config import UsersConfig
from lookupd.users import store
from lookupd.users.state import UserState

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
USERS = '[users]\nlimit = 3\nnotify_command = ""\n'


@dataclass
class Daemon(Lookupd):
    """`lookupd serve` under a umask or another user (setpriv), on a state dir it may create."""

    state_dir: Path | None = None
    prefix: tuple[str, ...] = ()
    umask: int | None = None

    def start(self, wait: bool = True) -> Daemon:
        assert self.state_dir is not None
        self.config_path.write_text(with_test_defaults(self.config_text))
        cmd = [*self.prefix]
        if self.umask is not None:
            cmd += ["sh", "-c", 'umask "$0" && exec "$@"', f"{self.umask:03o}"]
        cmd += [sys.executable, "-m", "lookupd", "serve", "--config", str(self.config_path),
                "--socket", str(self.socket), "--state-dir", str(self.state_dir)]
        self.log_path = self.workdir / "lookupd.log"
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
        if wait:
            self.wait_ready()
        return self


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    stop_all(started)


def launch(daemons: list[Daemon], workdir: Path, state_dir: Path, **kw: object) -> Daemon:
    workdir.mkdir(exist_ok=True)
    # socket_group "": a process without capabilities may not give its socket to Exim's group.
    config = '[server]\nsocket_group = ""\n' + USERS
    daemon = Daemon(workdir, config, state_dir=state_dir, **kw)  # type: ignore[arg-type]
    daemons.append(daemon)
    return daemon.start()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def cli(config: Path, *argv: str, prefix: tuple[str, ...] = (),
        umask: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix]
    if umask is not None:
        cmd += ["sh", "-c", 'umask "$0" && exec "$@"', f"{umask:03o}"]
    cmd += [sys.executable, "-m", "lookupd", "users", "--config", str(config), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def cli_config(where: Path, state_dir: Path) -> Path:
    """A config naming the state directory: the CLI must never fall back to /var/lib/lookupd."""
    path = where / "cli.toml"
    path.write_text(f'[server]\nstate_dir = "{state_dir}"\n{USERS}')
    path.chmod(0o644)
    return path


# --- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_serve_creates_private_state(daemons: list[Daemon], sockdir: Path, umask: int) -> None:
    state_dir = sockdir / "var" / "state"  # created by lookupd, parent and all
    daemon = launch(daemons, sockdir / "d", state_dir, umask=umask)
    for i in range(3):
        daemon.query(f"user-fail alice r{i}@example.org\n")
    assert daemon.query("user alice\n").startswith("blocked")
    db, wal, shm = store.state_files(store.db_path(state_dir))
    assert mode(state_dir) == 0o750
    # -wal and -shm exist while lookupd runs; sqlite made them with the database's mode.
    assert {p.name: mode(p) for p in (db, wal, shm)} == {
        "users.sqlite": 0o600, "users.sqlite-wal": 0o600, "users.sqlite-shm": 0o600}
    assert "tightening modes" not in daemon.log()  # nothing to tighten on a fresh start


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_cli_creates_private_state(sockdir: Path, umask: int) -> None:
    state_dir = sockdir / "state"
    run = cli(cli_config(sockdir, state_dir), "block", "alice", umask=umask)
    assert run.returncode == os.EX_OK, run.stderr
    assert mode(state_dir) == 0o750
    files = {p.name: mode(p) for p in state_dir.iterdir()}
    assert files["users.sqlite"] == 0o600
    assert all(m & 0o077 == 0 for m in files.values()), files


def test_loose_state_is_tightened_with_one_warning(daemons: list[Daemon],
                                                   sockdir: Path) -> None:
    """What an older lookupd run by hand left: a 0755 directory, 0644 database, and the -wal
    and -shm of a kill -9, world-writable for good measure."""
    state_dir = sockdir / "state"
    state_dir.mkdir()
    state_dir.chmod(0o755)
    db = store.db_path(state_dir)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sqlite3, sys\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('PRAGMA journal_mode = WAL')\n"
         "c.execute('CREATE TABLE t (x)'); c.execute('INSERT INTO t VALUES (1)')\n"
         "os.kill(os.getpid(), 9)\n", str(db)], timeout=30, check=False)
    assert killed.returncode == -signal.SIGKILL
    _, wal, shm = store.state_files(db)
    db.chmod(0o644)
    wal.chmod(0o666)
    shm.chmod(0o644)

    daemon = launch(daemons, sockdir / "d", state_dir)
    assert daemon.query("user-fail alice r@example.org\n") == "ok"
    assert mode(state_dir) == 0o750
    assert (mode(db), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
    lines = [ln for ln in daemon.log().splitlines() if "tightening modes" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0], daemon.log()
    for change in (f"{state_dir} 0755 -> 0750", f"{db} 0644 -> 0600", f"{wal} 0666 -> 0600",
                   f"{shm} 0644 -> 0600"):
        assert change in lines[0]
    # Tight now: a restart has nothing to say.
    daemon.stop()
    daemon.start()
    assert sum("tightening modes" in ln for ln in daemon.log().splitlines()) == 1


@needs_root
@pytest.mark.parametrize("dir_mode", [0o750, 0o755])
def test_other_users_cannot_read_the_state(sockdir: Path, dir_mode: int) -> None:
    """`lookupd users list` as nobody: a clear refusal, no traceback, no names. 0755: a state
    directory an older lookupd made, not yet tightened (the database itself is 0600)."""
    state_dir = sockdir / "state"
    config = cli_config(sockdir, state_dir)
    run = cli(config, "block", "alice@example.org", "--reason", "secret reason")
    assert run.returncode == os.EX_OK, run.stderr
    state_dir.chmod(dir_mode)
    for argv in (["list"], ["history", "alice@example.org"], ["block", "bob"]):
        run = cli(config, *argv, prefix=NOBODY)
        assert run.returncode == os.EX_NOPERM, (argv, run.stdout, run.stderr)
        assert "Permission denied" in run.stderr and "run this as one of them" in run.stderr
        assert "Traceback" not in run.stderr
        assert run.stdout == ""
    run = cli(config, "list")  # root still may
    assert run.returncode == os.EX_OK and "alice@example.org" in run.stdout


# --- a read-only state after kill -9 names its cause ---------------------------------------


def _kill_9_mid_write(daemon: Lookupd) -> None:
    """Block alice, then kill -9 the daemon while clients keep recording failures."""
    for i in range(3):
        daemon.query(f"user-fail alice r{i}@example.org\n")
    assert daemon.query("user alice\n").startswith("blocked")
    stop = threading.Event()

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                daemon.query(f"user-fail load{n}-{i % 20} x{i}@example.org\n", 2.0)
            except OSError:
                return
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        daemon.query("user-fail load0-0 x@example.org\n")
        daemon.signal(signal.SIGKILL)
        assert daemon.proc is not None
        daemon.proc.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _open_warning(log: str) -> str:
    lines = [ln for ln in log.splitlines() if "lookupd.users.state" in ln and "fail open" in ln]
    assert len(lines) == 1, log
    return lines[0]


@needs_root
def test_root_files_left_by_kill_9_are_named(daemons: list[Daemon], sockdir: Path) -> None:
    """lookupd run by hand as root, killed with -9, then started as its own user: the
    database, -wal and -shm are root's. The warning names the error, the files and the fix
    (the `chown` it suggests works)."""
    state_dir = sockdir / "state"
    first = launch(daemons, sockdir / "root", state_dir)
    _kill_9_mid_write(first)
    db, wal, shm = store.state_files(store.db_path(state_dir))
    assert wal.exists() and shm.exists()  # what a kill -9 leaves
    os.chown(state_dir, 65534, 65534)
    workdir = sockdir / "nobody"
    workdir.mkdir()
    os.chown(workdir, 65534, 65534)
    second = launch(daemons, workdir, state_dir, prefix=NOBODY)
    warning = _open_warning(second.log())
    assert "users: ;" not in warning
    assert f"cannot write {db}: OperationalError: unable to open database file" in warning
    assert "lookupd runs as nobody and may not write" in warning
    assert f"{wal} (owner root, mode 0600)" in warning
    assert second.query("user-fail bob r@example.org\n") == "ok"  # fail open

    fix = re.search(r"; as root run: (.*)$", warning)  # the command ends the line
    assert fix is not None, warning
    assert fix.group(1).startswith("chown nobody ")
    second.stop()
    subprocess.run(["sh", "-c", fix.group(1)], check=True, timeout=30)
    before = len(second.log())
    second.start()
    assert "fail open" not in second.log()[before:]
    assert second.query("user alice\n").startswith("blocked")  # the block made as root holds
    assert second.query("user-fail bob r@example.org\n") == "ok"
    assert "1 invalid" not in second.query("user bob\n")


def _without_write_permission() -> tuple[str, ...]:
    """Root ignores file modes; root without capabilities does not."""
    if os.geteuid() == 0:
        return ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    return ()


def test_read_only_database_in_a_writable_dir_is_named(daemons: list[Daemon],
                                                       sockdir: Path) -> None:
    """The case that gave `users: ; user-fail answers ok ...`: sqlite opens a database it may
    not write read-only without an error, so lookupd found out only at the first write."""
    state_dir = sockdir / "state"
    first = launch(daemons, sockdir / "rw", state_dir)
    _kill_9_mid_write(first)
    db = store.db_path(state_dir)
    db.chmod(0o400)
    second = launch(daemons, sockdir / "ro", state_dir, prefix=_without_write_permission())
    warning = _open_warning(second.log())
    assert "users: ;" not in warning
    assert f"cannot write {db}: OperationalError: attempt to write a readonly database" \
        in warning
    assert f"{db} (owner {_me()}, mode 0400)" in warning
    assert "u+rwX" in warning and "existing block(s) still hold" in warning
    assert second.query("user alice\n").startswith("blocked")  # readable: the block holds
    assert second.query("user-fail bob r@example.org\n") == "ok"
    db.chmod(0o600)


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


async def test_damaged_database_is_named(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    db = store.db_path(state_dir)
    db.write_bytes(b"this is not an sqlite database, whatever its name says\n" * 100)
    db.chmod(0o600)
    state = UserState(UsersConfig(limit=3, notify_command=""), state_dir)
    await state.open()
    try:
        assert not (await state.fail("alice")).blocked  # fail open
    finally:
        await state.close()
    # At open, and (rate-limited) for the failure recorded: each with the cause and the fix.
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "lookupd.users.state" and "fail open" in r.getMessage()]
    assert len(warnings) == 2
    for warning in warnings:
        assert f"cannot write {db}: DatabaseError: file is not a database" in warning
        assert warning.endswith("restore users.sqlite from a backup, or move it aside with its "
                                "-wal and -shm files (its blocks are lost)")
