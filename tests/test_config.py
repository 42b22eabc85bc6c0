"""The typed config loader: defaults, validation, errors that name file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookupd.cli import main
from lookupd.config import HostPort, load_config, parse_duration
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
"""))
    assert config.server.socket == tmp_path / "run/l.sock"  # relative to the config file
    assert config.server.socket_mode == 0o640
    assert config.server.tcp == HostPort("127.0.0.1", 8899)
    assert config.server.read_timeout == 0.5
    assert config.incidents.sympl_window == 7 * 86400
    assert config.dnsbl.nameservers == (HostPort("127.0.0.1", 5353), HostPort("::1", 53))
    assert config.dnsbl.min_ttl == 60.0
    assert [lst.zone for lst in config.dnsbl.lists] == ["rbl.test"]
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
        ("[dnsbl]\nmin_ttl = '2h'", 'dnsbl.min_ttl must be at most "1h"'),
        ("[connect]\ndeny_countries = ['gb']", "not ISO 3166-1 alpha-2 codes"),
        ("[connect]\nsubmission_ports = [0]", "ports out of range"),
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
