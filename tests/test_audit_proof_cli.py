"""`wsgate audit verify` and `export --bundle` as a reviewer runs them: witnesses,
bundles checked with the public key alone, the unsealed-tail warning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import audit_helpers
from tests.audit_helpers import (
    CUSTOMER,
    OTHER_CUSTOMER,
    Backend,
    minutes,
    rec,
    topic,
    write_log,
)
from tests.test_audit_bundle import two_customers
from tests.test_audit_proof import EVERY, sixty_rows
from tests.test_audit_query import run_cli, write_config
from wsgate.audit import chain

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured


def witnessed(b: Backend) -> tuple[str, Path]:
    """A config with a file witness, and 60 rows written through a writer that has it."""
    path = b.tmp / "witness.jsonl"
    cfg = write_config(b, witness=[f"file://{path}"], checkpoint_every=EVERY)
    write_log(b, [("sub", [rec(topic("call", str(i)), at=minutes(i))]) for i in range(60)],
              checkpoint_every=EVERY, witness=(f"file://{path}",))
    return cfg, path


def test_verify_compares_the_configured_file_witness(backend: Backend, capsys: Any) -> None:
    cfg, path = witnessed(backend)
    held = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(c["chain"], c["seq"], c["kind"]) for c in held if c["chain"] == "rows"] == [
        ("rows", 0, "start"), *[("rows", s, "periodic") for s in range(10, 61, 10)],
        ("rows", 60, "close")]
    assert run_cli("audit", "verify", "--config", cfg) == 0
    out = capsys.readouterr().out
    assert "OK: the audit log is whole" in out and f"{len(held)} witnessed checkpoints" in out
    # The review's rollback: every row after the checkpoint at 30, and the later
    # checkpoints, deleted. The store alone cannot tell; the witness can.
    backend.execute("DELETE FROM audit_rows WHERE seq > 30")
    backend.execute("DELETE FROM audit_checkpoints WHERE chain = 'rows' AND seq > 30")
    assert run_cli("audit", "verify", "--config", cfg, "--witness", str(backend.tmp / "x")) == 2
    assert "x" in capsys.readouterr().err
    assert run_cli("audit", "verify", "--config", cfg) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: first bad row is seq 40 of node node-a (witness_missing)")


def test_verify_warns_of_the_unsealed_tail(backend: Backend, capsys: Any) -> None:
    sixty_rows(backend, close=False, n=57)
    cfg = write_config(backend)
    assert run_cli("audit", "verify", "--config", cfg) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("WARNING: node node-a: 7 rows after seq 50 are not signed by a "
                      "checkpoint yet (2024-05-01T12:50:00.123456Z to "
                      "2024-05-01T12:56:00.123456Z); a witness cannot vouch for them")
    assert out[-1].startswith("OK: the audit log is whole")


def test_a_customer_bundle_verifies_with_no_database_and_no_config(
        backend: Backend, capsys: Any) -> None:
    two_customers(backend)
    cfg = write_config(backend)
    out = backend.tmp / "acme.bundle"
    assert run_cli("audit", "export", "--config", cfg, "--bundle", str(out),
                   "--customer", CUSTOMER) == 0
    assert "21 redacted" in capsys.readouterr().err
    assert OTHER_CUSTOMER not in out.read_text()
    public = backend.tmp / "verify.pem"
    public.write_text(chain.public_pem(backend.key.public_key()))
    backend.execute("DELETE FROM audit_rows")  # the bundle needs nothing of the store
    assert run_cli("audit", "verify", "--bundle", str(out), "--verify-key", str(public)) == 0
    printed = capsys.readouterr().out
    assert f"customer {CUSTOMER}" in printed and "21 rows and events shown, 21 redacted" in (
        printed)
    assert printed.splitlines()[-1].startswith("OK: the audit log is whole (40 rows, 2 events")
    text = out.read_text().replace('"subject":"alice"', '"subject":"mallory"', 1)
    out.write_text(text)
    assert run_cli("audit", "verify", "--bundle", str(out), "--verify-key", str(public)) == 1
    assert "(changed)" in capsys.readouterr().out


def test_bundle_flags_are_checked(backend: Backend, capsys: Any) -> None:
    two_customers(backend)
    cfg = write_config(backend)
    out = str(backend.tmp / "b")
    assert run_cli("audit", "export", "--config", cfg, "--bundle", out, "--agent", "x") == 2
    assert "--bundle takes --customer, --since and --until only, not --agent" in (
        capsys.readouterr().err)
    assert run_cli("audit", "export", "--config", cfg, "--bundle", out) == 0
    assert run_cli("audit", "verify", "--bundle", out) == 2
    assert "--bundle needs --verify-key PEM" in capsys.readouterr().err
    assert run_cli("audit", "verify") == 2
    assert "verify needs --config FILE" in capsys.readouterr().err
    assert run_cli("audit", "verify", "--bundle", cfg, "--verify-key", cfg) == 2
    assert "--verify-key: not a PEM public key" in capsys.readouterr().err
