"""``[server] event_loop``: the server runs on uvloop or on the standard loop, the
same way, in a real process; a bad value stops start-up naming the key."""

from __future__ import annotations

import asyncio
import json

import pytest
import tornado.httpclient
import tornado.websocket

from tests.conftest import CUSTOMER, event
from tests.test_crash import ServeProcess, unused_port, write_config
from wsgate.config import ConfigError, load_config

TOPIC = f"customer_id:{CUSTOMER}:call"


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
@pytest.mark.gen_test(timeout=60)
async def test_serves_websocket_and_ingest_on_either_loop(tmp_path, kind):
    port = unused_port()
    server = ServeProcess(tmp_path, port, write_config(tmp_path, port, event_loop=kind), kind)
    try:
        await server.ready()
        assert f"event loop {kind})" in server.output()
        ws = await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token")
        try:
            assert json.loads(await asyncio.wait_for(ws.read_message(), 10))["type"] == "connected"
            await ws.write_message(json.dumps({"type": "subscribe", "topics": [TOPIC]}))
            reply = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert reply["topics"] == [TOPIC], reply
            http = tornado.httpclient.AsyncHTTPClient()
            for n in range(3):  # keep-alive: the ingest fast path answers the later ones
                answer = await http.fetch(
                    f"http://127.0.0.1:{port}/v1.0/events", method="POST",
                    body=json.dumps(event(data={"id": "c1", "n": n})),
                    headers={"Authorization": "Bearer test-ingest-key",
                             "Content-Type": "application/json"})
                assert answer.code == 202
                frame = json.loads(await asyncio.wait_for(ws.read_message(), 10))
                assert (frame["type"], frame["data"]) == ("call_created", {"id": "c1", "n": n})
        finally:
            ws.close()
    finally:
        server.close()


def test_an_unknown_loop_names_the_key(tmp_path):
    path = write_config(tmp_path, 8080, event_loop="trio")
    with pytest.raises(ConfigError, match=r"\[server\] event_loop: must be one of uvloop, asyncio"):
        load_config(path)
