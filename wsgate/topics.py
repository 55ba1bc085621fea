"""Topics (SPEC §1): parsing, validation and the match rule.

A topic is 2 to 8 segments joined by ``:``: a scope (``customer_id`` or
``agent_id``), a canonical lower-case UUID, then 1 to 6 segments of
``A-Z a-z 0-9 _ - .`` (1 to 128 characters each). In subscriptions a whole
segment ``*`` matches any one segment. Nothing is normalised: a topic is
accepted exactly as written or refused with a message that says why.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SCOPES = ("customer_id", "agent_id")
WILDCARD = "*"
MAX_TOPIC_BYTES = 512
MIN_SEGMENTS = 2
MAX_SEGMENTS = 8
MAX_SEGMENT_CHARS = 128

# ASCII only: str.isdigit-style classes would admit other scripts' digits.
_UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_SEGMENT_PATTERN = rf"[A-Za-z0-9_.\-]{{1,{MAX_SEGMENT_CHARS}}}"
_UUID = re.compile(_UUID_PATTERN + r"\Z", re.ASCII)
_SEGMENT = re.compile(_SEGMENT_PATTERN + r"\Z", re.ASCII)
NIL_UUID = "00000000-0000-0000-0000-000000000000"
# A whole valid topic in one match, for parse_topic's common case (the nil UUID
# and the byte limit are checked apart); anything else takes the slow path,
# which says what is wrong.
_VALID = re.compile(
    rf"(?:{'|'.join(SCOPES)}):{_UUID_PATTERN}"
    rf"(?::(?:{re.escape(WILDCARD)}|{_SEGMENT_PATTERN})){{0,{MAX_SEGMENTS - MIN_SEGMENTS}}}",
    re.ASCII)


class TopicError(ValueError):
    """A topic that breaks SPEC §1. ``str(error)`` is the message for the client."""


class Topic(NamedTuple):
    """A parsed, valid topic. ``text`` is the exact string the client sent."""

    text: str
    segments: tuple[str, ...]

    @property
    def scope(self) -> str:
        return self.segments[0]

    @property
    def scope_id(self) -> str:
        return self.segments[1]

    @property
    def scope_key(self) -> str:
        """``<scope>:<id>``: the unit of routing between nodes and of history."""
        return f"{self.segments[0]}:{self.segments[1]}"

    @property
    def has_wildcard(self) -> bool:
        return WILDCARD in self.segments

    def matches(self, event: Topic) -> bool:
        """True when this subscription matches the event topic (segment-prefix rule)."""
        return matches(self.segments, event.segments)


def is_uuid(value: object) -> bool:
    """True for a canonical lower-case UUID other than the nil UUID."""
    return isinstance(value, str) and bool(_UUID.match(value)) and value != NIL_UUID


def parse_topic(text: object, *, wildcard: bool = True) -> Topic:
    """Parse and validate a topic.

    Args:
        text: the topic as received.
        wildcard: whether ``*`` segments are allowed (subscriptions: yes;
            event topics: no).

    Raises:
        TopicError: with a message naming the rule that was broken.
    """
    if (type(text) is str and len(text) <= MAX_TOPIC_BYTES and _VALID.fullmatch(text)
            and (wildcard or WILDCARD not in text)):
        segments = tuple(text.split(":"))
        if segments[1] != NIL_UUID:
            return Topic(text, segments)
    if not isinstance(text, str):
        raise TopicError("a topic must be a string")
    if not text:
        raise TopicError("the topic is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        raise TopicError(f"the topic is {size} bytes; at most {MAX_TOPIC_BYTES} are allowed")
    segments = tuple(text.split(":"))
    if not MIN_SEGMENTS <= len(segments) <= MAX_SEGMENTS:
        raise TopicError(
            f"a topic has {MIN_SEGMENTS} to {MAX_SEGMENTS} segments separated by ':', "
            f"this one has {len(segments)}"
        )
    scope, scope_id = segments[0], segments[1]
    if scope not in SCOPES:
        raise TopicError(
            f"the first segment must be 'customer_id' or 'agent_id', not {_show(scope)}"
        )
    if scope_id == WILDCARD:
        raise TopicError(f"the {scope} segment cannot be a wildcard; give one id")
    if not _UUID.match(scope_id):
        raise TopicError(
            f"the {scope} must be a UUID in canonical lower-case form like "
            f"5013bc52-da9a-11ee-844f-2fa34248de28, not {_show(scope_id)}"
        )
    if scope_id == NIL_UUID:
        raise TopicError(f"the {scope} cannot be the nil UUID")
    for position, seg in enumerate(segments[2:], start=3):
        if seg == WILDCARD:
            if not wildcard:
                raise TopicError(f"segment {position} is '*': wildcards are for subscriptions only")
            continue
        if not _SEGMENT.match(seg):
            if not seg:
                raise TopicError(f"segment {position} is empty")
            if len(seg) > MAX_SEGMENT_CHARS:
                raise TopicError(
                    f"segment {position} has {len(seg)} characters; at most {MAX_SEGMENT_CHARS}"
                )
            raise TopicError(
                f"segment {position} ({_show(seg)}) may only hold A-Z a-z 0-9 _ - . "
                "or be a whole '*'"
            )
    return Topic(text, segments)


def matches(subscription: tuple[str, ...], event: tuple[str, ...]) -> bool:
    """The SPEC §1 rule: prefix match by whole segments, ``*`` matching any one."""
    if len(subscription) > len(event):
        return False
    return all(s == WILDCARD or s == e for s, e in zip(subscription, event, strict=False))


def _show(value: str, limit: int = 60) -> str:
    shown = value if len(value) <= limit else value[:limit] + "..."
    return repr(shown)
