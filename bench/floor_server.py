"""The cheapest server of the fan-out wire, to check the generator and find the floor.

    python -m bench.floor_server PORT

It speaks just enough of wsgate's wire for bench/loadgen.py: a ``GET`` gets
``101`` and a ``connected`` frame (subscriptions are not used: every
connection gets every event); a ``POST`` body is framed as it is (it carries
the generator's marker and send time), padded to the size of wsgate's event
frame, and written with one blocking ``send`` per connection in a bare loop,
then answered ``202``. No asyncio, no parsing of the event, no queue.

Two uses (bench/rx_check.py runs both):

- the floor: the time a Python process needs to hand one frame to 1,000
  loopback connections (``send_loop_us_per_frame``), the part of the paced
  latency no server written this way can avoid;
- a check of the generator's latency figure: just before each send it notes
  ``time.time_ns()`` minus the send time in the body, i.e. the latency the
  generator should report for that connection give or take the loopback path.
  With ``restamp`` (``python -m bench.floor_server PORT restamp``) it also
  writes that time into each frame in place of the send time (same length),
  so the generator's figure for every frame should be the loopback path
  alone: a few microseconds, however slow the generator is.

On SIGTERM it prints its own percentiles and send-loop cost as one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import signal
import socket
import sys
import time

from bench.loadgen import percentiles

_TS = re.compile(rb'"ts":([0-9]+)')
#: wsgate's frame for the bench event (type, topic, data, event_id, published_at).
FRAME_SIZE = 215


def ws_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload


def main(port: int, restamp: bool) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    clients: list[socket.socket] = []
    buffers: dict[socket.socket, bytearray] = {}
    lat: list[int] = []
    loop_ns = 0
    loop_cpu = 0.0
    frames = 0
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    time_ns = time.time_ns
    while running:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(True)
                buffers[conn] = bytearray()
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                buffers.pop(sock, None)
                if sock in clients:
                    clients.remove(sock)
                sock.close()
                continue
            buf = buffers.get(sock)
            if buf is None:
                continue  # a WebSocket client's frames (pongs, close): ignored
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = bytes(buf[:end])
                if head.startswith(b"GET "):
                    del buffers[sock]
                    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n" +
                                 ws_frame(b'{"type":"connected","connection_id":"x"}'))
                    clients.append(sock)
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if len(buf) < end + 4 + length:
                    break
                body = bytes(buf[end + 4:end + 4 + length])
                del buf[:end + 4 + length]
                m = _TS.search(body)
                sent = int(m.group(1)) if m else time_ns()
                body += b" " * max(0, FRAME_SIZE - 4 - len(body))
                frame = ws_frame(body)
                off = len(frame) - len(body)
                append = lat.append
                t0 = time_ns()
                c0 = time.process_time()
                if restamp and m is not None:
                    # Each frame carries the time just before its own send.
                    head, tail = frame[:m.start(1) + off], frame[m.end(1) + off:]
                    for c in clients:
                        now = time_ns()
                        append(now - sent)
                        c.send(b"%s%d%s" % (head, now, tail))
                else:
                    for c in clients:
                        append(time_ns() - sent)
                        c.send(frame)
                loop_cpu += time.process_time() - c0
                loop_ns += time_ns() - t0
                frames += len(clients)
                sock.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
    lat.sort()
    print(json.dumps({"frames": frames, "connections": len(clients),
                      "send_latency_ms": percentiles([v / 1e9 for v in lat]),
                      "send_loop_us_per_frame": round(loop_ns / 1000 / max(1, frames), 2),
                      "send_loop_cpu_us_per_frame": round(1e6 * loop_cpu / max(1, frames), 2),
                      "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] == ["restamp"])
