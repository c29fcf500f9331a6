"""Structured logging: one line per event, `time level event key=value ...`, to stderr."""

import logging
import sys
import time
from typing import Any

logger = logging.getLogger("mwdlogd")


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


# Longest value a log line shows from a peer (a hostname, a tag, an error text): enough to
# tell what it was, while 4 MB hostnames cannot grow the log by 4 MB a line.
PEER_VALUE_CHARS = 200


def capped(value: object, limit: int = PEER_VALUE_CHARS) -> str:
    """`value` as text, cut to `limit` characters with a `…(+N bytes)` marker."""
    text = str(value)
    if len(text) <= limit:
        return text
    rest = len(text[limit:].encode("utf-8", "replace"))
    return f"{text[:limit]}…(+{rest} bytes)"


def logfmt(event: str, fields: dict[str, Any]) -> str:
    return " ".join([event, *(f"{key}={_quote(value)}" for key, value in fields.items())])


class _Formatter(logging.Formatter):
    def __init__(self, suffix: str) -> None:
        super().__init__()
        self._suffix = suffix

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} "
                f"{record.getMessage()}{self._suffix}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: int = logging.INFO, *, worker: int | None = None) -> None:
    """Log to stderr; a worker process tags each line with `worker=N`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("" if worker is None else f" worker={worker}"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def set_level(name: str) -> None:
    """`server.log_level` (debug, info, warning, error); applied again on reload."""
    logger.setLevel(name.upper())


def event(level: int, name: str, /, **fields: Any) -> None:
    """Log one event; field values are quoted when they hold spaces or quotes."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", logfmt(name, fields))


class RateLimiter:
    """At most `burst` lines per `window_s` per key; says how many were held back."""

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        self._burst = burst
        self._window_s = window_s
        self._state: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        """(log this one?, lines suppressed in the window that just ended)."""
        start, count = self._state.get(key, (now, 0))
        suppressed = 0
        if now - start >= self._window_s:
            suppressed = max(0, count - self._burst)
            start, count = now, 0
        self._state[key] = (start, count + 1)
        return count < self._burst, suppressed
