"""wsgate.adapters.wsconn: RFC 6455 framing, close handshake and the shared pinger,
over real sockets with a client that writes every byte itself."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import CUSTOMER, event, wait_for
from tests.wsclient import SAMPLE_KEY, RawWebSocket, close_payload, frame
from wsgate import errors
from wsgate.adapters.wsconn import WebSocketConnection, close_frame

CALL = f"customer_id:{CUSTOMER}:call"
@pytest.mark.gen_test(timeout=30)
async def test_handshake_answers_the_rfc_accept_value(make_server):
    server = await make_server()
    peer, head = await RawWebSocket.handshake(server.port)
    try:
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        assert "Sec-Websocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
        assert not any(line.lower().startswith("sec-websocket-extensions") for line in lines)
        assert (await peer.recv_json())["type"] == "connected"
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("headers, status", [
    ("Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n", 400),
    ("Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n", 400),
    ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n", 400),
    ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\n"
     "Sec-WebSocket-Version: 13\r\n", 400),
    ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
     "Sec-WebSocket-Version: 12\r\n", 426),
])
async def test_bad_handshakes_are_refused_after_the_credential_check(make_server, headers,
                                                                     status):
    server = await make_server()
    peer, head = await RawWebSocket.handshake(server.port, headers=headers.format(key=SAMPLE_KEY))
    try:
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert server.gateway.connections == {}
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_frames_sent_with_the_handshake_are_read(make_server):
    server = await make_server()
    ping = json.dumps({"type": "ping", "id": "early"}).encode()
    peer, _ = await RawWebSocket.open(server.port, after_handshake=frame(1, ping))
    try:
        assert await peer.recv_json() == {"type": "pong", "id": "early"}
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_fragmented_message_with_a_ping_between_and_bytes_dribbled(make_server):
    server = await make_server()
    peer, _ = await RawWebSocket.open(server.port)
    try:
        text = json.dumps({"type": "subscribe", "topics": [CALL], "id": "frag"}).encode()
        wire = (frame(1, text[:5], fin=False) + frame(9, b"are you there")
                + frame(0, text[5:20], fin=False) + frame(0, b"", fin=False)
                + frame(0, text[20:]))
        for i in range(len(wire)):  # one byte per write: every split point is crossed
            await peer.send(wire[i:i + 1])
        assert await peer.recv() == (0xA, b"are you there")
        reply = await peer.recv_json()
        assert reply["type"] == "subscribed" and reply["topics"] == [CALL]
        assert reply["id"] == "frag"
        # A multi-byte character split across two frames is still valid UTF-8.
        wire = json.dumps({"type": "ping", "id": "é€"}, ensure_ascii=False).encode()
        cut = wire.index("€".encode()) + 1
        await peer.send(frame(1, wire[:cut], fin=False) + frame(0, wire[cut:]))
        assert await peer.recv_json() == {"type": "pong", "id": "é€"}
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_binary_message_gets_bad_request_and_the_connection_stays(make_server):
    server = await make_server()
    peer, _ = await RawWebSocket.open(server.port)
    try:
        await peer.send(frame(2, b'{"type":"ping"}'))
        reply = await peer.recv_json()
        assert reply["type"] == "error" and reply["code"] == "bad_request"
        await peer.send(frame(1, b'{"type":"ping"}'))
        assert await peer.recv_json() == {"type": "pong"}
    finally:
        peer.close()


PROTOCOL_ERRORS = [
    ("unmasked", frame(1, b'{"type":"ping"}', mask=False), errors.CLOSE_PROTOCOL_ERROR),
    ("reserved bit", frame(1, b'{"type":"ping"}', rsv=0x40), errors.CLOSE_PROTOCOL_ERROR),
    ("unknown opcode", frame(3, b"x"), errors.CLOSE_PROTOCOL_ERROR),
    ("unknown control opcode", frame(0xB, b"x"), errors.CLOSE_PROTOCOL_ERROR),
    ("ping of 126 bytes", frame(9, b"p" * 126), errors.CLOSE_PROTOCOL_ERROR),
    ("fragmented ping", frame(9, b"p", fin=False), errors.CLOSE_PROTOCOL_ERROR),
    ("continuation first", frame(0, b"x"), errors.CLOSE_PROTOCOL_ERROR),
    ("text inside a fragmented text",
     frame(1, b"{", fin=False) + frame(1, b"{}"), errors.CLOSE_PROTOCOL_ERROR),
    ("invalid UTF-8", frame(1, b'{"type":"\xff"}'), errors.CLOSE_INVALID_DATA),
    ("UTF-16 surrogate", frame(1, b'"\xed\xa0\x80"'), errors.CLOSE_INVALID_DATA),
    ("invalid UTF-8 across fragments",
     frame(1, b'"\xe2\x82', fin=False) + frame(0, b'("'), errors.CLOSE_INVALID_DATA),
]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("name, wire, code", PROTOCOL_ERRORS, ids=[p[0] for p in PROTOCOL_ERRORS])
async def test_protocol_errors_close_with_their_code(make_server, name, wire, code):
    server = await make_server()
    peer, hello = await RawWebSocket.open(server.port)
    other, _ = await RawWebSocket.open(server.port)
    try:
        await peer.send(wire)
        assert await peer.recv_close() == code
        # The server reads nothing more and shuts its side at once.
        assert await peer.eof(timeout=5) < 1.0
        await wait_for(lambda: hello["connection_id"] not in server.gateway.connections)
        # Only that connection.
        await other.send(frame(1, b'{"type":"ping"}'))
        assert await other.recv_json() == {"type": "pong"}
    finally:
        peer.close()
        other.close()


@pytest.mark.gen_test(timeout=30)
async def test_message_size_limit_is_exact_for_frames_and_fragmented_messages(make_server):
    server = await make_server(server={"max_message_size": 1000})
    peer, _ = await RawWebSocket.open(server.port)
    try:
        exact = ('{"type":"ping","id":"x"' + " " * (1000 - 24) + "}").encode()
        assert len(exact) == 1000
        await peer.send(frame(1, exact))
        assert await peer.recv_json() == {"type": "pong", "id": "x"}
        await peer.send(frame(1, exact[:600], fin=False) + frame(0, exact[600:]))
        assert await peer.recv_json() == {"type": "pong", "id": "x"}
        # One byte more, over two fragments: refused on the second frame's header.
        await peer.send(frame(1, exact[:600], fin=False))
        await peer.send(frame(0, exact[600:] + b" ")[:8])
        assert await peer.recv_close() == errors.CLOSE_TOO_BIG
    finally:
        peer.close()
    peer, _ = await RawWebSocket.open(server.port)
    try:
        # A single frame announcing 2 GiB: refused on its header, nothing buffered.
        await peer.send(bytes((0x81, 0x80 | 127)) + (1 << 31).to_bytes(8, "big"))
        assert await peer.recv_close() == errors.CLOSE_TOO_BIG
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
# recorded: the ``code`` label of wsgate_disconnects: the code the server answered
# (1002 for a code not valid on the wire, 1007 for a reason not UTF-8), private
# codes other than the server's own in one label (a bounded set: issue 16).
@pytest.mark.parametrize("sent, echoed, recorded", [
    (close_payload(1000, "bye"), 1000, "1000"),
    (close_payload(4321), 4321, "3000-4999"),
    (close_payload(4003), 4003, "4003"),
    (b"", None, "1006"),
    (close_payload(1005), errors.CLOSE_PROTOCOL_ERROR, "1002"),
    (close_payload(2999), errors.CLOSE_PROTOCOL_ERROR, "1002"),
    (b"\x03", errors.CLOSE_PROTOCOL_ERROR, "1002"),
    (close_payload(1000) + b"\xff", errors.CLOSE_INVALID_DATA, "1007"),
])
async def test_client_close_is_echoed_and_the_server_closes_tcp(make_server, sent, echoed,
                                                                recorded):
    server = await make_server()
    peer, hello = await RawWebSocket.open(server.port)
    try:
        await peer.send(frame(1, json.dumps({"type": "subscribe", "topics": [CALL]}).encode()))
        assert (await peer.recv_json())["topics"] == [CALL]
        await peer.send(frame(8, sent))
        assert await peer.recv_close() == echoed
        assert await peer.eof(timeout=5) < 1.0
        assert hello["connection_id"] not in server.gateway.connections
        assert len(server.gateway.index) == 0
        m = server.gateway.metrics.disconnects.labels(recorded)
        assert m._value.get() == 1
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=30)
async def test_server_close_waits_briefly_for_an_echo_then_aborts(make_server):
    server = await make_server()
    peer, hello = await RawWebSocket.open(server.port)
    polite, polite_hello = await RawWebSocket.open(server.port)
    try:
        for p, h in ((peer, hello), (polite, polite_hello)):
            conn = server.gateway.connections[h["connection_id"]]
            server.gateway.close_connection(conn, errors.CLOSE_REVOKED, "rights revoked")
            opcode, payload = await p.recv()
            assert opcode == 8 and payload == close_payload(4003, "rights revoked")
        # The polite peer echoes: the server closes TCP at once.
        await polite.send(frame(8, close_payload(4003)))
        assert await polite.eof(timeout=5) < 1.0
        # The other never answers: aborted after the close timeout, not Tornado's 5 s.
        assert await peer.eof(timeout=10) < 3.5
    finally:
        peer.close()
        polite.close()


@pytest.mark.gen_test(timeout=30)
async def test_shared_pinger_pings_silent_peers_and_aborts_those_that_do_not_answer(make_server):
    server = await make_server(server={"ping_interval": 0.4, "ping_timeout": 0.4})
    registry = server.server.websockets
    assert registry is not None
    silent, silent_hello = await RawWebSocket.open(server.port)
    answering, _ = await RawWebSocket.open(server.port)
    try:
        assert len(registry.connections) == 2
        # Both are pinged once they have been silent for the interval.
        assert await silent.recv(timeout=3) == (9, b"")
        assert await answering.recv(timeout=3) == (9, b"")
        await answering.send(frame(0xA))
        answered = 0

        async def keep_answering() -> None:
            nonlocal answered
            while True:
                opcode, payload = await answering.recv(timeout=5)
                if opcode == 9:
                    await answering.send(frame(0xA, payload))
                    answered += 1

        answers = asyncio.ensure_future(keep_answering())
        # The silent one is dropped (no close handshake with a dead peer) ...
        assert await silent.eof(timeout=5) < 2.0
        await wait_for(lambda: silent_hello["connection_id"] not in server.gateway.connections)
        assert m_value(server, "1006") == 1
        # ... the answering one stays, several pings later.
        await wait_for(lambda: answered >= 4 or answers.done())
        assert not answers.done()
        answers.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answers
        await answering.send(frame(1, b'{"type":"ping"}'))
        while (reply := await answering.recv())[0] != 1:
            pass
        assert json.loads(reply[1]) == {"type": "pong"}
        assert len(registry.connections) == 1
    finally:
        silent.close()
        answering.close()


def m_value(server: Any, code: str) -> float:
    return server.gateway.metrics.disconnects.labels(code)._value.get()


@pytest.mark.gen_test(timeout=30)
async def test_messages_are_handled_one_at_a_time_in_order(make_server):
    server = await make_server(server={"max_messages_per_second": 10_000})
    peer, _ = await RawWebSocket.open(server.port)
    try:
        wire = b""
        for i in range(100):
            if i % 3 == 0:
                msg = {"type": "subscribe", "topics": [f"{CALL}:{i}"], "id": i}
            else:
                msg = {"type": "ping", "id": i}
            wire += frame(1, json.dumps(msg).encode())
        await peer.send(wire)  # all at once: subscribes wait for the audit store
        ids = [(await peer.recv_json())["id"] for _ in range(100)]
        assert ids == list(range(100))
    finally:
        peer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_peer_that_stops_reading_gets_every_frame_in_order_once_it_reads(make_server):
    every = f"customer_id:{CUSTOMER}"
    server = await make_server(server={"max_output_buffer": 64 * 1024 * 1024})
    slow = await RawWebSocket.connect(server.port, rcvbuf=4096)
    try:
        hello = await slow.recv_json(skip_pings=True)
        await slow.send_text(json.dumps({"type": "subscribe", "topics": [every]}))
        assert (await slow.recv_json(skip_pings=True))["topics"] == [every]
        ws = server.gateway.connections[hello["connection_id"]].transport
        assert isinstance(ws, WebSocketConnection) and ws.backlog == 0
        pad = "x" * 4096
        sent = 0

        async def post(n: int) -> None:
            nonlocal sent
            batch = [event(data={"id": "r", "n": sent + i, "pad": pad}) for i in range(n)]
            assert (await server.post({"events": batch}))[0] == 202
            sent += n

        # Frames go straight to the socket until a write is cut short; its rest,
        # and everything after it, waits in the transport.
        while not ws.backlog:
            assert sent < 4000, "the socket never filled"
            await post(8)
        await post(8)
        assert ws.transport is not None
        assert ws.pending_bytes() == ws.transport.get_write_buffer_size() >= 8 * 4096
        # A control reply made now goes behind those frames, not around them.
        await slow.send_text(json.dumps({"type": "ping"}))
        got = []
        while len(got) < sent:
            msg = await slow.recv_json(timeout=10, skip_pings=True)
            assert msg["type"] == "call_created", msg
            got.append(msg["data"]["n"])
        assert got == list(range(sent))
        assert (await slow.recv_json(timeout=10, skip_pings=True)) == {"type": "pong"}
        # Drained: the next frame goes straight to the socket again.
        await wait_for(lambda: ws.transport.get_write_buffer_size() == 0)
        await post(1)
        assert (await slow.recv_json(timeout=10, skip_pings=True))["data"]["n"] == sent - 1
        assert ws.backlog == 0
    finally:
        slow.close()


def test_close_frame_reason_fits_a_control_frame():
    wire = close_frame(4008, "é" * 100)
    assert wire[0] == 0x88 and wire[1] <= 125 and len(wire) == 2 + wire[1]
    (wire[4:]).decode()  # cut on a character boundary
    assert close_frame(None) == b"\x88\x00"
