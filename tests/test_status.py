"""`lookupd status`, the `status` and `metrics` verbs and the HTTP metrics listener, against a
real `lookupd serve` in known states: a missing GeoIP database, a quarantined DNS list (a
real rbldnsd zone that lists everything), a blocked user, fail-open on a broken file."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartLookupd
from dnsservers import RBLDNSD, Rbldnsd
from support import FIREWALL, MAXMIND, REPO, free_port

pytestmark = pytest.mark.skipif(not Path(RBLDNSD).exists(), reason="rbldnsd is not installed")

# Lists everything, its 127.0.0.1 test point included: lookupd must quarantine it.
ALL_ZONE = """\
$SOA 60 ns.all.test. hostmaster.all.test. 1 600 60 3600 45
$NS 60 ns.all.test.
$TTL 60
:127.0.0.2:Listed
0.0.0.0/1
128.0.0.0/1
"""


@pytest.fixture(scope="module")
def all_listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rbldnsd]:
    zones = tmp_path_factory.mktemp("status-zones")
    (zones / "all.zone").write_text(ALL_ZONE)
    server = Rbldnsd(tmp_path_factory.mktemp("status-rbldnsd"),
                     zones=(("all.test", "ip4set", "all.zone"),), source_dir=zones)
    server.start()
    yield server
    server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lookupd", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)


def wait_quarantined(daemon_query: object, name: str) -> None:
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = daemon_query("stats")  # type: ignore[operator]
        if f"{name}=" in stats and "state:quarantined-lists-everything" in stats:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} was not quarantined: {stats}")


def test_status_and_metrics_in_known_states(start_lookupd: StartLookupd, all_listed: Rbldnsd,
                                            sockdir: Path) -> None:
    port = free_port()
    daemon = start_lookupd(f"""
[geoip]
country_db = "{sockdir}/GeoLite2-Country.mmdb"
asn_db = "{MAXMIND / 'GeoLite2-ASN-Test.mmdb'}"
[incidents]
db = "{FIREWALL / 'nftfw-firewall.db'}"
[dnsbl]
nameservers = ["127.0.0.1:{all_listed.port}"]
[[dnsbl.list]]
zone = "all.test"
[users]
limit = 2
notify_command = ""
[metrics]
listen = "127.0.0.1:{port}"
""")
    wait_quarantined(daemon.query, "all.test")
    assert daemon.query("user-block mallory stolen password").startswith("blocked")
    for _ in range(3):
        daemon.query("connect 203.0.113.7 25")  # 42 incidents: denied
    daemon.query("frobnicate")

    shown = cli("status", "--socket", str(daemon.socket))
    assert shown.returncode == 1, shown  # degraded: WARNING
    text = shown.stdout
    assert ": WARNING\n" in text.splitlines()[0] + "\n"
    assert "country:       none: " in text and "GeoLite2-Country.mmdb" in text
    assert f"incidents:     {FIREWALL / 'nftfw-firewall.db'} (nftfw, 4056 rows" in text
    assert "asn:           " + str(MAXMIND / "GeoLite2-ASN-Test.mmdb") + " (GeoLite2-ASN" in text
    assert "DNS list:      all.test: quarantined-lists-everything" in text
    assert "users:         1 blocked" in text
    assert "  ! DNS list all.test: quarantined-lists-everything" in text
    assert "  ! country: " in text

    state = json.loads(cli("status", "--json", "--socket", str(daemon.socket)).stdout)
    assert state["level"] == "warning" and state["fail_open"] == ""
    assert state["blocked_users"] == 1
    assert [(f["name"], f["loaded"]) for f in state["files"]] == [
        ("country", False), ("asn", True), ("incidents", True)]

    metrics = daemon.query("metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        scraped = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for text in (metrics, scraped):
        lines = set(text.splitlines())
        assert 'lookupd_connect_verdicts_total{action="deny",rule="incidents",would="none"} ' \
               '3.0' in lines
        assert 'lookupd_requests_total{outcome="error",verb="unknown"} 1.0' in lines
        assert 'lookupd_requests_total{outcome="ok",verb="connect"} 3.0' in lines
        assert 'lookupd_dnsbl_list_up{list="all.test",state="quarantined-lists-everything"} ' \
               '0.0' in lines
        assert "lookupd_users_blocked 1.0" in lines
        assert "lookupd_health 1.0" in lines and "lookupd_fail_open 0.0" in lines
        assert 'lookupd_database_loaded{database="country",path=""} 0.0' in lines
        assert "lookupd_database_rows{database=\"incidents\"} 4056.0" in lines
        assert any(line.startswith('lookupd_answer_seconds_bucket{le="+Inf",verb="connect"} ')
                   for line in lines)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert err.value.code == 404
    err.value.close()


def test_status_of_a_healthy_daemon_is_ok(start_lookupd: StartLookupd) -> None:
    country_db = MAXMIND / "GeoIP2-Country-Test.mmdb"
    daemon = start_lookupd(f'[geoip]\ncountry_db = "{country_db}"\n')
    # MaxMind's test database was built long ago: stale, as a real one would be if
    # geoipupdate had stopped.
    stale = cli("status", "--socket", str(daemon.socket))
    assert stale.returncode == 1, stale
    assert f"  ! country: {country_db} was built " in stale.stdout
    assert "days ago: is geoipupdate still running?" in stale.stdout
    daemon.config_path.write_text(f'[geoip]\ncountry_db = "{country_db}"\nstale_after = 0\n'
                                  '[dnsbl]\nlist = []\nnameservers = ["127.0.0.1:9"]\n'
                                  '[users]\nnotify_command = ""\n')
    assert cli("reload", "--socket", str(daemon.socket)).returncode == 0
    shown = cli("status", "--socket", str(daemon.socket))
    assert shown.returncode == 0, shown
    assert shown.stdout.splitlines()[0].endswith(": OK")
    assert "  ! " not in shown.stdout
    assert "(last reload: ok)" in shown.stdout


def test_status_critical_when_fail_open_or_not_answering(start_lookupd: StartLookupd,
                                                         sockdir: Path) -> None:
    daemon = start_lookupd("[connect]\nbogus = 1\n")
    shown = cli("status", "--socket", str(daemon.socket))
    assert shown.returncode == 2, shown
    assert "FAIL-OPEN:" in shown.stdout and "connect.bogus" in shown.stdout
    assert "lookupd_fail_open 1.0" in daemon.query("metrics").splitlines()
    gone = cli("status", "--socket", str(sockdir / "nothing.sock"))
    assert gone.returncode == 2
    assert gone.stdout.startswith(f"CRITICAL: lookupd is not answering on {sockdir}/nothing.sock")
