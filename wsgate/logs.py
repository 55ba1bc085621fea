"""Logging set-up: text or JSON lines, level from the config.

Secrets never reach a log line: the access log scrubs tokens from URLs, and
no wsgate code logs credentials or keys.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from wsgate.config import LoggingConfig


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler()
    if config.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # Tornado's own access log would print raw URLs (tokens); ours scrubs them.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
