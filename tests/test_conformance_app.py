"""bench/ws_echo.py and bench/conformance.py, which ``make conformance`` runs
(not part of ``make test``): the echo answers through the real WebSocket
layer, and the summary counts Autobahn's verdicts per group."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
import tornado.testing

from bench.conformance import summarize
from bench.ws_echo import serve


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    assert len(payload) < 126
    key = os.urandom(4)
    return (bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + key
            + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))


@pytest.mark.gen_test(timeout=30)
async def test_the_echo_app_answers_through_the_real_layer():
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    server = asyncio.ensure_future(serve(port))
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.02)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        # Text in two fragments with a ping between, and binary: echoed.
        writer.write(masked(1, "é".encode()[:1], fin=False) + masked(9, b"hi")
                     + masked(0, "é".encode()[1:]) + masked(2, b"\xff\x00"))
        for frame in (bytes((0x8A, 2)) + b"hi", bytes((0x81, 2)) + "é".encode(),
                      bytes((0x82, 2)) + b"\xff\x00"):
            assert await asyncio.wait_for(reader.readexactly(len(frame)), 5) == frame
        # Invalid UTF-8: the layer closes with 1007.
        writer.write(masked(1, b"\xff"))
        head = await asyncio.wait_for(reader.readexactly(4), 5)
        assert head[0] == 0x88 and head[2:] == (1007).to_bytes(2, "big")
        await asyncio.wait_for(reader.readexactly(head[1] - 2), 5)
        # After a protocol error the server reads nothing more and shuts its side.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def test_the_summary_counts_verdicts_per_group_and_failures():
    index = {"wsgate": {
        "1.1.1": {"behavior": "OK", "behaviorClose": "OK"},
        "6.4.1": {"behavior": "NON-STRICT", "behaviorClose": "OK", "remoteCloseCode": 1007},
        "10.1.1": {"behavior": "FAILED", "behaviorClose": "OK"},
        "6.2.1": {"behavior": "OK", "behaviorClose": "OK"},
    }}
    table, failed = summarize(index)
    lines = table.splitlines()
    assert lines[2] == "| 1 | 1 | 1 | 0 | 0 | 0 | 0 | 1 |"
    assert lines[3] == "| 6 | 2 | 1 | 1 | 0 | 0 | 0 | 2 |"
    assert lines[4] == "| 10 | 1 | 0 | 0 | 0 | 0 | 1 | 1 |"
    assert "6.4.1: behaviour NON-STRICT" in table and failed == 1
