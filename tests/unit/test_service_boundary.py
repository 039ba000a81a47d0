"""The service boundary (ServiceRuntime.run), pure: no Redis is touched by these services."""

from __future__ import annotations

import logging

import gevent
import pytest
from greenlet import GreenletExit

from esb.bus import Keys
from esb.errors import BadInput, ServiceFailed, ServiceNotFound
from esb.observe.logs import TRACEBACK_CHARS, bounded_traceback
from esb.observe.repeats import Repeats
from esb.service import ServiceRuntime, ServiceStore

MODULE = '''
import gevent
from greenlet import GreenletExit

from esb import BadInput, Service


class Raise(Service):
    name = "u.raise"

    def handle(self):
        kind = self.request.payload["kind"]
        if kind == "exit":
            raise SystemExit(3)
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "greenlet-exit":
            raise GreenletExit
        if kind == "timeout":
            raise gevent.Timeout(1)
        if kind == "bad-input":
            raise BadInput("no", self.request.payload["status"])
        self.response.payload = {"ok": True}


class Outer(Service):
    name = "u.outer"

    def handle(self):
        try:
            self.invoke("u.nowhere")
        except LookupError as exc:
            self.response.payload = {"caught": type(exc).__name__}


class Recurse(Service):
    name = "u.recurse"

    def handle(self):
        self.invoke("u.recurse")
'''


@pytest.fixture
def runtime() -> ServiceRuntime:
    store = ServiceStore()
    store.rebuild([("unitboundary", 1, MODULE)])
    return ServiceRuntime(store, None, Keys("unit"))


def test_whatever_a_service_raises_becomes_one_logged_failure(runtime, caplog):
    caplog.set_level(logging.ERROR, logger="esb.service.runtime")
    for kind, name in (("exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")):
        caplog.clear()
        with pytest.raises(ServiceFailed) as failed:
            runtime.run("u.raise", {"kind": kind}, cid=f"c-{kind}")
        assert failed.value.service == "u.raise" and failed.value.error.startswith(name)
        assert len(caplog.records) == 1 and caplog.records[0].cid == f"c-{kind}"
        assert caplog.records[0].service == "u.raise"
    assert runtime.run("u.raise", {"kind": "none"}, cid="c").payload == {"ok": True}


def test_greenlet_exit_and_timeouts_pass_through(runtime):
    with pytest.raises(GreenletExit):
        runtime.run("u.raise", {"kind": "greenlet-exit"}, cid="c")
    with pytest.raises(gevent.Timeout):
        runtime.run("u.raise", {"kind": "timeout"}, cid="c")


def test_bad_input_takes_only_4xx(runtime):
    with pytest.raises(BadInput) as rejected:
        runtime.run("u.raise", {"kind": "bad-input", "status": 422}, cid="c")
    assert rejected.value.status_code == 422
    for status in (999, 200, 500, "400", 400.0, True):
        with pytest.raises(ServiceFailed):
            runtime.run("u.raise", {"kind": "bad-input", "status": status}, cid="c")
        with pytest.raises(ValueError):
            BadInput("x", status)


def test_unknown_services_and_recursion(runtime, caplog):
    with pytest.raises(ServiceNotFound):
        runtime.run("u.nowhere", {}, cid="c")
    # Inside a service, an unknown invoke is the calling service's to handle.
    assert runtime.run("u.outer", {}, cid="c").payload == {"caught": "ServiceNotFound"}
    caplog.set_level(logging.ERROR, logger="esb.service.runtime")
    with pytest.raises(ServiceFailed) as failed:
        runtime.run("u.recurse", {}, cid="deep")
    assert "InvokeDepthError" in failed.value.error
    assert len(caplog.records) == 1
    assert len(caplog.records[0].getMessage()) < TRACEBACK_CHARS + 500


def test_bounded_traceback_keeps_the_end():
    def dive(n: int) -> None:
        if n == 0:
            raise RuntimeError("x" * 50_000)
        dive(n - 1)

    try:
        dive(200)
    except RuntimeError as exc:
        text = bounded_traceback(exc)
    assert len(text) < TRACEBACK_CHARS + 100
    assert text.startswith("Traceback") and text.endswith("x" * 100)


def test_repeats_write_once_per_period_with_a_count():
    repeats = Repeats(every_s=30)
    assert repeats.check("k", now=0.0) == (True, 0, 0.0)
    assert [repeats.check("k", now=float(t))[0] for t in range(1, 30)] == [False] * 29
    assert repeats.check("k", now=30.0) == (True, 29, 30.0)
    assert repeats.check("other", now=30.5)[0] is True
    # Unseen for a whole period: a new episode, written in full again.
    assert repeats.check("k", now=100.0) == (True, 0, 0.0)
