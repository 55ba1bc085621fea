"""SPEC §5 for ingest: an event is recorded before its 202 (``[audit] record_events``).

The 202 of POST /v1.0/events waits for the event's row in the ``events`` chain:
committed in the store, or, when the store is down, appended to the journal
(fsynced) and written to the store once it is back. A crash right after a 202
therefore loses no event's record. The group-commit window is long here (300
ms) so that a record written after the answer would be caught missing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text

from tests import audit_helpers
from tests.audit_helpers import Backend
from tests.conftest import event, wait_for
from wsgate.audit import store

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

WINDOW_MS = 300.0
EVENT_IDS = ["0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f", "1d5c5d03-da9b-11ee-b3a6-5f2b4c1d2e3f"]


def stored_event_ids(b: Backend) -> list[str]:
    """The event ids in the store's events chain, read through a connection of the test's own."""
    with b.engine().connect() as conn:
        return [r[0] for r in conn.execute(
            text("SELECT event_id FROM audit_events ORDER BY node_id, seq"))]


def journaled_event_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e["row"]["event_id"] for e in entries if e["chain"] == "events"]


@pytest.mark.gen_test(timeout=60)
async def test_an_event_is_in_the_store_when_its_202_arrives(backend: Backend, make_server):
    server = await make_server(audit={"url": backend.url, "group_commit_ms": WINDOW_MS})
    watcher = await server.connect()
    await watcher.subscribe(f"customer_id:{audit_helpers.CUSTOMER}")
    status, body = await server.post({"events": [event(event_id=i) for i in EVENT_IDS]})
    # Read at once, before anything else runs on the loop.
    assert stored_event_ids(backend) == EVENT_IDS
    assert status == 202 and body["event_ids"] == EVENT_IDS
    # Delivered too (delivery does not wait for the record).
    assert [(await watcher.recv())["event_id"] for _ in EVENT_IDS] == EVENT_IDS


@pytest.mark.gen_test(timeout=60)
async def test_with_the_store_down_an_event_is_journaled_before_its_202(
        backend: Backend, make_server):
    journal = Path(backend.tmp / "audit.journal")
    server = await make_server(audit={"url": backend.outage_url(), "group_commit_ms": WINDOW_MS,
                                      "journal_path": str(journal), "retry_interval": 0.2})
    writer = server.gateway.audit
    with backend.outage():
        status, body = await server.post(event(event_id=EVENT_IDS[0]))
        # The store refused it: ingest does not fail, the record is in the journal.
        assert journaled_event_ids(journal) == EVENT_IDS[:1]
        assert status == 202 and body["event_ids"] == EVENT_IDS[:1]
        assert not writer.healthy()
        status, _ = await server.post(event(event_id=EVENT_IDS[1]))
        assert journaled_event_ids(journal) == EVENT_IDS
        assert status == 202
    # Back: the journal goes into the store, in order, once.
    await wait_for(lambda: writer.healthy() and not journaled_event_ids(journal), timeout=20)
    assert stored_event_ids(backend) == EVENT_IDS
    result = store.verify(backend.engine(), None)
    assert result.ok, result.problems


@pytest.mark.gen_test(timeout=60)
async def test_record_events_turned_on_by_a_reload_records_the_next_event(
        backend: Backend, make_server):
    """``[audit] record_events`` applies live (SIGHUP): the writer, made at start
    with it off, records what the gateway hands it once it is on."""
    server = await make_server(audit={"url": backend.url, "record_events": False})
    assert (await server.post(event(event_id=EVENT_IDS[0])))[0] == 202
    gateway = server.gateway
    on = replace(gateway.config, audit=replace(gateway.config.audit, record_events=True))
    gateway.reconfigure(on, gateway.authenticator, gateway.authorizer)
    assert (await server.post(event(event_id=EVENT_IDS[1])))[0] == 202
    assert stored_event_ids(backend) == EVENT_IDS[1:]
