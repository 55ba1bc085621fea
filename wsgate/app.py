"""The one place where objects are made: ``build_gateway`` and ``make_app``."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from wsgate.audit.records import AuditSink
from wsgate.broker import make_broker
from wsgate.config import Config
from wsgate.gateway import Gateway
from wsgate.handlers.base import JSONHandler, NotFoundHandler
from wsgate.handlers.ingest import IngestHandler, IngestState
from wsgate.handlers.websocket import WebSocketHandler, scrub_uri
from wsgate.plugins import (
    AUTHENTICATOR_GROUP,
    AUTHORIZER_GROUP,
    Authenticator,
    Authorizer,
    build_plugin,
)

log = logging.getLogger("wsgate")
access_log = logging.getLogger("wsgate.access")


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

    return AuditWriter(config.audit, node_id)


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
    """Access log line, with any token in the URL replaced by ``***``."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    req = handler.request
    access_log.log(level, "%d %s %s %s %.1fms", status, req.method, scrub_uri(req.uri or ""),
                   req.remote_ip, 1000.0 * req.request_time())


def make_app(gateway: Gateway) -> tornado.web.Application:
    """The Tornado application serving gateway."""
    s = gateway.config.server
    routes: list[Any] = [
        (r"/v1\.0/ws", WebSocketHandler, {"gateway": gateway}),
        (r"/v1\.0/events", IngestHandler,
         {"gateway": gateway, "state": IngestState(gateway.config.ingest)}),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler, {"gateway": gateway}),
    ]
    routes.extend(_audit_routes(gateway))
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        websocket_ping_interval=s.ping_interval,
        websocket_ping_timeout=s.ping_timeout,
        websocket_max_message_size=s.max_message_size,
        compress_response=False,
    )


def _audit_routes(gateway: Gateway) -> list[Any]:
    try:
        from wsgate.handlers.audit_api import routes
    except ImportError:
        return []
    result: list[Any] = routes(gateway.config.audit)
    return result


def make_server(app: tornado.web.Application, config: Config) -> tornado.httpserver.HTTPServer:
    s = config.server
    return tornado.httpserver.HTTPServer(
        app,
        xheaders=False,
        idle_connection_timeout=s.idle_connection_timeout,
        body_timeout=s.body_timeout,
        max_body_size=config.ingest.max_body_bytes + 1,
        max_header_size=16 * 1024,
    )


async def serve(config: Config) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain and return."""
    gateway = build_gateway(config)
    await gateway.start()
    app = make_app(gateway)
    server = make_server(app, config)
    sockets = tornado.netutil.bind_sockets(config.server.port, config.server.host)
    server.add_sockets(sockets)
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
