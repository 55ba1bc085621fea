"""The keep-alive fast path for ``POST /v1.0/events`` (wsgate/adapters/fast_ingest.py).

Plain ingest requests on a kept-alive connection are answered without
Tornado; the first request of any other shape hands the connection to
Tornado for good. Both must give the same answers, share replay and
idempotency memory, keep order, and keep the same time limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

import pytest

from tests.conftest import CUSTOMER, INGEST_KEY, event, wait_for
from tests.test_ingest import SECRET, signed

TOPIC = f"customer_id:{CUSTOMER}"


class Raw:
    """One kept-alive HTTP/1.1 connection, written and read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @staticmethod
    def request(body: Any, headers: dict[str, str] | None = None, *, key: str | None = INGEST_KEY,
                chunked: bool = False, line: str = "POST /v1.0/events HTTP/1.1") -> bytes:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = {"Host": "x", "Content-Type": "application/json"}
        if key is not None:
            head["Authorization"] = f"Bearer {key}"
        head.update(headers or {})
        if chunked:
            head["Transfer-Encoding"] = "chunked"
            data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        else:
            head["Content-Length"] = str(len(data))
        text = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
        return text.encode() + data

    async def response(self) -> tuple[int, dict[str, str], Any]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, json.loads(body) if body else None

    async def post(self, body: Any, headers: dict[str, str] | None = None,
                   **kw: Any) -> tuple[int, dict[str, str], Any]:
        self.writer.write(self.request(body, headers, **kw))
        await self.writer.drain()
        return await self.response()

    async def closed(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


def fast_count(server: Any) -> int:
    """Connections the fast path serves now."""
    return len(server.server.fast)


@pytest.mark.gen_test(timeout=30)
async def test_keep_alive_posts_and_a_pipeline_are_answered_in_order(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    raw = await Raw.open(server.port)
    try:
        ids = []
        for i in range(3):
            status, headers, body = await raw.post(event(data={"id": f"r{i}"}))
            assert status == 202 and body["accepted"] == 1, body
            assert headers["content-type"] == "application/json"
            ids += body["event_ids"]
        assert fast_count(server) == 1  # still on the fast path
        # Two requests in one write: two answers, in order.
        raw.writer.write(raw.request(event(data={"id": "p0"})) +
                         raw.request({"events": [event(data={"id": "p1"}),
                                                 event(data={"id": "p2"})]}))
        first, second = await raw.response(), await raw.response()
        assert (first[0], second[0]) == (202, 202)
        assert (first[2]["accepted"], second[2]["accepted"]) == (1, 2)
        ids += first[2]["event_ids"] + second[2]["event_ids"]
        frames = [await client.recv() for _ in range(6)]
        assert [f["event_id"] for f in frames] == ids
        assert [f["data"]["id"] for f in frames] == ["r0", "r1", "r2", "p0", "p1", "p2"]
    finally:
        raw.close()


#: Requests the fast path leaves to Tornado: how each is built, and Tornado's answer
#: (status, and whether it keeps the connection).
OTHER_SHAPES = {
    "another path": (lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200, True),
    "chunked body": (lambda: Raw.request(event(), chunked=True), 202, True),
    "HTTP/1.0": (lambda: Raw.request(event(), {"Connection": "keep-alive"},
                                     line="POST /v1.0/events HTTP/1.0"), 202, True),
    "query string": (lambda: Raw.request(event(), line="POST /v1.0/events?x=1 HTTP/1.1"),
                     202, True),
    "header twice": (lambda: Raw.request(event()).replace(
        b"Host: x\r\n", b"Host: x\r\nX-A: 1\r\nx-a: 2\r\n"), 202, True),
    "non-ASCII header": (lambda: Raw.request(event()).replace(
        b"Host: x\r\n", "Host: x\r\nX-A: caf\u00e9\r\n".encode("latin-1")), 202, True),
    "folded header": (lambda: Raw.request(event()).replace(
        b"Host: x\r\n", b"Host: x\r\nX-A: 1\r\n  more\r\n"), 400, False),
}


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("shape", sorted(OTHER_SHAPES))
async def test_any_other_request_hands_the_connection_to_tornado(make_server, shape):
    build, expected, stays_open = OTHER_SHAPES[shape]
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    raw = await Raw.open(server.port)
    try:
        status, _, body = await raw.post(event(data={"id": "fast"}))
        assert status == 202 and fast_count(server) == 1
        raw.writer.write(build())
        status, _, body = await raw.response()
        assert status == expected, (status, body)
        assert fast_count(server) == 0  # Tornado has it now, with the bytes already read
        assert (await client.recv())["data"]["id"] == "fast"
        if not stays_open:
            assert await raw.closed() == b""
            return
        if expected == 202:
            await client.recv()
        # Tornado keeps serving the connection, ingest included.
        status, _, body = await raw.post(event(data={"id": "after"}))
        assert status == 202, body
        assert (await client.recv())["data"]["id"] == "after"
    finally:
        raw.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_first_request_may_be_a_websocket_upgrade(make_server):
    server = await make_server()
    client = await server.connect()  # went through the fast path's hand-over
    assert (await client.subscribe(TOPIC))["topics"] == [TOPIC]
    assert fast_count(server) == 0


def failures(long_batch: list[Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    return {
        "415": (event(), {"key": INGEST_KEY, "headers": {"Content-Type": "text/plain"}}),
        "401 wrong key": (event(), {"key": "not-the-key"}),
        "401 bad scheme": (event(), {"key": None, "headers": {"Authorization": "Basic abc"}}),
        "401 none": (event(), {"key": None}),
        "401 bad signature": (event(), {"key": None, "headers": {
            "X-Wsgate-Timestamp": str(int(time.time())), "X-Wsgate-Signature": "v1=00"}}),
        "400 bad json": (b"{not json", {}),
        "400 idempotency key": (event(), {"headers": {"Idempotency-Key": "k" * 201}}),
        "413 batch": ({"events": long_batch}, {}),
        "422": ({"type": "Bad", "data": []}, {}),
    }


@pytest.mark.gen_test(timeout=30)
async def test_failures_are_answered_exactly_as_tornado_answers_them(make_server):
    server = await make_server(ingest={"max_batch": 2, "hmac_secrets": [SECRET]})
    cases = failures([event(), event(), event()])
    for name, (body, kw) in cases.items():
        answers = []
        for chunked in (False, True):  # chunked: Tornado's IngestHandler
            raw = await Raw.open(server.port)
            try:
                options = dict(kw)
                headers = options.pop("headers", None)
                status, head, decoded = await raw.post(body, headers, chunked=chunked, **options)
                answers.append((status, decoded, sorted(head)))
            finally:
                raw.close()
        assert answers[0] == answers[1], name
        assert str(answers[0][0]) == name.split()[0], (name, answers[0])


@pytest.mark.gen_test(timeout=30)
async def test_replays_and_idempotency_keys_are_shared_by_both_paths(make_server):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    client = await server.connect()
    await client.subscribe(TOPIC)
    body = json.dumps(event(data={"id": "signed"})).encode()
    headers = signed(body)
    fast, slow = await Raw.open(server.port), await Raw.open(server.port)
    try:
        assert (await fast.post(body, headers, key=None))[0] == 202
        status, _, answer = await slow.post(body, headers, key=None, chunked=True)
        assert (status, answer["error"]["code"]) == (409, "replayed")
        once = {"Idempotency-Key": "order-7"}
        status, _, first = await fast.post(event(data={"id": "idem"}), once)
        assert status == 202
        status, _, again = await slow.post(event(data={"id": "idem"}), once, chunked=True)
        assert (status, again) == (202, first)
        assert [(await client.recv())["data"]["id"] for _ in range(2)] == ["signed", "idem"]
        await client.no_frame()
    finally:
        fast.close()
        slow.close()


@pytest.mark.gen_test(timeout=30)
async def test_connection_close_and_a_half_closed_peer_still_get_their_answer(make_server):
    server = await make_server()
    raw = await Raw.open(server.port)
    status, headers, _ = await raw.post(event(), {"Connection": "close"})
    assert status == 202 and headers["connection"] == "close"
    assert await raw.closed() == b""
    raw.close()
    raw = await Raw.open(server.port)
    raw.writer.write(raw.request(event()))
    raw.writer.write_eof()  # sends its request, then shuts its side
    status, _, body = await raw.response()
    assert status == 202 and body["accepted"] == 1
    assert await raw.closed() == b""
    raw.close()


@pytest.mark.gen_test(timeout=30)
async def test_an_idle_or_slow_fast_path_connection_is_cut_at_the_idle_timeout(make_server):
    server = await make_server(server={"idle_connection_timeout": 1.0, "body_timeout": 1.0})
    raw = await Raw.open(server.port)
    try:
        assert (await raw.post(event()))[0] == 202
        started = time.monotonic()
        assert await raw.closed() == b""  # idle after an answer
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        raw.close()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        started = time.monotonic()
        assert await raw.closed() == b""
        assert 0.9 <= time.monotonic() - started < 3.0
    finally:
        raw.close()


@pytest.mark.gen_test(timeout=30)
async def test_access_log_and_metrics_count_fast_path_answers(make_server, caplog):
    server = await make_server()
    raw = await Raw.open(server.port)
    caplog.set_level(logging.INFO, logger="wsgate.access")
    try:
        assert (await raw.post({"events": [event(), event()]}))[0] == 202
        assert (await raw.post(event(), key="wrong-key"))[0] == 401
    finally:
        raw.close()
    lines = [r for r in caplog.records if r.name == "wsgate.access"]
    assert [(r.getMessage(), r.events_accepted) for r in lines] == [
        ("202 POST /v1.0/events", 2), ("401 POST /v1.0/events", 0)]
    assert lines[0].key_id.startswith("key:") and lines[1].key_id is None
    assert all(INGEST_KEY not in str(vars(r)) and "wrong-key" not in str(vars(r)) for r in lines)
    registry = server.gateway.metrics.registry
    assert registry.get_sample_value("wsgate_ingest_requests_total", {"status": "202"}) == 1
    assert registry.get_sample_value("wsgate_ingest_requests_total", {"status": "401"}) == 1
    assert registry.get_sample_value("wsgate_ingest_events_accepted_total") == 2


@pytest.mark.gen_test(timeout=30)
async def test_closing_the_server_closes_idle_fast_path_connections(make_server):
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        assert (await raw.post(event()))[0] == 202
        server.server.stop()
        await asyncio.wait_for(server.server.close_all_connections(), 5)
        assert await raw.closed() == b""
        assert fast_count(server) == 0
    finally:
        raw.close()


@pytest.mark.gen_test(timeout=60)
async def test_requests_split_anywhere_are_answered_whole_and_in_order(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    rng = random.Random(7)
    stream = b"".join(Raw.request(event(data={"id": f"s{i}"})) for i in range(3))
    for _ in range(15):
        cuts = sorted(rng.sample(range(1, len(stream)), 4))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        raw = await Raw.open(server.port)
        try:
            for piece in pieces:  # each piece its own segment: the server reads parts
                raw.writer.write(piece)
                await raw.writer.drain()
                await asyncio.sleep(0.005)
            answers = [await raw.response() for _ in range(3)]
            assert [a[0] for a in answers] == [202, 202, 202], (cuts, answers)
            assert fast_count(server) == 1
        finally:
            raw.close()
        assert [(await client.recv())["data"]["id"] for _ in range(3)] == ["s0", "s1", "s2"]
        await wait_for(lambda: fast_count(server) == 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_signed_request_refused_after_its_signature_logs_its_key(make_server, caplog):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    caplog.set_level(logging.INFO, logger="wsgate.access")
    for chunked in (False, True):  # the fast path, then Tornado's handler
        caplog.clear()
        # Distinct bodies per path: the same body signed in the same second is a replay.
        invalid = json.dumps({"type": "Bad", "data": {"path": int(chunked)}}).encode()
        good = json.dumps(event(data={"id": f"c{int(chunked)}"})).encode()
        headers = signed(good)
        raw = await Raw.open(server.port)
        try:
            assert (await raw.post(good, headers, key=None, chunked=chunked))[0] == 202
            assert (await raw.post(good, headers, key=None, chunked=chunked))[0] == 409
            assert (await raw.post(invalid, signed(invalid), key=None,
                                   chunked=chunked))[0] == 422
        finally:
            raw.close()
        lines = [(r.status, r.key_id) for r in caplog.records if r.name == "wsgate.access"]
        assert [status for status, _ in lines] == [202, 409, 422]
        assert all(kid and kid.startswith("hmac:") for _, kid in lines), lines


@pytest.mark.gen_test(timeout=30)
async def test_an_unexpected_failure_is_the_same_500_on_both_paths(make_server, monkeypatch):
    server = await make_server()

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug while publishing")

    monkeypatch.setattr(server.gateway, "publish", broken)
    answers = []
    for chunked in (False, True):
        raw = await Raw.open(server.port)
        try:
            status, head, body = await raw.post(event(), chunked=chunked)
            answers.append((status, body, sorted(head)))
        finally:
            raw.close()
    assert answers[0] == answers[1]
    assert answers[0][:2] == (500, {"error": {"code": "internal_error",
                                              "message": "the server failed; the error is logged"}})
