"""Logging set-up: text or JSON lines, level from the config.

Secrets never reach a log line: the access log scrubs tokens from URLs, and
no wsgate code logs credentials or keys.

Fields passed with ``extra=`` (``connection_id``, ``status``...) become keys of
the JSON object, or ``key=value`` pairs after the text message. A field the
message already shows can be named in the extra ``in_message`` tuple: the
text format then leaves it out, the JSON format keeps it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from wsgate.config import LoggingConfig

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


access_log = logging.getLogger("wsgate.access")

#: Extra key naming the fields the text message already shows.
IN_MESSAGE = "in_message"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra=``, in the order given."""
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and k != IN_MESSAGE}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extra fields
    (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; values with spaces are quoted."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        shown = getattr(record, IN_MESSAGE, ())
        fields = {k: v for k, v in extra_fields(record).items() if k not in shown}
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())


def _text(value: Any) -> str:
    text = "-" if value is None else str(value)
    if not text or any(c in text for c in " \"=") or not text.isprintable():
        return json.dumps(text)
    return text


def setup_logging(config: LoggingConfig) -> None:
    """Send every log line to stderr in the configured format, at the configured level."""
    handler = logging.StreamHandler()
    if config.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # Tornado's own access log would print raw URLs (tokens); ours scrubs them.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def log_access(status: int, method: str, uri: str, remote: str, seconds: float,
               own: dict[str, Any] | None = None, quiet: bool = False) -> None:
    """Access log line, with any token in the URL replaced by ``***``.

    Its fields (``status``, ``method``, ``path``, ``remote_addr``,
    ``duration_ms``, plus a handler's own fields, e.g. ingest's
    ``events_accepted`` and ``key_id``) are JSON keys in the JSON log format.
    ``quiet`` logs a success at DEBUG (metrics scrapes, which would drown the log).
    """
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if level == logging.INFO and quiet:
        level = logging.DEBUG
    if not access_log.isEnabledFor(level):
        return
    path = scrub_uri(uri)
    fields: dict[str, Any] = {
        "status": status, "method": method, "path": path, "remote_addr": remote,
        "duration_ms": round(1000.0 * seconds, 1),
        IN_MESSAGE: ("status", "method", "path")}
    if own:
        fields.update(own)
    access_log.log(level, "%d %s %s", status, method, path, extra=fields)


def scrub_uri(uri: str) -> str:
    """The request URI with the token query value replaced by ``***`` (for logs)."""
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = []
    for pair in parts.query.split("&"):
        name, sep, _ = pair.partition("=")
        pairs.append(f"{name}=***" if name == "token" and sep else pair)
    return parts.path + "?" + "&".join(pairs)
