"""The pure protocol: request framing and parsing, reply encoding."""

from __future__ import annotations

import pytest

from lookupd.errors import BadRequest
from lookupd.protocol import (
    ERR_EMPTY,
    ERR_NOT_ASCII,
    ERR_TOO_LONG,
    MAX_REQUEST,
    Request,
    check_reply,
    parse_request,
    request_end,
    shown,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"ping", Request("ping", ())),
        (b"ping\n", Request("ping", ())),
        (b"ping\r\n", Request("ping", ())),
        (b"COUNTRY 81.2.69.142", Request("country", ("81.2.69.142",))),
        (b"country  81.2.69.142 \t", Request("country", ("81.2.69.142",))),
        (b"country ", Request("country", ())),
        (b"user-fail Bob@Example.COM x@y", Request("user-fail", ("Bob@Example.COM", "x@y"))),
        (b"a" * MAX_REQUEST, Request("a" * MAX_REQUEST, ())),
    ],
)
def test_parse_good(raw: bytes, expected: Request) -> None:
    assert parse_request(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"", ERR_EMPTY),
        (b"\n", ERR_EMPTY),
        (b"   \r\n", ERR_EMPTY),
        (b"a" * (MAX_REQUEST + 1), ERR_TOO_LONG),
        (b"ping\x00", ERR_NOT_ASCII),
        (b"country \xc3\xa9", ERR_NOT_ASCII),
        (b"\xff\xfe", ERR_NOT_ASCII),
        (b"ping\rpong", ERR_NOT_ASCII),
        (b"ping\x1b[2J", ERR_NOT_ASCII),
    ],
)
def test_parse_bad(raw: bytes, reply: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(raw)
    assert str(info.value) == reply


def test_request_end() -> None:
    assert request_end(b"ping") == -1
    assert request_end(b"ping\nmore") == 4


def test_shown_is_printable_and_short() -> None:
    assert shown("a\x00b\nc d") == "a?b?c d"
    assert len(shown("x" * 1000)) == 40


def test_reply_has_no_line_break() -> None:
    assert check_reply("GB") == b"GB"
    with pytest.raises(ValueError):
        check_reply("GB\n")
