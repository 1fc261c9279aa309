"""The daemon's event log: Python logging under the ``livemig.daemon`` name.

One line per event — a migration's start, phase changes, policy decisions,
connection breaks and recoveries, the end with its reason — to stderr or a
file, as text or as JSON lines (``--log-json``) with the event's fields
(``migration``, ``vm``, ``event``, ...) as keys, for log shippers.
"""
from __future__ import annotations

import json
import logging
import sys
import time

LOGGER_NAME = "livemig.daemon"
LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        return json.dumps(out, default=str)


def configure(level: str = "info", path: str | None = None, as_json: bool = False
              ) -> logging.Logger:
    """Set up the daemon's logger; returns it. ``path`` None = stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(message)s"))
    logger.addHandler(handler)
    return logger


def event(level: int, message: str, **fields) -> None:
    """Log ``message`` with structured ``fields`` (kept as keys in JSON lines)."""
    logging.getLogger(LOGGER_NAME).log(level, message, extra={"fields": fields})
