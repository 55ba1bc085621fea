"""SPEC §3 against a real server: every answer of POST /v1.0/events."""

import asyncio
import hashlib
import hmac
import json
import time

import pytest

from tests.conftest import CUSTOMER, event

SECRET = "hmac-secret"


def signed(body: bytes, secret: str = SECRET, stamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if stamp is None else stamp)
    mac = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Wsgate-Timestamp": ts, "X-Wsgate-Signature": f"v1={mac}"}


@pytest.mark.gen_test(timeout=20)
async def test_single_event_202(make_server):
    server = await make_server()
    status, body = await server.post(event(event_id="0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"))
    assert status == 202
    assert body == {"accepted": 1, "event_ids": ["0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"]}


@pytest.mark.gen_test(timeout=20)
async def test_batch_202(make_server):
    server = await make_server()
    status, body = await server.post({"events": [event(), event("call_ended")]})
    assert status == 202 and body["accepted"] == 2 and len(set(body["event_ids"])) == 2


@pytest.mark.gen_test(timeout=20)
async def test_not_json_400(make_server):
    server = await make_server()
    status, body = await server.post(b"{not json")
    assert status == 400 and body["error"]["code"] == "bad_json"


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_bad_credentials_401(make_server, key):
    server = await make_server()
    status, body = await server.post(event(), key=key)
    assert status == 401 and body["error"]["code"] == "unauthenticated"


@pytest.mark.gen_test(timeout=20)
async def test_wrong_content_type_415(make_server):
    server = await make_server()
    status, body = await server.post(event(), content_type="text/plain")
    assert status == 415 and "application/json" in body["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_batch_too_large_413(make_server):
    server = await make_server(ingest={"max_batch": 3})
    status, body = await server.post({"events": [event()] * 4})
    assert status == 413 and "at most 3" in body["error"]["message"]


@pytest.mark.gen_test(timeout=20)
async def test_body_too_large_413(make_server):
    server = await make_server(ingest={"max_body_bytes": 1000})
    status, body = await server.post(event(data={"pad": "x" * 2000}))
    assert status == 413 and body["error"]["code"] == "payload_too_large"


@pytest.mark.gen_test(timeout=20)
async def test_413_before_the_body_is_sent(make_server, io_loop):
    server = await make_server(ingest={"max_body_bytes": 1000})
    # Announce a huge body and send none of it: the answer comes anyway.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer test-ingest-key\r\nContent-Length: 100000000\r\n\r\n")
        try:
            data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except asyncio.IncompleteReadError as exc:  # closed before a whole head
            data = exc.partial
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:100]


@pytest.mark.gen_test(timeout=20)
async def test_invalid_batch_422_publishes_nothing(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{CUSTOMER}")
    bad = {"events": [event(), event(customer_id=CUSTOMER.upper()), event(type="connected")]}
    status, body = await server.post(bad)
    assert status == 422
    err = body["error"]
    assert err["code"] == "invalid_event"
    assert {(d["index"], d["field"]) for d in err["details"]} == {(1, "customer_id"), (2, "type")}
    await client.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_hmac_signature_accepted_and_delivered(make_server):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    client = await server.connect()
    await client.subscribe(f"customer_id:{CUSTOMER}")
    body = json.dumps(event()).encode()
    status, answer = await server.post(body, key=None, headers=signed(body))
    assert status == 202, answer
    assert (await client.recv())["type"] == "call_created"


@pytest.mark.gen_test(timeout=20)
async def test_hmac_mutated_stale_and_replayed_are_refused(make_server):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    client = await server.connect()
    await client.subscribe(f"customer_id:{CUSTOMER}")
    body = json.dumps(event()).encode()
    headers = signed(body)
    mutated = body.replace(b"call_created", b"call_updated")
    assert (await server.post(mutated, key=None, headers=headers))[0] == 401
    old = signed(body, stamp=int(time.time()) - 301)
    assert (await server.post(body, key=None, headers=old))[0] == 401
    assert (await server.post(body, key=None, headers=signed(body, "other")))[0] == 401
    assert (await server.post(body, key=None, headers=headers))[0] == 202
    assert (await client.recv())["type"] == "call_created"
    status, answer = await server.post(body, key=None, headers=headers)
    assert status == 409 and answer["error"]["code"] == "replayed"
    await client.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_idempotency_key_publishes_once(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(f"customer_id:{CUSTOMER}")
    first = await server.post(event(), headers={"Idempotency-Key": "retry-1"})
    second = await server.post(event(), headers={"Idempotency-Key": "retry-1"})
    assert first == second and first[0] == 202
    assert (await client.recv())["event_id"] == first[1]["event_ids"][0]
    await client.no_frame()


@pytest.mark.gen_test(timeout=20)
async def test_unknown_path_is_json_404(make_server):
    server = await make_server()
    response = await server.http.fetch(server.base + "/v2/nothing", raise_error=False)
    assert response.code == 404
    assert json.loads(response.body)["error"]["code"] == "not_found"


@pytest.mark.gen_test(timeout=20)
async def test_health_and_ready(make_server):
    server = await make_server()
    ok = await server.http.fetch(server.base + "/healthz")
    ready = await server.http.fetch(server.base + "/readyz")
    assert json.loads(ok.body) == {"status": "ok"}
    assert json.loads(ready.body)["ready"] is True
