"""The ingest fast path (events.validate_body) against the slow one it stands in for.

Whatever body validate_body accepts, the slow path (decode_json, parse_body,
validate_events) accepts too, with the same events: same type, topics, given
event ids, and a ``data`` that is the same JSON value. Whatever it is not sure
of, it refuses with NotFast, and the slow path gives the answer it always gave.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.events import (
    InvalidEvents,
    NotFast,
    decode_json,
    new_event_ids,
    parse_body,
    validate_body,
    validate_events,
)

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"


def slow(body: bytes) -> Any:
    """The slow path's events, or the exception it raised."""
    try:
        return validate_events(parse_body(decode_json(body), 1000))
    except (ValueError, InvalidEvents, OverflowError) as exc:
        return exc


def same(fast: list[Any], reference: list[Any], body: bytes) -> None:
    assert len(fast) == len(reference)
    given_ids = _given_ids(body)
    for f, r, given_id in zip(fast, reference, given_ids, strict=True):
        assert f.type == r.type
        assert [t.text for t in f.topics] == [t.text for t in r.topics]
        assert [t.segments for t in f.topics] == [t.segments for t in r.topics]
        assert json.loads(f.data_json) == json.loads(r.data_json)
        if given_id is not None:
            assert f.event_id == r.event_id == given_id
        else:
            assert uuid.UUID(f.event_id).version == 7
            assert uuid.UUID(r.event_id).version == 7


def _given_ids(body: bytes) -> list[str | None]:
    parsed = json.loads(body)
    raws = parsed["events"] if "events" in parsed and "type" not in parsed else [parsed]
    return [raw.get("event_id") for raw in raws]


def check(body: bytes) -> bool:
    """Compare both paths on body; True when the fast path took it."""
    reference = slow(body)
    try:
        fast, _ = validate_body(body, 1000)
    except NotFast:
        return False
    assert isinstance(reference, list), f"fast path accepted what the slow path refused: {body!r}"
    same(fast, reference, body)
    return True


GOOD = {"type": "call_created", "customer_id": C, "data": {"id": "x1", "n": 1}}


@pytest.mark.parametrize("body", [
    GOOD,
    {"events": [GOOD, dict(GOOD, agent_id=A, resource="call", resource_id="r")]},
    {"type": "webchat_session_ended", "agent_id": A, "data": {"id": 7}},
    {"type": "call_created", "topics": [f"customer_id:{C}:queue:q"], "data": {"events": [1]}},
    {"type": "call_created", "customer_id": C, "event_id": str(uuid.uuid4()),
     "data": {"name": "Zoë \u2603", "nested": {"a": [1.5, -2, None, True]}}},
    {"type": "call_created", "customer_id": C, "data": {}, "topics": []},
    {"type": "call_created", "customer_id": C, "data": {}, "resource": None, "resource_id": None},
])
def test_valid_bodies_take_the_fast_path_with_the_same_events(body: dict[str, Any]) -> None:
    assert check(json.dumps(body).encode())


@pytest.mark.parametrize("body", [
    b"",
    b"[]",
    b"null",
    b'{"events": []}',
    b'{"events": [1]}',
    b'{"events": [{}], "type": "call_created"}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {"x": 1e400}}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {"x": '
    + b"1" * 5000 + b"}}",
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {"x": "\xff"}}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": [1]}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": null}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {}, "topics": null}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {}, "extra": 1}',
    b'{"type": "connected", "customer_id": "' + C.encode() + b'", "data": {}}',
    b'{"type": "Call_created", "customer_id": "' + C.encode() + b'", "data": {}}',
    b'{"type": "call_created", "customer_id": "' + C.upper().encode() + b'", "data": {}}',
    b'{"type": "call_created", "data": {}}',
    b'{"type": "call_created", "data": {}, "topics": ["customer_id:' + C.encode() + b':*"]}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {}, "resource": ""}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": {"x": NaN}}',
    b'{"type": "call_created", "customer_id": "' + C.encode() + b'", "data": '
    + b"[" * 5000 + b"]" * 5000 + b"}",
])
def test_what_the_fast_path_is_not_sure_of_goes_the_slow_way(body: bytes) -> None:
    with pytest.raises(NotFast):
        validate_body(body, 1000)


def test_repeated_event_id_and_too_many_events_go_the_slow_way() -> None:
    event_id = str(uuid.uuid4())
    twice = {"events": [dict(GOOD, event_id=event_id), dict(GOOD, event_id=event_id)]}
    with pytest.raises(NotFast):
        validate_body(json.dumps(twice).encode(), 1000)
    with pytest.raises(NotFast):
        validate_body(json.dumps({"events": [GOOD] * 3}).encode(), 2)


def test_data_is_kept_as_posted() -> None:
    body = b'{"type": "call_created", "customer_id": "' + C.encode() + \
        b'", "data": {"b" : 1,  "a": "\\u00e9t\xc3\xa9"}}'
    [event], _ = validate_body(body, 10)
    assert event.data_json == '{"b" : 1,  "a": "\\u00e9t\u00e9"}'


def test_new_event_ids_are_time_ordered_version_7_uuids() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_event_ids(2000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # the first 48 bits: Unix time in ms
    time.sleep(0.002)
    later = new_event_ids(10)
    assert min(later) > max(ids), "ids made later sort later"
    assert new_event_ids(0) == []


_segment = st.sampled_from(["call", "queue", "x.y", "a-b", "call", "queue", "", "*", "Q", "é"])
_uuidish = st.sampled_from([C, A, C, A, C, A, C.upper(), "00000000-0000-0000-0000-000000000000",
                            "x", None])
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                       st.floats(allow_nan=False, allow_infinity=False))
_data = st.one_of(
    st.dictionaries(st.sampled_from(["id", "n", "events", "type"]),
                    st.one_of(_json_leaf, st.lists(_json_leaf, max_size=3)), max_size=4),
    st.dictionaries(st.sampled_from(["id", "n"]), _json_leaf, max_size=2),
    _json_leaf)


@st.composite
def _event(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        event["type"] = draw(st.sampled_from(["call_created", "webchat_session_ended",
                                              "call_created", "pong", "callcreated", 5]))
    if draw(st.integers(0, 9)):
        event["data"] = draw(_data)
    for key in ("customer_id", "agent_id", "event_id"):
        if draw(st.integers(0, 2)):
            event[key] = draw(_uuidish)
    if draw(st.integers(0, 3)) == 0:
        event["resource"] = draw(st.one_of(_segment, st.none(), st.integers()))
    if draw(st.integers(0, 3)) == 0:
        event["resource_id"] = draw(st.one_of(_segment, st.none(), st.integers()))
    if draw(st.integers(0, 2)) == 0:
        event["topics"] = draw(st.one_of(
            st.lists(st.builds(lambda scope, sid, seg: f"{scope}:{sid}:{seg}",
                               st.sampled_from(["customer_id", "agent_id", "other"]),
                               st.sampled_from([C, A, "x"]), _segment), max_size=3),
            st.none(), st.text(max_size=3)))
    if draw(st.integers(0, 20)) == 0:
        event["unknown"] = 1
    if event.get("event_id") in (C, A):
        event["event_id"] = str(uuid.uuid4())
    return event


@settings(max_examples=400, deadline=None)
@given(st.one_of(_event(), st.builds(lambda evs: {"events": evs},
                                     st.lists(_event(), min_size=0, max_size=4))),
       st.booleans())
def test_fast_and_slow_paths_agree(body: dict[str, Any], spaced: bool) -> None:
    text = json.dumps(body, indent=1 if spaced else None, ensure_ascii=not spaced)
    TOOK_FAST.append(check(text.encode()))


TOOK_FAST: list[bool] = []


def test_the_generated_bodies_reach_both_outcomes() -> None:
    """The property above is not empty: some bodies took the fast path, some did not."""
    if not TOOK_FAST:
        test_fast_and_slow_paths_agree()
    assert any(TOOK_FAST) and not all(TOOK_FAST), (sum(TOOK_FAST), len(TOOK_FAST))


_good_segment = st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)
_good_data = st.dictionaries(
    st.text(max_size=6),
    st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=4), inner,
                                                                     max_size=3)),
                 max_leaves=8),
    max_size=5)


@st.composite
def _valid_event(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {"type": draw(st.from_regex(r"[a-z][a-z0-9]{0,6}(_[a-z0-9]{1,6}){1,3}",
                                                        fullmatch=True).filter(
        lambda t: t not in ("connected", "subscribed"))), "data": draw(_good_data)}
    if draw(st.booleans()):
        event["customer_id"] = str(draw(st.uuids(version=4)))
    if draw(st.booleans()) or "customer_id" not in event:
        event["agent_id"] = str(draw(st.uuids(version=1)))
    if draw(st.booleans()):
        event["resource"] = draw(_good_segment)
    if draw(st.booleans()):
        event["resource_id"] = draw(_good_segment)
    elif draw(st.booleans()):
        event["data"]["id"] = draw(st.one_of(_good_segment, st.integers()))
    if draw(st.booleans()):
        event["topics"] = draw(st.lists(st.builds(
            lambda sid, segs: ":".join(["customer_id", sid, *segs]),
            st.just(C), st.lists(_good_segment, max_size=4)), max_size=3))
    if draw(st.booleans()):
        event["event_id"] = str(draw(st.uuids(version=4)))
    return event


@settings(max_examples=300, deadline=None)
@given(st.one_of(_valid_event(), st.builds(
    lambda evs: {"events": evs},
    st.lists(_valid_event(), min_size=1, max_size=4,
             unique_by=lambda e: e.get("event_id") or id(e)))), st.booleans())
def test_valid_bodies_always_take_the_fast_path(body: dict[str, Any], spaced: bool) -> None:
    text = json.dumps(body, indent=1 if spaced else None, ensure_ascii=not spaced)
    assert check(text.encode()), text


def test_a_repeated_key_means_the_same_on_both_paths() -> None:
    """JSON with a key given twice: the last one counts, on both paths."""
    body = (b'{"type": "call_created", "type": "call_ended", "customer_id": "' + C.encode()
            + b'", "data": {"id": "a"}, "data": {"id": "b"}}')
    assert check(body)
    [event], _ = validate_body(body, 10)
    assert (event.type, event.data_json) == ("call_ended", '{"id": "b"}')
    batch = (b'{"events": [{"type": "call_created", "customer_id": "' + C.encode()
             + b'", "data": {}}], "events": [{"type": "call_ended", "customer_id": "'
             + C.encode() + b'", "data": {}}]}')
    assert check(batch)
