"""The Gateway: one node's core, a thin facade over its rooms.

No Tornado here (a test keeps it so). The WebSocket adapter owns a
:class:`~wsgate.gateway.connection.Transport` for each connection and calls
the gateway; the gateway's rooms ask the plugins, write the audit log, keep
the subscription index and hand events to the broker, which hands them back
through :meth:`Gateway.deliver`. The rooms:

- :mod:`~wsgate.gateway.admission`: credentials in, principals out; connection limits;
- :mod:`~wsgate.gateway.limits`: message rate, bad messages, refusals;
- :mod:`~wsgate.gateway.subscriptions`: subscribe, unsubscribe, audit, index, scopes;
- :mod:`~wsgate.gateway.delivery`: fan-out, slow consumers;
- :mod:`~wsgate.gateway.resume`: replaying history after a reconnect;
- :mod:`~wsgate.gateway.refresh`: expiry, renewal, re-authorization.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from wsgate import errors, protocol
from wsgate.audit.records import AuditSink, ConnectionInfo, EventRecord
from wsgate.broker import Broker
from wsgate.config import Config
from wsgate.events import Event
from wsgate.gateway.admission import Admission
from wsgate.gateway.connection import Connection, Transport, rfc3339, utcnow
from wsgate.gateway.delivery import Delivery
from wsgate.gateway.limits import MessageLimits
from wsgate.gateway.observer import NoObserver, Observer
from wsgate.gateway.refresh import Refresh
from wsgate.gateway.resume import Resume
from wsgate.gateway.subscriptions import Subscriptions
from wsgate.index import SubscriptionIndex
from wsgate.plugins import Authenticator, Authorizer, Principal

log = logging.getLogger("wsgate.gateway")


class Gateway:
    """Everything a node does, independent of the web framework.

    Built by ``wsgate.app.build_gateway``; call :meth:`start` before serving
    and :meth:`shutdown` to drain. ``observer`` (default: records nothing) is
    told what happens: the composition root passes the metrics.
    """

    def __init__(self, config: Config, authenticator: Authenticator, authorizer: Authorizer,
                 audit: AuditSink, broker: Broker, observer: Observer | None = None) -> None:
        self.config = config
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.audit = audit
        self.broker = broker
        self.node_id = audit.node_id
        self.metrics: Observer = observer if observer is not None else NoObserver()
        self.connections: dict[str, Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        s = config.server
        self.admission = Admission(authenticator, s)
        self.limits = MessageLimits(s)
        self.subscriptions = Subscriptions(s.max_subscriptions, authorizer, audit, broker,
                                           self.limits, self.metrics, self._close_flooding,
                                           self._spawn_then)
        self.delivery = Delivery(self.subscriptions.index, s.max_output_buffer,
                                 self.close_connection)
        self.subscriptions.resume = Resume(
            broker, self.subscriptions.add, lambda: self.delivery.current_event_id).resume
        self.refresh = Refresh(self.admission, self.subscriptions.decide, audit, self.limits,
                               self.close_connection, self._close_flooding)

    # -- what tests, adapters and metrics read (NodeState) ----------------------

    @property
    def index(self) -> SubscriptionIndex[Connection]:
        return self.subscriptions.index

    @property
    def stats(self) -> dict[str, int]:
        """Running totals: events_received, messages_delivered, slow_consumer_closes."""
        return self.delivery.stats

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def open_connections(self) -> int:
        return len(self.connections)

    def subscription_count(self) -> int:
        return len(self.subscriptions.index)

    def counters(self) -> Mapping[str, int]:
        return self.delivery.stats

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the audit store and the broker, then start periodic re-checks."""
        await self.audit.start()
        await self.broker.start(self._deliver_observed)
        interval = self.config.server.refresh_interval
        if interval > 0:
            self._refresher = asyncio.create_task(self.refresh.loop(interval, self.connections))

    async def shutdown(self) -> None:
        """Drain: refuse new connections, close open ones with 1001, write their
        end rows, flush the audit log and close the plugins and the broker."""
        self.admission.draining = True
        if self._refresher is not None:
            self._refresher.cancel()
        for conn in list(self.connections.values()):
            # Ends the subscriptions now: a peer that never answers the close frame
            # is not waited for.
            self.close_connection(conn, errors.CLOSE_GOING_AWAY, "server shutting down")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.broker.close()
        await self.audit.close()
        await self.authenticator.close()

    def _deliver_observed(self, events: Sequence[Event]) -> None:
        # The broker's callback: delivery latency is observed once per event per
        # node here, so deliver() itself stays free of metric calls.
        self.delivery.deliver(events)
        self.metrics.delivered(events)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_then(self, coro: Awaitable[Any], done: Callable[[], None]) -> None:
        """Run coro in a task, then call done (after logging what it raised)."""
        def finished(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("handling a client message failed", exc_info=task.exception())
            done()

        self._spawn(coro).add_done_callback(finished)

    # -- admission -----------------------------------------------------------

    async def authenticate(self, credential: str) -> Principal:
        """See :meth:`Admission.authenticate`."""
        return await self.admission.authenticate(credential)

    def admit(self, principal: Principal, remote_addr: str) -> None:
        """See :meth:`Admission.admit` (raises errors.ConnectionRefused)."""
        self.admission.admit(principal, remote_addr)

    def open(self, transport: Transport, principal: Principal, remote_addr: str,
             origin: str | None, user_agent: str | None) -> Connection:
        """Register an upgraded connection and send it ``connected``."""
        info = ConnectionInfo(str(uuid.uuid4()), principal, self.authenticator.name,
                              remote_addr, origin, user_agent)
        conn = Connection(info, transport)
        self.limits.start(conn)
        self.connections[conn.id] = conn
        self.admission.opened(conn)
        self.refresh.schedule_expiry(conn)
        transport.send_text(protocol.connected(conn.id, rfc3339(principal.expires_at)))
        log.info("connection opened", extra={
            "connection_id": conn.id, "subject": principal.subject, "kind": principal.kind,
            "customer_id": principal.customer_id, "remote_addr": remote_addr,
            "origin": origin})
        return conn

    # -- client messages ----------------------------------------------------

    def receive(self, conn: Connection, raw: str | bytes, done: Callable[[], None]) -> bool:
        """Handle one client frame; every outcome is a reply or an error frame.

        The WebSocket layer's entry point: it hands a connection's messages over
        one at a time, so replies keep their order.

        Returns:
            False when the message is handled already (``done`` is not called);
            True when handling goes on (the audit commit, the broker, a plugin):
            ``done()`` is then called once, on the event loop, after the reply.
        """
        if conn.closed:
            return False
        if self.limits.too_fast(conn):
            self.close_connection(conn, errors.CLOSE_POLICY, "too many messages")
            return False
        try:
            msg = protocol.parse_client_message(raw)
        except protocol.BadRequest as exc:
            self.bad_message(conn, str(exc))
            return False
        if msg.type == "subscribe":
            # No coroutine: the audit writer calls back once the rows are committed.
            self.subscriptions.subscribe(conn, msg, done)
            return True
        if msg.type == "ping":
            conn.transport.send_text(protocol.pong(msg))
            return False
        coro = (self.subscriptions.unsubscribe(conn, msg) if msg.type == "unsubscribe"
                else self.refresh.renew(conn, msg))
        self._spawn_then(coro, done)
        return True

    async def handle_message(self, conn: Connection, raw: str | bytes) -> None:
        """:meth:`receive`, returning once the message is handled."""
        finished = asyncio.get_running_loop().create_future()
        if self.receive(conn, raw, lambda: finished.set_result(None)):
            await finished

    def bad_message(self, conn: Connection, message: str) -> None:
        """Answer a bad message; past the per-minute limit, close with 1008."""
        if self.limits.too_many_bad(conn):
            self.close_connection(conn, errors.CLOSE_POLICY, "too many bad messages")
            return
        conn.transport.send_text(protocol.bad_request(message))

    def _close_flooding(self, conn: Connection) -> None:
        # Called after the reply that passed the limit: that message was answered
        # and its rows written like any other, and nothing after it is handled.
        self.close_connection(conn, errors.CLOSE_POLICY, self.limits.flood_reason)

    def reconfigure(self, config: Config, authenticator: Authenticator,
                    authorizer: Authorizer) -> None:
        """Swap in a reloaded config and the plugins built from it (SIGHUP).

        Synchronous, so no message is handled half with the old and half with
        the new: every room's config-derived value (limits, the plugins) and
        ``self.config`` (read live by the adapters: origins, output limit,
        ingest keys) change together. Open connections stay open; the caller
        then re-checks them (:meth:`refresh_all`) and closes the old
        authenticator. The keys that need a restart (``wsgate.app.RESTART_KEYS``)
        are the caller's to refuse; the periodic re-check restarts with a new
        ``refresh_interval``.
        """
        old_interval = self.config.server.refresh_interval
        self.config = config
        self.authenticator = authenticator
        self.authorizer = authorizer
        s = config.server
        self.admission.authenticator = authenticator
        self.admission.server = s
        limits = MessageLimits(s)
        self.limits.rate, self.limits.burst = limits.rate, limits.burst
        self.limits.max_bad, self.limits.max_rejected = limits.max_bad, limits.max_rejected
        self.subscriptions.authorizer = authorizer
        self.subscriptions.max_subscriptions = s.max_subscriptions
        self.delivery.max_output_buffer = s.max_output_buffer
        if s.refresh_interval != old_interval and not self.admission.draining:
            if self._refresher is not None:
                self._refresher.cancel()
                self._refresher = None
            if s.refresh_interval > 0:
                self._refresher = asyncio.create_task(
                    self.refresh.loop(s.refresh_interval, self.connections))

    async def refresh_all(self) -> None:
        """Re-check every connected principal now (see :meth:`Refresh.refresh_all`)."""
        await self.refresh.refresh_all(self.connections)

    # -- closing -----------------------------------------------------------

    def close_connection(self, conn: Connection, code: int, reason: str) -> None:
        """Close from the server side; its subscriptions end with the reason for code."""
        if conn.closed:
            return
        conn.end_reason = errors.END_REASON_FOR_CLOSE.get(code, errors.END_DISCONNECT)
        conn.close_code = code
        if code == errors.CLOSE_SLOW_CONSUMER:
            self.delivery.stats["slow_consumer_closes"] += 1
        try:
            conn.transport.close(code, reason)
        finally:
            self.disconnected(conn)

    def disconnected(self, conn: Connection, code: int | None = None) -> None:
        """The connection is gone: drop its subscriptions and write their end rows.

        ``code`` is the close code the peer sent, if any (a server-side close
        already recorded its own). Idempotent; the rows are written in the
        background and awaited at shutdown.
        """
        if conn.closed:
            return
        conn.closed = True
        if conn.close_code is None:
            conn.close_code = code or errors.CLOSE_NO_CODE
        self.metrics.closed(conn.close_code)
        log.info("connection closed", extra={
            "connection_id": conn.id, "subject": conn.principal.subject,
            "kind": conn.principal.kind, "customer_id": conn.principal.customer_id,
            "remote_addr": conn.info.remote_addr, "origin": conn.info.origin,
            "close_code": conn.close_code,
            "duration_s": round(time.monotonic() - conn.opened_at, 3),
            "subscriptions": len(conn.subscriptions)})
        if conn.expiry is not None:
            conn.expiry.cancel()
        self.connections.pop(conn.id, None)
        self.admission.closed(conn)
        records = self.subscriptions.end_all(conn)
        conn.ended = asyncio.ensure_future(self.audit.write_ends(records)) if records else None
        if conn.ended is not None:
            self._tasks.add(conn.ended)
            conn.ended.add_done_callback(self._tasks.discard)

    # -- events --------------------------------------------------------------

    async def publish(self, events: Sequence[Event], ingest_key_id: str,
                      payload_hashes: Sequence[str]) -> None:
        """Publish validated events through the broker, then record them in the audit log.

        Returns once the events are recorded (``[audit] record_events``): committed
        to the store, or journaled while it is down (never refused), so the
        ingest's 202 follows its record and a crash after the answer loses none.
        Delivery goes first and does not wait for the commit; an event the broker
        refused is not recorded.

        Raises:
            wsgate.broker.BrokerUnavailable: nothing was published (nor recorded).
        """
        await self.broker.publish(events)
        if self.config.audit.record_events:
            moment = utcnow()
            # Awaited in the caller's task (no task of its own): a shutdown drains
            # the writer's queue before it closes, so this returns even then.
            await self.audit.write_events([
                EventRecord(e.event_id, e.type, tuple(t.text for t in e.topics), ingest_key_id,
                            h, moment)
                for e, h in zip(events, payload_hashes, strict=True)])

    def deliver(self, events: Sequence[Event]) -> None:
        """Send events to the matching local connections (see :meth:`Delivery.deliver`)."""
        self.delivery.deliver(events)
