"""`lookupd snippets install|uninstall` on Debian's own conf.d and on a Sympl-layout tree built
like sympl-email-changes' (it sets acl_smtp_auth and has its own DNSBL connect check): the
result builds and runs `exim -bh` sessions, a second install does nothing, a dry run changes
nothing, and uninstall gives the tree back byte for byte."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support import EXIM
from test_snippets import DEBIAN_CONFD, SNIPPETS, SYMPL_BASE, UPDATE_EXIM4_CONF, bh

from lookupd.cli import main
from lookupd.config import load_config

pytestmark = pytest.mark.skipif(not Path(EXIM).exists(), reason="exim4 is not installed")

Snapshot = dict[str, tuple[bytes, int] | None]


def snapshot(root: Path) -> Snapshot:
    """Every file (bytes and mode) and directory under root."""
    return {str(p.relative_to(root)): ((p.read_bytes(), p.stat().st_mode) if p.is_file()
                                       else None)
            for p in sorted(root.rglob("*"))}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["snippets", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def debian_etc(tmp_path: Path) -> Path:
    if not DEBIAN_CONFD.is_dir() or not Path(UPDATE_EXIM4_CONF).exists():
        pytest.skip("Debian's exim4-config is not installed")
    etc = tmp_path / "exim4"
    shutil.copytree(DEBIAN_CONFD, etc / "conf.d")
    settings = Path("/etc/exim4/update-exim4.conf.conf").read_text()
    settings = re.sub(r"(?m)^dc_use_split_config=.*$", "dc_use_split_config='true'", settings)
    settings = re.sub(r"(?m)^dc_minimaldns=.*$", "dc_minimaldns='true'", settings)
    (etc / "update-exim4.conf.conf").write_text(settings)
    return etc


def build_debian_tree(etc: Path, out: Path) -> Path:
    subprocess.run([UPDATE_EXIM4_CONF, "-d", str(etc), "-o", str(out)], check=True,
                   capture_output=True, timeout=60, env={**os.environ, "TMPDIR": str(out.parent)})
    os.chmod(out, 0o644)
    return out


DQS_KEY = "abcdefghijklmnopqrstuvwxyz"

# sympl-email-changes' way: its settings, its own AUTH ACL, a DNSBL and a PTR check in the
# connect ACL.
SYMPL_EMAIL_CHANGES = {
    "00-main/21-connect-check": "#NFTFW_INCIDENT_THRESHOLD = 10\nSYMPL_INCIDENT_THRESHOLD = 12\n"
                                "SYMPL_DB = /var/lib/sympl/firewall-blacklist-count.db\n",
    "00-main/22-dns-check-in-connect": "DNSBL_CHECK_IN_CONNECT = spamhaus : spamcop\n",
    "00-main/35-spamhaus-key": f"SPAMHAUS_DQ_KEY = {DQS_KEY}\n",
    "00-main/60-auth-acl": "acl_smtp_auth = acl_check_auth\n",
    "10-acl/10-acl-check-connect/25-dnsbl-reject":
        "  deny  dnslists = zen.spamhaus.org\n         message = listed\n",
    "10-acl/10-acl-check-connect/27-check-sender-host-name":
        "  deny  !verify = reverse_host_lookup\n         message = no PTR\n",
    "10-acl/90-acl-check-auth/00-header": "acl_check_auth:\n  accept\n",
}


def sympl_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "exim4"
    etc.mkdir(parents=True)
    (etc / "whitelist_connect_hosts").write_text("192.0.2.1\n")
    (etc / "blocked_authenticated_users").write_text("")
    for name, text in {**SYMPL_BASE, **SYMPL_EMAIL_CHANGES}.items():
        path = etc / "sympl.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return etc


def build_sympl_tree(etc: Path, out: Path) -> Path:
    """As Sympl's Makefile: every well-named file of sympl.d in sorted path order."""
    parts = sorted(str(p) for p in (etc / "sympl.d").rglob("*")
                   if p.is_file() and re.fullmatch(r"[a-z0-9][a-z0-9-]+", p.name))
    out.write_text("".join(Path(p).read_text() + "\n" for p in parts))
    os.chmod(out, 0o644)
    return out


def check_exim(config: Path) -> None:
    proc = subprocess.run([EXIM, "-C", str(config), "-bV"], capture_output=True, timeout=30,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    session = bh(config, "203.0.113.7", port=25, sock=config.parent / "no-lookupd.sock")
    assert session.codes() == ["220", "221"], session.out
    assert session.logged("lookupd down: [203.0.113.7] accepted unchecked")


@pytest.mark.parametrize("layout", ["debian", "sympl"])
def test_install_builds_and_uninstall_reverts_byte_for_byte(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str) -> None:
    etc = debian_etc(tmp_path) if layout == "debian" else sympl_etc(tmp_path)
    build = build_debian_tree if layout == "debian" else build_sympl_tree
    before = snapshot(etc)
    common = ["--etc", str(etc)]

    code, out = run(capsys, "install", "--layout", layout, "--dry-run", "--snippets",
                    str(SNIPPETS), *common)
    assert code == 0 and "would copy" in out, out
    assert snapshot(etc) == before

    code, out = run(capsys, "install", "--layout", layout, "--snippets", str(SNIPPETS), *common)
    assert code == 0, out
    if layout == "sympl":
        assert "LOOKUPD_NO_AUTH_ACL set in sympl.d/00-main/44-lookupd-install" in out
        assert "sympl.d/10-acl/10-acl-check-connect/25-dnsbl-reject set aside" in out
        assert not (etc / "sympl.d/10-acl/10-acl-check-connect/25-dnsbl-reject").exists()
    check_exim(build(etc, tmp_path / "exim4.conf"))

    installed = snapshot(etc)
    code, out = run(capsys, "install", "--layout", layout, "--snippets", str(SNIPPETS), *common)
    assert code == 0 and "nothing to do" in out, out
    assert snapshot(etc) == installed

    code, out = run(capsys, "uninstall", "--dry-run", *common)
    assert code == 0 and snapshot(etc) == installed, out
    code, out = run(capsys, "uninstall", *common)
    assert code == 0, out
    assert snapshot(etc) == before


def test_sympl_without_the_installer_fails_as_the_issue_says(tmp_path: Path) -> None:
    """The README's old `cp -r` on a tree that sets acl_smtp_auth: Exim refuses it."""
    etc = sympl_etc(tmp_path)
    shutil.copytree(SNIPPETS / "sympl" / "sympl.d", etc / "sympl.d", dirs_exist_ok=True)
    config = build_sympl_tree(etc, tmp_path / "exim4.conf")
    proc = subprocess.run([EXIM, "-C", str(config), "-bV"], capture_output=True, timeout=30,
                          check=False)
    assert proc.returncode != 0
    assert "set for the second time" in proc.stderr.decode() + proc.stdout.decode()


def test_a_changed_snippet_is_kept_and_a_conflict_stops_install(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc = sympl_etc(tmp_path)
    common = ["--etc", str(etc)]
    assert run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
               *common)[0] == 0
    macros = etc / "sympl.d/00-main/45-lookupd-macros"
    macros.write_text(macros.read_text() + "# the admin's change\n")
    code, out = run(capsys, "uninstall", *common)
    assert code == 0 and f"kept {macros}: changed since install" in out
    assert macros.exists() and (etc / "lookupd-snippets.json").exists()

    debian = debian_etc(tmp_path / "d")
    (debian / "conf.d/main/01_mine").write_text("acl_smtp_connect = acl_mine\n")
    code, out = run(capsys, "install", "--layout", "debian", "--snippets", str(SNIPPETS),
                    "--etc", str(debian))
    assert code == os.EX_DATAERR and "sets acl_smtp_connect already" in out
    assert not (debian / "lookupd-snippets.json").exists()


def test_a_tree_with_its_own_quit_acl(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    """Sympl: a tree that sets acl_smtp_notquit gets LOOKUPD_NO_QUIT_ACL beside
    LOOKUPD_NO_AUTH_ACL and still builds; Debian: install stops, changing nothing."""
    etc = sympl_etc(tmp_path)
    (etc / "sympl.d/00-main/61-notquit").write_text("acl_smtp_notquit = acl_lookupd_check_quit\n")
    code, out = run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
                    "--etc", str(etc))
    assert code == 0, out
    assert "sets acl_smtp_notquit: LOOKUPD_NO_QUIT_ACL set in " in out
    local = (etc / "sympl.d/00-main/44-lookupd-install").read_text()
    assert "LOOKUPD_NO_AUTH_ACL = yes" in local and "LOOKUPD_NO_QUIT_ACL = yes" in local
    check_exim(build_sympl_tree(etc, tmp_path / "exim4.conf"))

    # 44-lookupd-install kept from an earlier install, without the macro: install stops.
    kept = sympl_etc(tmp_path / "k")
    (kept / "sympl.d/00-main/61-notquit").write_text("acl_smtp_notquit = acl_mine\n")
    (kept / "sympl.d/00-main/44-lookupd-install").write_text("LOOKUPD_NO_AUTH_ACL = yes\n")
    code, out = run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
                    "--etc", str(kept))
    assert code == os.EX_DATAERR and "does not define LOOKUPD_NO_QUIT_ACL: add the line " \
        "'LOOKUPD_NO_QUIT_ACL = yes' to it" in out, out
    assert not (kept / "lookupd-snippets.json").exists()

    debian = debian_etc(tmp_path / "d")
    (debian / "conf.d/main/01_mine").write_text("acl_smtp_quit = acl_mine\n")
    code, out = run(capsys, "install", "--layout", "debian", "--snippets", str(SNIPPETS),
                    "--etc", str(debian))
    assert code == os.EX_DATAERR and "sets acl_smtp_quit already" in out


def test_embedded_perl_for_the_country_is_pointed_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tree that asks embedded Perl for the country: install says where, and that the
    connect ACL's $acl_c_ipcountry replaces it, and leaves the files alone."""
    etc = sympl_etc(tmp_path)
    perl = etc / "sympl.d/00-main/50-perl"
    perl.write_text("perl_startup = do '/etc/exim4/geoip.pl'\n")
    geo = etc / "sympl.d/10-acl/10-acl-check-connect/30-geoip"
    geo.write_text("  warn\n    set acl_c_ipcountry = ${perl{get_geo}{$sender_host_address}}\n"
                   "#  warn set acl_c_x = ${perl{get_geo}{$sender_host_address}}\n")
    before = (perl.read_bytes(), geo.read_bytes())
    code, out = run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
                    "--etc", str(etc))
    assert code == 0, out
    assert ("sympl.d/10-acl/10-acl-check-connect/30-geoip:2 asks embedded Perl for the country "
            "(${perl{get_geo}...}): lookupd's connect statements set $acl_c_ipcountry "
            "already") in out
    assert "30-geoip:3" not in out  # a comment
    assert "sympl.d/00-main/50-perl:1 loads Perl (perl_startup): once nothing calls" in out
    assert (perl.read_bytes(), geo.read_bytes()) == before
    # Without a ${perl{get_geo}} call, perl_startup is none of lookupd's business.
    other = sympl_etc(tmp_path / "o")
    (other / "sympl.d/00-main/50-perl").write_text("perl_startup = do '/etc/x.pl'\n")
    code, out = run(capsys, "install", "--layout", "sympl", "--dry-run", "--snippets",
                    str(SNIPPETS), "--etc", str(other))
    assert code == 0 and "perl_startup" not in out, out


def test_debian_one_file_configuration_is_refused_with_the_way_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Debian's default one-file configuration (and a hand-written exim4.conf) never reads
    conf.d: install says so and changes nothing, instead of copying files nobody reads."""
    etc = debian_etc(tmp_path)
    settings = etc / "update-exim4.conf.conf"
    split = settings.read_text()
    settings.write_text(split.replace("dc_use_split_config='true'",
                                      "dc_use_split_config='false'"))
    before = snapshot(etc)
    code, out = run(capsys, "install", "--layout", "debian", "--snippets", str(SNIPPETS),
                    "--etc", str(etc))
    assert code == os.EX_DATAERR, out
    assert "has dc_use_split_config=false: Debian builds Exim's configuration from " \
        "exim4.conf.template, and files in conf.d are not read" in out
    assert snapshot(etc) == before
    settings.write_text(split)
    (etc / "exim4.conf").write_text("# the admin's own\n")
    code, out = run(capsys, "install", "--layout", "debian", "--dry-run", "--snippets",
                    str(SNIPPETS), "--etc", str(etc))
    assert code == os.EX_DATAERR and "exim4.conf exists: Exim reads it" in out, out


def test_sympl_settings_are_carried_over_into_lookupd_toml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc = sympl_etc(tmp_path)
    toml = tmp_path / "lookupd" / "lookupd.toml"
    code, out = run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
                    "--etc", str(etc), "--lookupd-config", str(toml))
    assert code == 0, out
    assert DQS_KEY not in out
    for line in ("carry over: [connect] incidents_threshold = 12 (from SYMPL_INCIDENT_THRESHOLD",
                 "carry over: [dnsbl] dqs_key = (the key, not shown)",
                 "carry over: [connect] deny_no_ptr = true",
                 "carry over: [connect] deny_on_dnsbl = true",
                 "not carried over: [dnsbl] list",
                 f"carry over: [users] lsearch_file = \"{etc}/blocked_authenticated_users\""):
        assert line in out, out
    config = load_config(toml)
    assert config.connect.incidents_threshold == 12
    assert config.connect.deny_no_ptr and config.connect.deny_on_dnsbl
    assert config.connect.allowlist_files == (etc / "whitelist_connect_hosts",)
    assert config.incidents.db == Path("/var/lib/sympl/firewall-blacklist-count.db")
    assert config.incidents.schema == "sympl"
    assert config.dnsbl.dqs_key == DQS_KEY
    assert config.users.lsearch_file == etc / "blocked_authenticated_users"
    # An existing lookupd.toml is never edited.
    before = toml.read_bytes()
    assert run(capsys, "uninstall", "--etc", str(etc))[0] == 0
    code, out = run(capsys, "install", "--layout", "sympl", "--snippets", str(SNIPPETS),
                    "--etc", str(etc), "--lookupd-config", str(toml))
    assert f"note: {toml} exists: add the settings above to it by hand" in out
    assert toml.read_bytes() == before


def test_sympl_rcpt_order_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc = sympl_etc(tmp_path)
    early = etc / "sympl.d/10-acl/50-acl-check-rcpt/01-accept-authenticated"
    early.write_text("  accept\n    authenticated = *\n")
    code, out = run(capsys, "install", "--layout", "sympl", "--dry-run", "--snippets",
                    str(SNIPPETS), "--etc", str(etc))
    assert code == 0
    assert ("Sympl: sympl.d/10-acl/50-acl-check-rcpt/01-accept-authenticated may accept "
            "authenticated senders before") in out
    early.unlink()
    assert "may accept" not in run(capsys, "install", "--layout", "sympl", "--dry-run",
                                   "--snippets", str(SNIPPETS), "--etc", str(etc))[1]


def test_single_layout_writes_the_complete_file_and_takes_it_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc = tmp_path / "exim4"
    etc.mkdir()
    (etc / "exim4.conf").write_text("# the admin's own configuration\n")
    before = snapshot(etc)
    code, out = run(capsys, "install", "--layout", "single", "--snippets", str(SNIPPETS),
                    "--etc", str(etc))
    assert code == 0, out
    written = etc / "lookupd-exim.conf"
    assert written.read_bytes() == (SNIPPETS / "single-file" / "exim.conf").read_bytes()
    assert (etc / "exim4.conf").read_text() == "# the admin's own configuration\n"
    assert run(capsys, "uninstall", "--etc", str(etc))[0] == 0
    assert snapshot(etc) == before
