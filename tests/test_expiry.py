"""SPEC §2 "Expiry and refresh" and continuous authorization (4001, 4003)."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import tornado.httpserver
import tornado.testing
import tornado.web

from tests.conftest import AGENT, CUSTOMER, OTHER_AGENT, event, wait_for
from wsgate.plugins import Principal

KEY = "test-jwt-key-of-sufficient-length-0123456789"
ALL = f"customer_id:{CUSTOMER}"


def jwt_tables():
    return {"auth": {"plugin": "jwt", "options": {"algorithms": ["HS256"], "key": KEY,
                                                  "leeway": 0}}}


def mint(server, agent=AGENT, ttl=60.0):
    principal = Principal(kind="agent", subject=agent, customer_id=CUSTOMER, agent_id=agent,
                          permissions=frozenset({"customer_admin"}))
    return server.gateway.authenticator.mint(principal, ttl)


def rows(server):
    engine = sa.create_engine(server.config.audit.url)
    try:
        with engine.connect() as db:
            return [dict(r) for r in db.execute(sa.text(
                "SELECT action, topic, outcome, code FROM audit_rows ORDER BY id")).mappings()]
    finally:
        engine.dispose()


@pytest.mark.gen_test(timeout=30)
async def test_expired_credential_closes_4001_and_ends_subscriptions(make_server):
    server = await make_server(**jwt_tables())
    client = await server.connect(mint(server, ttl=2))
    await client.subscribe(ALL)
    assert await client.closed(timeout=10) == 4001
    ends = await wait_for(lambda: [r for r in rows(server) if r["action"] == "unsubscribe"])
    assert ends == [{"action": "unsubscribe", "topic": ALL, "outcome": "accepted",
                     "code": "expired"}]


@pytest.mark.gen_test(timeout=30)
async def test_renewal_keeps_the_connection_and_events_flowing(make_server):
    server = await make_server(**jwt_tables())
    client = await server.connect(mint(server, ttl=2))
    # Not renewed, and minted after the first token: expires no earlier than it.
    twin = await server.connect(mint(server, ttl=2))
    await client.subscribe(ALL)
    reply = await client.request({"type": "authenticate", "token": mint(server, ttl=60),
                                  "id": "r1"})
    assert reply["type"] == "authenticated" and reply["id"] == "r1"
    expires = datetime.fromisoformat(reply["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC) + timedelta(seconds=50)
    assert await twin.closed(timeout=10) == 4001  # past the first token's expiry
    status, body = await server.post(event())
    assert status == 202
    assert (await client.recv())["event_id"] == body["event_ids"][0]
    assert [r for r in rows(server) if r["action"] == "renew"] == [
        {"action": "renew", "topic": "", "outcome": "accepted", "code": ""}]


@pytest.mark.gen_test(timeout=30)
async def test_token_for_another_principal_is_refused_and_changes_nothing(make_server):
    server = await make_server(**jwt_tables())
    client = await server.connect(mint(server, ttl=60))
    await client.subscribe(ALL)
    for token in (mint(server, agent=OTHER_AGENT), "not-a-jwt"):
        reply = await client.request({"type": "authenticate", "token": token, "id": 2})
        assert reply["type"] == "error" and reply["code"] == "unauthenticated"
        assert reply["id"] == 2
    conn = next(iter(server.gateway.connections.values()))
    assert conn.principal.subject == AGENT
    status, body = await server.post(event())
    assert (await client.recv())["event_id"] == body["event_ids"][0]


class Backend(tornado.web.RequestHandler):
    """A real validation backend for the http authenticator."""

    def initialize(self, state):
        self.state = state

    def post(self):
        if self.state["revoked"]:
            self.set_status(403)
            self.finish("{}")
            return
        self.finish(json.dumps({"kind": "agent", "subject": "alice", "customer_id": CUSTOMER,
                                "agent_id": AGENT, "permissions": ["customer_admin"]}))


@pytest.mark.gen_test(timeout=30)
async def test_revoked_principal_is_closed_4003(make_server):
    state = {"revoked": False}
    sock, port = tornado.testing.bind_unused_port()
    backend = tornado.httpserver.HTTPServer(tornado.web.Application(
        [("/check", Backend, {"state": state})]))
    backend.add_sockets([sock])
    try:
        server = await make_server(auth={"plugin": "http", "options": {
            "url": f"http://127.0.0.1:{port}/check"}})
        client = await server.connect("any-token")
        await client.subscribe(ALL, f"agent_id:{AGENT}")
        await server.gateway.refresh_all()  # still allowed: nothing happens
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        state["revoked"] = True
        await server.gateway.refresh_all()
        assert await client.closed() == 4003
        ends = await wait_for(lambda: [r for r in rows(server) if r["action"] == "unsubscribe"])
        assert sorted((r["topic"], r["code"]) for r in ends) == [
            (f"agent_id:{AGENT}", "revoked"), (ALL, "revoked")]
    finally:
        backend.stop()
        await backend.close_all_connections()


@pytest.mark.gen_test(timeout=30)
async def test_renewing_with_fewer_rights_closes_4003_and_stops_customer_events(make_server):
    # Issue 16 item 3: an admin renewed with a non-admin token of the same subject
    # got "authenticated" and kept receiving customer-wide events.
    server = await make_server(**jwt_tables())
    client = await server.connect(mint(server))
    await client.subscribe(ALL)
    plain = server.gateway.authenticator.mint(
        Principal(kind="agent", subject=AGENT, customer_id=CUSTOMER, agent_id=AGENT), 60)
    await client.send({"type": "authenticate", "token": plain, "id": "r"})
    assert await client.closed() == 4003
    ends = await wait_for(lambda: [r for r in rows(server) if r["action"] == "unsubscribe"])
    assert ends == [{"action": "unsubscribe", "topic": ALL, "outcome": "accepted",
                     "code": "revoked"}]
    assert [r for r in rows(server) if r["action"] == "renew"] == [
        {"action": "renew", "topic": "", "outcome": "rejected", "code": "revoked"}]
