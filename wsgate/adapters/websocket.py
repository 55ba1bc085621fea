"""``GET /v1.0/ws``: the Tornado adapter between a WebSocket and the gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from typing import Any

import tornado.iostream
import tornado.web

from wsgate import errors
from wsgate.adapters.tornado_compat import take_read_buffer
from wsgate.adapters.wsconn import ConnectionRegistry, WebSocketConnection
from wsgate.errors import ConnectionRefused, HTTPFailure
from wsgate.gateway import Gateway
from wsgate.plugins import Principal, Refused, Unavailable

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


class WebSocketHandler(tornado.web.RequestHandler):
    """Checks origin, credential and limits, answers the RFC 6455 handshake, then
    hands the socket to a :class:`wsgate.adapters.wsconn.WebSocketConnection`.

    Tornado serves the HTTP part only: once the 101 is written (and logged) the
    connection is detached from Tornado's HTTP server and its IOStream, and
    driven by asyncio directly (plain TCP; TLS ends at the load balancer).
    """

    def initialize(self, gateway: Gateway, registry: ConnectionRegistry) -> None:
        self.gateway = gateway
        self.registry = registry
        #: The answer refusing the upgrade, if one did (for the access line).
        self.refusal: HTTPFailure | None = None

    def log_fields(self) -> dict[str, Any] | None:
        """The access line's own fields: a refusal's ``code`` and ``reason`` (the
        message the client got), so the operator sees why without asking the
        client. No message names a credential: plugins' messages must not, and
        ours never do."""
        if self.refusal is None:
            return None
        return {"code": self.refusal.code, "reason": self.refusal.message}

    def _refuse(self, failure: HTTPFailure) -> None:
        self.refusal = failure
        self.set_status(failure.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(failure.body()))

    async def get(self, *args: Any, **kwargs: Any) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and not origin_allowed(
                origin, self.gateway.config.server.allowed_origins):
            shown = origin if len(origin) <= 100 else origin[:100] + "..."
            self._refuse(HTTPFailure(403, errors.ORIGIN_NOT_ALLOWED,
                                     f"origin {shown!r} is not in [server] allowed_origins"))
            return
        try:
            credential = credential_from(self)
        except tornado.web.HTTPError:
            # A token that is not UTF-8 once unescaped: Tornado's own 400 would
            # log the raw URI, token included, and answer in HTML.
            self._refuse(HTTPFailure(400, errors.BAD_REQUEST,
                                     "the token query parameter is not valid UTF-8"))
            return
        if credential is None:
            self._refuse(HTTPFailure(
                401, errors.UNAUTHENTICATED,
                "no credential: pass ?token=..., an 'Authorization: Bearer ...' header "
                "or a 'token' cookie"))
            return
        try:
            principal = await self.gateway.authenticate(credential)
        except Refused as exc:
            self._refuse(HTTPFailure(401, errors.UNAUTHENTICATED, f"credential refused: {exc}"))
            return
        except Unavailable as exc:
            self._refuse(HTTPFailure(503, errors.AUTH_UNAVAILABLE,
                                     f"cannot check the credential now: {exc}; retry later"))
            return
        try:
            self.gateway.admit(principal, self.request.remote_ip or "")
        except ConnectionRefused as exc:
            self._refuse(HTTPFailure(exc.status, exc.code, str(exc)))
            return
        accept = self._handshake()
        if accept is None:
            return
        await self._upgrade(accept, principal)

    def _handshake(self) -> str | None:
        """The Sec-WebSocket-Accept value, or None after refusing a bad handshake
        (the answers Tornado's WebSocketHandler gives: 400, or 426 for a version)."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            self._refuse(HTTPFailure(400, errors.BAD_REQUEST, 'can "Upgrade" only to "websocket"'))
            return None
        if "upgrade" not in (s.strip().lower() for s in headers.get("Connection", "").split(",")):
            self._refuse(HTTPFailure(400, errors.BAD_REQUEST, '"Connection" must be "Upgrade"'))
            return None
        if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            self.set_header("Sec-WebSocket-Version", "13")
            self._refuse(HTTPFailure(426, errors.UPGRADE_REQUIRED, "WebSocket version 13 only"))
            return None
        key = headers.get("Sec-WebSocket-Key", "")
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid = False
        if not valid or not headers.get("Host"):
            self._refuse(HTTPFailure(400, errors.BAD_REQUEST,
                                     "missing or invalid WebSocket headers"))
            return None
        digest = hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()
        return base64.b64encode(digest).decode()

    async def _upgrade(self, accept: str, principal: Principal) -> None:
        request = self.request
        headers = request.headers
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", "websocket")
        self.set_header("Connection", "Upgrade")
        self.set_header("Sec-WebSocket-Accept", accept)
        self.finish()  # writes the 101 and the access log line
        connection: Any = request.connection
        stream: tornado.iostream.IOStream = connection.detach()
        if stream.writing():
            # The 101 did not fit in the socket at once: let the stream finish it.
            try:
                await stream.write(b"")
            except tornado.iostream.StreamClosedError:
                return
        sock = stream.socket
        if stream.closed() or sock is None:
            return
        # What the client sent behind its handshake, already read by the stream.
        initial = take_read_buffer(stream)
        # The socket leaves Tornado: no more IOStream callbacks on it.
        stream.io_loop.remove_handler(sock)
        protocol = WebSocketConnection(self.gateway, self.registry, principal,
                                       request.remote_ip or "", headers.get("Origin"),
                                       headers.get("User-Agent"), initial)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            log.info("the client left during the upgrade")
            sock.close()


WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
