"""Logging set-up: text or JSON lines, level from the config.

Secrets never reach a log line: the access log scrubs tokens from URLs, no
wsgate code logs credentials or keys, and :func:`mask_tokens` masks the
value of every ``token`` query parameter (its name percent-decoded, as
Tornado reads it) in every record the process makes, Tornado's own lines
and tracebacks included.

Fields passed with ``extra=`` (``connection_id``, ``status``...) become keys of
the JSON object, or ``key=value`` pairs after the text message. A field the
message already shows can be named in the extra ``in_message`` tuple: the
text format then leaves it out, the JSON format keeps it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote_plus

from wsgate.config import LoggingConfig

_BLANK = vars(logging.LogRecord("", 0, "", 0, "", (), None))
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(_BLANK) | {"message", "asctime", "taskName"}
#: How many attributes LogRecord's constructor sets: a record's ``extra=``
#: fields come after them (makeRecord adds them next).
_MADE = len(_BLANK)

access_log = logging.getLogger("wsgate.access")

#: Extra key naming the fields the text message already shows.
IN_MESSAGE = "in_message"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra=``, in the order given."""
    items = iter(vars(record).items())
    for _ in range(_MADE):
        next(items, None)
    return {k: v for k, v in items if k not in _STANDARD and k != IN_MESSAGE}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the extra fields
    (and exception)."""

    def line(self, created: float, levelname: str, name: str, message: str,
             fields: dict[str, Any]) -> str:
        """What format() writes for a record with these values and ``extra=fields``
        (and no exception), made without the record (the access log's fast path)."""
        return json.dumps(_json_object(created, levelname, name, message, fields), default=str)

    def format(self, record: logging.LogRecord) -> str:
        out = _json_object(record.created, record.levelname, record.name, record.getMessage(),
                           extra_fields(record))
        if record.exc_info:
            # exc_text, when set, is the traceback with its tokens masked.
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _json_object(created: float, levelname: str, name: str, message: str,
                 fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(created, UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "level": levelname,
        "logger": name,
        "message": message,
    }
    for key, value in fields.items():
        if key != IN_MESSAGE:
            out.setdefault(key, value)
    return out


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; values with spaces are quoted."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging.Formatter formats it, with the part up to the second made once a second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, int(record.msecs))

    def _time(self, created: float, msecs: int) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{msecs:03d}"  # default_msec_format

    def line(self, created: float, levelname: str, name: str, message: str,
             fields: dict[str, Any]) -> str:
        """What format() writes for a record with these values and ``extra=fields``
        (and no exception), made without the record (the access log's fast path)."""
        # msecs as LogRecord computes them.
        stamp = self._time(created, int((created - int(created)) * 1000))
        return (f"{stamp} {levelname} {name}: {message}"
                + _pairs(fields, fields.get(IN_MESSAGE, ())))

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record) + _pairs(extra_fields(record),
                                                      getattr(record, IN_MESSAGE, ()))


def _pairs(fields: dict[str, Any], shown: Any) -> str:
    """`` key=value ...`` of the fields the message does not show, or nothing."""
    pairs = [f"{k}={_text(v)}" for k, v in fields.items() if k != IN_MESSAGE and k not in shown]
    return " " + " ".join(pairs) if pairs else ""


def _text(value: Any) -> str:
    text = "-" if value is None else str(value)
    if (not text or " " in text or '"' in text or "=" in text) or not text.isprintable():
        return json.dumps(text)
    return text


class LoopBatchingHandler(logging.StreamHandler):
    """A StreamHandler that writes the lines of one event-loop iteration in one write.

    On the event loop's thread a formatted line waits in memory until the end
    of the current loop iteration (``call_soon``); the access log of a busy
    node then costs one system call per iteration, not one per request. Lines
    of any other thread, or made with no loop running, are written at once,
    after those waiting. ``flush()`` (logging's shutdown calls it at exit)
    writes everything waiting.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[str] = []
        #: The loop a flush is scheduled on, if any.
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.emit_line(line)

    def emit_line(self, line: str) -> None:
        """Write a whole formatted line (terminator included) as emit() does."""
        try:
            loop = asyncio.get_running_loop()  # this thread's loop, if one is running
        except RuntimeError:
            self._waiting.append(line)
            self.flush()
            return
        if self._scheduled is not loop:
            # Also after a loop that ended with lines waiting: this one writes them.
            loop.call_soon(self.flush)
            self._scheduled = loop
        self._waiting.append(line)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            waiting = self._waiting
            if waiting:
                self._waiting = []
                try:
                    self.stream.write(waiting[0] if len(waiting) == 1 else "".join(waiting))
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": "log lines lost"}))
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The handler setup_logging installed: the access log writes its lines to it
#: directly while nothing else would see the record (see _direct_handler).
_direct: LoopBatchingHandler | None = None
#: The formatter setup_logging gave it (a TextFormatter of TEXT_FORMAT, or a JSONFormatter).
_direct_formatter: logging.Formatter | None = None


def _direct_handler(level: int) -> LoopBatchingHandler | None:
    """setup_logging's handler, when an access record would reach it and nothing else.

    That is: the root logger has only that handler, no logger on the way
    (``wsgate.access``, ``wsgate``, root) has a filter or handler of its own,
    nor does the handler, its formatter is the one setup_logging gave it, and
    records are made by the token-masking factory (so nobody changed how they
    are made). A test's log capture, say, adds a handler: then records are
    made and handled as usual.
    """
    handler = _direct
    if handler is None:
        return None
    root = logging.root
    parent = access_log.parent
    if (len(root.handlers) != 1 or root.handlers[0] is not handler or root.filters
            or access_log.handlers or access_log.filters or not access_log.propagate
            or handler.filters or level < handler.level
            or not getattr(logging.getLogRecordFactory(), "masks_tokens", False)):
        return None
    while parent is not None and parent is not root:
        if parent.handlers or parent.filters or not parent.propagate:
            return None
        parent = parent.parent
    if handler.formatter is not _direct_formatter:
        return None
    return handler


def setup_logging(config: LoggingConfig) -> None:
    """Send every log line to stderr in the configured format, at the configured level."""
    # Nothing wsgate writes shows where a call was made, nor its thread or
    # process: not looking them up saves a stack walk per record (the logging
    # HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _direct, _direct_formatter
    handler = LoopBatchingHandler()
    formatter = JSONFormatter() if config.format == "json" else TextFormatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    mask_tokens()
    _direct, _direct_formatter = handler, formatter
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
    path = scrub(uri)
    fields: dict[str, Any] = {
        "status": status, "method": method, "path": path, "remote_addr": remote,
        "duration_ms": round(1000.0 * seconds, 1),
        IN_MESSAGE: ("status", "method", "path")}
    if own:
        fields.update(own)
    handler = _direct_handler(level)
    if handler is not None:
        # The line the record would have made, without making the record.
        formatter = cast(TextFormatter | JSONFormatter, handler.formatter)
        handler.emit_line(formatter.line(time.time(), logging.getLevelName(level), access_log.name,
                                         f"{status} {method} {path}", fields) + handler.terminator)
        return
    access_log.log(level, "%d %s %s", status, method, path, extra=fields)


def scrub(text: str) -> str:
    """``text`` with the value of every token query parameter replaced by ``***``.

    A parameter is what follows a ``?`` or ``&`` up to the next ``&``, ``#``,
    white space or quote, in a URI or anywhere in a log message (Tornado's
    lines quote the URI). It is masked when its name, percent-decoded as
    Tornado decodes it, contains ``token`` in any case: ``token``,
    ``%74oken``, ``access_token``; and ``token%3D...`` (no ``=`` until
    decoded) is masked whole.
    """
    if "?" not in text and "&" not in text:
        return text
    return _PARAMETER.sub(_mask_parameter, text)


#: A query parameter: a ``'`` is part of it unless it closes a quoted repr
#: (``uri='/x?token=abc', ...`` in Tornado's request repr).
_PARAMETER = re.compile(r"""(?<=[?&])(?:[^&#\s"']|'(?![,)\s]|$))+""")


def _mask_parameter(match: re.Match[str]) -> str:
    parameter = match.group()
    name, sep, _ = parameter.partition("=")
    if not sep:
        name, sep, _ = unquote_plus(parameter, encoding="latin-1").partition("=")
        return "***" if sep and "token" in name.lower() else parameter
    return f"{name}=***" if "token" in unquote_plus(name, encoding="latin-1").lower() \
        else parameter


def mask_record(record: logging.LogRecord) -> None:
    """Mask tokens (:func:`scrub`) in a record's message and traceback, in place.

    The message is formatted once here; a record whose text needs no mask is
    left as it was made. Fields passed with ``extra=`` are not seen (the
    record is made before they are added): wsgate's own fields never hold a
    URI that is not scrubbed already.
    """
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when the record is written
        return
    masked = scrub(message)
    if masked != message:
        record.msg, record.args = masked, ()
    if record.exc_info and record.exc_info[0] is not None:
        text = _TRACEBACKS.formatException(record.exc_info)
        masked = scrub(text)
        if masked != text:
            record.exc_text = masked  # what every Formatter writes when it is set


_TRACEBACKS = logging.Formatter()


def mask_tokens() -> None:
    """From now on, run :func:`mask_record` on every log record this process makes.

    The record factory, not a filter: a filter on a logger sees only the
    records made by that very logger, not by its children, nor Tornado's
    ``tornado.application`` and ``tornado.general`` unless each is named, and a
    filter on a handler misses every other handler (a test's capture
    included). Calling it again changes nothing.
    """
    current = logging.getLogRecordFactory()
    if getattr(current, "masks_tokens", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        mask_record(record)
        return record

    factory.masks_tokens = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
