"""The Debian package (debian/): what it ships is kept in step with the code (checked
everywhere), and the package itself is built with dpkg-buildpackage from a copy of this tree,
installed with apt-get, asked `lookupd query ping` and purged without leaving files behind.
Where Debian's python3-redis (a Suggests) and redis-server are installed, the packaged daemon
runs with a [cluster] on a test redis-server and answers user-fail and strike through it.

The package test changes the system, so it runs only as root, where the build dependencies
and lookupd's Debian dependencies are installed (it downloads nothing), and where no lookupd
package, /etc/lookupd or systemd state of lookupd is there already. `-m "not
debian_package"` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import PASSWORD, RedisServer
from support import REPO, ask, short_dir, with_test_defaults

from lookupd import __version__
from lookupd.cli import build_parser
from lookupd.config import Config, load_config

EXAMPLE_CONFIG = REPO / "etc" / "lookupd.toml"
MAN = REPO / "man"
# A commented-out setting: "#key = value", "#[section]" or "#[[dnsbl.list]]" (prose is "# ...").
SETTING = re.compile(r"#(\[\[?[a-z.]+\]\]?$|[a-z_][a-z0-9_]* = )")
# lookupd's Depends (debian/control): installed beforehand, so apt-get downloads nothing.
RUNTIME_DEPENDS = ("python3-cachetools", "python3-dnspython", "python3-maxminddb",
                   "python3-msgpack", "python3-uvloop")
STATE = Path("/var/lib/lookupd")
PRIVATE_STATE = Path("/var/lib/private/lookupd")


def uncommented(text: str) -> str:
    return "\n".join(line[1:] if SETTING.match(line) else line for line in text.splitlines())


def test_example_config_as_shipped_sets_nothing() -> None:
    assert tomllib.loads(EXAMPLE_CONFIG.read_text()) == {}


def test_example_config_shows_every_key_with_its_embedded_default(tmp_path: Path) -> None:
    text = uncommented(EXAMPLE_CONFIG.read_text())
    path = tmp_path / "lookupd.toml"
    path.write_text(text)
    assert dataclasses.replace(load_config(path), source=None) == load_config(None)
    raw = tomllib.loads(text)
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        missing = keys - set(raw[section.name]) - ({"lists"} if "list" in raw[section.name]
                                                   else set())
        assert not missing, f"etc/lookupd.toml: [{section.name}] lacks {sorted(missing)}"


def test_config_man_page_describes_every_key() -> None:
    text = (MAN / "lookupd.toml.5.md").read_text()
    config = Config()
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        assert f"# [{section.name}]" in text
        for key in dataclasses.fields(getattr(config, section.name)):
            name = "list" if key.name == "lists" else key.name
            assert f"**{name}**" in text or f"[[dnsbl.{name}]]" in text, name
    for key in dataclasses.fields(config.dnsbl.lists[0]):
        assert f"**{key.name}**" in text, key.name


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[
        tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _commands(sub, f"{prefix}{name} ")


def test_man_page_describes_every_command_and_option() -> None:
    text = (MAN / "lookupd.8.md").read_text()
    for command, parser in _commands(build_parser()):
        assert f"**{command.split()[-1]}**" in text, command
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"**{option}**" in text, f"{command} {option}"


def test_man_pages_and_changelog_carry_the_version() -> None:
    for page in MAN.glob("*.md"):
        assert f'"lookupd {__version__}"' in page.read_text().splitlines()[0], page
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"lookupd ({__version__}) "), first


# --- the package itself -----------------------------------------------------------------------


def _system_env() -> dict[str, str]:
    """This machine's own tools and python3: no venv, no PYTHONPATH to this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_")) and k != "VIRTUAL_ENV"}
    env |= {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8"}
    return env


def _run(*cmd: str | Path, cwd: Path = Path("/"), timeout: float = 120,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_system_env(), text=True,
                         capture_output=True, timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit {out.returncode}\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _installed(package: str) -> bool:
    out = _run("dpkg-query", "-W", "-f=${db:Status-Status}", package, check=False)
    return out.returncode == 0 and out.stdout.strip() not in ("", "not-installed")


def _why_not_here() -> str | None:
    if os.geteuid() != 0:
        return "installs and purges a package: root only"
    if shutil.which("dpkg-buildpackage") is None or shutil.which("apt-get") is None:
        return "no dpkg-buildpackage or apt-get"
    deps = _run("dpkg-checkbuilddeps", cwd=REPO, check=False)
    if deps.returncode != 0:
        return f"build dependencies missing: {deps.stderr.strip()}"
    missing = [p for p in RUNTIME_DEPENDS if not _installed(p)]
    if missing:
        return f"lookupd's dependencies not installed (this test downloads nothing): {missing}"
    if _installed("lookupd"):
        return "a lookupd package is installed here: this test would replace and purge it"
    for path in (Path("/etc/lookupd"), PRIVATE_STATE):
        if path.exists():
            return f"{path} exists: purging the test's package would remove it"
    if STATE.is_symlink():
        return f"{STATE} is a link to systemd's state of a lookupd: purging would remove it"
    return None


def _copy_tree(dest: Path) -> None:
    """This tree as it is (uncommitted changes too), without build products and venvs."""
    skip = {".git", ".venv", ".venv-bookworm", "build", ".pybuild", ".mypy_cache",
            ".ruff_cache", ".pytest_cache", "__pycache__", "out", "manpages-built"}
    shutil.copytree(REPO, dest, symlinks=True, ignore=lambda _dir, names: [
        n for n in names if n in skip or n.endswith((".egg-info", ".so"))])


@pytest.mark.debian_package
@pytest.mark.timeout(900)
def test_package_builds_installs_answers_and_purges(tmp_path: Path) -> None:
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    src = tmp_path / "src"
    _copy_tree(src)
    _run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src, timeout=600)
    arch = _run("dpkg", "--print-architecture").stdout.strip()
    deb = tmp_path / f"lookupd_{__version__}_{arch}.deb"
    assert deb.exists(), sorted(p.name for p in tmp_path.iterdir())
    # The compiled front end is built for the stable ABI: a newer python3 (a dist-upgrade)
    # keeps it, so the package must not hold python3 back or be removed by the upgrade.
    depends = _run("dpkg-deb", "-f", str(deb), "Depends").stdout
    assert "python3:any (>= 3.11~)" in depends and "python3 (<<" not in depends, depends

    made_private_root = not PRIVATE_STATE.parent.exists()
    state_was = _listing(STATE)
    try:
        _run("apt-get", "install", "-y", "--no-install-recommends",
             "-o", "DPkg::Lock::Timeout=120", f"./{deb.name}", cwd=tmp_path, timeout=300)
        files = _run("dpkg", "-L", "lookupd").stdout.splitlines()
        _check_installed_files(set(files))
        _check_runs(tmp_path)
        _make_systemd_state(tmp_path)
        _run("apt-get", "purge", "-y", "-o", "DPkg::Lock::Timeout=120", "lookupd",
             timeout=300)
        _check_purged(files, state_was)
    finally:
        if _installed("lookupd"):
            _run("apt-get", "purge", "-y", "-o", "DPkg::Lock::Timeout=120", "lookupd",
                 timeout=300, check=False)
        if state_was is None and STATE.is_symlink():
            STATE.unlink()
        shutil.rmtree(PRIVATE_STATE, ignore_errors=True)
        if made_private_root:
            with contextlib.suppress(OSError):
                PRIVATE_STATE.parent.rmdir()


def _check_installed_files(files: set[str]) -> None:
    units = Path("/lib/systemd/system")
    for shipped in ("/usr/bin/lookupd", "/etc/lookupd/lookupd.toml",
                    f"{units}/lookupd.socket", f"{units}/lookupd.service",
                    "/usr/share/man/man8/lookupd.8.gz", "/usr/share/man/man5/lookupd.toml.5.gz",
                    "/usr/share/doc/lookupd/copyright", "/usr/lib/python3/dist-packages/lookupd"):
        assert shipped in files, shipped
    # The compiled front end, built for Debian's python3 (lookupd/fastpath.py).
    assert "/usr/lib/python3/dist-packages/lookupd/_fastpath.abi3.so" in files, \
        "the compiled front end is not in the package"
    # The conffile is the repository's example, every setting commented out.
    conffiles = _run("dpkg-query", "-W", "-f=${Conffiles}", "lookupd").stdout
    assert "/etc/lookupd/lookupd.toml " in conffiles
    assert filecmp.cmp("/etc/lookupd/lookupd.toml", EXAMPLE_CONFIG, shallow=False)
    # The units of systemd/, running /usr/bin/lookupd; the socket is enabled, the service not.
    assert (units / "lookupd.socket").read_text() == \
        (REPO / "systemd" / "lookupd.socket").read_text()
    service = (REPO / "systemd" / "lookupd.service").read_text()
    assert (units / "lookupd.service").read_text() == (
        service.replace("ExecStart=/usr/local/bin/lookupd ", "ExecStart=/usr/bin/lookupd ")
        .replace("ExecReload=+/usr/local/bin/lookupd ", "ExecReload=+/usr/bin/lookupd "))
    wants = Path("/etc/systemd/system/sockets.target.wants/lookupd.socket")
    assert wants.is_symlink() and os.readlink(wants) == f"{units}/lookupd.socket"
    assert not Path("/etc/systemd/system/multi-user.target.wants/lookupd.service").exists()
    if shutil.which("systemd-analyze"):  # ExecStart exists, the Documentation= pages too
        _run("systemd-analyze", "verify", f"{units}/lookupd.socket", f"{units}/lookupd.service")
    # The snippets and fail2ban files as they are in the repository, uncompressed.
    snippets = REPO / "exim-snippets"
    for path in snippets.rglob("*"):
        if path.is_file():
            installed = Path("/usr/share/doc/lookupd/exim-snippets") / path.relative_to(snippets)
            assert filecmp.cmp(installed, path, shallow=False), installed
    if shutil.which("man"):  # the pages render without a warning
        for page in ("man8/lookupd.8.gz", "man5/lookupd.toml.5.gz"):
            out = _run("man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                       f"/usr/share/man/{page}")
            assert out.stderr == "", out.stderr


def _check_runs(tmp_path: Path) -> None:
    # Debian's python3 and libraries, not this checkout or a venv.
    where = _run("/usr/bin/python3", "-I", "-c", "import dns, lookupd, maxminddb, uvloop; "
                 "print(lookupd.__file__, dns.__file__, maxminddb.__file__, uvloop.__file__)")
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in where.stdout.split())
    out = _run("lookupd", "check-config")
    assert out.stdout.strip() == "/etc/lookupd/lookupd.toml: configuration OK"

    sockdir = short_dir()
    config = tmp_path / "test.toml"
    redis = _cluster_redis(tmp_path)
    cluster = ""
    if redis is not None:
        pw = tmp_path / "redis.pw"
        pw.write_text(PASSWORD + "\n")
        cluster = (f'[users]\nlimit = 2\nnotify_command = ""\n[cluster]\nredis = "{redis.url}"\n'
                   f'password_file = "{pw}"\nhost_name = "pkg"\ntimeout = "1s"\n')
    config.write_text(with_test_defaults(cluster))  # no Internet DNS, no mail
    log = tmp_path / "serve.log"
    try:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                ["/usr/bin/lookupd", "serve", "--config", str(config), "--socket",
                 str(sockdir / "s"), "--state-dir", str(tmp_path / "state")],
                stdout=fh, stderr=subprocess.STDOUT, env=_system_env())
        try:
            _wait_for_ping(sockdir / "s", proc, log)
            assert "repeated lookups answered by the compiled front end" in log.read_text()
            out = _run("lookupd", "query", "--socket", sockdir / "s", "ping")
            assert out.stdout == "pong\n"
            out = _run("lookupd", "query", "--socket", sockdir / "s", "version")
            assert out.stdout == f"lookupd {__version__}\n"
            if redis is not None:
                _check_cluster(sockdir / "s", redis, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if redis is not None:
            redis.stop()


def _cluster_redis(tmp_path: Path) -> RedisServer | None:
    """A test redis-server when the [cluster] part can run: Debian's python3-redis installed
    (lookupd Suggests it; this test installs nothing) and redis-server there."""
    if not _installed("python3-redis") or shutil.which("redis-server") is None:
        print("package test: python3-redis or redis-server not installed, [cluster] not run")
        return None
    where = _run("/usr/bin/python3", "-I", "-c", "import redis; print(redis.__file__)")
    assert where.stdout.startswith("/usr/lib/python3/dist-packages/"), where.stdout
    return RedisServer(tmp_path / "redis").start()


def _check_cluster(sock: Path, redis: RedisServer, log: Path) -> None:
    """The packaged daemon shares through Redis with Debian's python3-redis: user-fail and
    strike are counted there, as if another host had counted the rest."""
    deadline = time.monotonic() + 10
    while "sharing state through Redis" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    query = ("lookupd", "query", "--socket", sock)
    assert _run(*query, "user-fail", "pat", "x@example.org").stdout == "ok\n"
    assert _run(*query, "strike", "192.0.2.80", "auth").stdout == "strikes=1\n"
    assert redis.cli("ZCARD", "lookupd:users:events:pat") == 1
    assert redis.cli("ZCARD", "lookupd:strikes:192.0.2.80") == 1
    # Another host's event in Redis makes this one the second: blocked.
    redis.cli("ZADD", "lookupd:users:events:pat", str(time.time()), "other:1")
    assert _run(*query, "user-fail", "pat", "y@example.org").stdout.startswith("blocked")
    assert "pat" in redis.cli("HKEYS", "lookupd:users:blocks")
    text = log.read_text()
    assert "Traceback" not in text and PASSWORD not in text, text


def _wait_for_ping(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if ask(path, b"ping", 1.0) == b"pong":
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the packaged lookupd did not answer:\n{log.read_text()}")


def _make_systemd_state(tmp_path: Path) -> None:
    """What systemd makes for lookupd.service (DynamicUser=yes, StateDirectory=lookupd): the
    state in /var/lib/private/lookupd and, where nothing else is, the /var/lib/lookupd link."""
    PRIVATE_STATE.parent.mkdir(mode=0o700, exist_ok=True)
    PRIVATE_STATE.mkdir(mode=0o750)
    config = tmp_path / "state.toml"
    config.write_text(with_test_defaults(f'[server]\nstate_dir = "{PRIVATE_STATE}"\n'))
    _run("lookupd", "users", "block", "purge-test", "--config", config)
    assert (PRIVATE_STATE / "users.sqlite").exists()
    if not STATE.exists() and not STATE.is_symlink():
        STATE.symlink_to("private/lookupd")


def _listing(path: Path) -> list[str] | None:
    """A real directory's entries (it is not the package's and must survive the purge)."""
    if path.is_symlink() or not path.is_dir():
        return None
    return sorted(p.name for p in path.iterdir())


def _check_purged(files: list[str], state_was: list[str] | None) -> None:
    assert not _installed("lookupd")
    left = [f for f in files if f != "/." and os.path.lexists(f)
            and _run("dpkg", "-S", f, check=False).returncode != 0]
    assert left == [], "purge left files that no other package owns"
    for path in ("/etc/lookupd", "/usr/lib/python3/dist-packages/lookupd",
                 "/etc/systemd/system/sockets.target.wants/lookupd.socket", PRIVATE_STATE):
        assert not os.path.lexists(path), path
    helper = [p for d in ("/var/lib/systemd/deb-systemd-helper-enabled",
                          "/var/lib/systemd/deb-systemd-helper-masked")
              for p in Path(d).rglob("*lookupd*")]
    assert helper == []
    assert list(Path("/var/lib/dpkg/info").glob("lookupd.*")) == []
    if state_was is None:
        assert not os.path.lexists(STATE)
    else:  # a /var/lib/lookupd of its own (lookupd run outside systemd) is kept
        assert STATE.is_dir() and not STATE.is_symlink()
