"""A real redis-server (and redis-sentinel) for tests: loopback, a free port, a temp dir,
a password, never the system service. Optionally on a Unix socket instead of TCP, or with a
TLS port beside the plain one (a throwaway CA and certificates made with openssl)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import Lookupd, free_port, short_dir, stop_all

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
PASSWORD = "t3st-redis-secret-Zq9"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def tls_problem() -> str | None:
    """Why a TLS Redis cannot be tested here (None when it can)."""
    if not Path(OPENSSL).exists():
        return "needs the openssl command to make test certificates (apt-get install openssl)"
    # Debian builds redis-server with BUILD_TLS=yes, linked to libssl; a build without it
    # refuses tls-port at start ("TLS is not supported").
    out = subprocess.run(["ldd", REDIS_SERVER], capture_output=True, text=True, check=False)
    if "libssl" not in out.stdout:
        return f"{REDIS_SERVER} was built without TLS (not linked to libssl)"
    return None


def make_tls_files(workdir: Path, name: str = "test") -> TlsFiles:
    """A CA and two certificates signed by it, with openssl (EC keys: fast to make)."""
    workdir.mkdir(parents=True, exist_ok=True)
    d = workdir

    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", f"/CN=lookupd {name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                "extendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{who}.ext").write_text(ext + "\n")
        openssl("req", "-new", *ec, "-keyout", str(d / f"{who}.key"),
                "-out", str(d / f"{who}.csr"), "-subj", f"/CN=lookupd test {who}")
        openssl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{who}.ext"), "-out", str(d / f"{who}.pem"))
        (d / f"{who}.key").chmod(0o600)
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                    d / "client.key")


@dataclass
class RedisServer:
    workdir: Path
    password: str = PASSWORD
    port: int = field(default_factory=free_port)
    extra: str = ""
    # Listen on this Unix socket only (no TCP port).
    unixsocket: Path | None = None
    # A TLS port beside the plain one, with these files (clients must show a certificate).
    tls: TlsFiles | None = None
    tls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.unixsocket is not None:
            return f"unix://{self.unixsocket}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        listen = f"bind 127.0.0.1\nport {self.port}\n"
        if self.unixsocket is not None:
            listen = f"port 0\nunixsocket {self.unixsocket}\nunixsocketperm 700\n"
        if self.tls is not None:
            listen += (f"tls-port {self.tls_port}\ntls-cert-file {self.tls.server_cert}\n"
                       f"tls-key-file {self.tls.server_key}\n"
                       f"tls-ca-cert-file {self.tls.ca}\ntls-auth-clients yes\n")
        # AOF with Redis' default everysec, as the README advises: a restart (SIGTERM, which
        # writes the AOF out) keeps everything acknowledged, and no write waits for the disk
        # (under `always`, a busy test machine's fsync outlasted lookupd's 300 ms timeout).
        # save "" keeps the RDB snapshots out of the test's way.
        conf.write_text(f"{listen}dir {self.workdir}\n"
                        f"requirepass {self.password}\nappendonly yes\nappendfsync everysec\n"
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
            with self._connect() as s:
                s.sendall(_resp("AUTH", self.password) + _resp(*args))
                f = s.makefile("rb")
                _read(f)
                return _read(f)
        except OSError:
            return ""

    def _connect(self) -> socket.socket:
        if self.unixsocket is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(str(self.unixsocket))
            except OSError:
                s.close()
                raise
            return s
        return socket.create_connection(("127.0.0.1", self.port), timeout=2)

    def tls_cli(self, *args: str) -> Any:
        """One command over the TLS port, as a client with the test CA's certificate."""
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        with socket.create_connection(("127.0.0.1", self.tls_port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(_resp("AUTH", self.password) + _resp(*args))
            f = s.makefile("rb")
            _read(f)
            return _read(f)

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


@contextlib.contextmanager
def cluster_hosts(redis: RedisServer, names: str, extra: str = "",
                  timeout: str = "2s") -> Iterator[list[Lookupd]]:
    """One `lookupd serve` per name in `names`, each with `extra` configuration and a
    [cluster] on `redis` (its password in a file), connected to it; stopped afterwards."""
    password_file = redis.workdir / "lookupd.pw"
    password_file.write_text(PASSWORD)
    hosts: list[Lookupd] = []
    try:
        for name in names:
            hosts.append(Lookupd(short_dir(), (
                f'{extra}[cluster]\nredis = "{redis.url}"\npassword_file = "{password_file}"\n'
                f'host_name = "{name}"\ntimeout = "{timeout}"\n')).start())
        deadline = time.monotonic() + 10
        for daemon in hosts:
            while "sharing state through Redis" not in daemon.log():
                assert time.monotonic() < deadline, f"{daemon.workdir} did not reach Redis"
                time.sleep(0.01)
        yield hosts
    finally:
        stop_all(hosts, remove=True)
