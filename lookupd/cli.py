"""Command line: serve | query | check-config (and users). The only place that exits or sets up
logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookupd import __version__
from lookupd.cluster import client_problem
from lookupd.config import (
    Config,
    HostPort,
    fallback_config,
    file_problems,
    load_config,
    parse_host_port,
)
from lookupd.errors import ConfigError, ListenError, LookupdError
from lookupd.protocol import VERBS

log = logging.getLogger("lookupd")

# `serve` flags that override a config key: flag dest -> "section.key".
SERVE_OVERRIDES = {
    "socket": "server.socket",
    "tcp": "server.tcp",
    "geoip_db": "geoip.country_db",
    "asn_db": "geoip.asn_db",
    "firewall_db": "incidents.db",
    "state_dir": "server.state_dir",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookupd",
        description="Answers Exim ${readsocket} lookups: GeoIP country, firewall incidents, "
                    "DNSBL verdicts, authenticated-user block state.")
    parser.add_argument("--version", action="version", version=f"lookupd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, metavar="FILE",
                       help="configuration file (default /etc/lookupd/lookupd.toml; without "
                            "it lookupd runs on embedded defaults)")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    config_arg(serve)
    serve.add_argument("--socket", metavar="PATH",
                       help='Unix socket to listen on ("" for none)')
    serve.add_argument("--tcp", metavar="HOST:PORT", help="also listen on loopback TCP")
    serve.add_argument("--geoip-db", metavar="PATH", help="country (or city) .mmdb file")
    serve.add_argument("--asn-db", metavar="PATH", help="ASN .mmdb file")
    serve.add_argument("--firewall-db", metavar="PATH",
                       help="nftfw firewall.db or Sympl firewall-blacklist-count.db")
    serve.add_argument("--state-dir", metavar="DIR", help="where lookupd keeps its state")
    serve.add_argument("--debug", action="store_true", help="log every request")

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    config_arg(check)

    verbs = "\n".join(f"  {usage:<28} {what}" for usage, what in VERBS.values())
    query = sub.add_parser("query", help="ask the running daemon, as Exim does",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"verbs:\n{verbs}\n\nexample: lookupd query country "
                                  "81.2.69.142")
    config_arg(query)
    where = query.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, metavar="PATH",
                       help="Unix socket (default: server.socket of the config)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="loopback TCP listener")
    where.add_argument("--local", action="store_true",
                       help="answer in this process from the configured sources, no daemon")
    query.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    # Not argparse choices: the daemon answers an unknown verb itself (it may be newer).
    query.add_argument("verb", metavar="VERB", help="one of the verbs below")
    query.add_argument("args", nargs="*", metavar="ARG")

    reload = sub.add_parser(
        "reload", help="make the running daemon reload its configuration, and say whether "
                       "it was taken (exit status 78 when it was refused)")
    config_arg(reload)
    reload.add_argument("--socket", type=Path, metavar="PATH",
                        help="Unix socket (default: server.socket of the config)")
    reload.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    status = sub.add_parser(
        "status", help="what the running daemon is doing; exit status 0 ok, 1 degraded, "
                       "2 critical or not answering (usable as a monitoring check)")
    config_arg(status)
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, metavar="PATH",
                       help="Unix socket (default: server.socket of the config)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="loopback TCP listener")
    status.add_argument("--json", action="store_true", help="the daemon's JSON, as it is")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    try:
        from lookupd.users.cli import add_users_parser
    except ImportError:  # pragma: no cover - the users module is part of the package
        return
    add_users_parser(sub)
    from lookupd.snippets_install import add_snippets_parser
    add_snippets_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(debug=getattr(args, "debug", False))
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "query":
            return cmd_query(args)
        if args.command == "reload":
            return cmd_reload(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "snippets":
            from lookupd.snippets_install import run_snippets
            return run_snippets(args)
        if args.command == "users":
            from lookupd.users.cli import run_users
            return run_users(args, load_config(args.config))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return os.EX_CONFIG
    except ListenError as exc:
        log.error("cannot start: %s", exc)
        return os.EX_UNAVAILABLE
    except LookupdError as exc:
        log.error("%s", exc)
        return os.EX_SOFTWARE
    except KeyboardInterrupt:
        return 130
    return os.EX_USAGE  # pragma: no cover - argparse requires a command


# --- logging ---------------------------------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Under journald: `<priority>` prefixes (sd-daemon(3)) and no timestamps."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(debug: bool = False, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level.upper())


# --- serve / check-config ----------------------------------------------------------------------


def _serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {key: getattr(args, dest) for dest, key in SERVE_OVERRIDES.items()
            if getattr(args, dest, None) is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = _serve_overrides(args)

    def reload() -> Config:
        return load_config(args.config, overrides=overrides)

    problem = ""
    try:
        config = reload()
    except ConfigError as exc:
        # Exiting would leave Exim a socket that refuses (systemd gives up restarting, the
        # socket unit fails), which is what loses mail (Exim's stale-descriptor bug). Listen
        # and answer fail-open instead, loudly, until a reload brings a good configuration.
        problem = str(exc)
        config = fallback_config(args.config, overrides)
    if not args.debug:
        setup_logging(level=config.server.log_level)
    if config.source is None and not problem:
        log.info("no configuration file (%s): running on embedded defaults",
                 args.config or "/etc/lookupd/lookupd.toml")
    from lookupd.server import run
    _run_loop(run(config, reload_config=reload, problem=problem))
    return os.EX_OK


def _run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        asyncio.run(coro)
        return
    if hasattr(uvloop, "run"):
        uvloop.run(coro)
        return
    # uvloop < 0.18 (Debian 12 has 0.17) has no run(): the same loop through asyncio.run.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every check `serve` makes of the file, every problem at once, each naming its key."""
    try:
        config = load_config(args.config, required=args.config is not None)
    except ConfigError as exc:
        problems = exc.problems
    else:
        problems = file_problems(config)
        if config.cluster.enabled and (missing := client_problem()) is not None:
            problems.append(f"{config.source or 'embedded defaults'}: {missing}")
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("%d problem(s); lookupd would answer fail-open (nothing checked) with this "
                  "file at start, and a reload would keep the running configuration",
                  len(problems))
        return os.EX_CONFIG
    where = config.source or "embedded defaults (no /etc/lookupd/lookupd.toml)"
    print(f"{where}: configuration OK")
    return os.EX_OK


# --- query ---------------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace) -> int:
    request = " ".join([args.verb, *args.args])
    if args.local:
        config = load_config(args.config)
        started = time.perf_counter()
        reply = asyncio.run(_local_answer(config, request))
        return _print_answer(reply, time.perf_counter() - started, "in-process")
    try:
        target = _target(args)
    except ValueError as exc:
        log.error("%s", exc)
        return os.EX_USAGE
    if target is None:
        log.error("the configuration sets neither server.socket nor server.tcp")
        return os.EX_CONFIG
    started = time.perf_counter()
    try:
        reply = ask(target, request.encode("ascii", "replace"), args.timeout)
    except TimeoutError:
        log.error("lookupd at %s did not answer within %.1fs: is it overloaded or stuck? "
                  "see journalctl -u lookupd", target, args.timeout)
        return os.EX_TEMPFAIL
    except OSError as exc:
        log.error("lookupd is not answering on %s (%s): start it with "
                  "'systemctl start lookupd.socket' or 'lookupd serve'", target,
                  exc.strerror or exc)
        return os.EX_UNAVAILABLE
    return _print_answer(reply, time.perf_counter() - started, str(target))


def _target(args: argparse.Namespace) -> Path | HostPort | None:
    """Where the running daemon listens: --tcp, --socket, or the configuration's."""
    if getattr(args, "tcp", None):
        try:
            hp = parse_host_port(args.tcp)
        except ValueError as exc:
            raise ValueError(f"--tcp: {exc}") from None
        return hp
    if args.socket:
        return Path(args.socket)
    config = load_config(args.config)
    return config.server.socket or config.server.tcp


def cmd_reload(args: argparse.Namespace) -> int:
    target = _target(args)
    if target is None:
        log.error("the configuration sets no server.socket: reload with "
                  "'systemctl reload lookupd' or 'kill -HUP PID'")
        return os.EX_CONFIG
    try:
        reply = ask(target, b"reload", args.timeout)
    except TimeoutError:
        log.error("lookupd at %s did not finish the reload within %.0fs; see journalctl -u "
                  "lookupd", target, args.timeout)
        return os.EX_TEMPFAIL
    except OSError as exc:
        log.error("lookupd is not answering on %s (%s)", target, exc.strerror or exc)
        return os.EX_UNAVAILABLE
    if reply.startswith("ok"):
        print(f"lookupd at {target}: configuration reloaded")
        return os.EX_OK
    log.error("lookupd at %s: %s", target, reply.removeprefix("error "))
    return os.EX_NOPERM if reply == "error not permitted" else os.EX_CONFIG


# Monitoring plugin exit statuses (ok, warning, critical), as check_* commands use them.
STATUS_EXIT = {"ok": 0, "warning": 1, "critical": 2}


def cmd_status(args: argparse.Namespace) -> int:
    from lookupd.status import render_text

    try:
        target = _target(args)
    except ValueError as exc:
        log.error("%s", exc)
        return os.EX_USAGE
    if target is None:
        print("CRITICAL: the configuration sets neither server.socket nor server.tcp")
        return STATUS_EXIT["critical"]
    try:
        reply = ask(target, b"status", args.timeout)
        state = json.loads(reply)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"CRITICAL: lookupd is not answering on {target} ({why}): Exim's lookups fail "
              "open. Start it: systemctl start lookupd.socket")
        return STATUS_EXIT["critical"]
    print(reply if args.json else render_text(state))
    return STATUS_EXIT.get(state.get("level"), STATUS_EXIT["critical"])


def ask(target: Path | HostPort, request: bytes, timeout: float) -> str:
    """One lookup exactly as Exim makes it: connect, write, half-close, read until EOF."""
    if isinstance(target, HostPort):
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
    with sock:
        if not isinstance(target, HostPort):
            sock.connect(str(target))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("ascii", "replace")


async def _local_answer(config: Config, request: str) -> str:
    from lookupd.dispatch import Dispatcher
    from lookupd.errors import BadRequest
    from lookupd.protocol import Peer, parse_request
    from lookupd.sources import Sources

    try:
        parsed = parse_request(request.encode("ascii", "replace"))
    except BadRequest as exc:
        return str(exc)
    sources = Sources.from_config(config)
    await sources.open()
    try:
        reply = Dispatcher(sources).handle(parsed, Peer("unix", os.getuid(), os.getgid(),
                                                        os.getpid()))
        return reply if isinstance(reply, str) else await reply
    finally:
        await sources.close()


def _print_answer(reply: str, seconds: float, where: str) -> int:
    print(reply)
    print(f"({seconds * 1000:.2f} ms, {where})", file=sys.stderr)
    return os.EX_DATAERR if reply.startswith("error ") else os.EX_OK
