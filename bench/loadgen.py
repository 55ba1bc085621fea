"""The load generator: a separate process that holds the WebSocket clients and posts events.

Run by the bench runner as ``python -m bench.loadgen`` with a JSON spec on
stdin; it prints one JSON result line on stdout. A minimal RFC 6455 client
over ``asyncio.Protocol`` keeps the generator cheap:

- every connection counts event frames with ``bytes.count`` of a marker that
  only event frames carry (C speed, no per-frame Python work);
- a uniformly random sample of the connections parses every frame fully and
  checks that each connection sees every sequence number at most once. These
  are read with ``recvmsg`` and ``SO_TIMESTAMPNS``: each read carries the
  kernel's receive timestamp (CLOCK_REALTIME, taken when the data reached the
  socket), and the latency of a frame is that timestamp minus the send time
  the event's ``data`` carries (``"ts"``, ``time.time_ns()`` of the publisher
  just before the POST is written). So the figure does not include how long
  the generator itself took to get to the frame; that figure is reported
  beside it (``read_latency_ms``: the time the frame was parsed instead).
  A TCP read carries the timestamp of the last segment it took, so these
  connections read one frame at a time (see ``StampedClient._readable``).

The generator measures its own CPU time over the measured window; above 80%
of a core the result says so (``generator_saturated``), because then the
figure may be the generator's limit, not the server's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import resource
import socket
import struct
import sys
import time
import uuid
from typing import Any, cast

MARK = b'"type":"bench_tick"'
_TS = re.compile(rb'"ts":([0-9]+),"seq":([0-9]+)')
_MARKLEN = len(MARK) - 1
# Linux: SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35 (Python 3.11 does not name it).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY = socket.CMSG_SPACE(16)
_RECV_SIZE = 1 << 18


def rx_timestamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp data received on sock (see recv_stamped)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def recv_stamped(sock: socket.socket, size: int = _RECV_SIZE) -> tuple[bytes, int]:
    """One ``recvmsg`` on a socket with rx_timestamps on: the data and the kernel's
    receive time of it in CLOCK_REALTIME nanoseconds (for TCP: the time the last
    segment read reached the socket), 0 when the kernel gave none."""
    data, ancillary, _flags, _addr = sock.recvmsg(size, _ANCILLARY)
    for level, kind, raw in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
            sec, nsec = struct.unpack_from("qq", raw)
            return data, sec * 1_000_000_000 + nsec
    return data, 0


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process pid, 0.0 when unknown."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        rep = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(rep, "big")).to_bytes(n, "big")
    else:
        masked = b""
    return header + key + masked


#: CPU to waste per read (bench/rx_check.py: a deliberately slow generator).
_burn_ns = 0


def _burn(ns: int) -> None:
    end = time.thread_time_ns() + ns
    while time.thread_time_ns() < end:
        pass


class Stats:
    """Counters shared by every client of the run."""

    def __init__(self) -> None:
        self.frames = 0
        #: Kernel receive time - send time, and parse time - send time, in seconds.
        self.latencies: list[float] = []
        self.read_latencies: list[float] = []
        self.unstamped = 0
        self.dupes = 0
        self.out_of_order = 0
        self.closed = 0
        self.close_codes: dict[int, int] = {}
        self.replies = 0


class Client(asyncio.Protocol):
    """One WebSocket connection."""

    def __init__(self, stats: Stats, host: str, port: int, path: str, sampled: bool) -> None:
        self.stats = stats
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "\r\n").encode()
        self.sampled = sampled
        self.fast = False
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.tail = b""
        self.last_seq = -1
        self.seen: set[int] | None = None
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()
        #: Kernel receive time of the data being parsed (StampedClient), else 0.
        self.rx_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.lost.done():
            self.lost.set_result(None)
        self.messages.put_nowait(None)

    def send(self, obj: Any) -> None:
        assert self.transport is not None
        self.transport.write(mask_frame(json.dumps(obj).encode()))

    def data_received(self, data: bytes) -> None:
        if _burn_ns:
            _burn(_burn_ns)
        if self.fast:
            # Count event frames; a marker split across two reads is found in tail + data.
            chunk = self.tail + data
            self.stats.frames += chunk.count(MARK)
            self.tail = chunk[-_MARKLEN:]
            return
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                status = bytes(self.buf[:end]).split(b"\r\n")[0].decode(errors="replace")
                self.messages.put_nowait(RuntimeError(f"upgrade refused: {status}"))
                assert self.transport is not None
                self.transport.close()
                return
            del self.buf[:end + 4]
            self.upgraded = True
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        size = len(buf)
        parsed_ns = time.time_ns()
        rx_ns = self.rx_ns or parsed_ns
        stats = self.stats
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head:pos + head + n])
            pos += head + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                if MARK in payload:
                    stats.frames += 1
                    m = _TS.search(payload)
                    if m is not None:
                        sent_ns = int(m.group(1))
                        stats.latencies.append((rx_ns - sent_ns) / 1e9)
                        stats.read_latencies.append((parsed_ns - sent_ns) / 1e9)
                        seq = int(m.group(2))
                        if self.seen is not None:
                            if seq in self.seen:
                                stats.dupes += 1
                            self.seen.add(seq)
                        elif seq <= self.last_seq:
                            stats.dupes += seq == self.last_seq
                            stats.out_of_order += seq < self.last_seq
                        self.last_seq = seq
                else:
                    self.messages.put_nowait(json.loads(payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                stats.close_codes[code] = stats.close_codes.get(code, 0) + 1
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(mask_frame(payload, 0xA))
        del buf[:pos]

    async def expect(self, kind: str, timeout: float = 60.0) -> dict[str, Any]:
        while True:
            msg = await asyncio.wait_for(self.messages.get(), timeout)
            if msg is None:
                raise ConnectionError(f"closed while waiting for {kind!r}")
            if isinstance(msg, Exception):
                raise msg
            if msg.get("type") == kind:
                return msg  # type: ignore[no-any-return]
            if msg.get("type") == "error":
                raise RuntimeError(f"server error: {msg}")


class StampedClient(Client):
    """A sampled connection on a plain non-blocking socket, read with recv_stamped
    (an asyncio transport gives no ancillary data), so every parsed frame has
    the kernel's receive time."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sock: socket.socket | None = None
        self.pending = bytearray()

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        rx_timestamps(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        self.connection_made(cast(asyncio.Transport, self))

    # The transport methods Client uses, on the socket itself.

    def write(self, data: bytes) -> None:
        if self.sock is None:
            return
        if self.pending:
            self.pending += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            return self.close()
        if n < len(data):
            self.pending += data[n:]
            asyncio.get_running_loop().add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        assert self.sock is not None
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        del self.pending[:n]
        if not self.pending:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())

    def close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
        sock.close()
        self.connection_lost(None)

    def _readable(self) -> None:
        # A TCP read carries one timestamp, the one of the last segment it took:
        # after the handshake, each read stops at the end of the frame being
        # read (header first, then the rest), so each frame gets the receive
        # time of its own last byte, however far behind the generator is.
        sock = self.sock
        while sock is not None:
            try:
                data, rx_ns = recv_stamped(sock, self._want() if self.upgraded else _RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self.close()
            if not data:
                return self.close()
            if not rx_ns:
                self.stats.unstamped += 1
            self.rx_ns = rx_ns
            self.data_received(data)
            sock = self.sock

    def _want(self) -> int:
        """Bytes that complete the header, or else the frame, begun in self.buf."""
        buf = self.buf
        have = len(buf)
        if have < 2:
            return 2 - have
        n = buf[1] & 0x7F
        head = 2 if n < 126 else 4 if n == 126 else 10
        if have < head:
            return head - have
        if n >= 126:
            n = int.from_bytes(buf[2:head], "big")
        return head + n - have


async def open_clients(spec: dict[str, Any], stats: Stats) -> list[Client]:
    """Open, upgrade and subscribe spec['connections'] clients, a few hundred at a time."""
    loop = asyncio.get_running_loop()
    host, port = spec["host"], spec["port"]
    n = spec["connections"]
    sample_every = max(1, spec.get("sample_every", 1))
    # A uniformly random sample: the server's delivery order is unrelated to the
    # connection order, and a fixed stride could still line up with it.
    sampled = set(random.Random(spec.get("sample_seed", 2)).sample(range(n), n // sample_every)
                  if sample_every > 1 else range(n))
    # Kernel receive stamps where latency is measured (publish runs): storm and
    # idle clients stay on the cheaper asyncio transport.
    stamped = spec.get("rx_timestamps", spec.get("mode") == "publish")
    clients: list[Client | None] = [None] * n
    sem = asyncio.Semaphore(spec.get("connect_concurrency", 200))

    async def one(i: int) -> None:
        async with sem:
            path = f"/v1.0/ws?token={spec['token']}"
            client: Client
            if i in sampled and stamped:
                client = StampedClient(stats, host, port, path, True)
                await client.open(host, port)
            else:
                client = Client(stats, host, port, path, sampled=i in sampled)
                await loop.create_connection(lambda: client, host, port)
            await client.expect("connected")
            topics = spec["topics_of"][i] if "topics_of" in spec else [spec["topic"]]
            if topics:
                client.send({"type": "subscribe", "topics": topics, "id": i})
                reply = await client.expect("subscribed")
                if reply.get("rejected"):
                    raise RuntimeError(f"subscribe rejected: {reply['rejected']}")
            clients[i] = client

    await asyncio.gather(*(one(i) for i in range(n)))
    ready = [c for c in clients if c is not None]
    for c in ready:
        c.fast = not c.sampled
        # Events of different POSTs may interleave (several publishers): check
        # at-most-once per connection, not order (order within a POST is tested
        # by the test suite).
        c.seen = set()
    return ready


class Publisher:
    """Keep-alive HTTP/1.1 connections posting events; one request in flight on each."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host, self.port = spec["host"], spec["port"]
        self.key = spec.get("ingest_key", "")
        self.posts = 0
        self.errors: dict[str, int] = {}
        self.latency: list[float] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                   body: bytes) -> None:
        reader, writer = conn
        head = (f"POST /v1.0/events HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        writer.write(head + body)
        status_headers = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in status_headers.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await reader.readexactly(length)
        status = status_headers[9:12].decode()
        if status not in ("200", "202"):
            self.errors[status] = self.errors.get(status, 0) + 1
        self.posts += 1


def event_body(events: list[dict[str, Any]], batch: bool) -> bytes:
    if batch:
        return json.dumps({"events": events}, separators=(",", ":")).encode()
    assert len(events) == 1
    return json.dumps(events[0], separators=(",", ":")).encode()


async def run_publish(spec: dict[str, Any]) -> dict[str, Any]:
    """Connect the clients, then post events for spec['duration'] seconds."""
    global _burn_ns
    stats = Stats()
    t_setup = time.monotonic()
    clients = await open_clients(spec, stats)
    setup_s = time.monotonic() - t_setup
    pub = Publisher(spec)
    conns = [await pub.connect() for _ in range(spec.get("publishers", 4))]
    duration = spec["duration"]
    per_post = spec.get("per_post", 1)
    batch = spec.get("batch_form", per_post > 1)
    rate = spec.get("rate")  # events/s; None = as fast as accepted and delivered
    targets: list[str] = spec.get("targets", [])
    recipients = spec.get("recipients_per_event", 1)
    window = spec.get("window", 50_000)
    rng = random.Random(1)
    seq = 0
    expected = 0

    def make_events() -> list[dict[str, Any]]:
        nonlocal seq, expected
        out = []
        for _ in range(per_post):
            topic = targets[rng.randrange(len(targets))] if targets else spec["topic"]
            out.append({"type": "bench_tick", "topics": [topic],
                        "data": {"ts": time.time_ns(), "seq": seq, "pad": spec.get("pad", "")}})
            seq += 1
        expected += per_post * recipients
        return out

    stop = False
    server_pid = spec.get("server_pid")
    _burn_ns = int(spec.get("burn_us", 0) * 1000)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    server0 = proc_cpu(server_pid)
    t0 = time.monotonic()
    frames0 = stats.frames
    lat0 = len(stats.latencies)
    unstamped0 = stats.unstamped
    next_at = t0

    async def worker(conn: Any, idx: int) -> None:
        nonlocal next_at
        while not stop:
            if rate:
                # Paced: each event has its slot; a late worker catches up, never bunches more.
                slot = next_at
                next_at += per_post / rate
                delay = slot - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop:
                    break
            else:
                while expected - stats.frames > window and not stop:
                    await asyncio.sleep(0.0005)
            await pub.post(conn, event_body(make_events(), batch))

    tasks = [asyncio.ensure_future(worker(c, i)) for i, c in enumerate(conns)]
    await asyncio.sleep(duration)
    stop = True
    t1 = time.monotonic()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    server1 = proc_cpu(server_pid)
    frames1 = stats.frames
    lat1 = len(stats.latencies)
    unstamped1 = stats.unstamped
    await asyncio.gather(*tasks, return_exceptions=True)
    # Drain: wait until every expected frame arrived (or nothing moves for 2 s).
    last, still = stats.frames, time.monotonic()
    while stats.frames < expected and time.monotonic() - still < 2.0:
        await asyncio.sleep(0.01)
        if stats.frames != last:
            last, still = stats.frames, time.monotonic()
    wall = t1 - t0
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    lat = sorted(stats.latencies[lat0:lat1])
    read_lat = sorted(stats.read_latencies[lat0:lat1])
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    for _, w in conns:
        w.close()
    return {
        "connections": len(clients), "setup_s": round(setup_s, 2), "wall_s": round(wall, 3),
        "events_posted": seq, "posts": pub.posts, "post_errors": pub.errors,
        "frames_in_window": frames1 - frames0, "frames_total": stats.frames,
        "frames_expected": expected, "lost": max(0, expected - stats.frames),
        "delivered_per_s": (frames1 - frames0) / wall,
        "events_per_s": (frames1 - frames0) / wall / recipients,
        "latency_ms": percentiles(lat), "latency_samples": len(lat),
        "read_latency_ms": percentiles(read_lat), "reads_unstamped": unstamped1 - unstamped0,
        "dupes": stats.dupes, "out_of_order": stats.out_of_order,
        "server_closes": stats.close_codes,
        "generator_cpu": round(cpu / wall, 3),
        "generator_saturated": cpu / wall > 0.8,
        # Server CPU per delivered frame: unlike the rates, barely moved by other
        # processes competing for the server's core.
        "server_cpu": round((server1 - server0) / wall, 3),
        "server_cpu_us_per_frame": round(1e6 * (server1 - server0) / max(1, frames1 - frames0), 2),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    n = len(values)

    def at(q: float) -> float:
        return round(1000.0 * values[min(n - 1, int(q * n))], 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open and subscribe the clients, say READY, hold them until stdin says STOP."""
    stats = Stats()
    t = time.monotonic()
    clients = await open_clients(spec, stats)
    setup = time.monotonic() - t
    print(json.dumps({"ready": len(clients), "setup_s": round(setup, 2)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return {"connections": len(clients), "setup_s": round(setup, 2),
            "server_closes": stats.close_codes}


async def run_storm(spec: dict[str, Any]) -> dict[str, Any]:
    """Each client subscribes new topics, spec['in_flight'] messages at a time, for
    spec['duration'] seconds; counts accepted topics per second."""
    stats = Stats()
    spec = dict(spec, topics_of=[[] for _ in range(spec["connections"])])
    clients = await open_clients(spec, stats)
    for c in clients:
        c.fast = False  # replies are parsed
    per_msg = spec.get("topics_per_message", 1)
    customer = spec["customer_id"]
    # Several generator processes: topics of their own (tag), one window (barrier:
    # say ready once connected, start on a line from stdin).
    tag = spec.get("tag", "")
    accepted = 0
    offered = 0
    stop = False
    server_pid = spec.get("server_pid")
    lat: list[float] = []

    async def drive(i: int, c: Client) -> None:
        nonlocal accepted
        k = 0
        in_flight = spec.get("in_flight", 1)
        sent: dict[int, float] = {}

        def send_one() -> None:
            nonlocal k, offered
            topics = [f"customer_id:{customer}:storm:{tag}{i}-{k}-{j}" for j in range(per_msg)]
            sent[k] = time.monotonic()
            c.send({"type": "subscribe", "topics": topics, "id": k})
            offered += 1
            k += 1

        for _ in range(in_flight):
            send_one()
        while True:
            reply = await c.expect("subscribed")
            lat.append(time.monotonic() - sent.pop(reply["id"]))
            if reply.get("rejected"):
                raise RuntimeError(f"subscribe rejected: {reply['rejected'][:1]}")
            accepted += len(reply["topics"])
            if stop:
                if not sent:
                    return
                continue
            send_one()

    if spec.get("barrier"):
        print(json.dumps({"ready": len(clients)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    tasks = [asyncio.ensure_future(drive(i, c)) for i, c in enumerate(clients)]
    await asyncio.sleep(spec.get("warmup", 0.0))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    server0 = proc_cpu(server_pid)
    t0 = time.monotonic()
    accepted0, offered0, lat0 = accepted, offered, len(lat)
    await asyncio.sleep(spec["duration"])
    window_accepted = accepted - accepted0
    window_offered = offered - offered0
    window_lat = lat[lat0:]
    t1 = time.monotonic()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    server1 = proc_cpu(server_pid)
    stop = True
    done, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    errors = [repr(t.exception()) for t in done if t.exception() is not None]
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    wall = t1 - t0
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"connections": len(clients), "subscribes_per_s": window_accepted / wall,
            "offered_per_s": window_offered * per_msg / wall,
            "accepted": window_accepted, "wall_s": round(wall, 3), "errors": errors[:3],
            "reply_latency_ms": percentiles(sorted(window_lat)),
            "generator_cpu": round(cpu / wall, 3), "generator_saturated": cpu / wall > 0.8,
            "server_cpu": round((server1 - server0) / wall, 3),
            "server_cpu_us_per_subscribe": round(
                1e6 * (server1 - server0) / max(1, window_accepted), 2)}


def main() -> None:
    raise_nofile()
    spec = json.loads(sys.stdin.readline())
    mode = spec["mode"]
    runner = {"publish": run_publish, "idle": run_idle, "storm": run_storm}[mode]
    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(runner(spec))
    print(json.dumps(result), flush=True)


def agent_topics(n: int) -> list[str]:
    """n distinct agent topics (one per connection in the targeted scenario)."""
    rng = random.Random(7)
    return [f"agent_id:{uuid.UUID(int=rng.getrandbits(128), version=4)}" for _ in range(n)]


if __name__ == "__main__":
    main()
