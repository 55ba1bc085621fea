"""Where a targeted event's server CPU goes, stage by stage, in process.

Each stage of the ingest -> socket path runs alone, many times, with the real
code (nothing stubbed but the sockets of stages that do not write), and the
CPU time it took (``time.thread_time``) is divided by the requests or events
it handled. The numbers are the per-event budget of docs/performance.md:
deterministic enough to compare two trees (``PYTHONPATH=<tree>``, run from a
directory that is not a checkout), unlike a load run on a shared machine.

    .venv/bin/python -m bench.stages [--batch 10] [--batch 1] [--seconds 1.0]

Pin it to one core (``taskset -c 0``) to compare with the load runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from wsgate import events as events_mod
from wsgate import protocol
from wsgate.adapters import fast_ingest
from wsgate.adapters.ingest_framing import IngestFramer
from wsgate.audit.records import EventRecord
from wsgate.config import LoggingConfig
from wsgate.gateway.connection import utcnow
from wsgate.index import SubscriptionIndex
from wsgate.logs import log_access, setup_logging
from wsgate.metrics import GatewayMetrics
from wsgate.topics import parse_topic

CONNECTIONS = 5000


def body_of(agents: list[str], batch: int, counter: int) -> bytes:
    """A harness-like ingest body: ``batch`` events, each to one agent's topic."""
    evs = []
    for i in range(batch):
        agent = agents[(counter * batch + i) % len(agents)]
        evs.append({"type": "call_created", "topics": [f"agent_id:{agent}:call"],
                    "data": {"id": str(uuid.uuid4()), "ts": 1765080000000 + i, "seq": counter,
                             "status": "progressing", "direction": "outgoing"}})
    body = evs[0] if batch == 1 else {"events": evs}
    return json.dumps(body).encode()


def request_of(body: bytes) -> bytes:
    return (b"POST /v1.0/events HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
            b"Authorization: Bearer perf-ingest\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def timed(fn: Callable[[int], Any], seconds: float) -> tuple[float, int]:
    """Run fn(i) for about ``seconds`` of CPU; CPU seconds per call and calls made."""
    n = 0
    start = time.thread_time()
    spent = 0.0
    while spent < seconds:
        for _ in range(50):
            fn(n)
            n += 1
        spent = time.thread_time() - start
    return spent / n, n


class _Peer:
    """A connection as delivery sees it: a real transport would write each frame."""

    __slots__ = ("mark", "principal", "transport", "closed", "_sink")

    def __init__(self, sink: list[bytes]) -> None:
        self.mark: object | None = None
        self.principal = None
        self.closed = False
        self.transport = self
        self._sink = sink

    def send_wire(self, wire: bytes) -> int:
        self._sink.append(wire)
        return 0


def run(batch: int, seconds: float) -> dict[str, float]:
    agents = [str(uuid.uuid4()) for _ in range(CONNECTIONS)]
    bodies = [body_of(agents, batch, c) for c in range(200)]
    requests = [request_of(b) for b in bodies]
    out: dict[str, float] = {}

    framer = IngestFramer(1 << 20)

    def frame(i: int) -> None:
        framer.feed(requests[i % len(requests)])
        framer.next_event()
    out["frame request (sans-I/O framer)"] = timed(frame, seconds)[0]

    def validate(i: int) -> Any:
        return events_mod.validate_body(bodies[i % len(bodies)], 1000)
    out["decode + validate (msgspec; data kept as posted)"] = timed(validate, seconds)[0]

    valid = [events_mod.validate_body(b, 1000)[0] for b in bodies]

    def hashes(i: int) -> Any:
        return [hashlib.sha256(e.data_json.encode()).hexdigest() for e in valid[i % len(valid)]]
    out["payload SHA-256"] = timed(hashes, seconds)[0]

    index: SubscriptionIndex[Any] = SubscriptionIndex()
    sink: list[bytes] = []
    for agent in agents:
        index.add(parse_topic(f"agent_id:{agent}").segments, _Peer(sink))
    from wsgate.gateway.delivery import Delivery
    delivery = Delivery(index, 1 << 20, lambda *a: None)

    def deliver(i: int) -> None:
        delivery.deliver(valid[i % len(valid)])
        sink.clear()
    out["match + build frames (delivery)"] = timed(deliver, seconds)[0]

    from wsgate.broker.memory import MemoryBroker
    from wsgate.config import HistoryConfig
    broker = MemoryBroker(HistoryConfig())

    def remember(i: int) -> None:
        broker._remember(valid[i % len(valid)])
    out["history for resume (memory broker)"] = timed(remember, seconds)[0]

    metrics = GatewayMetrics()

    def observe(i: int) -> None:
        metrics.delivered(valid[i % len(valid)])
        metrics.ingested(202, batch, 0.001)
    out["metrics (latency histogram, counters)"] = timed(observe, seconds)[0]

    def records(i: int) -> Any:
        evs = valid[i % len(valid)]
        moment = utcnow()
        return [EventRecord(e.event_id, e.type, tuple(t.text for t in e.topics), "key-0",
                            "0" * 64, moment) for e in evs]
    out["event records built (loop side)"] = timed(records, seconds)[0]

    answers = [{"accepted": len(v), "event_ids": [e.event_id for e in v]} for v in valid]

    def answer(i: int) -> bytes:
        return fast_ingest.response(202, answers[i % len(answers)], False)
    out["202 answer bytes"] = timed(answer, seconds)[0]

    stream = tempfile.TemporaryFile("w")  # a file, as when stderr is redirected
    setup_logging(LoggingConfig())
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)

    def access(i: int) -> None:
        log_access(202, "POST", "/v1.0/events", "127.0.0.1", 0.0012,
                   {"events_accepted": batch, "key_id": "key-0", "key_scope": "all"})
    out["access log line (INFO)"] = timed(access, seconds)[0]
    stream.close()

    # Loopback TCP writes: what each frame and each answer costs the kernel on
    # the sending side (the receiver's softirq work lands here too).
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    stop = threading.Event()

    def drain() -> None:
        peer.settimeout(0.2)
        while not stop.is_set():
            try:
                if not peer.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    frame_bytes = protocol.ws_frame(b"x" * 230)
    fd = client.fileno()

    def send(i: int) -> None:
        os.write(fd, frame_bytes)
    out["socket write per frame (loopback TCP)"] = timed(send, seconds)[0] * batch
    stop.set()
    client.close()
    peer.close()
    server.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append",
                        help="events per request (repeatable; default 10 and 1)")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per stage")
    args = parser.parse_args(argv)
    asyncio.set_event_loop(asyncio.new_event_loop())
    for batch in args.batch or [10, 1]:
        results = run(batch, args.seconds)
        total = sum(results.values())
        print(f"\n{batch} event(s) per request: server CPU per event, by stage")
        for name, per_request in results.items():
            per_event = per_request / batch
            print(f"  {name:42s} {per_event * 1e6:8.2f} us  ({100 * per_request / total:4.1f} %)")
        print(f"  {'sum of the stages':42s} {total / batch * 1e6:8.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
