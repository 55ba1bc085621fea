"""The core: connect, subscribe, unsubscribe, publish, deliver, disconnect.

No Tornado here. The WebSocket handler owns a :class:`Transport` for each
connection and calls the gateway; the gateway asks the authorizer, writes the
audit log, keeps the subscription index and hands events to the broker, which
hands them back through :meth:`Gateway.deliver`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from wsgate import errors, protocol
from wsgate.audit.records import (
    ACCEPTED,
    REJECTED,
    RENEW,
    SUBSCRIBE,
    UNSUBSCRIBE,
    AuditRecord,
    AuditSink,
    ConnectionInfo,
    EventRecord,
)
from wsgate.broker import Broker
from wsgate.config import Config
from wsgate.events import Event
from wsgate.index import SubscriptionIndex
from wsgate.metrics import CLOSE_NO_CODE, GatewayMetrics
from wsgate.plugins import Authenticator, Authorizer, Decision, Principal, Refused, Unavailable
from wsgate.topics import Topic, TopicError, matches, parse_topic

log = logging.getLogger("wsgate.gateway")

#: Longest wait for an authenticator before the client gets 503.
AUTHENTICATE_TIMEOUT = 10.0
_REJECT_CODES = frozenset({errors.FORBIDDEN, errors.INVALID_TOPIC, errors.LIMIT_EXCEEDED})


class Transport(Protocol):
    """What the gateway needs from a WebSocket connection."""

    def send_text(self, text: str) -> None:
        """Send one text message (control replies)."""

    def send_wire(self, frame: bytes) -> int:
        """Write an already framed WebSocket message (see protocol.ws_frame);
        returns ``pending_bytes()`` with the frame counted."""

    def pending_bytes(self) -> int:
        """Bytes written but not yet sent to the peer."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection with a close frame."""


class ConnectionRefused(Exception):
    """A connection that may not be opened; ``failure`` is the HTTP answer."""

    def __init__(self, failure: errors.HTTPFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class Connection:
    """One open WebSocket: who it is, what it holds, how to reach it."""

    __slots__ = ("id", "info", "transport", "subscriptions", "closed", "end_reason",
                 "mark", "bad_messages", "rejected_topics", "rate_tokens", "rate_at",
                 "expiry", "ended", "opened_at", "close_code")

    def __init__(self, info: ConnectionInfo, transport: Transport) -> None:
        self.id = info.connection_id
        self.info = info
        self.transport = transport
        #: topic text -> parsed topic, for every accepted subscription.
        self.subscriptions: dict[str, Topic] = {}
        self.closed = False
        #: The audit end reason of the subscriptions when the connection closes.
        self.end_reason = errors.END_DISCONNECT
        #: Last delivery this connection was given, for at-most-once per event.
        self.mark: object = None
        #: Recent bad messages and refused topics; each made on the first one (most
        #: connections have none).
        self.bad_messages: MinuteCount | None = None
        self.rejected_topics: MinuteCount | None = None
        self.rate_tokens = 0.0
        self.rate_at = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        #: Set once the end rows of the connection are written.
        self.ended: asyncio.Future[None] | None = None
        #: For the close log line: monotonic open time, and the close code once known.
        self.opened_at = time.monotonic()
        self.close_code: int | None = None

    @property
    def principal(self) -> Principal:
        return self.info.principal


class MinuteCount:
    """How many things a connection did in the last minute (a sliding window).

    ``add(n, now)`` records n at the monotonic time ``now`` and returns the
    total recorded over the 60 seconds up to ``now``.
    """

    __slots__ = ("_entries", "_total")

    def __init__(self) -> None:
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int, now: float) -> int:
        entries = self._entries
        entries.append((now, n))
        self._total += n
        horizon = now - 60.0
        while entries[0][0] <= horizon:
            self._total -= entries.popleft()[1]
        return self._total


def _matches_any(subscriptions: list[Topic], event: tuple[str, ...]) -> bool:
    return any(matches(t.segments, event) for t in subscriptions)


class ReplayBuffer:
    """Stands in for a connection's transport while its history is replayed.

    Control frames pass straight through; live event frames are held and sent
    by :meth:`flush` after the replay, skipping events the replay already sent.
    """

    __slots__ = ("inner", "frames", "held")

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.frames: list[bytes] = []
        #: Bytes in frames (deliver asks after every frame: no re-summing).
        self.held = 0

    def send_text(self, text: str) -> None:
        self.inner.send_text(text)

    def send_wire(self, frame: bytes) -> int:
        self.frames.append(frame)
        self.held += len(frame)
        return self.inner.pending_bytes() + self.held

    def pending_bytes(self) -> int:
        return self.inner.pending_bytes() + self.held

    def close(self, code: int, reason: str) -> None:
        self.inner.close(code, reason)

    def flush(self, skip: set[str]) -> None:
        for frame in self.frames:
            if skip and _event_id_of(frame) in skip:
                continue
            self.inner.send_wire(frame)
        self.frames.clear()
        self.held = 0


def _event_id_of(frame: bytes) -> str | None:
    """The event_id of a framed event (rare path: frames held during a replay)."""
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    try:
        value = json.loads(frame[start:])
    except ValueError:
        return None
    event_id = value.get("event_id") if isinstance(value, dict) else None
    return event_id if isinstance(event_id, str) else None


class Gateway:
    """Everything a node does, independent of the web framework.

    Built by ``wsgate.app.build_gateway``; call :meth:`start` before serving
    and :meth:`shutdown` to drain. ``metrics`` (default: a fresh
    :class:`~wsgate.metrics.GatewayMetrics`) is what ``/metrics`` serves.
    """

    def __init__(self, config: Config, authenticator: Authenticator, authorizer: Authorizer,
                 audit: AuditSink, broker: Broker, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.audit = audit
        self.broker = broker
        self.node_id = audit.node_id
        self.index: SubscriptionIndex[Connection] = SubscriptionIndex()
        self.connections: dict[str, Connection] = {}
        self.draining = False
        self._scopes: dict[str, int] = {}
        self._per_subject: dict[str, int] = {}
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        s = config.server
        self._max_subs = s.max_subscriptions
        self._max_buffer = s.max_output_buffer
        self._max_bad = s.max_bad_messages_per_minute
        self._max_rejected = s.max_rejected_topics_per_minute
        self._rate = s.max_messages_per_second
        self._burst = max(1.0, s.max_messages_per_second * 10)
        #: Counters for metrics and tests.
        self.stats: dict[str, int] = {
            "events_received": 0, "messages_delivered": 0, "slow_consumer_closes": 0,
        }
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.metrics.watch(self)

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the audit store and the broker, then start periodic re-checks."""
        await self.audit.start()
        await self.broker.start(self._deliver_observed)
        if self.config.server.refresh_interval > 0:
            self._refresher = asyncio.create_task(self._refresh_loop())

    async def shutdown(self) -> None:
        """Drain: refuse new connections, close open ones with 1001, write their
        end rows, flush the audit log and close the plugins and the broker."""
        self.draining = True
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
        self.deliver(events)
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
        """Ask the authenticator, checking what it answers.

        Raises:
            Refused: 401.
            Unavailable: 503 (also for a plugin that fails, hangs or answers nonsense).
        """
        try:
            principal = await asyncio.wait_for(
                self.authenticator.authenticate(credential), AUTHENTICATE_TIMEOUT)
        except (Refused, Unavailable):
            raise
        except TimeoutError:
            raise Unavailable("the authenticator did not answer in time") from None
        except Exception as exc:
            # A plugin's message may quote the credential: log the traceback without it.
            detail = "".join(traceback.format_exception(exc)).replace(credential, "***")
            log.error("authenticator %s failed: %s", self.authenticator.name, detail)
            raise Unavailable("the authenticator failed; try again later") from None
        if not isinstance(principal, Principal):
            log.error("authenticator %s returned %s, not a Principal",
                      self.authenticator.name, type(principal).__name__)
            raise Unavailable("the authenticator gave an invalid answer")
        if principal.expires_at is not None and principal.expires_at <= utcnow():
            raise Refused("the credential has expired")
        return principal

    def admit(self, principal: Principal, remote_addr: str) -> None:
        """Check the per-principal and per-address connection limits.

        Raises:
            ConnectionRefused: 503 while draining, 429 over a limit.
        """
        if self.draining:
            raise ConnectionRefused(errors.HTTPFailure(
                503, "shutting_down", "the server is shutting down; reconnect to another node"))
        s = self.config.server
        if s.max_connections_per_principal and \
                self._per_subject.get(principal.subject, 0) >= s.max_connections_per_principal:
            raise ConnectionRefused(errors.HTTPFailure(
                429, "too_many_connections",
                f"at most {s.max_connections_per_principal} connections per principal"))
        if s.max_connections_per_ip and \
                self._per_ip.get(remote_addr, 0) >= s.max_connections_per_ip:
            raise ConnectionRefused(errors.HTTPFailure(
                429, "too_many_connections",
                f"at most {s.max_connections_per_ip} connections per address"))

    def open(self, transport: Transport, principal: Principal, remote_addr: str,
             origin: str | None, user_agent: str | None) -> Connection:
        """Register an upgraded connection and send it ``connected``."""
        info = ConnectionInfo(str(uuid.uuid4()), principal, self.authenticator.name,
                              remote_addr, origin, user_agent)
        conn = Connection(info, transport)
        conn.rate_tokens = self._burst
        conn.rate_at = time.monotonic()
        self.connections[conn.id] = conn
        self._per_subject[principal.subject] = self._per_subject.get(principal.subject, 0) + 1
        self._per_ip[remote_addr] = self._per_ip.get(remote_addr, 0) + 1
        self._schedule_expiry(conn)
        transport.send_text(protocol.connected(conn.id, rfc3339(principal.expires_at)))
        log.info("connection opened", extra={
            "connection_id": conn.id, "subject": principal.subject, "kind": principal.kind,
            "customer_id": principal.customer_id, "remote_addr": remote_addr,
            "origin": origin})
        return conn

    def _schedule_expiry(self, conn: Connection) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        expires_at = conn.principal.expires_at
        if expires_at is not None:
            delay = max(0.0, (expires_at - utcnow()).total_seconds())
            conn.expiry = asyncio.get_running_loop().call_later(
                delay, self.close_connection, conn, errors.CLOSE_EXPIRED, "credential expired")

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
        if self._rate and not self._take_token(conn):
            self.close_connection(conn, errors.CLOSE_POLICY, "too many messages")
            return False
        try:
            msg = protocol.parse_client_message(raw)
        except protocol.BadRequest as exc:
            self.bad_message(conn, str(exc))
            return False
        if msg.type == "subscribe":
            # No coroutine: the audit writer calls back once the rows are committed.
            self._subscribe(conn, msg, done)
            return True
        if msg.type == "ping":
            conn.transport.send_text(protocol.pong(msg))
            return False
        coro = self.unsubscribe(conn, msg) if msg.type == "unsubscribe" else self.renew(conn, msg)
        self._spawn_then(coro, done)
        return True

    async def handle_message(self, conn: Connection, raw: str | bytes) -> None:
        """:meth:`receive`, returning once the message is handled."""
        finished = asyncio.get_running_loop().create_future()
        if self.receive(conn, raw, lambda: finished.set_result(None)):
            await finished

    def _take_token(self, conn: Connection) -> bool:
        now = time.monotonic()
        conn.rate_tokens = min(self._burst, conn.rate_tokens + (now - conn.rate_at) * self._rate)
        conn.rate_at = now
        if conn.rate_tokens < 1.0:
            return False
        conn.rate_tokens -= 1.0
        return True

    def bad_message(self, conn: Connection, message: str) -> None:
        """Answer a bad message; past the per-minute limit, close with 1008."""
        if conn.bad_messages is None:
            conn.bad_messages = MinuteCount()
        if conn.bad_messages.add(1, time.monotonic()) > self._max_bad:
            self.close_connection(conn, errors.CLOSE_POLICY, "too many bad messages")
            return
        conn.transport.send_text(protocol.bad_request(message))

    def _too_many_rejected(self, conn: Connection, rejected: list[dict[str, str]]) -> bool:
        """Count the refused topics of one reply; True once the connection is past
        ``max_rejected_topics_per_minute`` (see :meth:`_close_flooding`).

        ``audit_unavailable`` does not count: that refusal is the server's fault.
        """
        return self._refused(conn, sum(r["code"] != errors.AUDIT_UNAVAILABLE for r in rejected))

    def _refused(self, conn: Connection, n: int) -> bool:
        """Count n refusals that each wrote a rejected audit row (topics, renewals);
        True once the connection is past ``max_rejected_topics_per_minute``."""
        if not n:
            return False
        if conn.rejected_topics is None:
            conn.rejected_topics = MinuteCount()
        return conn.rejected_topics.add(n, time.monotonic()) > self._max_rejected

    def _close_flooding(self, conn: Connection) -> None:
        # Called after the reply that passed the limit: that message was answered
        # and its rows written like any other, and nothing after it is handled.
        self.close_connection(conn, errors.CLOSE_POLICY,
                              f"too many refused topics: more than {self._max_rejected} "
                              "in a minute")

    async def _close_after(self, conn: Connection, finish: Awaitable[None]) -> None:
        """Await the rest of a subscribe (its reply), then close the flooding connection."""
        try:
            await finish
        finally:
            self._close_flooding(conn)

    def _record(self, conn: Connection, action: str, topic: str, outcome: str,
                code: str = "", when: datetime | None = None) -> AuditRecord:
        return AuditRecord(when or utcnow(), conn.info, action, topic, outcome, code)

    def _decide(self, principal: Principal, topic: Topic, action: str) -> Decision:
        try:
            decision = self.authorizer.authorize(principal, topic, action)
        except Exception:
            log.exception("authorizer %s failed", self.authorizer.name)
            return Decision.deny("the permission check failed; the topic was refused")
        if inspect.isawaitable(decision) or not isinstance(decision, Decision):
            log.error("authorizer %s answered %r, not a Decision", self.authorizer.name, decision)
            return Decision.deny("the permission check gave an invalid answer")
        if not decision.allowed and decision.code not in _REJECT_CODES:
            return Decision.deny(decision.message or "refused by the permission plugin")
        return decision

    def _subscribe(self, conn: Connection, msg: protocol.ClientMessage,
                   done: Callable[[], None]) -> None:
        """Check, audit (committed before anything else), index, then reply; done()
        after the reply (see :meth:`receive`)."""
        accepted: list[Topic] = []
        rejected: list[dict[str, str]] = []
        records: list[AuditRecord] = []
        fresh: set[str] = set()
        room = self._max_subs - len(conn.subscriptions)
        # One time for the rows of one message: they are one request.
        now = utcnow()
        for text in msg.topics:
            try:
                topic = parse_topic(text)
            except TopicError as exc:
                rejected.append(protocol.rejection(text, errors.INVALID_TOPIC, str(exc)))
                records.append(self._record(conn, SUBSCRIBE, text, REJECTED,
                                            errors.INVALID_TOPIC, when=now))
                continue
            if text in conn.subscriptions or text in fresh:
                accepted.append(topic)
                records.append(self._record(conn, SUBSCRIBE, text, ACCEPTED, when=now))
                continue
            decision = self._decide(conn.principal, topic, SUBSCRIBE)
            if not decision.allowed:
                rejected.append(protocol.rejection(text, decision.code, decision.message))
                records.append(self._record(conn, SUBSCRIBE, text, REJECTED, decision.code,
                                            when=now))
            elif room <= 0:
                message = f"this connection already holds its limit of {self._max_subs} topics"
                rejected.append(protocol.rejection(text, errors.LIMIT_EXCEEDED, message))
                records.append(self._record(conn, SUBSCRIBE, text, REJECTED,
                                            errors.LIMIT_EXCEEDED, when=now))
            else:
                room -= 1
                fresh.add(text)
                accepted.append(topic)
                records.append(self._record(conn, SUBSCRIBE, text, ACCEPTED, when=now))
        started = time.perf_counter()

        def committed(error: Exception | None) -> None:
            try:
                finished = self._subscribe_committed(conn, msg, accepted, rejected, fresh,
                                                     started, error)
            except BaseException:
                done()
                raise
            if finished is None:
                done()
            else:
                self._spawn_then(finished, done)

        self.audit.submit_subscribes(records, committed)

    def _subscribe_committed(self, conn: Connection, msg: protocol.ClientMessage,
                             accepted: list[Topic], rejected: list[dict[str, str]],
                             fresh: set[str], started: float,
                             error: Exception | None) -> Awaitable[None] | None:
        """The rest of a subscribe once its rows are committed (error None) or refused.

        Replies at once in the common case; returns a coroutine that finishes the
        subscribe when it must wait (the broker, history, end rows).
        """
        if error is not None:
            message = "the audit log cannot record this subscription now; nothing was subscribed"
            rejected.extend(protocol.rejection(t.text, errors.AUDIT_UNAVAILABLE, message)
                            for t in accepted)
            accepted = []
            fresh.clear()
        self.metrics.audit_write_seconds.observe(time.perf_counter() - started)
        flooding = False
        if rejected:
            self.metrics.rejected(rejected)
            flooding = self._too_many_rejected(conn, rejected)
        new_topics = [t for t in accepted if t.text in fresh]
        ahead = {t.scope_key for t in new_topics} - self._scopes.keys()
        if ahead or conn.closed or msg.since is not None:
            finish = self._subscribe_wait(conn, msg, accepted, rejected, new_topics, ahead)
            return self._close_after(conn, finish) if flooding else finish
        for topic in new_topics:
            self._add(conn, topic)
        # Nothing between indexing and the reply: no event can overtake the reply.
        conn.transport.send_text(protocol.reply(msg, [t.text for t in accepted], rejected))
        if flooding:
            self._close_flooding(conn)
        return None

    async def _subscribe_wait(self, conn: Connection, msg: protocol.ClientMessage,
                              accepted: list[Topic], rejected: list[dict[str, str]],
                              new_topics: list[Topic], ahead: set[str]) -> None:
        if ahead:
            # Listen to the new scopes' broker channels first and wait (bounded) until
            # that is in effect, so an event posted to another node right after the
            # client sees "subscribed" reaches it.
            for key in ahead:
                self.broker.watch(key)
            await self.broker.ready(ahead)
        if conn.closed:
            # It went away while the rows were committed: end what it just gained.
            for key in ahead - self._scopes.keys():
                self.broker.unwatch(key)
            ends = [self._record(conn, UNSUBSCRIBE, t.text, ACCEPTED, conn.end_reason)
                    for t in new_topics]
            if ends:
                await self.audit.write_ends(ends)
            return
        if msg.since is not None:
            held = list(conn.subscriptions.values())
            await self._resume(conn, msg, accepted, rejected, new_topics, held, msg.since)
            return
        for topic in new_topics:
            self._add(conn, topic)
        # No await between indexing and the reply: no event can overtake the reply.
        conn.transport.send_text(protocol.reply(msg, [t.text for t in accepted], rejected))

    async def _resume(self, conn: Connection, msg: protocol.ClientMessage, accepted: list[Topic],
                      rejected: list[dict[str, str]], new_topics: list[Topic],
                      held: list[Topic], since: str) -> None:
        """Subscribe with ``since``: reply, replay what history holds, then go live.

        Live events that arrive while history is read are held back in a
        :class:`ReplayBuffer` and sent after the replay, minus any the replay
        already sent, so there is no gap and no duplicate at the seam.
        """
        buffer = ReplayBuffer(conn.transport)
        conn.transport = buffer
        try:
            for topic in new_topics:
                self._add(conn, topic)
            replay = await self._history_after(new_topics, since) if new_topics else None
            if conn.closed:
                return
            buffer.inner.send_text(protocol.reply(msg, [t.text for t in accepted], rejected,
                                                  replay is not None))
            sent: set[str] = set()
            for event in replay or ():
                # Events that matched a topic held before went out live already.
                if any(_matches_any(held, t.segments) for t in event.topics):
                    continue
                for topic in event.topics:
                    if _matches_any(new_topics, topic.segments):
                        text = protocol.event_frame(protocol.event_frame_prefix(event.type),
                                                    topic.text, event.data_json,
                                                    protocol.event_frame_tail(
                                                        event.event_id, event.published_at))
                        buffer.inner.send_wire(protocol.ws_frame(text.encode()))
                        sent.add(event.event_id)
                        break
        finally:
            conn.transport = buffer.inner
        buffer.flush(skip=sent)

    async def _history_after(self, topics: list[Topic], since: str) -> list[Event] | None:
        """Events after since in the scopes of topics, oldest first; None if a gap."""
        merged: dict[str, Event] = {}
        for scope in dict.fromkeys(t.scope_key for t in topics):
            try:
                found = await self.broker.history_since(scope, since)
            except Exception:
                log.exception("history of %s could not be read", scope)
                return None
            if found is None:
                return None
            for event in found:
                merged.setdefault(event.event_id, event)
        return sorted(merged.values(), key=lambda e: e.published_at)

    async def unsubscribe(self, conn: Connection, msg: protocol.ClientMessage) -> None:
        """Remove exact topic strings, audit with reason ``client``, reply."""
        removed: list[str] = []
        rejected: list[dict[str, str]] = []
        records: list[AuditRecord] = []
        for text in msg.topics:
            topic = conn.subscriptions.get(text)
            if topic is None:
                code, message = errors.NOT_SUBSCRIBED, "this connection does not hold that topic"
                try:
                    parse_topic(text)
                except TopicError as exc:
                    code, message = errors.INVALID_TOPIC, str(exc)
                rejected.append(protocol.rejection(text, code, message))
                records.append(self._record(conn, UNSUBSCRIBE, text, REJECTED, code))
                continue
            decision = self._decide(conn.principal, topic, UNSUBSCRIBE)
            if not decision.allowed:
                rejected.append(protocol.rejection(text, decision.code, decision.message))
                records.append(self._record(conn, UNSUBSCRIBE, text, REJECTED, decision.code))
                continue
            self._remove(conn, topic)
            removed.append(text)
            records.append(self._record(conn, UNSUBSCRIBE, text, ACCEPTED, errors.END_CLIENT))
        await self.audit.write_ends(records)
        if not conn.closed:
            conn.transport.send_text(protocol.reply(msg, removed, rejected))
            if self._too_many_rejected(conn, rejected):
                self._close_flooding(conn)

    async def renew(self, conn: Connection, msg: protocol.ClientMessage) -> None:
        """``authenticate``: a new token for the same principal extends the connection."""
        try:
            principal = await self.authenticate(msg.token)
        except (Refused, Unavailable) as exc:
            await self.audit.write_ends([self._record(conn, RENEW, "", REJECTED,
                                                      errors.UNAUTHENTICATED)])
            conn.transport.send_text(protocol.error(errors.UNAUTHENTICATED, str(exc), msg))
            # Each refusal is an audit row: it counts like a refused topic (a
            # backend that cannot decide is not the client's fault).
            if isinstance(exc, Refused) and self._refused(conn, 1):
                self._close_flooding(conn)
            return
        old = conn.principal
        if (principal.subject, principal.kind, principal.customer_id) != \
                (old.subject, old.kind, old.customer_id):
            await self.audit.write_ends([self._record(conn, RENEW, "", REJECTED,
                                                      errors.UNAUTHENTICATED)])
            conn.transport.send_text(protocol.error(
                errors.UNAUTHENTICATED, "the new token is for another principal; "
                "open a new connection for it", msg))
            if self._refused(conn, 1):
                self._close_flooding(conn)
            return
        if conn.closed:
            return
        conn.info = ConnectionInfo(conn.info.connection_id, principal, conn.info.authenticator,
                                   conn.info.remote_addr, conn.info.origin, conn.info.user_agent)
        self._schedule_expiry(conn)
        await self.audit.write_ends([self._record(conn, RENEW, "", ACCEPTED)])
        conn.transport.send_text(protocol.authenticated(msg, rfc3339(principal.expires_at)))

    # -- index bookkeeping -------------------------------------------------

    def _add(self, conn: Connection, topic: Topic) -> None:
        conn.subscriptions[topic.text] = topic
        self.index.add(topic.segments, conn)
        key = topic.scope_key
        count = self._scopes.get(key, 0)
        self._scopes[key] = count + 1
        if count == 0:
            self.broker.watch(key)

    def _remove(self, conn: Connection, topic: Topic) -> None:
        del conn.subscriptions[topic.text]
        self.index.remove(topic.segments, conn)
        key = topic.scope_key
        count = self._scopes[key] - 1
        if count:
            self._scopes[key] = count
        else:
            del self._scopes[key]
            self.broker.unwatch(key)

    # -- closing -----------------------------------------------------------

    def close_connection(self, conn: Connection, code: int, reason: str) -> None:
        """Close from the server side; its subscriptions end with the reason for code."""
        if conn.closed:
            return
        conn.end_reason = errors.END_REASON_FOR_CLOSE.get(code, errors.END_DISCONNECT)
        conn.close_code = code
        if code == errors.CLOSE_SLOW_CONSUMER:
            self.stats["slow_consumer_closes"] += 1
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
            conn.close_code = code or CLOSE_NO_CODE
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
        for counter, key in ((self._per_subject, conn.principal.subject),
                             (self._per_ip, conn.info.remote_addr)):
            left = counter.get(key, 1) - 1
            if left > 0:
                counter[key] = left
            else:
                counter.pop(key, None)
        records = []
        for topic in list(conn.subscriptions.values()):
            self._remove(conn, topic)
            records.append(self._record(conn, UNSUBSCRIBE, topic.text, ACCEPTED,
                                        conn.end_reason))
        conn.ended = asyncio.ensure_future(self.audit.write_ends(records)) if records else None
        if conn.ended is not None:
            self._tasks.add(conn.ended)
            conn.ended.add_done_callback(self._tasks.discard)

    # -- events --------------------------------------------------------------

    async def publish(self, events: Sequence[Event], ingest_key_id: str,
                      payload_hashes: Sequence[str]) -> None:
        """Publish validated events through the broker, then record them in the audit log.

        Raises:
            wsgate.broker.BrokerUnavailable: nothing was published.
        """
        await self.broker.publish(events)
        if self.config.audit.record_events:
            moment = utcnow()
            self._spawn(self.audit.write_events([
                EventRecord(e.event_id, e.type, tuple(t.text for t in e.topics), ingest_key_id,
                            h, moment)
                for e, h in zip(events, payload_hashes, strict=True)]))

    def deliver(self, events: Sequence[Event]) -> None:
        """Send events to the local connections whose subscriptions match (broker callback).

        Each connection gets an event at most once, with the first of the
        event's topics that matched; events go out in the order given.
        """
        index_match = self.index.match
        max_buffer = self._max_buffer
        delivered = 0
        for event in events:
            mark = object()
            prefix: str | None = None
            tail = ""
            for topic in event.topics:
                matched = index_match(topic.segments)
                if not matched:
                    continue
                wire: bytes | None = None
                for conn in matched:
                    if conn.mark is mark:
                        continue
                    conn.mark = mark
                    if wire is None:
                        if prefix is None:
                            prefix = protocol.event_frame_prefix(event.type)
                            tail = protocol.event_frame_tail(event.event_id, event.published_at)
                        text = protocol.event_frame(prefix, topic.text, event.data_json, tail)
                        wire = protocol.ws_frame(text.encode())
                    delivered += 1
                    # The pending bytes count frames queued by the transport but not
                    # yet written, so a burst cannot pass the limit unseen.
                    if conn.transport.send_wire(wire) > max_buffer and not conn.closed:
                        self._spawn_close_slow(conn)
        stats = self.stats
        stats["events_received"] += len(events)
        stats["messages_delivered"] += delivered

    def _spawn_close_slow(self, conn: Connection) -> None:
        # Closing mutates the index being iterated: do it after this delivery.
        asyncio.get_running_loop().call_soon(
            self.close_connection, conn, errors.CLOSE_SLOW_CONSUMER,
            "slow consumer: unsent output passed its limit")

    # -- continuous authorization -----------------------------------------

    async def _refresh_loop(self) -> None:
        interval = self.config.server.refresh_interval
        while True:
            await asyncio.sleep(interval)
            await self.refresh_all()

    async def refresh_all(self) -> None:
        """Ask the authenticator to re-check every connected principal (4003 when refused)."""
        for conn in list(self.connections.values()):
            if conn.closed:
                continue
            try:
                principal = await self.authenticator.refresh(conn.principal)
            except Unavailable:
                continue
            except Exception:
                log.exception("authenticator %s failed to refresh", self.authenticator.name)
                continue
            if conn.closed:
                continue
            if principal is None or not isinstance(principal, Principal) or \
                    principal.subject != conn.principal.subject:
                self.close_connection(conn, errors.CLOSE_REVOKED, "rights revoked")
                continue
            if any(not self._decide(principal, t, SUBSCRIBE).allowed
                   for t in conn.subscriptions.values()):
                self.close_connection(conn, errors.CLOSE_REVOKED, "rights revoked")
                continue
            if principal != conn.principal:
                conn.info = ConnectionInfo(
                    conn.info.connection_id, principal, conn.info.authenticator,
                    conn.info.remote_addr, conn.info.origin, conn.info.user_agent)
                self._schedule_expiry(conn)
