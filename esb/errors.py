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
