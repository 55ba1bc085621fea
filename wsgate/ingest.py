"""What an ingest request means (SPEC §3), for both HTTP adapters.

Authentication is either ``Authorization: Bearer <ingest key>`` or an HMAC
signature::

    X-Wsgate-Timestamp: <unix seconds>
    X-Wsgate-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>

A signed request must be within ``[ingest] signature_window`` seconds of the
server clock and is accepted once (a replay gets 409). An ``Idempotency-Key``
header makes a retried POST publish once: the retry gets the first answer, and
the same key with another body gets 422 ``idempotency_key_reused``. What is
remembered is bounded in bytes and shared out per ingest key
(:class:`IdempotencyStore`).

:class:`IngestService` knows no HTTP server: Tornado's
:class:`wsgate.adapters.ingest.IngestHandler` and the keep-alive fast path in
:mod:`wsgate.adapters.fast_ingest` both call it, so both give the same answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wsgate import errors
from wsgate.broker import BrokerUnavailable
from wsgate.config import IngestConfig
from wsgate.errors import HTTPFailure
from wsgate.events import (
    Event,
    InvalidEvents,
    NotFast,
    Source,
    decode_json,
    parse_body,
    validate_body,
    validate_events,
)
from wsgate.gateway import Gateway

MAX_IDEMPOTENCY_KEY = 200
#: The most digits a ``Content-Length`` or ``X-Wsgate-Timestamp`` may have (h11's
#: limit for a length): more than any body or clock needs, and far below the
#: 4,300 digits past which ``int()`` raises.
MAX_DIGITS = 20


def decimal(text: str) -> int | None:
    """``text`` as an integer when it is 1 to :data:`MAX_DIGITS` ASCII digits, else None.

    ``str.isdigit()`` alone also takes ``"²"`` and other Unicode digits, which
    ``int()`` refuses or reads as another number.
    """
    if 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def key_id(secret: str, kind: str) -> str:
    """A stable, non-secret name for an ingest key: its kind and a hash prefix."""
    return f"{kind}:{hashlib.sha256(secret.encode()).hexdigest()[:12]}"


#: Request headers looked up by lower-case name (Tornado's ``HTTPHeaders``
#: ignores the case; the fast path's dict holds lower-case names).
Headers = Mapping[str, str]


class ExpiringSet:
    """Bounded memory of recent keys with an age limit (replays, idempotency)."""

    def __init__(self, ttl: float, max_items: int = 100_000) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def _expire(self, now: float) -> None:
        items = self._items
        while items:
            key, (born, _) = next(iter(items.items()))
            if now - born < self.ttl and len(items) <= self.max_items:
                break
            items.popitem(last=False)

    def get(self, key: str) -> Any:
        self._expire(time.monotonic())
        entry = self._items.get(key)
        return None if entry is None else entry[1]

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def put(self, key: str, value: Any) -> None:
        self._items[key] = (time.monotonic(), value)
        self._expire(time.monotonic())


#: Seconds an answer is remembered for its ``Idempotency-Key``.
IDEMPOTENCY_TTL = 24 * 3600.0
#: Bytes an entry costs beyond its key, digest and answer: its slot in the
#: per-key OrderedDict (a linked node and a hash-table slot), the
#: :class:`_Remembered` record and its float. Measured with tracemalloc
#: (tests/test_idempotency.py checks the accounting is not below the real cost).
ENTRY_OVERHEAD = 240
#: The cost of an answer not known yet (an asyncio.Future and its bookkeeping).
PENDING_OVERHEAD = 400


@dataclass(slots=True)
class _Remembered:
    born: float
    #: SHA-256 of the request body, to tell a retry from a reuse of the key.
    digest: bytes
    #: The answer as compact JSON (far smaller than the dict and its id strings),
    #: or the Future of a request being published now.
    answer: bytes | asyncio.Future[bytes | None]
    size: int


class IdempotencyStore:
    """Answers by ``(ingest key id, Idempotency-Key)``, bounded in bytes per ingest key.

    Each ingest key id (every Bearer key and HMAC secret configured) has its
    own share, ``max_bytes // len(key_ids)``, and its own oldest-first
    eviction: one backend flooding new keys evicts only its own entries, never
    another's. An entry costs its real size: the Idempotency-Key, the body's
    SHA-256, the answer as JSON bytes and :data:`ENTRY_OVERHEAD`; the bytes
    accounted for a key never pass its share, so the whole store never passes
    ``max_bytes``. Entries older than ``ttl`` are dropped. An answer bigger
    than a whole share is not remembered (the config keeps shares at least
    :data:`wsgate.config.MIN_IDEMPOTENCY_SHARE`, larger than a full batch's answer).
    """

    def __init__(self, max_bytes: int, key_ids: Iterable[str],
                 ttl: float = IDEMPOTENCY_TTL) -> None:
        ids = sorted(set(key_ids))
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.share = max_bytes // max(1, len(ids))
        self._entries: dict[str, OrderedDict[str, _Remembered]] = {k: OrderedDict() for k in ids}
        self._used: dict[str, int] = dict.fromkeys(ids, 0)

    def used(self, kid: str | None = None) -> int:
        """Bytes accounted for one key id, or for all of them."""
        if kid is None:
            return sum(self._used.values())
        return self._used.get(kid, 0)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    def get(self, kid: str, idem: str) -> _Remembered | None:
        entries = self._entries.get(kid)
        if entries is None:
            return None
        self._expire(kid, time.monotonic())
        return entries.get(idem)

    def put(self, kid: str, idem: str, digest: bytes,
            answer: bytes | asyncio.Future[bytes | None]) -> bool:
        """Remember an answer (or the Future of one); False when it cannot fit at all."""
        entries = self._entries.get(kid)
        if entries is None:  # not a configured key: nothing of anyone's to share
            return False
        self.discard(kid, idem)
        cost = (sys.getsizeof(idem) + sys.getsizeof(digest) + ENTRY_OVERHEAD
                + (sys.getsizeof(answer) if isinstance(answer, bytes) else PENDING_OVERHEAD))
        if cost > self.share:
            return False
        self._expire(kid, time.monotonic())
        while entries and self._used[kid] + cost > self.share:
            _, oldest = entries.popitem(last=False)
            self._used[kid] -= oldest.size
        entries[idem] = _Remembered(time.monotonic(), digest, answer, cost)
        self._used[kid] += cost
        return True

    def discard(self, kid: str, idem: str) -> None:
        entries = self._entries.get(kid)
        old = None if entries is None else entries.pop(idem, None)
        if old is not None:
            self._used[kid] -= old.size

    def _expire(self, kid: str, now: float) -> None:
        entries = self._entries[kid]
        while entries:
            first = next(iter(entries.values()))
            if now - first.born < self.ttl:
                break
            entries.popitem(last=False)
            self._used[kid] -= first.size


class IngestService:
    """What an ingest request does, whichever HTTP layer read it (one per gateway).

    It also remembers what must outlive a request: signatures seen (replays)
    and answers by ``Idempotency-Key``.
    """

    def __init__(self, gateway: Gateway, config: IngestConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.limit = config.max_body_bytes
        self.bearer = [(k.encode(), key_id(k, "key")) for k in config.keys]
        self.hmac = [(k.encode(), key_id(k, "hmac")) for k in config.hmac_secrets]
        #: The customers each key id may post for (None: all customers).
        self.scopes: dict[str, frozenset[str] | None] = {
            **{key_id(k, "key"): getattr(k, "customers", None) for k in config.keys},
            **{key_id(k, "hmac"): getattr(k, "customers", None) for k in config.hmac_secrets}}
        self.seen_signatures = ExpiringSet(2 * config.signature_window)
        self.idempotent = IdempotencyStore(
            config.idempotency_max_bytes, [kid for _, kid in (*self.bearer, *self.hmac)])

    def key_scope(self, kid: str | None) -> str | None:
        """A key id's scope for the access log: its customer ids, ``all``, or None (no key)."""
        if kid is None or kid not in self.scopes:
            return None
        customers = self.scopes[kid]
        return "all" if customers is None else ",".join(sorted(customers))

    def follow_config(self) -> None:
        """Take the gateway's current ``[ingest]`` table if a reload (SIGHUP)
        changed it. Signatures seen stay replays; remembered answers are kept
        while the key ids and ``idempotency_max_bytes`` stay the same."""
        current = self.gateway.config.ingest
        if current is self.config:
            return
        seen, idempotent = self.seen_signatures, self.idempotent
        old_ids = sorted(kid for _, kid in (*self.bearer, *self.hmac))
        old_max = self.config.idempotency_max_bytes
        self.__init__(self.gateway, current)  # type: ignore[misc]
        self.seen_signatures = seen
        if old_ids == sorted(kid for _, kid in (*self.bearer, *self.hmac)) \
                and old_max == current.idempotency_max_bytes:
            self.idempotent = idempotent

    def precheck(self, headers: Headers) -> tuple[HTTPFailure | None, str | None]:
        """The checks made from the headers alone, before the body is read.

        Returns a failure to answer with (or None), and the Bearer key's id
        when the request carries a valid one (None for a signed request).
        """
        self.follow_config()
        ctype = headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            return HTTPFailure(415, errors.UNSUPPORTED_MEDIA_TYPE,
                               "send the events as Content-Type: application/json"), None
        length = headers.get("content-length", "")
        # Any other malformed length is the HTTP layer's to refuse (400).
        if length.isascii() and length.isdigit():
            size = decimal(length)
            if size is None:
                return HTTPFailure(400, errors.BAD_REQUEST,
                                   f"Content-Length has {len(length)} digits; at most "
                                   f"{MAX_DIGITS} are accepted"), None
            if size > self.limit:
                return HTTPFailure(413, errors.PAYLOAD_TOO_LARGE,
                                   f"the body is {size} bytes; at most {self.limit} "
                                   "are accepted"), None
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return HTTPFailure(401, errors.UNAUTHENTICATED,
                                   "the Authorization header must be 'Bearer <ingest key>'"), None
            given = value.strip().encode()
            found = None
            for secret, kid in self.bearer:
                if hmac.compare_digest(given, secret):
                    found = kid
            if found is None:
                return HTTPFailure(401, errors.UNAUTHENTICATED, "the ingest key is not valid"), None
            return None, found
        if headers.get("x-wsgate-signature") is None:
            return HTTPFailure(
                401, errors.UNAUTHENTICATED,
                "no credentials: send 'Authorization: Bearer <ingest key>' or an "
                "X-Wsgate-Timestamp and X-Wsgate-Signature header"), None
        return None, None

    async def complete(self, headers: Headers, body: bytes,
                       kid: str | None) -> tuple[dict[str, Any], str, int]:
        """Check a signature (when ``kid`` is None), then publish the body.

        Returns the 202 answer, the key id and the number of events published
        by this request (0 for an idempotent retry).

        Raises:
            HTTPFailure: the answer to give instead; nothing was published.
        """
        self.follow_config()
        if kid is None:
            kid = self._check_signature(headers, body)
        try:
            return await self._publish_once(headers, body, kid)
        except HTTPFailure as failure:
            failure.key_id = kid
            raise

    async def _publish_once(self, headers: Headers, body: bytes,
                            kid: str) -> tuple[dict[str, Any], str, int]:
        """Publish, or give the earlier answer for a repeated ``Idempotency-Key``."""
        idem = headers.get("idempotency-key")
        if idem is None:
            answer = await self._validate_and_publish(body, kid)
            return answer, kid, answer["accepted"]
        if not idem or len(idem) > MAX_IDEMPOTENCY_KEY:
            raise HTTPFailure(400, errors.BAD_REQUEST,
                              f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        digest = hashlib.sha256(body).digest()
        while True:
            earlier = self.idempotent.get(kid, idem)
            if earlier is None:
                break
            if earlier.digest != digest:
                raise HTTPFailure(422, errors.IDEMPOTENCY_KEY_REUSED,
                                  "this Idempotency-Key was sent before with another body; "
                                  "nothing was published (use a new key for new events)")
            if isinstance(earlier.answer, bytes):
                return json.loads(earlier.answer), kid, 0
            # The same request is being published right now (a concurrent retry):
            # wait for its answer instead of publishing twice.
            done = await asyncio.shield(earlier.answer)
            if done is not None:
                return json.loads(done), kid, 0
        marker: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.idempotent.put(kid, idem, digest, marker)
        try:
            answer = await self._validate_and_publish(body, kid)
        except BaseException:
            self.idempotent.discard(kid, idem)
            marker.set_result(None)
            raise
        encoded = json.dumps(answer, separators=(",", ":")).encode()
        if not self.idempotent.put(kid, idem, digest, encoded):
            self.idempotent.discard(kid, idem)
        marker.set_result(encoded)
        return answer, kid, answer["accepted"]

    def _check_signature(self, headers: Headers, body: bytes) -> str:
        stamp = headers.get("x-wsgate-timestamp", "")
        signature = headers.get("x-wsgate-signature", "")
        seconds = decimal(stamp)
        if seconds is None or not signature.startswith("v1="):
            raise HTTPFailure(401, errors.UNAUTHENTICATED,
                              "X-Wsgate-Timestamp must be unix seconds and X-Wsgate-Signature "
                              "'v1=<hex HMAC-SHA256>'")
        window = self.config.signature_window
        if abs(time.time() - seconds) > window:
            raise HTTPFailure(401, errors.UNAUTHENTICATED,
                              f"the signature timestamp is more than {window} s from the "
                              "server's clock")
        given = signature[3:].strip(" \t").lower().encode()
        message = stamp.encode() + b"." + body
        found = None
        canonical = b""
        for secret, kid in self.hmac:
            expected = hmac.new(secret, message, hashlib.sha256).hexdigest().encode()
            if hmac.compare_digest(given, expected):
                found, canonical = kid, expected
        if found is None:
            raise HTTPFailure(401, errors.UNAUTHENTICATED, "the signature does not match")
        # Remembered as the digest it matched, not as sent: every spelling that
        # verifies (hex case, spaces after "v1=") is the same signature, so a
        # replay is caught however it is written.
        seen = canonical.decode()
        if self.seen_signatures.get(seen) is not None:
            replayed = HTTPFailure(409, errors.REPLAYED, "this signed request was already received")
            replayed.key_id = found
            raise replayed
        self.seen_signatures.put(seen, True)
        return found

    async def _validate_and_publish(self, body: bytes, kid: str) -> dict[str, Any]:
        if self.gateway.draining:
            raise HTTPFailure(503, errors.SHUTTING_DOWN, "the server is shutting down; retry")
        try:
            events, sources = validate_body(body, self.config.max_batch)
        except NotFast:
            events, sources = self._validate_slowly(body)
        customers = self.scopes.get(kid)
        if customers is not None:
            check_scope(sources, events, customers)
        hashes = [hashlib.sha256(e.data_json.encode()).hexdigest() for e in events]
        try:
            await self.gateway.publish(events, kid, hashes)
        except BrokerUnavailable as exc:
            raise HTTPFailure(503, errors.BROKER_UNAVAILABLE,
                              f"events cannot be published now ({exc}); retry") from None
        return {"accepted": len(events), "event_ids": [e.event_id for e in events]}

    def _validate_slowly(self, body: bytes) -> tuple[list[Event], list[Source]]:
        """The events of a body the fast path gave up on, or the answer that says why not.

        Raises:
            HTTPFailure: 400, 413 or 422, naming every problem found.
        """
        try:
            parsed = decode_json(body)
        except ValueError as exc:
            raise HTTPFailure(400, errors.BAD_JSON, f"the body is not valid JSON: {exc}") from None
        try:
            raw_events = parse_body(parsed, self.config.max_batch)
            events = validate_events(raw_events)
        except OverflowError as exc:
            raise HTTPFailure(413, errors.BATCH_TOO_LARGE, str(exc)) from None
        except InvalidEvents as exc:
            raise HTTPFailure(422, errors.INVALID_EVENT,
                              f"{len(exc.details)} problem(s); nothing was published",
                              details=exc.details) from None
        return events, [Source(raw.get("customer_id"), raw.get("agent_id"),
                               raw.get("topics", ())) for raw in raw_events]


def check_scope(sources: list[Source], events: list[Event], customers: frozenset[str]) -> None:
    """Hold valid events posted with a key scoped to ``customers`` to that scope (SPEC §3).

    Each event must carry a ``customer_id`` of the scope and each extra topic
    must lie under ``customer_id:<one of them>`` or be under the event's own
    ``agent_id:`` topic. Each event is then restricted to principals of its
    customer (``Event.audience``), so an ``agent_id`` topic cannot reach
    another customer's agent.

    Raises:
        HTTPFailure: 403 ``forbidden`` with details as for 422; nothing is published.
    """
    details: list[dict[str, Any]] = []
    for index, (source, event) in enumerate(zip(sources, events, strict=True)):
        customer = source.customer_id
        if customer not in customers:
            details.append({"index": index, "field": "customer_id",
                            "message": "this key may post only for its customers; give "
                                       "customer_id of one of them"})
        agent = source.agent_id
        for topic in source.topics:
            segments = topic.split(":")
            if len(segments) >= 2 and (
                    (segments[0] == "customer_id" and segments[1] in customers)
                    or (agent is not None and segments[0] == "agent_id"
                        and segments[1] == agent)):
                continue
            details.append({"index": index, "field": "topics",
                            "message": f"topic {topic[:80]!r} is outside this key's customers: "
                                       "use customer_id:<one of them>:... or the event's own "
                                       "agent_id:... topic"})
        event.audience = customer
    if details:
        raise HTTPFailure(403, errors.FORBIDDEN,
                          f"{len(details)} problem(s): this key is scoped to customers; "
                          "nothing was published", details=details)
