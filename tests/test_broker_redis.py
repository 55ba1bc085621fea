"""RedisBroker against the real Redis (``WSGATE_TEST_REDIS_URL``): order,
exactly once per node, interest-based subscribe, history, faults, clean close.

Each test uses its own key prefix (``?prefix=`` in the URL), so runs and other
tests sharing the Redis do not see each other's channels or streams.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import tornado.testing

from tests.conftest import AGENT, CUSTOMER, OTHER_CUSTOMER, service_missing, wait_for
from tests.fakes import TCPProxy
from wsgate.broker import BrokerUnavailable
from wsgate.broker.redis import RedisBroker, split_url
from wsgate.config import HistoryConfig
from wsgate.events import Event, validate_events

REDIS_URL = os.environ.get("WSGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
C = f"customer_id:{CUSTOMER}"
A = f"agent_id:{AGENT}"
OTHER = f"customer_id:{OTHER_CUSTOMER}"

pytestmark = pytest.mark.redis


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    """A plain client on the test Redis, for checks (NUMSUB, CLIENT KILL, keys)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        service_missing(f"Redis at {REDIS_URL}")
    yield client
    client.close()


@pytest.fixture
def redis_url(admin: redis.Redis) -> Iterator[str]:
    """The test Redis URL with a prefix of its own; its keys are deleted afterwards."""
    prefix = f"wsgate-test-{uuid.uuid4().hex[:10]}:"
    yield REDIS_URL + ("&" if "?" in REDIS_URL else "?") + f"prefix={prefix}"
    keys = list(admin.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        admin.delete(*keys)


def numsub(admin: redis.Redis, broker: RedisBroker, scope: str) -> int:
    """How many connections Redis has subscribed to the scope's channel."""
    return int(dict(admin.pubsub_numsub(broker.channel(scope)))[broker.channel(scope).encode()])


def _kill_named(admin: redis.Redis, name: str) -> int:
    killed = 0
    for client in admin.client_list():
        if client.get("name") == name:
            killed += int(admin.execute_command("CLIENT", "KILL", "ID", client["id"]))
    return killed


def events(*specs: dict[str, Any]) -> list[Event]:
    return validate_events([{"type": "call_created", "data": {"n": n}, **spec}
                            for n, spec in enumerate(specs)])


class Node:
    """A started broker and what it delivered, in order."""

    def __init__(self, url: str, history: HistoryConfig | None = None, **kw: Any) -> None:
        self.broker = RedisBroker(url, history or HistoryConfig(), **kw)
        self.got: list[Event] = []
        self.calls = 0

    def deliver(self, batch: Any) -> None:
        self.calls += 1
        self.got.extend(batch)

    async def start(self) -> Node:
        await self.broker.start(self.deliver)
        return self

    async def watching(self, *scopes: str) -> None:
        for scope in scopes:
            self.broker.watch(scope)
        await wait_for(lambda: all(self.broker.subscribed(s) for s in scopes))


@pytest.fixture
def nodes(io_loop: Any) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        io_loop.run_sync(node.broker.close, timeout=10)


async def started(nodes: list[Node], url: str, **kw: Any) -> Node:
    node = Node(url, **kw)
    nodes.append(node)
    return await node.start()


def test_prefix_is_taken_from_the_url_and_the_rest_left_to_redis() -> None:
    assert split_url("redis://h:1/2?prefix=x:&socket_timeout=3") == (
        "redis://h:1/2?socket_timeout=3", "x:")
    assert split_url("redis://h") == ("redis://h", "wsgate:")


@pytest.mark.gen_test(timeout=20)
async def test_each_node_gets_each_event_once_in_publish_order(redis_url, nodes) -> None:
    a = await started(nodes, redis_url)
    b = await started(nodes, redis_url)
    await b.watching(C, A)
    # Scopes interleave: an agent-only event, one in both scopes, a customer-only one.
    batch = events({"agent_id": AGENT}, {"customer_id": CUSTOMER, "agent_id": AGENT},
                   {"customer_id": CUSTOMER}, {"agent_id": AGENT, "customer_id": CUSTOMER})
    await a.broker.publish(batch)
    await wait_for(lambda: len(b.got) >= 4)
    second = events({"customer_id": CUSTOMER})
    await a.broker.publish(second)
    await wait_for(lambda: len(b.got) >= 5)
    assert [e.event_id for e in b.got] == [e.event_id for e in batch + second]
    assert b.got[1].data_json == batch[1].data_json and b.got[1].topics == batch[1].topics
    assert a.got == []  # a watches nothing, so receives nothing


@pytest.mark.gen_test(timeout=20)
async def test_ready_returns_once_redis_confirmed_the_subscriptions(redis_url, nodes,
                                                                   admin) -> None:
    a = await started(nodes, redis_url)
    a.broker.watch(C)
    a.broker.watch(A)
    assert await a.broker.ready([C, A]) is True
    assert numsub(admin, a.broker, C) == numsub(admin, a.broker, A) == 1
    assert await a.broker.ready([OTHER]) is True  # not watched: nothing to wait for
    down = await started(nodes, closed_port_url())
    down.broker.watch(C)
    assert await down.broker.ready([C], timeout=0.05) is False


@pytest.mark.gen_test(timeout=20)
async def test_the_publishing_node_also_delivers_to_itself(redis_url, nodes) -> None:
    a = await started(nodes, redis_url)
    await a.watching(C)
    batch = events({"customer_id": CUSTOMER}, {"customer_id": CUSTOMER})
    await a.broker.publish(batch)
    await wait_for(lambda: len(a.got) == 2)
    assert a.calls == 1  # messages read together are delivered in one call


@pytest.mark.gen_test(timeout=20)
async def test_channels_are_subscribed_by_interested_nodes_only(redis_url, nodes, admin) -> None:
    a = await started(nodes, redis_url)
    b = await started(nodes, redis_url)
    await a.watching(C)
    await b.watching(C, OTHER)
    assert numsub(admin, a.broker, C) == 2
    assert numsub(admin, a.broker, OTHER) == 1
    assert numsub(admin, a.broker, A) == 0
    b.broker.unwatch(C)
    await wait_for(lambda: not b.broker.subscribed(C))
    assert numsub(admin, a.broker, C) == 1
    await a.broker.publish(events({"customer_id": CUSTOMER}, {"customer_id": OTHER_CUSTOMER}))
    await wait_for(lambda: a.got and b.got)
    assert [e.topics[0].scope_key for e in a.got] == [C]
    assert [e.topics[0].scope_key for e in b.got] == [OTHER]


@pytest.mark.gen_test(timeout=20)
async def test_history_since_reads_what_another_node_published(redis_url, nodes) -> None:
    a = await started(nodes, redis_url)
    b = await started(nodes, redis_url)
    batch = events(*[{"customer_id": CUSTOMER, "agent_id": AGENT}] * 4)
    await a.broker.publish(batch)
    after = await b.broker.history_since(C, batch[0].event_id)
    assert [e.event_id for e in after or []] == [e.event_id for e in batch[1:]]
    assert after is not None and after[0].data_json == batch[1].data_json
    assert [e.event_id for e in await b.broker.history_since(A, batch[2].event_id) or []] == \
        [batch[3].event_id]
    assert await b.broker.history_since(C, batch[3].event_id) == []
    with_since = await b.broker.history_since(C, batch[2].event_id, with_since=True)
    assert [e.event_id for e in with_since or []] == [e.event_id for e in batch[2:]]
    assert [t.text for t in (with_since or [])[0].topics] == [t.text for t in batch[2].topics]
    assert await b.broker.history_since(C, str(uuid.uuid4()), with_since=True) is None
    assert await b.broker.history_since(C, str(uuid.uuid4())) is None
    assert await b.broker.history_since(OTHER, batch[0].event_id) is None
    assert a.broker.history_size() == 8  # 4 events x 2 scopes; b published nothing
    assert b.broker.history_size() == 0


@pytest.mark.gen_test(timeout=20)
async def test_history_is_bounded_by_size_and_age(redis_url, nodes, admin) -> None:
    a = await started(nodes, redis_url, history=HistoryConfig(size=3, ttl=0.3))
    batch = events(*[{"customer_id": CUSTOMER}] * 5)
    await a.broker.publish(batch)
    assert admin.xlen(a.broker.history_key(C)) == 3
    assert await a.broker.history_since(C, batch[1].event_id) is None  # trimmed by size
    assert len(await a.broker.history_since(C, batch[2].event_id) or []) == 2
    assert 0 < admin.ttl(a.broker.history_key(C)) <= 2  # an idle scope's stream goes away
    # Past the age limit (by Redis's clock) the events are no longer resumable.

    async def forgotten() -> bool:
        return await a.broker.history_since(C, batch[2].event_id) is None

    await wait_for(forgotten, 5, interval=0.05, message="history outlived its ttl")


@pytest.mark.gen_test(timeout=20)
async def test_history_size_zero_writes_no_stream(redis_url, nodes, admin) -> None:
    a = await started(nodes, redis_url, history=HistoryConfig(size=0))
    await a.watching(C)
    batch = events({"customer_id": CUSTOMER}, {"customer_id": CUSTOMER})
    await a.broker.publish(batch)
    await wait_for(lambda: len(a.got) == 2)
    assert not admin.exists(a.broker.history_key(C))
    assert await a.broker.history_since(C, batch[0].event_id) is None


@pytest.mark.gen_test(timeout=30)
async def test_killed_subscriber_reconnects_resubscribes_and_logs_once(
        redis_url, nodes, admin, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate.broker.redis")
    a = await started(nodes, redis_url)
    b = await started(nodes, redis_url)
    await b.watching(C, A)
    assert _kill_named(admin, f"{b.broker.name}:sub") == 1
    await wait_for(lambda: not b.broker.healthy())
    await wait_for(lambda: b.broker.healthy() and b.broker.subscribed(C)
                   and b.broker.subscribed(A), timeout=10)
    assert numsub(admin, a.broker, C) == 1
    batch = events({"customer_id": CUSTOMER, "agent_id": AGENT})
    await a.broker.publish(batch)
    await wait_for(lambda: len(b.got) == 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "unreachable" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages
    # The publisher's pooled connection, killed too, is replaced without a failure.
    _kill_named(admin, f"{a.broker.name}:pub")
    await a.broker.publish(events({"customer_id": CUSTOMER}))
    await wait_for(lambda: len(b.got) == 2)
    assert a.broker.publish_failures == 0


def closed_port_url() -> str:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    return f"redis://127.0.0.1:{port}/0"


@pytest.mark.gen_test(timeout=20)
async def test_unreachable_redis_refuses_publish_fast_and_counts(nodes, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate.broker.redis")
    a = await started(nodes, closed_port_url())
    assert not a.broker.healthy()
    a.broker.watch(C)  # remembered for when Redis comes
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            await a.broker.publish(events({"customer_id": CUSTOMER}, {"agent_id": AGENT}))
    assert loop.time() - began < 3
    assert a.broker.publish_failures == 6
    assert await a.broker.history_since(C, str(uuid.uuid4())) is None
    # Reconnect attempts go on, but the outage is logged once.
    await wait_for(lambda: a.broker.connect_failures >= 3)
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


@pytest.mark.gen_test(timeout=20)
async def test_close_leaves_no_task_and_no_connection(redis_url, admin) -> None:
    before = asyncio.all_tasks()
    node = await Node(redis_url).start()
    await node.watching(C)
    await node.broker.publish(events({"customer_id": CUSTOMER}))
    await wait_for(lambda: node.got)
    await node.broker.close()
    assert asyncio.all_tasks() - before == set()
    names = {c.get("name") for c in admin.client_list()}
    assert not {f"{node.broker.name}:sub", f"{node.broker.name}:pub"} & names
    assert not node.broker.healthy()


# -- TLS and a password, from the URL ---------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis of its own that speaks only TLS and wants the password ``s3cret``:
    its ``rediss://`` URL (certificate not verified) and an admin client."""
    server = shutil.which("redis-server")
    if server is None:
        service_missing("redis-server (to start a TLS Redis)")
    cert, key = _self_signed(tmp_path)
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    process = subprocess.Popen(
        [str(server), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", "s3cret", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_cert_reqs=none"
    admin = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                service_missing("redis-server with TLS")
            time.sleep(0.02)
    yield url, admin
    admin.close()
    process.terminate()
    process.wait(10)


@pytest.mark.gen_test(timeout=20)
async def test_tls_and_password_are_taken_from_the_url(tls_redis, nodes) -> None:
    url, admin = tls_redis
    a = await started(nodes, url)
    b = await started(nodes, url)
    await b.watching(C)
    assert b.broker.healthy()
    batch = events({"customer_id": CUSTOMER})
    await a.broker.publish(batch)
    await wait_for(lambda: len(b.got) == 1)
    assert b.got[0].event_id == batch[0].event_id
    # The subscriber is a client of that server under its own name: it got past
    # TLS (the only port) and the password (nothing else is allowed there).
    assert f"{b.broker.name}:sub" in {c.get("name") for c in admin.client_list()}
    wrong = await started(nodes, url.replace(":s3cret@", ":wrong@"))
    assert not wrong.broker.healthy()
    await wait_for(lambda: wrong.broker.connect_failures >= 2)
    with pytest.raises(BrokerUnavailable):
        await wrong.broker.publish(events({"customer_id": CUSTOMER}))


# -- a connection that goes silent -------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_silent_subscriber_connection_is_dropped_and_made_again(
        redis_url, nodes, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate.broker.redis")
    proxy = TCPProxy(redis_url)
    port = await proxy.start()
    try:
        a = await started(nodes, redis_url)
        b = await started(nodes, urlsplit(redis_url)._replace(
            netloc=f"127.0.0.1:{port}").geturl(), keepalive=0.1)
        await b.watching(C)
        proxy.flowing.clear()
        # No answer to three keep-alive PINGs: the node gives the connection up.
        await wait_for(lambda: not b.broker.healthy(), timeout=5)
        assert b.broker.connect_failures >= 1
        assert any("no answer to the keep-alive PING" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        proxy.flowing.set()
        await wait_for(lambda: b.broker.healthy() and b.broker.subscribed(C), timeout=10)
        batch = events({"customer_id": CUSTOMER})
        await a.broker.publish(batch)
        await wait_for(lambda: [e.event_id for e in b.got] == [batch[0].event_id])
    finally:
        await proxy.close()
