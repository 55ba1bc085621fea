"""wsgate's real WebSocket layer in front of an echo, for conformance runs.

    python -m bench.ws_echo PORT

Listens on 127.0.0.1:PORT. Each connection's RFC 6455 handshake is answered
here (no origin check, no credential: this is a test app, loopback only), then
the socket is handed to :class:`wsgate.adapters.wsconn.WebSocketConnection`
exactly as ``GET /v1.0/ws`` hands it over (``connect_accepted_socket`` with
the bytes read behind the handshake). Every frame is parsed, checked and
closed on by the real layer; only the gateway behind it is replaced by
:class:`EchoGateway`, which sends each message back as it came (text as
text, binary as binary).

The limits are wsgate's ``[server]`` keys, raised so that the largest
messages of the Autobahn TestSuite (16 MiB, 4 MiB in 64-byte fragments) fit:
a conformance run tests the protocol, not wsgate's defaults (those have
their own tests: tests/test_wsframes.py, tests/test_hostile_peers.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import sys
from typing import Any

from wsgate.adapters.wsconn import ConnectionRegistry, WebSocketConnection
from wsgate.config import config_from_dict
from wsgate.plugins import Principal

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LIMITS = {"max_message_size": 20 * 2**20, "max_fragments": 100_000,
          "max_output_buffer": 256 * 2**20, "max_messages_per_second": 0}


class EchoConnection:
    """What the echo keeps of a connection: the layer's transport and whether it closed."""

    def __init__(self, transport: WebSocketConnection) -> None:
        self.transport = transport
        self.closed = False


class EchoGateway:
    """The part of ``wsgate.gateway.Gateway`` the WebSocket layer calls, as an echo."""

    def __init__(self) -> None:
        self.config = config_from_dict({"server": LIMITS}, source="<echo>")

    def open(self, transport: WebSocketConnection, *who: Any) -> EchoConnection:
        return EchoConnection(transport)

    def receive(self, conn: EchoConnection, message: str | bytes, done: Any) -> bool:
        if isinstance(message, str):
            conn.transport.send_text(message)
        else:
            n = len(message)
            if n < 126:
                head = bytes((0x82, n))
            elif n < 65536:
                head = bytes((0x82, 126)) + n.to_bytes(2, "big")
            else:
                head = bytes((0x82, 127)) + n.to_bytes(8, "big")
            conn.transport.send_wire(head + message)
        return False

    def close_connection(self, conn: EchoConnection, code: int, reason: str) -> None:
        if not conn.closed:
            conn.closed = True
            conn.transport.close(code, reason)

    def disconnected(self, conn: EchoConnection, code: int | None = None) -> None:
        conn.closed = True


async def handshake(sock: socket.socket) -> bytes | None:
    """Answer the client's upgrade request; the bytes read behind it, or None."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk or len(data) > 16384:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    key = headers.get(b"sec-websocket-key")
    if not head.startswith(b"GET ") or headers.get(b"upgrade", b"").lower() != b"websocket" \
            or not key:
        await loop.sock_sendall(sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        return None
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    await loop.sock_sendall(sock, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                            + b"\r\n\r\n")
    return rest


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    gateway = EchoGateway()
    server = gateway.config.server
    registry = ConnectionRegistry(server.ping_interval, server.ping_timeout)
    principal = Principal(kind="direct", subject="echo")
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setblocking(False)

    async def upgrade(sock: socket.socket, addr: Any) -> None:
        try:
            initial = await handshake(sock)
            if initial is None:
                sock.close()
                return
            protocol = WebSocketConnection(gateway, registry, principal,  # type: ignore[arg-type]
                                           addr[0], None, None, initial)
            await loop.connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            sock.close()

    tasks = set()
    print(f"echo on ws://127.0.0.1:{port}", flush=True)
    try:
        while True:
            sock, addr = await loop.sock_accept(listener)
            sock.setblocking(False)
            task = asyncio.ensure_future(upgrade(sock, addr))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        listener.close()
        for connection in list(registry.connections):
            connection.abort()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
