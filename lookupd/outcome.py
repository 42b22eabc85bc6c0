"""Outcomes shared by every source: a lookup finds, finds nothing, or cannot tell (and why)."""

from __future__ import annotations

import enum
from typing import Protocol


class Status(enum.Enum):
    """How a lookup ended. UNKNOWN is a temporary failure, never a "no"."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"


class Count(Protocol):
    """What a reused answer counts again (a DNS list's figures, a connect verdict), `n` times
    at once: the compiled front end's hits are counted with one call per kept reply."""

    def __call__(self, n: int = 1) -> None: ...
