"""The subscription index agrees with the match rule and finds each subscriber once."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.index import SubscriptionIndex, _Node
from wsgate.topics import matches

C = "5013bc52-da9a-11ee-844f-2fa34248de28"


def seg(text):
    return tuple(text.split(":"))


def test_prefix_wildcard_and_exact():
    index = SubscriptionIndex()
    index.add(seg(f"customer_id:{C}"), "all")
    index.add(seg(f"customer_id:{C}:call"), "calls")
    index.add(seg(f"customer_id:{C}:*:x1"), "star")
    index.add(seg(f"customer_id:{C}:queue"), "queue")
    assert set(index.match(seg(f"customer_id:{C}:call:x1"))) == {"all", "calls", "star"}
    assert set(index.match(seg(f"customer_id:{C}:queuecall:x1"))) == {"all", "star"}
    assert set(index.match(seg(f"customer_id:{C}:call"))) == {"all", "calls"}
    assert set(index.match(seg(f"customer_id:{C}"))) == {"all"}


def test_one_subscriber_found_once_through_several_subscriptions():
    index = SubscriptionIndex()
    for t in (f"customer_id:{C}", f"customer_id:{C}:call", f"customer_id:{C}:*:x"):
        index.add(seg(t), "conn")
    found = list(index.match(seg(f"customer_id:{C}:call:x")))
    assert found == ["conn"]


def test_add_twice_and_remove_prunes():
    index = SubscriptionIndex()
    assert index.add(seg(f"customer_id:{C}:call"), 1) is True
    assert index.add(seg(f"customer_id:{C}:call"), 1) is False
    assert len(index) == 1
    assert index.remove(seg(f"customer_id:{C}:call"), 2) is False
    assert index.remove(seg(f"customer_id:{C}:call"), 1) is True
    assert len(index) == 0
    assert not index._root and index._root.star is None
    assert list(index.match(seg(f"customer_id:{C}:call"))) == []


def test_agrees_with_match_rule_on_random_topics():
    rng = random.Random(7)
    words = ["call", "queue", "x", "y", "*"]
    subs = []
    index = SubscriptionIndex()
    for n in range(400):
        depth = rng.randint(0, 3)
        t = ("customer_id", C) + tuple(rng.choice(words) for _ in range(depth))
        subs.append((t, n))
        index.add(t, n)
    for _ in range(200):
        depth = rng.randint(0, 4)
        event = ("customer_id", C) + tuple(rng.choice(words[:-1]) for _ in range(depth))
        expected = {n for t, n in subs if matches(t, event)}
        assert set(index.match(event)) == expected


def shape(index):
    """The trie as plain data: what a node or slot holds, recursively."""
    def slot(value):
        if type(value) is _Node:
            return {"subs": slot(value.subs), "star": slot(value.star),
                    **{seg: slot(child) for seg, child in value.items()}}
        return value
    return slot(index._root)


def test_one_subscriber_is_kept_without_a_set_and_a_second_makes_one():
    index = SubscriptionIndex()
    t = seg(f"customer_id:{C}:call:x")
    index.add(t, "a")
    leaf = shape(index)["customer_id"][C]["call"]["x"]
    assert leaf == "a"
    assert list(index.match(t)) == ["a"]
    index.add(t, "b")
    assert shape(index)["customer_id"][C]["call"]["x"] == {"a", "b"}
    assert set(index.match(t)) == {"a", "b"}
    assert index.add(t, "b") is False
    assert index.remove(t, "a") is True
    assert shape(index)["customer_id"][C]["call"]["x"] == "b"
    assert list(index.match(t)) == ["b"]
    assert index.remove(t, "a") is False
    assert index.remove(t, "b") is True
    assert shape(index) == {"subs": None, "star": None}
    assert len(index) == 0


def test_a_leaf_becomes_a_node_under_a_longer_topic_and_back():
    index = SubscriptionIndex()
    short, long = seg(f"customer_id:{C}"), seg(f"customer_id:{C}:call:x")
    index.add(short, "all")
    assert shape(index)["customer_id"][C] == "all"
    index.add(long, "one")
    assert shape(index)["customer_id"][C] == {"subs": "all", "star": None,
                                              "call": {"subs": None, "star": None, "x": "one"}}
    assert set(index.match(long)) == {"all", "one"}
    assert index.remove(long, "one") is True
    assert shape(index)["customer_id"][C] == "all"
    assert list(index.match(long)) == ["all"]
    assert index.remove(short, "all") is True
    assert shape(index) == {"subs": None, "star": None}


def test_star_child_is_pruned_and_kept_apart_from_exact_segments():
    index = SubscriptionIndex()
    star, exact = seg(f"customer_id:{C}:*:x"), seg(f"customer_id:{C}:call:x")
    index.add(star, "s")
    index.add(exact, "e")
    assert list(index.match(seg(f"customer_id:{C}:queue:x"))) == ["s"]
    assert index.remove(exact, "s") is False
    assert index.remove(star, "e") is False
    assert index.remove(star, "s") is True
    assert shape(index)["customer_id"][C] == {"subs": None, "star": None,
                                              "call": {"subs": None, "star": None, "x": "e"}}
    assert index.remove(exact, "e") is True
    assert shape(index) == {"subs": None, "star": None}


def test_removing_through_a_missing_or_leaf_path_is_refused():
    index = SubscriptionIndex()
    index.add(seg(f"customer_id:{C}"), "all")
    assert index.remove(seg(f"customer_id:{C}:call"), "all") is False
    assert index.remove(seg(f"agent_id:{C}"), "all") is False
    assert len(index) == 1
    assert list(index.match(seg(f"customer_id:{C}:call"))) == ["all"]


def test_none_is_not_a_subscriber():
    with pytest.raises(ValueError):
        SubscriptionIndex().add(seg(f"customer_id:{C}"), None)


SEGMENTS = st.sampled_from(["a", "b", "c"])
SUB_TOPICS = st.lists(st.one_of(SEGMENTS, st.just("*")), min_size=0, max_size=3).map(
    lambda rest: ("customer_id", C, *rest))
EVENT_TOPICS = st.lists(SEGMENTS, min_size=0, max_size=4).map(
    lambda rest: ("customer_id", C, *rest))
OPS = st.lists(st.tuples(st.booleans(), SUB_TOPICS, st.integers(0, 3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(EVENT_TOPICS, min_size=1, max_size=8))
def test_any_adds_and_removes_agree_with_a_plain_set_of_pairs(ops, events):
    index = SubscriptionIndex()
    held: set = set()
    for adding, topic, subscriber in ops:
        if adding:
            assert index.add(topic, subscriber) is ((topic, subscriber) not in held)
            held.add((topic, subscriber))
        else:
            assert index.remove(topic, subscriber) is ((topic, subscriber) in held)
            held.discard((topic, subscriber))
        assert len(index) == len(held)
    for event in events:
        found = list(index.match(event))
        assert len(found) == len(set(found))  # each subscriber once
        assert set(found) == {s for t, s in held if matches(t, event)}
    for topic, subscriber in list(held):
        assert index.remove(topic, subscriber) is True
    # Nothing is left behind once every subscription is gone.
    assert shape(index) == {"subs": None, "star": None}


def test_stored_segments_repeated_across_topics_are_one_string():
    index = SubscriptionIndex()
    other = "6013bc52-da9a-11ee-844f-2fa34248de28"
    index.add(tuple(f"customer_id:{C}:call:x1".split(":")), 1)
    index.add(tuple(f"customer_id:{other}:call:x1".split(":")), 2)
    index.add(tuple(f"customer_id:{C}:*:x1".split(":")), 3)
    scope = index._root["customer_id"]
    (call_a,) = scope[C].keys() - {"*"}
    (call_b,) = scope[other].keys()
    assert call_a is call_b
    (x_exact,) = scope[C]["call"].keys()
    (x_star,) = scope[C].star.keys()
    assert x_exact is x_star


def test_segments_that_cannot_be_interned_are_stored_as_given():
    class Seg(str):
        pass

    index = SubscriptionIndex()
    topic = ("customer_id", C, Seg("call"))
    index.add(topic, 1)
    assert list(index.match(("customer_id", C, "call", "x"))) == [1]
    assert index.remove(topic, 1) is True
