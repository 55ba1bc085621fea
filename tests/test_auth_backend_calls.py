"""Issue 16 item 6: what a token holder can make the auth backend do.

Against a real local HTTP backend (the ``http`` plugin's test backend), counting
the requests it receives: periodic re-checks are merged per principal, refused
renewals count toward the bad-message close, and over-long tokens never reach it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.test_plugins_http import backend_server

TOKEN = "user-1"  # the test backend's allowed token (one principal)


def refreshes(backend) -> int:
    return sum("subject" in body for body in backend.requests)


def authentications(backend) -> int:
    return sum("token" in body for body in backend.requests)


def http_tables(backend, **server):
    return {"auth": {"plugin": "http", "options": {"url": backend.url}},
            "server": {"max_connections_per_principal": 1000, "max_connections_per_ip": 1000,
                       **server}}


@pytest.mark.gen_test(timeout=60)
async def test_a_re_check_round_asks_the_backend_once_per_principal(make_server):
    # Before: one refresh POST per connection (40 here; 303 in 4.2 s for 200
    # connections with refresh_interval = 2 in the review).
    async with backend_server() as backend:
        server = await make_server(**http_tables(backend, refresh_interval=0))
        clients = [await server.connect(TOKEN) for _ in range(40)]
        assert authentications(backend) == 1  # the plugin's cache
        await server.gateway.refresh_all()
        assert refreshes(backend) == 1
        # The answer (customer_manager instead of customer_admin) reached them all.
        assert {c.principal.permissions for c in server.gateway.connections.values()} == {
            frozenset({"customer_manager"})}
        await server.gateway.refresh_all()
        assert refreshes(backend) == 2
        assert (await clients[-1].request({"type": "ping"}))["type"] == "pong"


@pytest.mark.gen_test(timeout=60)
async def test_refused_renewals_close_1008_as_bad_messages(make_server):
    # Before: each random refused token was a backend call and never a bad message
    # (295 calls in 3 s on one connection in the review).
    async with backend_server() as backend:
        server = await make_server(**http_tables(backend, max_bad_messages_per_minute=5))
        client = await server.connect(TOKEN)
        for n in range(30):
            try:
                await client.send({"type": "authenticate", "token": f"refused-{uuid.uuid4()}",
                                   "id": n})
            except Exception:
                break
        assert await client.closed() == 1008
        assert authentications(backend) - 1 == 6  # the limit, plus the one past it


@pytest.mark.gen_test(timeout=60)
async def test_an_over_long_token_is_refused_before_the_backend_is_asked(make_server):
    async with backend_server() as backend:
        server = await make_server(**http_tables(backend, max_token_bytes=4096))
        long_token = "user-" + "x" * 10_000
        status, body = await server.refused(
            None, headers={"Authorization": f"Bearer {long_token}"})
        assert status == 401
        assert body["error"]["code"] == "unauthenticated"
        assert "longer than 4096 bytes" in body["error"]["message"]
        client = await server.connect(TOKEN)
        reply = await client.request({"type": "authenticate", "token": long_token, "id": 1})
        assert (reply["type"], reply["code"]) == ("error", "unauthenticated")
        assert "longer than 4096 bytes" in reply["message"]
        assert [b.get("token") for b in backend.requests] == [TOKEN]  # only the good one
