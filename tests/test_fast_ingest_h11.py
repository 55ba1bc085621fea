"""The ingest fast path frames requests exactly as h11 does, or does not answer them.

SPEC §3, Framing: "A request is framed exactly as RFC 9112 and h11 frame it,
or refused with 400." Hypothesis generates streams of requests, valid and
broken (header case, spaces and tabs around values, folded lines, duplicate
and conflicting lengths, Transfer-Encoding, Connection tokens, Host absent or
twice, lengths with leading zeros or too many digits, bytes before a request
line, bodies shorter or longer than announced, several requests pipelined),
feeds each to :class:`wsgate.adapters.ingest_framing.IngestFramer` split at
random byte positions and, whole, to h11, and checks:

- every request the fast path would answer (a ``Request``) is one h11 reads
  the same: same end in the stream, same headers, same body, same
  keep-alive decision;
- every request it refuses (a ``Refusal``, answered 400) is one h11 refuses;
- where it waits for more bytes, h11 has not read a whole request there;
- anything else is handed over to Tornado, which answers it (and is checked
  over the wire by tests/test_ingest_framing.py and tests/test_no_500.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsgate.adapters.ingest_framing import (
    HAND_OVER,
    NEED_DATA,
    IngestFramer,
    Refusal,
    Request,
)

SOAK = os.environ.get("WSGATE_SOAK") == "1"
LIMIT = 4096


# -- what h11 makes of a stream ---------------------------------------------------

@dataclass
class Framed:
    """One request as read: how it ends, and where in the stream."""

    kind: str  # "request", "error" or "incomplete"
    end: int = 0
    method: bytes = b""
    target: bytes = b""
    version: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    close: bool = False


def h11_reads(data: bytes) -> list[Framed]:
    """The requests h11 (as a server) reads in ``data``, in order, until one is not whole."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    out: list[Framed] = []
    current: Framed | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            out.append(Framed("error"))
            return out
        if event is h11.NEED_DATA or event is h11.PAUSED:
            out.append(Framed("incomplete"))
            return out
        if isinstance(event, h11.Request):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                # A repeated header makes no dict the fast path could match.
                key = name.decode("latin-1")
                headers[key] = value.decode("latin-1") if key not in headers else "\0repeated"
            current = Framed("request", method=event.method, target=event.target,
                             version=event.http_version, headers=headers)
        elif isinstance(event, h11.Data):
            assert current is not None
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            current.end = len(data) - len(conn.trailing_data[0])
            conn.send(h11.Response(status_code=202, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            current.close = conn.our_state is h11.MUST_CLOSE
            out.append(current)
            if current.close:
                return out
            conn.start_next_cycle()
            current = None
        else:  # ConnectionClosed cannot come: no EOF is fed
            raise AssertionError(event)


# -- what the fast path's framer makes of it ---------------------------------------

def framer_reads(data: bytes, cuts: list[int]) -> list[tuple[Any, int]]:
    """The framer's events on ``data`` fed in pieces cut at ``cuts``, each with the
    stream offset it had framed up to; it stops at the first event that is not
    a request (or after one that closes)."""
    framer = IngestFramer(LIMIT)
    events: list[tuple[Any, int]] = []
    fed = 0
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        framer.feed(data[start:stop])
        fed = stop
        while True:
            event = framer.next_event()
            consumed = fed - len(framer.buffer)
            if event is NEED_DATA:
                break
            events.append((event, consumed))
            if not isinstance(event, Request) or event.close:
                return events
    events.append((NEED_DATA, fed - len(framer.buffer)))
    return events


def check_agreement(data: bytes, cuts: list[int],
                    theirs: list[Framed] | None = None) -> list[tuple[Any, int]]:
    """The framer's events (:func:`framer_reads`), each checked against h11's reading
    (``theirs``: :func:`h11_reads` of ``data``, read here when not given)."""
    ours = framer_reads(data, cuts)
    theirs = h11_reads(data) if theirs is None else theirs
    for index, (event, consumed) in enumerate(ours):
        read = theirs[index] if index < len(theirs) else Framed("incomplete")
        if isinstance(event, Request):
            assert read.kind == "request", (index, event, read)
            assert (read.method, read.target, read.version) == (
                b"POST", b"/v1.0/events", b"1.1"), read
            assert consumed == read.end, (index, consumed, read.end)
            assert event.headers == read.headers, (index, event.headers, read.headers)
            assert event.body == read.body, index
            assert event.close == read.close, (index, event.headers)
        elif isinstance(event, Refusal):
            assert read.kind == "error", (index, event, read)
        elif event is NEED_DATA:
            # Waiting where h11 has read a whole request would hang a client h11 answers.
            assert read.kind != "request", (index, read)
        else:
            assert event is HAND_OVER
    return ours


# -- generated requests --------------------------------------------------------------

BODY = b'{"type":"call_created","customer_id":"5013bc52-da9a-11ee-844f-2fa34248de28","data":{}}'


def spaced(draw: Any, value: str) -> str:
    """``value`` with the optional white space RFC 9110 allows around it, or odd bytes."""
    left = draw(st.sampled_from(["", " ", "", "\t", "  \t "]))
    right = draw(st.sampled_from(["", "", " ", "\t", " \t"]))
    return left + value + right


def name_case(draw: Any, name: str) -> str:
    style = draw(st.sampled_from(["as is", "lower", "upper", "random"]))
    if style == "lower":
        return name.lower()
    if style == "upper":
        return name.upper()
    if style == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))
    return name


@st.composite
def content_lengths(draw: Any, size: int, broken: bool) -> list[str]:
    """The Content-Length header values of a request whose body is ``size`` bytes."""
    n = str(size)
    if not broken:
        return [draw(st.sampled_from([n, n, "0" * draw(st.integers(1, 6)) + n,
                                      n.rjust(20, "0")]))]
    kind = draw(st.sampled_from([
        "too many digits", "zeros past 20 digits", "twice, same", "twice, differ", "list",
        "list, differ", "missing", "empty", "signed", "not ascii", "too big", "wrong by one",
        "huge"]))
    if kind == "too many digits":
        return ["1" * draw(st.integers(21, 60))]
    if kind == "zeros past 20 digits":
        return [n.rjust(draw(st.integers(21, 40)), "0")]
    if kind == "twice, same":
        return [n, n]
    if kind == "twice, differ":
        return [n, str(size + 1)]
    if kind == "list":
        return [f"{n},{draw(st.sampled_from(['', ' ', '  ']))}{n}"]
    if kind == "list, differ":
        return [f"{n}, {size + 2}"]
    if kind == "missing":
        return []
    if kind == "empty":
        return [""]
    if kind == "signed":
        return [draw(st.sampled_from(["+", "-"])) + n]
    if kind == "not ascii":
        return [n + "\u00b2"]
    if kind == "too big":
        return [str(LIMIT + draw(st.integers(1, 10)))]
    if kind == "wrong by one":
        return [str(max(0, size + draw(st.sampled_from([-1, 1]))))]
    return ["9" * 4400]


#: What may be wrong with a generated request; a request draws none to a few.
FAULTS = ["request line", "host", "content-length", "transfer-encoding", "connection",
          "other headers", "space before colon", "folded line", "malformed line", "bare LF",
          "bytes before", "bytes after"]
CONNECTION_TOKENS = ["keep-alive", "close", "Close", "CLOSE", "Keep-Alive", ""]


@st.composite
def requests(draw: Any) -> bytes:
    """One request of the plain ingest shape, spelled in any way RFC 9112 allows,
    with none to a few faults."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=3))
    body = BODY[:draw(st.integers(0, len(BODY)))]
    line = "POST /v1.0/events HTTP/1.1"
    if "request line" in faults:
        line = draw(st.sampled_from([
            "POST /v1.0/events HTTP/1.0", "post /v1.0/events HTTP/1.1",
            "POST /v1.0/events?x=1 HTTP/1.1", "GET /healthz HTTP/1.1",
            "POST  /v1.0/events HTTP/1.1", "POST /v1.0/events HTTP/1.1 ",
            "POST /v1.0/events HTTP/1.1\x00"]))
    headers: list[tuple[str, str]] = []
    hosts = draw(st.sampled_from(["none", "twice", "twice, same", "empty"])) \
        if "host" in faults else "one"
    if hosts != "none":
        headers.append((name_case(draw, "Host"), "" if hosts == "empty" else "example.org"))
    if hosts.startswith("twice"):
        headers.append((name_case(draw, "Host"),
                        "example.org" if hosts == "twice, same" else "other.example"))
    headers.append((name_case(draw, "Content-Type"), "application/json"))
    headers.append((name_case(draw, "Authorization"), "Bearer test-ingest-key"))
    for value in draw(content_lengths(len(body), "content-length" in faults)):
        headers.append((name_case(draw, "Content-Length"), value))
    if "transfer-encoding" in faults:
        headers.append((name_case(draw, "Transfer-Encoding"),
                        draw(st.sampled_from(["chunked", "Chunked", "gzip", "chunked, gzip"]))))
    tokens = CONNECTION_TOKENS + (["upgrade", "TE"] if "connection" in faults else [])
    for _ in range(draw(st.integers(0, 2 if "connection" in faults else 1))):
        chosen = draw(st.lists(st.sampled_from(tokens), min_size=1, max_size=3))
        glue = draw(st.sampled_from([",", ", ", " ,", ",\t"]))
        headers.append((name_case(draw, "Connection"), glue.join(chosen)))
    if "other headers" in faults:
        for _ in range(draw(st.integers(1, 2))):
            headers.append((draw(st.sampled_from(["X-Trace", "Idempotency-Key", "Expect",
                                                  "Upgrade", "X-Wsgate-Timestamp"])),
                            draw(st.sampled_from(["a b", "1", "", "caf\u00e9", "tab\tin",
                                                  "100-continue", "websocket", "\u00b2"]))))
    headers = draw(st.permutations(headers))
    lines = [name + ":" + spaced(draw, value) for name, value in headers]
    if "space before colon" in faults:
        at = draw(st.integers(0, len(lines) - 1))
        name, _, value = lines[at].partition(":")
        lines[at] = name + draw(st.sampled_from([" ", "\t"])) + ":" + value
    if "folded line" in faults:
        lines.insert(draw(st.integers(1, len(lines))),
                     draw(st.sampled_from([" folded", "\tfolded", " "])))
    if "malformed line" in faults:
        lines.insert(draw(st.integers(0, len(lines))),
                     draw(st.sampled_from(["no colon", ":no name", "bad\x00byte: 1",
                                           "bad name: 1", "X-Ctl: a\x7fb", "X-Cr: a\rb"])))
    ends = ["\r\n"] * (len(lines) + 2)
    if "bare LF" in faults:
        ends[draw(st.integers(0, len(ends) - 1))] = "\n"
    before = draw(st.sampled_from(["\r\n", "\n", " ", "\x00", "\r\n\r\n"])) \
        if "bytes before" in faults else ""
    head = before + line + ends[0] + "".join(h + e for h, e in zip(lines, ends[1:], strict=False))
    head += ends[-1]
    tail = draw(st.sampled_from([b"\r\n", b"x", b"\n"])) if "bytes after" in faults else b""
    return head.encode("latin-1", "replace") + body + tail


@st.composite
def streams(draw: Any) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(requests(), min_size=1, max_size=4)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=6)))
    return data, [c for c in cuts if 0 < c < len(data)]


PLAIN = (b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Content-Length: 2\r\n\r\n{}")


@settings(max_examples=5000 if SOAK else 400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(streams())
@example((PLAIN + PLAIN, [1, 40, 70]))
@example((PLAIN.replace(b"Host: x", b"Connection: keep-alive, Close\r\nHost: x") + PLAIN, []))
@example((b"\r\n" + PLAIN, []))
@example((PLAIN.replace(b"Host: x\r\n", b""), []))
@example((PLAIN.replace(b": 2", b": " + b"0" * 4300 + b"2"), [60]))
@example((PLAIN.replace(b"\r\n\r\n", b"\r\n\n"), []))
def test_the_fast_path_frames_every_request_it_answers_as_h11_does(stream):
    data, cuts = stream
    check_agreement(data, cuts)


def test_the_generator_reaches_every_outcome():
    # A differential test whose generator never makes the framer answer, refuse
    # or hand over checks nothing: each outcome must come up.
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(streams())
    def collect(stream):
        for event, _ in check_agreement(*stream):
            seen.add(type(event).__name__ if not isinstance(event, type(NEED_DATA)) else
                     event.name)

    collect()
    assert seen >= {"Request", "Refusal", "HAND_OVER"}, seen


# -- known cases, by name ------------------------------------------------------------

CASES = {
    "plain": (PLAIN, ["Request"]),
    "two pipelined": (PLAIN + PLAIN, ["Request", "Request"]),
    "Close in another case": (PLAIN.replace(b"Host: x", b"Connection: Close\r\nHost: x") + PLAIN,
                              ["Request"]),
    "close in a list": (PLAIN.replace(b"Host: x", b"Connection: keep-alive ,CLOSE\r\nHost: x"),
                        ["Request"]),
    "no Host": (PLAIN.replace(b"Host: x\r\n", b""), ["Refusal"]),
    "two Hosts": (PLAIN.replace(b"Host: x", b"Host: x\r\nhost: y"), ["Refusal"]),
    "CRLF before": (b"\r\n" + PLAIN, ["Refusal"]),
    "CRLF between": (PLAIN + b"\r\n" + PLAIN, ["Request", "Refusal"]),
    "4301 digits": (PLAIN.replace(b": 2", b": " + b"1" * 4301), ["Refusal"]),
    "4301 zeros": (PLAIN.replace(b": 2", b": " + b"0" * 4301), ["Refusal"]),
    "leading zeros": (PLAIN.replace(b": 2", b": 0002"), ["Request"]),
    "bare LF": (PLAIN.replace(b"Host: x\r\n", b"Host: x\n"), ["HAND_OVER"]),
    "bare LF ends the head": (PLAIN.replace(b"\r\n\r\n", b"\r\n\n"), ["HAND_OVER"]),
    "obs-fold": (PLAIN.replace(b"Host: x", b"Host: x\r\n y"), ["HAND_OVER"]),
    "chunked": (PLAIN.replace(b"Content-Length: 2", b"Transfer-Encoding: chunked"),
                ["HAND_OVER"]),
    "length list": (PLAIN.replace(b": 2", b": 2, 2"), ["HAND_OVER"]),
    "another path": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", ["HAND_OVER"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_known_requests_and_what_the_framer_makes_of_them(name):
    data, expected = CASES[name]
    theirs = h11_reads(data)
    for cut in range(1, len(data)):  # and split at every byte
        events = [e for e, _ in check_agreement(data, [cut], theirs) if e is not NEED_DATA]
        assert [type(e).__name__ if isinstance(e, Request | Refusal) else e.name
                for e in events] == expected, (name, cut)
