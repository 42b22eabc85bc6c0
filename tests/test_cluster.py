"""[cluster]: three real `lookupd serve` processes ("hosts" a, b, c) sharing user block state
through a real redis-server with requirepass; Redis stopped, hung (SIGSTOP) and restarted
while concurrent user-fail traffic goes on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redisserver import PASSWORD, RedisSentinel, RedisServer, make_tls_files, tls_problem
from support import EXIM, EXIM_BASE, Exim, Lookupd, short_dir, stop_all

from lookupd.cluster import CLOSE_WAIT, Cluster
from lookupd.config import ClusterConfig

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server (apt-get install redis-server)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="user-block needs root or a group")

# [cluster] timeout where a test bounds the answers while Redis is down or hung (a loaded
# test machine stalled a healthy Redis past 0.3 s); SLACK: the room it needs beyond it.
TIMEOUT = 1.0
SLACK = 1.5
# [cluster] timeout elsewhere: a Redis slowed by a loaded machine must not make a host decide
# alone in a test about sharing.
SHARED_TIMEOUT = 2.0
# A wait for what comes within moments (a pub/sub message, a refresh), with room for a loaded
# test machine. Where "within a second" is the requirement, the delays are measured instead.
SOON = 5.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


Hosts = Callable[..., list[Lookupd]]


@pytest.fixture
def hosts(redis: RedisServer, tmp_path: Path) -> Iterator[Hosts]:
    started: list[Lookupd] = []
    password_file = tmp_path / "redis.pw"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)

    def start(limit: int = 5, names: str = "abc", password: Path = password_file,
              server: str = "", timeout: float = SHARED_TIMEOUT) -> list[Lookupd]:
        for name in names:
            config = (f"[server]\n{server}\n"
                      f'[users]\nlimit = {limit}\nnotify_command = ""\n'
                      f'[cluster]\nredis = "{redis.url}"\npassword_file = "{password}"\n'
                      f'host_name = "{name}"\ntimeout = "{int(timeout * 1000)}ms"\n')
            started.append(Lookupd(short_dir(), config).start())
        for daemon in started:
            if password == password_file:
                wait_for(_connected(daemon), 5)
        return started[-len(names):]

    yield start
    stop_all(started, remove=True)


def _connected(daemon: Lookupd) -> Callable[[], bool]:
    return lambda: "cluster: sharing state through Redis" in daemon.log()


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(0.002)
    return time.monotonic() - start


def blocked(daemon: Lookupd, user: str) -> bool:
    return daemon.query(f"user {user}\n").startswith("blocked")


# --- three hosts ---------------------------------------------------------------------------


def test_window_and_blocks_are_shared(hosts: Hosts, redis: RedisServer) -> None:
    a, b, c = hosts(limit=5)
    assert a.query("user-fail alice r1@example.org\n") == "ok"
    assert b.query("user-fail alice r2@example.org\n") == "ok"
    assert c.query("user-fail alice r3@example.org\n") == "ok"
    assert a.query("user-fail alice r4@example.org\n") == "ok"
    reply = c.query("user-fail alice r5@example.org\n")  # the fifth, on a third host
    assert reply.startswith('blocked - since=') and 'reason="5 invalid recipients in 1h"' in reply
    wait_for(lambda: blocked(a, "alice") and blocked(b, "alice"), SOON)
    assert a.query("user alice\n") == b.query("user alice\n") == reply
    assert b.query("user-fail alice r6@example.org\n") == reply
    assert redis.cli("ZCARD", "lookupd:users:events:alice") == 5
    # Each host's journal has the block, and which host made it.
    for daemon in (a, b, c):
        daemon.stop()
    import sqlite3
    conn = sqlite3.connect(a.workdir / "state" / "users.sqlite")
    assert conn.execute("SELECT by FROM blocks WHERE user = 'alice'").fetchone() == ("lookupd@c",)
    conn.close()
    cli = a.workdir / "cli.toml"
    cli.write_text(f'[server]\nstate_dir = "{a.workdir / "state"}"\n')
    history = subprocess.run([sys.executable, "-m", "lookupd", "users", "--config", str(cli),
                              "history", "alice"], capture_output=True, text=True, timeout=30)
    assert "block    by lookupd@c: 5 invalid recipients in 1h" in history.stdout, history
    assert "r1@example.org  (seen on a)" in history.stdout, history.stdout
    for daemon in (a, b, c):
        daemon.start()
        assert daemon.query("user alice\n") == reply
    assert PASSWORD not in "".join(d.log() for d in (a, b, c))


def test_block_propagation_delay(hosts: Hosts) -> None:
    """A block made on host a answers `blocked` on host c: measured, well under a second."""
    a, _, c = hosts(limit=1)
    delays = []
    for i in range(40):
        assert a.query(f"user-fail p{i} r@example.org\n").startswith("blocked")
        user = f"p{i}"
        delays.append(wait_for(lambda: blocked(c, user), 10.0))  # noqa: B023
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(f"\nblock propagation a -> c: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0


@needs_root
def test_admin_block_and_unblock_propagate(hosts: Hosts) -> None:
    a, b, c = hosts(limit=3)
    assert a.query("user-block mallory stolen password\n").startswith("blocked")
    wait_for(lambda: blocked(b, "mallory") and blocked(c, "mallory"), SOON)
    assert 'reason="stolen password"' in c.query("user mallory\n")
    for daemon in (a, b, c):
        daemon.query("user-fail bob x@example.org\n")
    wait_for(lambda: blocked(a, "bob") and blocked(b, "bob"), SOON)
    assert b.query("user-unblock bob\n") == "ok"
    wait_for(lambda: not blocked(a, "bob") and not blocked(c, "bob"), SOON)
    # The window starts again everywhere: two more failures do not block.
    assert a.query("user-fail bob x@example.org\n") == "ok"
    assert c.query("user-fail bob x@example.org\n") == "ok"
    assert c.query("user-unblock mallory\n") == "ok"
    wait_for(lambda: not blocked(a, "mallory"), SOON)


def _users_cli(daemon: Lookupd, *args: str) -> subprocess.CompletedProcess[str]:
    """`lookupd users ...` on the daemon's own state and [cluster], as an admin runs it."""
    config = daemon.workdir / "cli.toml"
    config.write_text(daemon.config_text.replace(
        "[server]\n", f'[server]\nstate_dir = "{daemon.workdir / "state"}"\n', 1))
    return subprocess.run([sys.executable, "-m", "lookupd", "users", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=30)


def test_cli_block_and_unblock_reach_the_other_hosts_at_once(hosts: Hosts,
                                                             redis: RedisServer) -> None:
    """`lookupd users block|unblock` on host a goes to Redis before it returns: host c answers
    within a second of it (measured), not at a's next sync 30s later. With Redis down, the
    command says so and a's lookupd shares the block once Redis is back."""
    a, c = hosts(limit=5, names="ac")
    after_return, whole = [], []
    for i in range(5):
        user = f"cli{i}"
        start = time.monotonic()
        out = _users_cli(a, "block", user, "--reason", "phished password")
        assert out.returncode == 0, out.stderr
        assert "every [cluster] host at once" in out.stdout, out.stdout
        after_return.append(wait_for(lambda u=user: blocked(c, u), 10.0))  # type: ignore[misc]
        whole.append(time.monotonic() - start)
        assert 'reason="phished password"' in c.query(f"user {user}\n")
        wait_for(lambda u=user: blocked(a, u), SOON)  # type: ignore[misc]  # a: from its sqlite
        start = time.monotonic()
        out = _users_cli(a, "unblock", user)
        assert out.returncode == 0 and "every [cluster] host at once" in out.stdout, out
        after_return.append(wait_for(lambda u=user: not blocked(c, u), 10.0))  # type: ignore[misc]
        whole.append(time.monotonic() - start)
    print(f"\nCLI block/unblock on a -> c answers it: {max(after_return) * 1000:.1f} ms at "
          f"most after the command returned (median {statistics.median(after_return) * 1000:.1f}"
          f" ms); the whole command until c answers: median {statistics.median(whole):.2f} s "
          "(mostly Python starting)")
    # Within a second, all but the slowest of the ten (a loaded machine may stall one).
    assert sorted(after_return)[-2] < 1.0, after_return
    # An unblock of a user blocked on another host only also reaches every host.
    for i in range(5):
        c.query(f"user-fail carl r{i}@example.org\n")
    wait_for(lambda: blocked(a, "carl"), SOON)
    assert "every [cluster] host at once" in _users_cli(a, "unblock", "carl").stdout
    wait_for(lambda: not blocked(c, "carl"), SOON)
    # Redis down: saved here, said so, shared by a's lookupd once Redis answers again.
    redis.stop()
    out = _users_cli(a, "block", "dora")
    assert out.returncode == 0 and "blocked dora" in out.stdout, out
    assert "is saved here, but Redis at redis://127.0.0.1" in out.stderr, out.stderr
    assert "every [cluster] host" not in out.stdout and PASSWORD not in out.stderr
    redis.start()
    wait_for(lambda: blocked(c, "dora"), 10.0)


def test_hostile_values_in_redis_are_ignored(hosts: Hosts, redis: RedisServer) -> None:
    a, b, _ = hosts(limit=3)
    redis.cli("HSET", "lookupd:users:blocks", "eve", "{not json")
    redis.cli("HSET", "lookupd:users:blocks", "zed", '{"user":"zed","since":"x"}')
    redis.cli("PUBLISH", "lookupd:events", '{"op":"block","user":"a b","since":1}')
    redis.cli("PUBLISH", "lookupd:events", "\x00" * 10000)
    assert a.query("user-fail eve x@example.org\n") == "ok"
    assert b.query("user zed\n") == "ok"
    assert b.query("user-fail zed x@example.org\n") == "ok"
    assert a.query("ping\n") == "pong" and b.query("ping\n") == "pong"
    wait_for(lambda: "malformed value in Redis" in a.log() + b.log(), 2.0)


# --- Redis down, hung, back ----------------------------------------------------------------


def _traffic(daemons: list[Lookupd], users: list[str], per_host: int) -> list[tuple[str, float]]:
    """Concurrent user-fail traffic, 8 clients: (reply, seconds) each."""
    jobs = [(d, u, i) for i in range(per_host) for d in daemons for u in users]

    def one(job: tuple[Lookupd, str, int]) -> tuple[str, float]:
        daemon, user, i = job
        start = time.monotonic()
        reply = daemon.query(f"user-fail {user} r{i}@example.org\n")
        return reply, time.monotonic() - start

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, jobs))


def _outage(hosts: Hosts, redis: RedisServer, down: Callable[[], object],
            up: Callable[[], object]) -> None:
    a, b, c = daemons = hosts(limit=10, timeout=TIMEOUT)
    # Before: carol 6 events, erin 3 (one or two a host).
    assert all(r == "ok" for r, _ in _traffic(daemons, ["carol", "erin"], 1))
    assert all(r == "ok" for r, _ in _traffic(daemons, ["carol"], 1))
    assert redis.cli("ZCARD", "lookupd:users:events:carol") == 6
    down()
    during = _traffic(daemons, ["carol", "erin"], 2)
    during += [(a.query(f"user-fail dave d{i}@example.org\n"), 0.0) for i in range(10)]
    for reply, seconds in during:
        assert reply == "ok" or reply.startswith("blocked"), reply
        assert seconds < TIMEOUT + SLACK, seconds
    # dave's block was answered on a alone; the others did not hear of it.
    assert blocked(a, "dave") and not blocked(c, "dave")
    up()
    # After the merge: the answered block is everywhere, and carol's 6 + 6 events (each host
    # pushes all of its own again; those Redis had count once) crossed the limit of 10: the
    # merge blocks at the tenth, and, as always, a blocked user's later events are not kept.
    wait_for(lambda: all(blocked(d, "dave") and blocked(d, "carol") for d in daemons), 10.0)
    assert redis.cli("ZCARD", "lookupd:users:events:carol") == 10
    assert 'reason="10 invalid recipients in 1h"' in c.query("user carol\n")
    assert redis.cli("ZCARD", "lookupd:users:events:erin") == 3 + 6
    assert not blocked(b, "erin")
    assert b.query("user-fail erin x@example.org\n").startswith("blocked")  # the tenth
    wait_for(lambda: blocked(c, "erin"), SOON)
    for daemon in daemons:
        log = daemon.log()
        assert PASSWORD not in log
        assert log.count("does not answer within") <= 2, log
        assert "Traceback" not in log, log


def test_redis_stopped_and_restarted(hosts: Hosts, redis: RedisServer) -> None:
    _outage(hosts, redis, redis.stop, redis.start)


def test_redis_hung_and_resumed(hosts: Hosts, redis: RedisServer) -> None:
    _outage(hosts, redis, redis.pause, redis.resume)


@pytest.mark.parametrize("merge", ["slow", "ends-as-the-stop-comes"])
async def test_a_stop_during_the_merge_after_redis_came_back_does_not_hang(
        redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        merge: str) -> None:
    """A SIGTERM can come while the merge after Redis came back runs: CI once saw lookupd
    never stop, its connection loop gone on to listen because Python 3.11's wait_for lost the
    cancel when the merge ended at that moment. Whether the merge takes long or ends just as
    the stop comes, close() ends the loop, without the warning that it had to give up on it."""
    password = tmp_path / "redis.pw"
    password.write_text(PASSWORD + "\n")
    cluster = Cluster(ClusterConfig(redis=redis.url, password_file=password, timeout=TIMEOUT))
    merging = asyncio.Event()

    async def on_up(first: bool) -> None:
        merging.set()  # the test's close() runs before the loop sees this merge has ended
        if merge == "slow":
            await asyncio.sleep(30)

    cluster.on_up(on_up)
    await cluster.open()
    async with asyncio.timeout(5):
        await merging.wait()
    closing = asyncio.ensure_future(cluster.close())
    done, _ = await asyncio.wait({closing}, timeout=CLOSE_WAIT + 2)  # never cancels close()
    if not done:
        closing.cancel()
    assert done, "close() hung"
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "lookupd-cluster"]
    assert "did not stop within" not in caplog.text


def test_wrong_password_decides_locally(hosts: Hosts, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    (a,) = hosts(limit=2, names="a", password=wrong)
    assert a.query("user-fail frank x@example.org\n") == "ok"
    assert a.query("user-fail frank y@example.org\n").startswith("blocked")
    assert "cannot reach Redis" in a.log()
    assert "not-the-password" not in a.log()


def test_without_the_redis_client_a_host_decides_alone(tmp_path: Path) -> None:
    """[cluster] on a host without python3-redis (a Suggests of the Debian package): serve
    says what to install and runs on the local store; check-config reports it."""
    hide = tmp_path / "hide"
    hide.mkdir()
    # As if redis were not installed: find_spec("redis") is None, `import redis` fails.
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["redis"] = None\n')
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    config = ('[users]\nlimit = 2\nnotify_command = ""\n'
              '[cluster]\nredis = "redis://127.0.0.1:9/0"\nhost_name = "a"\n')
    daemon = Lookupd(short_dir(), config, env=env).start()
    try:
        assert daemon.query("user-fail nina x@example.org\n") == "ok"
        assert daemon.query("user-fail nina y@example.org\n").startswith("blocked")
        assert "cluster: [cluster] needs the Redis client for Python, which is not installed: " \
               "apt-get install python3-redis" in daemon.log()
        assert "Traceback" not in daemon.log()
        check = subprocess.run([sys.executable, "-m", "lookupd", "check-config", "--config",
                                str(daemon.config_path)], capture_output=True, text=True,
                               timeout=30, env={**os.environ, **env})
        assert check.returncode == os.EX_CONFIG
        assert "apt-get install python3-redis" in check.stderr, check.stderr
    finally:
        daemon.stop()
        shutil.rmtree(daemon.workdir, ignore_errors=True)


ACL = "user lookupd on >acl-Secret-77 ~lookupd:* &lookupd:* +@all -@admin -@dangerous\n"


def test_acl_user(tmp_path: Path) -> None:
    """A Redis ACL user limited to lookupd's keys and channel is enough for every verb."""
    redis = RedisServer(tmp_path / "redis", extra=ACL).start()
    pw = tmp_path / "pw"
    pw.write_text("acl-Secret-77\n")
    hosts = []
    try:
        for name in "ac":
            hosts.append(Lookupd(short_dir(), (
                f'[users]\nlimit = 2\nnotify_command = ""\n'
                f'[cluster]\nredis = "{redis.url}"\npassword_file = "{pw}"\n'
                f'username = "lookupd"\nhost_name = "{name}"\n'
                f'timeout = "{SHARED_TIMEOUT}s"\n')).start())
        for daemon in hosts:
            wait_for(_connected(daemon), 5)
        a, c = hosts
        assert a.query("user-fail gina x@example.org\n") == "ok"
        assert c.query("user-fail gina y@example.org\n").startswith("blocked")
        wait_for(lambda: blocked(a, "gina"), SOON)
        assert a.query("strike 192.0.2.44 auth\n") == "strikes=1"
        assert c.query("strike 192.0.2.44 auth\n") == "strikes=2"
        for daemon in hosts:
            assert "acl-Secret-77" not in daemon.log()
            assert "malformed" not in daemon.log() and "does not answer" not in daemon.log()
    finally:
        stop_all(hosts, remove=True)
        redis.stop()


@contextlib.contextmanager
def _hosts(cluster: str, names: str = "ac", wait: str = "ac") -> Iterator[list[Lookupd]]:
    """Hosts with this [cluster] body (HOST: the host's name); those in `wait` must connect."""
    daemons: list[Lookupd] = []
    try:
        for name in names:
            daemons.append(Lookupd(short_dir(), (
                '[users]\nlimit = 2\nnotify_command = ""\n'
                f'[cluster]\ntimeout = "{SHARED_TIMEOUT}s"\n{cluster.replace("HOST", name)}')
            ).start(wait=False))
        for daemon in daemons:
            daemon.wait_ready()
        for name, daemon in zip(names, daemons, strict=True):
            if name in wait:
                wait_for(_connected(daemon), 5)
        yield daemons
    finally:
        stop_all(daemons, remove=True)


def _shares(a: Lookupd, c: Lookupd, redis: RedisServer, user: str, ip: str) -> None:
    """A block and strikes made on one host are seen on the other, and are in `redis`."""
    assert a.query(f"user-fail {user} x@example.org\n") == "ok"
    assert c.query(f"user-fail {user} y@example.org\n").startswith("blocked")
    wait_for(lambda: blocked(a, user), SOON)
    assert a.query(f"strike {ip} auth\n") == "strikes=1"
    assert c.query(f"strike {ip} auth\n") == "strikes=2"
    assert user in redis.cli("HKEYS", "lookupd:users:blocks")
    assert redis.cli("ZCARD", f"lookupd:strikes:{ip}") == 2
    for daemon in (a, c):
        assert PASSWORD not in daemon.log() and "Traceback" not in daemon.log()


def test_unix_socket(tmp_path: Path) -> None:
    """redis = "unix:///...": a redis-server listening on a Unix socket only (no TCP)."""
    sockdir = short_dir("lkdr")
    redis = RedisServer(tmp_path / "redis", unixsocket=sockdir / "redis.sock").start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    try:
        with _hosts(f'redis = "{redis.url}"\npassword_file = "{pw}"\nhost_name = "HOST"\n'
                    ) as (a, c):
            assert f"sharing state through Redis at unix://{sockdir}" in a.log()
            _shares(a, c, redis, "ursula", "192.0.2.61")
    finally:
        redis.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.skipif(tls_problem() is not None, reason=tls_problem() or "")
def test_tls(tmp_path: Path) -> None:
    """redis = "rediss://..." with ca_file, cert_file and key_file: a redis-server with a
    tls-port and tls-auth-clients (Redis' default). A Redis whose certificate the CA did not
    sign, or a host without its client certificate, is not used: that host decides alone."""
    tls = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other", "other")
    redis = RedisServer(tmp_path / "redis", tls=tls).start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    base = f'redis = "{redis.tls_url}"\npassword_file = "{pw}"\nhost_name = "HOST"\n'
    good = f'ca_file = "{tls.ca}"\ncert_file = "{tls.client_cert}"\nkey_file = "{tls.client_key}"\n'
    try:
        with _hosts(base + good) as (a, c), \
                _hosts(base + good.replace(str(tls.ca), str(other.ca)), "x", "") as (x,), \
                _hosts(base + f'ca_file = "{tls.ca}"\n', "y", "") as (y,):
            assert f"sharing state through Redis at {redis.tls_url}" in a.log()
            _shares(a, c, redis, "tessa", "192.0.2.62")
            for daemon in (x, y):
                wait_for(lambda d=daemon: "cannot reach Redis" in d.log(), 5)  # type: ignore[misc]
                assert daemon.query("user tessa\n") == "ok"  # alone: never heard of her
            assert "not signed by cluster.ca_file" in x.log(), x.log()
            assert "set cluster.cert_file and cluster.key_file" in y.log(), y.log()
    finally:
        redis.stop()


def test_sentinel_failover_loses_no_answered_block(tmp_path: Path) -> None:
    """Two Redis servers under redis-sentinel; the primary is killed during user-fail traffic
    on three hosts: after the failover every block any host answered is on every host and in
    the new primary."""
    primary = RedisServer(tmp_path / "p").start()
    replica = RedisServer(tmp_path / "r", extra=(
        f"replicaof 127.0.0.1 {primary.port}\nmasterauth {PASSWORD}\n")).start()
    sentinel = RedisSentinel(tmp_path / "s", primary.port).start()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    daemons: list[Lookupd] = []
    try:
        for name in "abc":
            daemons.append(Lookupd(short_dir(), (
                f'[users]\nlimit = 2\nnotify_command = ""\n'
                f'[cluster]\nsentinels = ["127.0.0.1:{sentinel.port}"]\n'
                f'sentinel_service = "mymaster"\npassword_file = "{pw}"\n'
                f'host_name = "{name}"\ntimeout = "{int(TIMEOUT * 1000)}ms"\n')).start())
        for daemon in daemons:
            wait_for(_connected(daemon), 5)
        answered: set[str] = set()

        def wave(tag: str) -> None:
            users = [f"{tag}{i}" for i in range(6)]
            for result in _traffic(daemons, users, 1):
                assert result[1] < TIMEOUT + SLACK, result
            for user in users:
                for daemon in daemons:
                    if blocked(daemon, user):
                        answered.add(user)

        wave("before")
        # What each host logged before the failover: a loaded machine can make a host lose
        # Redis for a moment in wave "before" too, and that "answers again" is not this one.
        marks = {id(d): len(d.log()) for d in daemons}
        primary.proc.kill()  # type: ignore[union-attr]
        primary.proc.wait()  # type: ignore[union-attr]
        wave("during")
        wait_for(lambda: sentinel.primary() == replica.port, 30)
        wave("after")
        assert answered
        for daemon in daemons:
            wait_for(lambda d=daemon: "answers again" in d.log()[marks[id(d)]:],  # type: ignore[misc]
                     30)
        # Every block answered anywhere is on every host and in the new primary; and the
        # users whose 3 events were counted apart during the failover are blocked by the merge.
        merged = answered | {f"during{i}" for i in range(6)}
        for daemon in daemons:
            wait_for(lambda d=daemon: all(blocked(d, u) for u in merged), SOON)  # type: ignore[misc]
        in_redis = set(replica.cli("HKEYS", "lookupd:users:blocks"))
        assert merged <= in_redis, (merged - in_redis, daemons[0].log()[-3000:])
        assert all(PASSWORD not in d.log() for d in daemons)
    finally:
        stop_all(daemons, remove=True)
        sentinel.stop()
        replica.stop()
        primary.stop()


@pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")
def test_exim_on_host_a_blocks_what_exim_on_host_c_freezes(hosts: Hosts) -> None:
    """A real Exim -bh session against host a: a stolen password's spam to dead addresses
    blocks alice; the next session, against host c, freezes her mail at once."""
    from test_users_exim import EXIM_CONFIG, log_lines, session

    a, _, c = hosts(limit=3, server='socket_group = "Debian-exim"')
    workdir = short_dir("lkdx")
    try:
        exim = Exim(workdir, EXIM_BASE.format(workdir=workdir) + EXIM_CONFIG)
        out, err = exim.bh("192.0.2.10", session("alice", "nosuch1@example.org",
                                                 "nosuch2@example.org", "nosuch3@example.org"),
                           [f"LOOKUPD_SOCKET={a.socket}"])
        assert out.count("550 no such user here") == 3, out
        assert log_lines(err, "lookupd: invalid")[-1].endswith("from alice: blocked")
        out, err = exim.bh("192.0.2.10", session("alice", "carol@example.org"),
                           [f"LOOKUPD_SOCKET={c.socket}"])
        assert "250 Accepted" in out
        frozen = log_lines(err, "lookupd: froze")
        assert len(frozen) == 1 and frozen[0].endswith(": 3 invalid recipients in 1h"), err
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_reload_keeps_sharing(hosts: Hosts, redis: RedisServer) -> None:
    """A SIGHUP builds a new connection beside the old; strikes and blocks carry on."""
    import signal

    a, c = hosts(limit=2, names="ac")
    assert a.query("strike 192.0.2.77 auth\n") == "strikes=1"
    a.signal(signal.SIGHUP)
    wait_for(lambda: "configuration and databases reloaded" in a.log(), 10)
    wait_for(lambda: a.log().count("sharing state through Redis") >= 2, 5)
    assert a.query("strike 192.0.2.77 auth\n") == "strikes=2"
    assert c.query("user-fail hank x@example.org\n") == "ok"
    assert a.query("user-fail hank y@example.org\n").startswith("blocked")
    wait_for(lambda: blocked(c, "hank"), SOON)
    assert "Traceback" not in a.log()


def test_status_and_metrics_show_the_redis_link(hosts: Hosts, redis: RedisServer) -> None:
    """lookupd status and the metrics say whether this host reaches Redis (issue 12)."""
    (a,) = hosts(limit=5, names="a")

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lookupd", "status", "--socket",
                               str(a.socket)], capture_output=True, text=True, timeout=30)

    assert "cluster:       Redis up " in status().stdout
    assert "lookupd_cluster_up 1.0" in a.query("metrics").splitlines()
    redis.stop()
    try:
        a.query("user-fail ivan x@example.org\n")  # notices that Redis is gone
        wait_for(lambda: "lookupd_cluster_up 0.0" in a.query("metrics").splitlines(), 5.0)
        shown = status()
        assert shown.returncode == 1, shown
        assert "cluster:       Redis down " in shown.stdout
        assert "does not answer: this host decides alone" in shown.stdout
        assert PASSWORD not in shown.stdout
    finally:
        redis.start()
