"""`lookupd snippets install|uninstall`: put the Exim snippets into a configuration tree and
take them out again, leaving the tree byte for byte as it was.

A plan (pure: what to copy, what to set aside, what stops the install) is made from the tree
and the snippets; `apply` carries it out and writes a manifest beside the tree
(ETC/lookupd-snippets.json) that `uninstall` reverts from. No file of the tree is edited in
place: snippets are added, a setting is added in a file of its own, and a file lookupd
replaces (sympl-email-changes' DNSBL, PTR and firewall database checks) is moved out of the
tree into ETC/lookupd-snippets.orig/, whence uninstall puts it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lookupd.errors import LookupdError

Layout = Literal["debian", "sympl", "single"]
MANIFEST = "lookupd-snippets.json"
ORIGINALS = "lookupd-snippets.orig"

# Where each layout's snippets go, relative to ETC (/etc/exim4), from exim-snippets/.
FILES: dict[str, dict[str, str]] = {
    "debian": {
        "conf.d/main/00_lookupd_macros": "debian/conf.d/main/00_lookupd_macros",
        "conf.d/acl/35_lookupd_check_connect": "debian/conf.d/acl/35_lookupd_check_connect",
        "conf.d/acl/35_lookupd_check_auth": "debian/conf.d/acl/35_lookupd_check_auth",
        "conf.d/acl/35_lookupd_check_rcpt": "debian/conf.d/acl/35_lookupd_check_rcpt",
        "conf.d/acl/35_lookupd_check_quit": "debian/conf.d/acl/35_lookupd_check_quit",
    },
    "sympl": {
        "sympl.d/00-main/45-lookupd-macros": "sympl/sympl.d/00-main/45-lookupd-macros",
        "sympl.d/10-acl/10-acl-check-connect/40-lookupd":
            "sympl/sympl.d/10-acl/10-acl-check-connect/40-lookupd",
        "sympl.d/10-acl/45-acl-lookupd-check-auth/10-lookupd-auth":
            "sympl/sympl.d/10-acl/45-acl-lookupd-check-auth/10-lookupd-auth",
        "sympl.d/10-acl/46-acl-lookupd-check-quit/10-lookupd-quit":
            "sympl/sympl.d/10-acl/46-acl-lookupd-check-quit/10-lookupd-quit",
        "sympl.d/10-acl/50-acl-check-rcpt/05-lookupd-user":
            "sympl/sympl.d/10-acl/50-acl-check-rcpt/05-lookupd-user",
    },
    "single": {"lookupd-exim.conf": "single-file/exim.conf"},
}
ROOTS = {"debian": "conf.d", "sympl": "sympl.d", "single": ""}

# sympl-email-changes' connect checks that lookupd's `connect` verdict does (DNSBL, PTR
# required, the firewall database): two of them in one ACL would refuse twice.
_REPLACED = re.compile(r"(2[1-9]-dnsbl-.*|2[1-9]-check-sender-host-name.*|30-check-.*-db.*)")
_SETS = re.compile(
    r"(?m)^\s*(acl_smtp_connect|acl_smtp_auth|acl_smtp_quit|acl_smtp_notquit)\s*=")
# Sympl's Makefile takes only files named like this.
_SYMPL_NAME = re.compile(r"[a-z0-9][a-z0-9-]+")
SYMPL_LOCAL = "sympl.d/00-main/44-lookupd-install"
# Embedded Perl doing what lookupd answers: the GeoIP country (sympl-email-changes'
# get_geo, and the like) and the interpreter it needs.
_PERL_GEO = re.compile(r"\$\{perl\{(get_geo\w*|\w*country\w*)\}", re.IGNORECASE)
_PERL_STARTUP = re.compile(r"(?m)^\s*perl_startup\s*=")
# An `accept` statement with an `authenticated =` condition (before the next verb).
_ACCEPTS_AUTHENTICATED = re.compile(
    r"(?ms)^\s*accept\b(?:(?!^\s*(?:accept|deny|defer|discard|drop|require|warn)\b).)*?"
    r"(?<![!\w])authenticated\s*=")


class InstallError(LookupdError):
    """The tree cannot take the snippets as they are (the reason says what to do)."""


@dataclass
class Plan:
    """What install does, relative to ETC; `notes` say what it found and why."""

    layout: str
    copies: dict[str, str] = field(default_factory=dict)   # tree path -> snippet path
    writes: dict[str, str] = field(default_factory=dict)   # tree path -> text
    aside: list[str] = field(default_factory=list)         # tree paths moved to ORIGINALS
    notes: list[str] = field(default_factory=list)


def default_snippets() -> Path:
    """The packaged snippets, else the source tree's."""
    for candidate in (Path("/usr/share/doc/lookupd/exim-snippets"),
                      Path(__file__).resolve().parent.parent / "exim-snippets"):
        if candidate.is_dir():
            return candidate
    raise InstallError("no exim-snippets directory found: give --snippets DIR")


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def plan(layout: Layout, etc: Path, snippets: Path) -> Plan:
    """The install plan for `etc` (pure apart from reading the tree)."""
    result = Plan(layout)
    root = etc / ROOTS[layout] if ROOTS[layout] else etc
    if layout != "single" and not root.is_dir():
        raise InstallError(f"{root} is not a directory: is this a {layout} configuration?")
    ours = set(FILES[layout])
    for rel, src in FILES[layout].items():
        if not (snippets / src).is_file():
            raise InstallError(f"{snippets / src} is missing: give --snippets DIR")
        dst = etc / rel
        if dst.exists() and dst.read_bytes() != (snippets / src).read_bytes():
            raise InstallError(f"{dst} exists and differs from lookupd's {src}: remove it "
                               "or uninstall first")
        if not dst.exists():
            result.copies[rel] = src
    others = [p for p in (_tree_files(root) if layout != "single" else [])
              if str(p.relative_to(etc)) not in ours
              and (layout != "sympl" or _SYMPL_NAME.fullmatch(p.name))]
    setters = {m.group(1): p for p in others for m in _SETS.finditer(_read(p))}
    if layout == "debian" and setters:
        option, path = next(iter(setters.items()))
        raise InstallError(f"{path} sets {option} already; lookupd's main/00_lookupd_macros "
                           "sets it too. See exim-snippets/README.md (\"Debian, split "
                           "configuration\") for hooking lookupd's ACLs into your own.")
    if layout == "debian":
        _check_debian_split(etc)
        result.notes.append("Debian: MAIN_ACL_CHECK_RCPT now points at acl_lookupd_check_rcpt, "
                            "which hands over to Debian's acl_check_rcpt")
    if layout == "sympl":
        if "acl_smtp_connect" not in setters:
            result.notes.append("Sympl: no file sets acl_smtp_connect; the connect statements "
                                "will not run")
        local = []
        for options, macro, what in (
                (("acl_smtp_auth",), "LOOKUPD_NO_AUTH_ACL", "AUTH checks"),
                (("acl_smtp_quit", "acl_smtp_notquit"), "LOOKUPD_NO_QUIT_ACL",
                 "strikes at the end of a connection")):
            option = next((o for o in options if o in setters), None)
            if option is None:
                continue
            where = setters[option].relative_to(etc)
            if (etc / SYMPL_LOCAL).exists():
                if not re.search(rf"(?m)^\s*{macro}\s*=", _read(etc / SYMPL_LOCAL)):
                    raise InstallError(
                        f"{where} sets {option}, and {etc / SYMPL_LOCAL} (kept from an "
                        f"earlier install) does not define {macro}: add the line "
                        f"'{macro} = yes' to it, or Exim refuses the configuration "
                        "(\"set for the second time\")")
                continue
            local.append(f"# {where} sets {option} already, so lookupd's 45-lookupd-macros "
                         f"must not.\n{macro} = yes\n")
            result.notes.append(f"Sympl: {where} sets {option}: {macro} set in {SYMPL_LOCAL} "
                                f"(lookupd's {what} are then not hooked in; call its ACL "
                                "from yours, see the README)")
        if local:
            result.writes[SYMPL_LOCAL] = ("# Written by `lookupd snippets install`.\n"
                                          + "".join(local))
        rcpt = "sympl.d/10-acl/50-acl-check-rcpt/05-lookupd-user"
        for path in others:
            rel = str(path.relative_to(etc))
            # lookupd's RCPT statements must run before authenticated senders are accepted.
            if (path.parent.name == "50-acl-check-rcpt" and rel < rcpt
                    and _ACCEPTS_AUTHENTICATED.search(_read(path))):
                result.notes.append(f"Sympl: {rel} may accept authenticated senders before "
                                    f"{rcpt} runs: renumber one of them (see the README)")
        for path in others:
            if path.parent.name == "10-acl-check-connect" and _REPLACED.fullmatch(path.name):
                result.aside.append(str(path.relative_to(etc)))
                result.notes.append(f"Sympl: {path.relative_to(etc)} set aside (lookupd's "
                                    "connect verdict does this check)")
    result.notes.extend(_perl_notes(etc, others))
    if layout == "single" and (etc / "lookupd-exim.conf").exists() and not result.copies:
        result.notes.append("single: lookupd-exim.conf is there already")
    return result


_SPLIT = re.compile(r"""(?m)^\s*dc_use_split_config\s*=\s*['"]?(\w*)""")


def _check_debian_split(etc: Path) -> None:
    """conf.d is read only with Debian's split configuration; a hand-written exim4.conf is
    read instead of anything update-exim4.conf builds. Either way the snippets would sit
    there unread: say so, and change nothing."""
    if (etc / "exim4.conf").exists():
        raise InstallError(f"{etc / 'exim4.conf'} exists: Exim reads it, not the "
                           "configuration update-exim4.conf builds from conf.d. Paste the "
                           "snippets into it by hand, or use --layout single as a model "
                           "(see exim-snippets/README.md)")
    settings = etc / "update-exim4.conf.conf"
    if not settings.exists():
        return  # not debconf-managed: conf.d is what the admin builds from
    found = _SPLIT.search(_read(settings))
    if found is None or found.group(1) != "true":
        raise InstallError(
            f"{settings} has dc_use_split_config={found.group(1) if found else 'unset'}: "
            "Debian builds Exim's configuration from exim4.conf.template, and files in conf.d "
            "are not read. Switch to the split configuration (dpkg-reconfigure exim4-config, "
            "or dc_use_split_config='true' there, then update-exim4.conf) and install again, "
            "or see exim-snippets/README.md, \"Debian, one-file configuration\"")


def _perl_notes(etc: Path, files: list[Path]) -> list[str]:
    """Where the tree asks embedded Perl for the country: what to take out once lookupd's
    connect ACL sets $acl_c_ipcountry (left to the admin: it is their file)."""
    notes: list[str] = []
    geo = False
    for path in files:
        text = _read(path)
        for number, line in enumerate(text.splitlines(), 1):
            found = None if line.lstrip().startswith("#") else _PERL_GEO.search(line)
            if found:
                geo = True
                notes.append(f"{path.relative_to(etc)}:{number} asks embedded Perl for the "
                             f"country (${{perl{{{found.group(1)}}}...}}): lookupd's connect "
                             "statements set $acl_c_ipcountry already, for everything after "
                             "them; once every check that reads $acl_c_ipcountry comes after "
                             "lookupd's, remove that statement")
    if geo:
        for path in files:
            for number, line in enumerate(_read(path).splitlines(), 1):
                if _PERL_STARTUP.match(line):
                    notes.append(f"{path.relative_to(etc)}:{number} loads Perl "
                                 "(perl_startup): once nothing calls ${perl{...}}, remove it "
                                 "and Exim starts no interpreter")
    return notes


# --- carrying an existing setup over into lookupd.toml -----------------------------------------

_MACRO = re.compile(r"(?m)^[ \t]*([A-Z][A-Z0-9_]*)[ \t]*=[ \t]*(.*?)[ \t]*$")
_DNSBL_NAMES = {"spamhaus": "zen.spamhaus.org", "spamcop": "bl.spamcop.net",
                "barracuda": "b.barracudacentral.org"}


@dataclass(frozen=True)
class Setting:
    """One setting found in the Exim tree, as lookupd.toml would say it (`value` is TOML;
    `secret`: never shown); `value` "" for a setting lookupd cannot take (`why` says)."""

    section: str
    key: str
    value: str
    source: str
    why: str = ""
    secret: bool = False


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def read_settings(etc: Path) -> list[Setting]:
    """What the reference setups (sympl-email-changes, Lena's recipe, the Debian one) set in
    `etc`, as lookupd settings."""
    found: list[Setting] = []
    for path in _tree_files(etc):
        if ORIGINALS in path.parts or path.name == MANIFEST:
            continue
        rel = str(path.relative_to(etc))
        for match in _MACRO.finditer(_read(path)):
            name, value = match.groups()
            where = f"{name} in {rel}"
            if name in ("NFTFW_INCIDENT_THRESHOLD", "SYMPL_INCIDENT_THRESHOLD"):
                if value.isdigit():
                    found.append(Setting("connect", "incidents_threshold", value, where))
                else:
                    found.append(Setting("connect", "incidents_threshold", "", where,
                                         f"not a number: {value!r}"))
            elif name == "SYMPL_DB":
                found.append(Setting("incidents", "db", _toml_string(value), where))
                found.append(Setting("incidents", "schema", '"sympl"', where))
            elif name == "SPAMHAUS_DQ_KEY":
                found.append(Setting("dnsbl", "dqs_key", _toml_string(value), where,
                                     secret=True))
            elif name == "DNSBL_CHECK_IN_CONNECT":
                found.append(Setting("connect", "deny_on_dnsbl", "true", where))
                lists = [_DNSBL_NAMES.get(x.strip(), x.strip()) for x in value.split(":")]
                found.append(Setting("dnsbl", "list", "", where,
                                     "lookupd's default lists are zen.spamhaus.org, "
                                     "bl.spamcop.net, b.barracudacentral.org and "
                                     "dbl.spamhaus.org; this setup checked "
                                     + ", ".join(x for x in lists if x)
                                     + ": set [[dnsbl.list]] by hand if that differs"))
        if path.parent.name == "10-acl-check-connect" and re.fullmatch(
                r"2[1-9]-check-sender-host-name", path.name):
            found.append(Setting("connect", "deny_no_ptr", "true", f"{rel} (PTR required)"))
    files = [("whitelist_connect_hosts", "connect", "allowlist_files"),
             ("whitelist/hosts_by_ip", "connect", "allowlist_files"),
             ("blocked_authenticated_users", "users", "lsearch_file")]
    allow: list[str] = []
    for name, section, key in files:
        path = etc / name
        if path.is_file() and key == "allowlist_files":
            allow.append(str(path))
        elif path.is_file():
            found.append(Setting(section, key, _toml_string(str(path)), str(path)))
        elif path.exists():
            found.append(Setting(section, key, "", str(path), "not a file"))
    if allow:
        found.append(Setting("connect", "allowlist_files",
                             "[" + ", ".join(_toml_string(a) for a in allow) + "]",
                             ", ".join(allow)))
    return found


def settings_toml(settings: list[Setting]) -> str:
    """The settings lookupd can take, as a lookupd.toml fragment (the last one of a key
    wins, as Exim's last macro definition would)."""
    sections: dict[str, dict[str, str]] = {}
    for setting in settings:
        if setting.value:
            sections.setdefault(setting.section, {})[setting.key] = setting.value
    return "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                   for section, keys in sections.items())


def describe_settings(settings: list[Setting]) -> list[str]:
    lines = []
    for s in settings:
        if s.value:
            shown_value = "(the key, not shown)" if s.secret else s.value
            lines.append(f"carry over: [{s.section}] {s.key} = {shown_value} (from {s.source})")
        else:
            lines.append(f"not carried over: [{s.section}] {s.key} (from {s.source}): {s.why}")
    return lines


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def describe(p: Plan, etc: Path) -> list[str]:
    lines = [f"copy {p.copies[rel]} -> {etc / rel}" for rel in p.copies]
    lines += [f"write {etc / rel}" for rel in p.writes]
    lines += [f"set aside {etc / rel} -> {etc / ORIGINALS / rel}" for rel in p.aside]
    lines += [f"note: {note}" for note in p.notes]
    if not (p.copies or p.writes or p.aside):
        lines.append("nothing to do: lookupd's snippets are installed")
    return lines


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply(p: Plan, etc: Path, snippets: Path) -> None:
    """Carry out the plan and record it in the manifest (merged with an earlier one)."""
    manifest_path = etc / MANIFEST
    manifest: dict[str, Any] = _load(manifest_path) if manifest_path.exists() else {
        "layout": p.layout, "created": {}, "dirs": [], "aside": []}
    if manifest["layout"] != p.layout:
        raise InstallError(f"{manifest_path} records a {manifest['layout']} install: "
                           "uninstall it first")
    new_files = {rel: (snippets / src).read_bytes() for rel, src in p.copies.items()}
    new_files |= {rel: text.encode() for rel, text in p.writes.items()}
    for rel, data in new_files.items():
        dst = etc / rel
        for parent in reversed(dst.relative_to(etc).parents[:-1]):
            if not (etc / parent).exists():
                (etc / parent).mkdir()
                manifest["dirs"].append(str(parent))
        dst.write_bytes(data)
        os.chmod(dst, 0o644)
        manifest["created"][rel] = _digest(dst)
    for rel in p.aside:
        target = etc / ORIGINALS / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(etc / rel, target)
        manifest["aside"].append(rel)
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InstallError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or not {"layout", "created", "dirs", "aside"} <= set(data):
        raise InstallError(f"{path} is not lookupd's install manifest")
    return data


def uninstall(etc: Path, *, dry_run: bool = False) -> list[str]:
    """Revert what the manifest records; a snippet changed since is kept (and said)."""
    manifest_path = etc / MANIFEST
    if not manifest_path.exists():
        return [f"nothing to do: no {manifest_path}"]
    manifest = _load(manifest_path)
    said: list[str] = []
    kept = False
    for rel, digest in manifest["created"].items():
        path = etc / rel
        if not path.exists():
            said.append(f"already gone: {path}")
        elif _digest(path) != digest:
            said.append(f"kept {path}: changed since install (remove it yourself)")
            kept = True
        else:
            said.append(f"remove {path}")
            if not dry_run:
                path.unlink()
    for rel in manifest["aside"]:
        said.append(f"put back {etc / rel}")
        if not dry_run:
            os.replace(etc / ORIGINALS / rel, etc / rel)
    for rel in sorted(manifest["dirs"], key=lambda d: -d.count("/")):
        path = etc / rel
        if path.is_dir() and not any(path.iterdir()) and not dry_run:
            path.rmdir()
            said.append(f"remove directory {path}")
    if not dry_run:
        originals = etc / ORIGINALS
        if originals.is_dir():
            for d in sorted((p for p in originals.rglob("*") if p.is_dir()),
                            key=lambda p: -len(p.parts)):
                if not any(d.iterdir()):
                    d.rmdir()
            if not any(originals.iterdir()):
                originals.rmdir()
        if not kept:
            manifest_path.unlink()
    return said


def install(layout: Layout, etc: Path, snippets: Path, *, dry_run: bool = False,
            lookupd_toml: Path | None = None) -> list[str]:
    """Install; the settings found are said, and written to `lookupd_toml` when it does not
    exist yet (an existing one is never edited: the fragment is printed to merge by hand)."""
    p = plan(layout, etc, snippets)
    settings = read_settings(etc)
    lines = describe(p, etc) + describe_settings(settings)
    fragment = settings_toml(settings)
    if fragment and lookupd_toml is not None:
        if lookupd_toml.exists():
            lines.append(f"note: {lookupd_toml} exists: add the settings above to it by hand")
        else:
            lines.append(f"write {lookupd_toml} (the settings above)")
            if not dry_run:
                lookupd_toml.parent.mkdir(parents=True, exist_ok=True)
                lookupd_toml.write_text("# Carried over from the Exim configuration by "
                                        "`lookupd snippets install`.\n\n" + fragment)
                os.chmod(lookupd_toml, 0o640)  # it may hold the DQS key
    if not dry_run:
        apply(p, etc, snippets)
    return lines


# --- the command line (`lookupd snippets ...`) -------------------------------------------------


def add_snippets_parser(subparsers: Any) -> None:
    snippets = subparsers.add_parser(
        "snippets", help="install or uninstall lookupd's Exim snippets",
        description="Copy lookupd's Exim snippets into a configuration tree (reversibly: "
                    "ETC/lookupd-snippets.json records what was done), or take them out.")
    sub = snippets.add_subparsers(dest="snippets_command", required=True, metavar="ACTION")
    install_p = sub.add_parser("install", help="copy the snippets in")
    install_p.add_argument("--layout", required=True, choices=("debian", "sympl", "single"))
    uninstall_p = sub.add_parser("uninstall", help="revert what install did")
    for p in (install_p, uninstall_p):
        p.add_argument("--etc", type=Path, default=Path("/etc/exim4"), metavar="DIR",
                       help="Exim's configuration directory (default /etc/exim4)")
        p.add_argument("--dry-run", action="store_true", help="say what would be done")
    install_p.add_argument("--snippets", type=Path, metavar="DIR",
                           help="the exim-snippets directory (default: the packaged one)")
    install_p.add_argument("--lookupd-config", type=Path, metavar="FILE",
                           help="write the settings carried over from Exim's configuration "
                                "here when the file does not exist yet (default: only say "
                                "them)")


def run_snippets(args: Any) -> int:
    """Print each step; os.EX_* exit codes (InstallError: EX_DATAERR, said on stderr)."""
    import sys
    try:
        if args.snippets_command == "install":
            lines = install(args.layout, args.etc, args.snippets or default_snippets(),
                            dry_run=args.dry_run, lookupd_toml=args.lookupd_config)
        else:
            lines = uninstall(args.etc, dry_run=args.dry_run)
    except InstallError as exc:
        print(f"lookupd snippets: {exc}", file=sys.stderr)
        return os.EX_DATAERR
    prefix = "would " if args.dry_run else ""
    for line in lines:
        print(line if line.startswith(("note:", "nothing", "kept", "already", "carry",
                                       "not carried")) else prefix + line)
    if not args.dry_run and args.snippets_command == "install":
        print("then rebuild and check Exim's configuration (Debian: update-exim4.conf && "
              "exim4 -bV; Sympl: cd /etc/exim4 && make && exim4 -bV) and reload Exim")
    return os.EX_OK
