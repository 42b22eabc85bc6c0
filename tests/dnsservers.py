"""Real DNS servers for the DNSBL tests, started on loopback on free ports in a temp dir.

- `Rbldnsd`: the DNSBL zones of tests/data/dnsbl, with its query log (`-l`) to count packets.
- `Knot`: an authoritative server (knotd) for PTR/A/AAAA; a zone whose file is missing
  answers SERVFAIL, a zone it does not serve answers REFUSED.
- `SilentServer`: a bound UDP socket that never reads: the timeout path.
- `Dnsmasq`: a forwarder without cache that routes each zone to one of the above, the way a
  local resolver sits in front of the lists in production; `--log-queries` counts packets.
- `DelayProxy`: forwards to a real server after a fixed delay (cold-latency measurements).
- `DnsLab`: all of them wired together (see ROUTES).

Plain synchronous code: usable from pytest fixtures of any scope and from bench/.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
from support import free_udp_port

ZONES_DIR = Path(__file__).resolve().parent / "data" / "dnsbl"
RBLDNSD = shutil.which("rbldnsd") or "/usr/sbin/rbldnsd"
KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"

# A made-up Spamhaus DQS key (26 lower-case letters and digits, like a real one).
DQS_KEY = "lkdtestkey0123456789abcdef"

# rbldnsd zone specs: zone, dataset type, file (a zone given several times combines them).
RBL_ZONES: tuple[tuple[str, str, str], ...] = (
    ("bl.test", "ip4set", "bl-sbl.zone"),
    ("bl.test", "ip4set", "bl-pbl.zone"),
    ("bl.test", "ip6trie", "bl-v6.zone"),
    ("cop.test", "ip4set", "cop.zone"),
    ("mask.test", "ip4set", "mask.zone"),
    ("everything.test", "ip4trie", "everything.zone"),
    ("everything.test", "ip6trie", "everything-v6.zone"),
    ("dbl.test", "dnset", "dbl.zone"),
    # Spamhaus DQS: what lookupd asks for zen.spamhaus.org / dbl.spamhaus.org with DQS_KEY.
    (f"{DQS_KEY}.zen.dq.spamhaus.net", "ip4set", "dqs.zone"),
    (f"{DQS_KEY}.dbl.dq.spamhaus.net", "dnset", "dbl.zone"),
)

# Knot's zones: reverse DNS for 192.0.2.0/24 and 2001:db8::/32, and the forward names.
KNOT_ZONES: dict[str, str] = {
    "2.0.192.in-addr.arpa": """
$TTL 300
@ SOA ns.example.test. hostmaster.example.test. 1 600 60 3600 60
@ NS ns.example.test.
1 PTR mail.example.test.          ; forward-confirmed
2 PTR liar.example.test.          ; A points elsewhere
3 PTR nowhere.example.test.       ; name does not exist
5 PTR host.slow.test.             ; forward lookup times out
6 PTR host.broken.test.           ; forward lookup gets SERVFAIL
7 PTR other.example.test.         ; two names, the second one confirms
7 PTR mail7.example.test.
""",
    "8.b.d.0.1.0.0.2.ip6.arpa": """
$TTL 300
@ SOA ns.example.test. hostmaster.example.test. 1 600 60 3600 60
@ NS ns.example.test.
5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 PTR mail6.example.test.
""",
    "example.test": """
$TTL 300
@ SOA ns.example.test. hostmaster.example.test. 1 600 60 3600 60
@ NS ns.example.test.
ns A 127.0.0.1
mail A 192.0.2.1
liar A 198.51.100.7
other A 198.51.100.8
mail7 A 192.0.2.7
mail6 AAAA 2001:db8::25
""",
}
# Served by knot with a missing zone file: every query gets SERVFAIL. 202.2.0.192.bl.test
# makes one client address of the healthy bl.test list fail (routed there by DnsLab).
KNOT_BROKEN = ("broken.test", "202.2.0.192.bl.test")


def start_on_a_free_port(start: Callable[[], None], attempts: int = 3) -> None:
    """`start` (which picks a free port itself) again when another process took the port
    between the choice and the bind: tests run in parallel on one machine."""
    for attempt in range(attempts):
        try:
            start()
            return
        except RuntimeError as exc:
            if "in use" not in str(exc) or attempt == attempts - 1:
                raise


def wait_for_dns(port: int, qname: str, proc: subprocess.Popen[bytes] | None = None,
                 output: Path | None = None, timeout: float = 10.0) -> None:
    """Until a server on 127.0.0.1:port answers anything to `qname` SOA."""
    query = dns.message.make_query(qname, "SOA")
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        if proc is not None and proc.poll() is not None:
            text = output.read_text(errors="replace") if output else ""
            raise RuntimeError(f"DNS server on port {port} exited ({proc.returncode}): {text}")
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"no DNS server answered on 127.0.0.1:{port} within {timeout}s")


def ask(port: int, qname: str, rdtype: str = "A") -> dns.message.Message:
    """One direct UDP query (for checking the servers themselves)."""
    return dns.query.udp(dns.message.make_query(qname, rdtype), "127.0.0.1", port=port,
                         timeout=2.0)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Rbldnsd:
    """rbldnsd in the foreground (-n) serving RBL_ZONES, logging every query unbuffered.

    rbldnsd refuses to run as root: as root it gets `-u rbldns` (or nobody) and a chroot
    (-r) into its own world-readable directory, since pytest's tmp dirs are private.
    """

    workdir: Path
    zones: tuple[tuple[str, str, str], ...] = RBL_ZONES
    source_dir: Path = ZONES_DIR
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "queries.log"

    def zone_file(self, name: str) -> Path:
        """Where the running rbldnsd reads `name` from (rewrite it, then `reload()`)."""
        return self.workdir / name

    def reload(self) -> None:
        """SIGHUP: rbldnsd re-reads changed zone files (automatic checks are off, -c 0)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def start(self) -> Rbldnsd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        for _, _, name in self.zones:
            target = self.workdir / name
            shutil.copyfile(self.source_dir / name, target)
            target.chmod(0o644)
        self.log_path.touch()
        args = [RBLDNSD, "-n", "-t", "120", "-c", "0", "-a"]
        if os.geteuid() == 0:
            user = _first_user("rbldns", "nobody")
            os.chown(self.log_path, pwd.getpwnam(user).pw_uid, -1)
            args += ["-u", user, "-r", str(self.workdir), "-w", "/"]
        else:
            args += ["-w", str(self.workdir)]
        # A port set before start (or by an earlier start) is kept: a restart on the same
        # address, as a list server back from an outage.
        self.port = self.port or free_udp_port()
        args += ["-b", f"127.0.0.1/{self.port}", "-l", "+queries.log"]
        args += [f"{zone}:{kind}:{name}" for zone, kind, name in self.zones]
        out = self.workdir / "rbldnsd.out"
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        wait_for_dns(self.port, self.zones[0][0], self.proc, out)
        return self

    def queries(self, qname: str | None = None, qtype: str | None = None) -> list[str]:
        """Logged queries (`ts client qname qtype IN: RCODE/...`), optionally filtered."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        found = []
        for line in lines:
            parts = line.split()
            if len(parts) < 4:
                continue
            if qname is not None and parts[2].lower().rstrip(".") != qname.lower().rstrip("."):
                continue
            if qtype is not None and parts[3] != qtype:
                continue
            found.append(line)
        return found

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _first_user(*names: str) -> str:
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError(f"none of the users {names} exists to run rbldnsd as")


@dataclass
class Knot:
    """knotd in the foreground with KNOT_ZONES (and KNOT_BROKEN answering SERVFAIL)."""

    workdir: Path
    zones: dict[str, str] = field(default_factory=lambda: dict(KNOT_ZONES))
    broken: tuple[str, ...] = KNOT_BROKEN
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Knot:
        start_on_a_free_port(self._start)
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        self.port = free_udp_port()
        zone_conf = []
        for name, text in self.zones.items():
            (self.workdir / f"{name}.zone").write_text(text.lstrip())
            zone_conf.append(f"  - domain: {name}\n    file: {name}.zone\n")
        for name in self.broken:
            zone_conf.append(f"  - domain: {name}\n    file: {name}.missing\n")
        conf = self.workdir / "knot.conf"
        conf.write_text(f"""\
server:
    rundir: "{self.workdir}"
    listen: 127.0.0.1@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "{self.workdir / 'db'}"
control:
    listen: "{self.workdir / 'knot.sock'}"
template:
  - id: default
    storage: "{self.workdir}"
    semantic-checks: off
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
{''.join(zone_conf)}""")
        out = self.workdir / "knotd.out"
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen([KNOTD, "-c", str(conf)], stdout=fh,
                                         stderr=subprocess.STDOUT)
        first = next(iter(self.zones))
        wait_for_dns(self.port, first, self.proc, out)
        # Zones load just after the socket opens: wait until the first one answers NOERROR.
        limit = time.monotonic() + 10
        while ask(self.port, first, "SOA").rcode() != dns.rcode.NOERROR:
            if time.monotonic() > limit:
                raise RuntimeError(f"knotd did not load {first}: {out.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class SilentServer:
    """A UDP socket bound on loopback that never reads: every query to it times out."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.sock.close()


@dataclass
class Dnsmasq:
    """dnsmasq as a cache-less forwarder: `routes` maps a domain to 127.0.0.1 ports.

    Names under no route get REFUSED (no upstream). Every query is logged (--log-queries).
    """

    workdir: Path
    routes: dict[str, int]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "dnsmasq.log"

    def start(self) -> Dnsmasq:
        start_on_a_free_port(self._start)
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        args = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--no-poll", f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--cache-size=0", f"--user={getpass.getuser()}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--log-queries",
                f"--log-facility={self.log_path}"]
        args += [f"--server=/{domain}/127.0.0.1#{port}" for domain, port in self.routes.items()]
        out = self.workdir / "dnsmasq.out"
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        wait_for_dns(self.port, "example.test", self.proc, out)

    def queries(self, qtype: str, qname: str) -> list[str]:
        """Logged client queries like `query[PTR] 1.2.0.192.in-addr.arpa from 127.0.0.1`."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        wanted = f"query[{qtype}] {qname} from"
        return [line for line in text.splitlines() if wanted in line]

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class DelayProxy:
    """Forwards each UDP query to 127.0.0.1:upstream after `delay` seconds (one thread per
    packet): a list server far away, for cold-latency measurements. `port` 0: a free one
    (53 in a private network namespace serves resolvers that know no other, like Exim's)."""

    def __init__(self, upstream: int, delay: float, port: int = 0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._relay, args=(data, client), daemon=True).start()

    def _relay(self, data: bytes, client: tuple[str, int]) -> None:
        time.sleep(self.delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(2.0)
            try:
                up.sendto(data, ("127.0.0.1", self.upstream))
                reply = up.recv(4096)
                self.sock.sendto(reply, client)
            except OSError:
                return

    def stop(self) -> None:
        self.sock.close()


@dataclass
class DnsLab:
    """rbldnsd + knot + a silent server behind one dnsmasq forwarder.

    Through `resolver_port`: bl.test, cop.test, mask.test, everything.test, dbl.test and
    dq.spamhaus.net -> rbldnsd; example.test, the reverse zones, broken.test (SERVFAIL) ->
    knot; refused.test -> knot, which does not serve it (REFUSED); slow.test and
    100.51.198.in-addr.arpa -> the silent server (timeout). Single names of bl.test fail
    while the list stays healthy: 192.0.2.201 times out, .202 gets SERVFAIL, .203 REFUSED.
    """

    rbldnsd: Rbldnsd
    knot: Knot
    silent: SilentServer
    dnsmasq: Dnsmasq

    @property
    def resolver_port(self) -> int:
        return self.dnsmasq.port


@contextmanager
def dns_lab(workdir: Path) -> Iterator[DnsLab]:
    with ExitStack() as stack:
        rbl = Rbldnsd(workdir / "rbldnsd")
        stack.callback(rbl.stop)
        rbl.start()
        knot = Knot(workdir / "knot")
        stack.callback(knot.stop)
        knot.start()
        silent = SilentServer()
        stack.callback(silent.stop)
        routes = {zone: rbl.port for zone in ("bl.test", "cop.test", "mask.test",
                                              "everything.test", "dbl.test",
                                              "dq.spamhaus.net")}
        routes |= {zone: knot.port for zone in (*knot.zones, *knot.broken, "refused.test",
                                                "203.2.0.192.bl.test")}
        routes |= {zone: silent.port for zone in ("slow.test", "100.51.198.in-addr.arpa",
                                                  "201.2.0.192.bl.test")}
        forwarder = Dnsmasq(workdir / "dnsmasq", routes)
        stack.callback(forwarder.stop)
        forwarder.start()
        yield DnsLab(rbl, knot, silent, forwarder)
