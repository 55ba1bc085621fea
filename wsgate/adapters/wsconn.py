"""The WebSocket connection layer: RFC 6455 framing on a plain ``asyncio.Protocol``.

The Tornado handler (wsgate/adapters/websocket.py) answers the upgrade and
hands the socket over; from then on a connection is one
:class:`WebSocketConnection` (a protocol object with ``__slots__``) and the
asyncio transport under it. Compared with Tornado's WebSocket layer it keeps no
paused coroutine, no IOStream queues and no timer per connection, and makes no
Task per received message: what a client sends is parsed by a
:class:`~wsgate.adapters.wsframes.FrameParser` (bytes in, events out, no I/O)
and handed to the gateway in ``data_received``; a message that waits (for the
audit commit) calls back when its reply is sent, and the connection's next
message goes on then.

Memory per connection has one budget, ``[server] max_output_buffer``: what is
owed to the peer (event frames, replies, pongs not yet taken by the socket)
plus its message not yet whole. Past it, with output owed, the connection is
closed with 4008 (docs/security.md).

Plain TCP only: TLS is terminated in front of wsgate (at the load balancer).

Liveness is one :class:`ConnectionRegistry` per node: a single periodic timer
pings each connection that has been silent for ``ping_interval`` and aborts
those that have not answered ``ping_timeout`` later.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import cast

from wsgate import errors
from wsgate.adapters.wsframes import Close, FrameParser, Ping, Pong
from wsgate.gateway import Connection, Gateway
from wsgate.plugins import Principal
from wsgate.protocol import ws_frame

log = logging.getLogger("wsgate.ws")

#: Seconds a closing connection waits for the peer's close frame (or for its
#: unsent bytes to drain) before the socket is aborted.
CLOSE_TIMEOUT = 2.0
#: Messages waiting to be handled before the connection stops reading (the
#: kernel buffers, then TCP flow control, hold the rest).
INBOX_LIMIT = 32

# _CLOSING: our close frame is sent, frames are still read for the peer's.
# _FAILED: closed for a protocol error; what the peer sends is no longer read.
_OPEN, _CLOSING, _FAILED, _CLOSED = 0, 1, 2, 3
_PING = b"\x89\x00"


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server close frame; the reason is cut to fit the 125-byte control frame limit."""
    if code is None:
        return b"\x88\x00"
    raw = reason.encode()[:123].decode(errors="ignore").encode()
    payload = code.to_bytes(2, "big") + raw
    return bytes((0x88, len(payload))) + payload


class WebSocketConnection(asyncio.Protocol):
    """One upgraded client connection: the gateway's ``Transport`` for it.

    Made by the upgrade handler with what ``Gateway.open`` needs; the
    connection is opened with the gateway once the transport exists
    (``connection_made``), and ``Gateway.disconnected`` is called exactly once,
    with the peer's close code when it sent one.
    """

    __slots__ = ("gateway", "registry", "conn", "transport", "fd", "backlog", "state", "parser",
                 "out", "out_size", "seen", "idle_since", "ping_at", "inbox", "busy",
                 "close_timer", "opening")

    def __init__(self, gateway: Gateway, registry: ConnectionRegistry, principal: Principal,
                 remote_addr: str, origin: str | None, user_agent: str | None,
                 initial: bytes) -> None:
        self.gateway = gateway
        self.registry = registry
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        # The socket's descriptor, for writes straight to it (see _write), and the
        # bytes the transport held after the last write through it: while that
        # is 0 the transport holds nothing and _write may bypass it.
        self.fd = -1
        self.backlog = 0
        self.state = _OPEN
        server = gateway.config.server
        # What the client sends, parsed (wsframes.py): no I/O there, all of it here.
        self.parser = FrameParser(server.max_message_size, server.max_fragments)
        # Frames queued by send_wire, written by _flush_out in one write.
        self.out: list[bytes] | None = None
        self.out_size = 0
        # Liveness, read and written by the registry's timer.
        self.seen = False
        self.idle_since = 0.0
        self.ping_at = 0.0
        self.inbox: deque[str | bytes] | None = None
        # A message is being handled (its reply not yet sent); the rest wait in inbox.
        self.busy = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.opening: tuple[Principal, str, str | None, str | None, bytes] | None = (
            principal, remote_addr, origin, user_agent, initial)

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's, or uvloop's (which does not subclass it).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        self.idle_since = self.registry.loop.time()
        self.registry.add(self)
        assert self.opening is not None
        principal, remote_addr, origin, user_agent, initial = self.opening
        self.opening = None
        self.conn = self.gateway.open(self, principal, remote_addr, origin, user_agent)
        if initial:
            # Frames the client sent right behind its handshake.
            self.data_received(initial)

    def data_received(self, data: bytes) -> None:
        self.seen = True
        if self.state >= _FAILED:
            return
        parser = self.parser
        # The pongs owed for a run of pings go out in one write (one buffer, not
        # one per ping, if the peer is not reading), still ahead of anything
        # the frames after them cause.
        pongs: list[bytes] | None = None
        for event in parser.feed(data):
            if isinstance(event, (str, bytes)):
                if pongs is not None:
                    self._send_pongs(pongs)
                    pongs = None
                self._message(event)
            elif isinstance(event, Ping):
                if self.state == _OPEN:
                    pong = bytes((0x8A, len(event.payload))) + event.payload
                    if pongs is None:
                        pongs = [pong]
                    else:
                        pongs.append(pong)
            elif isinstance(event, Pong):
                # It only proves the peer alive: self.seen says so.
                pass
            else:
                if pongs is not None:
                    self._send_pongs(pongs)
                    pongs = None
                if isinstance(event, Close):
                    self._peer_closed(event)
                else:
                    self._fail(event.code, event.reason)
        if pongs is not None:
            self._send_pongs(pongs)
        if parser.buffered and (self.backlog or self.out_size) and self.state == _OPEN:
            # A frame or a fragmented message not yet whole counts against the
            # budget too, with the output owed. (Alone it is bounded by
            # max_message_size: a client that reads what it is sent is never
            # closed for the size of what it sends.)
            self._check_budget()

    def _send_pongs(self, pongs: list[bytes]) -> None:
        if self.state == _OPEN:
            self._write(pongs[0] if len(pongs) == 1 else b"".join(pongs))
            if self.backlog:
                self._check_budget()

    def _check_budget(self) -> None:
        """Close with 4008, once this callback is done, if output is owed and the
        bytes held for this connection (see pending_bytes) have passed
        ``max_output_buffer``."""
        transport = self.transport
        assert transport is not None
        output = self.out_size + transport.get_write_buffer_size()
        if output and output + self.parser.buffered > self.gateway.config.server.max_output_buffer:
            # Not in the middle of the caller, which may go on using the
            # connection (a reply is sent in the middle of a subscribe): the
            # close runs at the start of the next loop iteration, before the
            # next read is handled.
            self.registry.loop.call_soon(self._close_over_budget)

    def _close_over_budget(self) -> None:
        conn = self.conn
        if conn is None or conn.closed or self.state != _OPEN:
            return
        limit = self.gateway.config.server.max_output_buffer
        self.gateway.close_connection(
            conn, errors.CLOSE_SLOW_CONSUMER,
            f"slow consumer: more than {limit} bytes held for this connection")

    def _message(self, message: str | bytes) -> None:
        if self.state != _OPEN:
            return
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        inbox.append(message)
        if not self.busy:
            self._handle_inbox()
        elif (transport := self.transport) is not None and transport.is_reading() and (
                len(inbox) >= INBOX_LIMIT
                or sum(map(len, inbox)) >= self.parser.max_message_size):
            # Behind a message that waits, the rest wait too, and reading
            # pauses (TCP flow control holds what follows) at INBOX_LIMIT
            # messages or a largest message's worth of characters.
            transport.pause_reading()

    def _handle_inbox(self) -> None:
        # One message at a time, in order: one that waits (for the audit store,
        # say) calls _handled when its reply is sent, and the next one goes on.
        inbox = self.inbox
        conn = self.conn
        assert inbox is not None and conn is not None
        receive = self.gateway.receive
        while inbox and not conn.closed:
            message = inbox.popleft()
            try:
                if receive(conn, message, self._handled):
                    self.busy = True
                    return
            except Exception:
                log.exception("handling a client message failed")
        self.busy = False
        inbox.clear()
        transport = self.transport
        if transport is not None and self.state == _OPEN and not transport.is_reading():
            transport.resume_reading()

    def _handled(self) -> None:
        self.busy = False
        self._handle_inbox()

    def _peer_closed(self, close: Close) -> None:
        transport = self.transport
        if self.state == _OPEN and transport is not None:
            # Peer-initiated: echo its code, then close once the echo is written.
            self.state = _CLOSING
            self.out = None
            self.out_size = 0
            transport.write(close_frame(close.reply))
            self._arm_close_timer()
        if transport is not None:
            transport.close()
        self.state = _CLOSED
        if self.conn is not None:
            # Recorded as the code the server answered: the peer's own when valid
            # on the wire, else 1002 (or 1007 for a reason that is not UTF-8), so
            # the peer cannot invent close codes for the log and the metrics.
            self.gateway.disconnected(
                self.conn, close.code if close.reply == close.code else close.reply)

    def _fail(self, code: int, reason: str) -> None:
        """A protocol error by the peer: close with code, through the gateway, and
        read nothing more (half-close: the peer still gets the close frame)."""
        if self.conn is not None:
            self.gateway.close_connection(self.conn, code, reason)
        self.close(code, reason)
        if self.state == _CLOSING and self.transport is not None:
            self.state = _FAILED
            if self.transport.can_write_eof():
                self.transport.write_eof()

    def eof_received(self) -> bool | None:
        # A half-closed peer will send nothing more, not even a close frame.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self.out = None
        self.out_size = 0
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.registry.discard(self)
        if self.inbox is not None:
            self.inbox.clear()
        if self.conn is not None:
            self.gateway.disconnected(self.conn, None)

    # -- Transport (wsgate.gateway) -----------------------------------------

    def send_text(self, text: str) -> None:
        # Written with the queued event frames, after them: a reply never
        # overtakes earlier events.
        frame = ws_frame(text.encode())
        out = self.out
        if out is None:
            self.out = [frame]
        else:
            out.append(frame)
        self._flush_out()
        if self.backlog:
            self._check_budget()

    def send_wire(self, frame: bytes) -> int:
        """Queue an event frame; every frame queued for this connection during one
        loop iteration goes out in one write at the start of the next (see
        ConnectionRegistry.flush_soon). Returns ``pending_bytes()``, which the
        gateway compares with ``max_output_buffer`` (4008 past it)."""
        out = self.out
        if out is not None:
            out.append(frame)
            size = self.out_size = self.out_size + len(frame)
        elif self.state == _OPEN:
            self.out = [frame]
            size = self.out_size = len(frame)
            flushing = self.registry.flushing
            if flushing is None:
                flushing = self.registry.flush_soon()
            flushing.append(self)
        else:
            return self.out_size
        backlog = self.backlog
        if backlog:
            # Only a slow peer leaves bytes in the transport: read the exact
            # figure (it drains on its own between our writes).
            assert self.transport is not None
            backlog = self.backlog = self.transport.get_write_buffer_size()
        return size + backlog + self.parser.buffered

    def _flush_out(self) -> None:
        out = self.out
        if out is None:
            return
        self.out = None
        self.out_size = 0
        if self.state == _OPEN:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        """Write data now, behind whatever the transport still holds.

        While the transport holds nothing (``backlog`` 0) the bytes go straight
        to the socket, as ``transport.write`` would do but without its checks;
        what the socket does not take is handed to the transport, which queues
        it and writes it when the socket drains. Only called while open.
        """
        transport = self.transport
        assert transport is not None
        if not self.backlog and self.fd >= 0:
            try:
                n = os.write(self.fd, data)
            except OSError:
                # Full (or reset, or a broken pipe: then the transport meets the
                # same error and closes the connection the usual way).
                n = 0
            if n == len(data):
                return
            data = data[n:]
        transport.write(data)
        self.backlog = transport.get_write_buffer_size()

    def pending_bytes(self) -> int:
        """Every byte held for this connection, which its memory budget
        (``max_output_buffer``) counts: frames not yet taken by the socket
        (events, replies, pongs) and the client's frame or fragmented message
        not yet whole."""
        transport = self.transport
        held = self.out_size + self.parser.buffered
        if transport is None or self.state == _CLOSED:
            return held
        return held + transport.get_write_buffer_size()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Send a close frame and wait briefly for the peer's; the caller reports
        the close to the gateway (see Gateway.close_connection)."""
        if self.state != _OPEN:
            return
        self.state = _CLOSING
        # Frames not yet written are dropped: the close frame follows what the
        # transport already holds.
        self.out = None
        self.out_size = 0
        if self.transport is not None:
            self.transport.write(close_frame(code, reason or ""))
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self.close_timer is None:
            self.close_timer = self.registry.loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Drop the socket now, unsent bytes included (``connection_lost`` follows)."""
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()


class ConnectionRegistry:
    """The node's live WebSocket connections and their one shared pinger.

    Every ``period`` seconds (a quarter of the shorter of ping interval and
    timeout) one timer walks the connections: a connection that sent anything
    since the last walk is alive; one silent for ``ping_interval`` gets a ping;
    one that has not answered ``ping_timeout`` after its ping is aborted (a
    dead peer would never answer a close frame either).
    """

    def __init__(self, ping_interval: float, ping_timeout: float) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.period = max(0.05, min(ping_interval, ping_timeout) / 4)
        self.connections: set[WebSocketConnection] = set()
        #: Connections with frames queued in this loop iteration (see flush_soon).
        self.flushing: list[WebSocketConnection] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def flush_soon(self) -> list[WebSocketConnection]:
        """Start the list of connections to flush at the next loop iteration: each
        one's queued frames go out in one write (send_wire appends to it)."""
        flushing = self.flushing = []
        self.loop.call_soon(self._flush, flushing)
        return flushing

    def _flush(self, flushing: list[WebSocketConnection]) -> None:
        if self.flushing is flushing:
            self.flushing = None
        for connection in flushing:
            # connection._flush_out(), inlined: this runs once per connection per event.
            out = connection.out
            if out is None:
                continue
            connection.out = None
            connection.out_size = 0
            if connection.state != _OPEN:
                continue
            try:
                connection._write(out[0] if len(out) == 1 else b"".join(out))
            except Exception:
                # One broken connection must not keep the others' frames unsent.
                log.exception("writing queued frames failed")

    def add(self, connection: WebSocketConnection) -> None:
        self.connections.add(connection)
        if self._timer is None:
            self._timer = self.loop.call_later(self.period, self._tick)

    def discard(self, connection: WebSocketConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._idle is not None:
                self._idle.set()

    def _tick(self) -> None:
        now = self.loop.time()
        ping_before = now - self.ping_interval
        dead_before = now - self.ping_timeout
        dead: list[WebSocketConnection] = []
        for c in self.connections:
            # A connection whose messages are being handled is alive, even if
            # its reading is paused (a pong could not be read meanwhile).
            if c.seen or c.busy:
                c.seen = False
                c.idle_since = now
                c.ping_at = 0.0
            elif c.ping_at:
                if c.ping_at <= dead_before:
                    dead.append(c)
            elif c.idle_since <= ping_before and c.state == _OPEN and c.transport is not None:
                c.ping_at = now
                c._write(_PING)
        for c in dead:
            log.info("ping timeout: aborting the connection")
            c.abort()
        self._timer = self.loop.call_later(self.period, self._tick) if self.connections else None

    async def close_all(self, code: int = errors.CLOSE_GOING_AWAY,
                        reason: str = "server shutting down") -> None:
        """Close every connection (close frame, then the usual short wait for the
        peer's) and return once all are gone; at most about CLOSE_TIMEOUT."""
        for c in list(self.connections):
            if c.conn is not None:
                c.gateway.close_connection(c.conn, code, reason)
            c.close(code, reason)
        if self.connections:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), CLOSE_TIMEOUT + 0.5)
            except TimeoutError:
                for c in list(self.connections):
                    c.abort()
            finally:
                self._idle = None
        # Let the transports' connection_lost callbacks run.
        await asyncio.sleep(0)
