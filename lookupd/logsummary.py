"""Repeated warnings, summarised: a flood of bad clients must not flood the journal.

journald drops a unit's lines past its rate limit (10,000 in 30 s by default), and then the
line that mattered is lost with the noise. Each kind of warning is logged at once the first
time, then at most one summary line a period with how many more there were.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

PERIOD = 60.0


@dataclass
class _Window:
    until: float
    more: int = 0


class Repeats:
    """Rate-limits WARNINGs per kind. `what` names the kind in the summary line."""

    def __init__(self, logger: logging.Logger, period: float = PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._period = period
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, what: str, msg: str, *args: object) -> None:
        now = self._clock()
        window = self._windows.get(what)
        if window is None or now >= window.until:
            if window is not None:
                self._flush(what)
            self._windows[what] = _Window(now + self._period)
            self._log.warning(msg, *args)
            return
        window.more += 1
        if window.more == 1:  # report the window's count when it ends, flood over or not
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_later(max(0.0, window.until - now), self._flush, what)

    def _flush(self, what: str) -> None:
        window = self._windows.get(what)
        if window is not None and window.more:
            self._log.warning("%d more %s in the last %.0fs (one line a minute for each kind "
                              "of problem)", window.more, what, self._period)
            window.more = 0
