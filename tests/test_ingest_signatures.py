"""Signed ingest requests (wsgate/ingest.py) under hostile spellings, on both HTTP paths.

A signature is accepted once however its header is spelled (SPEC §3,
Framing: "a replayed signature is 409 however its header is spelled"), and
no header value from outside makes the server fail (no 500).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import CUSTOMER, event
from tests.test_fast_ingest import Raw
from tests.test_ingest import SECRET, signed

TOPIC = f"customer_id:{CUSTOMER}"


def respelled(headers: dict[str, str], how: str) -> dict[str, str]:
    """The same signature header, spelled another way that still verifies."""
    mac = headers["X-Wsgate-Signature"][3:]
    value = {"upper-case hex": f"v1={mac.upper()}",
             "mixed-case hex": "v1=" + "".join(c.upper() if i % 2 else c
                                               for i, c in enumerate(mac)),
             "space after =": f"v1= {mac}",
             "tab after =": f"v1=\t{mac}",
             "spaces around": f"v1=  {mac}  "}[how]
    return {**headers, "X-Wsgate-Signature": value}


SPELLINGS = ["upper-case hex", "mixed-case hex", "space after =", "tab after =", "spaces around"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("chunked", [False, True], ids=["fast path", "tornado"])
async def test_a_signature_is_accepted_once_however_it_is_spelled(make_server, chunked):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    client = await server.connect()
    await client.subscribe(TOPIC)
    body = json.dumps(event(data={"id": "once"})).encode()
    headers = signed(body)
    raw = await Raw.open(server.port)
    try:
        status, _, answer = await raw.post(body, headers, key=None, chunked=chunked)
        assert status == 202, answer
        for how in SPELLINGS:
            status, _, answer = await raw.post(body, respelled(headers, how), key=None,
                                               chunked=chunked)
            assert (status, answer["error"]["code"]) == (409, "replayed"), (how, answer)
    finally:
        raw.close()
    assert (await client.recv())["data"]["id"] == "once"
    await client.no_frame()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("chunked", [False, True], ids=["fast path", "tornado"])
async def test_a_respelled_signature_first_is_still_accepted_once(make_server, chunked):
    # The canonical spelling after an odd one is the replay this time.
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    body = json.dumps(event()).encode()
    headers = signed(body)
    raw = await Raw.open(server.port)
    try:
        first = await raw.post(body, respelled(headers, "upper-case hex"), key=None,
                               chunked=chunked)
        again = await raw.post(body, headers, key=None, chunked=chunked)
    finally:
        raw.close()
    assert (first[0], again[0]) == (202, 409)


#: Timestamps that str.isdigit() takes and int() does not, sent as the bytes a
#: client can put on the wire (Tornado reads header bytes as Latin-1).
NOT_ASCII_DIGITS = [b"\xb2", b"\xb9\xb3", b"1\xb2", b"\xc2\xb2"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("stamp", NOT_ASCII_DIGITS, ids=repr)
async def test_a_timestamp_of_non_ascii_digits_is_401_not_500(make_server, stamp):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    body = json.dumps(event()).encode()
    request = Raw.request(body, {"X-Wsgate-Timestamp": "STAMP", "X-Wsgate-Signature": "v1=00"},
                          key=None).replace(b"STAMP", stamp)
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(request)
        status, _, answer = await raw.response()
    finally:
        raw.close()
    assert status == 401 and answer["error"]["code"] == "unauthenticated", answer
    assert "unix seconds" in answer["error"]["message"]


@pytest.mark.gen_test(timeout=30)
async def test_a_timestamp_of_thousands_of_digits_is_401_not_500(make_server):
    server = await make_server(ingest={"hmac_secrets": [SECRET]})
    body = json.dumps(event()).encode()
    raw = await Raw.open(server.port)
    try:
        status, _, answer = await raw.post(body, {"X-Wsgate-Timestamp": "1" * 5000,
                                                  "X-Wsgate-Signature": "v1=00"}, key=None)
    finally:
        raw.close()
    assert status == 401 and answer["error"]["code"] == "unauthenticated", answer
