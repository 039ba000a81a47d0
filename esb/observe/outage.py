"""One warning per outage: a loop that retries every second must not flood the log."""

from __future__ import annotations

import logging


class OutageNotice:
    """Logs the first failure of an outage at WARNING, repeats at DEBUG, recovery at INFO."""

    def __init__(self, logger: logging.Logger, what: str):
        self.logger = logger
        self.what = what
        self.failures = 0

    def failed(self, exc: BaseException, retry_in_s: float) -> None:
        level = logging.WARNING if self.failures == 0 else logging.DEBUG
        self.logger.log(level, "%s failed (%s); retrying in %.1f s", self.what, exc, retry_in_s)
        self.failures += 1

    def succeeded(self) -> None:
        if self.failures:
            self.logger.info("%s works again after %d failed attempts", self.what, self.failures)
            self.failures = 0

    def backoff_s(self, start_s: float = 0.1, max_s: float = 5.0) -> float:
        """Exponential delay for the next attempt of the current outage."""
        return min(start_s * 2**self.failures, max_s)
