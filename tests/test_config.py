"""The typed config loader: defaults, validation, errors that name file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookupd.cli import main
from lookupd.config import HostPort, file_problems, load_config, parse_duration
from lookupd.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lookupd.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_when_no_file(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.server.socket == Path("/run/lookupd/lookupd.sock")
    assert config.server.socket_mode == 0o660
    assert config.users.limit == 100


def test_values_are_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[server]
socket = "run/l.sock"
socket_mode = "0640"
tcp = "127.0.0.1:8899"
read_timeout = "500ms"
[incidents]
sympl_window = "7d"
[dnsbl]
nameservers = ["127.0.0.1:5353", "::1"]
min_ttl = "1m"
[[dnsbl.list]]
zone = "rbl.test"
codes = ["127.0.0.[2..11]"]
families = ["ipv4"]
[[dnsbl.list]]
zone = "list.dnswl.org"
weight = -1
codes = ["127.0.[0..255].[1..3]", "127.0.3.0/24"]
error_codes = ["127.0.0.254", "127.255.0.0/16"]
[[dnsbl.list]]
zone = "lan.test"
query_special = true
[connect]
deny_on_helo_dbl = false
log_only = ["helo_dbl"]
"""))
    assert config.server.socket == tmp_path / "run/l.sock"  # relative to the config file
    assert config.server.socket_mode == 0o640
    assert config.server.tcp == HostPort("127.0.0.1", 8899)
    assert config.server.read_timeout == 0.5
    assert config.incidents.sympl_window == 7 * 86400
    assert config.dnsbl.nameservers == (HostPort("127.0.0.1", 5353), HostPort("::1", 53))
    assert config.dnsbl.min_ttl == 60.0
    assert [lst.zone for lst in config.dnsbl.lists] == ["rbl.test", "list.dnswl.org", "lan.test"]
    # postscreen's filter for DNSWL, ranges in every octet, and the list's own errors.
    assert config.dnsbl.lists[1].codes == ("127.0.[0..255].[1..3]", "127.0.3.0/24")
    assert config.dnsbl.lists[1].error_codes == ("127.0.0.254", "127.255.0.0/16")
    assert [lst.query_special for lst in config.dnsbl.lists] == [False, False, True]
    assert (config.connect.deny_on_helo_dbl, config.connect.log_only) == (False, ("helo_dbl",))
    assert config.dnsbl.lists[0].families == ("ipv4",)
    assert config.source == tmp_path / "lookupd.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nsockt = '/x'", "unknown key server.sockt: check the spelling"),
        ("colour = 1", "unknown key colour"),
        ("[server]\ntcp = '8.8.8.8:25'", "server.tcp: 8.8.8.8 is not a loopback address"),
        ("[server]\ntcp = 'localhost'", "is not HOST:PORT"),
        ("[server]\nread_timeout = 'soon'", 'server.read_timeout: "soon" is not a duration'),
        ("[server]\nread_timeout = 0", "server.read_timeout must be greater than 0"),
        ("[users]\nlimit = '100'", "users.limit must be a whole number"),
        ("[users]\nlimit = 0", "users.limit must be greater than 0"),
        ("[geoip]\ncountry_field = 'continent'", 'geoip.country_field = \'continent\' is not'),
        ("[[dnsbl.list]]\nweight = 2", "dnsbl.list[0].zone is required"),
        ("[[dnsbl.list]]\nzone = 'wl.test'\ncodes = ['127.0.[0..255]']",
         'dnsbl.list[0].codes has "127.0.[0..255]": \'127.0.[0..255]\' is not an answer code: '
         'write "127.0.0.2", a range in any octet "127.0.[0..255].[2..11]"'),
        ("[[dnsbl.list]]\nzone = 'wl.test'\ncodes = ['127.0.[9..1].2']",
         "must go from low to high within 0..255"),
        ("[[dnsbl.list]]\nzone = 'wl.test'\nerror_codes = ['&0x80']",
         'dnsbl.list[0].error_codes has "&0x80": an error answer is an address, a range or a '
         "network"),
        ("[[dnsbl.list]]\nzone = 'wl.test'\nerror_codes = ['10.0.0.1']",
         "outside 127.0.0.0/8"),
        ("[[dnsbl.list]]\nzone = 'lan.test'\nquery_special = 'yes'",
         "dnsbl.list[0].query_special must be true or false"),
        ("[connect]\ndeny_on_helo_dbl = 1", "connect.deny_on_helo_dbl must be true or false"),
        ("[connect]\nlog_only = ['helo']", "connect.log_only[0] = 'helo' is not one of"),
        ("[dnsbl]\nmin_ttl = '2h'", 'dnsbl.min_ttl must be at most "1h"'),
        ("[connect]\ndeny_countries = ['gb']", "not ISO 3166-1 alpha-2 codes"),
        ("[connect]\nsubmission_ports = [0]", "ports out of range"),
        ("[connect]\nstrikes_ipv6_prefix = 8", "connect.strikes_ipv6_prefix must be a prefix "
         "length from 16 to 128"),
        ("server = 3", "server must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_validated(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), overrides={"server.socket": ""})
    assert config.server.socket is None
    with pytest.raises(ConfigError, match="server.tcp"):
        load_config(write(tmp_path, ""), overrides={"server.tcp": "1.2.3.4:1"})


@pytest.mark.parametrize(("raw", "seconds"),
                         [(3, 3.0), (2.5, 2.5), ("90", 90.0), ("500ms", 0.5), ("1h30m", 5400.0)])
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "[users]\nlimit = 5\n")
    assert main(["check-config", "--config", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[users]\nlimit = -1\n")
    assert main(["check-config", "--config", str(bad)]) == 78  # EX_CONFIG


def test_check_config_reports_missing_files(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'[geoip]\ncountry_db = "{tmp_path}/GeoLite2-Contry.mmdb"\n'
                           f'[connect]\nallowlist_files = ["{tmp_path}"]\n')
    assert main(["check-config", "--config", str(path)]) == 78
    text = capsys.readouterr().err
    assert "geoip.country_db" in text and "GeoLite2-Contry.mmdb does not exist" in text
    assert "connect.allowlist_files[0]" in text and "is not a file" in text


def test_check_config_reports_every_problem_at_once(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[server]\nsocket_group = "nosuchgroup"\nread_timeout = "x"\n'
                           '[geoip]\nbogus = 1\n'
                           '[[dnsbl.list]]\nzone = "a.test"\nweight = "x"\n'
                           '[[dnsbl.list]]\nzon = "b.test"\n'
                           '[connect]\ndeny_countries = ["gb"]\n')
    assert main(["check-config", "--config", str(path)]) == 78
    lines = [line.split(" ERROR lookupd: ", 1)[1]
             for line in capsys.readouterr().err.splitlines() if " ERROR lookupd: " in line]
    assert lines == [
        f'{path}: server.socket_group = "nosuchgroup": there is no such group on this system; '
        'use the group Exim runs as (Debian: "Debian-exim"; Sympl, cPanel: "exim" or "mail"), '
        'or "auto"',
        f'{path}: server.read_timeout: "x" is not a duration: write e.g. 2.5, "500ms", "30s", '
        '"1h"',
        f"{path}: unknown key geoip.bogus: check the spelling; geoip takes asn_db, "
        "check_interval, country_db, country_field, stale_after",
        f"{path}: dnsbl.list[0].weight must be a number",
        f"{path}: unknown key dnsbl.list[1].zon: check the spelling; dnsbl.list[1] takes "
        "codes, error_codes, families, kind, name, query_special, spamhaus, weight, zone",
        f"{path}: dnsbl.list[1].zone is required",
        f"{path}: connect.deny_countries not ISO 3166-1 alpha-2 codes in upper case (e.g. "
        "\"GB\"): ['gb']",
        "7 problem(s); lookupd would answer fail-open (nothing checked) with this file at "
        "start, and a reload would keep the running configuration",
    ]


def test_a_group_serve_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    """check-config and serve agree: a socket group that does not exist is refused at load
    time (serve then answers fail-open on the default socket instead of exiting)."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[users]\nadmin_group = "no-such-admins"\n'))
    assert err.value.problems == [
        f'{tmp_path / "lookupd.toml"}: users.admin_group = "no-such-admins": there is no '
        'such group on this system; use the group Exim runs as (Debian: "Debian-exim"; '
        'Sympl, cPanel: "exim" or "mail"), or "auto"']


# --- config --------------------------------------------------------------------------------


def test_cluster_section_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "l.toml"
    path.write_text('[cluster]\nredis = "rediss://redis.example.org:6380/2"\n'
                    'password_file = "pw"\nusername = "lookupd"\nkey_prefix = "mx:"\n'
                    'host_name = "mx1.example.org"\ntimeout = "250ms"\n'
                    'sentinels = ["127.0.0.1:26379", "[::1]:26380"]\n')
    config = load_config(path).cluster
    assert config.enabled and config.timeout == 0.25 and config.key_prefix == "mx:"
    assert config.password_file == tmp_path / "pw"
    assert [str(s) for s in config.sentinels] == ["127.0.0.1:26379", "[::1]:26380"]
    path.write_text('[cluster]\nredis = "unix:///run/redis/redis.sock?db=1"\n')
    assert load_config(path).cluster.redis.startswith("unix://")
    assert not load_config(None).cluster.enabled
    path.write_text('[cluster]\nredis = "redis://:hunter2@127.0.0.1:6379/0"\n'
                    'password = "x"\ntimeout = 0\nkey_prefix = "a b"\n'
                    'sentinels = ["nohost"]\nredis2 = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "hunter2" not in text
    assert "cluster.redis: put no user name or password in the URL" in text
    for key in ("cluster.password:", "cluster.timeout", "cluster.key_prefix",
                "cluster.sentinels[0]", "cluster.redis2"):
        assert key in text, key


def test_cluster_tls_files(tmp_path: Path) -> None:
    """ca_file, cert_file, key_file: for rediss:// only; the client pair goes together."""
    path = tmp_path / "l.toml"
    path.write_text('[cluster]\nredis = "rediss://redis.example.org:6380/0"\n'
                    'ca_file = "ca.pem"\ncert_file = "c.pem"\nkey_file = "c.key"\n')
    config = load_config(path).cluster
    assert (config.ca_file, config.key_file) == (tmp_path / "ca.pem", tmp_path / "c.key")
    problems = file_problems(load_config(path))
    assert any("cluster.ca_file" in p and "does not exist" in p for p in problems), problems
    path.write_text('[cluster]\nredis = "redis://127.0.0.1:6379/0"\nca_file = "ca.pem"\n')
    with pytest.raises(ConfigError, match=r"cluster: ca_file only apply to a TLS connection: "
                                          r'write redis = "rediss://'):
        load_config(path)
    path.write_text('[cluster]\nredis = "rediss://127.0.0.1:6380/0"\ncert_file = "c.pem"\n')
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        load_config(path)


def test_a_group_may_be_given_by_number(tmp_path: Path) -> None:
    """users.admin_group = "4242": a gid, as before check-config checked group names."""
    config = load_config(write(tmp_path, '[users]\nadmin_group = "4242"\n'))
    assert config.users.admin_group == "4242"

    from lookupd.trust import group_gid
    assert group_gid("4242") == 4242
