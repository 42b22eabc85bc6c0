"""The admin's mail about a new block: built here (pure), handed to notify_command in the
background with a bounded time per attempt and a bounded number of retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import logging
import os
import shlex
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from lookupd.users.decide import clean_text, iso_utc, window_text

log = logging.getLogger(__name__)

# Longest piece of the command's output quoted in the log.
_MAX_OUTPUT = 300
# Ceiling for the pause between attempts.
_MAX_BACKOFF = 600.0


@dataclass(frozen=True, slots=True)
class Notice:
    """One new block, as the admin hears of it."""

    user: str
    count: int
    window: float
    since: float
    reason: str
    recipients: tuple[str, ...] = ()


def build_mail(notice: Notice, to: str, hostname: str) -> bytes:
    """The message for `sendmail -t`: LF line ends, non-ASCII encoded (RFC 2047 / MIME).

    The user name was validated (no CR, LF or controls) and EmailMessage refuses a header
    value with a line break, so nothing here can add a header or a recipient.
    """
    msg = EmailMessage(policy=email.policy.default)
    msg["To"] = to
    msg["Subject"] = f"lookupd on {hostname} blocked authenticated user {notice.user}"
    msg["Date"] = formatdate(localtime=True)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    lines = [
        f"lookupd blocked the authenticated user {notice.user} on {hostname}.",
        "",
        f"User:     {notice.user}",
        f"Since:    {iso_utc(notice.since)}",
        f"Reason:   {notice.reason}",
        f"Count:    {notice.count} invalid recipients within {window_text(notice.window)}",
        "",
        "A stolen password sending to a harvested address list looks like this.",
        "Exim freezes the user's mail until you unblock it (see the frozen",
        "messages with `exim -bp`).",
        "",
    ]
    if notice.recipients:
        lines.append("Some of the invalid recipients:")
        lines.extend(f"  {clean_text(r, 320)}" for r in notice.recipients)
        lines.append("")
    lines += [
        "Check the account (change its password), then unblock it with:",
        "",
        f"  lookupd users unblock {notice.user}",
        "",
        f"See its history with: lookupd users history {notice.user}",
    ]
    msg.set_content("\n".join(lines) + "\n")
    return msg.as_bytes()


class Notifier:
    """Runs `command` (shlex-split, no shell) with each mail on stdin, in background tasks."""

    def __init__(self, command: str, to: str, *, retries: int, timeout: float,
                 backoff: float = 5.0) -> None:
        self.argv = shlex.split(command)
        self.to = to
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.hostname = socket.gethostname()  # getfqdn() may wait for DNS
        self._tasks: set[asyncio.Task[bool]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.argv)

    def send(self, notice: Notice, on_sent: Callable[[], None] | None = None) -> None:
        """Start sending; returns at once. `on_sent` runs once the command took the mail."""
        if not self.enabled:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(notice, on_sent),
                                                      name=f"notify {notice.user}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace: float) -> None:
        """Give mails under way `grace` seconds, then give up on them (logged)."""
        if not self._tasks:
            return
        tasks = set(self._tasks)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("users: stopping with %d block notification(s) unsent; they are sent "
                        "again when lookupd starts", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, notice: Notice, on_sent: Callable[[], None] | None) -> bool:
        try:
            mail = build_mail(notice, self.to, self.hostname)
        except (ValueError, TypeError) as exc:
            log.warning("users: cannot build the notification about %s (check users.notify_to "
                        "= %r): %s", notice.user, self.to, exc)
            return False
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            problem = await self._run_once(mail)
            if problem is None:
                if on_sent is not None:
                    on_sent()
                return True
            last = attempt == attempts
            log.warning("users: notification about blocked user %s: %s (attempt %d of %d%s); "
                        "check users.notify_command = %r", notice.user, problem, attempt,
                        attempts, ", giving up" if last else "", shlex.join(self.argv))
            if not last:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF))
        return False

    async def _run_once(self, mail: bytes) -> str | None:
        """None when the command took the mail (exit 0), else what went wrong."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"cannot run {self.argv[0]}: {exc.strerror or exc}"
        try:
            output, _ = await asyncio.wait_for(proc.communicate(mail), self.timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return f"no answer within {self.timeout:g}s, killed"
        except BaseException:
            _kill_group(proc.pid)
            with contextlib.suppress(BaseException):
                await asyncio.shield(proc.wait())
            raise
        if proc.returncode == 0:
            return None
        text = output.decode("utf-8", "replace").strip()
        shown = clean_text(" ".join(text.split()), _MAX_OUTPUT)
        return f"exit status {proc.returncode}" + (f": {shown}" if shown else "")


def _kill_group(pid: int) -> None:
    """The command may have children (sendmail runs exim): kill its whole session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
