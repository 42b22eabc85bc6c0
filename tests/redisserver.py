"""A real redis-server (and redis-sentinel) for tests: loopback, a free port, a temp dir,
a password, never the system service."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
PASSWORD = "t3st-redis-secret-Zq9"


@dataclass
class RedisServer:
    workdir: Path
    password: str = PASSWORD
    port: int = field(default_factory=free_port)
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        # appendfsync always: a restart keeps everything acknowledged (like a real setup with
        # AOF); save "" keeps the RDB snapshots out of the test's way.
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {self.workdir}\n"
                        f"requirepass {self.password}\nappendonly yes\nappendfsync always\n"
                        f'save ""\ndaemonize no\nlogfile {self.workdir}/redis.log\n'
                        f"{self.extra}")
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("PING") == "PONG":
                return self
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not start:\n{self.log()}")

    def cli(self, *args: str) -> Any:
        """One command over a raw socket (RESP), so the test needs no client library."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(_resp("AUTH", self.password) + _resp(*args))
                f = s.makefile("rb")
                _read(f)
                return _read(f)
        except OSError:
            return ""

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    return b"".join(out)


def _read(f: object) -> object:
    line = f.readline().rstrip(b"\r\n")  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:].decode()
    if kind in (b"+", b"-"):
        return rest
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)  # type: ignore[attr-defined]
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return [_read(f) for _ in range(max(n, 0))]
    raise AssertionError(f"unexpected RESP {line!r}")


@dataclass
class RedisSentinel:
    """One redis-sentinel watching `primary` as service "mymaster" (quorum 1: a single
    sentinel may fail over, fine for a test)."""

    workdir: Path
    primary_port: int
    password: str = PASSWORD
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisSentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites it: must be writable
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {self.workdir}\n"
                        f"logfile {self.workdir}/sentinel.log\n"
                        f"sentinel monitor mymaster 127.0.0.1 {self.primary_port} 1\n"
                        f"sentinel auth-pass mymaster {self.password}\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 10000\n")
        self.proc = subprocess.Popen([REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.primary() == self.primary_port:
                return self
            time.sleep(0.05)
        raise AssertionError("redis-sentinel did not start")

    def primary(self) -> int | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(_resp("SENTINEL", "get-master-addr-by-name", "mymaster"))
                reply = _read(s.makefile("rb"))
        except OSError:
            return None
        return int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else None

    def log(self) -> str:
        path = self.workdir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
