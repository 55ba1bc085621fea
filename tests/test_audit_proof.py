"""Proof to an outsider (SPEC §5): what a database writer without the key can do to
the log, and how verify names it. Each attack is made the way the outside review
made it: straight SQL on the store, hashes recomputed with the project's own code.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from tests import audit_helpers
from tests.audit_helpers import Backend, conn_info, end, minutes, rec, topic, write_log
from wsgate.audit import chain, proof, store
from wsgate.audit.records import EventRecord

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

EVERY = 10


def sixty_rows(b: Backend, node_id: str = "node-a", *, close: bool = True, n: int = 60
               ) -> None:
    """n rows (60) on one node, a checkpoint every 10 rows, and one event; ``close=False``
    leaves the log as a crash would (no closing checkpoint)."""
    steps: list[tuple[str, list[Any]]] = [
        ("sub", [rec(topic("call", str(i)), at=minutes(i), conn=conn_info(f"c{i % 3}"))])
        for i in range(n - 2)]
    steps.append(("end", [end(topic("call", "0"), at=minutes(n - 2), conn=conn_info("c0"))]))
    steps.append(("sub", [rec(topic("call", "x"), at=minutes(n - 1))]))
    steps.append(("event", [EventRecord("e1", "call_created", (topic("call", "1"),), "k",
                                        "0" * 64, minutes(n - 1))]))
    if close:
        write_log(b, steps, node_id, checkpoint_every=EVERY)
    else:
        _write_crashed(b, steps, node_id)


def _write_crashed(b: Backend, steps: list[tuple[str, list[Any]]], node_id: str) -> None:
    """Write steps and stop the writer the way a crash does: no closing checkpoint."""
    import asyncio

    from wsgate.audit.writer import AuditWriter

    async def run() -> None:
        w = AuditWriter(b.config(checkpoint_every=EVERY), node_id)
        await w.start()
        for kind, items in steps:
            await (w.write_subscribes(items) if kind == "sub" else
                   w.write_ends(items) if kind == "end" else w.write_events(items))
        w._private = None  # what a kill -9 leaves: no close checkpoint is signed
        await w.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def verify(b: Backend, witness: list[dict[str, Any]] | None = None) -> store.VerifyResult:
    witnesses = [("witness.jsonl", witness)] if witness is not None else []
    return store.verify(b.engine(), b.key.public_key(), witnesses)


def checkpoints(b: Backend) -> list[dict[str, Any]]:
    """Every stored checkpoint: what a file witness of the node holds."""
    with b.engine().connect() as conn:
        return store.load_checkpoints(conn)


def rehash_from(b: Backend, seq: int, node_id: str = "node-a") -> None:
    """Recompute row_hash and prev_hash of rows seq.. with the project's own hash function."""
    eng = b.engine()
    with eng.begin() as conn:
        prev = conn.execute(text("SELECT row_hash FROM audit_rows WHERE node_id = :n AND "
                                 "seq = :s"), {"n": node_id, "s": seq - 1}).scalar()
        rows = [dict(r) for r in conn.execute(text(
            "SELECT * FROM audit_rows WHERE node_id = :n AND seq >= :s ORDER BY seq"),
            {"n": node_id, "s": seq}).mappings()]
        for row in rows:
            row["prev_hash"] = prev
            row["row_hash"] = prev = chain.row_hash(chain.CHAIN_ROWS, row)
            conn.execute(text("UPDATE audit_rows SET prev_hash = :p, row_hash = :h "
                              "WHERE id = :id"),
                         {"p": row["prev_hash"], "h": row["row_hash"], "id": row["id"]})


def named(result: store.VerifyResult) -> tuple[str, str, int] | None:
    first = result.first
    return None if first is None else (first.kind, first.node_id, first.seq)


# --- an untouched log ------------------------------------------------------------------

def test_untouched_log_verifies_with_its_witness(backend: Backend) -> None:
    sixty_rows(backend)
    result = verify(backend, checkpoints(backend))
    assert result.ok, result.problems
    assert result.unsealed == []  # closed cleanly: everything is signed
    assert result.witnessed_checked == len(checkpoints(backend))


def test_crashed_log_verifies_and_reports_its_unsealed_tail(backend: Backend) -> None:
    sixty_rows(backend, close=False, n=57)
    result = verify(backend, checkpoints(backend))
    assert result.ok, result.problems
    tails = {t.chain: t for t in result.unsealed}
    assert (tails["rows"].after_seq, tails["rows"].rows) == (50, 7)
    assert (tails["rows"].first_at, tails["rows"].last_at) == (
        chain.format_time(minutes(50)), chain.format_time(minutes(56)))
    assert (tails["events"].after_seq, tails["events"].rows) == (0, 1)
    # The next start seals what the crash left.
    write_log(backend, [], checkpoint_every=EVERY)
    again = verify(backend, checkpoints(backend))
    assert again.ok and again.unsealed == []


# --- attacks that verify catches from the store alone ----------------------------------

def test_rewrite_and_rehash_after_deleting_later_checkpoints_is_caught(
        backend: Backend) -> None:
    """Row 50's subject and topic changed, every later row re-hashed, the checkpoints
    after it deleted: the rows after the last checkpoint outnumber the signed policy."""
    sixty_rows(backend)
    backend.execute("UPDATE audit_rows SET subject = 'mallory', topic = :t WHERE seq = 50",
                    t=topic("call", "forged"))
    rehash_from(backend, 50)
    backend.execute("DELETE FROM audit_checkpoints WHERE chain = 'rows' AND seq >= 50")
    assert named(verify(backend)) == ("missing_checkpoint", "node-a", 41)


def test_deleted_middle_checkpoint_breaks_the_checkpoint_chain(backend: Backend) -> None:
    sixty_rows(backend)
    backend.execute("DELETE FROM audit_checkpoints WHERE chain = 'rows' AND seq = 30")
    assert named(verify(backend)) == ("broken_checkpoint_chain", "node-a", 40)


def test_swapped_rows_are_caught(backend: Backend) -> None:
    sixty_rows(backend)
    backend.execute("UPDATE audit_rows SET seq = -1 WHERE seq = 23")
    backend.execute("UPDATE audit_rows SET seq = 23 WHERE seq = 24")
    backend.execute("UPDATE audit_rows SET seq = 24 WHERE seq = -1")
    assert named(verify(backend))[:3] == ("changed", "node-a", 23)  # type: ignore[index]


def test_truncated_tail_is_caught_by_the_closing_checkpoint(backend: Backend) -> None:
    sixty_rows(backend)
    backend.execute("DELETE FROM audit_rows WHERE seq > 55")
    assert named(verify(backend)) == ("deleted", "node-a", 56)


def test_forged_checkpoint_is_caught(backend: Backend) -> None:
    sixty_rows(backend)
    backend.execute("UPDATE audit_checkpoints SET signature = :s WHERE seq = 20 AND "
                    "chain = 'rows'", s="QUFB" * 22 + "QQ==")
    assert [(p.kind, p.seq) for p in verify(backend).problems] == [("bad_signature", 20)]


def test_a_node_with_rows_and_no_checkpoint_fails_when_a_key_is_given(
        backend: Backend) -> None:
    sixty_rows(backend)
    backend.execute("DELETE FROM audit_checkpoints WHERE node_id = 'node-a'")
    assert named(verify(backend)) == ("unsigned", "node-a", 1)


# --- attacks only a witness catches ----------------------------------------------------

def test_rollback_past_a_middle_checkpoint_is_caught_by_the_witness(backend: Backend) -> None:
    """Every row after the checkpoint at 30 deleted with the later checkpoints: the store
    looks like a node that crashed at 30; the witness still holds 40, 50, 60."""
    sixty_rows(backend)
    held = checkpoints(backend)
    backend.execute("DELETE FROM audit_rows WHERE seq > 30")
    backend.execute("DELETE FROM audit_checkpoints WHERE chain = 'rows' AND seq > 30")
    assert verify(backend).ok  # the store alone cannot tell (docs/audit.md says so)
    result = verify(backend, held)
    assert named(result) == ("witness_missing", "node-a", 40)
    assert "rolled back" in result.problems[0].message


def test_deleted_node_is_caught_by_the_witness(backend: Backend) -> None:
    sixty_rows(backend, "node-a")
    sixty_rows(backend, "node-b")
    held = checkpoints(backend)
    for table in ("audit_rows", "audit_events", "audit_checkpoints"):
        backend.execute(f"DELETE FROM {table} WHERE node_id = 'node-b'")
    assert verify(backend).ok
    result = verify(backend, held)
    assert {(p.kind, p.node_id, p.seq) for p in result.problems} == {
        ("witness_missing", "node-b", 0)}  # from its start checkpoint on, rows and events
    assert "node-b" in result.nodes


def test_a_forged_witness_line_is_not_taken_as_the_truth(backend: Backend) -> None:
    sixty_rows(backend)
    held = checkpoints(backend)
    held[3] = dict(held[3], head_hash="f" * 64)
    result = verify(backend, held)
    assert [p.kind for p in result.problems] == ["bad_signature"]
    assert "witness" in result.problems[0].message


# --- the proof module on its own -------------------------------------------------------

def chained_rows(n: int) -> list[dict[str, Any]]:
    """n rows of node "n", one a second from 12:00:01, correctly chained."""
    rows, prev = [], chain.GENESIS
    for seq in range(1, n + 1):
        row: dict[str, Any] = {f: None for f in chain.ROW_FIELDS}
        row.update(seq=seq, occurred_at=f"2024-05-01T12:00:{seq:02d}.000000Z", node_id="n",
                   prev_hash=prev)
        row["row_hash"] = prev = chain.row_hash(chain.CHAIN_ROWS, row)
        rows.append(row)
    return rows


def test_check_chain_reports_a_tail_longer_than_its_policy() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    rows = chained_rows(7)
    cp = store.make_checkpoint(key, "rows", "n", 2, rows[1]["row_hash"], "start",
                               prev_hash=chain.GENESIS, policy=chain.Policy(3, 60.0))
    report = proof.check_chain("rows", "n", [cp], rows, key.public_key())
    assert [(p.kind, p.seq) for p in report.problems] == [("missing_checkpoint", 3)]
    assert report.tail == proof.UnsealedTail("rows", "n", 2, 5, "2024-05-01T12:00:03.000000Z",
                                             "2024-05-01T12:00:07.000000Z")


def test_check_chain_reports_checkpoints_further_apart_than_their_policy() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    rows = chained_rows(9)
    policy = chain.Policy(3, 60.0)
    first = store.make_checkpoint(key, "rows", "n", 2, rows[1]["row_hash"], "start",
                                  prev_hash=chain.GENESIS, policy=policy)
    second = store.make_checkpoint(key, "rows", "n", 9, rows[8]["row_hash"], "close",
                                   prev_hash=chain.checkpoint_hash(first), policy=policy)
    report = proof.check_chain("rows", "n", [first, second], rows, key.public_key())
    assert [(p.kind, p.seq) for p in report.problems] == [("missing_checkpoint", 3)]
    assert "7 rows between the checkpoints at seq 2 and 9" in report.problems[0].message


@pytest.mark.parametrize("text_", ["", "{}", "not json", '{"checkpoint_every": 0, '
                                   '"checkpoint_interval": 1, "slack": 0}'])
def test_a_malformed_policy_is_no_policy(text_: str) -> None:
    assert chain.Policy.parse(text_) is None
