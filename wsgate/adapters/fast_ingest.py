"""The keep-alive fast path for ``POST /v1.0/events``.

Tornado's HTTP/1.1 server spends most of a one-event POST's CPU on its own
machinery (request parsing, routing, handler set-up, the response), several
times what publishing the event costs. Backends that post one event per
request on a kept-alive connection are the common case, so every connection
the main server accepts starts here, on the raw socket:

- a request that is exactly the common ingest shape (``POST /v1.0/events
  HTTP/1.1``, one ``Host``, a ``Content-Length`` body within ``[ingest]
  max_body_bytes``, every header once, plain ASCII, no ``Transfer-Encoding``,
  ``Expect`` or ``Upgrade``) is answered here, through the same
  :class:`wsgate.adapters.ingest.IngestService` as Tornado's handler, with the
  same status, body, metrics and access log line;
- a request that RFC 9112 and h11 refuse and Tornado would not (no ``Host``,
  a blank line before the request line, a ``Content-Length`` of too many
  digits) is answered 400 here, and the connection closed;
- at the first request that is anything else (another path, a WebSocket
  upgrade, a chunked body, HTTP/1.0, a header this parser does not take), the
  connection and every byte already read go to Tornado for good, which then
  answers exactly as it always did.

Which is which is decided by :class:`wsgate.adapters.ingest_framing.IngestFramer`,
which does no I/O; this module reads, writes and keeps time.

The same limits hold as in Tornado: ``[server] idle_connection_timeout`` for a
connection waiting for (or in the middle of) a request head,
``[server] body_timeout`` for a body, 16 KiB of head (a longer one goes to
Tornado, which refuses it). Requests on one connection are answered in order.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import tornado

from wsgate import errors
from wsgate.adapters.ingest_framing import (
    HAND_OVER,
    MAX_HEAD,
    PATH,
    IngestFramer,
    Refusal,
    Request,
)
from wsgate.errors import GENERIC_ERRORS, HTTPFailure
from wsgate.ingest import IngestService
from wsgate.logs import log_access

log = logging.getLogger("wsgate")

_RECV = 256 * 1024
_SERVER = f"TornadoServer/{tornado.version}"
_INTERNAL = HTTPFailure(500, *GENERIC_ERRORS[500])


class _Clock:
    """The ``Date`` header, formatted once a second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.text = formatdate(now, usegmt=True)
        return self.text


_clock = _Clock()


def response(status: int, body: dict[str, Any], close: bool) -> bytes:
    """A whole JSON response, with the headers Tornado's handler would send."""
    payload = json.dumps(body).encode()
    reason = http.client.responses.get(status, "Unknown")
    extra = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} {reason}\r\nServer: {_SERVER}\r\n"
            f"Content-Type: application/json\r\nDate: {_clock.date()}\r\n{extra}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


class FastIngestConnection:
    """One accepted connection, served here until a request needs Tornado.

    ``handover(buffer)`` gives the connection to Tornado with the bytes read
    so far; ``on_close(connection)`` is called once the connection has ended here
    (closed, or handed over).
    """

    __slots__ = ("_loop", "_sock", "_fd", "_service", "_remote", "_idle", "_body_timeout",
                 "_handover", "_on_close", "_framer", "_busy", "_out", "_timer",
                 "_timer_at", "_deadline", "_started", "_close_after", "_closed", "_draining",
                 "_reading", "_eof")

    def __init__(self, sock: socket.socket, remote: str, service: IngestService,
                 idle_timeout: float, body_timeout: float,
                 handover: Callable[[bytes], None],
                 on_close: Callable[[FastIngestConnection], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._service = service
        self._remote = remote
        self._idle = idle_timeout
        self._body_timeout = body_timeout
        self._handover = handover
        self._on_close = on_close
        self._framer = IngestFramer(service.limit)
        self._busy = False
        self._out = b""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._started = 0.0
        self._close_after = False
        self._closed = False
        self._draining = False
        self._reading = False
        #: The peer has shut its side: answer what was read, then close.
        self._eof = False

    # -- life -----------------------------------------------------------

    def start(self) -> None:
        self._resume_reading()
        self._wait(self._idle)

    def drain(self) -> None:
        """Close once the request in progress (if any) is answered (server shutdown)."""
        self._draining = True
        if not self._busy:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._end()
        try:
            self._sock.close()
        except OSError:
            pass

    def _end(self) -> None:
        self._closed = True
        self._pause_reading()
        if self._out:
            self._loop.remove_writer(self._fd)
            self._out = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_close(self)

    def _to_tornado(self) -> None:
        data = self._framer.take()
        self._end()
        self._handover(data)

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    # -- timeouts: one timer, moved lazily --------------------------------

    def _wait(self, seconds: float) -> None:
        """From now, the peer has ``seconds`` to send what is awaited."""
        self._deadline = deadline = self._loop.time() + seconds
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        if self._busy:  # answering is the server's time, not the peer's
            self._wait(self._idle)
        elif now >= self._deadline:
            self.close()
        else:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    # -- reading ----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self._eof = True
            self._pause_reading()
            if not self._busy:
                self._next()
                if not self._busy:
                    self.close()
            return
        self._framer.feed(data)
        if self._busy:
            if len(self._framer.buffer) > self._service.limit + MAX_HEAD:
                self._pause_reading()  # a deep pipeline waits in the socket
            return
        self._next()

    def _next(self) -> None:
        """Answer every whole request in the buffer, in order, until one must wait."""
        framer = self._framer
        while not self._busy and not self._closed:
            had_head = framer.reading_body
            event = framer.next_event()
            if not had_head and (framer.reading_body or isinstance(event, Request | Refusal)):
                self._started = self._loop.time()  # a head has just been framed
            if isinstance(event, Request):
                self._close_after = event.close
                self._serve(event.headers, event.body)
            elif isinstance(event, Refusal):
                self._refuse(event)
                return
            elif event is HAND_OVER:
                self._to_tornado()
                return
            else:  # NEED_DATA
                if framer.reading_body and not had_head:
                    self._wait(self._body_timeout)
                return

    # -- answering ----------------------------------------------------------

    def _serve(self, headers: dict[str, str], body: bytes) -> None:
        self._busy = True
        failure, kid = self._service.precheck(headers)
        if failure is not None:
            self._answer(failure.status, failure.body(), kid, 0)
            return
        self._loop.create_task(self._complete(headers, body, kid))

    async def _complete(self, headers: dict[str, str], body: bytes, kid: str | None) -> None:
        try:
            answer, kid, accepted = await self._service.complete(headers, body, kid)
        except HTTPFailure as failure:
            self._answer(failure.status, failure.body(), failure.key_id or kid, 0)
            return
        except Exception:
            log.exception("uncaught exception answering POST %s", PATH)
            self._answer(500, _INTERNAL.body(), kid, 0)
            return
        self._answer(202, answer, kid, accepted)

    def _answer(self, status: int, body: dict[str, Any], kid: str | None,
                accepted: int) -> None:
        if self._closed:
            return
        seconds = self._loop.time() - self._started
        self._service.gateway.metrics.ingested(status, accepted, seconds)
        log_access(status, "POST", PATH, self._remote, seconds,
                   {"events_accepted": accepted, "key_id": kid,
                    "key_scope": self._service.key_scope(kid)})
        self._close_after = self._close_after or self._draining
        self._write(response(status, body, self._close_after))

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a malformed request with 400, then close (what follows it is not framed)."""
        self._busy = True
        self._close_after = True
        self._pause_reading()
        body = HTTPFailure(400, errors.BAD_REQUEST, refusal.reason).body()
        if refusal.ingest:
            self._answer(400, body, None, 0)
            return
        # Not an ingest request, or not one we could read: no ingest metrics.
        log_access(400, "-", "-", self._remote, self._loop.time() - self._started)
        self._write(response(400, body, True))

    def _write(self, data: bytes) -> None:
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self._out = data[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
            return
        self._written()

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self._out = self._out[sent:]
        if not self._out:
            self._loop.remove_writer(self._fd)
            self._written()

    def _written(self) -> None:
        self._busy = False
        if self._close_after:
            self.close()
            return
        self._wait(self._idle)
        if not self._eof:
            self._resume_reading()
        self._next()
        if self._eof and not self._busy:
            self.close()
