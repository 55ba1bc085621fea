"""Idempotency memory (SPEC §3, issue 16 items 1, 2 and 10).

What is remembered by ``Idempotency-Key`` is bounded in bytes and per ingest
key, and a key reused with another body is 422 ``idempotency_key_reused``.
The store is tested directly, then through :class:`IngestService` (which both
HTTP paths call) with a gateway that only counts what it is asked to publish,
then once against a real server on both HTTP paths.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import tracemalloc
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from tests.conftest import event
from tests.test_fast_ingest import Raw
from wsgate import errors
from wsgate.config import Config, IngestConfig
from wsgate.errors import HTTPFailure
from wsgate.ingest import IdempotencyStore, IngestService, key_id


def answer_of(n: int) -> bytes:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    return json.dumps({"accepted": n, "event_ids": ids}, separators=(",", ":")).encode()


DIGEST = bytes(32)


# -- the store ----------------------------------------------------------------

def test_store_never_accounts_more_than_its_bound_and_evicts_oldest_first() -> None:
    store = IdempotencyStore(300_000, ["key:a"])
    big = answer_of(1000)  # about 39 KB: a full batch's answer
    kept: list[str] = []
    for n in range(40):
        assert store.put("key:a", f"k{n}", DIGEST, big)
        kept.append(f"k{n}")
        assert store.used("key:a") <= store.share <= 300_000
    present = [k for k in kept if store.get("key:a", k) is not None]
    # What is left is the newest entries, in a row: the oldest went first.
    assert present == kept[-len(present):] and 5 <= len(present) < 10
    assert store.used() == store.used("key:a") == sum(
        store.get("key:a", k).size for k in present)  # type: ignore[union-attr]


def test_store_accounts_at_least_the_memory_entries_really_take() -> None:
    store = IdempotencyStore(1 << 30, ["key:a"])
    answers = [answer_of(20) for _ in range(2000)]
    keys = [f"idempotency-{n:06d}" for n in range(2000)]
    digests = [bytes([n % 256]) * 32 for n in range(2000)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k, d, a in zip(keys, digests, answers, strict=True):
        store.put("key:a", k, d, a)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # The keys, digests and answers were allocated before; add what they cost.
    real = grown + sum(map(sys.getsizeof, [*answers, *keys, *digests]))
    assert store.used() >= real, (store.used(), real)
    assert store.used() <= 1.5 * real, (store.used(), real)


def test_each_key_has_its_own_share() -> None:
    store = IdempotencyStore(200_000, ["key:a", "key:b"])
    store.put("key:b", "b-1", DIGEST, answer_of(1))
    for n in range(1000):
        store.put("key:a", f"a-{n}", DIGEST, answer_of(5))
    assert store.get("key:a", "a-0") is None  # a's own oldest went
    assert store.get("key:b", "b-1") is not None  # b's entry did not
    assert store.used("key:a") <= 100_000 and store.used() <= 200_000


def test_entries_expire_and_unknown_keys_are_not_remembered() -> None:
    store = IdempotencyStore(100_000, ["key:a"], ttl=0.0)
    assert store.put("key:a", "k", DIGEST, answer_of(1))
    assert store.get("key:a", "k") is None and store.used() == 0
    assert not store.put("hmac:other", "k", DIGEST, answer_of(1))
    # An answer bigger than the whole share is not remembered.
    assert not IdempotencyStore(1000, ["key:a"]).put("key:a", "k", DIGEST, answer_of(100))


def test_the_config_bounds_each_share() -> None:
    from wsgate.config import ConfigError, config_from_dict
    cfg = config_from_dict({"ingest": {"keys": ["a", "b"]}})
    assert cfg.ingest.idempotency_max_bytes == 64 * 1024 * 1024
    with pytest.raises(ConfigError, match="idempotency_max_bytes"):
        config_from_dict({"ingest": {"keys": ["a", "b"], "idempotency_max_bytes": 100_000}})


# -- through IngestService ----------------------------------------------------

class CountingGateway:
    """Only what IngestService asks of a gateway: counts the events published."""

    draining = False

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []
        self.config = Config()

    async def publish(self, events: Sequence[Any], kid: str, hashes: Sequence[str]) -> None:
        self.published.append((kid, len(events)))


def service(**ingest: Any) -> tuple[IngestService, CountingGateway]:
    gateway = CountingGateway()
    gateway.config = Config(ingest=IngestConfig(**ingest))  # what a reload would replace
    return IngestService(gateway, gateway.config.ingest), gateway  # type: ignore[arg-type]


async def post(svc: IngestService, body: Any, secret: str, idem: str) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer, _, _ = await svc.complete({"idempotency-key": idem}, raw, key_id(secret, "key"))
    return answer


def batch(n: int) -> dict[str, Any]:
    return {"events": [event(data={"id": f"e{i}"}) for i in range(n)]}


@pytest.mark.gen_test(timeout=60)
async def test_full_batches_with_new_keys_stay_within_the_byte_bound() -> None:
    # Batches of 1000 events, each with its own Idempotency-Key (the report: 400
    # of them grew RSS by 40.6 MiB); the memory for them stays within its bound.
    limit = 1024 * 1024
    svc, gateway = service(keys=("key-a",), idempotency_max_bytes=limit)
    body = json.dumps(batch(1000)).encode()
    for n in range(120):
        await post(svc, body, "key-a", f"batch-{n}")
        assert svc.idempotent.used() <= limit
    assert len(gateway.published) == 120
    # The newest are still answered once; the oldest were let go.
    newest = await post(svc, body, "key-a", "batch-119")
    assert len(gateway.published) == 120 and newest["accepted"] == 1000
    await post(svc, body, "key-a", "batch-0")
    assert len(gateway.published) == 121


@pytest.mark.gen_test(timeout=120)
async def test_one_key_flooding_new_idempotency_keys_cannot_evict_anothers() -> None:
    # The defaults: key A posts more new Idempotency-Keys than its share (and
    # than the 50 000 answers the store used to hold for everyone)...
    svc, gateway = service(keys=("key-a", "key-b"))
    first = await post(svc, event(), "key-b", "b-order-1")
    assert len(gateway.published) == 1
    body = json.dumps(event()).encode()
    n = 0
    while n <= 50_001 or remembered(svc, "key-a", "a-0"):
        await post(svc, body, "key-a", f"a-{n}")
        n += 1
    assert not remembered(svc, "key-a", "a-0")  # A's own oldest went...
    # ...and B's retry still gets its first answer and publishes nothing.
    published = len(gateway.published)
    assert await post(svc, event(), "key-b", "b-order-1") == first
    assert len(gateway.published) == published
    assert svc.idempotent.used() <= 64 * 1024 * 1024


def remembered(svc: IngestService, secret: str, idem: str) -> bool:
    store = svc.idempotent
    if isinstance(store, IdempotencyStore):
        return store.get(key_id(secret, "key"), idem) is not None
    return False  # pragma: no cover - the count-bounded store of before (issue 16)


@pytest.mark.gen_test(timeout=20)
async def test_a_reused_idempotency_key_with_another_body_is_422() -> None:
    svc, gateway = service(keys=("key-a", "key-b"))
    first = await post(svc, event(data={"id": "first"}), "key-a", "order-9")
    with pytest.raises(HTTPFailure) as failure:
        await post(svc, event(data={"id": "second"}), "key-a", "order-9")
    assert failure.value.status == 422
    assert failure.value.code == errors.IDEMPOTENCY_KEY_REUSED
    assert gateway.published == [(key_id("key-a", "key"), 1)]  # nothing more
    # The same body is still a retry; another ingest key's same Idempotency-Key is its own.
    assert await post(svc, event(data={"id": "first"}), "key-a", "order-9") == first
    await post(svc, event(data={"id": "second"}), "key-b", "order-9")
    assert len(gateway.published) == 2


@pytest.mark.gen_test(timeout=20)
async def test_a_reused_key_is_422_even_while_the_first_is_being_published() -> None:
    svc, gateway = service(keys=("key-a",))
    release = asyncio.Event()
    original = gateway.publish

    async def slow(events: Sequence[Any], kid: str, hashes: Sequence[str]) -> None:
        await release.wait()
        await original(events, kid, hashes)

    gateway.publish = slow  # type: ignore[method-assign]
    first = asyncio.ensure_future(post(svc, event(data={"id": "first"}), "key-a", "k"))
    await asyncio.sleep(0.01)
    with pytest.raises(HTTPFailure) as failure:
        await asyncio.wait_for(post(svc, event(data={"id": "second"}), "key-a", "k"), 5)
    assert failure.value.code == errors.IDEMPOTENCY_KEY_REUSED
    same = asyncio.ensure_future(post(svc, event(data={"id": "first"}), "key-a", "k"))
    release.set()
    assert await first == await same and len(gateway.published) == 1


# -- a real server, both HTTP paths -------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_reused_key_with_another_body_is_422_on_both_paths(make_server):
    server = await make_server()
    fast, slow = await Raw.open(server.port), await Raw.open(server.port)
    try:
        once = {"Idempotency-Key": "order-11"}
        status, _, first = await fast.post(event(data={"id": "a"}), once)
        assert status == 202
        for raw, chunked in ((fast, False), (slow, True)):
            status, _, answer = await raw.post(event(data={"id": "b"}), once, chunked=chunked)
            assert (status, answer["error"]["code"]) == (422, "idempotency_key_reused")
            status, _, again = await raw.post(event(data={"id": "a"}), once, chunked=chunked)
            assert (status, again) == (202, first)
    finally:
        fast.close()
        slow.close()
