"""The composition root: the one place where objects are made (``build_gateway``,
and through :mod:`wsgate.adapters.server` the Tornado application) and a node is run.

``ListenError`` and ``listen`` are re-exported for ``wsgate serve``."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any

from wsgate.adapters.server import ListenError, listen, make_app, make_server, serve_metrics
from wsgate.audit.records import AuditSink
from wsgate.broker import Broker, make_broker
from wsgate.config import Config, ConfigError, load_config
from wsgate.gateway import Gateway
from wsgate.metrics import GatewayMetrics
from wsgate.plugins import (
    AUTHENTICATOR_GROUP,
    AUTHORIZER_GROUP,
    Authenticator,
    Authorizer,
    PluginError,
    build_plugin,
)

log = logging.getLogger("wsgate")

#: Allocations between young collections of the cyclic collector while serving.
GC_YOUNG_THRESHOLD = 10_000

__all__ = ["RESTART_KEYS", "ListenError", "Reloader", "build_audit", "build_gateway",
           "build_plugins", "config_changes", "listen", "needs_restart", "node_id_for",
           "restart_changes", "serve"]


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


#: What a reload (SIGHUP) cannot change: the process made something from these
#: at start (its sockets, node lock, HTTP server, ping timer, audit writer,
#: broker, logging, metrics server). A table name stands for all its keys.
#: Everything else applies live: origins, connection and message limits,
#: ``refresh_interval``, ``shutdown_timeout``, ``[auth]``, ``[permissions]``,
#: ``[ingest]`` (but its ``max_body_bytes``) and ``[audit] record_events``.
RESTART_KEYS = (
    "server.host", "server.port", "server.node_id", "server.event_loop", "server.ping_interval",
    "server.ping_timeout", "server.idle_connection_timeout", "server.body_timeout",
    "ingest.max_body_bytes", "audit.url", "audit.signing_key", "audit.signing_key_file",
    "audit.verify_key_file", "audit.checkpoint_every", "audit.checkpoint_interval",
    "audit.journal_path", "audit.group_commit_ms", "audit.group_commit_max_rows",
    "audit.retry_interval", "audit.witness", "broker", "history", "logging",
    "metrics.port", "metrics.host")

_ABSENT = object()


def config_changes(old: Config, new: Config) -> list[str]:
    """The ``table.key`` names whose values differ (``table.options.<name>``
    for a plugin's options), in file order. Names only: never a value."""
    changed = []
    for table in dataclasses.fields(Config):
        if table.name == "source":
            continue
        a, b = getattr(old, table.name), getattr(new, table.name)
        for key in dataclasses.fields(a):
            va, vb = getattr(a, key.name), getattr(b, key.name)
            if isinstance(va, Mapping) and isinstance(vb, Mapping):
                changed += [f"{table.name}.{key.name}.{name}" for name in [*va, *(n for n in vb
                            if n not in va)] if va.get(name, _ABSENT) != vb.get(name, _ABSENT)]
            elif va != vb:
                changed.append(f"{table.name}.{key.name}")
    return changed


def needs_restart(key: str) -> bool:
    """Whether a reload must refuse a change of ``key`` (see RESTART_KEYS)."""
    return any(key == k or key.startswith(k + ".") for k in RESTART_KEYS)


def restart_changes(old: Config, new: Config) -> list[str]:
    """What a reload from old to new must refuse: the RESTART_KEYS that changed,
    and turning the audit API on or off (its routes are mounted at start; new
    keys for an API that stays on apply live)."""
    out = [k for k in config_changes(old, new) if needs_restart(k)]
    if bool(old.audit.api_keys) != bool(new.audit.api_keys):
        out.append("audit.api_keys (turning the audit API on or off)")
    return out


class Reloader:
    """SIGHUP: re-read the config file and apply it to a running gateway.

    ``raw`` is the file's config as loaded (what a change is measured
    against); ``adjust`` turns a loaded config into the one this process runs
    (``serve --workers`` gives each worker its node id, port, journal, metrics
    port). A file that does not load or whose plugins refuse their options,
    or a change of a RESTART_KEYS key, changes nothing and is logged; else
    the plugins are rebuilt from the new options and swapped with the config
    in one step (:meth:`Gateway.reconfigure`), the old authenticator is
    closed, and every open connection is re-checked (4003 for those now refused).
    """

    def __init__(self, gateway: Gateway, raw: Config,
                 adjust: Callable[[Config], Config] | None = None) -> None:
        self.gateway = gateway
        self.raw = raw
        self.adjust = adjust or (lambda c: c)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    def signalled(self) -> None:
        """The SIGHUP handler: reload in a task (reloads run one at a time)."""
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Reload now; True when the new config is in force."""
        async with self._lock:
            try:
                return await self._reload()
            except Exception:
                log.exception("reload failed; the running config stays")
                return False

    async def _reload(self) -> bool:
        path = self.raw.source
        if self.gateway.draining:
            log.info("reload ignored: the node is shutting down")
            return False
        try:
            new = load_config(path)
        except ConfigError as exc:
            # The message check-config prints for this file.
            log.error("reload refused: wsgate: %s (the running config stays)", exc)
            return False
        try:
            authenticator, authorizer = build_plugins(new)
        except PluginError as exc:
            log.error("reload refused: wsgate: %s: %s (the running config stays)", path, exc)
            return False
        changed = config_changes(self.raw, new)
        restart = restart_changes(self.raw, new)
        if restart:
            await authenticator.close()
            log.error("reload refused: %s: %s cannot change without a restart "
                      "(the running config stays)", path, ", ".join(restart))
            return False
        old = self.gateway.authenticator
        self.gateway.reconfigure(self.adjust(new), authenticator, authorizer)
        self.raw = new
        log.info("config reloaded from %s: %s", path,
                 f"changed {', '.join(changed)}" if changed else
                 "no key changed (plugins rebuilt)")
        try:
            await old.close()
        except Exception:
            log.exception("closing the old authenticator %s failed", old.name)
        await self.gateway.refresh_all()
        return True


async def serve(config: Config, sockets: list[socket.socket] | None = None,
                raw: Config | None = None,
                adjust: Callable[[Config], Config] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain and return.

    ``sockets``: listening sockets to serve, bound by ``serve --workers``;
    default: bind ``[server] host`` and ``port``. SIGHUP reloads the config
    file (:class:`Reloader`; ``raw`` and ``adjust`` as there, for a worker).

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
        await _serve_locked(config, sockets, metrics_sockets, raw or config, adjust)
    finally:
        lock.release()


async def _serve_locked(config: Config, sockets: list[socket.socket],
                        metrics_sockets: list[socket.socket] | None, raw: Config,
                        adjust: Callable[[Config], Config] | None) -> None:
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
    # A young collection every GC_YOUNG_THRESHOLD allocations instead of 700:
    # at 10,000 events/s the default ran ~100 young collections a second, each
    # promoting whatever was in flight (requests, queued audit records), and
    # every 1-2 s the promoted objects set off a full collection of the whole
    # connection heap (up to ~150 ms, the loop stalled). Cyclic garbage waits
    # a little longer; nothing on the hot path makes any (docs/performance.md).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    where = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in sockets)
    log.info("wsgate serving on %s (node %s, auth %s, permissions %s, audit %s, broker %s, "
             "event loop %s)", where, gateway.node_id, config.auth.plugin,
             config.permissions.plugin, _safe_url(config.audit.url),
             _safe_url(config.broker.url), loop_name())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, Reloader(gateway, raw, adjust).signalled)
    await stop.wait()
    log.info("draining: closing connections with 1001")
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    try:
        await asyncio.wait_for(gateway.shutdown(), gateway.config.server.shutdown_timeout)
    except TimeoutError:
        log.error("shutdown took longer than %.0f s", gateway.config.server.shutdown_timeout)
    await server.close_all_connections()
    log.info("stopped")


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this coroutine runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def _safe_url(url: str) -> str:
    """A database or broker URL with any password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
