"""Hardening, continued: slow consumers (4008), dead peers (ping timeout), ingest
signatures that are mutated, replayed or badly formed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from tests.conftest import CUSTOMER, event, wait_for
from tests.test_hardening import SOAK, db_rows
from tests.wsclient import RawWebSocket

C = CUSTOMER
ALL = f"customer_id:{C}"
SECRET = "hmac-secret"


class PendingMeter:
    """Wraps a connection's real transport and records its unsent bytes after every write."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.peak = 0
        self.closed = False
        self.after_close = 0

    def send_text(self, text: str) -> None:
        self.inner.send_text(text)
        self._measure()

    def send_wire(self, frame: bytes) -> int:
        if self.closed:
            self.after_close += len(frame)
        pending = int(self.inner.send_wire(frame))
        self._measure()
        return pending

    def pending_bytes(self) -> int:
        return int(self.inner.pending_bytes())

    def close(self, code: int, reason: str) -> None:
        self.closed = True
        self.inner.close(code, reason)

    def _measure(self) -> None:
        self.peak = max(self.peak, self.pending_bytes())


@pytest.mark.gen_test(timeout=300 if SOAK else 60)
@pytest.mark.parametrize("limit", [64 * 1024, 1024 * 1024] if SOAK else [64 * 1024])
async def test_slow_consumer_is_closed_4008_with_bounded_memory_and_others_keep_up(
        make_server, limit):
    server = await make_server(server={"max_output_buffer": limit})
    slow = await RawWebSocket.connect(server.port, rcvbuf=4096)
    try:
        hello = await slow.recv_json(skip_pings=True)
        await slow.send_text(json.dumps({"type": "subscribe", "topics": [ALL]}))
        assert (await slow.recv_json(skip_pings=True))["topics"] == [ALL]
        conn = server.gateway.connections[hello["connection_id"]]
        meter = PendingMeter(conn.transport)
        conn.transport = meter
        good = await server.connect()
        await good.subscribe(ALL)
        received: list[int] = []

        async def read_all() -> None:
            while (frame := await good.recv(timeout=30)) is not None:
                received.append(frame["data"]["n"])

        reader = asyncio.ensure_future(read_all())
        # The slow peer reads nothing from here on. Each POST is 8 events of 4 KiB.
        pad = "x" * 4096
        sent = 0
        while hello["connection_id"] in server.gateway.connections:
            assert sent < 20_000, "never closed as a slow consumer"
            batch = [event(data={"id": "r", "n": sent + i, "pad": pad}) for i in range(8)]
            status, _ = await server.post({"events": batch})
            assert status == 202
            sent += 8
        # Memory held for it stays near the limit: at most one batch over it, and
        # nothing is queued for it after the close.
        assert limit < meter.peak <= limit + 8 * (4096 + 200), meter.peak
        assert meter.after_close == 0
        # It is told why: a close frame with 4008 (after whatever the kernel still held).
        code = None
        while code is None:
            opcode, payload = await slow.recv(timeout=10)
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
        assert code == 4008
        # The well-behaved client received every event, in order.
        await wait_for(lambda: len(received) == sent, timeout=20)
        assert received == list(range(sent))
        reader.cancel()
        assert server.gateway.stats["slow_consumer_closes"] == 1
        ends = await wait_for(lambda: [r for r in db_rows(server.config.audit.url)
                                       if r["connection_id"] == hello["connection_id"]
                                       and r["action"] == "unsubscribe"])
        assert [(r["topic"], r["outcome"], r["code"]) for r in ends] == \
            [(ALL, "accepted", "slow_consumer")]
    finally:
        slow.close()


@pytest.mark.gen_test(timeout=30)
async def test_dead_peer_is_closed_by_the_ping_timeout_and_its_subscriptions_end(make_server):
    server = await make_server(server={"ping_interval": 0.5, "ping_timeout": 0.5})
    dead = await RawWebSocket.connect(server.port)
    try:
        hello = await dead.recv_json(skip_pings=True)
        await dead.send_text(json.dumps({"type": "subscribe", "topics": [ALL]}))
        assert (await dead.recv_json(skip_pings=True))["topics"] == [ALL]
        alive = await server.connect()  # answers pings (Tornado's client does)
        await alive.subscribe(ALL)
        started = time.monotonic()
        # From here the dead peer answers nothing; it is not even read.
        ends = await wait_for(lambda: [r for r in db_rows(server.config.audit.url)
                                       if r["connection_id"] == hello["connection_id"]
                                       and r["action"] == "unsubscribe"], timeout=15)
        # ping interval + timeout, then Tornado's 5 s wait for a close handshake.
        assert time.monotonic() - started < 8.0
        assert [(r["topic"], r["outcome"], r["code"]) for r in ends] == \
            [(ALL, "accepted", "disconnect")]
        assert hello["connection_id"] not in server.gateway.connections
        assert len(server.gateway.index) == 1
        # The live client, which answered every ping meanwhile, still gets events.
        assert (await server.post(event()))[0] == 202
        assert (await alive.recv())["type"] == "call_created"
    finally:
        dead.close()


def signed(body: bytes, secret: str = SECRET, stamp: int | None = None,
           scheme: str = "v1=") -> dict[str, str]:
    ts = str(int(time.time()) if stamp is None else stamp)
    mac = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Wsgate-Timestamp": ts, "X-Wsgate-Signature": f"{scheme}{mac}"}


@pytest.mark.gen_test(timeout=30)
async def test_forged_signatures_are_refused_and_publish_nothing(make_server):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    client = await server.connect()
    await client.subscribe(ALL)
    body = json.dumps(event()).encode()
    now = int(time.time())
    good = signed(body, stamp=now)
    mac = good["X-Wsgate-Signature"][3:]
    forged = [
        # A valid signature, sent with another timestamp than the one it covers.
        {"X-Wsgate-Timestamp": str(now - 1), "X-Wsgate-Signature": f"v1={mac}"},
        # Wrong or missing scheme prefix.
        signed(body, stamp=now, scheme="v2="),
        signed(body, stamp=now, scheme="sha256="),
        signed(body, stamp=now, scheme=""),
        signed(body, stamp=now, scheme="V1="),
        # Truncated, empty, and not hex.
        {"X-Wsgate-Timestamp": str(now), "X-Wsgate-Signature": f"v1={mac[:32]}"},
        {"X-Wsgate-Timestamp": str(now), "X-Wsgate-Signature": "v1="},
        {"X-Wsgate-Timestamp": str(now), "X-Wsgate-Signature": "v1=" + "zz" * 32},
        # Timestamps that are not unix seconds, or far in the future.
        {**signed(body, stamp=now), "X-Wsgate-Timestamp": f"{now}.0"},
        {**signed(body, stamp=now), "X-Wsgate-Timestamp": f"+{now}"},
        {**signed(body, stamp=now), "X-Wsgate-Timestamp": ""},
        # Far enough in the future that a slow run cannot bring it back into the window.
        signed(body, stamp=now + 600),
        # A signature over the body without the timestamp.
        {"X-Wsgate-Timestamp": str(now),
         "X-Wsgate-Signature": "v1=" + hmac.new(SECRET.encode(), body,
                                                hashlib.sha256).hexdigest()},
        # Only the timestamp header.
        {"X-Wsgate-Timestamp": str(now)},
    ]
    for headers in forged:
        status, answer = await server.post(body, key=None, headers=headers)
        assert status == 401, (headers, answer)
        assert answer["error"]["code"] == "unauthenticated"
    # A valid signature with a Bearer header that is not an ingest key: the key is checked.
    status, _ = await server.post(body, key="not-a-key", headers=good)
    assert status == 401
    # Extra bytes after the signed body (appended by a man in the middle).
    status, _ = await server.post(body + b" ", key=None, headers=good)
    assert status == 401
    await client.no_frame()
    # The genuine request still goes through once, and only once.
    assert (await server.post(body, key=None, headers=good))[0] == 202
    assert (await client.recv())["type"] == "call_created"
    assert (await server.post(body, key=None, headers=good))[0] == 409
    await client.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_idempotency_key_is_per_ingest_key_and_survives_concurrent_retries(make_server):
    server = await make_server(ingest={"keys": ["key-a", "key-b"]})
    client = await server.connect()
    await client.subscribe(ALL)
    # Concurrent retries of one request publish once and all get the same answer...
    answers = await asyncio.gather(*[
        server.post(event(), key="key-a", headers={"Idempotency-Key": "k1"}) for _ in range(5)])
    first = answers[0]
    assert first[0] == 202
    assert (await client.recv())["event_id"] == first[1]["event_ids"][0]
    for answer in answers[1:]:
        assert answer == first
    await client.no_frame()
    # ...while another backend's key with the same Idempotency-Key is its own request.
    other = await server.post(event(), key="key-b", headers={"Idempotency-Key": "k1"})
    assert other[0] == 202 and other[1]["event_ids"] != first[1]["event_ids"]
    assert (await client.recv())["event_id"] == other[1]["event_ids"][0]
    # An oversized key is refused, not truncated into another request's key.
    status, answer = await server.post(event(), key="key-a",
                                       headers={"Idempotency-Key": "k" * 201})
    assert status == 400 and "Idempotency-Key" in answer["error"]["message"]
    await client.no_frame()
