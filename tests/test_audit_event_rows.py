"""The writer's fast event rows are byte for byte what the general definitions give.

The audit writer builds every event's stored row and hash in one pass
(writer.event_row, chain.encode_topics written directly, chain.EventTemplate);
these tests hold them to the reference: json.dumps for the topics, clean_text
on each field, and chain.row_hash over the canonical document.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from tests import audit_helpers
from tests.audit_helpers import Backend, awrite_log
from wsgate.audit import chain, store
from wsgate.audit.records import EventRecord
from wsgate.audit.writer import _EVENT_LIMITS, AuditWriter, _event_entries, event_row

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
TRICKY = ["plain", "", 'quote"d', "back\\slash", "tab\tnew\nline\x01\x1f", "é ü 漢字 🎉",
          "nul\x00inside", "lone \ud800 surrogate", "%s %d %%", "x" * 700, "é" * 601,
          "\u2028\u2029", "</script>"]


def reference_row(ev: EventRecord) -> dict[str, Any]:
    """event_row as first written: clean_text on every field, json.dumps for the topics."""
    row: dict[str, Any] = {
        "event_id": ev.event_id, "type": ev.type, "ingest_key_id": ev.ingest_key_id,
        "payload_sha256": ev.payload_sha256,
        "topics": json.dumps([chain.clean_text(t) or "" for t in ev.topics],
                             separators=(",", ":"), ensure_ascii=False),
        "published_at": chain.format_time(ev.published_at),
    }
    for name, limit in _EVENT_LIMITS.items():
        row[name] = chain.clean_text(row[name], limit)
    return row


def records() -> list[EventRecord]:
    out = [EventRecord("0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f", "call_created",
                       ("agent_id:8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e:call:1",),
                       "bearer:5f2b4c1d", "a" * 64, T0)]
    for i, odd in enumerate(TRICKY):
        out.append(EventRecord(odd, odd, (odd,) * (i % 3), odd, odd,
                               T0 + timedelta(microseconds=i)))
        out.append(EventRecord(f"id-{i}", "call_created", ("a", odd, "b"), "key", "0" * 64,
                               T0.astimezone(timezone(timedelta(hours=-7)))))
    return out


@pytest.mark.parametrize("topics", [[], ["a"], ["a", "b"], TRICKY, [t * 3 for t in TRICKY]])
def test_encode_topics_is_compact_json_of_the_list(topics: list[str]) -> None:
    assert chain.encode_topics(topics) == json.dumps(topics, separators=(",", ":"),
                                                     ensure_ascii=False)
    assert chain.encode_topics(tuple(topics)) == json.dumps(topics, separators=(",", ":"),
                                                            ensure_ascii=False)


def test_encode_topics_of_items_that_are_not_text_is_still_json() -> None:
    assert chain.encode_topics(["a", None, 3]) == '["a",null,3]'  # type: ignore[list-item]


def test_event_rows_are_the_reference_rows() -> None:
    for ev in records():
        assert event_row(ev) == reference_row(ev), ev
        assert event_row(ev, "given") == {**reference_row(ev), "published_at": "given"}
    evs = records()
    assert [row for _, row in _event_entries(evs)] == [reference_row(ev) for ev in evs]


def test_event_rows_of_fields_that_are_not_text_keep_them() -> None:
    ev = EventRecord(None, "t", ("a",), "k", "0" * 64, T0)  # type: ignore[arg-type]
    assert event_row(ev) == reference_row(ev)
    with pytest.raises(ValueError):
        event_row(EventRecord("e", "t", (), "k", "0", T0.replace(tzinfo=None)))


@pytest.mark.parametrize("node_id", ["node-a", 'n"o%de\\', "nœud-漢字", "%s%%d"])
def test_event_template_hash_is_row_hash(node_id: str) -> None:
    template = chain.EventTemplate(node_id)
    prev = chain.GENESIS
    for seq, ev in enumerate(records(), start=1):
        row = {**reference_row(ev), "node_id": node_id, "seq": seq, "prev_hash": prev}
        digest = template.hash(row)
        assert digest == chain.row_hash(chain.CHAIN_EVENTS, row), row
        # ...which is the hash of the canonical document with the topics as a list.
        doc = {f: row[f] for f in chain.EVENT_FIELDS} | {"topics": json.loads(row["topics"])}
        assert digest == chain.row_hash(chain.CHAIN_EVENTS, doc)
        prev = digest


def test_event_template_hashes_values_that_are_not_text_as_row_hash_does() -> None:
    template = chain.EventTemplate("node-a")
    row = {**reference_row(records()[0]), "node_id": "node-a", "seq": 1,
           "prev_hash": chain.GENESIS}
    for change in ({"event_id": None}, {"topics": ["x", "y"]}, {"seq": 2.0},
                   {"prev_hash": None}, {"type": 7}):
        changed = row | change
        assert template.hash(changed) == chain.row_hash(chain.CHAIN_EVENTS, changed), change


backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


@pytest.mark.gen_test(timeout=60)
async def test_written_events_verify_and_hash_as_stored(backend: Backend) -> None:
    evs = records()
    await awrite_log(backend, [("event", evs[:7]), ("event", evs[7:])], node_id='n"%s')
    with backend.engine().connect() as conn:
        stored = [dict(r._mapping) for r in conn.execute(
            text("SELECT * FROM audit_events ORDER BY seq"))]
    fields = list(reference_row(evs[0]))
    assert [{f: r[f] for f in fields} for r in stored] == [reference_row(ev) for ev in evs]
    assert all(r["row_hash"] == chain.row_hash(chain.CHAIN_EVENTS, r) for r in stored)
    result = store.verify(backend.engine(), backend.key.public_key())
    assert result.ok, result.problems


@pytest.mark.gen_test(timeout=60)
async def test_an_insert_the_store_refuses_journals_the_events_as_a_store_error(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """On PostgreSQL events go in with COPY: its failure is a store error like an
    INSERT's (the events are journaled, nothing is logged as unexpected)."""
    evs = records()
    await awrite_log(backend, [("event", evs[:1])])
    w = AuditWriter(backend.config(retry_interval=60), "node-a")
    await w.start()
    try:
        # Another process writes the next seq of this node: the writer's insert clashes.
        backend.execute("INSERT INTO audit_events (node_id, seq, event_id, type, topics, "
                        "ingest_key_id, payload_sha256, published_at, prev_hash, row_hash) "
                        "VALUES ('node-a', 2, 'x', 't', '[]', 'k', 's', 'p', 'h', 'h')")
        await w.write_events(evs[1:3])
        assert not w.healthy()
        journal = (backend.tmp / "audit.journal").read_text().splitlines()
        assert [json.loads(line)["row"]["event_id"] for line in journal] == [
            ev.event_id for ev in evs[1:3]]
    finally:
        await w.close()
    assert "audit store write failed" in caplog.text
    assert "unexpected error" not in caplog.text
