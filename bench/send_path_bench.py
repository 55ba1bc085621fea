"""The fan-out send path in process: ``python -m bench.send_path_bench [tcp|unix] [EVENTS]``.

Opens 1,000 real socket pairs (TCP loopback by default), hands one end of
each to a ``WebSocketConnection`` of a real gateway subscribed to one topic,
then for each of EVENTS events times, in thread CPU time, ``Gateway.deliver``
alone, and ``deliver`` plus the flush that writes the frames; then a bare loop
of ``send`` and one of ``os.write`` of a 215-byte frame over the same sockets
(the floor). Prints one JSON line of microseconds per frame: the fastest event
(the least disturbed by other processes) and the median. Pin it to a core
(``taskset -c 0``). To compare versions, run it from outside the repository
with ``PYTHONPATH=<snapshot of wsgate>:<repository>`` (from inside, the
checkout's own ``wsgate`` comes first).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import CUSTOMER, wsgate_config
from wsgate.adapters.wsconn import ConnectionRegistry, WebSocketConnection
from wsgate.app import build_gateway
from wsgate.config import load_config
from wsgate.events import Event
from wsgate.plugins import Principal
from wsgate.topics import parse_topic

N = 1000
FRAME = b"\x81\x7e\x00\xd3" + b"x" * 211


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2)}


async def main(kind: str, events: int) -> None:
    work = Path(tempfile.mkdtemp())
    path = work / "wsgate.toml"
    path.write_text(wsgate_config(1, work, "send-path-bench"))
    gateway = build_gateway(load_config(path))
    registry = ConnectionRegistry(600.0, 60.0)
    loop = asyncio.get_running_loop()
    principal = Principal(kind="agent", subject="bench", customer_id=CUSTOMER)
    topic = parse_topic(f"customer_id:{CUSTOMER}:bench")
    listener = socket.create_server(("127.0.0.1", 0), backlog=N) if kind == "tcp" else None
    peers: list[socket.socket] = []
    for _ in range(N):
        if listener is not None:
            peer = socket.create_connection(listener.getsockname())
            ours, _addr = listener.accept()
            ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            ours, peer = socket.socketpair()
        peer.setblocking(False)
        ws = WebSocketConnection(gateway, registry, principal, "127.0.0.1", None, None, b"")
        await loop.connect_accepted_socket(lambda ws=ws: ws, ours)  # type: ignore[misc]
        assert ws.conn is not None
        gateway.subscriptions.add(ws.conn, topic)
        peers.append(peer)

    def drain() -> None:
        for peer in peers:
            try:
                while peer.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass

    await asyncio.sleep(0.05)
    drain()
    data = '{"ts":1764282000000000000,"seq":1,"pad":""}'
    full: list[float] = []
    alone: list[float] = []
    for k in range(events):
        event = Event("bench_tick", data, (topic,), f"00000000-0000-4000-8000-{k:012d}",
                      "2026-11-27T23:00:00.000Z")
        t0 = time.thread_time_ns()
        gateway.deliver([event])
        t1 = time.thread_time_ns()
        await asyncio.sleep(0)  # the flush runs at the next iteration
        await asyncio.sleep(0)
        full.append((time.thread_time_ns() - t0) / N / 1000)
        alone.append((t1 - t0) / N / 1000)
        drain()
    socks = [c.transport.get_extra_info("socket") for c in registry.connections
             if c.transport is not None]
    raw = [socket.socket(fileno=os.dup(s.fileno())) for s in socks]

    def floor(send: Callable[[socket.socket], object]) -> list[float]:
        out = []
        for _ in range(events):
            t0 = time.thread_time_ns()
            for s in raw:
                send(s)
            out.append((time.thread_time_ns() - t0) / N / 1000)
            drain()
        return out

    print(json.dumps({"sockets": kind, "events": events,
                      "deliver_and_flush_us": summary(full), "deliver_alone_us": summary(alone),
                      "send_loop_us": summary(floor(lambda s: s.send(FRAME))),
                      "os_write_loop_us": summary(floor(lambda s: os.write(s.fileno(), FRAME)))}),
          flush=True)
    # Skip closing 2,000 sockets and the gateway (its audit writer was never started).
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp",
                     int(sys.argv[2]) if len(sys.argv) > 2 else 400))
