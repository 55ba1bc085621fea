"""The Tornado side of a node: its application, its HTTP server (with the ingest
fast path in front), the metrics listener, and binding ports."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.http1connection
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.netutil
import tornado.web

from wsgate.adapters.base import NotFoundHandler
from wsgate.adapters.fast_ingest import MAX_HEAD, FastIngestConnection
from wsgate.adapters.health import HealthHandler, ReadyHandler
from wsgate.adapters.ingest import IngestHandler
from wsgate.adapters.ingest_framing import connection_tokens
from wsgate.adapters.metrics import MetricsHandler, metrics_route
from wsgate.adapters.tornado_compat import prepend_read
from wsgate.adapters.websocket import WebSocketHandler
from wsgate.adapters.wsconn import ConnectionRegistry
from wsgate.config import Config
from wsgate.gateway import Gateway
from wsgate.ingest import IngestService
from wsgate.logs import log_access, mask_tokens
from wsgate.metrics import GatewayMetrics

log = logging.getLogger("wsgate")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log hook: one line per request (see :func:`log_access`)."""
    status = handler.get_status()
    req = handler.request
    own = getattr(handler, "log_fields", None)
    log_access(status, req.method or "", req.uri or "", req.remote_ip or "",
               req.request_time(), own() if callable(own) else None,
               quiet=isinstance(handler, MetricsHandler))


def make_app(gateway: Gateway, metrics: GatewayMetrics) -> tornado.web.Application:
    """The Tornado application serving gateway (and its metrics, behind keys).

    From here on no log record of the process shows a token (:func:`mask_tokens`):
    Tornado's own lines quote request URIs.
    """
    mask_tokens()
    s = gateway.config.server
    registry = ConnectionRegistry(s.ping_interval, s.ping_timeout)
    ingest = IngestService(gateway, gateway.config.ingest)
    routes: list[Any] = [
        (r"/v1\.0/ws", WebSocketHandler, {"gateway": gateway, "registry": registry}),
        (r"/v1\.0/events", IngestHandler, {"service": ingest}),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler, {"gateway": gateway}),
        # Read at each request: a SIGHUP reload may change the keys.
        metrics_route(metrics, lambda: gateway.config.metrics.keys),
    ]
    routes.extend(_audit_routes(gateway))
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        compress_response=False,
        # Read by make_server only: the upgraded connections it must close too.
        websocket_registry=registry,
        # Read by make_server only: its keep-alive fast path answers ingest requests.
        ingest_service=ingest,
    )


def _audit_routes(gateway: Gateway) -> list[Any]:
    """The audit API and the review page, sharing one reader (none without api_keys).

    Raises:
        AuditStoreError: the configured verify key cannot be read.
    """
    from wsgate.adapters.audit_api import audit_routes
    from wsgate.adapters.review import review_routes
    from wsgate.audit.query import AuditReader

    audit = gateway.config.audit
    reader = AuditReader.from_config(audit) if audit.api_keys else None
    def keys() -> tuple[Any, ...]:  # at each request: a SIGHUP reload may change them
        return gateway.config.audit.api_keys

    return [*audit_routes(reader, keys), *review_routes(reader, keys)]


def make_metrics_app(metrics: GatewayMetrics) -> tornado.web.Application:
    """The private metrics listener's application: ``/metrics`` (no key) and nothing else."""
    mask_tokens()
    return tornado.web.Application([metrics_route(metrics, None)],
                                   default_handler_class=NotFoundHandler,
                                   log_function=log_request)


def serve_metrics(gateway: Gateway, metrics: GatewayMetrics,
                  sockets: list[socket.socket] | None = None
                  ) -> tornado.httpserver.HTTPServer | None:
    """Start the ``[metrics] port`` listener, or return None when none is configured.

    ``sockets`` (tests) replaces binding ``[metrics] host`` and ``port``.
    """
    m = gateway.config.metrics
    if sockets is None:
        if not m.port:
            return None
        sockets = listen(m.host, m.port)
    server = tornado.httpserver.HTTPServer(make_metrics_app(metrics),
                                           idle_connection_timeout=60)
    server.add_sockets(sockets)
    where = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in sockets)
    log.info("metrics served on %s/metrics", where)
    return server


class GatewayHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server, with the ingest fast path in front of it.

    Every accepted connection starts in a :class:`wsgate.adapters.fast_ingest.FastIngestConnection`,
    which answers plain keep-alive ingest requests itself and hands the
    connection to Tornado at the first request that is anything else.
    ``close_all_connections`` also closes those and the WebSocket connections
    that left Tornado at the upgrade.
    """

    websockets: ConnectionRegistry | None = None
    ingest: IngestService | None = None

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        #: The connections the fast path serves now.
        self.fast: set[FastIngestConnection] = set()
        #: Tornado's connections whose last request asked to close (_CloseOnAnyToken).
        self.closing: weakref.WeakSet[object] = weakref.WeakSet()

    def start_request(self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
                      ) -> tornado.httputil.HTTPMessageDelegate:
        if server_conn in self.closing:
            # The request before asked to close, and its answer is written (Tornado
            # starts the next request only then): end the connection unread.
            self.closing.discard(server_conn)
            if isinstance(request_conn, tornado.http1connection.HTTP1Connection):
                request_conn.close()
        delegate = super().start_request(server_conn, request_conn)
        return _CloseOnAnyToken(delegate, lambda: self.closing.add(server_conn))

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        if self.ingest is None or stream.socket is None:
            super().handle_stream(stream, address)
            return

        def to_tornado(data: bytes) -> None:
            # The stream has read nothing yet: Tornado's parser reads ours first.
            prepend_read(stream, data)
            super(GatewayHTTPServer, self).handle_stream(stream, address)

        remote = address[0] if isinstance(address, tuple) else ""
        # The same limits as Tornado's own (idle_connection_timeout is its header
        # timeout); make_server always sets both from [server].
        params = self.conn_params
        assert params.header_timeout is not None and params.body_timeout is not None
        conn = FastIngestConnection(stream.socket, remote, self.ingest, params.header_timeout,
                                    params.body_timeout, to_tornado, self.fast.discard)
        self.fast.add(conn)
        conn.start()

    async def close_all_connections(self) -> None:
        for conn in list(self.fast):
            conn.drain()
        while self.fast:  # each in the middle of an answer closes once it is written
            await asyncio.sleep(0.01)
        await super().close_all_connections()
        if self.websockets is not None:
            await self.websockets.close_all()


class _CloseOnAnyToken(tornado.httputil.HTTPMessageDelegate):
    """Passes a request on, noting when its ``Connection`` header asks to close.

    Tornado closes after a request only when its one ``Connection`` header is
    exactly ``close`` (in any case); RFC 9110 and h11 close on a ``close``
    token anywhere in the list: ``keep-alive, Close``, or a second
    ``Connection`` header. ``closing()`` tells the server, which then ends the
    connection after this answer (the answer itself does not say
    ``Connection: close``).
    """

    def __init__(self, delegate: tornado.httputil.HTTPMessageDelegate,
                 closing: Callable[[], None]) -> None:
        self.delegate = delegate
        self.closing = closing

    def headers_received(self, start_line: Any, headers: tornado.httputil.HTTPHeaders
                         ) -> Awaitable[None] | None:
        if "close" in connection_tokens(*headers.get_list("Connection")):
            self.closing()
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


def make_server(app: tornado.web.Application, config: Config) -> tornado.httpserver.HTTPServer:
    s = config.server
    server = GatewayHTTPServer(
        app,
        xheaders=False,
        idle_connection_timeout=s.idle_connection_timeout,
        body_timeout=s.body_timeout,
        max_body_size=config.ingest.max_body_bytes + 1,
        max_header_size=MAX_HEAD,
    )
    server.websockets = app.settings.get("websocket_registry")
    server.ingest = app.settings.get("ingest_service")
    return server


class ListenError(Exception):
    """A listening socket cannot be bound; the message names the address and why."""


def listen(host: str | None, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind ``host:port`` (every address of host) for serving.

    Raises:
        ListenError: naming ``host:port`` and the reason (port in use: another
            process already listens there, maybe a wsgate serving this config).
    """
    try:
        return tornado.netutil.bind_sockets(port, host or None, reuse_port=reuse_port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += " (another process listens there: is this config served already?)"
        raise ListenError(f"cannot listen on {host or '*'}:{port}: {why}") from None
