"""The one retry policy: intervals, log lines once per change of state, bounded ensure."""

import logging

import pytest

from esb.observe.retry import Retrying, RetryPolicy, ensure


def test_intervals_step_up_to_the_ceiling():
    policy = RetryPolicy(interval_start_s=0.5, interval_step_s=1.0, interval_max_s=2.0)
    assert [policy.interval_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 2.0, 2.0]


def test_an_outage_logs_one_warning_and_one_recovery(caplog):
    logger = logging.getLogger("esb.test.retry")
    retrying = Retrying(logger, "test loop")
    with caplog.at_level(logging.DEBUG, logger="esb.test.retry"):
        for _ in range(5):
            retrying.failed(ConnectionError("refused"))
        retrying.succeeded()
    levels = [record.levelno for record in caplog.records]
    assert levels.count(logging.WARNING) == 1
    assert levels.count(logging.INFO) == 1
    assert caplog.records[0].getMessage().startswith("Redis unreachable: test loop (ConnectionError: refused")
    assert caplog.records[-1].getMessage() == "Redis works again: test loop (after 5 failed attempts)"
    assert not retrying.is_failing and retrying.last_error is None


def test_ensure_gives_up_after_max_retries():
    calls = []

    def always_fails():
        calls.append(1)
        raise ConnectionError("down")

    retrying = Retrying(logging.getLogger("esb.test.retry"), "x", RetryPolicy(max_retries=2))
    with pytest.raises(ConnectionError):
        ensure(always_fails, retry_on=(ConnectionError,), retrying=retrying, sleep=lambda _s: None)
    assert len(calls) == 3


def test_ensure_returns_once_the_call_succeeds():
    outcomes = iter([ConnectionError("a"), ConnectionError("b"), "ok"])

    def flaky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    retrying = Retrying(logging.getLogger("esb.test.retry"), "x")
    assert ensure(flaky, retry_on=(ConnectionError,), retrying=retrying, sleep=lambda _s: None) == "ok"
    assert retrying.failures == 0


def test_every_outage_line_names_the_service_that_went_away(caplog):
    retrying = Retrying(logging.getLogger("esb.test.retry"), "poll of worker 7", service="ODB")
    with caplog.at_level(logging.DEBUG, logger="esb.test.retry"):
        retrying.failed(OSError("gone"))
        retrying.failed(OSError("gone"))
        retrying.succeeded()
    messages = [record.getMessage() for record in caplog.records]
    assert all(m.startswith(("ODB unreachable: poll of worker 7", "ODB works again: poll of worker 7"))
               for m in messages), messages
