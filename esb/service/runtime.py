"""Running services: one place where a request becomes a Service call and a Response."""

from __future__ import annotations

import logging
from typing import Any

import redis
from munch import Munch

from esb.bus import Keys, enqueue
from esb.errors import ServiceNotFound
from esb.observe.context import running_calls
from esb.service.base import HttpInfo, JobInfo, Request, Response
from esb.service.loader import ServiceStore

logger = logging.getLogger(__name__)


class ServiceRuntime:
    """What a worker offers its services: the store, Redis, outgoing connections."""

    def __init__(self, store: ServiceStore, client: redis.Redis, keys: Keys, *, max_backlog: int = 0):
        self.store = store
        self.redis = client
        self.keys = keys
        self.max_backlog = max_backlog
        self.outgoing = Munch(amqp={}, sql={})

    def invoke(
        self,
        name: str,
        payload: Any,
        *,
        cid: str,
        http: HttpInfo | None = None,
        job: JobInfo | None = None,
    ) -> Response:
        """Run service NAME in this greenlet. Exceptions from the service propagate.

        Raises ServiceNotFound when no such service is deployed.
        """
        cls = self.store.services.get(name)
        if cls is None:
            raise ServiceNotFound(name)
        request = Request(payload={} if payload is None else payload, http=http, job=job)
        service = cls(self, request, cid)
        with running_calls.track(name, cid):
            service.handle()
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
