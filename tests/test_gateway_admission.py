"""wsgate.gateway.admission without a socket: credentials in, principals out, the
authenticator's failures contained, connection limits per principal and address."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest

from tests.conftest import CUSTOMER, base_config
from tests.fakes import SCRIPTED_AUTH
from wsgate import errors
from wsgate.config import ConfigError
from wsgate.gateway import admission, utcnow
from wsgate.plugins import Principal, Refused, Unavailable

SECRET = "s3cr3t-T0KEN-d0-not-log"
ALICE = Principal(kind="agent", subject="alice", customer_id=CUSTOMER,
                  permissions=frozenset({"customer_admin"}))


@pytest.mark.gen_test
async def test_an_authenticator_failure_quoting_the_credential_never_logs_it(make_node,
                                                                             caplog):
    caplog.set_level(logging.DEBUG)
    node = await make_node(**SCRIPTED_AUTH)
    node.gateway.authenticator.answers[SECRET] = RuntimeError(
        f"backend rejected request for credential {SECRET}")
    with pytest.raises(Unavailable) as info:
        await node.gateway.authenticate(SECRET)
    assert str(info.value) == "the authenticator failed; try again later"
    # The operator sees what failed, with the credential masked.
    assert "RuntimeError: backend rejected request for credential ***" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.gen_test
async def test_an_authenticator_that_hangs_is_unavailable_after_the_time_limit(make_node,
                                                                               monkeypatch):
    monkeypatch.setattr(admission, "AUTHENTICATE_TIMEOUT", 0.01)
    node = await make_node(**SCRIPTED_AUTH)
    never = asyncio.get_running_loop().create_future()  # never resolved
    node.gateway.authenticator.answers["slow"] = never
    with pytest.raises(Unavailable, match="did not answer in time"):
        await node.gateway.authenticate("slow")
    assert never.cancelled()


@pytest.mark.gen_test
async def test_an_answer_that_is_not_a_principal_is_unavailable(make_node, caplog):
    node = await make_node(**SCRIPTED_AUTH)
    node.gateway.authenticator.answers["odd"] = "alice"
    with pytest.raises(Unavailable, match="invalid answer"):
        await node.gateway.authenticate("odd")
    assert "returned str, not a Principal" in caplog.text


@pytest.mark.gen_test
async def test_refusals_and_expired_credentials_are_refused(make_node):
    node = await make_node(**SCRIPTED_AUTH)
    answers = node.gateway.authenticator.answers
    answers["old"] = Principal(kind="agent", subject="alice", customer_id=CUSTOMER,
                               expires_at=utcnow() - timedelta(seconds=1))
    answers["good"] = ALICE
    with pytest.raises(Refused, match="the credential has expired"):
        await node.gateway.authenticate("old")
    with pytest.raises(Refused, match="unknown credential"):
        await node.gateway.authenticate("nobody")
    assert await node.gateway.authenticate("good") == ALICE


@pytest.mark.gen_test
async def test_connections_per_principal_are_limited(make_node):
    node = await make_node(server={"max_connections_per_principal": 2})
    first, _ = await node.connect("admin-token", "10.0.0.1")
    await node.connect("admin-token", "10.0.0.2")
    with pytest.raises(errors.TooManyConnections) as info:
        await node.connect("admin-token", "10.0.0.3")
    assert (info.value.status, info.value.code) == (429, "too_many_connections")
    assert str(info.value) == "at most 2 connections per principal"
    await node.connect("manager-token", "10.0.0.1")  # another principal
    node.gateway.disconnected(first, 1000)
    await node.connect("admin-token", "10.0.0.3")  # one was released
    assert node.gateway.open_connections() == 3


@pytest.mark.gen_test
async def test_connections_per_address_are_limited(make_node):
    node = await make_node(server={"max_connections_per_ip": 1})
    conn, _ = await node.connect("admin-token", "10.0.0.1")
    with pytest.raises(errors.TooManyConnections, match="at most 1 connections per address"):
        await node.connect("agent-token", "10.0.0.1")
    await node.connect("agent-token", "10.0.0.2")
    node.gateway.close_connection(conn, errors.CLOSE_REVOKED, "rights revoked")
    await node.connect("agent-token", "10.0.0.1")


@pytest.mark.gen_test
async def test_a_draining_node_refuses_new_connections(make_node):
    node = await make_node()
    conn, peer = await node.connect()
    await node.subscribe(conn, f"customer_id:{CUSTOMER}")
    await node.gateway.shutdown()
    assert peer.closes == [(1001, "server shutting down")]
    assert node.audit.rows("unsubscribe") == [
        ("unsubscribe", f"customer_id:{CUSTOMER}", "accepted", "shutdown")]
    with pytest.raises(errors.Draining) as info:
        await node.connect()
    assert (info.value.status, info.value.code) == (503, "shutting_down")


@pytest.mark.gen_test
async def test_a_token_over_max_token_bytes_is_refused_without_asking_the_plugin(make_node):
    # Issue 16 item 6: 64 KB tokens were forwarded to the backend as they were.
    node = await make_node(**SCRIPTED_AUTH, server={"max_token_bytes": 16})
    auth = node.gateway.authenticator
    auth.answers["é" * 9] = ALICE  # 9 characters, 18 bytes: bytes count, not characters
    auth.answers["a" * 16] = ALICE
    with pytest.raises(Refused, match="longer than 16 bytes"):
        await node.gateway.authenticate("é" * 9)
    assert auth.calls == 0
    assert await node.gateway.authenticate("a" * 16) == ALICE
    assert auth.calls == 1


def test_max_token_bytes_must_be_at_least_1(tmp_path):
    with pytest.raises(ConfigError, match=r"\[server\] max_token_bytes: must be at least 1"):
        base_config(tmp_path, server={"max_token_bytes": 0})
