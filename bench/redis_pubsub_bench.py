"""Receive side of Redis pub/sub: CPU per message of the RESP reader wsgate
wrote itself against redis-py's asyncio PubSub, with its pure-Python parser and
with hiredis (which the broker runs since this comparison).

``python -m bench.redis_pubsub_bench [--rounds 5] [--count 20000] [--rate 1000]``

A publisher process (pinned to core 1) sends what the broker sends: one
MULTI/EXEC per publish with one PUBLISH per event on the scope's channel,
each message ``broker.redis.encode_message`` of an event shaped like a VoIPBin
call record (~580 bytes; ~480 in the frame a client gets). This process
(pinned to core 0) receives them with one of:

- ``hand-written``: the broker's own RESP reader and read loop until commit
  3ea399d (``_RespReader``, kept below as it was), on a connection of its own;
- ``redis-py``: redis-py's ``PubSub.get_message(timeout=None)`` in a loop,
  with the pure-Python RESP2 parser;
- ``hiredis``: the same loop with the hiredis parser (redis-py's default
  when hiredis is installed);
- ``broker``: the broker's receive path as it runs now (``RedisBroker.start``
  and ``watch``): hiredis, each message taken from ``PubSub.parse_response``
  without ``get_message``'s message dict.

Workloads: ``paced-1`` one event per publish at ``--rate`` per second for
``--paced-seconds`` (each message wakes the receiver on its own: a node's
ordinary traffic); ``burst-1`` and ``burst-10``, one and ten events per
publish (a 10-event POST), as fast as the receiver takes them, the publisher
never more than ``--window`` messages ahead (so Redis's pub/sub output limit
is never reached). Modes: ``read`` hands each message's payload to a counter
(the reader's own cost); ``deliver`` hands it to the broker's ``_received``
(dedupe, JSON decode into an Event, one deliver call per read), as a node does
before fan-out.

Each round runs every variant once per workload and mode, the first variant
rotated from round to round, so drifting load on a shared machine falls on
all of them. Reported: process CPU (``time.process_time``, the receiving
process only) per message and messages per second of wall time, median and
min-max over the rounds. Prints a table; writes every run to
bench/results/redis-pubsub-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench.common import AGENT, CUSTOMER, RESULTS, ROOT

REDIS_URL = os.environ.get("WSGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
VARIANTS = ("hand-written", "redis-py", "hiredis", "broker")
WORKLOADS = ("paced-1", "burst-1", "burst-10")
MODES = ("read", "deliver")
RECEIVER_CORE, PUBLISHER_CORE = 0, 1
#: Seconds a burst publisher waits for the receiver to catch up before it gives up.
STALL_LIMIT = 10.0


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def sample_event_wire(n: int) -> list[Any]:
    """n events shaped like VoIPBin ``call_updated`` events: a client's frame of ~480
    bytes, a Redis message of ~580 (the message repeats the topics and escapes ``data``)."""
    return [{
        "type": "call_updated", "customer_id": CUSTOMER,
        "resource_id": str(uuid.uuid4()),
        "data": {"id": str(uuid.uuid4()), "owner_id": AGENT, "status": "progressing",
                 "direction": "outgoing", "source": {"type": "tel", "target": "+821100000001"},
                 "destination": {"type": "tel", "target": "+821100000002"}, "seq": i},
    } for i in range(n)]


# -- the publisher process ------------------------------------------------------


def _pack(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _transactions(channel: str, count: int, per_publish: int) -> list[bytes]:
    """MULTI, per event PUBLISH, EXEC: each item one publish, as the broker's
    ``_transaction`` sends it (without the streams: history is not what is measured)."""
    from wsgate.broker.redis import encode_message
    from wsgate.events import validate_events

    events = validate_events(sample_event_wire(count))
    multi, exec_ = _pack(b"MULTI"), _pack(b"EXEC")
    out = []
    for start in range(0, count, per_publish):
        publish_id = uuid.uuid4().hex[:16]
        body = [_pack(b"PUBLISH", channel.encode(), encode_message(publish_id, e))
                for e in events[start:start + per_publish]]
        out.append(multi + b"".join(body) + exec_)
    return out


def _drain(sock: socket.socket) -> None:
    """Read (and drop) the replies waiting, so Redis never blocks on this client."""
    try:
        while sock.recv(1 << 20, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        pass


def _caught_up(sock: socket.socket, received: Any, sent: int, window: int) -> bool:
    """Wait until the receiver is at most window messages behind; False after
    STALL_LIMIT seconds without that."""
    deadline = time.monotonic() + STALL_LIMIT
    while sent - received.value > window:
        if time.monotonic() > deadline:
            return False
        _drain(sock)
        time.sleep(0.0002)
    return True


def publisher(jobs: multiprocessing.connection.Connection, received: Any, host: str,
              port: int, password: str | None) -> None:
    """Publish the jobs sent on ``jobs``: ``(channel, count, per_publish, rate, window)``;
    answers ``ready`` once the messages are built, publishes on ``go``, answers
    ``done``. ``received`` is the receiver's running count of messages."""
    pin(PUBLISHER_CORE)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if password:
        sock.sendall(_pack(b"AUTH", password.encode()))
        sock.recv(100)
    while (job := jobs.recv()) is not None:
        channel, count, per_publish, rate, window = job
        txs = _transactions(channel, count, per_publish)
        jobs.send("ready")
        jobs.recv()  # go
        began = time.monotonic()
        sent = 0
        for i, tx in enumerate(txs):
            if rate:
                wait = began + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            elif not _caught_up(sock, received, sent, window):
                break  # the receiver lost messages: give up this run
            sock.sendall(tx)
            sent += per_publish
            if not i & 15:
                _drain(sock)
        jobs.send("done")
    sock.close()


# -- receivers --------------------------------------------------------------------


class Sink:
    """Counts messages (read mode) or delivered events (deliver mode) until ``target``."""

    def __init__(self, target: int, shared: Any) -> None:
        self.target = target
        self.n = 0
        self.shared = shared
        self.done = asyncio.get_running_loop().create_future()

    def _count(self, k: int) -> None:
        self.n += k
        if self.n & ~63 != (self.n - k) & ~63:
            self.shared.value = self.n
        if self.n >= self.target and not self.done.done():
            self.shared.value = self.n
            self.done.set_result(None)

    def message(self, payload: bytes) -> None:
        self._count(1)

    def events(self, batch: Sequence[Any]) -> None:
        self._count(len(batch))


Stop = Callable[[], Awaitable[None]]


class RespReader:
    """The broker's RESP2 reader until commit 3ea399d, as it was (for comparison)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0

    async def _fill(self) -> None:
        data = await self._stream.read(65536)
        if not data:
            raise ConnectionError("connection closed by Redis")
        self._buf = self._buf[self._pos:] + data
        self._pos = 0

    async def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._pos)) < 0:
            await self._fill()
        line = self._buf[self._pos:end]
        self._pos = end + 2
        return line

    async def read(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buf) - self._pos < size + 2:
                await self._fill()
            data = self._buf[self._pos:self._pos + size]
            self._pos += size + 2
            return data
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self.read() for _ in range(count)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode(errors="replace"))
        raise ConnectionError(f"not the Redis protocol: {line[:40]!r}")


async def hand_written_receiver(url: str, scope: str, sink: Sink, mode: str) -> Stop:
    """The reader and read loop the broker had until commit 3ea399d, on a plain
    connection (loopback: no TLS), each message handed on as its loop did."""
    import redis.asyncio as aioredis

    from wsgate.broker.redis import RedisBroker, split_url
    from wsgate.config import HistoryConfig

    plain, prefix = split_url(url)
    target = aioredis.connection.parse_url(plain)
    reader, writer = await asyncio.open_connection(target.get("host", "localhost"),
                                                   int(target.get("port", 6379)))
    replies = RespReader(reader)
    if target.get("password"):
        writer.write(_pack(b"AUTH", str(target["password"]).encode()))
        await replies.read()
    writer.write(_pack(b"SUBSCRIBE", f"{prefix}scope:{scope}".encode()))
    if (await replies.read())[0] != b"subscribe":
        raise RuntimeError("not subscribed")
    if mode == "read":
        received = sink.message
    else:
        broker = RedisBroker(url, HistoryConfig(size=0))
        broker._deliver = sink.events
        received = broker._received

    async def read_loop() -> None:  # the broker's _read_loop, as it was
        confirmed = set()
        while True:
            reply = await replies.read()
            if not isinstance(reply, list) or not reply:
                continue
            kind = reply[0]
            if kind == b"message":
                received(reply[2])
            elif kind == b"subscribe":
                confirmed.add(reply[1])
            elif kind == b"unsubscribe":
                confirmed.discard(reply[1])

    task = asyncio.create_task(read_loop())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        writer.close()
        await writer.wait_closed()
    return stop


async def broker_receiver(url: str, scope: str, sink: Sink, mode: str) -> Stop:
    """The broker itself, started and watching scope: its own subscriber connection
    and read loop; in read mode with ``_received`` replaced by the counter."""
    from wsgate.broker.redis import RedisBroker
    from wsgate.config import HistoryConfig

    class Counting(RedisBroker):
        def _received(self, payload: bytes) -> None:
            sink.message(payload)

    broker = (Counting if mode == "read" else RedisBroker)(url, HistoryConfig(size=0))
    await broker.start(sink.events)
    broker.watch(scope)
    if not await broker.ready([scope], timeout=5):
        raise RuntimeError("the broker did not subscribe")
    return broker.close


async def redis_py_receiver(url: str, scope: str, sink: Sink, mode: str,
                            parser: str) -> Stop:
    """redis-py's PubSub on its own connection, read with get_message as a
    receive loop would, each message handed to the sink as the broker's loop does."""
    import redis.asyncio as aioredis
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

    from wsgate.broker.redis import RedisBroker, split_url
    from wsgate.config import HistoryConfig

    plain, prefix = split_url(url)
    client = aioredis.Redis.from_url(
        plain, parser_class=_AsyncHiredisParser if parser == "hiredis" else _AsyncRESP2Parser)
    pubsub = client.pubsub()
    channel = f"{prefix}scope:{scope}"
    await pubsub.subscribe(channel)
    confirmation = await pubsub.get_message(timeout=5)
    if not confirmation or confirmation["type"] != "subscribe":
        raise RuntimeError(f"not subscribed: {confirmation}")
    if mode == "read":
        received = sink.message
    else:
        # The broker's own dedupe, decode and batched deliver, fed by this reader.
        broker = RedisBroker(url, HistoryConfig(size=0))
        broker._deliver = sink.events
        received = broker._received

    async def read_loop() -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                received(message["data"])

    task = asyncio.create_task(read_loop())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()
    return stop


def receiver(variant: str) -> Callable[[str, str, Sink, str], Awaitable[Stop]]:
    if variant == "hand-written":
        return hand_written_receiver
    if variant == "broker":
        return broker_receiver
    return lambda url, scope, sink, mode: redis_py_receiver(
        url, scope, sink, mode, "python" if variant == "redis-py" else "hiredis")


# -- runs -----------------------------------------------------------------------------


async def run_one(variant: str, workload: str, mode: str, args: argparse.Namespace,
                  jobs: multiprocessing.connection.Connection, shared: Any) -> dict[str, Any]:
    paced = workload.startswith("paced")
    per_publish = int(workload.split("-")[1])
    count = int(args.rate * args.paced_seconds) if paced else args.count
    count -= count % per_publish
    prefix = f"bench-pubsub-{uuid.uuid4().hex[:8]}:"
    url = REDIS_URL + ("&" if "?" in REDIS_URL else "?") + f"prefix={prefix}"
    scope = f"customer_id:{CUSTOMER}"
    shared.value = 0
    sink = Sink(count, shared)
    stop = await receiver(variant)(url, scope, sink, mode)
    loop = asyncio.get_running_loop()
    try:
        jobs.send((f"{prefix}scope:{scope}", count, per_publish, args.rate if paced else 0,
                   args.window))
        await loop.run_in_executor(None, jobs.recv)  # ready: the messages are built
        cpu0, t0 = time.process_time(), time.perf_counter()
        jobs.send("go")
        limit = (args.paced_seconds + 20) if paced else max(20.0, count / 2000)
        try:
            await asyncio.wait_for(asyncio.shield(sink.done), limit)
        except TimeoutError:
            pass
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        if not await loop.run_in_executor(None, jobs.poll, STALL_LIMIT + 20):
            raise RuntimeError("the publisher did not finish")
        jobs.recv()  # done
    finally:
        await stop()
    got = sink.n
    return {"variant": variant, "workload": workload, "mode": mode, "messages": count,
            "received": got, "cpu_s": round(cpu, 6), "wall_s": round(wall, 6),
            "cpu_us_per_msg": round(cpu / max(got, 1) * 1e6, 3),
            "msgs_per_s": round(got / wall, 1)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = dict.fromkeys((r["workload"], r["mode"], r["variant"]) for r in runs)
    for workload, mode, variant in keys:
        mine = [r for r in runs if (r["workload"], r["mode"], r["variant"]) ==
                (workload, mode, variant)]
        cpu = [r["cpu_us_per_msg"] for r in mine]
        rate = [r["msgs_per_s"] for r in mine]
        rows.append({"workload": workload, "mode": mode, "variant": variant,
                     "rounds": len(mine), "lost": sum(r["messages"] - r["received"]
                                                      for r in mine),
                     "cpu_us_median": round(statistics.median(cpu), 2),
                     "cpu_us_min": min(cpu), "cpu_us_max": max(cpu),
                     "msgs_per_s_median": round(statistics.median(rate)),
                     "msgs_per_s_min": min(rate), "msgs_per_s_max": max(rate)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<9} {'mode':<8} {'variant':<12} {'CPU us/msg median (min-max)':>28} "
            f"{'vs hand-written':>15} {'msgs/s median (min-max)':>28} {'lost':>5}")
    lines = [head, "-" * len(head)]
    base = {(r["workload"], r["mode"]): r["cpu_us_median"] for r in rows
            if r["variant"] == "hand-written"}
    for r in rows:
        ref = base.get((r["workload"], r["mode"]))
        ratio = f"{r['cpu_us_median'] / ref:.2f}x" if ref else "-"
        cpu = f"{r['cpu_us_median']:.1f} ({r['cpu_us_min']:.1f}-{r['cpu_us_max']:.1f})"
        rate = (f"{r['msgs_per_s_median']:,} ({r['msgs_per_s_min']:,.0f}-"
                f"{r['msgs_per_s_max']:,.0f})")
        lines.append(f"{r['workload']:<9} {r['mode']:<8} {r['variant']:<12} {cpu:>28} "
                     f"{ratio:>15} {rate:>28} {r['lost']:>5}")
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, jobs: multiprocessing.connection.Connection,
                  shared: Any) -> list[dict[str, Any]]:
    runs = []
    variants = list(args.variants)
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for workload in args.workloads:
            for mode in args.modes:
                for variant in order:
                    result = await run_one(variant, workload, mode, args, jobs, shared)
                    result["round"] = rnd
                    runs.append(result)
                    print(f"round {rnd + 1}/{args.rounds} {workload} {mode} {variant}: "
                          f"{result['cpu_us_per_msg']:.1f} us/msg, "
                          f"{result['msgs_per_s']:,.0f} msgs/s", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_pubsub_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000, help="messages per burst run")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s when paced")
    parser.add_argument("--paced-seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=2000,
                        help="most messages the publisher may be ahead of the receiver")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    import redis

    try:
        admin = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        admin.ping()
        admin.close()
    except redis.RedisError as exc:
        print(f"redis_pubsub_bench: Redis at {REDIS_URL} is needed: {exc}", file=sys.stderr)
        return 2
    from redis.utils import HIREDIS_AVAILABLE

    if {"hiredis", "broker"} & set(args.variants) and not HIREDIS_AVAILABLE:
        print("redis_pubsub_bench: the hiredis variant needs `pip install hiredis`",
              file=sys.stderr)
        return 2
    target = redis.connection.parse_url(REDIS_URL)
    if "host" not in target:
        print("redis_pubsub_bench: a TCP Redis URL is needed (loopback)", file=sys.stderr)
        return 2
    pin(RECEIVER_CORE)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    shared = ctx.Value("q", 0, lock=False)
    proc = ctx.Process(target=publisher, args=(theirs, shared, target["host"],
                                               int(target.get("port", 6379)),
                                               target.get("password")), daemon=True)
    proc.start()
    try:
        runs = asyncio.run(run_all(args, ours, shared))
    finally:
        ours.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    rows = summarise(runs)
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"redis-pubsub-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    try:
        import hiredis
        hiredis_version = hiredis.__version__
    except ImportError:
        hiredis_version = None

    out.write_text(json.dumps({
        "bench": "redis_pubsub",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average": os.getloadavg()},
        "versions": {"redis-py": redis.__version__, "hiredis": hiredis_version},
        "args": vars(args), "summary": rows, "runs": runs}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
