"""SPEC §1: every topic rule and every match example."""

import pytest

from wsgate.topics import TopicError, matches, parse_topic

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
X = "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"


@pytest.mark.parametrize("text", [
    f"customer_id:{C}",
    f"agent_id:{A}",
    f"customer_id:{C}:call:{X}",
    f"customer_id:{C}:*:{X}",
    f"customer_id:{C}:a:b:c:d:e:f",                    # 8 segments
    f"customer_id:{C}:" + "a" * 128,
    f"customer_id:{C}:A-Z_a.z-0",
])
def test_valid_topics(text):
    topic = parse_topic(text)
    assert topic.text == text
    assert topic.segments == tuple(text.split(":"))


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("customer_id", "2 to 8 segments"),
    (f"customer_id:{C}:a:b:c:d:e:f:g", "2 to 8 segments"),
    (f"user_id:{C}", "'customer_id' or 'agent_id'"),
    (f"Customer_id:{C}", "'customer_id' or 'agent_id'"),
    (f"customer_id:{C.upper()}", "canonical lower-case"),
    (f"customer_id:{{{C}}}", "canonical lower-case"),
    (f"customer_id:{C.replace('-', '')}", "canonical lower-case"),
    ("customer_id:00000000-0000-0000-0000-000000000000", "nil UUID"),
    ("customer_id:*", "cannot be a wildcard"),
    (f"customer_id:{C}::x", "segment 3 is empty"),
    (f"customer_id:{C}:call:", "segment 4 is empty"),
    (f"customer_id:{C}:" + "a" * 129, "at most 128"),
    (f"customer_id:{C}:ca ll", "may only hold"),
    (f"customer_id:{C}:call%3A", "may only hold"),
    (f"customer_id:{C}:caf\u00e9", "may only hold"),
    (f"customer_id:{C}:\uff43all", "may only hold"),            # full-width c
    (f"customer_id:{C}:call\x00", "may only hold"),
    (f"customer_id:{C}:\u0661\u0662", "may only hold"),         # Arabic-Indic digits
    (f"customer_id:{C}:c*", "may only hold"),
    (f"customer_id:{C}:" + ":".join(["x" * 100] * 5), "at most 512"),
])
def test_invalid_topics_say_why(text, fragment):
    with pytest.raises(TopicError) as info:
        parse_topic(text)
    assert fragment in str(info.value)


def test_uuid_message_names_the_expected_form():
    with pytest.raises(TopicError) as info:
        parse_topic(f"customer_id:{C.upper()}:call")
    assert "5013bc52-da9a-11ee-844f-2fa34248de28" in str(info.value)


def test_non_ascii_digits_in_uuid_are_refused():
    weird = C.replace("5", "\u0665")   # Arabic-Indic five
    with pytest.raises(TopicError):
        parse_topic(f"customer_id:{weird}")


def test_wildcard_only_in_subscriptions():
    with pytest.raises(TopicError, match="subscriptions only"):
        parse_topic(f"customer_id:{C}:*", wildcard=False)


def test_non_string_topic():
    with pytest.raises(TopicError):
        parse_topic(42)


@pytest.mark.parametrize("sub,event,expected", [
    (f"customer_id:{C}", f"customer_id:{C}:call:{X}", True),
    (f"customer_id:{C}:call", f"customer_id:{C}:call:{X}", True),
    (f"customer_id:{C}:queue", f"customer_id:{C}:queuecall:{X}", False),
    (f"customer_id:{C}:*:{X}", f"customer_id:{C}:call:{X}", True),
    (f"customer_id:{C}:call:{X}", f"customer_id:{C}:call", False),
    (f"customer_id:{C}:call:{X}", f"customer_id:{C}:call:{X}", True),
    (f"customer_id:{C}", f"agent_id:{C}:call", False),
    (f"customer_id:{C}:*", f"customer_id:{C}", False),
])
def test_spec_match_examples(sub, event, expected):
    s, e = parse_topic(sub), parse_topic(event, wildcard=False)
    assert s.matches(e) is expected
    assert matches(s.segments, e.segments) is expected


def test_valid_topics_parse_the_same_by_the_fast_and_the_detailed_path() -> None:
    class Text(str):
        pass  # not exactly str: parse_topic takes its detailed path

    for text in (f"customer_id:{C}", f"agent_id:{C}:call", f"customer_id:{C}:*:x.y-z_1",
                 f"customer_id:{C}:" + ":".join("abcdef"), f"customer_id:{C}:" + "a" * 128):
        fast, slow = parse_topic(text), parse_topic(Text(text))
        assert fast == slow == (text, tuple(text.split(":")))
    for text in (f"customer_id:{C}:" + ":".join("abcdefg"), f"customer_id:{C}:" + "a" * 129,
                 "customer_id:00000000-0000-0000-0000-000000000000", f"customer_id:{C}:"):
        with pytest.raises(TopicError):
            parse_topic(text)
    with pytest.raises(TopicError, match="wildcards are for subscriptions only"):
        parse_topic(f"customer_id:{C}:call:*", wildcard=False)
