"""The subscription index agrees with the match rule and finds each subscriber once."""

import random

from wsgate.index import SubscriptionIndex
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
    assert not index._root.children
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
