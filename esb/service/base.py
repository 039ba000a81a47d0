"""What a service developer writes against: Service, its request and its response."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import redis

    from esb.service.runtime import ServiceRuntime


class Headers(Mapping[str, str]):
    """Request headers looked up by name in any case (``headers["x-api-key"]``).

    PERF(esb): wraps falcon's upper-cased dict as it is; nothing is copied per request.
    """

    __slots__ = ("_upper",)

    def __init__(self, upper: Mapping[str, str]):
        self._upper = upper

    def __getitem__(self, name: str) -> str:
        return self._upper[name.upper()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self._upper

    def __iter__(self) -> Iterator[str]:
        return iter(self._upper)

    def __len__(self) -> int:
        return len(self._upper)

    def __repr__(self) -> str:
        return f"Headers({dict(self._upper)!r})"


@dataclass(frozen=True)
class HttpInfo:
    """The HTTP facts of a request that came through a channel."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: Mapping[str, Any]


@dataclass(frozen=True)
class JobInfo:
    """The facts of a scheduler firing."""

    name: str
    firing_id: str
    scheduled_at: str


@dataclass(frozen=True)
class AmqpInfo:
    """The facts of a message that came through an AMQP channel."""

    channel: str
    queue: str
    properties: Mapping[str, Any]  # message_id, correlation_id, content_type, ...
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool
    deliveries: int  # 1 the first time; counts esb's delayed redeliveries


@dataclass
class Request:
    payload: Any = field(default_factory=dict)
    http: HttpInfo | None = None
    job: JobInfo | None = None
    amqp: AmqpInfo | None = None
    # For an SQL notification's call: {"name", "run_id", "mode"}; otherwise None.
    notification: dict | None = None


@dataclass
class Response:
    payload: Any = None
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class Service:
    """Base class of every service: set ``name`` and implement ``handle``.

    ``handle`` reads ``self.request`` and fills ``self.response``; everything else a
    service needs (invoke, invoke_async, redis, out, logger) hangs off ``self``.
    """

    name: ClassVar[str] = ""
    logger: ClassVar[logging.Logger] = logging.getLogger("esb.service")

    __slots__ = ("request", "response", "cid", "_runtime")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # PERF(esb): one logger per service class, looked up once at deploy, not per call.
        cls.logger = logging.getLogger(f"esb.service.{cls.name or cls.__name__}")

    def __init__(self, runtime: ServiceRuntime, request: Request, cid: str):
        self._runtime = runtime
        self.request = request
        self.response = Response()
        self.cid = cid

    def handle(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}.handle")

    def invoke(self, name: str, payload: Any = None) -> Any:
        """Run another service now, in this greenlet, and return its response payload."""
        return self._runtime.invoke(name, payload, cid=self.cid).payload

    def invoke_async(self, name: str, payload: Any = None) -> str:
        """Queue another service to run on any worker of the cluster; returns the message id.

        Delivery is at least once: a message taken by a worker that dies runs elsewhere.
        """
        return self._runtime.invoke_async(name, payload, cid=self.cid)

    @property
    def redis(self) -> redis.Redis:
        return self._runtime.redis

    @property
    def out(self) -> Any:
        """Outgoing connections by kind: ``self.out.amqp[name]``, ``self.out.sql[name]``."""
        return self._runtime.outgoing
