"""A store written before checkpoints chained (schema 0001) migrates and keeps verifying."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from tests import audit_helpers
from tests.audit_helpers import Backend, minutes, rec, topic, write_log
from wsgate.audit import chain, store
from wsgate.audit.writer import _RowMaker

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


def legacy_log(b: Backend, rows: int, checkpoint_at: tuple[int, ...]) -> None:
    """What wsgate wrote at schema 0001: chained rows, unchained checkpoints signed over
    seven fields."""
    engine = b.engine()
    store.migrate(engine, "0001")
    prev = chain.GENESIS
    make_row = _RowMaker()  # the writer's own: rows as the writer stores them
    with engine.begin() as conn:
        for seq in range(1, rows + 1):
            row: dict[str, Any] = make_row(rec(topic("call", str(seq)), at=minutes(seq)))
            row.update(node_id="node-a", seq=seq, prev_hash=prev)
            row["row_hash"] = prev = chain.row_hash(chain.CHAIN_ROWS, row)
            conn.execute(text(f"INSERT INTO audit_rows ({', '.join(row)}) VALUES "
                              f"({', '.join(':' + k for k in row)})"), row)
            if seq in checkpoint_at:
                cp = store.make_checkpoint(b.key, "rows", "node-a", seq, prev, "periodic")
                assert cp["prev_hash"] is None and cp["policy"] is None
                del cp["prev_hash"], cp["policy"]  # no such columns at 0001
                conn.execute(text(f"INSERT INTO audit_checkpoints ({', '.join(cp)}) VALUES "
                                  f"({', '.join(':' + k for k in cp)})"), cp)


def test_a_reader_names_a_store_that_was_not_migrated(backend: Backend) -> None:
    legacy_log(backend, 3, (3,))
    with pytest.raises(store.AuditStoreError, match="at revision 0001, and this wsgate reads"):
        store.require_schema(backend.engine())


def test_a_legacy_log_migrates_and_keeps_verifying(backend: Backend) -> None:
    legacy_log(backend, 12, (5, 10))
    # The node crashed at 12 (2 rows after its last checkpoint), then the new
    # wsgate starts: it migrates, seals what was left, and goes on.
    write_log(backend, [("sub", [rec(topic("call", "new", str(i)))]) for i in range(7)],
              checkpoint_every=5)
    store.require_schema(backend.engine())  # no raise: at head now
    result = store.verify(backend.engine(), backend.key.public_key())
    assert result.ok, result.problems
    # The 12 legacy subscriptions were left open: the start closes them (unclean_shutdown).
    assert result.rows_checked == 12 + 12 + 7
    with backend.engine().connect() as conn:
        cps = [tuple(r) for r in conn.execute(text(
            "SELECT seq, kind, prev_hash IS NULL FROM audit_checkpoints WHERE chain = 'rows' "
            "ORDER BY id"))]
    assert cps[:4] == [(5, "periodic", True), (10, "periodic", True), (15, "periodic", False),
                       (20, "periodic", False)]
    assert (24, "start", False) in cps
    # A legacy checkpoint cannot be passed off as a chained one, or the other way round.
    backend.execute("UPDATE audit_checkpoints SET prev_hash = :g WHERE seq = 5",
                    g=chain.GENESIS)
    assert [p.kind for p in store.verify(backend.engine(),
                                          backend.key.public_key()).problems][:1] == [
        "bad_signature"]
