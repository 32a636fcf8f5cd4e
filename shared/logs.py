"""Logging set-up, called once by each entry point.

Services log JSON lines in containers (``--log-format json`` or
``ONLINE_CTR_LOG_FORMAT=json``) and readable text on a terminal.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys

import orjson

_STANDARD_ATTRIBUTES = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object, with any ``extra`` fields included."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str | None = None, log_format: str | None = None) -> None:
    """Send log records to standard error in the chosen format and level."""
    level = (level or os.environ.get("ONLINE_CTR_LOG_LEVEL") or "INFO").upper()
    log_format = log_format or os.environ.get("ONLINE_CTR_LOG_FORMAT") or "text"

    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every connection step at INFO.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
