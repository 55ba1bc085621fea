"""The ingest fast path's request framer: bytes in, requests out, no I/O.

:class:`IngestFramer` is fed what a connection reads and says, request by
request, what to do with the bytes (SPEC §3, Framing):

- :class:`Request`: a whole request of the one plain ingest shape, which the
  fast path answers itself;
- :data:`HAND_OVER`: the next request is anything else; it and every byte
  after it belong to Tornado's parser (:meth:`IngestFramer.take`);
- :class:`Refusal`: the next request is malformed in a way RFC 9112 and h11
  refuse and Tornado would not (or not cleanly): answer 400 and close;
- :data:`NEED_DATA`: wait for more bytes.

It answers :class:`Request` only where h11 frames the bytes the same way
(same end, same headers, same body, same keep-alive decision), and
:class:`Refusal` only where h11 refuses them too;
tests/test_fast_ingest_h11.py checks both on generated requests.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from wsgate.ingest import MAX_DIGITS, decimal

#: The request line of the one request shape the fast path answers.
REQUEST_LINE = b"POST /v1.0/events HTTP/1.1\r\n"
PATH = "/v1.0/events"
#: A longer head goes to Tornado, whose ``max_header_size`` is the same.
MAX_HEAD = 16 * 1024

#: Control characters a header line may not hold (tab is allowed; CR and LF
#: are checked as line ends).
_CTL = bytes(range(0, 9)) + bytes(range(11, 13)) + bytes(range(14, 32)) + b"\x7f"
_TCHAR = (b"!#$%&'*+-.^_`|~0123456789"
          b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Headers whose presence means the request is not the plain shape.
_NOT_PLAIN = ("transfer-encoding", "expect", "upgrade")
#: Where a head ends: an empty line, as h11 finds it (a bare LF counts).
_BLANK_LINE = re.compile(rb"\n\r?\n")


class Signal(enum.Enum):
    """The framer's answers that carry no request: wait, or give the bytes to Tornado."""

    NEED_DATA = "need data"
    HAND_OVER = "hand over"


NEED_DATA = Signal.NEED_DATA
HAND_OVER = Signal.HAND_OVER


@dataclass(frozen=True, slots=True)
class Request:
    """A whole plain ingest request: its headers by lower-case name, its body,
    and whether its ``Connection`` header asks to close after the answer."""

    headers: dict[str, str]
    body: bytes
    close: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """A malformed request: answer 400 with ``reason`` and close.

    ``ingest`` is True when the request line was the ingest one (for the
    access log and the ingest metrics).
    """

    reason: str
    ingest: bool


Event = Request | Refusal | Signal


class IngestFramer:
    """Frames the requests of one connection from the bytes fed to it.

    ``limit`` is the largest body answered here (``[ingest] max_body_bytes``):
    a longer ``Content-Length`` goes to Tornado, whose handler answers 413.
    """

    __slots__ = ("limit", "buffer", "_head")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes fed and not yet framed.
        self.buffer = bytearray()
        #: (headers, close, end of head, end of body) of a request whose body
        #: is still arriving.
        self._head: tuple[dict[str, str], bool, int, int] | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data

    @property
    def reading_body(self) -> bool:
        """True while a request's head is framed and its body is not all here."""
        return self._head is not None

    def take(self) -> bytes:
        """Every byte not framed yet (after :data:`HAND_OVER`); the framer keeps none."""
        data = bytes(self.buffer)
        self.buffer.clear()
        self._head = None
        return data

    def next_event(self) -> Event:
        """What the next request in the buffer is; a :class:`Request` leaves the buffer.

        After :data:`HAND_OVER` or a :class:`Refusal` the framer is done: call
        :meth:`take`, or close.
        """
        buf = self.buffer
        if self._head is None:
            head = self._frame_head()
            if not isinstance(head, tuple):
                return head
            self._head = head
        headers, close, start, stop = self._head
        if len(buf) < stop:
            return NEED_DATA
        body = bytes(buf[start:stop])
        del buf[:stop]
        self._head = None
        return Request(headers, body, close)

    def _frame_head(self) -> tuple[dict[str, str], bool, int, int] | Refusal | Signal:
        buf = self.buffer
        if not buf:
            return NEED_DATA
        if buf[0] < 0x21:
            # h11 refuses at once; Tornado would skip blank lines before a request.
            return Refusal("the request must begin with its request line (no blank line, "
                           "space or control character before it)", False)
        if not buf.startswith(REQUEST_LINE):
            if len(buf) < len(REQUEST_LINE) and REQUEST_LINE.startswith(buf):
                return NEED_DATA  # still could be an ingest request
            return HAND_OVER
        blank = _BLANK_LINE.search(buf, len(REQUEST_LINE) - 1)
        if blank is None:
            return HAND_OVER if len(buf) > MAX_HEAD else NEED_DATA
        end = blank.end()
        if end > MAX_HEAD or buf[end - 4:end] != b"\r\n\r\n":
            return HAND_OVER  # too long, or a bare LF: Tornado decides
        parsed = parse_head(bytes(buf[len(REQUEST_LINE):end - 4]))
        if not isinstance(parsed, dict):
            return parsed
        close = connection_close(parsed.get("connection", ""))
        length = parsed.get("content-length", "")
        if close is None or not length.isdigit():
            return HAND_OVER
        size = decimal(length)
        if size is None:
            return Refusal(f"Content-Length has {len(length)} digits; at most {MAX_DIGITS} "
                           "are accepted", True)
        if size > self.limit:
            return HAND_OVER  # Tornado's handler answers 413
        return parsed, close, end, end + size


def parse_head(head: bytes) -> dict[str, str] | Refusal | Signal:
    """The header lines between the request line and the empty line, by lower-case name.

    :data:`HAND_OVER` when the head is not the plain shape the fast path
    takes: a byte outside printable ASCII, a bare CR or LF, a folded or
    malformed line, a header given twice, or one of ``Transfer-Encoding``,
    ``Expect``, ``Upgrade``. A :class:`Refusal` when ``Host`` is missing or
    given twice (RFC 9112 section 3.2).
    """
    if not head.isascii() or len(head.translate(None, _CTL)) != len(head):
        return HAND_OVER
    joined = head.replace(b"\r\n", b"")
    if b"\n" in joined or b"\r" in joined:
        return HAND_OVER
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n") if head else ():
        name, sep, value = line.partition(b":")
        # A name is RFC 9110 token characters: nothing left once they are deleted.
        if not sep or not name or name.translate(None, _TCHAR):
            return HAND_OVER
        key = name.decode().lower()
        if key in headers:
            if key == "host":
                return Refusal("the request has more than one Host header", True)
            return HAND_OVER
        headers[key] = value.strip(b" \t").decode()
    if "host" not in headers:
        return Refusal("the request has no Host header (HTTP/1.1 requires one)", True)
    for banned in _NOT_PLAIN:
        if banned in headers:
            return HAND_OVER
    return headers


def connection_tokens(*values: str) -> set[str]:
    """The tokens of ``Connection`` header values, lower-case.

    Compared in any case, in a comma list (``keep-alive, Close``), empty list
    elements ignored, as RFC 9110 section 7.6.1 and h11 read them; a
    request asks to close after its answer when ``close`` is among them.
    """
    return {token.strip(" \t").lower() for value in values for token in value.split(",")} - {""}


def connection_close(value: str) -> bool | None:
    """Whether a ``Connection`` header value asks to close after the answer.

    None when it holds a token other than ``close`` and ``keep-alive``
    (``Upgrade``...), which the fast path leaves to Tornado.
    """
    tokens = connection_tokens(value)
    if not tokens <= {"close", "keep-alive"}:
        return None
    return "close" in tokens
