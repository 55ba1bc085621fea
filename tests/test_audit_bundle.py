"""Audit bundles: export, verify with the public key alone, tampering, customer redaction."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from tests import audit_helpers
from tests.audit_helpers import (
    CUSTOMER,
    KEY1,
    OTHER_CUSTOMER,
    Backend,
    conn_info,
    minutes,
    rec,
    topic,
    write_log,
)
from wsgate.audit import bundle
from wsgate.audit.records import REJECTED, EventRecord

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


def two_customers(b: Backend, node_id: str = "node-a") -> None:
    """40 rows alternating between two customers' connections (one refused), and an
    event for each customer; a checkpoint every 7 rows."""
    steps: list[tuple[str, list[Any]]] = []
    for i in range(40):
        if i % 2:
            steps.append(("sub", [rec(topic("call", f"a{i}"), at=minutes(i))]))
        else:
            other = conn_info("rival-connection", KEY1, remote_addr="192.0.2.77")
            steps.append(("sub", [rec(topic("queue", f"secret{i}", customer=OTHER_CUSTOMER),
                                      at=minutes(i), conn=other,
                                      outcome=REJECTED if i == 10 else "accepted",
                                      code="forbidden" if i == 10 else "")]))
    steps.append(("event", [
        EventRecord("e-mine", "call_created", (topic("call", "a1"),), "k", "1" * 64,
                    minutes(40)),
        EventRecord("e-theirs", "queue_created", (topic("queue", "q", customer=OTHER_CUSTOMER),),
                    "k", "2" * 64, minutes(41))]))
    write_log(b, steps, node_id, checkpoint_every=7)


def export(b: Backend, **kw: Any) -> str:
    out = io.StringIO()
    bundle.export_bundle(b.engine(), out, **kw)
    return out.getvalue()


def check(b: Backend, text: str) -> bundle.BundleResult:
    return bundle.verify_bundle(io.StringIO(text), b.key.public_key())


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_whole_bundle_verifies_with_the_public_key_alone(backend: Backend) -> None:
    two_customers(backend)
    found = check(backend, export(backend))
    assert found.result.ok, found.result.problems
    assert (found.result.rows_checked, found.result.events_checked) == (40, 2)
    assert found.redacted == 0 and found.shown == 42
    assert found.result.unsealed == []


def test_a_time_window_runs_from_checkpoint_to_checkpoint(backend: Backend) -> None:
    two_customers(backend)
    text = export(backend, since=minutes(15), until=minutes(20))
    found = check(backend, text)
    assert found.result.ok, found.result.problems
    rows = [r["seq"] for r in records(text) if r["record"] == "row"]
    # Rows 16..20 asked for; the section runs from the checkpoint at 14 to the one at 21.
    assert rows == list(range(15, 22))


def test_a_customer_bundle_shows_nothing_of_another_customer(backend: Backend) -> None:
    two_customers(backend)
    text = export(backend, customer=CUSTOMER)
    for secret in (OTHER_CUSTOMER, "key-1", "secret", "192.0.2.77", "forbidden",
                   "queue_created", "e-theirs", "2" * 64, "rival-connection"):
        assert secret not in text, secret
    found = check(backend, text)
    assert found.result.ok, found.result.problems
    assert (found.shown, found.redacted) == (21, 21)  # 20 rows and 1 event each
    full = [r for r in records(text) if r["record"] == "row" and "occurred_at" in r]
    assert {r["customer_id"] for r in full} == {CUSTOMER}
    hidden = [r for r in records(text) if r["record"] in ("row", "event")
              and "occurred_at" not in r and "published_at" not in r]
    assert all(set(r) == {"record", "node_id", "seq", "prev_hash", "row_hash"} for r in hidden)


@pytest.mark.parametrize("attack,kind", [
    ("edit a shown row", "changed"),
    ("rewrite a redacted row", "inserted"),
    ("drop a row", "deleted"),
    ("drop a checkpoint", "broken_checkpoint_chain"),
    ("forge a checkpoint", "bad_signature"),
    ("cut the file short", "deleted"),
])
def test_a_tampered_bundle_fails(backend: Backend, attack: str, kind: str) -> None:
    two_customers(backend)
    recs = records(export(backend, customer=CUSTOMER))
    rows = [r for r in recs if r["record"] == "row"]
    shown = next(r for r in rows if "occurred_at" in r and r["seq"] > 2)
    hidden = next(r for r in rows if "occurred_at" not in r and r["seq"] > 2)
    cps = [r for r in recs if r["record"] == "checkpoint" and r["chain"] == "rows"]
    if attack == "edit a shown row":
        shown["subject"] = "mallory"
    elif attack == "rewrite a redacted row":
        hidden["row_hash"] = "0" * 64
    elif attack == "drop a row":
        recs.remove(shown)
        recs[-1]["rows"] -= 1
    elif attack == "drop a checkpoint":
        recs.remove(cps[2])
        recs[-1]["checkpoints"] -= 1
    elif attack == "forge a checkpoint":
        cps[2]["head_hash"] = shown["row_hash"]
    else:
        recs = recs[: len(recs) // 2]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    result = check(backend, text).result
    assert not result.ok
    assert kind in {p.kind for p in result.problems}, result.problems


def test_not_a_bundle_is_refused_with_the_line() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(bundle.BundleError, match="not a wsgate audit bundle"):
        bundle.verify_bundle(io.StringIO('{"seq": 1}\n'), key)
    header = json.dumps({"record": "header", "format": bundle.FORMAT, "version": 1})
    with pytest.raises(bundle.BundleError, match="line 2 is not JSON"):
        bundle.verify_bundle(io.StringIO(header + "\n{oops\n"), key)
    with pytest.raises(bundle.BundleError, match="version 9"):
        bundle.verify_bundle(io.StringIO(header.replace('"version": 1', '"version": 9')), key)
