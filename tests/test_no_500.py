"""No request from outside, however malformed, makes the server answer 5xx or log a traceback.

SPEC §3, Framing: "No request from outside, however malformed, produces a 500."
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import base_config

AUDIT_KEY = "audit-key-no-500"


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, half-close, and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def statuses(answer: bytes) -> list[int]:
    """The status of every response in ``answer`` (pipelined answers included)."""
    found = []
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and line[8:9] == b" " and line[9:12].isdigit():
            found.append(int(line[9:12]))
    return found


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records
            if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("path", ["/audit/review.js%00", "/audit/%00", "/audit/x%00y.css",
                                  "/audit/review.js%00?token=abc"])
async def test_a_nul_in_a_review_page_path_is_not_a_500(make_server, tmp_path, caplog, path):
    caplog.set_level(logging.DEBUG)
    server = await make_server(base_config(tmp_path, audit={"api_keys": [AUDIT_KEY]}))
    answer = await exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert statuses(answer) == [404], answer[:200]
    assert not tracebacks(caplog.records)
