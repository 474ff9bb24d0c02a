"""One recurring error, logged with its cause without flooding the log (services that ride
out a broker outage say so once, then every few seconds with a count)."""

from __future__ import annotations

import logging
import time


class ErrorLog:
    """Log a recurring error with its cause without flooding the log: the first occurrence,
    then one line per ``every`` seconds with the count, as ERROR once it has lasted ``grave``
    seconds; and one line when it clears."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 10.0, grave: float = 30.0) -> None:
        self.logger, self.what, self.every, self.grave = logger, what, every, grave
        self.since: float | None = None
        self.last_logged = 0.0
        self.count = 0

    def failed(self, cause: str) -> None:
        now = time.monotonic()
        self.count += 1
        if self.since is None:
            self.since = now
        if self.count == 1 or now - self.last_logged >= self.every:
            lasting = now - self.since
            level = logging.ERROR if lasting >= self.grave else logging.WARNING
            self.logger.log(level, "%s: %s (%d errors in %.0f s)", self.what, cause, self.count, lasting)
            self.last_logged = now

    def ok(self) -> None:
        if self.since is not None:
            self.logger.warning(
                "%s: recovered after %.0f s (%d errors)", self.what, time.monotonic() - self.since, self.count
            )
        self.since, self.count = None, 0
