"""Events posted by backends (SPEC §3): validation and the topics they are routed by."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from wsgate.protocol import CONTROL_TYPES, STRICT_DECODER, dumps
from wsgate.topics import Topic, TopicError, is_uuid, parse_topic

_TYPE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+\Z", re.ASCII)
_FIELDS = ("type", "data", "customer_id", "agent_id", "resource", "resource_id", "topics",
           "event_id")
MAX_EXTRA_TOPICS = 100


@dataclass(slots=True)
class Event:
    """A valid event, ready to route.

    ``topics`` are the event's concrete topics in order (extra topics first,
    then the customer and agent topics); ``data_json`` is ``data`` encoded
    once, shared by every frame.
    """

    type: str
    data_json: str
    topics: tuple[Topic, ...]
    event_id: str
    published_at: str
    #: Per-frame strings, built on first delivery on each node.
    _frames: dict[str, str] | None = field(default=None, repr=False)
    #: The only customer whose principals (and super admins) may receive the
    #: event, or None for anyone its topics reach: set for events posted with a
    #: scoped ingest key (SPEC §3 "Scoped keys").
    audience: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The form sent between nodes and kept in history."""
        wire = {"type": self.type, "data": self.data_json, "topics": [t.text for t in self.topics],
                "event_id": self.event_id, "published_at": self.published_at}
        if self.audience is not None:
            wire["audience"] = self.audience
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Event:
        """Inverse of to_wire. The topics were validated by the publishing node.

        A message without ``audience`` (from a node before scoped keys) is unrestricted.
        """
        topics = tuple(Topic(t, tuple(t.split(":"))) for t in wire["topics"])
        return cls(wire["type"], wire["data"], topics, wire["event_id"], wire["published_at"],
                   audience=wire.get("audience"))


class InvalidEvents(Exception):
    """One or more invalid events; ``details`` lists ``{index, field, message}``."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(details)} problem(s) in the events")
        self.details = details


class _Stamp:
    """The date and time part of ``now_rfc3339``, formatted once a second."""

    second = -1
    text = ""


def now_rfc3339() -> str:
    """Current UTC time, RFC 3339 with milliseconds: 2026-11-27T20:43:45.123Z."""
    now = time.time()
    second = int(now)
    if second != _Stamp.second:
        _Stamp.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Stamp.second = second
    return f"{_Stamp.text}.{int((now - second) * 1000):03d}Z"


def parse_body(body: Any, max_batch: int) -> list[dict[str, Any]]:
    """The list of raw events in an ingest body (one event, or {"events": [...]}).

    Raises:
        InvalidEvents: the body has neither shape.
        OverflowError: more than max_batch events.
    """
    if isinstance(body, dict) and "events" in body and "type" not in body:
        events = body["events"]
        if not isinstance(events, list) or not events:
            raise InvalidEvents([{"index": None, "field": "events",
                                  "message": '"events" must be a non-empty list of event objects'}])
        if len(events) > max_batch:
            raise OverflowError(f"a batch holds at most {max_batch} events, this one {len(events)}")
        return events
    if isinstance(body, dict):
        return [body]
    raise InvalidEvents([{"index": None, "field": None,
                          "message": 'the body must be an event object or {"events": [...]}'}])


def validate_events(raw_events: list[Any]) -> list[Event]:
    """Check every event; all or nothing.

    Raises:
        InvalidEvents: with every problem found, each tagged with its index and field.
    """
    details: list[dict[str, Any]] = []
    events: list[Event] = []
    published_at = now_rfc3339()
    seen_ids: set[str] = set()
    for index, raw in enumerate(raw_events):
        problems: list[tuple[str | None, str]] = []
        event = _validate_one(raw, published_at, problems)
        if event is not None and event.event_id in seen_ids:
            problems.append(("event_id", "the same event_id appears twice in this batch"))
        for fname, message in problems:
            details.append({"index": index, "field": fname, "message": message})
        if event is not None and not problems:
            seen_ids.add(event.event_id)
            events.append(event)
    if details:
        raise InvalidEvents(details)
    return events


def _validate_one(raw: Any, published_at: str,
                  problems: list[tuple[str | None, str]]) -> Event | None:
    if not isinstance(raw, dict):
        problems.append((None, "an event must be a JSON object"))
        return None
    for key in raw:
        if key not in _FIELDS:
            problems.append((key, f"unknown field; an event has {', '.join(_FIELDS)}"))
    etype = raw.get("type")
    if not isinstance(etype, str) or not _TYPE.match(etype):
        problems.append(("type", "required; lower-case words joined by '_', like call_created"))
    elif etype in CONTROL_TYPES:
        problems.append(("type", f"{etype!r} is a control message type, not an event type"))
    data = raw.get("data")
    if not isinstance(data, dict):
        problems.append(("data", "required; a JSON object"))
    ids: dict[str, str | None] = {}
    for key in ("customer_id", "agent_id", "event_id"):
        value = raw.get(key)
        if value is not None and not is_uuid(value):
            problems.append((key, "must be a UUID in canonical lower-case form, like "
                                  "5013bc52-da9a-11ee-844f-2fa34248de28"))
            value = None
        ids[key] = value
    resource = raw.get("resource")
    if resource is None and isinstance(etype, str) and "_" in etype:
        resource = etype.rsplit("_", 1)[0]
    if resource is not None and not isinstance(resource, str):
        problems.append(("resource", "must be a string"))
        resource = None
    resource_id = raw.get("resource_id")
    if resource_id is None and isinstance(data, dict) and isinstance(data.get("id"), str):
        resource_id = data["id"]
    if resource_id is not None and not isinstance(resource_id, str):
        problems.append(("resource_id", "must be a string"))
        resource_id = None
    texts: list[tuple[str, str]] = []
    extra = raw.get("topics", [])
    if not isinstance(extra, list) or not all(isinstance(t, str) for t in extra):
        problems.append(("topics", "must be a list of topic strings"))
    elif len(extra) > MAX_EXTRA_TOPICS:
        problems.append(("topics", f"at most {MAX_EXTRA_TOPICS} topics per event"))
    else:
        texts.extend(("topics", t) for t in extra)
    if resource is not None:
        blamed = "resource" if resource_id is None else "resource_id"
        texts.extend((blamed, text) for text in own_topics(
            ids["customer_id"], ids["agent_id"], resource, resource_id))
    topics: list[Topic] = []
    seen: set[str] = set()
    for fname, text in texts:
        try:
            topic = parse_topic(text, wildcard=False)
        except TopicError as exc:
            problems.append((fname, f"topic {text[:80]!r}: {exc}"))
            continue
        if text not in seen:
            seen.add(text)
            topics.append(topic)
    if not topics and not problems:
        problems.append((None, "the event has no topic: give customer_id, agent_id or topics"))
    if problems:
        return None
    assert isinstance(etype, str)
    try:
        data_json = dumps(data)
    except ValueError as exc:  # e.g. NaN smuggled in by a lenient encoder upstream
        problems.append(("data", f"cannot be encoded: {exc}"))
        return None
    event_id = ids["event_id"] or new_event_ids(1)[0]
    return Event(etype, data_json, tuple(topics), event_id, published_at)


def own_topics(customer_id: str | None, agent_id: str | None, resource: str,
               resource_id: str | None) -> list[str]:
    """The topics an event gets from its ids (SPEC §3), unchecked: ``customer_id:<id>:
    <resource>[:<resource_id>]`` and the same under ``agent_id``, for each id given."""
    texts = []
    for scope, scope_id in (("customer_id", customer_id), ("agent_id", agent_id)):
        if scope_id:
            text = f"{scope}:{scope_id}:{resource}"
            texts.append(text if resource_id is None else f"{text}:{resource_id}")
    return texts


def decode_json(body: bytes) -> Any:
    """Decode a request body as strict JSON (no NaN/Infinity).

    Raises:
        ValueError: not UTF-8 JSON, or nested too deeply.
    """
    try:
        return STRICT_DECODER.decode(body.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None


# --- the fast path ---------------------------------------------------------------
#
# A valid ingest body is decoded and checked in C (msgspec) and ``data`` is
# never decoded: its bytes, as posted, are what every frame carries (the same
# JSON value; the frames of the slow path re-encode it). Anything the fast
# path is not sure of (an error of any kind, a number Python's json would read
# differently) makes it give up, and the caller runs the slow path above,
# which gives the same answer it always gave, errors and their details
# included. tests/test_events_fast.py checks that the two agree.


class NotFast(Exception):
    """The fast path cannot decide this body: use decode_json, parse_body, validate_events."""


class _Event(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    data: msgspec.Raw
    customer_id: str | None = None
    agent_id: str | None = None
    resource: str | None = None
    resource_id: str | None = None
    # UNSET, not None: the slow path refuses "topics": null.
    topics: list[str] | msgspec.UnsetType = msgspec.UNSET
    event_id: str | None = None


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    events: list[_Event]


_ONE = msgspec.json.Decoder(_Event)
_MANY = msgspec.json.Decoder(_Batch)
#: ``data`` is read once more, in C, for two things: its ``id`` (the default
#: resource_id), and its numbers: one Python's json would refuse (out of a
#: float's range, past Python's limit on digits) makes this refuse it too.
_DATA = msgspec.json.Decoder()


@dataclass(slots=True)
class Source:
    """What check_scope reads of a posted event: its customer, agent and extra topics."""

    customer_id: Any
    agent_id: Any
    topics: Any


def validate_body(body: bytes, max_batch: int) -> tuple[list[Event], list[Source]]:
    """Decode and check an ingest body in one pass: the events, and what check_scope reads.

    Raises:
        NotFast: anything but a valid body of at most max_batch events (nothing
            is refused here: the slow path says why).
    """
    try:
        if body[:1] == b"{" and b'"events"' in body:
            try:
                raws = _MANY.decode(body).events
            except msgspec.ValidationError:
                raws = [_ONE.decode(body)]  # "events" was inside an event
        else:
            raws = [_ONE.decode(body)]
    except (msgspec.DecodeError, RecursionError):
        raise NotFast from None
    if not raws or len(raws) > max_batch:
        raise NotFast
    published_at = now_rfc3339()
    events: list[Event] = []
    sources: list[Source] = []
    ids = new_event_ids(sum(1 for r in raws if r.event_id is None))
    seen_ids: set[str] = set()
    for raw in raws:
        try:
            event = _fast_one(raw, published_at, ids)
        except (TopicError, msgspec.DecodeError, RecursionError):
            raise NotFast from None
        if event.event_id in seen_ids:
            raise NotFast
        seen_ids.add(event.event_id)
        events.append(event)
        sources.append(Source(raw.customer_id, raw.agent_id,
                              () if raw.topics is msgspec.UNSET else raw.topics))
    return events, sources


def _fast_one(raw: _Event, published_at: str, ids: list[str]) -> Event:
    etype = raw.type
    if not _TYPE.match(etype) or etype in CONTROL_TYPES:
        raise NotFast
    data = bytes(raw.data)
    if data[:1] != b"{":
        raise NotFast
    try:
        data_json = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFast from None
    data_id = _DATA.decode(data).get("id")
    customer, agent, event_id = raw.customer_id, raw.agent_id, raw.event_id
    if ((customer is not None and not is_uuid(customer))
            or (agent is not None and not is_uuid(agent))
            or (event_id is not None and not is_uuid(event_id))):
        raise NotFast
    topics: list[Topic] = []
    seen: set[str] = set()
    extra = raw.topics
    if extra is not msgspec.UNSET:
        if len(extra) > MAX_EXTRA_TOPICS:
            raise NotFast
        for text in extra:
            if text not in seen:
                seen.add(text)
                topics.append(parse_topic(text, wildcard=False))
    if customer is not None or agent is not None:
        resource = raw.resource
        if resource is None:
            resource = etype.rsplit("_", 1)[0]
        resource_id = raw.resource_id
        if resource_id is None and type(data_id) is str:
            resource_id = data_id
        for text in own_topics(customer, agent, resource, resource_id):
            if text not in seen:
                seen.add(text)
                topics.append(parse_topic(text, wildcard=False))
    if not topics:
        raise NotFast
    return Event(etype, data_json, tuple(topics), event_id or ids.pop(), published_at)


def new_event_ids(n: int) -> list[str]:
    """n new event ids: time-ordered UUIDs (version 7, RFC 9562), from one read of
    the OS's random source.

    The first 48 bits are the Unix time in milliseconds, the other 74 free bits
    random. Ids made later sort later, so the audit log's event-id index grows
    at its end, and a commit of many events writes a few index pages, not one
    page per event (as random version 4 ids did).
    """
    if n == 0:
        return []
    stamp = f"{time.time_ns() // 1_000_000:012x}"
    stamp = f"{stamp[:8]}-{stamp[8:12]}-7"
    h = os.urandom(10 * n).hex()
    return [f"{stamp}{h[i:i + 3]}-{_VARIANT[h[i + 3]]}{h[i + 4:i + 7]}-{h[i + 7:i + 19]}"
            for i in range(0, 20 * n, 20)]


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
