"""How the server frames requests, over the wire (SPEC §3, Framing).

A request is framed as RFC 9112 and h11 frame it, or refused with 400: ``Host``
is required, ``Content-Length`` is decimal digits of sane length,
``Connection`` tokens compare case-insensitively, and ``Connection: close``
closes the connection after its answer. The fast path (which sees the first
request of every connection) and Tornado (which has the connection after a
hand-over) both; tests/test_fast_ingest_h11.py compares the fast path's
framer with h11 on generated requests.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import CUSTOMER, event
from tests.test_fast_ingest import Raw, fast_count

TOPIC = f"customer_id:{CUSTOMER}"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    found = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not found, found


async def refused(raw: Raw, message: str | None = None) -> None:
    """The next answer is the 400 the server closes after, and then the connection ends."""
    status, headers, body = await raw.response()
    assert status == 400, (status, body)
    assert body["error"]["code"] == "bad_request"
    if message is not None:
        assert message in body["error"]["message"], body
    assert headers.get("connection") == "close"
    assert await raw.closed() == b""


# -- Connection tokens --------------------------------------------------------

CLOSING = ["Close", "CLOSE", "close", "keep-alive, Close", "close, keep-alive",
           "Keep-Alive ,  CLOSE", "keep-alive,close,"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("value", CLOSING)
async def test_connection_close_in_any_case_closes_after_the_answer(make_server, value):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    raw = await Raw.open(server.port)
    try:
        # A second request pipelined behind the closing one is never answered.
        raw.writer.write(raw.request(event(data={"id": "first"}), {"Connection": value}) +
                         raw.request(event(data={"id": "second"})))
        status, headers, _ = await raw.response()
        assert status == 202 and headers["connection"] == "close"
        assert await raw.closed() == b""
    finally:
        raw.close()
    assert (await client.recv())["data"]["id"] == "first"
    await client.no_frame()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("value", ["keep-alive, Close", "close, keep-alive",
                                   "Keep-Alive ,  CLOSE"])
async def test_tornado_too_closes_on_a_close_token_in_a_list(make_server, value):
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        # Not an ingest request: Tornado answers it, and must close after it.
        raw.writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: {value}\r\n\r\n"
                         "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = await raw.response()
        assert status == 200 and body == {"status": "ok"}
        assert await raw.closed() == b""
    finally:
        raw.close()


@pytest.mark.gen_test(timeout=30)
async def test_tornado_closes_on_a_close_token_given_in_a_second_header(make_server):
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                         b"Connection: close\r\n\r\n"
                         b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response())[0] == 200
        assert await raw.closed() == b""
    finally:
        raw.close()


# -- Content-Length -----------------------------------------------------------

def with_length(length: bytes, body: bytes = b"") -> bytes:
    return (b"POST /v1.0/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer test-ingest-key\r\nContent-Length: " + length +
            b"\r\n\r\n" + body)


LONG_LENGTHS = {"4301 ones": b"1" * 4301, "4301 zeros": b"0" * 4301,
                "21 digits": b"1" * 21, "zeros then 5, 21 digits": b"0" * 20 + b"5"}


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("name", sorted(LONG_LENGTHS))
async def test_a_content_length_of_too_many_digits_is_400_at_once(make_server, caplog, name):
    caplog.set_level(logging.DEBUG)
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(with_length(LONG_LENGTHS[name]))
        await refused(raw, "Content-Length")
    finally:
        raw.close()
    no_tracebacks(caplog)


@pytest.mark.gen_test(timeout=30)
async def test_a_content_length_of_too_many_digits_after_a_hand_over_is_400(make_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        assert (await raw.post(event(), chunked=True))[0] == 202  # Tornado has it now
        assert fast_count(server) == 0
        raw.writer.write(with_length(b"1" * 4301))
        status, _, _ = await raw.response()
        assert status == 400
    finally:
        raw.close()
    no_tracebacks(caplog)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("zeros", [1, 5, 16])
async def test_a_content_length_with_leading_zeros_is_its_value(make_server, zeros):
    # RFC 9112 and h11 read "0042" as 42; so does the fast path, within 20 digits.
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    body = json.dumps(event(data={"id": f"z{zeros}"})).encode()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(with_length(b"0" * zeros + str(len(body)).encode(), body) +
                         with_length(b"0" * zeros + str(len(body)).encode(), body))
        assert [(await raw.response())[0] for _ in range(2)] == [202, 202]
        assert fast_count(server) == 1
    finally:
        raw.close()
    assert [(await client.recv())["data"]["id"] for _ in range(2)] == [f"z{zeros}"] * 2


# -- Host and the request line ------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_a_request_without_host_is_400_and_publishes_nothing(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(raw.request(event()).replace(b"Host: x\r\n", b""))
        await refused(raw, "Host")
    finally:
        raw.close()
    await client.no_frame()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("hosts", [b"Host: x\r\nHost: y\r\n", b"Host: x\r\nhost: x\r\n"])
async def test_a_request_with_two_hosts_is_400(make_server, hosts):
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(raw.request(event()).replace(b"Host: x\r\n", hosts))
        status, _, _ = await raw.response()
        assert status == 400
        assert await raw.closed() == b""
    finally:
        raw.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("blank", [b"\r\n", b"\n", b"\r\n\r\n", b" "])
@pytest.mark.parametrize("what", ["ingest", "another path"])
async def test_a_blank_line_before_the_request_line_is_400(make_server, blank, what):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(TOPIC)
    request = Raw.request(event()) if what == "ingest" else \
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(blank + request)
        await refused(raw)
    finally:
        raw.close()
    await client.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_a_blank_line_between_pipelined_requests_is_400(make_server):
    server = await make_server()
    raw = await Raw.open(server.port)
    try:
        raw.writer.write(raw.request(event()) + b"\r\n" + raw.request(event()))
        assert (await raw.response())[0] == 202
        await refused(raw)
    finally:
        raw.close()
