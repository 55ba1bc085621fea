"""The benchmark scripts import and run at toy scale (no timing is asserted)."""

from bench import loadgen
from bench.index_bench import run as run_index
from tests.conftest import wait_for


def test_index_bench_runs_at_toy_scale():
    result = run_index((200,), rounds=200)
    assert result["sizes"][0]["subscriptions"] >= 200


def test_masked_frame_is_rfc6455():
    frame = loadgen.mask_frame(b"hello")
    assert frame[0] == 0x81 and frame[1] == 0x80 | 5
    key, masked = frame[2:6], frame[6:]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(masked)) == b"hello"


def test_percentiles():
    values = sorted(i / 1000 for i in range(100))
    assert loadgen.percentiles(values)["p50"] == 50.0
    assert loadgen.percentiles([]) == {}


def test_kernel_receive_timestamp_is_the_arrival_not_the_read():
    import select
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            loadgen.rx_timestamps(client)
            # The kernel switches receive stamps on for the host a moment after
            # the first socket asks (deferred work): until then a segment comes
            # unstamped (0). Wait for a stamped warm-up byte before measuring.
            for _ in range(500):
                server.sendall(b"w")
                assert select.select([client], [], [], 30)[0]
                if loadgen.recv_stamped(client)[1]:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the kernel never stamped a received segment")
            before = time.time_ns()
            server.sendall(b"x" * 200)
            assert select.select([client], [], [], 30)[0]
            readable = time.time_ns()
            time.sleep(0.01)  # the data waits in the socket: its stamp must not move
            data, stamp = loadgen.recv_stamped(client)
    assert data == b"x" * 200
    assert before <= stamp <= readable


def test_stamped_client_reads_one_frame_at_a_time():
    import asyncio
    import socket

    async def main() -> tuple[int, list[int], int]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        stats = loadgen.Stats()
        host, port = listener.getsockname()
        client = loadgen.StampedClient(stats, host, port, "/", True)
        opening = asyncio.ensure_future(client.open(host, port))
        peer, _ = await loop.sock_accept(listener)
        await opening
        request = await loop.sock_recv(peer, 4096)
        assert request.startswith(b"GET / HTTP/1.1")
        ticks = b"".join(
            bytes((0x81, len(p))) + p for p in (
                b'{"type":"bench_tick","data":{"ts":%d,"seq":%d}}' % (10**18, i)
                for i in range(3)))
        reads: list[int] = []
        real = client.data_received
        client.data_received = lambda data: (reads.append(len(data)), real(data))
        await loop.sock_sendall(peer, b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await wait_for(lambda: client.upgraded)
        reads.clear()
        client.seen = set()
        await loop.sock_sendall(peer, ticks)  # one write: three frames in one segment
        await wait_for(lambda: stats.frames >= 3)
        client.close()
        peer.close()
        listener.close()
        return stats.frames, reads, stats.dupes

    frames, reads, dupes = asyncio.run(asyncio.wait_for(main(), 30))
    assert frames == 3 and dupes == 0
    # Header, then the rest, for each frame: each frame's stamp is its own.
    assert len(reads) == 6 and reads[0] == 2


def test_txn_cost_runs_at_toy_scale(tmp_path, capsys, monkeypatch):
    import sys

    from bench import txn_cost

    monkeypatch.setattr(sys, "argv", ["txn_cost", "--n", "3", "--dir", str(tmp_path)])
    txn_cost.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["engine_begin", "kept_connection",
                                                   "dbapi"] * 2


def test_the_floor_server_routes_a_posted_event_to_its_subscriber():
    # bench/peers_floor.py speaks the peers harness's protocol (b); check it end to end.
    import http.client
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bench.peers_floor", "--port", str(port),
                               "--loop", "asyncio"])
    try:
        import time

        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "bench.peers_floor did not start"
                time.sleep(0.05)
        ws = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ws:
            ws.sendall(b"GET /v1.0/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 13\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += ws.recv(1)
            assert head.startswith(b"HTTP/1.1 101")
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's worked example

            def frame() -> dict:
                first = ws.recv(2)
                assert first[0] == 0x81 and first[1] < 126
                payload = b""
                while len(payload) < first[1]:
                    payload += ws.recv(first[1] - len(payload))
                return json.loads(payload)

            ws.sendall(loadgen.mask_frame(b'{"type":"subscribe","topics":["a:b"]}'))
            assert frame() == {"type": "subscribed", "topics": ["a:b"]}
            post = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            post.request("POST", "/v1.0/events", json.dumps(
                {"events": [{"type": "x_y", "topics": ["a:b", "c:d"], "data": {"n": 1}}]}),
                {"Content-Type": "application/json"})
            answer = post.getresponse()
            assert answer.status == 202
            assert json.loads(answer.read()) == {"accepted": 1, "delivered": 1}
            post.close()
            assert frame() == {"type": "x_y", "topic": "a:b", "data": {"n": 1}}
    finally:
        server.terminate()
        server.wait(10)
