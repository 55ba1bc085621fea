"""The one place where objects are made: ``build_gateway`` and ``make_app``."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from wsgate.audit.records import AuditSink
from wsgate.broker import make_broker
from wsgate.config import Config
from wsgate.fasthttp import MAX_HEAD, FastIngestConnection
from wsgate.gateway import Gateway
from wsgate.handlers.base import JSONHandler, NotFoundHandler
from wsgate.handlers.ingest import IngestHandler, IngestService
from wsgate.handlers.metrics import MetricsHandler, metrics_route
from wsgate.handlers.websocket import WebSocketHandler
from wsgate.logs import log_access
from wsgate.plugins import (
    AUTHENTICATOR_GROUP,
    AUTHORIZER_GROUP,
    Authenticator,
    Authorizer,
    build_plugin,
)
from wsgate.tornado_compat import prepend_read
from wsgate.websocket import ConnectionRegistry

log = logging.getLogger("wsgate")


def node_id_for(config: Config) -> str:
    return config.server.node_id or f"{socket.gethostname()}:{config.server.port}"


def build_plugins(config: Config) -> tuple[Authenticator, Authorizer]:
    """Load and build the configured plugins.

    Raises:
        wsgate.plugins.PluginError: naming the plugin and, for a bad option, the key.
    """
    authenticator = build_plugin(AUTHENTICATOR_GROUP, config.auth.plugin, Authenticator,
                                 config.auth.options)
    authorizer = build_plugin(AUTHORIZER_GROUP, config.permissions.plugin, Authorizer,
                              config.permissions.options)
    return authenticator, authorizer


def build_audit(config: Config, node_id: str) -> AuditSink:
    from wsgate.audit.writer import AuditWriter

    return AuditWriter(config.audit, node_id, retry_interval=config.audit.retry_interval)


def build_gateway(config: Config, audit: AuditSink | None = None) -> Gateway:
    """Everything a node needs, made from the config (not started)."""
    authenticator, authorizer = build_plugins(config)
    node_id = node_id_for(config)
    if audit is None:
        audit = build_audit(config, node_id)
    return Gateway(config, authenticator, authorizer, audit,
                   make_broker(config.broker.url, config.history))


class HealthHandler(JSONHandler):
    """``/healthz``: the process answers."""

    def get(self) -> None:
        self.write_json(200, {"status": "ok"})


class ReadyHandler(JSONHandler):
    """``/readyz``: audit store and broker reachable, not draining."""

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def get(self) -> None:
        checks = {
            "audit": self.gateway.audit.healthy(),
            "broker": self.gateway.broker.healthy(),
            "accepting": not self.gateway.draining,
        }
        self.write_json(200 if all(checks.values()) else 503,
                        {"ready": all(checks.values()), "checks": checks})


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log hook: one line per request (see :func:`log_access`)."""
    status = handler.get_status()
    req = handler.request
    own = getattr(handler, "log_fields", None)
    log_access(status, req.method or "", req.uri or "", req.remote_ip or "",
               req.request_time(), own() if callable(own) else None,
               quiet=isinstance(handler, MetricsHandler))


def make_app(gateway: Gateway) -> tornado.web.Application:
    """The Tornado application serving gateway."""
    s = gateway.config.server
    registry = ConnectionRegistry(s.ping_interval, s.ping_timeout)
    ingest = IngestService(gateway, gateway.config.ingest)
    routes: list[Any] = [
        (r"/v1\.0/ws", WebSocketHandler, {"gateway": gateway, "registry": registry}),
        (r"/v1\.0/events", IngestHandler, {"service": ingest}),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler, {"gateway": gateway}),
        metrics_route(gateway.metrics, gateway.config.metrics.keys),
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
    from wsgate.audit.query import AuditReader
    from wsgate.handlers.audit_api import audit_routes
    from wsgate.handlers.review import review_routes

    audit = gateway.config.audit
    reader = AuditReader.from_config(audit) if audit.api_keys else None
    return [*audit_routes(reader, audit.api_keys), *review_routes(reader, audit.api_keys)]


def make_metrics_app(gateway: Gateway) -> tornado.web.Application:
    """The private metrics listener's application: ``/metrics`` (no key) and nothing else."""
    return tornado.web.Application([metrics_route(gateway.metrics, None)],
                                   default_handler_class=NotFoundHandler,
                                   log_function=log_request)


def serve_metrics(gateway: Gateway, sockets: list[socket.socket] | None = None
                  ) -> tornado.httpserver.HTTPServer | None:
    """Start the ``[metrics] port`` listener, or return None when none is configured.

    ``sockets`` (tests) replaces binding ``[metrics] host`` and ``port``.
    """
    m = gateway.config.metrics
    if sockets is None:
        if not m.port:
            return None
        sockets = listen(m.host, m.port)
    server = tornado.httpserver.HTTPServer(make_metrics_app(gateway), idle_connection_timeout=60)
    server.add_sockets(sockets)
    where = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in sockets)
    log.info("metrics served on %s/metrics", where)
    return server


class GatewayHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server, with the ingest fast path in front of it.

    Every accepted connection starts in a :class:`wsgate.fasthttp.FastIngestConnection`,
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


async def serve(config: Config, sockets: list[socket.socket] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain and return.

    ``sockets``: listening sockets to serve, bound by ``serve --workers``;
    default: bind ``[server] host`` and ``port``.

    In this order, so a second process started by mistake changes nothing:
    bind the ports, take the node lock (:mod:`wsgate.audit.nodelock`), and only
    then start the gateway, whose audit writer recovers from a crash of this
    node (journal replay, ``unclean_shutdown`` rows). The lock is released last.

    Raises:
        ListenError: a port cannot be bound.
        NodeBusy: another process serves this node id.
        NodeLockError, AuditUnavailable: the audit store cannot be used.
        PluginError: a plugin cannot be built.
    """
    from wsgate.audit import nodelock

    if sockets is None:
        sockets = listen(config.server.host, config.server.port)
    m = config.metrics
    metrics_sockets = listen(m.host, m.port) if m.port else None
    node_id = node_id_for(config)
    port = sockets[0].getsockname()[1]
    owner = f"pid {os.getpid()} on {socket.gethostname()}, port {port}"
    lock = await asyncio.to_thread(nodelock.acquire, config.audit.url, node_id, owner)
    try:
        await _serve_locked(config, sockets, metrics_sockets)
    finally:
        lock.release()


async def _serve_locked(config: Config, sockets: list[socket.socket],
                        metrics_sockets: list[socket.socket] | None) -> None:
    gateway = build_gateway(config)
    await gateway.start()
    app = make_app(gateway)
    server = make_server(app, config)
    server.add_sockets(sockets)
    metrics_server = serve_metrics(gateway, metrics_sockets)
    # Everything made so far (modules, plugins, SQLAlchemy, Tornado) lives as
    # long as the process: left out of the cyclic collector, a full collection
    # walks only the objects made while serving. Without this, each full
    # collection walked the whole start-up heap and stalled the loop for tens
    # of milliseconds (visible in the paced fan-out's p99; docs/performance.md).
    gc.collect()
    gc.freeze()
    where = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in sockets)
    log.info("wsgate serving on %s (node %s, auth %s, permissions %s, audit %s, broker %s)",
             where, gateway.node_id, config.auth.plugin, config.permissions.plugin,
             _safe_url(config.audit.url), _safe_url(config.broker.url))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: closing connections with 1001")
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    try:
        await asyncio.wait_for(gateway.shutdown(), config.server.shutdown_timeout)
    except TimeoutError:
        log.error("shutdown took longer than %.0f s", config.server.shutdown_timeout)
    await server.close_all_connections()
    log.info("stopped")


def _safe_url(url: str) -> str:
    """A database or broker URL with any password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
