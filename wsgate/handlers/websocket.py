"""``GET /v1.0/ws``: the Tornado adapter between a WebSocket and the gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import tornado.httputil
import tornado.iostream
import tornado.web
import tornado.websocket

from wsgate.errors import HTTPFailure
from wsgate.gateway import Connection, ConnectionRefused, Gateway
from wsgate.plugins import Principal, Refused, Unavailable
from wsgate.protocol import ws_frame

log = logging.getLogger("wsgate.ws")


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Exact match of scheme://host[:port] against the allowed list (``*`` allows all).

    Nothing is normalised: case, default ports and look-alike hosts must match
    the configured origin character for character.
    """
    if "*" in allowed:
        return True
    return origin in allowed


def credential_from(handler: tornado.web.RequestHandler) -> str | None:
    """The credential, first found wins: query ``token``, Bearer header, cookie ``token``."""
    token = handler.get_query_argument("token", None)
    if token:
        return token
    auth = handler.request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookie = handler.get_cookie("token")
    return cookie or None


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    """Checks origin and credential before the upgrade, then relays frames to the gateway."""

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn: Connection | None = None
        self._principal: Principal | None = None

    def _refuse(self, failure: HTTPFailure) -> None:
        self.set_status(failure.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(failure.body()))

    async def get(self, *args: Any, **kwargs: Any) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and not origin_allowed(
                origin, self.gateway.config.server.allowed_origins):
            shown = origin if len(origin) <= 100 else origin[:100] + "..."
            self._refuse(HTTPFailure(403, "origin_not_allowed",
                                     f"origin {shown!r} is not in [server] allowed_origins"))
            return
        try:
            credential = credential_from(self)
        except tornado.web.HTTPError:
            # A token that is not UTF-8 once unescaped: Tornado's own 400 would
            # log the raw URI, token included, and answer in HTML.
            self._refuse(HTTPFailure(400, "bad_request",
                                     "the token query parameter is not valid UTF-8"))
            return
        if credential is None:
            self._refuse(HTTPFailure(
                401, "unauthenticated",
                "no credential: pass ?token=..., an 'Authorization: Bearer ...' header "
                "or a 'token' cookie"))
            return
        try:
            principal = await self.gateway.authenticate(credential)
        except Refused as exc:
            self._refuse(HTTPFailure(401, "unauthenticated", f"credential refused: {exc}"))
            return
        except Unavailable as exc:
            self._refuse(HTTPFailure(503, "auth_unavailable",
                                     f"cannot check the credential now: {exc}; retry later"))
            return
        try:
            self.gateway.admit(principal, self.request.remote_ip or "")
        except ConnectionRefused as exc:
            self._refuse(exc.failure)
            return
        self._principal = principal
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        # Checked in get(), before the authenticator is asked.
        return True

    def get_compression_options(self) -> None:
        # No permessage-deflate: event frames are framed once and shared (protocol.ws_frame).
        return None

    def open(self, *args: Any, **kwargs: Any) -> None:
        assert self._principal is not None
        if self.ws_connection is not None:
            self.set_nodelay(True)
        request = self.request
        headers = request.headers
        self.conn = self.gateway.open(self, self._principal, request.remote_ip or "",
                                      headers.get("Origin"), headers.get("User-Agent"))
        self._principal = None
        self._drop_request_state()

    def _drop_request_state(self) -> None:
        # After the upgrade nothing reads the request's headers, cookies or
        # arguments, nor the handler's response headers (the handshake is
        # written): held for every idle connection, they are most of its memory
        # after Tornado's own objects. Shared empty stand-ins keep the attributes.
        request = self.request
        request.headers = _NO_HEADERS
        request.arguments = request.query_arguments = request.body_arguments = _NO_ARGUMENTS
        request.files = _NO_FILES
        request.body = b""
        request.__dict__.pop("_cookies", None)
        self._headers = _NO_HEADERS
        self.path_args = []
        self.path_kwargs = _NO_KWARGS

    async def on_message(self, message: str | bytes) -> None:
        # Tornado awaits this before reading the next frame, so a connection's
        # messages are handled one at a time, in order.
        if self.conn is not None:
            await self.gateway.handle_message(self.conn, message)

    def on_close(self) -> None:
        if self.conn is not None:
            # close_code: what the peer sent (None when it gave none).
            self.gateway.disconnected(self.conn, self.close_code)

    # -- Transport ---------------------------------------------------------

    # Event frames queued by send_wire, written by _flush_out in one write.
    _out: list[bytes] | None = None
    _out_size = 0

    def send_text(self, text: str) -> None:
        # Framed here and written with the queued event frames, in one write, after
        # them: a reply never overtakes earlier events. write_message would make a
        # Task and two Futures per reply (its result is never awaited here).
        frame = ws_frame(text.encode())
        out = self._out
        if out is None:
            self._out = [frame]
        else:
            out.append(frame)
        self._flush_out()

    def send_wire(self, frame: bytes) -> None:
        """Queue an event frame; every frame queued for this connection during one
        loop iteration goes out in one write at the start of the next (see
        _flush_out). ``pending_bytes`` counts the queued bytes."""
        out = self._out
        if out is not None:
            out.append(frame)
            self._out_size += len(frame)
        elif self.ws_connection is not None:
            # A closing connection is checked once, when the queue is written.
            self._out = [frame]
            self._out_size = len(frame)
            _flusher_for(asyncio.get_running_loop()).handlers.append(self)

    def _flush_out(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        self._out_size = 0
        ws = self.ws_connection
        if ws is None or ws.is_closing():
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        stream: Any = ws.stream
        # IOStream.write makes a Future and its bookkeeping on every call. When
        # the stream has nothing buffered, hand the bytes to the socket directly
        # (nothing can be reordered: the stream is empty), and give only what the
        # kernel did not take to the stream, which then waits for writability.
        # Plain sockets only: TLS streams keep their own state.
        if type(stream) is tornado.iostream.IOStream and \
                stream._total_write_index == stream._total_write_done_index:
            try:
                sent = stream.socket.send(data)
            except OSError:
                # EAGAIN, or an error that the stream reports and closes on below.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        try:
            stream.write(data)
        except tornado.iostream.StreamClosedError:
            pass

    def pending_bytes(self) -> int:
        ws = self.ws_connection
        if ws is None:
            return self._out_size
        stream: Any = ws.stream
        # Queued frames plus what the stream holds: Tornado keeps these counters
        # for write futures; their difference is what the kernel has not accepted yet.
        return self._out_size + int(stream._total_write_index - stream._total_write_done_index)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        super().close(code, reason)


# Shared, never written to: see WebSocketHandler._drop_request_state.
_NO_HEADERS = tornado.httputil.HTTPHeaders()
_NO_ARGUMENTS: dict[str, list[bytes]] = {}
_NO_FILES: dict[str, Any] = {}
_NO_KWARGS: dict[str, Any] = {}


class _Flusher:
    """Writes the frames queued by send_wire, once per loop iteration, for every
    connection that queued some (one per event loop: tests run several)."""

    __slots__ = ("loop", "handlers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.handlers: list[WebSocketHandler] = []

    def run(self) -> None:
        global _flusher
        if _flusher is self:
            _flusher = None
        for handler in self.handlers:
            try:
                handler._flush_out()
            except Exception:
                # One broken connection must not keep the others' frames unsent.
                log.exception("writing queued frames failed")


_flusher: _Flusher | None = None


def _flusher_for(loop: asyncio.AbstractEventLoop) -> _Flusher:
    """The flusher that runs at this loop's next iteration."""
    global _flusher
    flusher = _flusher
    if flusher is None or flusher.loop is not loop:
        flusher = _flusher = _Flusher(loop)
        loop.call_soon(flusher.run)
    return flusher


def scrub_uri(uri: str) -> str:
    """The request URI with the token query value replaced by ``***`` (for logs)."""
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = []
    for pair in parts.query.split("&"):
        name, sep, _ = pair.partition("=")
        pairs.append(f"{name}=***" if name == "token" and sep else pair)
    return parts.path + "?" + "&".join(pairs)
