"""The one place wsgate touches Tornado's private names.

wsgate hands connections to Tornado after reading from them (the ingest fast
path, wsgate/app.py) and takes them away from it (the WebSocket upgrade,
wsgate/adapters/websocket.py), unmasks frames with Tornado's C helper
(wsgate/adapters/wsconn.py), and reads two facts a ``RequestHandler`` keeps to
itself (wsgate/adapters/base.py and ingest.py). Tornado has no public API for
any of these, so each is one small function here, and nothing else in
``wsgate/`` or ``plugins/`` may use a Tornado name that starts with ``_``
(tests/test_tornado_compat.py checks that, and pins every assumption below
against the installed Tornado).

Assumptions about Tornado's private names:

1. ``tornado.util._websocket_mask(mask, data)`` exists and applies the RFC
   6455 section 5.3 mask; it is the C function of ``tornado.speedups`` when
   that extension is built. Without it, :func:`websocket_mask_python` (same
   result, slower) takes its place.
2. An ``IOStream`` keeps the bytes it has read from its socket and not yet
   delivered in ``_read_buffer[:_read_buffer_size]`` (a ``bytearray``; bytes
   are deleted from its front as they are delivered, there is no read
   position), and ``read_until``, ``read_until_regex`` and ``read_bytes``
   look in that buffer before reading the socket. (Not while ``read_into`` is
   in progress: then ``_read_buffer`` is the caller's buffer. wsgate never
   calls ``read_into`` on these streams.)
3. A ``RequestHandler`` keeps the reason phrase of its status in ``_reason``
   (what its status line will carry), and ``_finished`` is True once
   ``finish()`` has run.

Public behaviour the two hand-overs rely on as well (pinned by the same
tests, though no private name is involved):

4. The stream ``TCPServer.handle_stream`` receives has read nothing and has
   not registered its socket with the event loop, so the fast path can read
   the socket itself (``loop.add_reader``).
5. ``IOStream.writing()`` is True while bytes given to ``write()`` are not
   all in the socket, False once they are; ``write(b"")`` resolves once every
   earlier write has reached the socket.

Checked on Tornado 6.4, 6.4.2, 6.5, 6.5.2, 6.5.10, 6.6 and 6.6.1: the tests
passed with each release's wheel first on ``PYTHONPATH``, and every use of
these names in the ``iostream.py``, ``util.py`` and ``web.py`` of 6.4, 6.4.2,
6.5 and 6.5.2 was read against 6.6.1's. setup.cfg allows
``tornado>=6.4,<6.7`` to match; the upper bound is raised only after
tests/test_tornado_compat.py passes on the new release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tornado.iostream import IOStream
    from tornado.web import RequestHandler


def websocket_mask_python(mask: bytes, data: bytes) -> bytes:
    """``data`` XOR-ed with the 4-byte ``mask`` repeated (RFC 6455 section 5.3).

    The fallback for :data:`websocket_mask`; any length of ``data``, 0 included.
    """
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


#: ``websocket_mask(mask, data) -> bytes``: the same result as
#: :func:`websocket_mask_python`, from Tornado's C helper when it is built
#: (checked on Tornado 6.4-6.6.1). Bound directly, not wrapped: it runs for
#: every frame a client sends.
try:
    from tornado.util import _websocket_mask as websocket_mask
except ImportError:  # pragma: no cover
    websocket_mask = websocket_mask_python


def prepend_read(stream: IOStream, data: bytes) -> None:
    """Give ``stream`` bytes already read from its socket by someone else.

    Every later ``read_until``, ``read_until_regex`` or ``read_bytes`` on the
    stream sees ``data`` first, then whatever it reads from the socket. For
    the ingest fast path, which reads a connection before handing it to
    Tornado's HTTP server: call it before anything reads from the stream.
    ``data`` may be empty. Checked on Tornado 6.4-6.6.1.
    """
    if data:
        stream._read_buffer[:0] = data
        stream._read_buffer_size += len(data)


def take_read_buffer(stream: IOStream) -> bytes:
    """The bytes ``stream`` has read from its socket but not delivered to any read.

    The stream keeps none of them: a later read gets only what arrives after.
    For a socket that leaves Tornado (the WebSocket upgrade), so that what the
    client sent right behind its request goes to the socket's new owner. Call
    it while no read is in progress on the stream. Checked on Tornado 6.4-6.6.1.
    """
    size = stream._read_buffer_size
    data = bytes(stream._read_buffer[:size])
    del stream._read_buffer[:size]
    stream._read_buffer_size = 0
    return data


def response_reason(handler: RequestHandler) -> str:
    """The reason phrase ``handler``'s status line carries for its current status.

    The reason given to ``set_status`` (or by the ``HTTPError`` that
    ``send_error`` answers), else the standard phrase of the status, else
    ``"Unknown"``. Checked on Tornado 6.4-6.6.1.
    """
    return handler._reason


def request_finished(handler: RequestHandler) -> bool:
    """True once ``handler.finish()`` has run, whoever called it (the handler
    itself, ``send_error``, a redirect); False before. Checked on Tornado 6.4-6.6.1.
    """
    return handler._finished
