"""The hash chain, verify (changed, deleted, inserted rows; bad signatures) and prune."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert, text

from tests import audit_helpers
from tests.audit_helpers import T0, Backend, end, minutes, rec, topic, write_log
from wsgate.audit import chain, store
from wsgate.audit.orm import ROWS
from wsgate.audit.records import EventRecord

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


def twelve_rows(b: Backend, **config: Any) -> None:
    """12 rows at minutes 0..11 on node-a; checkpoints at 5, 10 and 12 (close)."""
    write_log(b, [("sub", [rec(topic("call", str(i)), at=minutes(i))]) for i in range(11)]
              + [("end", [end(topic("call", "0"), at=minutes(11))])], **config)


def check(b: Backend, key: Any = "default") -> store.VerifyResult:
    public = b.key.public_key() if key == "default" else key
    return store.verify(b.engine(), public)


def test_untouched_log_verifies(backend: Backend) -> None:
    twelve_rows(backend)
    result = check(backend)
    assert result.ok and result.first is None
    assert (result.rows_checked, result.checkpoints_checked, result.nodes) == (12, 6, ["node-a"])
    assert result.signatures_checked


def test_hash_and_signature_follow_the_documented_scheme(backend: Backend) -> None:
    """Recompute a row hash and check a signature the way docs/audit.md tells a reviewer to."""
    twelve_rows(backend)
    with backend.engine().connect() as conn:
        row = dict(conn.execute(text("SELECT * FROM audit_rows WHERE seq = 2"))
                   .mappings().one())
        cps = [dict(r) for r in conn.execute(text(
            "SELECT * FROM audit_checkpoints WHERE chain = 'rows' ORDER BY seq, id LIMIT 2"))
            .mappings()]
    fields = ["seq", "occurred_at", "node_id", "connection_id", "action", "topic", "outcome",
              "code", "kind", "subject", "customer_id", "agent_id", "authenticator",
              "remote_addr", "origin", "user_agent", "prev_hash"]
    doc = json.dumps({f: row[f] for f in fields}, sort_keys=True, separators=(",", ":"),
                     ensure_ascii=False).encode("utf-8")
    assert hashlib.sha256(doc).hexdigest() == row["row_hash"]
    assert row["occurred_at"] == "2024-05-01T12:01:00.123456Z"
    previous = "0" * 64
    for cp in cps:  # the start checkpoint at seq 0, then the periodic one at seq 5
        signed = json.dumps({f: cp[f] for f in ("chain", "node_id", "seq", "head_hash",
                                                "signed_at", "kind", "key_id", "prev_hash",
                                                "policy")},
                            sort_keys=True, separators=(",", ":")).encode("utf-8")
        backend.key.public_key().verify(base64.b64decode(cp["signature"]), signed)  # no raise
        assert cp["prev_hash"] == previous
        previous = hashlib.sha256(signed).hexdigest()
    assert [(cp["seq"], cp["kind"]) for cp in cps] == [(0, "start"), (5, "periodic")]
    assert json.loads(cps[1]["policy"]) == {"checkpoint_every": 5,
                                            "checkpoint_interval": 60.0, "slack": 0}
    first = backend.scalar("SELECT prev_hash FROM audit_rows WHERE seq = 1")
    assert first == "0" * 64


def test_changed_field_is_named_by_seq(backend: Backend) -> None:
    twelve_rows(backend)
    backend.execute("UPDATE audit_rows SET subject = 'eve' WHERE seq = 7")
    first = check(backend).first
    assert first is not None
    assert (first.kind, first.seq, first.node_id) == ("changed", 7, "node-a")


def test_deleted_row_is_named_by_seq(backend: Backend) -> None:
    twelve_rows(backend)
    backend.execute("DELETE FROM audit_rows WHERE seq = 7")
    first = check(backend).first
    assert first is not None and (first.kind, first.seq) == ("deleted", 7)


def test_rows_deleted_from_the_end_are_caught_by_the_checkpoint(backend: Backend) -> None:
    twelve_rows(backend)
    backend.execute("DELETE FROM audit_rows WHERE seq >= 11")
    first = check(backend).first
    assert first is not None and (first.kind, first.seq) == ("deleted", 11)


def test_forged_row_is_named_by_seq(backend: Backend) -> None:
    twelve_rows(backend)
    with backend.engine().begin() as conn:
        last = dict(conn.execute(text("SELECT * FROM audit_rows WHERE seq = 12"))
                    .mappings().one())
        forged = {k: v for k, v in last.items() if k != "id"}
        forged.update(seq=13, subject="mallory", prev_hash="ab" * 32)
        forged["row_hash"] = chain.row_hash("rows", forged)
        conn.execute(insert(ROWS).values(forged))
    first = check(backend).first
    assert first is not None and (first.kind, first.seq) == ("inserted", 13)


def test_rewritten_and_rehashed_rows_are_caught_by_a_signed_checkpoint(
        backend: Backend) -> None:
    twelve_rows(backend)
    # The careful forger: change row 3, then recompute every hash after it.
    with backend.engine().begin() as conn:
        prev = conn.execute(text("SELECT row_hash FROM audit_rows WHERE seq = 2")).scalar()
        for r in conn.execute(text("SELECT * FROM audit_rows WHERE seq >= 3 ORDER BY seq"))\
                .mappings().all():
            row = dict(r)
            if row["seq"] == 3:
                row["subject"] = "eve"
            row["prev_hash"] = prev
            row["row_hash"] = prev = chain.row_hash("rows", row)
            conn.execute(text("UPDATE audit_rows SET subject = :subject, prev_hash = :prev_hash,"
                              " row_hash = :row_hash WHERE id = :id"), row)
    result = check(backend)
    assert not result.ok
    assert result.first is not None and result.first.kind == "changed"
    assert result.first.seq == 5 and "checkpoint" in result.first.message


def test_tampered_checkpoint_signature_is_reported(backend: Backend) -> None:
    twelve_rows(backend)
    backend.execute("UPDATE audit_checkpoints SET signed_at = '2030-01-01T00:00:00.000000Z'"
                    " WHERE seq = 10")
    result = check(backend)
    # The changed field also changes the checkpoint's hash, which the next one names.
    assert [(p.kind, p.seq) for p in result.problems] == [
        ("bad_signature", 10), ("broken_checkpoint_chain", 12)]


def test_checkpoint_signed_by_another_key_is_reported(backend: Backend) -> None:
    twelve_rows(backend)
    result = check(backend, Ed25519PrivateKey.generate().public_key())
    assert {p.kind for p in result.problems} == {"bad_signature"}
    assert "another key" in result.problems[0].message


def test_without_a_key_the_chain_is_checked_but_not_the_signatures(backend: Backend) -> None:
    twelve_rows(backend)
    assert check(backend, None).ok and not check(backend, None).signatures_checked
    backend.execute("UPDATE audit_rows SET topic = 'x' WHERE seq = 2")
    first = check(backend, None).first
    assert first is not None and first.seq == 2


def test_event_chain_is_verified_too(backend: Backend) -> None:
    events = [EventRecord(f"e-{i}", "call_created", (topic("call", str(i)),), "bearer:k",
                          "0" * 64, minutes(i)) for i in range(3)]
    write_log(backend, [("event", events)])
    assert check(backend).events_checked == 3 and check(backend).ok
    backend.execute("UPDATE audit_events SET type = 'call_deleted' WHERE seq = 2")
    first = check(backend).first
    assert first is not None and (first.chain, first.kind, first.seq) == ("events", "changed", 2)


def test_prune_keeps_the_retained_log_verifiable(backend: Backend) -> None:
    twelve_rows(backend)
    result = store.prune(backend.engine(), minutes(5), backend.key)
    assert result.rows_deleted == 5 and result.checkpoints == [("rows", "node-a", 5)]
    assert backend.scalar("SELECT min(seq) FROM audit_rows") == 6
    after = check(backend)
    assert after.ok, after.problems
    # The writer carries on after the pruned part (first closing the 6 retained
    # subscriptions twelve_rows left open, as unclean_shutdown).
    write_log(backend, [("sub", [rec(topic("later"))])])
    assert backend.scalar("SELECT seq FROM audit_rows WHERE topic LIKE '%later'") == 19
    assert check(backend).ok
    # Deleting rows without a signed prune checkpoint is still caught.
    backend.execute("DELETE FROM audit_rows WHERE seq = 6")
    first = check(backend).first
    assert first is not None and (first.kind, first.seq) == ("deleted", 6)


def test_prune_of_everything_then_new_rows(backend: Backend) -> None:
    twelve_rows(backend)
    store.prune(backend.engine(), minutes(60), backend.key)
    assert backend.scalar("SELECT count(*) FROM audit_rows") == 0
    assert check(backend).ok
    write_log(backend, [("sub", [rec(topic("again"))])])
    assert backend.scalar("SELECT seq FROM audit_rows") == 13
    assert check(backend).ok


def test_prune_refuses_a_broken_log_and_needs_a_key(backend: Backend) -> None:
    twelve_rows(backend)
    with pytest.raises(store.AuditStoreError, match="signing key"):
        store.prune(backend.engine(), minutes(5), None)
    backend.execute("UPDATE audit_rows SET subject = 'eve' WHERE seq = 2")
    with pytest.raises(store.AuditStoreError, match="does not verify"):
        store.prune(backend.engine(), minutes(5), backend.key)
    assert backend.scalar("SELECT count(*) FROM audit_rows") == 12


def test_time_format_is_fixed() -> None:
    assert chain.format_time(T0) == "2024-05-01T12:00:00.123456Z"
    assert chain.parse_stored_time("2024-05-01T12:00:00.123456Z") == T0
    with pytest.raises(ValueError):
        chain.format_time(T0.replace(tzinfo=None))


def test_row_template_hashes_rows_as_row_hash_does() -> None:
    # The writer hashes through a template of each connection's fields; it must
    # give exactly the documented hash, whatever the fields hold.
    base: dict[str, Any] = {
            "seq": 7, "occurred_at": "2024-05-01T12:00:00.123456Z", "node_id": "node-a",
            "connection_id": "c1", "action": "subscribe", "topic": "customer_id:x:call",
            "outcome": "accepted", "code": "", "kind": "agent", "subject": "alice",
            "customer_id": "5013bc52-da9a-11ee-844f-2fa34248de28", "agent_id": None,
            "authenticator": "static", "remote_addr": "10.0.0.1", "origin": None,
            "user_agent": "pytest/1.0", "prev_hash": chain.GENESIS}
    variants: list[dict[str, Any]] = [
        {},
        {"subject": "100% \"quoted\" \\ back%sslash", "user_agent": "%d %(x)s"},
        {"origin": "https://é.example", "topic": "bad topic \ufffd é %s", "code": "forbidden"},
        {"customer_id": None, "agent_id": None, "seq": 2**40, "prev_hash": "ab" * 32},
    ]
    fixed_fields = ("connection_id", "kind", "subject", "customer_id", "agent_id",
                    "authenticator", "remote_addr", "origin", "user_agent", "node_id")
    for change in variants:
        row = dict(base, **change)
        template = chain.RowTemplate(chain.CHAIN_ROWS, {f: row[f] for f in fixed_fields})
        doc = chain.canonical({f: row[f] for f in chain.ROW_FIELDS})
        assert template.hash(row) == hashlib.sha256(doc).hexdigest() == \
            chain.row_hash(chain.CHAIN_ROWS, row)
