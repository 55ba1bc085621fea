"""Index micro-benchmark: the time to match one event topic against n subscriptions.

Subscriptions look like a real deployment: per customer, a few whole-customer
subscribers (``customer_id:C``), per-call subscribers (``customer_id:C:call:R``)
and wildcard ones (``customer_id:C:*:R``). Every size uses the same shape, so
one match finds the same number of subscribers whatever n is; only the number
of customers grows. Event topics are drawn at random among the held ones, so
the lookups touch the index's memory the way a live server does.

Run it pinned to one core on a busy machine, e.g.
``taskset -c 1 .venv/bin/python -m bench.index_bench``.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from wsgate.index import SubscriptionIndex

PER_CUSTOMER = 100  # subscriptions per customer: 4 whole, 80 exact, 16 wildcard


def build(n: int, rng: random.Random) -> tuple[SubscriptionIndex[int], list[tuple[str, ...]]]:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    events: list[tuple[str, ...]] = []

    def add(text: str, sub: int) -> None:
        # Parsed per subscription, as the server does: every held topic has
        # its own segment strings, not ones shared with other subscriptions.
        index.add(tuple(text.split(":")), sub)

    sub = 0
    while sub < n:
        customer = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        calls = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(20)]
        for _ in range(4):
            add(f"customer_id:{customer}", sub)
            sub += 1
        for call in calls:
            for _ in range(4):
                add(f"customer_id:{customer}:call:{call}", sub)
                sub += 1
            events.append(("customer_id", customer, "call", call))
        for call in calls[:16]:
            add(f"customer_id:{customer}:*:{call}", sub)
            sub += 1
    return index, events


def _per_match_us(loops: list[float], splits: list[float], take: Callable[[list[float]], float],
                  batch: int) -> float:
    return (take(loops) - take(splits)) / batch * 1e6


def run(sizes: tuple[int, ...], rounds: int = 200_000, batch: int = 1000) -> dict[str, Any]:
    """Microseconds per match at each size: ``rounds`` matches each, in batches.

    Every index is built first; then batches of ``batch`` events run in turn
    over the sizes (the order rotating), so a burst of load from other
    processes falls on all sizes alike instead of on whichever ran then. Each
    batch draws its events at random among the held topics and, as the server
    does, parses each topic text freshly right before the match; a loop over
    the same texts that only parses is timed too and taken off. Reported per
    size: the minimum over batches (``match_us``, the figure least disturbed by
    other processes) and the median, for the match alone and for the match
    plus iterating its result; and ``same_event_us``, one event matched over
    and over (its index memory in cache: the cost of the code alone).
    """
    batch = min(batch, rounds)
    built = []
    for n in sizes:
        rng = random.Random(n)
        index, events = build(n, rng)
        built.append((n, index, events, rng))
    gc.collect()
    gc.freeze()
    times: dict[int, dict[str, list[float]]] = {
        n: {"split": [], "match": [], "iterate": [], "same": []} for n in sizes}
    for round_ in range(max(1, rounds // batch)):
        shift = round_ % len(built)
        for n, index, events, rng in built[shift:] + built[:shift]:
            texts = [":".join(events[rng.randrange(len(events))]) for _ in range(batch)]
            same = [texts[0]] * batch
            match = index.match
            got = times[n]
            t = time.perf_counter()
            for text in texts:
                tuple(text.split(":"))
            got["split"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for text in texts:
                match(tuple(text.split(":")))
            got["match"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for text in texts:
                for _ in match(tuple(text.split(":"))):
                    pass
            got["iterate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for text in same:
                match(tuple(text.split(":")))
            got["same"].append(time.perf_counter() - t)
    out = []
    median = statistics.median
    for n, index, _, _ in built:
        got = times[n]
        split = got["split"]
        out.append({
            "subscriptions": len(index),
            "match_us": round(_per_match_us(got["match"], split, min, batch), 3),
            "match_us_median": round(_per_match_us(got["match"], split, median, batch), 3),
            "match_and_iterate_us": round(_per_match_us(got["iterate"], split, min, batch), 3),
            "match_and_iterate_us_median": round(
                _per_match_us(got["iterate"], split, median, batch), 3),
            "same_event_us": round(_per_match_us(got["same"], split, min, batch), 3),
            "batches": len(split),
        })
    del built
    gc.unfreeze()
    gc.collect()
    return {"sizes": out, "batch": batch}


if __name__ == "__main__":
    import json
    print(json.dumps(run((1000, 100_000, 1_000_000)), indent=2))
