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


class OutconnUnavailable(EsbError, ConnectionError):
    """An outgoing connection cannot be used right now; retryable."""

    def __init__(self, conn: str, reason: str):
        self.conn = conn
        super().__init__(f"outgoing connection {conn!r} is unavailable: {reason}")


class BusUnavailable(EsbError, ConnectionError):
    """Redis, which carries dispatch, heartbeats and deploy notices, cannot be reached."""


class OdbUnavailable(EsbError, ConnectionError):
    """The ODB cannot be reached."""


class BadInput(EsbError, ValueError):
    """A service rejects its request; answered with a 4xx and the service's message."""

    def __init__(self, message: str, status_code: int = 400):
        self.message = message
        self.status_code = status_code
        super().__init__(message)
