"""wsgate.tornado_compat: each assumption about Tornado, checked against the installed Tornado.

A Tornado release that changes one of them fails a test here instead of
production. The numbers in the docstrings are those of the assumptions listed
in wsgate/tornado_compat.py.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import random
import socket
from typing import Any

import pytest
import tornado
import tornado.httpclient
import tornado.httpserver
import tornado.iostream
import tornado.tcpserver
import tornado.testing
import tornado.util
import tornado.web

from wsgate import tornado_compat
from wsgate.handlers.base import JSONHandler
from wsgate.tornado_compat import (
    prepend_read,
    request_finished,
    response_reason,
    take_read_buffer,
    websocket_mask_python,
)


@pytest.fixture
def streams(io_loop: Any) -> Any:
    """A factory of connected ``(IOStream, IOStream)`` pairs over ``socket.socketpair()``."""
    made: list[tornado.iostream.IOStream] = []

    def make() -> tuple[tornado.iostream.IOStream, tornado.iostream.IOStream]:
        a, b = socket.socketpair()
        pair = (tornado.iostream.IOStream(a), tornado.iostream.IOStream(b))
        made.extend(pair)
        return pair

    yield make
    for stream in made:
        stream.close()


# -- 1. the WebSocket mask ------------------------------------------------------

def rfc6455_mask(mask: bytes, data: bytes) -> bytes:
    """RFC 6455 section 5.3, as written: octet i XOR mask octet i mod 4."""
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(data))


def test_websocket_mask_is_tornados_helper():
    """1: ``tornado.util._websocket_mask`` exists and is what wsgate masks with
    (not the slower fallback); it is ``tornado.speedups``' C function when that
    extension is built."""
    assert tornado_compat.websocket_mask is getattr(tornado.util, "_websocket_mask", None)
    if importlib.util.find_spec("tornado.speedups") is None or \
            os.environ.get("TORNADO_NO_EXTENSION"):
        pytest.skip("this Tornado has no C speedups")
    speedups = importlib.import_module("tornado.speedups")
    assert tornado_compat.websocket_mask is speedups.websocket_mask


@pytest.mark.parametrize("mask_function", [tornado_compat.websocket_mask, websocket_mask_python],
                         ids=["tornado", "fallback"])
def test_websocket_mask_applies_the_rfc_6455_mask(mask_function):
    """1: both the helper and the fallback give the RFC's result, as bytes, for
    random masks and data of lengths 0 to 65537, multiples of 4 or not."""
    rng = random.Random(6455)
    for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 125, 126, 127, 1000, 65535, 65536, 65537):
        mask, data = rng.randbytes(4), rng.randbytes(n)
        masked = mask_function(mask, data)
        assert type(masked) is bytes
        assert masked == rfc6455_mask(mask, data), f"length {n}"
        assert mask_function(mask, masked) == data, f"length {n}"


# -- 2. the read buffer: prepend_read and take_read_buffer -------------------------

HEAD = b"GET /v1.0/ws HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("read", ["read_until_regex", "read_until", "read_bytes"])
async def test_bytes_given_with_prepend_read_are_read_first(streams, read):
    """2: bytes given with ``prepend_read`` come before those still in the
    socket, for each read Tornado's HTTP server makes (``read_until_regex`` for
    a head, as ``HTTP1Connection`` calls it; ``read_bytes`` for a body)."""
    stream, peer = streams()
    await peer.write(HEAD[10:] + b"BODY")  # in the socket, not yet read by the stream
    prepend_read(stream, HEAD[:10])
    prepend_read(stream, b"")
    if read == "read_until_regex":
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=65536)
    elif read == "read_until":
        head = await stream.read_until(b"\r\n\r\n")
    else:
        head = await stream.read_bytes(len(HEAD))
    assert head == HEAD
    assert await stream.read_bytes(4) == b"BODY"


@pytest.mark.gen_test(timeout=10)
async def test_a_server_hands_over_a_stream_that_has_read_nothing():
    """4, the condition under which ``GatewayHTTPServer`` may read the socket
    itself and later ``prepend_read``: when ``handle_stream`` runs, the request
    the client sent before the accept is still in the socket, the stream has
    buffered none of it, and it watches the socket for neither reading nor
    writing (``loop.remove_reader``/``remove_writer`` find nothing to remove)."""
    seen: asyncio.Future[tuple[bool, bool, bytes, bytes]] = asyncio.Future()

    class Probe(tornado.tcpserver.TCPServer):
        def handle_stream(self, stream, address):
            loop = asyncio.get_running_loop()
            fd = stream.socket.fileno()
            seen.set_result((loop.remove_reader(fd), loop.remove_writer(fd),
                             take_read_buffer(stream), stream.socket.recv(1024)))
            stream.close()

    listener, port = tornado.testing.bind_unused_port()
    server = Probe()
    server.add_sockets([listener])
    # Blocking connect and send: both complete in the kernel before the
    # server's loop accepts, so the request is waiting when handle_stream runs.
    client = socket.create_connection(("127.0.0.1", port))
    try:
        client.sendall(HEAD)
        watched_read, watched_write, buffered, in_socket = await seen
    finally:
        client.close()
        server.stop()
    assert (watched_read, watched_write) == (False, False)
    assert buffered == b""
    assert in_socket == HEAD


@pytest.mark.gen_test(timeout=10)
async def test_take_read_buffer_returns_what_the_stream_read_and_did_not_deliver(streams):
    """2: after a read, what the stream took from the socket beyond it (here a
    WebSocket frame sent with the handshake, in the same send) is returned once;
    the stream keeps none of it, so its next read gets only newer bytes."""
    stream, peer = streams()
    assert take_read_buffer(stream) == b""
    frame = b"\x81\x84abcd" + bytes(b ^ k for b, k in zip(b"ping", b"abcd", strict=True))
    await peer.write(HEAD + frame)
    assert await stream.read_until(b"\r\n\r\n") == HEAD
    assert await stream.read_bytes(2) == frame[:2]
    assert take_read_buffer(stream) == frame[2:]
    assert take_read_buffer(stream) == b""
    await peer.write(b"later")
    assert await stream.read_bytes(5, partial=True) == b"later"
    prepend_read(stream, b"given")
    assert take_read_buffer(stream) == b"given"


# -- 5. unsent output at the upgrade ---------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_writing_reports_output_not_yet_in_the_socket(streams):
    """5: ``writing()`` is False once a write is all in the socket and True
    while one is not (4 MiB to a peer that has not read); ``write(b"")``
    resolves only after the earlier write has reached the socket, and then
    ``writing()`` is False."""
    stream, peer = streams()
    await stream.write(b"101")
    assert not stream.writing()
    assert await peer.read_bytes(3) == b"101"

    big = bytes(range(256)) * (16 * 1024)
    order: list[str] = []
    written = stream.write(big)
    written.add_done_callback(lambda _: order.append("big"))
    assert stream.writing()
    flushed = stream.write(b"")
    flushed.add_done_callback(lambda _: order.append("flush"))
    assert not flushed.done()
    assert await peer.read_bytes(len(big)) == big
    await flushed
    assert written.done()
    assert order == ["big", "flush"]
    assert not stream.writing()


# -- 3. what a RequestHandler keeps to itself -------------------------------------

class Probe(tornado.web.RequestHandler):
    """Answers with ``response_reason`` as its body, and notes ``request_finished``."""

    def initialize(self, seen: list[tuple[str, bool]]) -> None:
        self.seen = seen

    def get(self, how: str) -> None:
        self.seen.append(("before finish", request_finished(self)))
        if how == "given":
            self.set_status(299, "Fine Thanks")
        elif how == "standard":
            self.set_status(404)
        elif how == "unknown":
            self.set_status(299)
        elif how == "error":
            raise tornado.web.HTTPError(418)
        elif how == "error-given":
            raise tornado.web.HTTPError(503, reason="Busy Now")
        self.finish(response_reason(self))
        self.seen.append(("after finish", request_finished(self)))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.seen.append(("write_error", request_finished(self)))
        self.finish(response_reason(self))

    def on_finish(self) -> None:
        self.seen.append(("on_finish", request_finished(self)))


class Teapot(JSONHandler):
    def get(self) -> None:
        raise tornado.web.HTTPError(418)


@pytest.fixture
def probe_url(io_loop: Any) -> Any:
    seen: list[tuple[str, bool]] = []
    app = tornado.web.Application([(r"/json/teapot", Teapot),
                                   (r"/(\w[\w-]*)", Probe, {"seen": seen})])
    listener, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([listener])
    yield f"http://127.0.0.1:{port}", seen
    server.stop()
    io_loop.run_sync(server.close_all_connections)


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("how, status, reason", [
    ("given", 299, "Fine Thanks"),
    ("standard", 404, "Not Found"),
    ("unknown", 299, "Unknown"),
    ("error", 418, "I'm a Teapot"),
    ("error-given", 503, "Busy Now"),
])
async def test_response_reason_is_the_reason_in_the_status_line(probe_url, how, status, reason):
    """3: ``response_reason`` is the phrase the client reads in the status line:
    one given to ``set_status`` or ``HTTPError``, the standard one, or Unknown."""
    base, _ = probe_url
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/{how}",
                                                                 raise_error=False)
    assert (response.code, response.reason) == (status, reason)
    assert response.body.decode() == reason


@pytest.mark.gen_test(timeout=10)
async def test_a_json_error_without_a_code_of_its_own_carries_the_reason(probe_url):
    """3, as wsgate uses it: ``JSONHandler.write_error`` gives a status it has
    no code for the reason phrase of its status line as the message."""
    base, _ = probe_url
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/json/teapot",
                                                                raise_error=False)
    assert (response.code, response.reason) == (418, "I'm a Teapot")
    assert json.loads(response.body) == {"error": {"code": "error", "message": "I'm a Teapot"}}


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("how, expected", [
    ("standard", [("before finish", False), ("on_finish", True), ("after finish", True)]),
    ("error", [("before finish", False), ("write_error", False), ("on_finish", True)]),
])
async def test_request_finished_turns_true_at_finish(probe_url, how, expected):
    """3: ``request_finished`` is False until ``finish()`` runs, whether the
    handler or ``send_error`` calls it, and True from then on."""
    base, seen = probe_url
    await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/{how}", raise_error=False)
    assert seen == expected
