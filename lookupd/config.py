"""lookupd's one configuration: frozen, typed dataclasses loaded from TOML and fully validated.

Defaults live only in the dataclass fields below. `load_config()` rejects unknown keys, wrong
types and out-of-range values, naming the file, the key and the fix. Code outside this module
never sees the raw TOML dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lookupd.errors import ConfigError
from lookupd.regularfile import open_regular

DEFAULT_CONFIG_PATH = Path("/etc/lookupd/lookupd.toml")

# Groups Exim runs as: Debian and Ubuntu, most other builds, cPanel, the rest.
EXIM_GROUPS = ("Debian-exim", "exim", "mailnull", "mail")

# Where geoipupdate (Debian: /var/lib/GeoIP) and Debian's geoip packages put the databases,
# tried in this order when no path is configured.
GEOIP_COUNTRY_PATHS = (
    Path("/var/lib/GeoIP/GeoLite2-Country.mmdb"),
    Path("/usr/share/GeoIP/GeoLite2-Country.mmdb"),
    Path("/var/lib/GeoIP/GeoIP2-Country.mmdb"),
    Path("/usr/share/GeoIP/GeoIP2-Country.mmdb"),
    Path("/var/lib/GeoIP/GeoLite2-City.mmdb"),
    Path("/usr/share/GeoIP/GeoLite2-City.mmdb"),
    Path("/var/lib/GeoIP/GeoIP2-City.mmdb"),
    Path("/usr/share/GeoIP/GeoIP2-City.mmdb"),
    Path("/var/lib/GeoIP/dbip-country-lite.mmdb"),
    Path("/usr/share/GeoIP/dbip-country-lite.mmdb"),
    Path("/var/lib/GeoIP/dbip-city-lite.mmdb"),
    Path("/usr/share/GeoIP/dbip-city-lite.mmdb"),
)
GEOIP_ASN_PATHS = (
    Path("/var/lib/GeoIP/GeoLite2-ASN.mmdb"),
    Path("/usr/share/GeoIP/GeoLite2-ASN.mmdb"),
    Path("/var/lib/GeoIP/dbip-asn-lite.mmdb"),
    Path("/usr/share/GeoIP/dbip-asn-lite.mmdb"),
)
# nftfw keeps its database in /var/lib/nftfw; Sympl and Symbiosis in /var/lib/{sympl,symbiosis}.
FIREWALL_DB_PATHS = (
    Path("/var/lib/nftfw/firewall.db"),
    Path("/usr/local/var/lib/nftfw/firewall.db"),
    Path("/var/lib/sympl/firewall-blacklist-count.db"),
    Path("/var/lib/symbiosis/firewall-blacklist-count.db"),
)


# ---------------------------------------------------------------------------------------------
# Value parsers used through field metadata: each takes the raw TOML value and returns the typed
# value, or raises ValueError with the fix in words.


def parse_duration(raw: object) -> float:
    """Seconds from a number or a string such as "90", "2s", "500ms", "1h", "1h30m"."""
    if isinstance(raw, bool):
        raise ValueError("expected a duration such as 2.5, \"500ms\", \"30s\", \"1h\"")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        text = raw.strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?", text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f'"{raw}" is not a duration: write e.g. 2.5, "500ms", "30s", "1h"')
        scale = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                 "w": 604800.0}
        value = sum(float(n) * scale[u] for n, u in parts)
    else:
        raise ValueError("expected a duration such as 2.5, \"500ms\", \"30s\", \"1h\"")
    if value < 0:
        raise ValueError("a duration cannot be negative")
    return value


def parse_mode(raw: object) -> int:
    """A Unix file mode given as an integer (0o660) or an octal string ("0660")."""
    if isinstance(raw, bool):
        raise ValueError('expected a file mode such as "0660"')
    if isinstance(raw, str):
        try:
            raw = int(raw, 8)
        except ValueError:
            raise ValueError(f'"{raw}" is not an octal file mode: write e.g. "0660"') from None
    if not isinstance(raw, int) or not 0 <= raw <= 0o777:
        raise ValueError('expected a file mode from "0000" to "0777", such as "0660"')
    return raw


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(raw: object, *, loopback_only: bool = False) -> HostPort | None:
    """ "127.0.0.1:8899", "[::1]:53" or "" (off) into a HostPort."""
    if not isinstance(raw, str):
        raise ValueError('expected a string such as "127.0.0.1:8899", or "" for off')
    if raw == "":
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", raw)
    if not m:
        raise ValueError(f'"{raw}" is not HOST:PORT: write e.g. "127.0.0.1:8899" or "[::1]:8899"')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'"{host}" is not an IP address: write e.g. "127.0.0.1"') from None
    if loopback_only and not addr.is_loopback:
        raise ValueError(
            f"{host} is not a loopback address: lookupd answers anyone who connects, so the "
            'TCP listener must be on 127.0.0.1 or ::1 (e.g. "127.0.0.1:8899")'
        )
    return HostPort(str(addr), port)


def _parse_tcp(raw: object) -> HostPort | None:
    return parse_host_port(raw, loopback_only=True)


def _parse_smtp(raw: object) -> HostPort | None:
    return parse_host_port(raw, loopback_only=True)


def parse_nameserver(raw: object) -> HostPort:
    """A resolver address, "127.0.0.1" (port 53) or "127.0.0.1:5353" or "[::1]:5353"."""
    if isinstance(raw, str) and raw and not raw.endswith("]") and raw.count(":") != 1 \
            and not raw.startswith("["):
        try:  # a bare IPv6 address, no port
            return HostPort(str(ipaddress.ip_address(raw)), 53)
        except ValueError:
            pass
    if isinstance(raw, str) and ":" not in raw:
        raw = raw + ":53"
    hp = parse_host_port(raw)
    if hp is None:
        raise ValueError('expected a nameserver such as "127.0.0.1" or "127.0.0.1:5353"')
    return hp


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _ipv6_prefix(value: int) -> str | None:
    return None if 16 <= value <= 128 else "must be a prefix length from 16 to 128 (e.g. 64)"


def _port_list(value: tuple[int, ...]) -> str | None:
    bad = [p for p in value if not 1 <= p <= 65535]
    return f"ports out of range 1-65535: {bad}" if bad else None


def _country_codes(value: tuple[str, ...]) -> str | None:
    bad = [c for c in value if not re.fullmatch(r"[A-Z]{2}", c)]
    return f"not ISO 3166-1 alpha-2 codes in upper case (e.g. \"GB\"): {bad}" if bad else None


def _group_exists(value: str) -> str | None:
    """A group name must exist here ("auto" and "" need none): serve would refuse it."""
    if value in ("", "auto") or value.isdigit():  # a number is taken as a gid
        return None
    try:
        grp.getgrnam(value)
    except KeyError:
        return (f'= "{value}": there is no such group on this system; use the group Exim '
                'runs as (Debian: "Debian-exim"; Sympl, cPanel: "exim" or "mail"), or "auto"')
    return None


def _parsed(parse: Callable[[object], Any], check: Callable[[Any], str | None] | None = None,
            ) -> dict[str, Any]:
    meta: dict[str, Any] = {"parse": parse}
    if check is not None:
        meta["check"] = check
    return meta


def _checked(check: Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": check}


# ---------------------------------------------------------------------------------------------
# The sections.


@dataclass(frozen=True)
class ServerConfig:
    """[server]: where lookupd listens and how long it waits for clients."""

    # Unix socket for Exim. "" turns it off (then `tcp` must be set).
    socket: Path | None = Path("/run/lookupd/lookupd.sock")
    socket_mode: int = field(default=0o660, metadata=_parsed(parse_mode))
    # Group that owns the socket: "auto" takes the group Exim runs as (the first that exists
    # of EXIM_GROUPS), a name sets it, "" leaves the process's group.
    socket_group: str = field(default="auto", metadata=_checked(_group_exists))
    # Optional loopback TCP listener for Exim's `inet:127.0.0.1:PORT` form; "" is off.
    tcp: HostPort | None = field(default=None, metadata=_parsed(_parse_tcp))
    # How long a client may take to send its request before lookupd closes the connection.
    read_timeout: float = field(default=3.0, metadata=_parsed(parse_duration, _positive))
    # How long in-flight requests may run after SIGTERM before lookupd exits anyway.
    drain_timeout: float = field(default=5.0, metadata=_parsed(parse_duration, _positive))
    # Durable state (user blocks, cache snapshots).
    state_dir: Path = Path("/var/lib/lookupd")
    # "info" logs start, stop and reloads; problems are warnings; "debug" adds a line a request.
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class GeoIPConfig:
    """[geoip]: country and ASN databases (MaxMind GeoIP2/GeoLite2 or DB-IP .mmdb files)."""

    # Country (or City) database; unset tries GEOIP_COUNTRY_PATHS in order.
    country_db: Path | None = None
    # ASN database; unset tries GEOIP_ASN_PATHS. The `asn` verb answers ?? without one.
    asn_db: Path | None = None
    # "country": where the address is; "registered_country": where its owner registered it.
    country_field: Literal["country", "registered_country"] = "country"
    # How often lookupd looks whether geoipupdate replaced a database file.
    check_interval: float = field(default=30.0, metadata=_parsed(parse_duration, _positive))
    # `lookupd status` (and the metrics' lookupd_health) calls a country database built
    # longer ago than this stale: geoipupdate runs weekly, so 5 weeks means it stopped. 0: off.
    stale_after: float = field(default=35 * 86400.0, metadata=_parsed(parse_duration))


@dataclass(frozen=True)
class IncidentsConfig:
    """[incidents]: the firewall's sqlite database of offending addresses."""

    # nftfw firewall.db or Sympl/Symbiosis firewall-blacklist-count.db; unset tries
    # FIREWALL_DB_PATHS in order.
    db: Path | None = None
    # "auto" detects the schema from the table's columns.
    schema: Literal["auto", "nftfw", "sympl"] = "auto"
    # nftfw: which column counts (matchcount = log matches, incidents = distinct incidents).
    nftfw_column: Literal["matchcount", "incidents"] = "matchcount"
    # Sympl: count only rows newer than this (0 = all rows).
    sympl_window: float = field(default=0.0, metadata=_parsed(parse_duration))
    # How often lookupd looks whether the firewall rewrote the database.
    check_interval: float = field(default=2.0, metadata=_parsed(parse_duration, _positive))


def _dns_zone(value: str) -> str | None:
    ok = re.fullmatch(r"(?!-)[A-Za-z0-9_-]{1,63}(\.(?!-)[A-Za-z0-9_-]{1,63})+\.?", value)
    return None if ok else 'must be a DNS zone such as "zen.spamhaus.org"'


def _list_name(value: str) -> str | None:
    ok = re.fullmatch(r"[A-Za-z0-9._-]*", value)
    return None if ok else "may hold only letters, digits, dots, dashes and underscores"


def _dnsbl_codes(value: tuple[str, ...]) -> str | None:
    # The grammar has one home, the DNSBL code parser; imported here, when a file is checked,
    # because lookupd.dnsbl imports this module.
    from lookupd.dnsbl.codes import parse_code

    for code in value:
        try:
            parse_code(code)
        except ValueError as exc:
            return f'has "{code}": {exc}'
    return None


def _dnsbl_error_codes(value: tuple[str, ...]) -> str | None:
    masks = [code for code in value if code.strip().startswith("&")]
    if masks:
        return (f'has "{masks[0]}": an error answer is an address, a range or a network '
                '(e.g. "127.0.0.255", "127.255.255.0/24"), not a bitmask')
    return _dnsbl_codes(value)


def _ttl_floor(value: float) -> str | None:
    # A floor is for answers with TTL 0 or a few seconds; a long one would keep a delisted
    # client listed (and a new listing unseen) for that long.
    return None if value <= 3600 else 'must be at most "1h" (a small floor, e.g. "30s")'


def _dqs_key(value: str) -> str | None:
    # The key itself is never repeated in a message.
    ok = re.fullmatch(r"([a-z0-9]{8,64})?", value)
    return None if ok else "must be your Spamhaus DQS key: lower-case letters and digits"


def _dnsbl_lists(value: tuple[DnsblListConfig, ...]) -> str | None:
    names = [lst.name or lst.zone.rstrip(".").lower() for lst in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    return (f"names {dupes} more than once: give each list a distinct name" if dupes
            else None)


@dataclass(frozen=True)
class DnsblListConfig:
    """One [[dnsbl.list]] entry."""

    zone: str = field(metadata=_checked(_dns_zone))
    # Name shown in answers and stats; defaults to the zone.
    name: str = field(default="", metadata=_checked(_list_name))
    # Added to the score on a hit; negative for allow lists (e.g. a DNSWL).
    weight: float = 1.0
    # Which answers count, as postscreen writes them: "127.0.0.2", ranges in any octet
    # "127.0.[0..255].[1..3]" ("[2;4;9..11]" for several), networks "127.0.0.0/24", or
    # bitmasks of the last octet "&0x04". Empty: any 127.0.0.0/8 answer except errors.
    codes: tuple[str, ...] = field(default=(), metadata=_checked(_dnsbl_codes))
    # The list's own error answers ("you may not ask"), never a listing; added to the ones
    # every list shares (127.0.0.1, 127.255.255.0/24, 127.0.1.255) and to those built in for
    # well-known lists (list.dnswl.org: 127.0.0.255).
    error_codes: tuple[str, ...] = field(default=(), metadata=_checked(_dnsbl_error_codes))
    # Address families the list answers for (SpamCop and Barracuda: IPv4 only).
    families: tuple[Literal["ipv4", "ipv6"], ...] = ("ipv4", "ipv6")
    # "ip": asked with reversed addresses (`dnsbl`); "domain": with names (`dbl`).
    kind: Literal["ip", "domain"] = "ip"
    # Spamhaus: with [dnsbl] dqs_key set, ZONE becomes KEY.<zone minus spamhaus.org>.dq.spamhaus.net
    spamhaus: bool = False
    # An internal list that lists special-use addresses (private, loopback, link-local,
    # documentation, ...) or, for a domain list, special-use names (.local, .test, ...): ask
    # it about them too. Other lists are never asked about them.
    query_special: bool = False


def _default_lists() -> tuple[DnsblListConfig, ...]:
    return (
        DnsblListConfig(zone="zen.spamhaus.org", codes=("127.0.0.[2..11]",), spamhaus=True),
        DnsblListConfig(zone="bl.spamcop.net", codes=("127.0.0.2",), families=("ipv4",)),
        DnsblListConfig(zone="b.barracudacentral.org", codes=("127.0.0.2",),
                        families=("ipv4",)),
        DnsblListConfig(zone="dbl.spamhaus.org", kind="domain", codes=("127.0.1.[2..99]",),
                        spamhaus=True),
    )


@dataclass(frozen=True)
class DnsblConfig:
    """[dnsbl]: DNS block lists, asked in parallel, cached for every Exim process."""

    lists: tuple[DnsblListConfig, ...] = field(default_factory=_default_lists,
                                               metadata=_checked(_dnsbl_lists))
    # Resolvers to ask ("127.0.0.1", "127.0.0.1:5353"); empty uses /etc/resolv.conf.
    nameservers: tuple[HostPort, ...] = field(default=(),
                                              metadata=_parsed(parse_nameserver))
    # One deadline for all lists of one query; keep it well under Exim's readsocket timeout.
    deadline: float = field(default=1.5, metadata=_parsed(parse_duration, _positive))
    # Summed weight at which `verdict=listed`.
    threshold: float = field(default=1.0, metadata=_checked(_positive))
    # Spamhaus Data Query Service key; never written to answers or logs.
    dqs_key: str = field(default="", metadata=_checked(_dqs_key))
    # Most answers kept in the shared cache (entries: one per list and name asked).
    cache_size: int = field(default=50_000, metadata=_checked(_positive))
    # Upper bound for caching NXDOMAIN (the zone's SOA minimum is used when smaller).
    negative_ttl_max: float = field(default=900.0, metadata=_parsed(parse_duration))
    # Answers (listed, NXDOMAIN, PTR, A) are kept at least this long, even with TTL 0, like
    # unbound's cache-min-ttl; negative_ttl_max and the one-day cap of listings still bound it.
    min_ttl: float = field(default=30.0, metadata=_parsed(parse_duration, _ttl_floor))
    # How long a timeout or SERVFAIL is remembered before the list is asked again.
    error_ttl: float = field(default=30.0, metadata=_parsed(parse_duration))
    # RFC 5782 test-point probes of every list.
    probe_interval: float = field(default=300.0, metadata=_parsed(parse_duration, _positive))
    # How often the cache is written to the state directory (and on stop).
    snapshot_interval: float = field(default=300.0,
                                     metadata=_parsed(parse_duration, _positive))


@dataclass(frozen=True)
class UsersConfig:
    """[users]: blocking authenticated users who send to too many invalid recipients."""

    # Invalid-recipient events in `window` that block the user.
    limit: int = field(default=100, metadata=_checked(_positive))
    window: float = field(default=3600.0, metadata=_parsed(parse_duration, _positive))
    # Compare user names without regard to case (most authenticators do).
    case_insensitive: bool = True
    # Members of this group (and root) may run user-block / user-unblock over the socket.
    admin_group: str = field(default="", metadata=_checked(_group_exists))
    # Command that gets the notification mail on stdin; "" sends none.
    notify_command: str = "/usr/sbin/sendmail -t -oi"
    notify_to: str = "postmaster"
    # Send the notification by SMTP to this loopback MTA instead of running notify_command,
    # e.g. "127.0.0.1:25". Needed under systemd's NoNewPrivileges=, which stops the setuid
    # sendmail from queueing mail.
    notify_smtp: HostPort | None = field(default=None, metadata=_parsed(_parse_smtp))
    notify_retries: int = field(default=3, metadata=_checked(_non_negative))
    # How long one run of notify_command may take before it is killed (and retried).
    notify_timeout: float = field(default=30.0, metadata=_parsed(parse_duration, _positive))
    # Optional Exim lsearch file of blocked users kept in sync (classic
    # blocked_authenticated_users); unset: none.
    lsearch_file: Path | None = None


@dataclass(frozen=True)
class ConnectConfig:
    """[connect]: the policy behind the `connect` verb."""

    # Exim net-iplsearch style files of IPs/CIDRs that bypass every check.
    allowlist_files: tuple[Path, ...] = ()
    # Deny when the firewall counted more incidents than this; 0 turns the rule off.
    incidents_threshold: int = field(default=10, metadata=_checked(_non_negative))
    deny_on_dnsbl: bool = True
    # Deny when the domain lists list the HELO name (given only by a `connect IP PORT HELO`
    # from a HELO or later ACL; at connect time there is none).
    deny_on_helo_dbl: bool = True
    # Deny clients without a PTR record; off by default: it blocks real senders.
    deny_no_ptr: bool = False
    # Ports where only known clients may connect (submission).
    submission_ports: tuple[int, ...] = field(default=(465, 587),
                                              metadata=_checked(_port_list))
    # IMAP-before-submission style access file (one IP/CIDR per line); unset: none.
    submission_access_file: Path | None = None
    # Countries allowed to use submission ports; empty: every country.
    submission_countries: tuple[str, ...] = field(default=(),
                                                  metadata=_checked(_country_codes))
    deny_countries: tuple[str, ...] = field(default=(), metadata=_checked(_country_codes))
    # When non-empty, only these countries may connect (on every port).
    allow_countries: tuple[str, ...] = field(default=(), metadata=_checked(_country_codes))
    # All sources of one connect query answer within this, or count as unknown.
    deadline: float = field(default=2.0, metadata=_parsed(parse_duration, _positive))
    # Deny when lookupd counted more strikes (`strike IP KIND`: failed AUTH, invalid
    # recipients, protocol errors) than this in strikes_window; 0 turns the rule off. Try it
    # in log_only first.
    strikes_threshold: int = field(default=0, metadata=_checked(_non_negative))
    strikes_window: float = field(default=3600.0, metadata=_parsed(parse_duration, _positive))
    # IPv6 clients are struck and counted by network of this prefix length: one host's
    # /64 (often a whole customer's) holds more addresses than anyone could strike one by
    # one. 128 counts each address apart; IPv4 is always counted per address.
    strikes_ipv6_prefix: int = field(default=64, metadata=_checked(_ipv6_prefix))
    # Rules that only say what they would do (action=accept would=deny|defer), to try them
    # out first: "incidents", "dnsbl", "helo_dbl", "country", "no_ptr", "submission",
    # "strikes".
    log_only: tuple[Literal["incidents", "dnsbl", "helo_dbl", "country", "no_ptr",
                            "submission", "strikes"], ...] = ()


@dataclass(frozen=True)
class HeloConfig:
    """[helo]: the policy behind the `helo` verb (asked at RCPT, after AUTH had its chance)."""

    # lenient: only what no real mail server does (our own name, localhost, a bare address,
    # a listed name); rfc: also what RFC 5321 forbids or qpsmtpd's rfc policy refuses (no
    # dot, not a domain name, a name that does not resolve); strict: also a literal or a
    # name that is not the client's address.
    policy: Literal["lenient", "rfc", "strict"] = "lenient"
    # Only say what would be refused (action=accept would=deny): the default, to try first.
    log_only: bool = True
    # Our own names, beyond the primary_hostname Exim sends; a client announcing one of
    # them (or one of our addresses) is lying.
    own_names: tuple[str, ...] = ()
    # Every DNS answer of one helo query within this, or the check counts as unknown.
    deadline: float = field(default=2.0, metadata=_parsed(parse_duration, _positive))


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the `metrics` verb always answers; this adds an HTTP listener for a
    Prometheus scraper, loopback only (GET /metrics), e.g. "127.0.0.1:9466"."""

    listen: HostPort | None = field(default=None, metadata=_parsed(_parse_tcp))


def parse_redis_url(raw: object) -> str:
    """redis://HOST[:PORT][/DB], rediss:// (TLS) or unix:///PATH[?db=N]; "" is off. A password
    in the URL is refused: it would show in `ps`, in backups of the file and in tracebacks."""
    if not isinstance(raw, str):
        raise ValueError('expected a URL such as "redis://127.0.0.1:6379/0"')
    if raw == "":
        return raw
    m = re.fullmatch(r"(rediss?)://([^/?#]*)(/\d*)?|unix://(/[^?#]+)(\?db=\d+)?", raw)
    if not m:
        raise ValueError(f'"{raw}" is not a Redis URL: write e.g. "redis://127.0.0.1:6379/0", '
                         '"rediss://redis.example.org:6380/0" or "unix:///run/redis/redis.sock"')
    if "@" in raw:
        raise ValueError("put no user name or password in the URL: use cluster.username and "
                         "cluster.password_file")
    return raw


def _parse_sentinel(raw: object) -> HostPort:
    hp = parse_host_port(raw)
    if hp is None:
        raise ValueError('expected a sentinel address such as "127.0.0.1:26379"')
    return hp


def _key_prefix(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value) else (
        "must be 1 to 64 letters, digits or _.:- (e.g. \"lookupd:\")")


def _host_name(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_.-]{0,253}", value) else (
        "must be a host name (letters, digits, . _ -), or \"\" for this host's FQDN")


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: state shared by several lookupd hosts through Redis (or Valkey). Without
    this section (redis = "") everything stays local, as on one host."""

    # "redis://127.0.0.1:6379/0", "rediss://..." (TLS) or "unix:///run/redis/redis.sock".
    redis: str = field(default="", metadata=_parsed(parse_redis_url))
    # File holding the password (requirepass, or the ACL user's); never the password here.
    password_file: Path | None = None
    # Redis ACL user; "" authenticates with the password alone (requirepass).
    username: str = ""
    # Every key and channel lookupd uses starts with this.
    key_prefix: str = field(default="lookupd:", metadata=_checked(_key_prefix))
    # This host's name in shared history and notifications; "" is the FQDN.
    host_name: str = field(default="", metadata=_checked(_host_name))
    # Sentinels watching the primary ("127.0.0.1:26379"); then `redis` is not used.
    sentinels: tuple[HostPort, ...] = field(default=(), metadata=_parsed(_parse_sentinel))
    sentinel_service: str = "mymaster"
    # Longest wait for Redis on a request; past it the host decides alone (fail open).
    timeout: float = field(default=0.5, metadata=_parsed(parse_duration, _positive))
    # rediss:// only. The CA certificate(s) that signed Redis' certificate (tls-ca-cert-file,
    # PEM); unset: the system's CAs. Redis' certificate must name the host in the URL.
    ca_file: Path | None = None
    # rediss:// only. This host's certificate and key (PEM), for Redis' tls-auth-clients
    # (on by default in Redis): both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        tls = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k) is not None]
        if tls and not self.redis.startswith("rediss://"):
            raise ValueError(f"{' and '.join(tls)} only apply to a TLS connection: write "
                             'redis = "rediss://HOST:PORT/DB" (Redis\' tls-port)')
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both (for Redis' "
                             "tls-auth-clients) or neither")

    @property
    def enabled(self) -> bool:
        return bool(self.redis or self.sentinels)


@dataclass(frozen=True)
class Config:
    """The whole configuration; `source` is the file it came from (None: embedded defaults)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    geoip: GeoIPConfig = field(default_factory=GeoIPConfig)
    incidents: IncidentsConfig = field(default_factory=IncidentsConfig)
    dnsbl: DnsblConfig = field(default_factory=DnsblConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    connect: ConnectConfig = field(default_factory=ConnectConfig)
    helo: HeloConfig = field(default_factory=HeloConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = field(default=None, metadata={"internal": True})


# TOML table names that differ from the field name ([[dnsbl.list]] fills `lists`).
_TOML_NAMES = {(DnsblConfig, "lists"): "list"}


# ---------------------------------------------------------------------------------------------
# Loading.


def load_config(path: Path | None = None, *, required: bool = False,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Read and validate `path` (default /etc/lookupd/lookupd.toml).

    A missing default file means embedded defaults; a missing file that was asked for
    (`required`) is an error. `overrides` maps "section.key" to raw values (CLI flags), applied
    on top of the file and validated the same way.
    """
    source = path or DEFAULT_CONFIG_PATH
    if source.exists() or required or path is not None:
        return _from_raw(_read_toml(source), str(source), source, overrides)
    return _from_raw({}, "embedded defaults", None, overrides)


def fallback_config(path: Path | None = None,
                    overrides: Mapping[str, object] | None = None) -> Config:
    """Where and how to listen when the configuration cannot be loaded (lookupd then answers
    fail-open): the file's [server] table if it is valid on its own, so the socket, its mode
    and group are the admin's; else the embedded defaults. Command-line server flags apply."""
    source = path or DEFAULT_CONFIG_PATH
    server_flags = {k: v for k, v in (overrides or {}).items() if k.startswith("server.")}
    with contextlib.suppress(ConfigError):
        raw = _read_toml(source) if source.exists() else {}
        server = raw.get("server", {})
        return _from_raw({"server": server}, str(source), None, server_flags)
    with contextlib.suppress(ConfigError):
        return _from_raw({}, "embedded defaults", None, server_flags)
    return Config()


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        with open(open_regular(source), "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: no such file; create it (see README, 'Configuration') or leave "
            "--config out to run on the embedded defaults"
        ) from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied; make it readable by lookupd") \
            from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None


def _from_raw(raw: dict[str, Any], where: str, source: Path | None,
              overrides: Mapping[str, object] | None) -> Config:
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        table[key] = value
    config = _build(Config, raw, where, "")
    return dataclasses.replace(config, source=source)


def _build(cls: type[Any], raw: object, where: str, prefix: str) -> Any:
    """One section (or the whole file) from its TOML table. Every problem of the table and of
    the tables in it is collected: ConfigError.problems lists them all, so the admin sees
    every mistake of a file at once."""
    label = prefix or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {label} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    toml_names = {_TOML_NAMES.get((cls, name), name): name for name in fields}
    known = ", ".join(sorted(toml_names))
    problems = [f"{where}: unknown key {_join(prefix, name)}: check the spelling; "
                f"{label} takes {known}" for name in sorted(set(raw) - set(toml_names))]
    values: dict[str, Any] = {}
    for toml_name, name in toml_names.items():
        f = fields[name]
        key = _join(prefix, toml_name)
        if toml_name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: {key} is required")
            continue
        try:
            value = _convert(hints[name], f.metadata, raw[toml_name], where, key)
            check = f.metadata.get("check")
            if check is not None:
                problem = check(value)
                if problem:
                    raise ConfigError(f"{where}: {key} {problem}")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        values[name] = value
    if problems:
        raise ConfigError("\n".join(problems), problems)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {label}: {exc}") from None


def _convert(tp: Any, meta: Mapping[str, Any], raw: object, where: str, key: str) -> Any:
    parse = meta.get("parse")
    origin = typing.get_origin(tp)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(raw, list):
            raise ConfigError(f"{where}: {key} must be a list, e.g. {key.split('.')[-1]} = [...]")
        items, problems = [], []
        for i, item in enumerate(raw):
            try:
                items.append(_convert(item_tp, meta, item, where, f"{key}[{i}]"))
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError("\n".join(problems), problems)
        return tuple(items)
    if parse is not None:
        try:
            return parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, raw, where, key)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "" and len(args) < len(typing.get_args(tp)):
            return None  # "" means unset for optional paths and strings
        return _convert(args[0], meta, raw, where, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            opts = ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(f"{where}: {key} = {raw!r} is not one of {opts}")
        return raw
    if tp is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f'{where}: {key} must be a path string, e.g. "/var/lib/x"')
        p = Path(raw)
        if not p.is_absolute():
            base = Path(where).parent if where != "embedded defaults" else Path.cwd()
            p = base / p
        return p
    if tp is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: {key} must be true or false")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: {key} must be a whole number")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{where}: {key} must be a number")
        return float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(f'{where}: {key} must be a string in quotes, e.g. "{raw}"')
        return raw
    raise ConfigError(f"{where}: {key}: lookupd cannot read values of type {tp}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_existing(configured: Path | None, candidates: tuple[Path, ...]) -> Path | None:
    """The configured path, else the first standard location that exists."""
    if configured is not None:
        return configured
    return next((p for p in candidates if p.exists()), None)


def file_problems(config: Config) -> list[str]:
    """Configured files that lookupd cannot read, in words for `check-config`.

    `serve` starts anyway (the source answers "unknown" and logs why), but a path that does
    not exist is most often a typo the admin wants to hear about before reloading.
    """
    where = str(config.source) if config.source else "command line"
    wanted: list[tuple[str, Path | None]] = [
        ("geoip.country_db", config.geoip.country_db),
        ("geoip.asn_db", config.geoip.asn_db),
        ("incidents.db", config.incidents.db),
        ("connect.submission_access_file", config.connect.submission_access_file),
        ("cluster.password_file", config.cluster.password_file),
        ("cluster.ca_file", config.cluster.ca_file),
        ("cluster.cert_file", config.cluster.cert_file),
        ("cluster.key_file", config.cluster.key_file),
        *((f"connect.allowlist_files[{i}]", p)
          for i, p in enumerate(config.connect.allowlist_files)),
    ]
    problems = []
    for key, path in wanted:
        if path is None:
            continue
        if not path.exists():
            problems.append(f"{where}: {key}: {path} does not exist; fix the path or remove "
                            "the key to use the standard locations")
        elif not path.is_file():
            problems.append(f"{where}: {key}: {path} is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{where}: {key}: {path} is not readable by this user")
    lsearch = config.users.lsearch_file
    if lsearch is not None and not lsearch.parent.is_dir():
        problems.append(f"{where}: users.lsearch_file: directory {lsearch.parent} does not "
                        "exist")
    return problems
