"""The raw WebSocket client of the suite: the test writes every byte it sends.

:class:`RawWebSocket` runs on a bare non-blocking socket and reads only when
the test asks, so it can play a slow peer (a small receive buffer), a dead
one (it never answers a ping by itself) or a hostile one (any bytes, any
framing: see :func:`frame`). Tests that only need a well-behaved client use
``conftest.Client`` (Tornado's).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
#: The upgrade headers of a valid opening handshake.
UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n")

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True,
          rsv: int = 0) -> bytes:
    """One client frame, masked unless told otherwise."""
    n = len(payload)
    head = bytes((opcode | (0x80 if fin else 0) | rsv,))
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 65536:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    # XOR as one big integer: a hostile peer's megabytes are masked in milliseconds.
    return head + key + (int.from_bytes(payload, "little") ^ int.from_bytes(
        (key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


class RawWebSocket:
    """A WebSocket client on a bare socket (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    async def handshake(cls, port: int, token: str = "admin-token", headers: str = UPGRADE,
                        after_handshake: bytes = b"",
                        rcvbuf: int | None = None) -> tuple[RawWebSocket, bytes]:
        """Connect and send an opening handshake with ``headers``, then
        ``after_handshake``; return the client and the response head (up to and
        including its blank line), whatever its status.

        ``rcvbuf`` sets the socket's receive buffer before connecting, so the
        window it advertises stays small.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self = cls(sock)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, (
                f"GET /v1.0/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"{headers}\r\n").encode() + after_handshake)
            while b"\r\n\r\n" not in self.buf:
                await asyncio.wait_for(self._fill(), 5.0)
        except BaseException:
            sock.close()
            raise
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return self, head + b"\r\n\r\n"

    @classmethod
    async def connect(cls, port: int, token: str = "admin-token", rcvbuf: int | None = None,
                      after_handshake: bytes = b"") -> RawWebSocket:
        """:meth:`handshake`, asserting that the server switched protocols."""
        self, head = await cls.handshake(port, token, after_handshake=after_handshake,
                                         rcvbuf=rcvbuf)
        if not head.startswith(b"HTTP/1.1 101"):
            self.close()
            raise AssertionError(head)
        return self

    @classmethod
    async def open(cls, port: int, token: str = "admin-token", rcvbuf: int | None = None,
                   after_handshake: bytes = b"") -> tuple[RawWebSocket, dict[str, Any]]:
        """:meth:`connect`, then read the ``connected`` frame; returns it too."""
        self = await cls.connect(port, token, rcvbuf, after_handshake)
        hello = await self.recv_json()
        assert hello["type"] == "connected", hello
        return self, hello

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    async def send(self, data: bytes) -> None:
        """Write bytes as they are (frames made with :func:`frame`, or anything)."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send_text(self, text: str) -> None:
        await self.send(frame(OP_TEXT, text.encode()))

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload). Server frames are never masked."""
        async def read() -> tuple[int, bytes]:
            while True:
                if len(self.buf) >= 2:
                    assert not self.buf[1] & 0x80, "a server frame was masked"
                    n = self.buf[1] & 0x7F
                    start = 2 if n < 126 else 4 if n == 126 else 10
                    if len(self.buf) >= start:
                        if n >= 126:
                            n = int.from_bytes(self.buf[2:start], "big")
                        if len(self.buf) >= start + n:
                            opcode = self.buf[0] & 0x0F
                            payload = self.buf[start:start + n]
                            self.buf = self.buf[start + n:]
                            return opcode, payload
                await self._fill()
        return await asyncio.wait_for(read(), timeout)

    async def recv_json(self, timeout: float = 5.0, skip_pings: bool = False) -> Any:
        """The next frame, a text frame, as JSON; with ``skip_pings``, pings and
        pongs before it are read and dropped (and not answered)."""
        while True:
            opcode, payload = await self.recv(timeout)
            if skip_pings and opcode in (OP_PING, OP_PONG):
                continue
            assert opcode == OP_TEXT, (opcode, payload)
            return json.loads(payload)

    async def recv_close(self, timeout: float = 5.0) -> int | None:
        """Skip to the server's close frame; return its code."""
        while True:
            opcode, payload = await self.recv(timeout)
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big") if payload else None

    async def eof(self, timeout: float) -> float:
        """Read and drop everything until the server closes the TCP connection (or
        resets it); return how long that took."""
        started = time.monotonic()

        async def drain() -> None:
            while True:
                self.buf = b""
                try:
                    await self._fill()
                except (EOFError, ConnectionError):
                    return

        await asyncio.wait_for(drain(), timeout)
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()
