"""Exceptions lookupd raises on purpose; each message speaks to a mail admin."""

from __future__ import annotations


class LookupdError(Exception):
    """Base class: something an admin has to fix, said in words they can act on."""


class ConfigError(LookupdError):
    """The configuration file (or a command-line override) is not valid. `problems` holds
    every problem found, one message each; str() is all of them, one a line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BadRequest(LookupdError):
    """A client request that lookupd answers with `error <reason>`.

    The message is the short reason sent back on the wire: ASCII, no newline.
    """


class ListenError(LookupdError):
    """lookupd cannot get its listening socket (in use, no permission, bad path)."""
