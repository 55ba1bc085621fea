"""Subscriptions: subscribe and unsubscribe, their audit rows, the index, scope counts.

A subscribe is checked topic by topic (SPEC §1 and the authorizer plugin),
its rows are committed by the audit sink (which calls back: no coroutine on
the common path), and only then is the connection indexed and answered, so
no event overtakes the reply (SPEC §2). The broker listens to a scope while
any local connection holds a topic in it (the scope counts).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from wsgate import errors, protocol
from wsgate.audit.records import (
    ACCEPTED,
    REJECTED,
    SUBSCRIBE,
    UNSUBSCRIBE,
    AuditRecord,
    AuditSink,
)
from wsgate.broker import Broker
from wsgate.gateway.connection import Connection, utcnow
from wsgate.gateway.limits import MessageLimits
from wsgate.gateway.observer import Observer
from wsgate.index import SubscriptionIndex
from wsgate.plugins import Authorizer, Decision, Principal
from wsgate.topics import Topic, TopicError, parse_topic

log = logging.getLogger("wsgate.gateway")

_REJECT_CODES = frozenset({errors.FORBIDDEN, errors.INVALID_TOPIC, errors.LIMIT_EXCEEDED})

#: Called with a connection whose reply just passed its refusal limit.
CloseFlooding = Callable[[Connection], None]
#: Runs a coroutine in a tracked task, then calls the second argument.
SpawnThen = Callable[[Awaitable[object], Callable[[], None]], None]
#: Finishes a subscribe that carries ``since`` (see wsgate.gateway.resume.Resume.resume).
ResumeHook = Callable[[Connection, protocol.ClientMessage, list[Topic], list[dict[str, str]],
                       list[Topic], list[Topic], str], Awaitable[None]]


class Subscriptions:
    """What every connection holds, and the rules for changing it.

    Args:
        max_subscriptions: the ``[server]`` limit per connection.
        authorizer, audit, broker: the plugin and the seams this room writes through.
        limits: counts refusals against the flood limit.
        observer: told of refusals and audit waits.
        close_flooding, spawn_then: the facade's, for what outlives one call.
    """

    def __init__(self, max_subscriptions: int, authorizer: Authorizer, audit: AuditSink,
                 broker: Broker, limits: MessageLimits, observer: Observer,
                 close_flooding: CloseFlooding, spawn_then: SpawnThen) -> None:
        self.max_subscriptions = max_subscriptions
        self.authorizer = authorizer
        self.audit = audit
        self.broker = broker
        self.limits = limits
        self.observer = observer
        self.close_flooding = close_flooding
        self.spawn_then = spawn_then
        self.index: SubscriptionIndex[Connection] = SubscriptionIndex()
        #: scope key -> subscriptions of local connections in it.
        self.scopes: dict[str, int] = {}
        #: Set by the facade: finishes a subscribe with ``since``.
        self.resume: ResumeHook | None = None

    # -- permission ---------------------------------------------------------

    def decide(self, principal: Principal, topic: Topic, action: str) -> Decision:
        """The authorizer's answer, checked: a plugin that fails or answers nonsense
        refuses the topic (``forbidden``)."""
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

    # -- subscribe -------------------------------------------------------------

    def subscribe(self, conn: Connection, msg: protocol.ClientMessage,
                  done: Callable[[], None]) -> None:
        """Check, audit (committed before anything else), index, then reply; done()
        after the reply (see Gateway.receive)."""
        accepted: list[Topic] = []
        rejected: list[dict[str, str]] = []
        records: list[AuditRecord] = []
        fresh: set[str] = set()
        room = self.max_subscriptions - len(conn.subscriptions)
        # One time for the rows of one message: they are one request.
        now = utcnow()
        for text in msg.topics:
            try:
                topic = parse_topic(text)
            except TopicError as exc:
                rejected.append(protocol.rejection(text, errors.INVALID_TOPIC, str(exc)))
                records.append(conn.record(SUBSCRIBE, text, REJECTED, errors.INVALID_TOPIC,
                                           when=now))
                continue
            if text in conn.subscriptions or text in fresh:
                accepted.append(topic)
                records.append(conn.record(SUBSCRIBE, text, ACCEPTED, when=now))
                continue
            decision = self.decide(conn.principal, topic, SUBSCRIBE)
            if not decision.allowed:
                rejected.append(protocol.rejection(text, decision.code, decision.message))
                records.append(conn.record(SUBSCRIBE, text, REJECTED, decision.code, when=now))
            elif room <= 0:
                message = (f"this connection already holds its limit of "
                           f"{self.max_subscriptions} topics")
                rejected.append(protocol.rejection(text, errors.LIMIT_EXCEEDED, message))
                records.append(conn.record(SUBSCRIBE, text, REJECTED, errors.LIMIT_EXCEEDED,
                                           when=now))
            else:
                room -= 1
                fresh.add(text)
                accepted.append(topic)
                records.append(conn.record(SUBSCRIBE, text, ACCEPTED, when=now))
        started = time.perf_counter()

        def committed(error: Exception | None) -> None:
            try:
                finished = self._committed(conn, msg, accepted, rejected, fresh, started, error)
            except BaseException:
                done()
                raise
            if finished is None:
                done()
            else:
                self.spawn_then(finished, done)

        self.audit.submit_subscribes(records, committed)

    def _committed(self, conn: Connection, msg: protocol.ClientMessage,
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
        self.observer.audit_waited(time.perf_counter() - started)
        flooding = False
        if rejected:
            self.observer.rejected(rejected)
            flooding = self.limits.too_many_refused(conn, self.limits.refused_topics(rejected))
        new_topics = [t for t in accepted if t.text in fresh]
        ahead = {t.scope_key for t in new_topics} - self.scopes.keys()
        if ahead or conn.closed or msg.since is not None:
            finish = self._wait(conn, msg, accepted, rejected, new_topics, ahead)
            return self._close_after(conn, finish) if flooding else finish
        for topic in new_topics:
            self.add(conn, topic)
        # Nothing between indexing and the reply: no event can overtake the reply.
        conn.transport.send_text(protocol.reply(msg, [t.text for t in accepted], rejected))
        if flooding:
            self.close_flooding(conn)
        return None

    async def _close_after(self, conn: Connection, finish: Awaitable[None]) -> None:
        """Await the rest of a subscribe (its reply), then close the flooding connection."""
        try:
            await finish
        finally:
            self.close_flooding(conn)

    async def _wait(self, conn: Connection, msg: protocol.ClientMessage,
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
            for key in ahead - self.scopes.keys():
                self.broker.unwatch(key)
            ends = [conn.record(UNSUBSCRIBE, t.text, ACCEPTED, conn.end_reason)
                    for t in new_topics]
            if ends:
                await self.audit.write_ends(ends)
            return
        if msg.since is not None:
            assert self.resume is not None
            held = list(conn.subscriptions.values())
            await self.resume(conn, msg, accepted, rejected, new_topics, held, msg.since)
            return
        for topic in new_topics:
            self.add(conn, topic)
        # No await between indexing and the reply: no event can overtake the reply.
        conn.transport.send_text(protocol.reply(msg, [t.text for t in accepted], rejected))

    # -- unsubscribe -----------------------------------------------------------

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
                records.append(conn.record(UNSUBSCRIBE, text, REJECTED, code))
                continue
            decision = self.decide(conn.principal, topic, UNSUBSCRIBE)
            if not decision.allowed:
                rejected.append(protocol.rejection(text, decision.code, decision.message))
                records.append(conn.record(UNSUBSCRIBE, text, REJECTED, decision.code))
                continue
            self.remove(conn, topic)
            removed.append(text)
            records.append(conn.record(UNSUBSCRIBE, text, ACCEPTED, errors.END_CLIENT))
        await self.audit.write_ends(records)
        if not conn.closed:
            conn.transport.send_text(protocol.reply(msg, removed, rejected))
            if self.limits.too_many_refused(conn, self.limits.refused_topics(rejected)):
                self.close_flooding(conn)

    def end_all(self, conn: Connection) -> list[AuditRecord]:
        """Drop every subscription of a closed connection; their end rows (reason
        ``conn.end_reason``), for the caller to write."""
        records = []
        for topic in list(conn.subscriptions.values()):
            self.remove(conn, topic)
            records.append(conn.record(UNSUBSCRIBE, topic.text, ACCEPTED, conn.end_reason))
        return records

    # -- index and scopes ------------------------------------------------------

    def add(self, conn: Connection, topic: Topic) -> None:
        """Index one accepted subscription; the broker listens to a scope from its first."""
        conn.subscriptions[topic.text] = topic
        self.index.add(topic.segments, conn)
        key = topic.scope_key
        count = self.scopes.get(key, 0)
        self.scopes[key] = count + 1
        if count == 0:
            self.broker.watch(key)

    def remove(self, conn: Connection, topic: Topic) -> None:
        """Drop one subscription; the broker stops listening to a scope after its last."""
        del conn.subscriptions[topic.text]
        self.index.remove(topic.segments, conn)
        key = topic.scope_key
        count = self.scopes[key] - 1
        if count:
            self.scopes[key] = count
        else:
            del self.scopes[key]
            self.broker.unwatch(key)
