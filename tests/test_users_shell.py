"""Commands suggested to the admin (the block mail, the log) are safe to paste into a shell:
hostile user names go through a real `lookupd serve`, its real notify_command, and `sh -c`."""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import StartLookupd
from support import REPO

from lookupd.cli import build_parser
from lookupd.users.decide import check_name, command

# Each passes Exim's ${escape:} (printable ASCII, or \ooo escapes) and lookupd's name check;
# pasted unquoted, most would run `touch pwned` (or create `pwned` by a redirection).
HOSTILE = [
    "x;touch${IFS}pwned;@example.org",
    "$(touch${IFS}pwned)",
    "`touch${IFS}pwned`",
    "o'brien;touch${IFS}pwned",
    "'';touch${IFS}pwned;''",
    'a"b";touch${IFS}pwned',
    "${IFS}touch${IFS}pwned",
    "-x;touch${IFS}pwned",
    "--config=/nonexistent",
    ">pwned",
    "a|touch${IFS}pwned&&b",
    "*",
    "~root",
    "a\\;touch${IFS}pwned",
    "jos\\303\\251",  # what ${escape:} makes of josé
]

# Records its argv (JSON, one line a call), then runs the real CLI with the test's config.
STUB = """#!/bin/sh
"$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$RECORD"
[ -n "$REAL" ] || exit 0
[ "$1" = users ] || exit 64
shift
exec "$PYTHON" -m lookupd users --config "$CONFIG" "$@"
"""


def test_command_quotes_and_ends_options() -> None:
    assert command("unblock", "alice@example.org") == "lookupd users unblock alice@example.org"
    assert command("unblock", "a;b") == "lookupd users unblock 'a;b'"
    assert command("history", "-rf") == "lookupd users history -- -rf"
    assert command("unblock", "it's") == "lookupd users unblock 'it'\"'\"'s'"


@pytest.mark.parametrize("name", ["a b", "a\tb", "a\nb"])
def test_names_with_white_space_never_get_that_far(name: str) -> None:
    """No space or control character in a name (the request line splits on spaces)."""
    with pytest.raises(Exception, match="space or a control character"):
        check_name(name, case_insensitive=False)


def run_pasted(line: str, tmp: Path, config: Path, *, real: bool) -> list[list[str]]:
    """`line` as an admin pasting it runs it: sh -c, in an empty directory (but one file, for
    `*`), with the stub first in PATH and the real tools after it."""
    where = tmp / f"run{len(list(tmp.iterdir()))}"
    where.mkdir()
    (where / "decoy").write_text("")
    record = where.parent / f"{where.name}.argv"
    env = {"PATH": f"{tmp.parent / 'bin'}:/usr/bin:/bin", "RECORD": str(record),
           "PYTHON": sys.executable, "CONFIG": str(config),
           "PYTHONPATH": str(REPO), "HOME": str(where)}
    if real:
        env["REAL"] = "1"
    run = subprocess.run(["sh", "-c", line], cwd=where, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, (line, run.stdout, run.stderr)
    assert sorted(os.listdir(where)) == ["decoy"], f"{line!r} left {os.listdir(where)}"
    assert not (where / "pwned").exists()
    return [json.loads(ln) for ln in record.read_text().splitlines()]


def test_suggested_commands_survive_a_shell(start_lookupd: StartLookupd, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "lookupd"
    stub.write_text(STUB)
    stub.chmod(0o755)
    mails = tmp_path / "mails"
    mails.mkdir()
    capture = tmp_path / "capture.sh"
    # Written beside, then moved in: a mail in `mails` is whole.
    partial = tmp_path / "partial"
    partial.mkdir()
    capture.write_text(f'#!/bin/sh\nt="$(mktemp "{partial}/mail.XXXXXX")"\ncat > "$t"\n'
                       f'mv "$t" "{mails}/"\n')
    capture.chmod(0o755)
    runs = tmp_path / "runs"
    runs.mkdir()

    users = f'[users]\nlimit = 2\ncase_insensitive = false\nnotify_command = "{capture}"\n'
    daemon = start_lookupd(users)
    # The CLI's config: the daemon's state directory (it got --state-dir), never the default.
    cli_config = tmp_path / "cli.toml"
    cli_config.write_text(f'[server]\nstate_dir = "{daemon.workdir / "state"}"\n{users}')
    for name in HOSTILE:
        assert check_name(name, case_insensitive=False) == name
        assert daemon.query(f"user-fail {name} a@example.org\n") == "ok"
        assert daemon.query(f"user-fail {name} b@example.org\n").startswith("blocked"), name
    deadline = time.monotonic() + 15
    while len(list(mails.iterdir())) < len(HOSTILE):
        assert time.monotonic() < deadline, f"{len(list(mails.iterdir()))} mails\n{daemon.log()}"
        time.sleep(0.05)

    seen = set()
    for path in mails.iterdir():
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        body = msg.get_content()
        name = next(ln.removeprefix("User:     ") for ln in body.splitlines()
                    if ln.startswith("User:     "))
        seen.add(name)
        dash = ["--"] if name.startswith("-") else []
        pasted = [ln.strip() for ln in body.splitlines() if ln.startswith("  lookupd users ")]
        assert [p.split()[2] for p in pasted] == ["unblock", "history"], body
        unblock, history = pasted

        assert run_pasted(history, runs, cli_config, real=False) == [["users", "history", *dash,
                                                                  name]]
        # The real CLI (0.7 s a run) for the names where quoting or option parsing is subtle.
        real = name.startswith("-") or "'" in name
        argv = run_pasted(unblock, runs, cli_config, real=real)
        assert argv == [["users", "unblock", *dash, name]]
        assert build_parser().parse_args(argv[0]).user == name
        if real:  # it unblocked exactly that user; the daemon follows within a second
            deadline = time.monotonic() + 5
            while daemon.query(f"user {name}\n") != "ok":
                assert time.monotonic() < deadline, f"{name!r} still blocked"
                time.sleep(0.05)
    assert seen == set(HOSTILE)

    # The log line's suggestion too: the command is the rest of the line.
    marker = "unblocks them with: "
    logged = {ln.split(marker, 1)[1] for ln in daemon.log().splitlines() if marker in ln}
    assert len(logged) == len(HOSTILE)
    recorded = [argv for line in sorted(logged)
                for argv in run_pasted(line, runs, cli_config, real=False)]
    assert sorted(a[-1] for a in recorded) == sorted(HOSTILE)
    assert all(a[:2] == ["users", "unblock"] and len(a) == 3 + a[-1].startswith("-")
               for a in recorded)
