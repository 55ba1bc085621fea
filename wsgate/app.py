"""The composition root: the one place where objects are made (``build_gateway``,
and through :mod:`wsgate.adapters.server` the Tornado application) and a node is run.

``ListenError`` and ``listen`` are re-exported for ``wsgate serve``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket

from wsgate.adapters.server import ListenError, listen, make_app, make_server, serve_metrics
from wsgate.audit.records import AuditSink
from wsgate.broker import Broker, make_broker
from wsgate.config import Config
from wsgate.gateway import Gateway
from wsgate.metrics import GatewayMetrics
from wsgate.plugins import (
    AUTHENTICATOR_GROUP,
    AUTHORIZER_GROUP,
    Authenticator,
    Authorizer,
    build_plugin,
)

log = logging.getLogger("wsgate")

__all__ = ["ListenError", "build_audit", "build_gateway", "build_plugins", "listen",
           "node_id_for", "serve"]


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


def build_gateway(config: Config, audit: AuditSink | None = None,
                  metrics: GatewayMetrics | None = None, broker: Broker | None = None
                  ) -> Gateway:
    """Everything a node needs, made from the config (not started).

    The gateway reports to ``metrics`` (a fresh GatewayMetrics by default),
    which reads the gateway back at scrape time; it is ``gateway.metrics``.
    ``audit`` and ``broker`` replace the configured ones (tests, tools).
    """
    authenticator, authorizer = build_plugins(config)
    node_id = node_id_for(config)
    if audit is None:
        audit = build_audit(config, node_id)
    if metrics is None:
        metrics = GatewayMetrics()
    if broker is None:
        broker = make_broker(config.broker.url, config.history)
    gateway = Gateway(config, authenticator, authorizer, audit, broker, metrics)
    metrics.watch(gateway)
    return gateway


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
    metrics = GatewayMetrics()
    gateway = build_gateway(config, metrics=metrics)
    await gateway.start()
    app = make_app(gateway, metrics)
    server = make_server(app, config)
    server.add_sockets(sockets)
    metrics_server = serve_metrics(gateway, metrics, metrics_sockets)
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
