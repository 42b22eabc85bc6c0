"""The admin's mail about a block: its content, header injection, and a real command run in the
background (captured, failing, hanging) that never delays an answer."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from lookupd.config import UsersConfig
from lookupd.users.notify import Notice, Notifier, build_mail
from lookupd.users.state import UserState

NOTICE = Notice("alice@example.org", 5, 3600.0, 1_700_000_000.0, "5 invalid recipients in 1h",
                ("nosuch1@example.org", "nosuch2@example.org"))


def parse(mail: bytes) -> EmailMessage:
    msg = email.message_from_bytes(mail, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_mail_content() -> None:
    mail = build_mail(NOTICE, "postmaster@example.org", "mx.example.org")
    assert b"\r" not in mail  # sendmail -t wants local line ends
    msg = parse(mail)
    assert msg["To"] == "postmaster@example.org"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "alice@example.org" in msg["Subject"]
    body = msg.get_content()
    for text in ("User:     alice@example.org", "5 invalid recipients within 1h",
                 "nosuch1@example.org", "nosuch2@example.org",
                 "lookupd users unblock alice@example.org", "2023-11-14T22:13:20Z"):
        assert text in body


def test_non_ascii_names_are_encoded() -> None:
    notice = Notice("josé", 3, 60.0, 0.0, "3 invalid recipients in 1m")
    mail = build_mail(notice, "postmaster", "mx")
    headers, _, _ = mail.partition(b"\n\n")
    assert headers.isascii()  # RFC 2047 encoded words; the body goes as UTF-8 (8bit)
    msg = parse(mail)
    assert "josé" in msg["Subject"]
    assert "lookupd users unblock 'josé'" in msg.get_content()  # shlex.quote: ASCII only


@pytest.mark.parametrize("user, to", [
    ("evil\r\nBcc: victim@example.org", "postmaster"),
    ("evil\nBcc: victim@example.org", "postmaster"),
    ("alice", "postmaster\nBcc: victim@example.org"),
])
def test_header_injection_is_refused(user: str, to: str) -> None:
    """Names are validated before they get here; this is the second line of defence."""
    notice = Notice(user, 1, 60.0, 0.0, "r")
    with pytest.raises(ValueError):
        build_mail(notice, to, "mx")


async def test_command_gets_the_mail(tmp_path: Path) -> None:
    out = tmp_path / "mail.txt"
    command = script(tmp_path / "capture.sh", f'cat > "{out}"\n')
    notifier = Notifier(f"{command} -t -oi", "postmaster", retries=0, timeout=5.0)
    sent = asyncio.Event()
    notifier.send(NOTICE, sent.set)
    await asyncio.wait_for(sent.wait(), 5)
    msg = parse(out.read_bytes())
    assert "alice@example.org" in msg["Subject"]
    assert "nosuch2@example.org" in msg.get_content()


async def test_failing_command_is_retried_then_given_up(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    command = script(tmp_path / "fail.sh", f'echo run >> "{runs}"\necho "no MTA here" >&2\n'
                                           "exit 75\n")
    notifier = Notifier(command, "postmaster", retries=2, timeout=5.0, backoff=0.05)
    sent: list[bool] = []
    notifier.send(NOTICE, lambda: sent.append(True))
    await notifier.drain(5.0)
    assert runs.read_text().count("run") == 3
    assert not sent
    messages = [r.getMessage() for r in caplog.records if r.name == "lookupd.users.notify"]
    assert len(messages) == 3
    assert "exit status 75: no MTA here" in messages[0]
    assert "giving up" in messages[-1]


async def test_missing_command_is_logged(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "no-such-sendmail"), "postmaster", retries=0,
                        timeout=5.0)
    notifier.send(NOTICE)
    await notifier.drain(5.0)
    assert any("cannot run" in r.getMessage() for r in caplog.records)


async def test_hanging_command_is_killed_after_its_timeout(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           ) -> None:
    # The sleep is a child of the shell: the whole session must go.
    pidfile = tmp_path / "pid"
    command = script(tmp_path / "hang.sh", f'sleep 30 &\necho $! > "{pidfile}"\nwait\n')
    notifier = Notifier(command, "postmaster", retries=0, timeout=0.3)
    started = time.monotonic()
    notifier.send(NOTICE)
    await notifier.drain(5.0)
    assert time.monotonic() - started < 3
    assert any("no answer within 0.3s" in r.getMessage() for r in caplog.records)
    child = int(pidfile.read_text())
    await asyncio.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


def users_config(tmp_path: Path, command: str, **kw: object) -> UsersConfig:
    return UsersConfig(limit=3, window=3600.0, notify_command=command,
                       notify_to="postmaster@example.org", **kw)  # type: ignore[arg-type]


async def test_block_notifies_in_the_background(tmp_path: Path) -> None:
    """A slow command: the answer that blocks comes back at once, the mail follows."""
    out = tmp_path / "mail.txt"
    # 3s: well above what one answer takes on a loaded machine (its fsync), so the bound
    # below tells "in the background" from "waited for the command".
    command = script(tmp_path / "slow.sh", f'sleep 3\ncat > "{out}"\n')
    state = UserState(users_config(tmp_path, command, notify_timeout=10.0), tmp_path / "state")
    await state.open()
    try:
        for i in range(2):
            assert not (await state.fail("bob", f"gone{i}@example.org")).blocked
        started = time.monotonic()
        result = await state.fail("bob", "gone2@example.org")
        assert result.blocked and result.count == 3
        assert time.monotonic() - started < 2.0
        assert not out.exists()
        for _ in range(200):
            if out.exists() and out.stat().st_size:
                break
            await asyncio.sleep(0.05)
        body = parse(out.read_bytes()).get_content()
        assert "gone2@example.org" in body and "3 invalid recipients" in body
    finally:
        await state.close()


async def test_failing_command_does_not_delay_answers(tmp_path: Path) -> None:
    """A command that fails after 2s, tried three times: no answer waits for it (each one
    takes an fsync, far less than the command, even on a loaded machine)."""
    command = script(tmp_path / "fail.sh", "sleep 2\nexit 1\n")
    state = UserState(users_config(tmp_path, command, notify_retries=2, notify_timeout=10.0),
                      tmp_path / "state", notify_backoff=0.05)
    await state.open()
    took = []
    try:
        for i in range(23):  # carol is blocked at the third: the command starts then
            started = time.monotonic()
            assert (await state.fail("carol")).blocked == (i >= 2)
            assert (await state.fail("dave")).count >= 1
            took.append(time.monotonic() - started)
        assert max(took) < 1.5, took
    finally:
        await state.close()


async def test_unsent_notification_is_sent_after_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "mail.txt"
    failing = script(tmp_path / "fail.sh", "exit 1\n")
    state = UserState(users_config(tmp_path, failing, notify_retries=0), tmp_path / "state")
    await state.open()
    for _ in range(3):
        await state.fail("erin", "x@example.org")
    await state.close()
    assert not out.exists()

    working = script(tmp_path / "capture.sh", f'cat > "{out}"\n')
    state = UserState(users_config(tmp_path, working), tmp_path / "state")
    await state.open()
    try:
        for _ in range(100):
            if out.exists() and out.stat().st_size:
                break
            await asyncio.sleep(0.05)
        assert "erin" in parse(out.read_bytes())["Subject"]
    finally:
        await state.close()
    # Taken: a third start sends nothing.
    out.unlink()
    state = UserState(users_config(tmp_path, working), tmp_path / "state")
    await state.open()
    await asyncio.sleep(0.3)
    await state.close()
    assert not out.exists()
