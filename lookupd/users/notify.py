"""The admin's mail about a new block: built here (pure), handed to notify_command in the
background with a bounded time per attempt and a bounded number of retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import os
import shlex
import shutil
import signal
import smtplib
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from lookupd.config import HostPort
from lookupd.users.decide import clean_text, command, iso_utc, window_text

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
    # Each command on a line of its own, the name shell-quoted: it is the client's text.
    lines += [
        "Check the account (change its password), then unblock it with:",
        "",
        f"  {command('unblock', notice.user)}",
        "",
        "See its history with:",
        "",
        f"  {command('history', notice.user)}",
    ]
    msg.set_content("\n".join(lines) + "\n")
    return msg.as_bytes()


class Notifier:
    """Runs `command` (shlex-split, no shell) with each mail on stdin, in background tasks."""

    def __init__(self, command: str, to: str, *, retries: int, timeout: float,
                 backoff: float = 5.0, smtp: HostPort | None = None) -> None:
        self.argv = shlex.split(command)
        self.smtp = smtp
        self.to = to
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.hostname = socket.gethostname()  # getfqdn() may wait for DNS
        self._tasks: set[asyncio.Task[bool]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.argv) or self.smtp is not None

    @property
    def how(self) -> str:
        """The delivery path, for log lines: what the admin would check."""
        if self.smtp is not None:
            return f"users.notify_smtp = {str(self.smtp)!r}"
        return f"users.notify_command = {shlex.join(self.argv)!r}"

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
                        "check %s", notice.user, problem, attempt,
                        attempts, ", giving up" if last else "", self.how)
            if not last:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF))
        return False

    async def _run_once(self, mail: bytes) -> str | None:
        """None when the command (or the SMTP server) took the mail, else what went wrong."""
        if self.smtp is not None:
            return await asyncio.to_thread(self._smtp_once, mail, self.smtp)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"cannot run {self.argv[0]}: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(self.timeout):
                output, _ = await proc.communicate(mail)
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


    def _smtp_once(self, mail: bytes, server: HostPort) -> str | None:
        """Hand the mail to the local MTA by SMTP; the null sender, as for any automatic
        notice (RFC 3834), and a bare local part qualified with this host's name."""
        to = self.to if "@" in self.to else f"{self.to}@{self.hostname}"
        message = email.message_from_bytes(mail, policy=email.policy.SMTP)
        if "From" not in message:
            message["From"] = f"lookupd@{self.hostname}"
        try:
            with smtplib.SMTP(server.host, server.port, timeout=self.timeout,
                              local_hostname=self.hostname) as smtp:
                smtp.send_message(message, from_addr="", to_addrs=[to])
        except (OSError, smtplib.SMTPException) as exc:
            return f"SMTP to {server}: {exc}"
        return None


def setuid_is_blocked(argv: list[str]) -> bool:
    """True when argv[0] is a setuid program (Exim's sendmail is) but this process runs with
    no_new_privs (systemd NoNewPrivileges=), so the program would run without its privileges
    and fail to queue the mail."""
    if not argv:
        return False
    path = shutil.which(argv[0])
    if path is None:
        return False
    try:
        setuid = bool(os.stat(os.path.realpath(path)).st_mode & stat.S_ISUID)
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            no_new_privs = any(line.split() == ["NoNewPrivs:", "1"] for line in status)
    except OSError:
        return False
    return setuid and no_new_privs


def _kill_group(pid: int) -> None:
    """The command may have children (sendmail runs exim): kill its whole session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
