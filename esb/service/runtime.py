"""Running services: one place where a request becomes a Service call and a Response.

``run`` is the service boundary, the one function that runs the outermost service of
an HTTP request or a dispatched message: whatever the service raises stops there,
``BaseException`` included, and is logged once. ``invoke`` is what a service calls to
run another one inside its own call; there, exceptions go back to the calling service.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

import redis
from gevent.timeout import Timeout
from greenlet import GreenletExit
from munch import Munch

from esb.bus import Keys, enqueue
from esb.errors import BadInput, ServiceFailed, ServiceNotFound, Unavailable, is_client_error
from esb.observe import metrics
from esb.observe.calls import running_calls
from esb.observe.logs import bounded_traceback
from esb.service.base import AmqpInfo, HttpInfo, JobInfo, Request, Response
from esb.service.loader import ServiceStore

logger = logging.getLogger(__name__)

# Nested invoke() calls one greenlet may stack up: a service that invokes itself fails
# with InvokeDepthError here instead of with RecursionError some 250 levels down.
MAX_INVOKE_DEPTH = 64

# What the boundary lets through: gevent kills a greenlet (graceful stop, pool.kill)
# with GreenletExit, and a Timeout belongs to whoever started it, which may be a caller
# above the boundary; turning either into a failed call would keep a greenlet alive
# that was told to end.
PASS_THROUGH = (GreenletExit, Timeout)


class ServiceRuntime:
    """What a worker offers its services: the store, Redis, outgoing connections."""

    def __init__(self, store: ServiceStore, client: redis.Redis, keys: Keys, *, max_backlog: int = 0):
        self.store = store
        self.redis = client
        self.keys = keys
        self.max_backlog = max_backlog
        self.outgoing = Munch(amqp={}, sql={})
        # Set by gunicorn's worker_abort hook: the SystemExit it raises next, wherever the
        # signal lands, is the arbiter's, not a service's, and must end the worker.
        self.is_aborting = False

    def run(
        self,
        name: str,
        payload: Any,
        *,
        cid: str,
        http: HttpInfo | None = None,
        job: JobInfo | None = None,
        amqp: AmqpInfo | None = None,
        notification: dict | None = None,
    ) -> Response:
        """Run service NAME as the outermost call of a request or message.

        Raises ServiceNotFound when NAME is not deployed (nothing ran); BadInput when the
        service rejects its input with a 4xx; Unavailable when a backing service it needs
        is down (retryable, a 503); ServiceFailed for anything else the service
        raised (any BaseException but GreenletExit and gevent's Timeout, which pass
        through), after logging it once with the service's name, the cid and a bounded
        traceback.
        """
        cls = self._service_class(name)
        try:
            return self._handle(
                cls, name, payload, cid, http, job, max_depth=None, amqp=amqp, notification=notification
            )
        except (*PASS_THROUGH, Unavailable):
            raise
        except BadInput as exc:
            if is_client_error(exc.status_code):
                raise
            raise self.failed(name, cid, exc) from None
        except BaseException as exc:
            if self.is_aborting and isinstance(exc, SystemExit):
                raise  # gunicorn ends this worker past its timeout (WORKER TIMEOUT): let it
            raise self.failed(name, cid, exc) from None

    def failed(self, name: str, cid: str, exc: BaseException) -> ServiceFailed:
        """Log EXC once, as the end of service NAME's call, and return what callers see."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        logger.error(
            "service %s failed with %s\n%s",
            name,
            type(exc).__name__,
            bounded_traceback(exc),
            extra={"cid": cid, "service": name},
        )
        return ServiceFailed(name, cid, error)

    def invoke(
        self,
        name: str,
        payload: Any,
        *,
        cid: str,
        http: HttpInfo | None = None,
        job: JobInfo | None = None,
    ) -> Response:
        """Run service NAME in this greenlet, inside the calling service's call.

        Exceptions from the service propagate to the caller. Raises ServiceNotFound when
        no such service is deployed, InvokeDepthError past MAX_INVOKE_DEPTH nested calls.
        """
        return self._handle(self._service_class(name), name, payload, cid, http, job, MAX_INVOKE_DEPTH)

    def _service_class(self, name: str) -> type:
        cls = self.store.services.get(name)
        if cls is None:
            raise ServiceNotFound(name)
        return cls

    def _handle(
        self,
        cls: type,
        name: str,
        payload: Any,
        cid: str,
        http: HttpInfo | None,
        job: JobInfo | None,
        max_depth: int | None,
        amqp: AmqpInfo | None = None,
        notification: dict | None = None,
    ) -> Response:
        """One call of a service: tracked for the log and the loop monitor, and timed."""
        service = cls(
            self, Request(
                payload={} if payload is None else payload,
                http=http,
                job=job,
                amqp=amqp,
                notification=notification,
            ),
            cid,
        )
        started = perf_counter()
        try:
            entered = running_calls.enter(name, cid, max_depth)
            try:
                service.handle()
            finally:
                running_calls.leave(entered)
        finally:
            metrics.observe_service(name, perf_counter() - started)
        return service.response

    def invoke_async(self, name: str, payload: Any, *, cid: str) -> str:
        """Queue service NAME on the dispatch stream; answers the message id.

        Raises ServiceNotFound at once when NAME is deployed nowhere in the cluster rather
        than letting the message be dropped later by whichever worker takes it. The store
        is the cluster's view: every worker loads every module of the shared ODB and
        reloads on each deploy notice, so the check costs one dict lookup.
        """
        if name not in self.store.services:
            raise ServiceNotFound(name)
        return enqueue(self.redis, self.keys, name, payload, cid=cid, max_backlog=self.max_backlog)
