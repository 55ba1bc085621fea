"""wsgate.adapters.wsframes: the sans-I/O frame parser, fed bytes, no socket.

Random valid streams give the same events however they are cut; every limit
is exact at its boundary; every malformed header gives its close code. The
same behaviour over a real socket is in tests/test_websocket_frames.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsgate import errors
from wsgate.adapters.wsframes import (
    Close,
    Event,
    Failure,
    FrameParser,
    Ping,
    Pong,
    parse_close,
)

#: ``make soak`` sets WSGATE_SOAK=1: more examples.
SOAK = os.environ.get("WSGATE_SOAK") == "1"
EXAMPLES = settings(max_examples=3000 if SOAK else 300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=1000 if SOAK else 100, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])

PROTOCOL = errors.CLOSE_PROTOCOL_ERROR
TOO_BIG = errors.CLOSE_TOO_BIG
INVALID = errors.CLOSE_INVALID_DATA


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes | None = b"abcd",
          rsv: int = 0, length: int | None = None, width: int | None = None) -> bytes:
    """One client frame. ``length`` overrides the announced length; ``width``
    forces the length encoding (0: 7 bits, 2: 16 bits, 8: 64 bits)."""
    n = len(payload) if length is None else length
    head = bytes((opcode | (0x80 if fin else 0) | rsv,))
    bit = 0x80 if mask is not None else 0
    if width is None:
        width = 0 if n < 126 else 2 if n < 65536 else 8
    if width == 0:
        head += bytes((bit | n,))
    elif width == 2:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_all(parser: FrameParser, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def parse(wire: bytes, max_message_size: int = 1 << 20, max_fragments: int = 1000,
          ) -> list[Event]:
    return FrameParser(max_message_size, max_fragments).feed(wire)


def cut(wire: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(wire) + 1) for p in points})
    bounds = [0, *points, len(wire)]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- random valid streams ---------------------------------------------------------------


@dataclass
class Stream:
    wire: bytes
    events: list[Event]
    #: The largest message and most frames of one message in the stream.
    largest: int
    most_frames: int


masks = st.binary(min_size=4, max_size=4)
control_payloads = st.binary(max_size=125)


@st.composite
def controls(draw: st.DrawFn) -> tuple[bytes, Event]:
    payload = draw(control_payloads)
    mask = draw(masks)
    if draw(st.booleans()):
        return frame(9, payload, mask=mask), Ping(payload)
    return frame(10, payload, mask=mask), Pong(payload)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[Event], int, int]:
    """One data message, maybe fragmented (empty fragments too), with control
    frames between its fragments; its wire and the events it gives."""
    text = draw(st.booleans())
    data: str | bytes = draw(st.text(max_size=300)) if text else draw(st.binary(max_size=300))
    raw = data.encode() if isinstance(data, str) else data
    # Fragment boundaries anywhere, multi-byte characters split included.
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=False)]
    wire = b""
    events: list[Event] = []
    for i, piece in enumerate(pieces):
        opcode = (1 if text else 2) if i == 0 else 0
        wire += frame(opcode, piece, fin=i == len(pieces) - 1, mask=draw(masks))
        if i < len(pieces) - 1:
            for c_wire, c_event in draw(st.lists(controls(), max_size=2)):
                wire += c_wire
                events.append(c_event)
    events.append(data)
    return wire, events, len(raw), len(pieces)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    wire = b""
    events: list[Event] = []
    largest = most = 0
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            c_wire, c_event = draw(controls())
            wire += c_wire
            events.append(c_event)
        else:
            m_wire, m_events, size, frames = draw(messages())
            wire += m_wire
            events += m_events
            largest = max(largest, size)
            most = max(most, frames)
    if draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 3000, 4999]))
        reason = draw(st.text(max_size=20))
        wire += frame(8, code.to_bytes(2, "big") + reason.encode()[:100], mask=draw(masks))
        events.append(parse_close(code.to_bytes(2, "big") + reason.encode()[:100]))
    return Stream(wire, events, largest, most)


@EXAMPLES
@given(streams(), st.lists(st.integers(0, 10**6), max_size=8))
def test_a_valid_stream_gives_the_same_events_however_it_is_cut(stream, points):
    assert parse(stream.wire) == stream.events
    assert feed_all(FrameParser(1 << 20, 1000), cut(stream.wire, points)) == stream.events
    # Every split point at once: one byte at a time.
    parser = FrameParser(1 << 20, 1000)
    events: list[Event] = []
    for i in range(len(stream.wire)):
        events += parser.feed(stream.wire[i:i + 1])
        # What it holds never passes one message (or control frame) and a header.
        assert parser.buffered <= max(stream.largest, 125) + 14
    assert events == stream.events
    assert parser.buffered == 0


@EXAMPLES
@given(streams())
def test_limits_set_exactly_to_a_streams_largest_message_and_most_frames_pass_it(stream):
    limits = (max(stream.largest, 1), max(stream.most_frames, 1))
    assert parse(stream.wire, *limits) == stream.events


@EXAMPLES
@given(st.binary(max_size=400), st.lists(st.integers(0, 10**6), max_size=8),
       st.integers(0, 200), st.integers(1, 10))
def test_any_bytes_give_the_same_events_however_they_are_cut_and_stop_at_the_end(
        wire, points, max_size, max_frames):
    whole = parse(wire, max_size, max_frames)
    parser = FrameParser(max_size, max_frames)
    assert feed_all(parser, cut(wire, points)) == whole
    ends = [e for e in whole if isinstance(e, Close | Failure)]
    assert ends == whole[-1:] if ends else True
    assert parser.finished == bool(ends)
    if ends:
        assert parser.feed(frame(9)) == [] and parser.buffered == 0
    for e in whole:
        if isinstance(e, Failure):
            assert e.code in (PROTOCOL, INVALID, TOO_BIG)


# -- limits at their boundary -----------------------------------------------------------


@FEW
@given(st.integers(0, 300), st.integers(1, 8), st.booleans(), masks)
def test_max_message_size_is_exact_in_one_frame_and_in_fragments(limit, frames, text, mask):
    data = b"x" * limit
    opcode = 1 if text else 2
    expected = data.decode() if text else data
    # Exactly the limit: in one frame, and over `frames` fragments.
    assert parse(frame(opcode, data, mask=mask), limit) == [expected]
    step = -(-limit // frames) or 1
    parts = [data[i:i + step] for i in range(0, limit, step)] or [b""]
    wire = b"".join(frame(opcode if i == 0 else 0, p, fin=i == len(parts) - 1, mask=mask)
                    for i, p in enumerate(parts))
    assert parse(wire, limit) == [expected]
    # One byte over: refused on the header of the frame that passes it, before
    # its payload arrives.
    over = frame(opcode, data + b"y", mask=mask)
    header = over[:len(over) - limit - 1]
    assert FrameParser(limit, 1000).feed(header) == [Failure(TOO_BIG, "message too big")]
    last = len(parts) - 1
    wire = b"".join(frame(opcode if i == 0 else 0, p + (b"y" if i == last else b""),
                          fin=i == last, mask=mask) for i, p in enumerate(parts))
    assert parse(wire, limit) == [Failure(TOO_BIG, "message too big")]


@FEW
@given(st.integers(1, 50), st.booleans())
def test_max_fragments_is_exact_and_empty_continuations_count(limit, empty):
    def message(frames: int) -> bytes:
        body = b"" if empty else b"ab"
        return b"".join(frame(1 if i == 0 else 0, body, fin=i == frames - 1)
                        for i in range(frames))
    text = "" if empty else "ab" * limit
    assert parse(message(limit), max_fragments=limit) == [text]
    if limit > 1:
        # A ping between fragments is not a fragment.
        wire = message(limit)
        first = len(frame(1, b"" if empty else b"ab"))
        with_ping = wire[:first] + frame(9, b"p") + wire[first:]
        assert parse(with_ping, max_fragments=limit) == [Ping(b"p"), (text)]
    refused = Failure(TOO_BIG, f"message in more than {limit} frames")
    assert parse(message(limit + 1), max_fragments=limit) == [refused]
    # Refused on the header of the frame past the cap; a second message may
    # again use the whole allowance.
    assert parse(message(limit) + message(limit), max_fragments=limit) == [text] * 2


def test_endless_empty_continuations_hold_nothing_and_stop_at_the_cap():
    parser = FrameParser(65536, 1000)
    assert parser.feed(frame(1, b"x", fin=False)) == []
    empty = frame(0, b"", fin=False)
    assert parser.feed(empty * 998) == []
    assert parser.buffered == 1
    events = parser.feed(empty * 100_000)
    assert events == [Failure(TOO_BIG, "message in more than 1000 frames")]
    assert parser.finished and parser.buffered == 0


def test_a_huge_frame_is_refused_on_its_header_and_nothing_is_held():
    parser = FrameParser(65536, 1000)
    assert parser.feed(bytes((0x81, 0xFF)) + (1 << 31).to_bytes(8, "big")) == [
        Failure(TOO_BIG, "message too big")]
    assert parser.buffered == 0
    # At the limit the frame is held (not yet whole) until it is complete.
    parser = FrameParser(65536, 1000)
    wire = frame(2, b"z" * 65536)
    assert parser.feed(wire[:-1]) == []
    assert parser.buffered == len(wire) - 1
    assert parser.feed(wire[-1:]) == [b"z" * 65536]
    assert parser.buffered == 0


# -- malformed frames -------------------------------------------------------------------

MALFORMED = [
    ("unmasked", frame(1, b"{}", mask=None), PROTOCOL, "client frames must be masked"),
    ("unmasked ping", frame(9, mask=None), PROTOCOL, "client frames must be masked"),
    ("rsv1", frame(1, b"{}", rsv=0x40), PROTOCOL, "no extension was negotiated"),
    ("rsv2", frame(2, b"{}", rsv=0x20), PROTOCOL, "no extension was negotiated"),
    ("rsv3", frame(9, b"", rsv=0x10), PROTOCOL, "no extension was negotiated"),
    *[(f"opcode {op}", frame(op, b"x"), PROTOCOL, "unknown opcode")
      for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)],
    ("64-bit length, top bit set", frame(2, length=1 << 63, width=8)[:10], PROTOCOL,
     "a 64-bit frame length must have its top bit clear"),
    ("64-bit length, all bits set", frame(2, length=(1 << 64) - 1, width=8)[:10], PROTOCOL,
     "a 64-bit frame length must have its top bit clear"),
    ("ping of 126 bytes", frame(9, b"p" * 126), PROTOCOL,
     "control frames must be whole and at most 125 bytes"),
    ("pong announcing 126 in 16 bits", frame(10, length=126, width=2)[:4], PROTOCOL,
     "control frames must be whole and at most 125 bytes"),
    ("close announcing 2**40", frame(8, length=1 << 40, width=8)[:10], PROTOCOL,
     "control frames must be whole and at most 125 bytes"),
    ("fragmented ping", frame(9, b"p", fin=False), PROTOCOL,
     "control frames must be whole and at most 125 bytes"),
    ("fragmented close", frame(8, b"\x03\xe8", fin=False), PROTOCOL,
     "control frames must be whole and at most 125 bytes"),
    ("continuation first", frame(0, b"x"), PROTOCOL, "continuation frame without a message"),
    ("text inside a fragmented text", frame(1, b"{", fin=False) + frame(1, b"{}"), PROTOCOL,
     "new message inside a fragmented one"),
    ("binary inside a fragmented text", frame(1, b"{", fin=False) + frame(2, b"{}"), PROTOCOL,
     "new message inside a fragmented one"),
    ("invalid UTF-8", frame(1, b'{"type":"\xff"}'), INVALID, "text frame is not valid UTF-8"),
    ("UTF-16 surrogate", frame(1, b'"\xed\xa0\x80"'), INVALID, "text frame is not valid UTF-8"),
    ("overlong encoding", frame(1, b"\xc0\xaf"), INVALID, "text frame is not valid UTF-8"),
    ("past U+10FFFF", frame(1, b"\xf4\x90\x80\x80"), INVALID, "text frame is not valid UTF-8"),
    ("invalid UTF-8 across fragments", frame(1, b'"\xe2\x82', fin=False) + frame(0, b'("'),
     INVALID, "text frame is not valid UTF-8"),
    ("truncated character at the end", frame(1, b"\xe2\x82", fin=False) + frame(0, b""),
     INVALID, "text frame is not valid UTF-8"),
]


@pytest.mark.parametrize("name, wire, code, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_frame_fails_with_its_code_and_nothing_after_it_is_parsed(name, wire, code,
                                                                            reason):
    before = frame(9, b"before") + frame(1, b"ok")
    after = frame(1, b"never") + frame(9, b"never")
    for chunks in ([before + wire + after], [before, wire, after],
                   [bytes((b,)) for b in before + wire + after]):
        parser = FrameParser(1 << 20, 1000)
        assert feed_all(parser, chunks) == [Ping(b"before"), "ok",
                                            Failure(code, reason)], chunks
        assert parser.finished and parser.buffered == 0


def test_a_text_message_is_str_a_binary_one_bytes_of_any_value():
    for wire, expected in [(frame(2, b"\xff\x00"), b"\xff\x00"),
                           (frame(2, b"a", fin=False) + frame(0, b"b"), b"ab"),
                           (frame(1, "é€".encode()), "é€"),
                           (frame(1, "é".encode()[:1], fin=False) + frame(0, "é".encode()[1:]),
                            "é")]:
        [message] = parse(wire)
        assert message == expected and type(message) is type(expected)


def test_lengths_need_not_be_minimal():
    # RFC 6455 asks senders for the shortest length form; as most servers do,
    # a longer one is read, not refused.
    assert parse(frame(1, b"hi", width=2) + frame(1, b"yo", width=8)) == [
        "hi", "yo"]


@pytest.mark.parametrize("payload, close", [
    (b"", Close(None, "", None)),
    (b"\x03", Close(None, "", PROTOCOL)),
    ((1000).to_bytes(2, "big") + b"bye", Close(1000, "bye", 1000)),
    ((4321).to_bytes(2, "big"), Close(4321, "", 4321)),
    ((3000).to_bytes(2, "big"), Close(3000, "", 3000)),
    ((1005).to_bytes(2, "big"), Close(1005, "", PROTOCOL)),
    ((1006).to_bytes(2, "big"), Close(1006, "", PROTOCOL)),
    ((1015).to_bytes(2, "big"), Close(1015, "", PROTOCOL)),
    ((999).to_bytes(2, "big"), Close(999, "", PROTOCOL)),
    ((2999).to_bytes(2, "big"), Close(2999, "", PROTOCOL)),
    ((5000).to_bytes(2, "big"), Close(5000, "", PROTOCOL)),
    ((1000).to_bytes(2, "big") + b"\xff", Close(1000, "", INVALID)),
])
def test_close_payloads(payload, close):
    parser = FrameParser(1 << 20, 1000)
    assert parser.feed(frame(8, payload) + frame(9, b"after")) == [close]
    assert parser.finished


def test_a_close_in_the_middle_of_a_fragmented_message_ends_it():
    parser = FrameParser(1 << 20, 1000)
    assert parser.feed(frame(1, b"abc", fin=False) + frame(8)) == [Close(None, "", None)]
    assert parser.buffered == 0
