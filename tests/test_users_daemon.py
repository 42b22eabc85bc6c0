"""The user verbs on a real `lookupd serve`: kill -9 and restart, many concurrent clients,
and who may run user-block / user-unblock (root, admin_group, not others, never over TCP)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import StartLookupd
from support import Lookupd, ask_tcp, free_port

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")

USERS = '[users]\nlimit = {limit}\nnotify_command = ""\n{extra}'


def users_config(limit: int = 3, extra: str = "", server: str = "") -> str:
    return (f"[server]\n{server}\n" if server else "") + USERS.format(limit=limit, extra=extra)


def test_kill_9_keeps_the_answered_block(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd(users_config())
    assert daemon.query("user-fail alice a@example.org\n") == "ok"
    assert daemon.query("user-fail alice b@example.org\n") == "ok"
    reply = daemon.query("user-fail alice c@example.org\n")
    assert reply.startswith("blocked - since=")
    assert daemon.query("user-block mallory stolen password\n").startswith("blocked")
    daemon.signal(signal.SIGKILL)
    assert daemon.proc is not None
    daemon.proc.wait(10)
    daemon.start()  # same state directory; the stale socket is replaced
    assert daemon.query("user alice\n") == reply
    assert daemon.query("user Mallory\n").endswith('reason="stolen password"')
    assert daemon.query("user bob\n") == "ok"


def test_bad_names_get_error_replies(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd(users_config())
    long_name = "x" * 300
    assert daemon.query(f"user {long_name}\n") == "error user name longer than 256 bytes"
    assert daemon.query("user-fail x');DROP/**/TABLE/**/events;-- r@x\n") == "ok"
    assert daemon.query("user x');drop/**/table/**/events;--\n") == "ok"
    assert daemon.query("user a\x01b\n").startswith("error")
    # No user (an unauthenticated session in Exim): nothing to check or count.
    assert daemon.query("user\n") == "ok"
    assert daemon.query("user-fail\n") == "ok"
    # A quoted local part may hold spaces: the rest of the line is the recipient, counted.
    assert daemon.query('user-fail carol "a b"@example.org\n') == "ok"
    conn = sqlite3.connect(daemon.workdir / "state" / "users.sqlite")
    assert conn.execute("SELECT recipient FROM events WHERE user = 'carol'").fetchall() == [
        ('"a?b"@example.org',)]
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} >= {"events"}
    conn.close()


def test_concurrent_clients_count_exactly(start_lookupd: StartLookupd) -> None:
    """16 clients x 50 user-fail, limit 800: exactly one answer is the one that blocks."""
    daemon = start_lookupd(users_config(limit=800))

    def client(n: int) -> list[str]:
        return [daemon.query(f"user-fail busy r{n}-{i}@example.org\n") for i in range(50)]

    with ThreadPoolExecutor(16) as pool:
        replies = [r for rs in pool.map(client, range(16)) for r in rs]
    assert len(replies) == 800
    assert sum(r.startswith("blocked") for r in replies) == 1
    assert replies.count("ok") == 799
    assert daemon.query("user busy\n").startswith("blocked")
    assert "800 invalid recipients" in daemon.query("user busy\n")


CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
s.shutdown(socket.SHUT_WR)
print(s.recv(4096).decode(), end="")
"""


def ask_as(daemon: Lookupd, request: str, *setpriv: str) -> str:
    cmd = [*(["setpriv", *setpriv, "--"] if setpriv else []), sys.executable, "-c", CLIENT,
           str(daemon.socket), request]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


NOBODY = ("--reuid=nobody", "--regid=nogroup", "--clear-groups")


@needs_root
def test_admin_verbs_only_for_root_and_the_admin_group(start_lookupd: StartLookupd) -> None:
    port = free_port()
    daemon = start_lookupd(users_config(server='socket_mode = "0666"'), tcp_port=port)
    assert ask_as(daemon, "user-block mallory test").startswith("blocked")  # root
    assert ask_as(daemon, "user-unblock mallory", *NOBODY) == "error not permitted"
    assert ask_as(daemon, "user-block trudy", *NOBODY) == "error not permitted"
    assert ask_as(daemon, "user mallory", *NOBODY).startswith("blocked")  # lookups are for all
    assert ask_tcp(port, b"user-unblock mallory\n") == b"error not permitted"
    assert ask_tcp(port, b"user-block trudy\n") == b"error not permitted"
    assert daemon.query("user trudy\n") == "ok"
    assert "user-unblock mallory refused" in daemon.log()
    assert daemon.query("user-unblock mallory\n") == "ok"  # root again
    assert daemon.query("user mallory\n") == "ok"


@needs_root
def test_admin_group_members_may_administer(start_lookupd: StartLookupd) -> None:
    daemon = start_lookupd(users_config(extra='admin_group = "nogroup"\n',
                                        server='socket_mode = "0666"'))
    # nobody with nogroup as its group: a member.
    assert ask_as(daemon, "user-block mallory by a member", *NOBODY).startswith("blocked")
    assert ask_as(daemon, "user-unblock mallory", *NOBODY) == "ok"
    # A uid whose primary and supplementary groups lack nogroup: refused.
    assert ask_as(daemon, "user-unblock mallory", "--reuid=daemon", "--regid=daemon",
                  "--clear-groups") == "error not permitted"
    with contextlib.closing(sqlite3.connect(daemon.workdir / "state" / "users.sqlite")) as db:
        history = db.execute("SELECT action, by FROM history WHERE user = 'mallory' "
                             "ORDER BY rowid").fetchall()
    assert [a for a, _ in history] == ["block", "unblock"]
    assert all(by.startswith("nobody (uid 65534") for _, by in history)
