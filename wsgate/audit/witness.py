"""Witnesses: copies of every signed checkpoint kept outside the database (SPEC §5).

Someone who can write the audit database but has no signing key can roll back
a chain's tail or delete a node's rows and checkpoints; a witness still holds
the checkpoints they removed, so ``wsgate audit verify --witness`` catches it.

Two kinds of witness, named by URL in ``[audit] witness``:

- ``file:///absolute/path``: each checkpoint is appended as one JSON object a
  line (compact, keys sorted), flushed and fsynced. The file is created if
  missing; its directory must exist.
- ``http://host/path`` or ``https://host/path``: each checkpoint is POSTed on
  its own, body = the checkpoint JSON object, ``Content-Type:
  application/json``; any 2xx answer is success. User info in the URL
  (``https://user:pass@host/...``) is sent as HTTP Basic authentication. For
  ``wsgate audit verify --witness URL`` the same URL must answer GET with every
  checkpoint it received, as JSON lines (or one JSON list).

Delivery never holds up the audit writer: :meth:`WitnessPublisher.submit` only
queues, and each witness has its own daemon thread that delivers in order,
retrying failures with exponential backoff. This module imports no Tornado.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger("wsgate.audit.witness")

#: The witness URL forms accepted, for error messages.
ACCEPTED_FORMS = "file:///absolute/path, http://host/path or https://host/path"
#: Seconds AuditWriter.close gives witnesses to take what is still pending.
CLOSE_TIMEOUT = 5.0
#: Fields every checkpoint read back from a witness must have.
REQUIRED_FIELDS = ("chain", "node_id", "seq", "signature")

# Lines a file witness appends with one write and one fsync.
_FILE_BATCH = 1000


class WitnessError(Exception):
    """A witness that cannot be read, or holds something that is not a checkpoint.

    The message names the source (with any credentials removed) and, for bad
    content, the line number.
    """


def check_witness_url(url: str) -> None:
    """Check that url is a witness this module can deliver to.

    Raises:
        ValueError: url is not ``file://`` with an absolute path nor
            ``http(s)://`` with a host (or holds spaces or control characters);
            the message names the accepted forms and shows url without credentials.
    """
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{redact_url(url)!r} contains spaces or control characters "
                         f"(percent-encode them); use {ACCEPTED_FORMS}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{redact_url(url)!r}: its port is not a number; "
                         f"use {ACCEPTED_FORMS}") from None
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{redact_url(url)!r} is not a file URL with an absolute path; "
                             f"use {ACCEPTED_FORMS}")
    elif scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} has no host; use {ACCEPTED_FORMS}")
    else:
        raise ValueError(f"{redact_url(url)!r} is not a witness URL; use {ACCEPTED_FORMS}")


def redact_url(url: str) -> str:
    """url without user info, query string or fragment (they may carry a token).

    What logs, metrics labels and error messages show of a witness. A plain
    path is returned unchanged.
    """
    parts = urlsplit(url)
    if not parts.scheme:
        return str(url)  # not a Secret's hidden repr: a path is shown as it is
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def checkpoint_line(checkpoint: Mapping[str, Any]) -> str:
    """The JSON text a witness receives for one checkpoint: compact, keys sorted,
    every field kept, no newline.

    Raises:
        TypeError, ValueError: a value is not JSON serialisable.
    """
    return json.dumps(checkpoint, sort_keys=True, separators=(",", ":"))


class Witness:
    """One witness's queue, delivery thread and counters (made by WitnessPublisher).

    Attributes read by /metrics (see wsgate.metrics) and tests:
        name: the URL without credentials or query string.
        delivered: checkpoints the witness has taken.
        failures: delivery attempts that failed.
        dropped: checkpoints dropped because ``max_pending`` were already queued.
        up: False while the last delivery attempt failed (True before any).
    """

    def __init__(self, url: str, *, timeout: float, max_pending: int,
                 backoff: tuple[float, float]) -> None:
        check_witness_url(url)
        self.name = redact_url(url)
        self.delivered = 0
        self.failures = 0
        self.dropped = 0
        self.up = True
        self._url = url
        self._timeout = timeout
        self._max_pending = max_pending
        self._backoff = backoff
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        # Taken from the queue for the current attempt; retried first on failure.
        self._in_flight: list[str] = []
        self._failing_since = 0  # consecutive failed attempts
        self._retry_at = 0.0
        self._deadline: float | None = None  # set by close
        self._warned_full = False
        self._thread: threading.Thread | None = None
        parts = urlsplit(url)
        if parts.scheme.lower() == "file":
            self._path: Path | None = Path(unquote(parts.path))
            self._batch = min(_FILE_BATCH, max_pending)
        else:
            self._path = None
            self._batch = 1
            self._request_url, self._headers = _http_target(url)

    def pending(self) -> int:
        """Checkpoints queued or being delivered, not yet taken by the witness."""
        with self._cond:
            return len(self._queue) + len(self._in_flight)

    def __repr__(self) -> str:
        return f"Witness({self.name!r}, pending={self.pending()}, up={self.up})"

    # --- the publisher's calls ------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None and self._deadline is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"wsgate-witness {self.name}")
            self._thread.start()

    def _add(self, lines: Sequence[str]) -> None:
        warn = False
        with self._cond:
            if self._deadline is not None:
                self.dropped += len(lines)
                return
            self._queue.extend(lines)
            excess = len(self._queue) + len(self._in_flight) - self._max_pending
            if excess > 0:
                # The batch in flight is never dropped: it may be arriving right now.
                excess = min(excess, len(self._queue))
                for _ in range(excess):
                    self._queue.popleft()
                self.dropped += excess
                warn, self._warned_full = not self._warned_full, True
            self._cond.notify()
        if warn:  # logged outside the lock: a slow log handler must not hold up delivery
            log.warning("witness %s: %d checkpoints are waiting; dropping the oldest "
                        "(counted in wsgate_witness_dropped)", self.name, self._max_pending)

    def _stop(self, deadline: float) -> None:
        with self._cond:
            if self._deadline is None:
                self._deadline = deadline
                self._retry_at = 0.0  # one more try now, whatever the backoff said
            self._cond.notify()

    def _join(self, deadline: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    # --- the delivery thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                timeout = self._wait_for_work()
                if timeout is None:
                    return
                if not self._in_flight:
                    take = min(self._batch, len(self._queue))
                    self._in_flight = [self._queue.popleft() for _ in range(take)]
                batch = list(self._in_flight)
            error = self._attempt(batch, timeout)
            with self._cond:
                news = self._settle(len(batch), error)
            if news is not None:  # logged outside the lock, which submit() waits on
                log.log(*news)

    def _wait_for_work(self) -> float | None:
        """Wait (holding _cond) until an attempt is due; its timeout, or None to stop."""
        while True:
            now = time.monotonic()
            work = bool(self._in_flight or self._queue)
            deadline = self._deadline
            if deadline is not None and (not work or now >= deadline):
                return None
            if work and now >= self._retry_at:
                if deadline is None:
                    return self._timeout
                return max(0.05, min(self._timeout, deadline - now))
            wake = self._retry_at if work else None
            if deadline is not None:
                wake = deadline if wake is None else min(wake, deadline)
            self._cond.wait(None if wake is None else wake - now)

    def _attempt(self, lines: list[str], timeout: float) -> str | None:
        """Deliver lines; None on success, else why not (with no credentials in it)."""
        try:
            if self._path is not None:
                _append(self._path, lines)
            else:
                self._post(lines[0], timeout)
        except Exception as exc:  # any failure is retried, none may kill the thread
            return _describe(exc, self._url)
        return None

    def _post(self, line: str, timeout: float) -> None:
        request = urllib.request.Request(
            self._request_url, data=line.encode("utf-8"), method="POST",
            headers={**self._headers, "Content-Type": "application/json"})
        with _OPENER.open(request, timeout=timeout) as response:
            response.read()

    def _settle(self, count: int, error: str | None) -> tuple[Any, ...] | None:
        """Count an attempt's outcome (holding _cond); what to log about it, if anything."""
        if error is None:
            news: tuple[Any, ...] | None = None
            if not self.up:
                news = (logging.INFO, "witness %s is back after %d failed attempts; "
                        "delivering again", self.name, self._failing_since)
            self.delivered += count
            self._in_flight = []
            self.up = True
            self._failing_since = 0
            self._retry_at = 0.0
            self._warned_full = False
            return news
        self.failures += 1
        self._failing_since += 1
        first, most = self._backoff
        delay = min(most, first * 2 ** min(self._failing_since - 1, 30))
        self._retry_at = time.monotonic() + delay
        if self.up:
            self.up = False
            return (logging.WARNING, "witness %s is failing (%s); its checkpoints are kept "
                    "and retried, see wsgate_witness_up and wsgate_witness_pending",
                    self.name, error)
        return (logging.DEBUG, "witness %s: attempt %d failed (%s); next in %.1f s",
                self.name, self._failing_since, error, delay)


class WitnessPublisher:
    """Sends every checkpoint it is given to each configured witness.

    Args:
        urls: witness URLs (see the module docstring); each is checked.
        timeout: seconds one HTTP attempt may take.
        max_pending: checkpoints queued per witness; past it the oldest are
            dropped and counted in ``Witness.dropped``.
        backoff: (first, largest) seconds between retries of a failing
            witness; the wait doubles after each failure.

    Raises:
        ValueError: a URL is not a witness (check_witness_url).

    Call :meth:`start` once, :meth:`submit` any number of times from any
    thread, and :meth:`close` last.
    """

    def __init__(self, urls: Sequence[str], *, timeout: float = 5.0,
                 max_pending: int = 100_000, backoff: tuple[float, float] = (0.5, 60.0)) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        #: One per URL, in the order given.
        self.witnesses = tuple(Witness(url, timeout=timeout, max_pending=max_pending,
                                       backoff=backoff) for url in urls)

    def start(self) -> None:
        """Start the delivery threads (daemon threads, one per witness).

        Checkpoints submitted before are delivered once started. Idempotent.
        """
        for witness in self.witnesses:
            witness._start()

    def submit(self, checkpoints: Sequence[Mapping[str, Any]]) -> None:
        """Queue checkpoints, in order, for every witness; return at once.

        Called by the audit writer thread right after it commits checkpoints.
        Thread-safe; never blocks on a witness and never raises: a checkpoint
        that cannot be serialised is logged and counted as dropped, and
        checkpoints submitted after :meth:`close` are counted as dropped.
        Every field of each checkpoint is sent as it is.
        """
        try:
            lines = []
            for checkpoint in checkpoints:
                try:
                    lines.append(checkpoint_line(checkpoint))
                except (TypeError, ValueError) as exc:
                    log.error("witness: a checkpoint could not be serialised, not sent: %s", exc)
                    for witness in self.witnesses:
                        witness.dropped += 1
            if lines:
                for witness in self.witnesses:
                    witness._add(lines)
        except Exception:  # the writer must never fail because of a witness
            log.exception("witness: checkpoints could not be queued")

    def close(self, timeout: float) -> int:
        """Give the witnesses up to timeout seconds to take what is pending, then stop.

        A failing witness is tried once more at once, then with its backoff
        until the deadline. Checkpoints still pending are given up on, with a
        WARNING per witness that says how many. Idempotent.

        Returns:
            the number of checkpoints not delivered, over all witnesses.
        """
        deadline = time.monotonic() + timeout
        for witness in self.witnesses:
            witness._stop(deadline)
        for witness in self.witnesses:
            witness._join(deadline)
        lost = 0
        for witness in self.witnesses:
            pending = witness.pending()
            if pending:
                log.warning("witness %s: %d checkpoints were not delivered before shutdown",
                            witness.name, pending)
            lost += pending
        return lost


def read_witness(source: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every checkpoint a witness holds, in its order.

    Args:
        source: a file path, a ``file://`` URL, or an ``http(s)://`` URL
            answered by GET with JSON lines or one JSON list.
        timeout: seconds an HTTP GET may take.

    Raises:
        WitnessError: the source cannot be read, or a line (or list item) is
            not a JSON object with at least chain, node_id, seq and signature;
            the message names the source without credentials and the line
            (or item) number. Blank lines are skipped.
    """
    name = redact_url(source)
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    try:
        if scheme in ("http", "https"):
            check_witness_url(source)
            url, headers = _http_target(source)
            request = urllib.request.Request(url, headers=headers)
            with _OPENER.open(request, timeout=timeout) as response:
                text = response.read().decode("utf-8")
        else:
            if scheme == "file":
                check_witness_url(source)
                path = Path(unquote(parts.path))
            else:
                path = Path(source)
            text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise WitnessError(f"witness {name} cannot be read: {_describe(exc, source)}") from None
    return _parse(text, name)


def _parse(text: str, name: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None  # not one list: read it as lines, to name the bad one
        if isinstance(items, list):
            return [_checked(item, f"witness {name}: item {i}")
                    for i, item in enumerate(items, 1)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise WitnessError(f"witness {name}: line {number}: not JSON") from None
        out.append(_checked(value, f"witness {name}: line {number}"))
    return out


def _checked(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WitnessError(f"{where}: not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in value]
    if missing:
        raise WitnessError(f"{where}: not a checkpoint (no {', '.join(missing)})")
    return value


def _append(path: Path, lines: list[str]) -> None:
    """Append lines to path, fsynced; on failure cut the file back to where it was."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            data = "".join(line + "\n" for line in lines).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # A half-written line would break reading back; the retry appends it whole.
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
    if created:
        # The new file's directory entry must be durable too.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _http_target(url: str) -> tuple[str, dict[str, str]]:
    """The URL to request (without user info) and the headers that carry it."""
    parts = urlsplit(url)
    headers: dict[str, str] = {}
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), headers


def _describe(exc: BaseException, url: str) -> str:
    """Why an attempt on url failed, with url's password and query string hidden."""
    if isinstance(exc, urllib.error.HTTPError):
        text = f"answered HTTP {exc.code}"
    elif isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        text = str(exc) or type(exc).__name__
    text = text.replace(url, redact_url(url))
    parts = urlsplit(url)
    secrets = {parts.password, parts.query}
    secrets |= {unquote(s) for s in secrets if s}
    # Longest first, so a secret that contains another is hidden whole.
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirected POST would become a GET that "succeeds" without delivering:
    # a 3xx answer is a failure instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)
