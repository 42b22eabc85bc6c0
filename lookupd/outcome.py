"""Outcomes shared by every source: a lookup finds, finds nothing, or cannot tell (and why)."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """How a lookup ended. UNKNOWN is a temporary failure, never a "no"."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"
