"""SIGTERM to a real ``wsgate serve`` (SPEC §7): connections closed with 1001, their
end rows written with code ``shutdown``, the audit queue flushed, exit 0 in bounded time."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
import tornado.websocket

from tests.conftest import CUSTOMER
from tests.test_crash import ServeProcess, audit_cli, unused_port, write_config
from tests.test_hardening import db_rows
from tests.wsclient import RawWebSocket

ALL = f"customer_id:{CUSTOMER}"


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_closes_1001_writes_shutdown_ends_and_exits_0(tmp_path: Path):
    port = unused_port()
    config = write_config(tmp_path, port, shutdown_timeout=5.0)
    proc = ServeProcess(tmp_path, port, config, "serve")
    clients: list[tornado.websocket.WebSocketClientConnection] = []
    mute = None
    try:
        await proc.ready()
        url = f"ws://127.0.0.1:{port}/v1.0/ws?token=admin-token"
        held: dict[str, list[str]] = {}
        for k in range(3):
            ws = await tornado.websocket.websocket_connect(url)
            clients.append(ws)
            cid = json.loads(await ws.read_message())["connection_id"]
            topics = [f"{ALL}:c{k}:t{i}" for i in range(5)]
            await ws.write_message(json.dumps({"type": "subscribe", "topics": topics}))
            assert json.loads(await ws.read_message())["topics"] == topics
            held[cid] = topics
        # A peer that never reads and never answers the close handshake.
        mute = await RawWebSocket.connect(port)
        mute_id = (await mute.recv_json(skip_pings=True))["connection_id"]
        await mute.send_text(json.dumps({"type": "subscribe", "topics": [ALL]}))
        assert (await mute.recv_json(skip_pings=True))["topics"] == [ALL]
        held[mute_id] = [ALL]

        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        for ws in clients:
            while await asyncio.wait_for(ws.read_message(), 10) is not None:
                pass
            assert ws.close_code == 1001
        assert await proc.wait(15) == 0, proc.output()
        # Bounded: the mute peer costs at most the shutdown timeout.
        assert time.monotonic() - started < 5.0 + 3.0
    finally:
        for ws in clients:
            ws.close()
        if mute is not None:
            mute.close()
        proc.close()
    rows = db_rows(f"sqlite:///{tmp_path}/audit.db")
    ends: dict[str, list[str]] = {}
    for r in rows:
        if r["action"] == "unsubscribe":
            assert (r["outcome"], r["code"]) == ("accepted", "shutdown"), r
            ends.setdefault(r["connection_id"], []).append(r["topic"])
    assert {c: sorted(t) for c, t in ends.items()} == {c: sorted(t) for c, t in held.items()}
    assert not (tmp_path / "audit.journal").exists() or \
        (tmp_path / "audit.journal").read_text() == ""
    verify = audit_cli(config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "stopped" in proc.output()
