"""RFC 6455 client frames parsed from bytes, with no socket, clock or I/O.

:class:`FrameParser` is fed the bytes a connection reads and returns what they
mean: whole data messages, control frames, and the failure that ends the
connection together with the close code to send. The WebSocket layer
(wsgate/adapters/wsconn.py) does the reading, the writing and the closing;
this module only parses, so it can be tested and fuzzed without a socket
(tests/test_wsframes.py), as ``h11`` and the ``websockets`` library do it.

A data message is returned as itself: the ``str`` of a text message, the
``bytes`` of a binary one (no wrapper object: this runs for every message a
client sends).

What it checks, on the header, before any payload is held:

- client frames are masked; no reserved bit is set (no extension is ever
  negotiated); the opcode is one RFC 6455 defines; a 64-bit length has its
  top bit clear; a control frame is whole (FIN) and at most 125 bytes; a
  continuation frame continues a message and a new message does not start
  inside one: otherwise **1002**;
- a message (all its fragments) is at most ``max_message_size`` bytes, and in
  at most ``max_fragments`` frames, empty ones included: otherwise **1009**.

A text message is checked to be UTF-8 once whole (**1007**), and a close
frame's payload as RFC 6455 section 7.4 says (:class:`Close`).
"""

from __future__ import annotations

from dataclasses import dataclass

from wsgate import errors
from wsgate.adapters.tornado_compat import websocket_mask

# Close codes a peer may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved.
_PEER_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                         1014))


@dataclass(slots=True)
class Ping:
    """A ping frame; the answer is a pong with the same payload (at most 125 bytes)."""

    payload: bytes


@dataclass(slots=True)
class Pong:
    """A pong frame (an answer to a ping, or an unasked heartbeat)."""

    payload: bytes


@dataclass(slots=True)
class Close:
    """The peer's close frame; the parser returns nothing after it.

    Attributes:
        code: the code the peer sent, or None for an empty payload (also for a
            1-byte payload, which cannot hold a code).
        reason: its reason text ("" when absent or not UTF-8).
        reply: the code of the close frame to answer with: the peer's code;
            1002 for a code a peer may not send or a 1-byte payload; 1007 for
            a reason that is not UTF-8; None (an empty close frame) for an
            empty payload.
    """

    code: int | None
    reason: str
    reply: int | None


@dataclass(slots=True)
class Failure:
    """The peer broke the protocol or a limit: fail the connection with ``code``
    (1002, 1007 or 1009) and ``reason``. The parser returns nothing after it."""

    code: int
    reason: str


#: What :meth:`FrameParser.feed` returns, in the order the frames came: a whole
#: text message (``str``, valid UTF-8), a whole binary message (``bytes``), or a
#: control frame, or the end (:class:`Close`, :class:`Failure`).
Event = str | bytes | Ping | Pong | Close | Failure


def parse_close(payload: bytes) -> Close:
    """The meaning of a close frame's payload (RFC 6455 sections 5.5.1 and 7.4)."""
    if len(payload) >= 2:
        code = int.from_bytes(payload[:2], "big")
        if code not in _PEER_CODES and not 3000 <= code <= 4999:
            return Close(code, "", errors.CLOSE_PROTOCOL_ERROR)
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            return Close(code, "", errors.CLOSE_INVALID_DATA)
        return Close(code, reason, code)
    if payload:
        return Close(None, "", errors.CLOSE_PROTOCOL_ERROR)
    return Close(None, "", None)


class FrameParser:
    """The frames a WebSocket client sends, parsed from its bytes as they arrive.

    Args:
        max_message_size: most bytes in one message (all its fragments); the
            frame that would pass it is a 1009 failure, found on its header.
        max_fragments: most frames one message may take (the first frame and
            its continuations, empty ones too); the next is a 1009 failure.

    ``feed(data)`` takes any slice of the stream, from one byte to many frames,
    and returns the events it completes; the same stream cut anywhere gives the
    same events. After a :class:`Close` or a :class:`Failure` the parser is
    ``finished`` and returns nothing more.

    Attributes:
        buffered: bytes held after the last ``feed``: the part of a frame not
            yet whole and the fragments of the message so far; at most
            ``max_message_size`` (or 125 for a control frame) plus a 14-byte
            frame header.
    """

    __slots__ = ("max_message_size", "max_fragments", "buffered", "_buf", "_need", "_frag",
                 "_frag_text", "_frag_count", "_finished")

    def __init__(self, max_message_size: int, max_fragments: int) -> None:
        self.max_message_size = max_message_size
        self.max_fragments = max_fragments
        self.buffered = 0
        # Bytes of a frame not yet whole, and how many bytes of it the next step
        # needs (2 for a header, up to 14 for a long one, then the whole frame).
        self._buf = bytearray()
        self._need = 2
        # The payload of a fragmented message so far: one growing buffer, so an
        # empty fragment costs nothing but its count.
        self._frag: bytearray | None = None
        self._frag_text = False
        self._frag_count = 0
        self._finished = False

    @property
    def finished(self) -> bool:
        """True after a :class:`Close` or a :class:`Failure` was returned."""
        return self._finished

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data`` (the next bytes of the stream); return the events it completes."""
        if self._finished:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                self.buffered += len(data)
                return []
            data = bytes(buf)
            buf.clear()
        elif len(data) < self._need:
            buf += data
            self.buffered += len(data)
            return []
        events: list[Event] = []
        pos = self._parse(data, events)
        if pos < len(data) and not self._finished:
            buf += data[pos:] if pos else data
        frag = self._frag
        self.buffered = len(buf) + len(frag) if frag is not None else len(buf)
        return events

    def _fail(self, events: list[Event], code: int, reason: str) -> int:
        events.append(Failure(code, reason))
        self._finished = True
        self._buf.clear()
        self._frag = None
        return 0

    def _parse(self, data: bytes, events: list[Event]) -> int:
        """Parse whole frames from ``data``; return where the first incomplete one starts."""
        n = len(data)
        pos = 0
        while True:
            left = n - pos
            if left < 2:
                self._need = 2
                return pos
            b0 = data[pos]
            b1 = data[pos + 1]
            opcode = b0 & 0x0F
            if not b1 & 0x80:
                return self._fail(events, errors.CLOSE_PROTOCOL_ERROR,
                                  "client frames must be masked")
            if b0 & 0x70:
                return self._fail(events, errors.CLOSE_PROTOCOL_ERROR,
                                  "no extension was negotiated")
            length = b1 & 0x7F
            head = 6
            if length == 126:
                if left < 4:
                    self._need = 4
                    return pos
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 8
            elif length == 127:
                if left < 10:
                    self._need = 10
                    return pos
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                if length >> 63:
                    return self._fail(events, errors.CLOSE_PROTOCOL_ERROR,
                                      "a 64-bit frame length must have its top bit clear")
                head = 14
            frag = self._frag
            if opcode >= 8:
                if opcode > 10:
                    return self._fail(events, errors.CLOSE_PROTOCOL_ERROR, "unknown opcode")
                if not b0 & 0x80 or length > 125:
                    return self._fail(events, errors.CLOSE_PROTOCOL_ERROR,
                                      "control frames must be whole and at most 125 bytes")
            elif opcode > 2:
                return self._fail(events, errors.CLOSE_PROTOCOL_ERROR, "unknown opcode")
            elif (opcode == 0) is (frag is None):
                return self._fail(events, errors.CLOSE_PROTOCOL_ERROR,
                                  "continuation frame without a message" if opcode == 0
                                  else "new message inside a fragmented one")
            elif opcode == 0 and self._frag_count >= self.max_fragments:
                return self._fail(events, errors.CLOSE_TOO_BIG,
                                  f"message in more than {self.max_fragments} frames")
            elif length + (len(frag) if frag is not None else 0) > self.max_message_size:
                # Checked on the header: the payload is never held.
                return self._fail(events, errors.CLOSE_TOO_BIG, "message too big")
            end = pos + head + length
            if end > n:
                self._need = end - pos
                return pos
            payload = websocket_mask(data[pos + head - 4:pos + head], data[pos + head:end])
            pos = end
            if opcode >= 8:
                if opcode == 9:
                    events.append(Ping(payload))
                elif opcode == 10:
                    events.append(Pong(payload))
                else:
                    events.append(parse_close(payload))
                    self._finished = True
                    self._frag = None
                    return pos
                continue
            if not b0 & 0x80:
                if frag is None:
                    self._frag = bytearray(payload)
                    self._frag_text = opcode == 1
                    self._frag_count = 1
                else:
                    frag += payload
                    self._frag_count += 1
                continue
            text = opcode == 1
            if frag is not None:
                frag += payload
                payload = bytes(frag)
                text = self._frag_text
                self._frag = None
                self._frag_count = 0
            if text:
                try:
                    events.append(payload.decode())
                except UnicodeDecodeError:
                    return self._fail(events, errors.CLOSE_INVALID_DATA,
                                      "text frame is not valid UTF-8")
            else:
                events.append(payload)
