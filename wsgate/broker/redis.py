"""The cluster broker: events cross nodes through Redis pub/sub; resume history
lives in Redis streams.

Keys (``<p>`` is the key prefix: ``wsgate:``, or the URL's ``?prefix=``):

- ``<p>scope:<scope key>``: the pub/sub channel of one scope (``customer_id:<id>``
  or ``agent_id:<id>``). A node subscribes it while it has a local subscriber
  in that scope, so a node receives only the traffic its clients want.
- ``<p>history:<scope key>``: a stream of the scope's recent events, for
  ``subscribe`` with ``since``.

A message, and the ``e`` field of a stream entry, is
``<publish id> <event id>\\n<JSON of Event.to_wire()>``.

Order and exactly once. One publish call is one MULTI/EXEC transaction that,
event by event in the order given, XADDs the event to the stream of each of
its scopes and PUBLISHes it to the channel of each of its scopes. Redis runs
the transaction as a unit and sends messages to a subscriber in the order it
executed the PUBLISHes; each node reads all its channels on one connection.
So every node sees the events of a publish in the order given, with no
other publish interleaved, and the history streams hold them in the same
order. An event with several scopes arrives once per watched scope, the
copies back to back; the node drops every copy after the first by its
``<publish id> <event id>`` header (a window of the last
:data:`DEDUPE_WINDOW` headers, which also drops the repeat of a publish
that was retried after its connection broke). Messages that arrive together
are handed to the gateway in one ``deliver`` call, on the event loop thread.

Faults. The subscriber connection is kept by a supervisor task: when it
breaks (Redis restarted, ``CLIENT KILL``, no answer to the keep-alive PING),
the node logs once, reconnects with capped exponential backoff and
subscribes every watched channel again. Events published while a node was
cut off are not delivered to it (best effort, SPEC §1); clients that resume
with ``since`` get them from the streams. ``publish`` never waits longer
than :data:`PUBLISH_TIMEOUT`; on failure it raises BrokerUnavailable (ingest
answers 503) and counts the events in :attr:`RedisBroker.publish_failures`.

Connections. Both are redis-py's (connect, TLS, AUTH, database and options
from the URL): a pooled client publishes and reads history; a PubSub on a
client of its own receives, its replies parsed by hiredis (a dependency for
this). It replaced a RESP reader of wsgate's own after
``python -m bench.redis_pubsub_bench`` (docs/performance.md, "Redis pub/sub
receive"): per message received and decoded, that reader saved ~8 of ~98 us
at 1,000 messages/s and 0.2-1.6 of ~14 us in bursts, within the noise and
under 1% of a node's work per event, not enough to keep a third protocol
implementation. Without hiredis, redis-py's parser costs about 2x.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import groupby
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from wsgate.broker import BrokerUnavailable, Deliver
from wsgate.config import HistoryConfig
from wsgate.events import Event

log = logging.getLogger("wsgate.broker.redis")

DEFAULT_PREFIX = "wsgate:"
#: Seconds to open a connection, and to wait for the answer to one command.
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 2.0
#: Longest a publish may take, its one retry included, before ingest answers 503.
PUBLISH_TIMEOUT = 5.0
#: Reconnect delays: doubled after each failed attempt, from the first to the cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 5.0
#: Seconds between PINGs on the subscriber connection; three silent intervals
#: mean the connection is dead even if TCP has not noticed.
KEEPALIVE_INTERVAL = 5.0
#: Publish headers remembered to drop repeated copies of an event.
DEDUPE_WINDOW = 4096
#: After a failed publish, further publishes fail at once for this long instead
#: of each waiting for a timeout against a Redis that is known to be gone.
FAIL_FAST = 0.5
#: Scopes whose stream length history_size() remembers.
HISTORY_COUNT_SCOPES = 4096
#: Channels per SUBSCRIBE command when subscribing everything again.
SUBSCRIBE_CHUNK = 1000


def split_url(url: str) -> tuple[str, str]:
    """Split ``[broker] url`` into the URL for redis-py and the key prefix.

    ``?prefix=`` is wsgate's own query parameter (redis-py would refuse it);
    every other part of the URL is left to redis-py (``redis://``,
    ``rediss://``, ``unix://``, user, password, database number).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def _safe(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    where = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{where}{parts.path}"


def encode_message(publish_id: str, event: Event) -> bytes:
    """The message (and stream entry) of one event of one publish."""
    return (f"{publish_id} {event.event_id}\n"
            + json.dumps(event.to_wire(), separators=(",", ":"))).encode()


def _decode(payload: bytes) -> Event:
    return Event.from_wire(json.loads(payload.partition(b"\n")[2]))


class RedisBroker:
    """Broker for a cluster of nodes sharing one Redis (``redis://...``).

    Args:
        url: the Redis URL; ``?prefix=`` sets the key prefix, so several
            clusters (or test runs) can share one Redis database.
        history: size and age of the per-scope resume history; size 0
            disables it (nothing is written to streams).
        keepalive: seconds between keep-alive PINGs on the subscriber connection.

    Attributes:
        publish_failures: events that could not be published since start (for /metrics).
        connect_failures: subscriber connections lost or not made since start.
        prefix: the key prefix.
        name: the client name of this broker's connections (``<name>:pub``,
            ``<name>:sub`` in ``CLIENT LIST``).
    """

    def __init__(self, url: str, history: HistoryConfig, *,
                 keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self._url, self.prefix = split_url(url)
        self.name = f"{self.prefix}{uuid.uuid4().hex[:8]}"
        self._size = history.size
        self._ttl = history.ttl
        self._keepalive = keepalive
        self._deliver: Deliver | None = None
        self._client: aioredis.Redis | None = None
        #: SUBSCRIBE and UNSUBSCRIBE for the current subscriber connection to send.
        self._commands: asyncio.Queue[tuple[str, str]] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        #: Scope keys with a local subscriber (what watch/unwatch asked for).
        self._watched: set[str] = set()
        #: Channels Redis has confirmed on the current subscriber connection.
        self._confirmed: set[bytes] = set()
        #: Set (and replaced) whenever Redis confirms a subscription.
        self._confirmation = asyncio.Event()
        self._last_read = 0.0
        self._recent: deque[bytes] = deque()
        self._recent_set: set[bytes] = set()
        self._inbox: list[Event] = []
        self._flush_handle: asyncio.Handle | None = None
        self._sub_up = False
        self._publish_ok = True
        self._last_failure = -math.inf
        self._down_since: float | None = None
        self._closing = False
        self._history_counts: dict[str, int] = {}
        self.publish_failures = 0
        self.connect_failures = 0

    # -- keys ---------------------------------------------------------------

    def channel(self, scope_key: str) -> str:
        """The pub/sub channel of scope_key."""
        return f"{self.prefix}scope:{scope_key}"

    def history_key(self, scope_key: str) -> str:
        """The stream holding scope_key's history."""
        return f"{self.prefix}history:{scope_key}"

    # -- life cycle ---------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Connect and subscribe; returns after the first attempt, even a failed
        one (the node then starts not ready and keeps trying in the background)."""
        self._deliver = deliver
        self._client = aioredis.Redis.from_url(
            self._url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
            # One immediate retry on a fresh connection: a pooled connection may
            # have been closed by Redis since its last use.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name=f"{self.name}:pub")
        self._supervisor = asyncio.create_task(self._supervise())
        await self._first_attempt.wait()

    async def close(self) -> None:
        """Stop receiving, cancel the background tasks, close every connection."""
        self._closing = True
        self._deliver = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._sub_up = False

    def failure_counts(self) -> Mapping[str, int]:
        return {"publish_failures": self.publish_failures,
                "connect_failures": self.connect_failures}

    def healthy(self) -> bool:
        """True while the subscriber connection is up and the last publish (or
        probe) succeeded."""
        return self._sub_up and self._publish_ok and not self._closing

    def subscribed(self, scope_key: str) -> bool:
        """True once Redis has confirmed this node's subscription to scope_key."""
        return self.channel(scope_key).encode() in self._confirmed

    async def ready(self, scope_keys: Iterable[str], timeout: float = 1.0) -> bool:
        """Wait until Redis confirmed this node's subscription to every watched
        scope in scope_keys, at most timeout seconds; True when it did.

        After ``watch()``, events published by other nodes reach this node
        only once Redis confirmed the subscription. A caller that must not
        miss any (e.g. before replying ``subscribed``) awaits this.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(self.subscribed(k) for k in scope_keys if k in self._watched):
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmation.wait(), left)
        return True

    # -- publishing ----------------------------------------------------------

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events to every node watching their scopes, and to history,
        in one transaction.

        Raises:
            BrokerUnavailable: Redis did not take the transaction (nothing, or
                in the rare case of a connection lost during EXEC, everything,
                was published; never a part).
        """
        if self._client is None:
            raise RuntimeError("broker not started")
        if not events:
            return
        loop = asyncio.get_running_loop()
        if not self._publish_ok and loop.time() - self._last_failure < FAIL_FAST:
            self.publish_failures += len(events)
            raise BrokerUnavailable("Redis is unreachable")
        try:
            counts = await asyncio.wait_for(self._transaction(events), PUBLISH_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            self.publish_failures += len(events)
            self._last_failure = loop.time()
            self._publish_ok = False
            self._update_health(f"publish failed: {exc or type(exc).__name__}")
            raise BrokerUnavailable("Redis is unreachable") from None
        if not self._publish_ok:
            self._publish_ok = True
            self._update_health()
        for scope, count in counts:
            self._history_counts.pop(scope, None)
            self._history_counts[scope] = count
        while len(self._history_counts) > HISTORY_COUNT_SCOPES:
            del self._history_counts[next(iter(self._history_counts))]

    async def _transaction(self, events: Sequence[Event]) -> list[tuple[str, int]]:
        """MULTI, per event and scope XADD + PUBLISH, trims, EXEC. Returns the
        stream lengths of the scopes written."""
        assert self._client is not None
        publish_id = uuid.uuid4().hex[:16]
        scopes: dict[str, None] = {}
        async with self._client.pipeline(transaction=True) as pipe:
            for event in events:
                payload = encode_message(publish_id, event)
                for scope in dict.fromkeys(t.scope_key for t in event.topics):
                    scopes[scope] = None
                    if self._size:
                        # Exact MAXLEN: streams are small (size ~100), and an
                        # approximate trim would keep up to a whole macro node more.
                        pipe.xadd(self.history_key(scope), {"e": payload},
                                  maxlen=self._size, approximate=False)
                    pipe.publish(self.channel(scope), payload)
            if not self._size:
                await pipe.execute()
                return []
            # Age limit: drop entries older than ttl (stream ids are Redis
            # milliseconds; this uses the node's clock, so keep clocks in NTP
            # sync), and let a scope with no new events vanish after ttl.
            min_id = max(0, int(time.time() * 1000 - self._ttl * 1000))
            for scope in scopes:
                key = self.history_key(scope)
                pipe.xtrim(key, minid=min_id, approximate=False)
                pipe.expire(key, math.ceil(self._ttl) + 1)
                pipe.xlen(key)
            results = await pipe.execute()
        lengths = results[-3 * len(scopes) + 2::3]
        return list(zip(scopes, (int(n) for n in lengths), strict=True))

    # -- history -------------------------------------------------------------

    async def history_since(self, scope_key: str, event_id: str, *,
                            with_since: bool = False) -> list[Event] | None:
        """Events of scope_key after event_id, oldest first (XRANGE of its stream).

        Returns None when history is off, the id is not in the stream (never
        published in this scope, trimmed by size, or older than ttl by Redis's
        clock), or Redis cannot be read now.
        """
        if not self._size or self._client is None:
            return None
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.xrange(self.history_key(scope_key))
                (seconds, micros), entries = await asyncio.wait_for(pipe.execute(),
                                                                    PUBLISH_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("history of %s not readable: %s", scope_key, exc)
            return None
        horizon = seconds * 1000 + micros // 1000 - self._ttl * 1000
        kept = [fields[b"e"] for entry_id, fields in entries
                if int(entry_id.split(b"-", 1)[0]) >= horizon]
        wanted = event_id.encode()
        for position in range(len(kept) - 1, -1, -1):
            header = kept[position].partition(b"\n")[0]
            if header.partition(b" ")[2] == wanted:
                start = position if with_since else position + 1
                return [_decode(payload) for payload in kept[start:]]
        return None

    def history_size(self) -> int:
        """Entries in the history streams of the scopes this node published to
        (the last 4096), as counted at its last publish to each. Streams only
        other nodes write to are not counted; an event in two scopes counts twice."""
        return sum(self._history_counts.values())

    # -- interest ------------------------------------------------------------

    def watch(self, scope_key: str) -> None:
        """Subscribe the scope's channel (the gateway calls this on its first local subscriber).

        The SUBSCRIBE is sent at once in the background; :meth:`subscribed`
        tells when Redis confirmed it.
        """
        if scope_key not in self._watched:
            self._watched.add(scope_key)
            self._send("SUBSCRIBE", self.channel(scope_key))

    def unwatch(self, scope_key: str) -> None:
        """Unsubscribe the scope's channel (its last local subscriber left)."""
        if scope_key in self._watched:
            self._watched.discard(scope_key)
            self._send("UNSUBSCRIBE", self.channel(scope_key))

    def _send(self, command: str, channel: str) -> None:
        # Queued for the current connection's writer, which sends it at once (in
        # order, consecutive ones in one command). While disconnected nothing is
        # queued: the next connection subscribes to everything in _watched.
        if self._commands is not None:
            self._commands.put_nowait((command, channel))

    # -- the subscriber connection ---------------------------------------------

    async def _supervise(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: reconnect
                while isinstance(exc, ExceptionGroup):
                    exc = exc.exceptions[0]
                reason = str(exc) or type(exc).__name__
            else:  # pragma: no cover - a session only ends by an exception
                reason = "subscriber stopped"
            if self._sub_up:
                delay = BACKOFF_FIRST
            self.connect_failures += 1
            self._sub_up = False
            self._confirmed.clear()
            self._update_health(reason)
            self._first_attempt.set()
            log.debug("Redis subscriber reconnect in %.2f s (%s)", delay, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)

    async def _session(self) -> None:
        """One subscriber connection: subscribe everything watched, then read
        messages until the connection fails.

        The connection is redis-py's PubSub on a client of its own (its name
        ``<name>:sub``; TLS, AUTH and database from the URL, as for publishing).
        redis-py neither retries nor reconnects it: the supervisor does, with
        its backoff, counting and logging. No read timeout: a dead connection
        is found by the keep-alive PING (and TCP keep-alive).
        """
        client = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=None,
            socket_keepalive=True, retry=Retry(NoBackoff(), 0, supported_errors=()),
            client_name=f"{self.name}:sub")
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(pubsub.connect(), CONNECT_TIMEOUT + COMMAND_TIMEOUT)
            # From here watch() queues, so nothing asked while the channels below
            # are subscribed is lost (a repeated SUBSCRIBE is harmless).
            commands = self._commands = asyncio.Queue()
            channels = [self.channel(s) for s in self._watched]
            for i in range(0, len(channels), SUBSCRIBE_CHUNK):
                await asyncio.wait_for(pubsub.subscribe(*channels[i:i + SUBSCRIBE_CHUNK]),
                                       COMMAND_TIMEOUT)
            self._last_read = asyncio.get_running_loop().time()
            self._sub_up = True
            self._update_health()
            self._first_attempt.set()
            # The first of these to fail ends the session (and cancels the others).
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read_loop(pubsub))
                tasks.create_task(self._write_loop(pubsub, commands))
                tasks.create_task(self._keepalive_loop(pubsub))
        finally:
            self._commands = None
            if pubsub.connection is not None:
                # Waited for (aclose does not wait), so that no TLS transport is
                # still closing when the broker's close() returns.
                with contextlib.suppress(Exception):
                    await pubsub.connection.disconnect()
            await pubsub.aclose()
            await client.aclose()

    async def _read_loop(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A message's payload is taken from the reply as parsed, without
            # get_message's message dict (1-1.5 us a message in
            # bench.redis_pubsub_bench); every other reply (to SUBSCRIBE,
            # UNSUBSCRIBE, PING) goes through redis-py's handle_message, which
            # keeps its own bookkeeping.
            reply = await pubsub.parse_response(block=True)
            self._last_read = loop.time()
            if isinstance(reply, list) and reply[0] == b"message":
                self._received(reply[2])
                continue
            message = await pubsub.handle_message(reply)
            if message is None:
                continue
            kind = message["type"]
            if kind == "subscribe":
                self._confirmed.add(message["channel"])
                self._confirmation.set()
                self._confirmation = asyncio.Event()
            elif kind == "unsubscribe":
                self._confirmed.discard(message["channel"])

    async def _write_loop(self, pubsub: PubSub, commands: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            queued = [await commands.get()]
            while not commands.empty():
                queued.append(commands.get_nowait())
            for command, group in groupby(queued, key=lambda c: c[0]):
                send = pubsub.subscribe if command == "SUBSCRIBE" else pubsub.unsubscribe
                channels = [channel for _, channel in group]
                for i in range(0, len(channels), SUBSCRIBE_CHUNK):
                    await asyncio.wait_for(send(*channels[i:i + SUBSCRIBE_CHUNK]),
                                           COMMAND_TIMEOUT)

    async def _keepalive_loop(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._publish_ok:
                await self._probe()
            await asyncio.sleep(self._keepalive if self._publish_ok else FAIL_FAST)
            if loop.time() - self._last_read > 3 * self._keepalive:
                raise RedisConnectionError("no answer to the keep-alive PING")
            await asyncio.wait_for(pubsub.ping(), COMMAND_TIMEOUT)

    async def _probe(self) -> None:
        """Clear a publish failure once Redis answers again (ingest being refused
        while not ready, no publish would ever clear it)."""
        assert self._client is not None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._client.ping(), COMMAND_TIMEOUT)
            self._publish_ok = True
            self._update_health()

    # -- delivery --------------------------------------------------------------

    def _received(self, payload: bytes) -> None:
        header = payload.partition(b"\n")[0]
        if header in self._recent_set:
            return
        self._recent.append(header)
        self._recent_set.add(header)
        if len(self._recent) > DEDUPE_WINDOW:
            self._recent_set.discard(self._recent.popleft())
        try:
            event = _decode(payload)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("dropped a malformed message on a %s channel: %r",
                        self.prefix, payload[:200])
            return
        self._inbox.append(event)
        if self._flush_handle is None:
            # Messages read in one go are delivered in one call, after the read.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        events, self._inbox = self._inbox, []
        if self._deliver is not None and events:
            self._deliver(events)

    # -- health -------------------------------------------------------------------

    def _update_health(self, reason: str = "") -> None:
        """Log the transitions between reachable and not, once each."""
        if self._closing:
            return
        now = time.monotonic()
        if not (self._sub_up and self._publish_ok):
            if self._down_since is None:
                self._down_since = now
                log.warning("Redis at %s unreachable (%s): ingest answers 503 and /readyz "
                            "is not ready until it is back; reconnecting",
                            _safe(self._url), reason)
        elif self._down_since is not None:
            log.warning("Redis at %s reachable again after %.1f s", _safe(self._url),
                        now - self._down_since)
            self._down_since = None
