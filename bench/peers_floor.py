"""The least a Python server on uvloop can do for the peers harness: its floor.

Speaks the harness's protocol (b) (``../shared/peers``, servers/tornado_naive.py):
``GET /v1.0/ws`` upgrades to a WebSocket whose text frames
``{"type": "subscribe", "topics": [...]}`` are answered
``{"type": "subscribed", "topics": [...]}``; ``POST /v1.0/events`` (one event or
``{"events": [...]}``) writes ``{"type", "topic", "data"}`` to every subscriber
of each of an event's ``topics`` and answers 202; ``GET /healthz`` answers 200.

Everything wsgate adds is left out on purpose: no authentication, no
validation beyond what routing needs, no audit record, no access log, no
metrics, no history, no limits. One ``asyncio.Protocol`` per connection, a
hand-written HTTP/1.1 reader for exactly the requests the harness sends, the
body decoded by msgspec in C, the frame built once per topic and written with
one ``transport.write`` per subscriber. What this server spends per event on
the harness is what any Python server there spends at least; wsgate's figures
are read against it in docs/performance.md ("What blocks the targets").

    python -m bench.peers_floor --port 9000 [--loop uvloop|asyncio]

and, from the harness directory (run.sh pins it to core 0):

    SERVER_CMD="python -m bench.peers_floor --port 9000" READY_URL=http://127.0.0.1:9000/healthz \\
      PORT=9000 ./run.sh external targeted 5000 --client raw --batch 1 \\
      --url ws://127.0.0.1:9000/v1.0/ws --publish-url http://127.0.0.1:9000/v1.0/events
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
from typing import Any

import msgspec

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_decode = msgspec.json.decode
_encode = msgspec.json.encode
subscriptions: dict[str, set[Connection]] = {}


def ws_frame(payload: bytes) -> bytes:
    """One unmasked text frame (server to client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def http(status: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "ws", "topics")

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = b""
        self.ws = False
        self.topics: set[str] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for topic in self.topics:
            subs = subscriptions.get(topic)
            if subs is not None:
                subs.discard(self)
                if not subs:
                    del subscriptions[topic]

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.ws:
            self._frames()
        else:
            self._requests()

    # -- HTTP/1.1, as the harness sends it ----------------------------------

    def _requests(self) -> None:
        while not self.ws:
            buf = self.buffer
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(buf) < end + 4 + length:
                return
            body = buf[end + 4:end + 4 + length]
            self.buffer = buf[end + 4 + length:]
            if method == "POST" and path == "/v1.0/events":
                self._publish(body)
            elif path.startswith("/v1.0/ws") and "sec-websocket-key" in headers:
                accept = base64.b64encode(hashlib.sha1(
                    headers["sec-websocket-key"].encode() + _GUID).digest()).decode()
                self.transport.write(
                    ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
                self.ws = True
                self._frames()
            else:
                self.transport.write(http("200 OK", b'{"ok":true}'))

    def _publish(self, body: bytes) -> None:
        try:
            doc = _decode(body)
        except msgspec.DecodeError:
            self.transport.write(http("400 Bad Request", b'{"error":"bad json"}'))
            return
        events = doc["events"] if isinstance(doc, dict) and "events" in doc else [doc]
        delivered = 0
        for ev in events:
            for topic in ev.get("topics") or ():
                subs = subscriptions.get(topic)
                if not subs:
                    continue
                frame = ws_frame(_encode({"type": ev.get("type"), "topic": topic,
                                          "data": ev.get("data")}))
                for conn in subs:
                    conn.transport.write(frame)
                    delivered += 1
        self.transport.write(http("202 Accepted", b'{"accepted":%d,"delivered":%d}'
                                  % (len(events), delivered)))

    # -- WebSocket frames from clients (masked, text, small) ----------------

    def _frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 6:
            opcode = buf[0] & 0x0F
            n = buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 8:
                    break
                n = int.from_bytes(buf[2:4], "big")
                at = 4
            elif n == 127:
                if len(buf) < 14:
                    break
                n = int.from_bytes(buf[2:10], "big")
                at = 10
            if len(buf) < at + 4 + n:
                break
            mask = buf[at:at + 4] * (n // 4 + 1)
            payload = (int.from_bytes(buf[at + 4:at + 4 + n], "big")
                       ^ int.from_bytes(mask[:n], "big")).to_bytes(n, "big")
            buf = buf[at + 4 + n:]
            if opcode == 0x8:
                self.transport.close()
                break
            if opcode == 0x1:
                self._message(payload)
        self.buffer = buf

    def _message(self, payload: bytes) -> None:
        try:
            msg = _decode(payload)
        except msgspec.DecodeError:
            return
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            return
        topics = [t for t in msg.get("topics") or () if isinstance(t, str)]
        for topic in topics:
            subscriptions.setdefault(topic, set()).add(self)
            self.topics.add(topic)
        self.transport.write(ws_frame(_encode({"type": "subscribed", "topics": topics})))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
