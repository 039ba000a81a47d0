"""The esb exception hierarchy: one root, subclasses that also derive from the natural built-in."""

from __future__ import annotations


class EsbError(Exception):
    """Root of every error esb raises on purpose."""


class ConfigError(EsbError, ValueError):
    """server.conf or an object definition is invalid; names the file, key and reason."""

    def __init__(self, file: str, key: str | None, reason: str, line: int | None = None):
        self.file = file
        self.key = key
        self.reason = reason
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


class DeployError(EsbError):
    """A hot-deployed file was rejected; names the file and, where known, the line."""

    def __init__(self, file: str, reason: str, line: int | None = None):
        self.file = file
        self.reason = reason
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {reason}")


class WatermarkProblem(EsbError):
    """A notification's rows cannot be read past its watermark without skipping some (a NULL
    in a watermark column, more equal values than a page holds, a watermark stored for
    another query): the run fails with what to do, rather than deliver around them."""


class ServiceNotFound(EsbError, LookupError):
    """No service of that name is deployed."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"service {name!r} is not deployed")


class Unavailable(EsbError, ConnectionError):
    """A backing service (Redis, the ODB, a broker, a database) cannot be used right now.

    Retryable: a service that meets it lets it through, and its client gets a 503.
    """


class BusUnavailable(Unavailable):
    """Redis, which carries dispatch, heartbeats and deploy notices, cannot be reached."""


class OdbUnavailable(Unavailable):
    """The ODB cannot be reached."""


class BadInput(EsbError, ValueError):
    """A service rejects its request; answered with a 4xx and the service's message.

    Raises ValueError when STATUS_CODE is not an int from 400 to 499: a service that
    asks for another status has a bug, and answers 500 like any other failing service.
    """

    def __init__(self, message: str, status_code: int = 400):
        if not is_client_error(status_code):
            raise ValueError(f"BadInput takes a 4xx status code (an int 400-499), not {status_code!r}")
        self.message = message
        self.status_code = status_code
        super().__init__(message)


def is_client_error(status_code: object) -> bool:
    """True for an int from 400 to 499 (not a bool, float or str)."""
    return isinstance(status_code, int) and not isinstance(status_code, bool) and 400 <= status_code <= 499


class ServiceFailed(EsbError):
    """A service raised or answered something unusable; already logged once, with its name,
    the cid and a bounded traceback. Callers answer 500 (HTTP) or record a failed run."""

    def __init__(self, service: str, cid: str, error: str):
        self.service = service
        self.cid = cid
        self.error = error
        super().__init__(f"service {service} failed: {error}")


class InvokeDepthError(EsbError, RecursionError):
    """``invoke`` nested deeper than the runtime allows (a service that invokes itself)."""

    def __init__(self, service: str, max_depth: int):
        self.service = service
        self.max_depth = max_depth
        super().__init__(
            f"invoke of {service} nested deeper than {max_depth} levels; is a service invoking itself?"
        )


class OutconnError(EsbError):
    """An outgoing connection could not do what a service asked; names the connection.

    The kinds where trying again later may succeed also derive from ``Unavailable`` (a 503
    for an HTTP client); the others are the service's to handle, else a 500.
    """

    def __init__(self, outconn: str, reason: str):
        self.outconn = outconn
        self.reason = reason
        super().__init__(f"outconn {outconn}: {reason}")


class AmqpUnreachable(OutconnError, Unavailable):
    """The broker did not accept a connection (or kept breaking it) within the retry budget."""


class AmqpAccessRefused(OutconnError):
    """The broker refused the credentials or the virtual host (ACCESS_REFUSED, NOT_ALLOWED):
    not retried, since only a change of definition or of the broker's users can help."""


class PoolExhausted(OutconnError, Unavailable):
    """Every connection of the pool stayed checked out for ``acquire_timeout_s``."""


class PublishNacked(OutconnError):
    """The broker refused the message (basic.nack): it is not in any queue."""


class ConfirmTimeout(OutconnError, Unavailable, TimeoutError):
    """The broker did not confirm within ``confirm_timeout_s``: the message may or may not be in."""


class Unroutable(OutconnError):
    """A ``mandatory`` message matched no queue and the broker returned it."""


class PublishersBlocked(OutconnError, Unavailable):
    """The broker blocked publishers (memory or disk alarm) for longer than ``blocked_timeout_s``."""


class SendManyFailed(OutconnError):
    """``send_many`` stopped before every message was confirmed.

    ``unconfirmed`` lists (index, message_id) of each message published but not confirmed
    (nacked, returned, or unanswered when the connection broke: in the queue once or not at
    all); ``unsent_from`` is the index of the first message never published (every later
    one was not published either), or None. Resending exactly those is safe.
    """

    def __init__(
        self,
        outconn: str,
        reason: str,
        unconfirmed: list[tuple[int, str]],
        unsent_from: int | None,
        confirmed: int,
    ):
        self.unconfirmed = unconfirmed
        self.unsent_from = unsent_from
        self.confirmed = confirmed
        super().__init__(
            outconn,
            f"{reason}; {confirmed} confirmed, {len(unconfirmed)} unconfirmed"
            + ("" if unsent_from is None else f", none sent from index {unsent_from}"),
        )
