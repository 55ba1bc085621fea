"""Index micro-benchmark: the time to match one event topic against n subscriptions.

Subscriptions look like a real deployment: per customer, a few whole-customer
subscribers (``customer_id:C``), per-call subscribers (``customer_id:C:call:R``)
and wildcard ones (``customer_id:C:*:R``). Every size uses the same shape, so
one match finds the same number of subscribers whatever n is; only the number
of customers grows. Event topics are drawn at random among the held ones, so
the lookups touch the index's memory the way a live server does.
"""

from __future__ import annotations

import gc
import random
import time
import uuid
from typing import Any

from wsgate.index import SubscriptionIndex

PER_CUSTOMER = 100  # subscriptions per customer: 4 whole, 80 exact, 16 wildcard


def build(n: int, rng: random.Random) -> tuple[SubscriptionIndex[int], list[tuple[str, ...]]]:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    events: list[tuple[str, ...]] = []
    sub = 0
    while sub < n:
        customer = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        calls = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(20)]
        for _ in range(4):
            index.add(("customer_id", customer), sub)
            sub += 1
        for call in calls:
            for _ in range(4):
                index.add(("customer_id", customer, "call", call), sub)
                sub += 1
            events.append(("customer_id", customer, "call", call))
        for call in calls[:16]:
            index.add(("customer_id", customer, "*", call), sub)
            sub += 1
    return index, events


def time_matches(index: SubscriptionIndex[int], events: list[tuple[str, ...]],
                 rng: random.Random, rounds: int = 200_000) -> tuple[float, float]:
    """Mean microseconds per match, and per match plus iterating the result.

    As in the server, each event topic is freshly parsed (its segments are new,
    hot objects) right before the match: the time of the split alone is
    measured on the same topics and subtracted.
    """
    texts = [":".join(events[rng.randrange(len(events))]) for _ in range(rounds)]
    match = index.match
    for text in texts[:20_000]:  # warm up
        match(tuple(text.split(":")))
    t = time.perf_counter()
    for text in texts:
        tuple(text.split(":"))
    split = time.perf_counter() - t
    t = time.perf_counter()
    for text in texts:
        match(tuple(text.split(":")))
    bare = (time.perf_counter() - t - split) / rounds * 1e6
    t = time.perf_counter()
    total = 0
    for text in texts:
        for _ in match(tuple(text.split(":"))):
            total += 1
    full = (time.perf_counter() - t - split) / rounds * 1e6
    return bare, full


def run(sizes: tuple[int, ...], rounds: int = 200_000) -> dict[str, Any]:
    out = []
    for n in sizes:
        rng = random.Random(n)
        index, events = build(n, rng)
        gc.collect()
        gc.freeze()
        best = min((time_matches(index, events, rng, rounds) for _ in range(3)),
                   key=lambda pair: pair[0])
        out.append({"subscriptions": len(index), "match_us": round(best[0], 3),
                    "match_and_iterate_us": round(best[1], 3)})
        del index, events
        gc.unfreeze()
        gc.collect()
    return {"sizes": out}


if __name__ == "__main__":
    import json
    print(json.dumps(run((1000, 100_000, 1_000_000)), indent=2))
