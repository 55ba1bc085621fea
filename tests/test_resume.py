"""SPEC §2 "Resume after a reconnect" on one node (the memory broker's history)."""

import asyncio

import pytest

from tests import test_broker_redis
from tests.conftest import AGENT, CUSTOMER, base_config, event
from tests.fakes import HeldBroker

ALL = f"customer_id:{CUSTOMER}"
admin = test_broker_redis.admin
redis_url = test_broker_redis.redis_url


async def seen_event(server, client, **fields):
    status, body = await server.post(event(**fields))
    assert status == 202
    frame = await client.recv()
    assert frame["event_id"] == body["event_ids"][0]
    return frame["event_id"]


@pytest.mark.gen_test(timeout=30)
async def test_reconnect_gets_exactly_the_missed_events_then_live(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(ALL)
    last = await seen_event(server, client, data={"n": 0})
    client.close()
    missed = []
    for n in range(1, 6):
        status, body = await server.post(event(data={"n": n}))
        missed += body["event_ids"]
    again = await server.connect()
    reply = await again.subscribe(ALL, since=last)
    assert reply["type"] == "subscribed" and reply["recovered"] is True
    got = [await again.recv() for _ in missed]
    assert [f["event_id"] for f in got] == missed
    assert [f["data"]["n"] for f in got] == [1, 2, 3, 4, 5]
    live = await seen_event(server, again, data={"n": 6})
    assert live not in missed
    await again.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_unknown_since_is_not_recovered_and_sends_nothing_old(make_server):
    server = await make_server()
    client = await server.connect()
    await client.subscribe(ALL)
    await seen_event(server, client)
    client.close()
    await server.post(event())
    again = await server.connect()
    reply = await again.subscribe(ALL, since="00000000-1111-2222-3333-444444444444")
    assert reply["recovered"] is False
    await again.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_since_older_than_history_is_not_recovered(make_server):
    server = await make_server(history={"size": 3})
    client = await server.connect()
    await client.subscribe(ALL)
    first = await seen_event(server, client)
    client.close()
    for _ in range(3):
        await server.post(event())
    again = await server.connect()
    reply = await again.subscribe(ALL, since=first)
    assert reply["recovered"] is False
    await again.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_replay_obeys_permissions(make_server):
    server = await make_server()
    admin = await server.connect("admin-token")
    await admin.subscribe(ALL)
    # Resume is per scope: the last event seen must be in every resumed scope's history.
    last = await seen_event(server, admin, agent_id=AGENT)
    admin.close()
    # One event the agent may see (its agent topic), one it may not (customer only).
    _, hidden = await server.post(event(data={"n": "customer-only"}))
    _, visible = await server.post(event(agent_id=AGENT, data={"n": "agent"}))
    agent = await server.connect("agent-token")
    reply = await agent.subscribe(ALL, f"agent_id:{AGENT}", since=last)
    assert [r["code"] for r in reply["rejected"]] == ["forbidden"]
    assert reply["recovered"] is True
    frame = await agent.recv()
    assert frame["event_id"] == visible["event_ids"][0]
    assert frame["topic"].startswith(f"agent_id:{AGENT}")
    await agent.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_event_published_during_replay_arrives_once_after_it(make_server):
    # The history is read, then held until the event below is published, as a
    # networked history's answer can be on its way while live events come.
    server = await make_server(broker=lambda config: HeldBroker(config.history))
    reading = server.gateway.broker.reading
    client = await server.connect()
    await client.subscribe(ALL)
    last = await seen_event(server, client)
    client.close()
    _, missed = await server.post(event(data={"n": "missed"}))
    again = await server.connect()
    await again.send({"type": "subscribe", "topics": [ALL], "since": last})
    await asyncio.wait_for(reading.reached.wait(), 5)
    _, during = await server.post(event(data={"n": "during"}))
    reading.open()
    reply = await again.recv()
    assert reply["type"] == "subscribed" and reply["recovered"] is True
    assert (await again.recv())["event_id"] == missed["event_ids"][0]
    assert (await again.recv())["event_id"] == during["event_ids"][0]
    await again.no_frame()


@pytest.mark.gen_test(timeout=30)
async def test_since_an_event_the_token_cannot_see_is_not_recovered(make_server):
    # Issue 16 item 9: resume must not be an oracle for events of other topics.
    await since_an_event_the_token_cannot_see_is_not_recovered(await make_server())


@pytest.mark.redis
@pytest.mark.gen_test(timeout=30)
async def test_since_an_event_the_token_cannot_see_is_not_recovered_on_redis(
        make_server, redis_url, tmp_path):
    await since_an_event_the_token_cannot_see_is_not_recovered(
        await make_server(base_config(tmp_path, broker={"url": redis_url})))


async def since_an_event_the_token_cannot_see_is_not_recovered(server):
    call_topic = f"customer_id:{CUSTOMER}:call:{event()['data']['id']}"
    status, queue = await server.post(event("queue_updated", data={"id": "q-1"}))
    assert status == 202
    await server.post(event())
    direct = await server.connect("direct-token")
    reply = await direct.subscribe(call_topic, since=queue["event_ids"][0])
    assert reply["type"] == "subscribed" and reply["topics"] == [call_topic]
    assert reply["recovered"] is False
    await direct.no_frame()
    # Its own topic's event still resumes, with what came after it.
    status, mine = await server.post(event())
    status, later = await server.post(event())
    again = await server.connect("direct-token")
    reply = await again.subscribe(call_topic, since=mine["event_ids"][0])
    assert reply["recovered"] is True
    assert (await again.recv())["event_id"] == later["event_ids"][0]
    await again.no_frame()
