"""wsgate.gateway.refresh without a socket: expiry (4001), renewal with ``authenticate``,
and the periodic re-check of every principal (4003). SPEC §2 "Expiry and refresh"."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from tests.conftest import CUSTOMER, event, wait_for
from tests.fakes import SCRIPTED_AUTH
from wsgate.gateway import rfc3339, utcnow
from wsgate.plugins import Principal, Unavailable

ALL = f"customer_id:{CUSTOMER}"
ALICE = Principal(kind="agent", subject="alice", customer_id=CUSTOMER,
                  permissions=frozenset({"customer_admin"}))
BOB = dataclasses.replace(ALICE, subject="bob")


def expiring(principal: Principal, seconds: float) -> Principal:
    return dataclasses.replace(principal, expires_at=utcnow() + timedelta(seconds=seconds))


async def scripted_node(make_node, **tables):
    node = await make_node(**SCRIPTED_AUTH, **tables)
    node.gateway.authenticator.answers.update({"alice": ALICE, "bob": BOB})
    return node, node.gateway.authenticator


def renew(token: str, id_: object = "r") -> dict[str, object]:
    return {"type": "authenticate", "token": token, "id": id_}


@pytest.mark.gen_test
async def test_an_expired_credential_closes_4001_and_ends_with_reason_expired(make_node):
    node, auth = await scripted_node(make_node)
    auth.answers["brief"] = expiring(ALICE, 0.05)
    conn, peer = await node.connect("brief")
    await node.subscribe(conn, ALL)
    await wait_for(lambda: peer.closes)
    assert peer.closes == [(4001, "credential expired")]
    await conn.ended
    assert node.audit.rows("unsubscribe") == [("unsubscribe", ALL, "accepted", "expired")]


@pytest.mark.gen_test
async def test_a_renewal_keeps_the_connection_past_the_first_expiry(make_node):
    node, auth = await scripted_node(make_node)
    brief = auth.answers["brief"] = expiring(ALICE, 0.05)
    auth.answers["twin"] = dataclasses.replace(
        brief, expires_at=brief.expires_at + timedelta(seconds=0.02))
    later = auth.answers["later"] = expiring(ALICE, 60)
    conn, peer = await node.connect("brief")
    _, twin_peer = await node.connect("twin")  # not renewed: expires just after the first
    await node.subscribe(conn, ALL)
    await node.request(conn, renew("later"))
    assert peer.take()[1] == {"type": "authenticated", "id": "r",
                              "expires_at": rfc3339(later.expires_at)}
    await wait_for(lambda: twin_peer.closes)
    assert twin_peer.close_code == 4001
    assert peer.closes == []
    await node.publish(event())
    assert [f["type"] for f in peer.take()] == ["call_created"]
    assert node.audit.rows("renew") == [("renew", "", "accepted", "")]


@pytest.mark.gen_test
async def test_a_token_for_another_principal_is_refused_and_changes_nothing(make_node):
    node, _ = await scripted_node(make_node)
    conn, peer = await node.connect("alice")
    await node.subscribe(conn, ALL)
    peer.take()
    for token in ("bob", "nonsense"):
        await node.request(conn, renew(token, 2))
        [reply] = peer.take()
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "unauthenticated", 2)
    assert conn.principal == ALICE
    assert node.audit.rows("renew") == [("renew", "", "rejected", "unauthenticated")] * 2
    await node.publish(event())
    assert [f["type"] for f in peer.take()] == ["call_created"]


@pytest.mark.gen_test
async def test_refused_renewals_count_against_the_refusal_limit(make_node):
    node, _ = await scripted_node(make_node, server={"max_rejected_topics_per_minute": 3})
    conn, peer = await node.connect("alice")
    for i in range(3):
        await node.request(conn, renew(f"nope-{i}", i))
    assert [(f["type"], f["code"]) for f in peer.take()] == [("error", "unauthenticated")] * 3
    assert peer.closes == []
    await node.request(conn, renew("nope-3", 3))
    assert peer.take()[0]["code"] == "unauthenticated"  # answered, then closed
    assert peer.closes == [(1008, "too many refused topics: more than 3 in a minute")]
    assert len(node.audit.rows("renew")) == 4


@pytest.mark.gen_test
async def test_renewals_the_backend_cannot_decide_do_not_count(make_node):
    node, auth = await scripted_node(make_node, server={"max_rejected_topics_per_minute": 1})
    auth.answers["down"] = Unavailable("the backend is down")
    conn, peer = await node.connect("alice")
    for _ in range(3):
        await node.request(conn, renew("down"))
    assert [f["message"] for f in peer.take()] == ["the backend is down"] * 3
    assert peer.closes == []
    assert len(node.audit.rows("renew")) == 3


@pytest.mark.gen_test
async def test_a_revoked_principal_is_closed_4003_and_the_others_stay(make_node, caplog):
    node, auth = await scripted_node(make_node)
    conn, peer = await node.connect("alice")
    other, other_peer = await node.connect("bob")
    await node.subscribe(conn, ALL, f"{ALL}:call")
    await node.subscribe(other, ALL)
    await node.gateway.refresh_all()  # still allowed: nothing happens
    auth.refreshed["bob"] = Unavailable("cannot tell now")
    await node.gateway.refresh_all()
    assert "failed to refresh" not in caplog.text  # asked again later, not an error
    auth.refreshed["bob"] = RuntimeError("a plugin bug")
    await node.gateway.refresh_all()
    assert "failed to refresh" in caplog.text
    assert (peer.closes, other_peer.closes) == ([], [])
    auth.refreshed["alice"] = None
    await node.gateway.refresh_all()
    assert peer.closes == [(4003, "rights revoked")]
    assert other_peer.closes == []
    await conn.ended
    assert sorted(node.audit.rows("unsubscribe")) == [
        ("unsubscribe", ALL, "accepted", "revoked"),
        ("unsubscribe", f"{ALL}:call", "accepted", "revoked")]


@pytest.mark.gen_test
async def test_a_principal_that_lost_a_held_topic_is_closed_4003(make_node):
    node, auth = await scripted_node(make_node)
    conn, peer = await node.connect("alice")
    await node.subscribe(conn, ALL)
    auth.refreshed["alice"] = dataclasses.replace(ALICE, permissions=frozenset({"customer_agent"}))
    await node.gateway.refresh_all()
    assert peer.close_code == 4003


@pytest.mark.gen_test
async def test_a_refreshed_expiry_is_the_one_that_closes(make_node):
    node, auth = await scripted_node(make_node)
    conn, peer = await node.connect("alice")  # no expiry
    auth.refreshed["alice"] = expiring(ALICE, 0.05)
    await node.gateway.refresh_all()
    await wait_for(lambda: peer.closes)
    assert peer.close_code == 4001


@pytest.mark.gen_test
async def test_a_renewal_with_fewer_rights_closes_4003_and_ends_held_topics_revoked(make_node):
    # Issue 16 item 3: an admin renewing with a non-admin token of the same subject
    # kept its customer-wide subscription until the next re-check (or forever).
    node, auth = await scripted_node(make_node)
    auth.answers["plain"] = dataclasses.replace(ALICE, permissions=frozenset())
    conn, peer = await node.connect("alice")
    await node.subscribe(conn, ALL)
    peer.take()
    await node.request(conn, renew("plain"))
    assert peer.closes == [(4003, "rights revoked: the new token may not hold every "
                                  "subscribed topic")]
    assert [f for f in peer.take() if f.get("type") == "authenticated"] == []
    await node.publish(event())
    assert peer.take() == []
    await conn.ended
    assert node.audit.rows("renew") == [("renew", "", "rejected", "revoked")]
    assert node.audit.rows("unsubscribe") == [("unsubscribe", ALL, "accepted", "revoked")]


@pytest.mark.gen_test
async def test_a_renewal_whose_rights_still_cover_every_held_topic_is_accepted(make_node):
    node, auth = await scripted_node(make_node)
    auth.answers["plain"] = dataclasses.replace(ALICE, permissions=frozenset())
    conn, peer = await node.connect("alice")
    await node.request(conn, renew("plain"))  # holds nothing: nothing to refuse
    assert peer.take()[-1]["type"] == "authenticated"
    assert peer.closes == []
    assert node.audit.rows("renew") == [("renew", "", "accepted", "")]


@pytest.mark.gen_test
async def test_refused_renewals_count_as_bad_messages_and_close_1008(make_node):
    # Issue 16 item 6: a refused renewal is a backend call; each counts toward the
    # bad-message close as well as the refusal limit.
    node, auth = await scripted_node(make_node, server={"max_bad_messages_per_minute": 2})
    conn, peer = await node.connect("alice")
    for n in range(5):
        if conn.closed:
            break
        await node.request(conn, renew(f"nonsense-{n}", n))
    assert peer.closes == [(1008, "too many bad messages")]
    assert auth.calls == 1 + 3  # the connect, then the limit and the one past it


@pytest.mark.gen_test
async def test_a_re_check_round_asks_once_per_principal_and_applies_it_to_all(make_node):
    node, auth = await scripted_node(make_node)
    asked: list[str] = []
    refresh = type(auth).refresh

    async def counting(self, principal):
        asked.append(principal.subject)
        return await refresh(self, principal)

    auth.refresh = counting.__get__(auth)
    conns = [(await node.connect("alice"))[0] for _ in range(5)]
    bob, _ = await node.connect("bob")
    lesser = auth.refreshed["alice"] = dataclasses.replace(ALICE, permissions=frozenset())
    await node.gateway.refresh_all()
    assert sorted(asked) == ["alice", "bob"]
    assert {c.principal for c in conns} == {lesser}
    assert bob.principal == BOB
