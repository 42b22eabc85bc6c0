"""Suite `users`: `user` and `user-fail` against the C baseline, and the classic shell-out.

Issue 4's benchmark:
1. `user USER` (a read from memory) and `user-fail USER RECIPIENT` (an event written to
   sqlite, committed durably, before the answer) at 8 Exim-style clients, against the C
   baseline in the same rounds. The clients cycle through 1,000 user names, as a mail host's
   many users would (one name repeated would make a single user's window ever longer).
2. Side by side in `exim -be`, alternating: the classic recipe's
   `${run{/bin/sh -c "echo USER >> FILE"}}` against the same work through `${readsocket}`
   (`user-fail USER RECIPIENT`), one expansion per Exim process (one SMTP connection each)
   and N in one process.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

from bench import harness, pairs
from bench.harness import Contender, Context, SuiteResult, Table
from bench.realparts import exim_be, exim_config, exim_problem

DESCRIPTION = ("user / user-fail vs the C baseline at 8 clients; ${run} echo >> file vs"
               " ${readsocket} user-fail in exim -be")

# notify_command "": no mail; a limit never reached: every answer stays `ok`.
CONFIG = """\
[server]
# Exim's expansions may run as Debian-exim; the socket is in the bench's private directory.
socket_mode = "0666"
[dnsbl]
list = []
[users]
notify_command = ""
limit = 1000000000
"""
USERS = 1000
RECIPIENT = "no-such-user@example.org"


def run(ctx: Context) -> SuiteResult:
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(harness.baseline_server(ctx))
        lookupd = stack.enter_context(harness.lookupd_server(ctx, config=CONFIG))
        contenders = []
        for verb, suffix in (("user", ""), ("user-fail", f" {RECIPIENT}")):
            requests = ctx.workdir / f"{verb}.requests"
            requests.write_text("".join(f"{verb} bench{i:04d}{suffix}\n" for i in range(USERS)))
            contenders.append(Contender(f"lookupd {verb} USER{suffix}", lookupd.endpoint, verb,
                                        "ok", requests_file=requests))
        baseline = Contender(harness.BASELINE, base.endpoint, "ping", "pong")
        base_series, series = harness.alternate(ctx, baseline, contenders, (8,))
        tables = [Table(
            title=f"user and user-fail vs the C baseline ({ctx.settings.rounds} rounds, medians)",
            header=harness.RATIO_HEADER,
            rows=harness.ratio_rows(base_series, series),
            notes=(
                f"Clients cycle through {USERS} user names. user-fail commits each event to"
                " sqlite (WAL, synchronous=FULL, group commit) in the state directory"
                f" ({ctx.workdir}: the filesystem of the bench's temporary directory) before"
                " answering.",
                "x/C: lookupd's figure over the C baseline's `ping` in the same round.",
                *harness.problem_notes([*base_series, *series]),
            ),
        )]
        data: dict[str, object] = {"series": [s.to_json() for s in base_series + series]}
        problem = exim_problem()
        if problem is None:
            comparisons = exim_comparisons(ctx, lookupd.endpoint)
            tables.append(pairs.table(
                f"User block in exim -be: ${{run}} shell-out vs ${{readsocket}}"
                f" ({ctx.settings.rounds} rounds)", comparisons, NOTES))
            data["exim"] = [c.to_json() for c in comparisons]
        else:
            tables.append(Table("User block in exim -be", ("skipped",), (),
                                (f"not measured: {problem}",)))
    return SuiteResult("users", tuple(tables), data,
                       failed_queries=sum(s.failed for s in [*base_series, *series]))


NOTES = (
    "The other way: `${run{/bin/sh -c \"echo USER >> FILE\"}{done}{failed}}`, the classic"
    " recipe's shell-out (without its `| exim abuse@` mail). Through lookupd:"
    f" `${{readsocket{{SOCKET}}{{user-fail USER {RECIPIENT}}}{{3s}}{{}}{{down}}}}`, which also"
    " keeps the event's time and recipient, counts the window and commits durably."
    " A new user name for every expansion on both sides.",
)


def exim_comparisons(ctx: Context, endpoint: harness.Endpoint,
                     rounds: int | None = None) -> list[pairs.Comparison]:
    """The shell-out against `user-fail` through ${readsocket}: one per process and N in one."""
    workdir = ctx.workdir / "exim-users"
    config = exim_config(workdir, "")
    blocked = workdir / "blocked_authenticated_users"
    names = (f"exim{i}" for i in itertools.count())

    def shell(user: str) -> str:
        return f'${{run{{/bin/sh -c "echo {user} >> {blocked}"}}{{done}}{{failed}}}}'

    def readsocket(user: str) -> str:
        return f"${{readsocket{{{endpoint}}}{{user-fail {user} {RECIPIENT}}}{{3s}}{{}}{{down}}}}"

    def way(label: str, expand: Callable[[str], str], answer: str, n: int) -> pairs.Way:
        def once() -> float:
            lines = [expand(next(names)) for _ in range(n)]
            return exim_be(config, lines, [answer] * n)

        return pairs.Way(label, once)

    return pairs.compare_in_exim(
        ctx, "user block",
        lambda n: way("${run} sh -c echo >> file", shell, "done", n),
        lambda n: way("${readsocket} user-fail", readsocket, "ok", n),
        rounds)

