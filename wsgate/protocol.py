"""The wire protocol (SPEC §2): client messages in, replies and event frames out.

Parsing never raises anything but :class:`BadRequest`, whatever the input:
deep nesting, huge numbers and invalid UTF-8 all become a ``bad_request``
error frame.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from wsgate import errors

MAX_TOPICS_PER_MESSAGE = 100
CONTROL_TYPES = frozenset(
    {"connected", "subscribed", "unsubscribed", "error", "pong", "authenticated"}
)
CLIENT_TYPES = ("subscribe", "unsubscribe", "ping", "authenticate")
_MAX_ID_CHARS = 256


class BadRequest(Exception):
    """A client message that cannot be handled; the message goes into the error frame."""


class ClientMessage(NamedTuple):
    """A well-formed client message.

    ``topics`` is set for subscribe/unsubscribe, ``token`` for authenticate,
    ``since`` for a subscribe that resumes; ``id`` is echoed back as given
    (``has_id`` tells whether the client sent one). A named tuple: one is made
    for every client message, several times faster than a frozen dataclass.
    """

    type: str
    id: Any = None
    has_id: bool = False
    topics: tuple[str, ...] = ()
    token: str = ""
    since: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Made once: json.loads and json.dumps with options build a new decoder or
# encoder on every call, which costs more than a small message itself.
#: Strict JSON (NaN and Infinity refused): client messages and ingest bodies.
STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def parse_client_message(raw: str | bytes,
                         max_topics: int = MAX_TOPICS_PER_MESSAGE) -> ClientMessage:
    """Parse one client text frame.

    Raises:
        BadRequest: not JSON, not an object, unknown or missing type, or bad fields.
    """
    if isinstance(raw, bytes):
        raise BadRequest("binary frames are not accepted; send JSON in a text frame")
    try:
        msg = STRICT_DECODER.decode(raw)
    except RecursionError:
        raise BadRequest("the message is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"the message is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadRequest(f"the message must be a JSON object, not {_json_kind(msg)}")
    mtype = msg.get("type")
    if not isinstance(mtype, str):
        raise BadRequest('the message needs a "type": one of ' + ", ".join(CLIENT_TYPES))
    has_id = "id" in msg
    mid = msg.get("id")
    if has_id and not _valid_id(mid):
        raise BadRequest('"id" must be a string of at most 256 characters, an integer or null')
    if mtype in ("subscribe", "unsubscribe"):
        topics = msg.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise BadRequest('"topics" must be a list of strings')
        if not 1 <= len(topics) <= max_topics:
            raise BadRequest(f'"topics" must hold 1 to {max_topics} topics, not {len(topics)}')
        since = msg.get("since")
        if since is not None and (mtype != "subscribe" or not isinstance(since, str)):
            raise BadRequest('"since" is an event_id string, on subscribe only')
        return ClientMessage(mtype, mid, has_id, tuple(topics), since=since)
    if mtype == "ping":
        return ClientMessage(mtype, mid, has_id)
    if mtype == "authenticate":
        token = msg.get("token")
        if not isinstance(token, str) or not token:
            raise BadRequest('"token" must be a non-empty string')
        return ClientMessage(mtype, mid, has_id, token=token)
    shown = mtype if len(mtype) <= 40 else mtype[:40] + "..."
    raise BadRequest(f"unknown message type {shown!r}; expected one of {', '.join(CLIENT_TYPES)}")


def _valid_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and len(value) <= _MAX_ID_CHARS


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def dumps(obj: Any) -> str:
    """Compact JSON, as every frame is sent.

    ASCII-only on purpose: a lone surrogate from a client's JSON (echoed in a
    rejection or an id) cannot then produce invalid UTF-8 on the wire.
    """
    return _ENCODER.encode(obj)


def _with_id(frame: dict[str, Any], msg: ClientMessage) -> dict[str, Any]:
    if msg.has_id:
        frame["id"] = msg.id
    return frame


def connected(connection_id: str, expires_at: str | None) -> str:
    return dumps({"type": "connected", "connection_id": connection_id, "expires_at": expires_at})


def reply(msg: ClientMessage, accepted: list[str], rejected: list[dict[str, str]],
          recovered: bool | None = None) -> str:
    """The subscribed/unsubscribed reply for msg."""
    frame: dict[str, Any] = {"type": msg.type + "d"}
    _with_id(frame, msg)
    frame["topics"] = accepted
    frame["rejected"] = rejected
    if recovered is not None:
        frame["recovered"] = recovered
    return dumps(frame)


def rejection(topic: str, code: str, message: str) -> dict[str, str]:
    return {"topic": topic, "code": code, "message": message}


def pong(msg: ClientMessage) -> str:
    return dumps(_with_id({"type": "pong"}, msg))


def authenticated(msg: ClientMessage, expires_at: str | None) -> str:
    frame = _with_id({"type": "authenticated"}, msg)
    frame["expires_at"] = expires_at
    return dumps(frame)


def error(code: str, message: str, msg: ClientMessage | None = None) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if msg is not None and msg.has_id:
        frame["id"] = msg.id
    return dumps(frame)


def bad_request(message: str) -> str:
    return error(errors.BAD_REQUEST, message)


def event_frame_prefix(event_type: str) -> str:
    """The constant start of an event frame, so each frame is built by concatenation."""
    return '{"type":' + dumps(event_type) + ',"topic":'


def event_frame(prefix: str, topic: str, data_json: str, tail: str) -> str:
    """One event frame: prefix from event_frame_prefix, tail from event_frame_tail."""
    return prefix + dumps(topic) + ',"data":' + data_json + tail


def event_frame_tail(event_id: str, published_at: str) -> str:
    return ',"event_id":' + dumps(event_id) + ',"published_at":' + dumps(published_at) + "}"


def ws_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed RFC 6455 text frame carrying payload.

    Built once per event and topic and written as-is to every matching
    connection (server frames are never masked, and wsgate does not negotiate
    compression), instead of re-framing the same bytes per connection.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload
