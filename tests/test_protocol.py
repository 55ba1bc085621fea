"""Client message parsing: every bad input is a BadRequest, never another exception."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.protocol import BadRequest, parse_client_message, ws_frame


def test_subscribe_with_id():
    msg = parse_client_message('{"type":"subscribe","topics":["a"],"id":7}')
    assert (msg.type, msg.topics, msg.id, msg.has_id) == ("subscribe", ("a",), 7, True)


@pytest.mark.parametrize("raw,fragment", [
    ("not json", "not valid JSON"),
    ("[1,2]", "must be a JSON object, not an array"),
    ('"x"', "not a string"),
    ("{}", 'needs a "type"'),
    ('{"type":"Subscribe","topics":["a"]}', "unknown message type"),
    ('{"type":"subscribe"}', '"topics" must be a list of strings'),
    ('{"type":"subscribe","topics":"a"}', '"topics" must be a list of strings'),
    ('{"type":"subscribe","topics":[1]}', '"topics" must be a list of strings'),
    ('{"type":"subscribe","topics":[]}', "1 to 100 topics"),
    ('{"type":"subscribe","topics":' + json.dumps(["a"] * 101) + "}", "1 to 100 topics"),
    ('{"type":"authenticate"}', '"token" must be a non-empty string'),
    ('{"type":"ping","id":{"a":1}}', '"id" must be'),
    ('{"type":"ping","id":' + "9" * 5000 + "}", "not valid JSON"),
    ('{"type":"ping","x":NaN}', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"type":"unsubscribe","topics":["a"],"since":"x"}', '"since"'),
])
def test_bad_messages(raw, fragment):
    with pytest.raises(BadRequest) as info:
        parse_client_message(raw)
    assert fragment in str(info.value)


def test_binary_frame():
    with pytest.raises(BadRequest, match="binary frames"):
        parse_client_message(b'{"type":"ping"}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.binary(),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["type", "topics", "id", "token", "since", "x"]),
                    json_values).map(json.dumps),
    st.builds(lambda t, rest: json.dumps({"type": t, **rest}),
              st.sampled_from(["subscribe", "unsubscribe", "ping", "authenticate", "PING"]),
              st.dictionaries(st.sampled_from(["topics", "id", "token", "since"]), json_values)),
))
def test_any_input_parses_or_is_a_bad_request(raw):
    try:
        msg = parse_client_message(raw)
    except BadRequest as exc:
        assert str(exc)
    else:
        assert msg.type in ("subscribe", "unsubscribe", "ping", "authenticate")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_ws_frame_lengths(size):
    frame = ws_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == size + 2
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size
