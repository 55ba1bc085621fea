"""Events posted by backends (SPEC §3): validation and the topics they are routed by."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
        for scope in ("customer_id", "agent_id"):
            scope_id = ids[scope]
            if scope_id:
                text = f"{scope}:{scope_id}:{resource}"
                texts.append(("resource" if resource_id is None else "resource_id",
                              text if resource_id is None else f"{text}:{resource_id}"))
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
    event_id = ids["event_id"] or str(uuid.uuid4())
    return Event(etype, data_json, tuple(topics), event_id, published_at)


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
