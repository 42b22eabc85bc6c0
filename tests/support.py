"""Helpers for tests: free ports, short socket dirs, a real lookupd process, a real Exim."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
MAXMIND = TESTDATA / "maxmind"
FIREWALL = TESTDATA / "firewall"
EXIM = shutil.which("exim4") or shutil.which("exim") or "/usr/sbin/exim4"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(family: int = socket.AF_INET, *, udp: bool = False) -> int:
    """A loopback port nobody uses right now for TCP (and UDP with `udp`: DNS servers listen
    on both), below the kernel's ephemeral range: a port the kernel chose (bind to port 0)
    can be handed to another process's outgoing connection before the test's server binds
    it, a port below that range only to another test picking the same one at random."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    low, high = 10000, max(10001, _ephemeral_low() - 1)
    while True:
        port = random.randint(low, high)
        socks = [socket.socket(family, kind) for kind in kinds]
        try:
            for sock in socks:
                sock.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()


def free_udp_port() -> int:
    return free_port(udp=True)


def short_dir(prefix: str = "lkd") -> Path:
    """A short directory for sockets: AF_UNIX paths must stay under 108 bytes, and pytest's
    tmp_path is often longer. Mode 0755: Exim's -bh runs as Debian-exim and must reach it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def ask(path: Path | str, request: bytes, timeout: float = 5.0, *,
        half_close: bool = True) -> bytes:
    """One request exactly as Exim makes it: connect, write, half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def ask_tcp(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# Sections a test config gets unless it has its own: tests never ask the Internet's DNS
# (the embedded defaults query Spamhaus through the system resolver) and never mail anyone.
TEST_DEFAULTS = {
    "dnsbl": 'list = []\nnameservers = ["127.0.0.1:9"]\n',
    "users": 'notify_command = ""\n',
}


def with_test_defaults(config_text: str) -> str:
    extra = [f"\n[{name}]\n{body}" for name, body in TEST_DEFAULTS.items()
             if f"[{name}]" not in config_text and f"[[{name}." not in config_text]
    return config_text + "".join(extra)


@dataclass
class Lookupd:
    """A real `lookupd serve` process on a short private socket path."""

    workdir: Path
    config_text: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tcp_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "s"

    @property
    def config_path(self) -> Path:
        return self.workdir / "lookupd.toml"

    def start(self, wait: bool = True) -> Lookupd:
        self.config_path.write_text(with_test_defaults(self.config_text))
        (self.workdir / "state").mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "lookupd", "serve", "--config", str(self.config_path),
               "--socket", str(self.socket), "--state-dir", str(self.workdir / "state"),
               *self.args]
        if self.tcp_port is not None:
            cmd += ["--tcp", f"127.0.0.1:{self.tcp_port}"]
        self.log_path = self.workdir / "lookupd.log"
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"lookupd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if ask(self.socket, b"ping", 1.0) == b"pong":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"lookupd did not answer ping within {timeout}s:\n{self.log()}")

    def query(self, request: str | bytes, timeout: float = 5.0) -> str:
        data = request.encode() if isinstance(request, str) else request
        return ask(self.socket, data, timeout).decode("ascii", "replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"lookupd did not stop on SIGTERM:\n{self.log()}") from None


def stop_all(daemons: Iterable[Lookupd], *, remove: bool = False) -> None:
    """Stop every daemon, even when one does not stop (its error is raised once the others
    are stopped): one left running fails a later test with its unreaped process. `remove`
    also deletes each one's workdir."""
    errors: list[AssertionError] = []
    for daemon in daemons:
        try:
            daemon.stop()
        except AssertionError as exc:
            errors.append(exc)
        if remove:
            shutil.rmtree(daemon.workdir, ignore_errors=True)
    if errors:
        raise errors[0]


@dataclass
class Exim:
    """A real Exim driven with -C (a config of the test's own), -be and -bh. No MTA runs."""

    workdir: Path
    config_text: str

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "exim.conf"
        for sub in ("spool", "log"):
            (self.workdir / sub).mkdir(exist_ok=True)
            os.chmod(self.workdir / sub, 0o777)
        self.write(self.config_text)

    def write(self, text: str) -> None:
        # As root, Exim trusts only a config owned by root and not world-writable.
        self.config.write_text(text)
        os.chmod(self.config, 0o644)

    def _cmd(self, *args: str, defines: Iterable[str] = ()) -> list[str]:
        return [EXIM, "-C", str(self.config), *(f"-D{d}" for d in defines), *args]

    def be(self, expression: str, defines: Iterable[str] = (), timeout: float = 20) -> str:
        """`exim -be`: the expansion's result, or `Failed: ...` (exit code is 0 either
        way, see exim-readsocket.md section 7). The expression goes on stdin, where Exim
        takes lines of any length (arguments are limited to 256 bytes)."""
        if "\n" in expression:
            raise ValueError("one expression per call, without a newline")
        out = subprocess.run(self._cmd("-be", defines=defines),
                             input=_continued(expression).encode() + b"\n",
                             capture_output=True, timeout=timeout, check=False)
        text = out.stdout.decode(errors="replace")
        # In stdin mode Exim prompts with "> " and echoes nothing else.
        return text.removeprefix("> ").rstrip("\n").removesuffix("> ").rstrip("\n")

    def bh(self, ip: str, smtp: str, defines: Iterable[str] = (), extra: Iterable[str] = (),
           timeout: float = 30) -> tuple[str, str]:
        """`exim -bh IP`: a fake SMTP session from IP; returns (stdout, stderr log lines)."""
        out = subprocess.run(self._cmd(*extra, "-bh", ip, defines=defines),
                             input=smtp.replace("\n", "\r\n").encode(), capture_output=True,
                             timeout=timeout, check=False)
        return out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def _continued(expression: str, width: int = 500) -> str:
    """Exim's -be reads stdin in lines of about 1 kB; longer expressions go on continuation
    lines (a trailing backslash; Exim strips the next line's leading blanks, so never split
    before a blank)."""
    pieces, start = [], 0
    while len(expression) - start > width:
        cut = start + width
        while cut < len(expression) and expression[cut] in " \t":
            cut += 1
        pieces.append(expression[start:cut])
        start = cut
    pieces.append(expression[start:])
    return "\\\n".join(pieces)


EXIM_BASE = """\
primary_hostname = test.example
spool_directory = {workdir}/spool
log_file_path = {workdir}/log/%slog
keep_environment =
"""
