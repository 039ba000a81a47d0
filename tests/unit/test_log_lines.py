"""A log record is one line: values from outside are escaped, tracebacks too."""

from __future__ import annotations

import logging

from esb.observe.context import cid_or_new
from esb.observe.logs import OneLineValues, bounded_traceback, escape_controls


def test_log_values_escaped_onto_one_line() -> None:
    assert escape_controls("a\nb\r\nc\x1bd\u2028e\tf") == "a\\nb\\r\\nc\\x1bd\\u2028e\tf"
    record = logging.LogRecord("esb", logging.INFO, __file__, 1, "path %s: %s", ("/x\nFORGED", 3), None)
    OneLineValues().filter(record)
    assert record.getMessage() == "path /x\\nFORGED: 3"
    try:
        raise ValueError("bad\nFORGED")
    except ValueError as exc:
        text = bounded_traceback(exc)
    assert text.splitlines()[-1] == "ValueError: bad\\nFORGED" and text.startswith("Traceback")


def test_a_cid_from_outside_is_a_plain_token_or_a_new_one() -> None:
    assert cid_or_new("order-17.a_b") == "order-17.a_b"
    for bad in ("cid\n", "cid\nFORGED", "x" * 65, "", None, b"cid", "a b"):
        fresh = cid_or_new(bad)
        assert fresh != bad and len(fresh) == 32, bad
