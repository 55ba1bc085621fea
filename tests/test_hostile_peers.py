"""Hostile WebSocket peers against a real ``python -m wsgate serve`` process.

Each attack runs on one connection while another client keeps receiving
events, and asserts what an operator would check: the server's resident
memory (``VmRSS`` of the process) stays bounded, the connection is closed
with the documented code (the close frame the attacker reads, and the
server's "connection closed" log line), and the other client got every event
in order meanwhile. Attacks are bounded in bytes and time, loopback only.
The limits are in docs/security.md; the parser's side of them is in
tests/test_wsframes.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.testing

from tests.conftest import CUSTOMER, INGEST_KEY, TOKENS, wait_for
from tests.wsclient import OP_CLOSE, RawWebSocket, frame
from wsgate import errors

REPO = Path(__file__).resolve().parent.parent
EVERYTHING = f"customer_id:{CUSTOMER}"
#: How much the server's RSS may grow during an attack: the 1 MiB budget, a
#: read's worth of replies, allocator slack. The attacks below grew it by
#: 25-60 MB before the budget and the fragment cap existed.
RSS_GROWTH_LIMIT = 12 * 1024 * 1024


async def close_code(peer: RawWebSocket, timeout: float) -> int | None:
    """Read (and drop) everything up to the server's close frame; its code. Answers
    it, as a polite peer would, so the server closes TCP at once."""
    code = await peer.recv_close(timeout)
    try:
        await peer.send(frame(OP_CLOSE, code.to_bytes(2, "big") if code else b""))
    except OSError:
        pass
    return code


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


class Serve:
    """``python -m wsgate serve`` on an unused port, logging JSON lines to a file."""

    def __init__(self, tmp_path: Path, **server: Any) -> None:
        sock, self.port = tornado.testing.bind_unused_port()
        sock.close()
        tables: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port, "node_id": f"hostile-{self.port}",
                       **server},
            "auth": {"plugin": "static", "options": {"tokens": {
                "admin-token": TOKENS["admin-token"]}}},
            "ingest": {"keys": [INGEST_KEY]},
            "audit": {"url": f"sqlite:///{tmp_path}/audit.db",
                      "journal_path": f"{tmp_path}/audit.journal"},
            "logging": {"format": "json"},
        }
        config = tmp_path / "wsgate.toml"
        config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in values.items())
            for name, values in tables.items()))
        self.log_path = tmp_path / "serve.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(config)],
            cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        self._read = 0
        self.closed: dict[str, int] = {}

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                response = await tornado.httpclient.AsyncHTTPClient().fetch(
                    f"http://127.0.0.1:{self.port}/healthz",
                                                  raise_error=False, request_timeout=1)
                if response.code == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "wsgate serve did not start:\n" + self.output()
            await asyncio.sleep(0.05)

    def rss(self) -> int:
        """The server process's resident memory, in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def close_code(self, connection_id: str) -> int | None:
        """The close code of the server's "connection closed" line for it, once written."""
        self.log.flush()
        with self.log_path.open("rb") as f:
            f.seek(self._read)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._read += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("message") == "connection closed":
                self.closed[record["connection_id"]] = record["close_code"]
        return self.closed.get(connection_id)

    async def post(self, n: int) -> None:
        body = {"type": "call_created", "customer_id": CUSTOMER, "data": {"id": "r", "n": n}}
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{self.port}/v1.0/events", method="POST", body=json.dumps(body),
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {INGEST_KEY}"}, request_timeout=10)
        assert response.code == 202

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Awaitable[Serve]]]:
    """``await serve(**server_keys)``: a started server process with those [server] keys."""
    servers: list[Serve] = []

    async def start(**server: Any) -> Serve:
        started = Serve(tmp_path, **server)
        servers.append(started)
        await started.ready()
        return started

    try:
        yield start
    finally:
        for started in servers:
            started.stop()


class RSSMeter:
    """Samples the server's RSS every few milliseconds; ``peak`` is the highest."""

    def __init__(self, server: Serve) -> None:
        self.server = server
        self.baseline = self.peak = server.rss()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.server.rss())
            await asyncio.sleep(0.005)

    def stop(self) -> int:
        self.task.cancel()
        self.peak = max(self.peak, self.server.rss())
        return self.peak - self.baseline


async def attack(server: Serve, chunks: Callable[[], bytes], max_bytes: int,
                 expected: int) -> dict[str, Any]:
    """Run one attack: a hostile peer sends chunks (reading nothing) until the
    server closes it or max_bytes are sent, while a good client receives an
    event every 50 ms. Checks the close code, RSS and the good client's
    events; returns the figures."""
    good = await RawWebSocket.connect(server.port)
    hostile = await RawWebSocket.connect(server.port, rcvbuf=4096)
    try:
        await good.recv_json(skip_pings=True)
        await good.send(frame(1, json.dumps(
            {"type": "subscribe", "topics": [EVERYTHING]}).encode()))
        assert (await good.recv_json(skip_pings=True))["topics"] == [EVERYTHING]
        hostile_id = (await hostile.recv_json(skip_pings=True))["connection_id"]
        received: list[int] = []
        posted = 0  # answered 202
        sending = 0  # POSTs begun: one more than posted while a POST waits for its 202

        async def keep_delivering() -> None:
            nonlocal posted, sending
            while True:
                sending = posted + 1
                await server.post(posted)
                posted += 1
                await asyncio.sleep(0.05)

        async def read_events() -> None:
            while True:
                got = await good.recv_json(timeout=30, skip_pings=True)
                received.append(got["data"]["n"])

        # Let the start-up settle before the baseline (a first event delivered).
        await server.post(-1)
        assert (await good.recv_json(skip_pings=True))["data"]["n"] == -1
        meter = RSSMeter(server)
        delivering = asyncio.ensure_future(keep_delivering())
        reading = asyncio.ensure_future(read_events())
        started = time.monotonic()
        sent = 0
        try:
            while sent < max_bytes and server.close_code(hostile_id) is None:
                chunk = chunks()
                try:
                    await asyncio.wait_for(hostile.send(chunk), 10)
                except (OSError, TimeoutError):
                    break
                sent += len(chunk)
            attack_s = time.monotonic() - started
            # The server's account, then what the attacker is told (read now, as
            # the server waits 2 s for it before dropping the connection).
            logged = await wait_log(server, hostile_id)
            try:
                told = await close_code(hostile, timeout=5) if logged is not None else None
            except (OSError, EOFError, TimeoutError):
                told = None
            growth = meter.stop()
            # However soon the attack ended, a few events go out around it.
            while posted < 3:
                await asyncio.sleep(0.01)
        finally:
            meter.task.cancel()
            delivering.cancel()
        # The good client got every event posted meanwhile, in order.
        deadline = time.monotonic() + 10
        while len(received) < posted and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        reading.cancel()
        figures = {"sent_mb": round(sent / 2**20, 1), "attack_s": round(attack_s, 2),
                   "rss_baseline_mb": round(meter.baseline / 2**20, 1),
                   "rss_peak_mb": round(meter.peak / 2**20, 1),
                   "rss_growth_mb": round(growth / 2**20, 1), "logged": logged, "told": told,
                   "events": posted}
        print("\nattack:", json.dumps(figures))
        assert (logged, told) == (expected, expected), figures
        assert growth < RSS_GROWTH_LIMIT, figures
        # Delivery does not wait for the 202 (which follows the event's audit
        # record): the POST cancelled in flight may have been delivered too.
        assert received in (list(range(posted)), list(range(sending))), (posted, received)
        # The server is still fine for the good client.
        await good.send(frame(1, b'{"type":"ping","id":"after"}'))
        assert await good.recv_json(skip_pings=True) == {"type": "pong", "id": "after"}
        return figures
    finally:
        good.close()
        hostile.close()


async def wait_log(server: Serve, connection_id: str, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while (code := server.close_code(connection_id)) is None:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.01)
    return code


@pytest.mark.gen_test(timeout=120)
async def test_ping_flood_from_a_peer_that_never_reads(serve):
    # Pings of 125 bytes, 512 per write; their pongs go unread.
    burst = frame(0x9, b"p" * 125) * 512
    await attack(await serve(), lambda: burst, 48 * 2**20, errors.CLOSE_SLOW_CONSUMER)


@pytest.mark.gen_test(timeout=120)
async def test_endless_empty_continuation_frames(serve):
    # One text frame without FIN, then empty continuations without end.
    first = [frame(0x1, b"[", fin=False)]
    empties = frame(0x0, b"", fin=False) * 20_000

    def chunks() -> bytes:
        return first.pop() + empties if first else empties

    await attack(await serve(), chunks, 18 * 2**20, errors.CLOSE_TOO_BIG)


@pytest.mark.gen_test(timeout=120)
async def test_huge_message_in_a_series_of_fragments(serve):
    # 16 KiB fragments of one message, never ending: refused at the size limit.
    first = [frame(0x1, b"[" * 16384, fin=False)]
    more = frame(0x0, b"1" * 16384, fin=False)

    def chunks() -> bytes:
        return first.pop() if first else more

    await attack(await serve(), chunks, 48 * 2**20, errors.CLOSE_TOO_BIG)


@pytest.mark.gen_test(timeout=120)
async def test_protocol_pongs_never_read(serve):
    # {"type":"ping"} messages (with the longest id, so each pong reply is ~290
    # bytes), none of the replies read. With the message rate unlimited (0, an
    # operator's choice) they pile up fast; at the default rate they pile up at
    # 100 replies a second, which the budget stops as well, only later.
    ping = frame(0x1, json.dumps({"type": "ping", "id": "i" * 256}).encode())
    burst = ping * 200
    await attack(await serve(max_messages_per_second=0), lambda: burst, 40 * 2**20,
                 errors.CLOSE_SLOW_CONSUMER)


# -- the budget as the connection accounts it (in-process, a transport that never drains) --


class StuckTransport(asyncio.Transport):
    """A transport whose peer never reads: everything written stays buffered."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.closed = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        # As a real transport does: connection_lost follows, at once.
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
            self.protocol = None
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def stuck_connection(server: Any) -> tuple[Any, StuckTransport]:
    from wsgate.adapters.wsconn import WebSocketConnection

    registry = server.server.websockets
    principal = await server.gateway.authenticate("admin-token")
    ws = WebSocketConnection(server.gateway, registry, principal, "127.0.0.1", None, None, b"")
    transport = StuckTransport()
    transport.protocol = ws
    ws.connection_made(transport)
    transport.buffer.clear()  # the "connected" frame was read
    return ws, transport


def close_code_written(transport: StuckTransport) -> int | None:
    """The code of the close frame at the end of what was written, if any."""
    buf = transport.buffer
    at = buf.rfind(b"\x88")
    if at < 0 or at + 2 + buf[at + 1] != len(buf):
        return None
    return int.from_bytes(buf[at + 2:at + 4], "big")


@pytest.mark.gen_test(timeout=30)
async def test_pongs_count_against_the_budget_and_are_written_one_buffer_per_read(make_server):
    budget = 64 * 1024
    server = await make_server(server={"max_output_buffer": budget})
    ws, transport = await stuck_connection(server)
    read = frame(0x9, b"p" * 125) * 100  # one read: 100 pings
    peak = 0
    for _ in range(200):
        ws.data_received(read)
        peak = max(peak, ws.pending_bytes())
        await asyncio.sleep(0)  # the close is done at the next loop iteration
        if ws.conn.closed:
            break
    assert ws.conn.closed and ws.conn.close_code == errors.CLOSE_SLOW_CONSUMER
    assert close_code_written(transport) == errors.CLOSE_SLOW_CONSUMER
    # Held at most the budget plus one read's pongs.
    assert budget < peak <= budget + 100 * 127
    # Nothing more is answered while it waits for the peer's close frame.
    written = len(transport.buffer)
    ws.data_received(read)
    assert len(transport.buffer) == written
    transport.abort()


@pytest.mark.gen_test(timeout=30)
async def test_a_fragmented_message_counts_against_the_budget_with_unsent_output(make_server):
    budget = 64 * 1024
    server = await make_server(server={"max_output_buffer": budget,
                                       "max_message_size": 256 * 1024,
                                       "max_messages_per_second": 0})
    ws, transport = await stuck_connection(server)
    # A message larger than the budget, held while nothing is owed: allowed (its
    # own limit is max_message_size).
    big = b" " * (100 * 1024)
    ws.data_received(frame(0x1, b"[" + big, fin=False))
    assert ws.parser.buffered > budget and not ws.conn.closed
    ws.data_received(frame(0x0, b"]"))
    await asyncio.sleep(0)
    assert not ws.conn.closed
    # Now replies owed (never read) and a fragment held: together past the budget.
    reply_bytes = len(transport.buffer)
    ping = frame(0x1, json.dumps({"type": "ping", "id": "i" * 200}).encode())
    ws.data_received(ping * 100)
    owed = len(transport.buffer) - reply_bytes
    assert owed + reply_bytes < budget
    await asyncio.sleep(0)
    assert not ws.conn.closed
    ws.data_received(frame(0x1, b"[" + b" " * (budget - owed), fin=False))
    await asyncio.sleep(0)
    assert ws.conn.closed and ws.conn.close_code == errors.CLOSE_SLOW_CONSUMER
    transport.abort()


@pytest.mark.gen_test(timeout=30)
async def test_an_event_counts_the_fragment_held_too(make_server):
    budget = 64 * 1024
    server = await make_server(server={"max_output_buffer": budget,
                                       "max_message_size": 256 * 1024})
    ws, transport = await stuck_connection(server)
    ws.data_received(frame(0x1, json.dumps(
        {"type": "subscribe", "topics": [EVERYTHING]}).encode()))
    await wait_for(lambda: b'"subscribed"' in transport.buffer)
    ws.data_received(frame(0x1, b"[" + b" " * (budget - 1000), fin=False))
    assert not ws.conn.closed
    # A 2 kB event is within the budget on its own, not with the fragment held.
    status, _ = await server.post({"type": "call_created", "customer_id": CUSTOMER,
                                   "data": {"id": "r", "pad": "x" * 2000}})
    assert status == 202
    await wait_for(lambda: ws.conn.closed)
    assert ws.conn.close_code == errors.CLOSE_SLOW_CONSUMER
    transport.abort()
