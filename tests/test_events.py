"""SPEC §3 event validation: derived topics, per-event details, all or nothing."""

import pytest

from wsgate.events import InvalidEvents, parse_body, validate_events

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"


def topics(raw):
    (event,) = validate_events([raw])
    return [t.text for t in event.topics]


def test_customer_topic_from_type_and_data_id():
    assert topics({"type": "call_created", "customer_id": C, "data": {"id": X}}) == [
        f"customer_id:{C}:call:{X}"]


def test_resource_is_type_up_to_last_underscore():
    assert topics({"type": "webchat_session_ended", "customer_id": C, "data": {"id": X}}) == [
        f"customer_id:{C}:webchat_session:{X}"]


def test_agent_topic_and_no_resource_id():
    assert topics({"type": "agent_updated", "agent_id": A, "data": {"id": 5}}) == [
        f"agent_id:{A}:agent"]


def test_explicit_fields_and_extra_topics_first():
    raw = {"type": "call_created", "customer_id": C, "agent_id": A, "resource": "calls",
           "resource_id": "r1", "topics": [f"customer_id:{C}:extra"], "data": {}}
    assert topics(raw) == [f"customer_id:{C}:extra", f"customer_id:{C}:calls:r1",
                           f"agent_id:{A}:calls:r1"]


def test_event_id_kept_or_generated():
    (e1,) = validate_events([{"type": "call_created", "customer_id": C, "data": {},
                              "event_id": X}])
    assert e1.event_id == X
    (e2,) = validate_events([{"type": "call_created", "customer_id": C, "data": {}}])
    assert len(e2.event_id) == 36 and e2.event_id != X


@pytest.mark.parametrize("raw,field,fragment", [
    ({"customer_id": C, "data": {}}, "type", "required"),
    ({"type": "Call_created", "customer_id": C, "data": {}}, "type", "lower-case"),
    ({"type": "call", "customer_id": C, "data": {}}, "type", "lower-case"),
    ({"type": "subscribed_x", "customer_id": C, "data": []}, "data", "JSON object"),
    ({"type": "call_created", "customer_id": C.upper(), "data": {}}, "customer_id", "canonical"),
    ({"type": "call_created", "customer_id": C, "data": {}, "event_id": "e1"}, "event_id",
     "UUID"),
    ({"type": "call_created", "data": {}}, None, "no topic"),
    ({"type": "call_created", "data": {}, "topics": [f"customer_id:{C}:*"]}, "topics",
     "wildcards are for subscriptions only"),
    ({"type": "call_created", "customer_id": C, "data": {}, "colour": 1}, "colour",
     "unknown field"),
    ({"type": "call_created", "customer_id": C, "resource_id": "a b", "data": {}},
     "resource_id", "may only hold"),
])
def test_invalid_event_details(raw, field, fragment):
    with pytest.raises(InvalidEvents) as info:
        validate_events([raw])
    assert any(d["field"] == field and fragment in d["message"] and d["index"] == 0
               for d in info.value.details), info.value.details


@pytest.mark.parametrize("control", ["connected", "subscribed", "unsubscribed", "error", "pong",
                                     "authenticated"])
def test_control_types_are_refused(control):
    # Control types either break the type pattern or are refused by name.
    with pytest.raises(InvalidEvents) as info:
        validate_events([{"type": control, "customer_id": C, "data": {}}])
    assert info.value.details[0]["field"] == "type"


def test_batch_all_or_nothing_with_indexes():
    good = {"type": "call_created", "customer_id": C, "data": {}}
    with pytest.raises(InvalidEvents) as info:
        validate_events([good, {"type": "call_created", "data": {}}, good])
    assert [d["index"] for d in info.value.details] == [1]


def test_duplicate_event_id_in_batch():
    e = {"type": "call_created", "customer_id": C, "data": {}, "event_id": X}
    with pytest.raises(InvalidEvents, match="problem"):
        validate_events([e, dict(e)])


def test_body_shapes():
    assert parse_body({"type": "x_y"}, 10) == [{"type": "x_y"}]
    assert parse_body({"events": [{"a": 1}, {"b": 2}]}, 10) == [{"a": 1}, {"b": 2}]
    with pytest.raises(OverflowError):
        parse_body({"events": [{}] * 11}, 10)
    with pytest.raises(InvalidEvents):
        parse_body([1, 2], 10)
    with pytest.raises(InvalidEvents):
        parse_body({"events": []}, 10)
