"""What an HTTP channel's JSON body decodes to, and which bodies are bad input."""

from __future__ import annotations

import pytest

from esb.errors import BadInput
from esb.server.http.channels import MAX_JSON_DEPTH, decode_json


def test_utf8_json_decodes_with_or_without_a_byte_order_mark_and_blank_is_empty() -> None:
    body = '{"name": "Zoë", "items": [1, 2.5, null, true]}'.encode()
    assert decode_json(body) == {"name": "Zoë", "items": [1, 2.5, None, True]}
    assert decode_json(b"\xef\xbb\xbf" + body) == decode_json(body)
    assert decode_json(b" \r\n ") == {}


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": ',  # truncated
        b"\xff\xfe{\x00}\x00",  # UTF-16: JSON between systems is UTF-8 (RFC 8259)
        b'{"a": "\xc3"}',  # invalid UTF-8
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    ],
)
def test_bodies_that_are_not_strict_utf8_json_are_bad_input(body: bytes) -> None:
    with pytest.raises(BadInput):
        decode_json(body)
