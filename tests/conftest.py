"""Shared fixtures: a real gateway on an unused port, WebSocket clients, ingest calls;
a gateway without sockets for the fast tests of its rooms; the polling helper.

Services: ``WSGATE_TEST_PG_URL`` and ``WSGATE_TEST_REDIS_URL`` name the real
PostgreSQL and Redis. Tests that need one skip with a message when it is not
reachable, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.websocket

from tests.fakes import ControlledAuditSink, FakeTransport
from wsgate.adapters.server import make_app
from wsgate.adapters.server import make_server as make_http_server
from wsgate.app import build_gateway
from wsgate.broker import Broker
from wsgate.config import Config, config_from_dict
from wsgate.events import Event, validate_events
from wsgate.gateway import Connection

CUSTOMER = "5013bc52-da9a-11ee-844f-2fa34248de28"
OTHER_CUSTOMER = "6a1f4c2e-da9a-11ee-8d7e-0b6f3c2d1e4f"
AGENT = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
OTHER_AGENT = "9c3d2b1a-da9a-11ee-a1b2-3c4d5e6f7a8b"
INGEST_KEY = "test-ingest-key"

#: token -> principal, for the static authenticator used by the tests.
TOKENS: dict[str, dict[str, Any]] = {
    "admin-token": {"kind": "agent", "subject": "alice", "customer_id": CUSTOMER,
                    "agent_id": AGENT, "permissions": ["customer_admin"]},
    "manager-token": {"kind": "agent", "subject": "mallory-manager", "customer_id": CUSTOMER,
                      "agent_id": OTHER_AGENT, "permissions": ["customer_manager"]},
    "agent-token": {"kind": "agent", "subject": "bob", "customer_id": CUSTOMER,
                    "agent_id": AGENT, "permissions": ["customer_agent"]},
    "other-agent-token": {"kind": "agent", "subject": "carol", "customer_id": CUSTOMER,
                          "agent_id": OTHER_AGENT, "permissions": ["customer_agent"]},
    "accesskey-token": {"kind": "accesskey", "subject": "key-1", "customer_id": CUSTOMER,
                        "permissions": []},
    "direct-token": {"kind": "direct", "subject": "direct-1", "customer_id": CUSTOMER,
                     "allowed_resources": ["call"]},
    "super-token": {"kind": "agent", "subject": "root", "customer_id": OTHER_CUSTOMER,
                    "agent_id": OTHER_AGENT, "permissions": ["project_super_admin"]},
}


def service_missing(what: str) -> None:
    """Skip (or, under CI, fail) a test whose service is not reachable."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI but not reachable")
    pytest.skip(f"{what} not reachable; set it up to run this test")


def base_config(tmp_path: Any, **tables: dict[str, Any]) -> Config:
    """A test config: static tokens, SQLite audit in tmp_path, memory broker."""
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8080, "node_id": "test-node",
                   "allowed_origins": ["https://app.example.com"]},
        "auth": {"plugin": "static", "options": {"tokens": TOKENS}},
        "permissions": {"plugin": "voipbin"},
        "ingest": {"keys": [INGEST_KEY]},
        "audit": {"url": f"sqlite:///{tmp_path}/audit.db",
                  "journal_path": f"{tmp_path}/audit.journal", "group_commit_ms": 0.5},
        "broker": {"url": "memory://"},
    }
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    return config_from_dict(raw, source="<test>")


class Client:
    """A WebSocket test client that reads frames as JSON."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection) -> None:
        self.ws = ws

    async def send(self, message: Any) -> None:
        await self.ws.write_message(message if isinstance(message, (str, bytes))
                                    else json.dumps(message), binary=isinstance(message, bytes))

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next frame as JSON; None when the connection closed."""
        frame = await asyncio.wait_for(self.ws.read_message(), timeout)
        return None if frame is None else json.loads(frame)

    async def request(self, message: dict[str, Any], timeout: float = 5.0) -> Any:
        await self.send(message)
        return await self.recv(timeout)

    async def subscribe(self, *topics: str, **extra: Any) -> Any:
        return await self.request({"type": "subscribe", "topics": list(topics), **extra})

    async def unsubscribe(self, *topics: str, **extra: Any) -> Any:
        return await self.request({"type": "unsubscribe", "topics": list(topics), **extra})

    async def subscribe_until_accepted(self, topic: str, timeout: float = 20.0) -> Any:
        """Retry a subscribe refused with audit_unavailable until the audit store
        takes it; return the reply. Any other refusal fails at once."""
        async def accepted() -> Any:
            reply = await self.subscribe(topic)
            if reply["topics"] == [topic]:
                return reply
            assert [r["code"] for r in reply["rejected"]] == ["audit_unavailable"], reply
            return None

        return await wait_for(accepted, timeout, interval=0.1,
                              message="the audit store did not recover")

    async def no_frame(self, wait: float = 0.2) -> None:
        """Assert nothing arrives within wait seconds (after a ping round trip)."""
        reply = await self.request({"type": "ping", "id": "probe"})
        assert reply == {"type": "pong", "id": "probe"}, f"unexpected frame {reply}"
        with pytest.raises(asyncio.TimeoutError):
            frame = await asyncio.wait_for(self.ws.read_message(), wait)
            raise AssertionError(f"unexpected frame {frame}")

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the close; return its code."""
        while True:
            frame = await asyncio.wait_for(self.ws.read_message(), timeout)
            if frame is None:
                return self.ws.close_code

    def close(self) -> None:
        self.ws.close()


class Server:
    """A gateway served on an unused port for one test."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.gateway = build_gateway(config, broker=broker)
        self.clients: list[Client] = []
        self.http = tornado.httpclient.AsyncHTTPClient()

    async def start(self) -> Server:
        await self.gateway.start()
        sock, self.port = tornado.testing.bind_unused_port()
        self.server: tornado.httpserver.HTTPServer = make_http_server(
            make_app(self.gateway, self.gateway.metrics), self.config)
        self.server.add_sockets([sock])
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1.0/ws"
        return self

    async def connect(self, token: str | None = "admin-token",
                      headers: dict[str, str] | None = None, query: str = "",
                      expect_connected: bool = True) -> Client:
        url = self.ws_url + "?" + query if query else self.ws_url
        if token is not None:
            url += ("&" if "?" in url else "?") + f"token={token}"
        request = tornado.httpclient.HTTPRequest(url, headers=headers or {})
        ws = await tornado.websocket.websocket_connect(request)
        client = Client(ws)
        self.clients.append(client)
        if expect_connected:
            hello = await client.recv()
            assert hello["type"] == "connected", hello
        return client

    async def refused(self, token: str | None = "admin-token",
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Try to connect; return the HTTP status and JSON body of the refusal."""
        url = self.ws_url + (f"?token={token}" if token is not None else "")
        request = tornado.httpclient.HTTPRequest(url, headers=headers or {})
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            ws = await tornado.websocket.websocket_connect(request)
            ws.close()
        response = info.value.response
        assert response is not None
        return info.value.code, json.loads(response.body)

    async def post(self, body: Any, key: str | None = INGEST_KEY,
                   headers: dict[str, str] | None = None,
                   content_type: str = "application/json") -> tuple[int, Any]:
        """POST /v1.0/events; returns status and decoded JSON body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": content_type}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        all_headers.update(headers or {})
        response = await self.http.fetch(self.base + "/v1.0/events", method="POST",
                                         body=data, headers=all_headers, raise_error=False)
        try:
            decoded = json.loads(response.body) if response.body else None
        except ValueError:
            decoded = response.body
        return response.code, decoded

    async def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()
        await self.gateway.shutdown()
        await self.server.close_all_connections()


@pytest.fixture
def make_server(io_loop: Any, tmp_path: Any) -> Any:
    """An async factory: ``server = await make_server(**config_tables)``; ``broker``
    makes the broker from the config instead of the configured one."""
    servers: list[Server] = []

    async def factory(config: Config | None = None,
                      broker: Callable[[Config], Broker] | None = None,
                      **tables: dict[str, Any]) -> Server:
        config = config or base_config(tmp_path, **tables)
        server = Server(config, broker(config) if broker is not None else None)
        servers.append(server)
        return await server.start()

    yield factory
    for server in servers:
        io_loop.run_sync(server.stop, timeout=15)


class Node:
    """One gateway without sockets, for the fast tests of its rooms.

    Made by ``build_gateway`` with a :class:`ControlledAuditSink` (``audit``)
    and the memory broker (or the one given); each client is a
    :class:`FakeTransport`, opened through the gateway as the WebSocket
    adapter opens one.
    """

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.audit = ControlledAuditSink(config.server.node_id)
        self.gateway = build_gateway(config, audit=self.audit, broker=broker)

    async def start(self) -> Node:
        await self.gateway.start()
        return self

    async def connect(self, token: str = "admin-token",
                      remote_addr: str = "127.0.0.1") -> tuple[Connection, FakeTransport]:
        """Authenticate, admit and open a connection (raising what the adapter would
        turn into an HTTP refusal); its ``connected`` frame is taken already."""
        principal = await self.gateway.authenticate(token)
        self.gateway.admit(principal, remote_addr)
        peer = FakeTransport()
        conn = self.gateway.open(peer, principal, remote_addr, "https://app.example.com",
                                 "pytest")
        hello = peer.take()
        assert [f["type"] for f in hello] == ["connected"], hello
        return conn, peer

    def send(self, conn: Connection, message: Any) -> asyncio.Future[None]:
        """Hand one client message to the gateway, as the WebSocket layer does; the
        future is done once the gateway has finished with it (replied)."""
        raw = message if isinstance(message, (str, bytes)) else json.dumps(message)
        handled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.gateway.receive(conn, raw, lambda: handled.set_result(None)):
            handled.set_result(None)
        return handled

    async def request(self, conn: Connection, message: Any, timeout: float = 5.0) -> None:
        """send, commit the audit rows it submitted, and wait until it is handled."""
        handled = self.send(conn, message)
        self.audit.commit()
        await asyncio.wait_for(handled, timeout)

    async def subscribe(self, conn: Connection, *topics: str, **extra: Any) -> None:
        await self.request(conn, {"type": "subscribe", "topics": list(topics), **extra})

    async def publish(self, *bodies: dict[str, Any]) -> list[Event]:
        """Publish ingest bodies (see :func:`event`) through the gateway and its broker."""
        events = validate_events(list(bodies))
        await self.gateway.publish(events, "test-key", ["0" * 64] * len(events))
        return events


@pytest.fixture
def make_node(io_loop: Any, tmp_path: Any) -> Any:
    """An async factory: ``node = await make_node(**config_tables)``, a started
    :class:`Node` (no periodic re-check unless ``server`` sets one); ``broker``
    makes the broker from the config."""
    nodes: list[Node] = []

    async def factory(broker: Callable[[Config], Broker] | None = None,
                      **tables: dict[str, Any]) -> Node:
        tables["server"] = {"refresh_interval": 0, **tables.get("server", {})}
        config = base_config(tmp_path, **tables)
        node = Node(config, broker(config) if broker is not None else None)
        nodes.append(node)
        return await node.start()

    yield factory
    for node in nodes:
        io_loop.run_sync(node.gateway.shutdown, timeout=5)


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0,
                   interval: float = 0.01,
                   message: str | Callable[[], str] = "condition not met in time") -> Any:
    """Poll predicate until it returns something truthy, and return that; fail after timeout.

    The one polling helper of the suite. ``predicate`` may return an awaitable
    (awaited each round: an HTTP probe, a retried request); an exception it
    raises fails at once. ``message`` is the failure's text, or a function that
    gives it (called on failure, to show the last state).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval)


async def next_turn() -> None:
    """Return once every callback already scheduled on the event loop has run (the
    loop runs them in order): for a test that asserts something did not happen."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned


def wait_for_blocking(predicate: Callable[[], Any], timeout: float = 5.0,
                      interval: float = 0.01,
                      message: str | Callable[[], str] = "condition not met in time") -> Any:
    """:func:`wait_for` in a test without an event loop, whose work runs in threads."""
    return asyncio.run(wait_for(predicate, timeout, interval, message))


def event(type_: str = "call_created", **fields: Any) -> dict[str, Any]:
    """A valid event for CUSTOMER unless fields override it."""
    body: dict[str, Any] = {"type": type_, "customer_id": CUSTOMER,
                            "data": {"id": "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"}}
    body.update(fields)
    return body
