"""Audit bundles: one file an outsider verifies with the public key alone (SPEC §5).

A bundle is JSON lines (UTF-8), docs/audit.md ("Bundles") gives the format for
a third party's own verifier:

- line 1, ``{"record": "header", "format": "wsgate-audit-bundle", "version": 1,
  "created_at", "customer", "since", "until"}``;
- per node and chain (``rows``, then ``events``), its checkpoints
  (``{"record": "checkpoint", ...every audit_checkpoints column but id}``)
  and then its rows in seq order (``{"record": "row" | "event", ...the chain's
  fields and row_hash}``; an event's ``topics`` is a JSON list);
- last, ``{"record": "end", "rows": n, "events": n, "checkpoints": n}``, so a
  cut-short file is caught.

Each chain section runs from a checkpoint (or seq 1) to a checkpoint, so both
ends are signed: it starts just after the last checkpoint before the first
row in the time range, and ends at the first checkpoint at or after the last
(a section of a running node may end in unsealed rows; verify reports them).
With ``customer``, rows of other customers, and events with no topic under
``customer_id:<customer>``, keep only ``node_id``, ``seq``, ``prev_hash`` and
``row_hash``: their links still verify, their content is not there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, func, select

from wsgate.audit import chain, proof, store
from wsgate.audit.orm import CHAIN_TABLES

FORMAT = "wsgate-audit-bundle"
VERSION = 1
#: The record type of each chain's rows in a bundle.
RECORD = {chain.CHAIN_ROWS: "row", chain.CHAIN_EVENTS: "event"}


class BundleError(ValueError):
    """A file that is not a bundle this version reads; the message says where and why."""


@dataclass(frozen=True)
class BundleStats:
    """What export_bundle wrote."""

    rows: int
    events: int
    redacted: int
    checkpoints: int
    sections: int


def _line(out: IO[str], doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")


def export_bundle(engine: Engine, out: IO[str], *, customer: str | None = None,
                  since: datetime | None = None, until: datetime | None = None) -> BundleStats:
    """Write a bundle of every node's chains, for rows in [since, until).

    Args:
        customer: show only this customer's rows (and events under
            ``customer_id:<customer>``) in full; others are redacted.
    """
    lo_t = chain.format_time(since) if since else None
    hi_t = chain.format_time(until) if until else None
    _line(out, {"record": "header", "format": FORMAT, "version": VERSION,
                "created_at": chain.format_time(datetime.now(UTC)), "customer": customer,
                "since": lo_t, "until": hi_t})
    counts = {"rows": 0, "events": 0, "redacted": 0, "checkpoints": 0, "sections": 0}
    with engine.connect() as conn:
        for chain_name, table in CHAIN_TABLES.items():
            when = table.c[proof.TIME_FIELD[chain_name]]
            conds = []
            if lo_t:
                conds.append(when >= lo_t)
            if hi_t:
                conds.append(when < hi_t)
            spans = conn.execute(select(table.c.node_id, func.min(table.c.seq),
                                        func.max(table.c.seq)).where(*conds)
                                 .group_by(table.c.node_id).order_by(table.c.node_id)).all()
            for node_id, lo, hi in spans:
                _section(conn, out, chain_name, str(node_id), int(lo), int(hi), customer,
                         counts)
    _line(out, {"record": "end", "rows": counts["rows"], "events": counts["events"],
                "checkpoints": counts["checkpoints"]})
    return BundleStats(counts["rows"], counts["events"], counts["redacted"],
                       counts["checkpoints"], counts["sections"])


def _section(conn: Connection, out: IO[str], chain_name: str, node_id: str, lo: int, hi: int,
             customer: str | None, counts: dict[str, int]) -> None:
    """One node's chain from the checkpoint before seq lo to the one at or after hi."""
    table = CHAIN_TABLES[chain_name]
    cps = store.load_checkpoints(conn, chain_name, node_id)
    before = [c for c in cps if c["seq"] < lo]
    start = before[-1]["seq"] if before else 0
    after = [c["seq"] for c in cps if c["seq"] >= hi]
    stop = min(after) if after else None
    for c in cps:
        if c["seq"] >= start and (stop is None or c["seq"] <= stop):
            _line(out, {"record": "checkpoint", **c})
            counts["checkpoints"] += 1
    fields = [table.c[f] for f in chain.CHAIN_FIELDS[chain_name] if f in table.c]
    stmt = select(*fields, table.c.row_hash).where(table.c.node_id == node_id,
                                                   table.c.seq > start)
    if stop is not None:
        stmt = stmt.where(table.c.seq <= stop)
    stmt = stmt.order_by(table.c.seq, table.c.id).execution_options(yield_per=2000)
    record = RECORD[chain_name]
    with conn.execute(stmt) as result:
        for r in result:
            row = dict(r._mapping)
            if chain_name == chain.CHAIN_EVENTS:
                row["topics"] = json.loads(row["topics"])
            if customer is not None and not _belongs(chain_name, row, customer):
                row = {f: row[f] for f in proof.REDACTED_FIELDS}
                counts["redacted"] += 1
            _line(out, {"record": record, **row})
            counts["rows" if chain_name == chain.CHAIN_ROWS else "events"] += 1
    counts["sections"] += 1


def _belongs(chain_name: str, row: dict[str, Any], customer: str) -> bool:
    if chain_name == chain.CHAIN_ROWS:
        return bool(row.get("customer_id") == customer)
    scope = f"customer_id:{customer}"
    return any(t == scope or t.startswith(scope + ":") for t in row.get("topics") or ())


# --- verify ---------------------------------------------------------------------------

@dataclass
class BundleResult:
    """What verify_bundle found: the verify result, and what the bundle showed."""

    result: store.VerifyResult
    header: dict[str, Any]
    redacted: int
    shown: int


def _records(src: IO[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in enumerate(src, 1):
        try:
            doc = json.loads(text)
        except ValueError:
            raise BundleError(f"{name}: line {number} is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("record"), str):
            raise BundleError(f"{name}: line {number} is not a bundle record")
        yield number, doc


def verify_bundle(src: IO[str], public_key: Ed25519PublicKey, name: str = "bundle"
                  ) -> BundleResult:
    """Check a bundle with nothing but the verify key: every chain section's rows,
    links and checkpoints by the rules of :mod:`wsgate.audit.proof`, and that the
    file is whole.

    Raises:
        BundleError: not a bundle (of this version), or a malformed record.
    """
    records = _records(src, name)
    try:
        first = next(records, None)
    except BundleError:
        first = None
    if first is None or first[1].get("record") != "header" or first[1].get("format") != FORMAT:
        raise BundleError(f"{name}: not a wsgate audit bundle (no header line)")
    header = first[1]
    if header.get("version") != VERSION:
        raise BundleError(f"{name}: bundle version {header.get('version')!r}; this wsgate "
                          f"reads version {VERSION}")
    sections: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    totals = {"rows": 0, "events": 0, "checkpoints": 0}
    trailer: dict[str, Any] | None = None
    chains = {v: k for k, v in RECORD.items()}
    for number, doc in records:
        kind = doc.pop("record")
        if trailer is not None:
            raise BundleError(f"{name}: line {number} follows the end record")
        if kind == "end":
            trailer = doc
            continue
        try:
            if kind == "checkpoint":
                key = (str(doc["chain"]), str(doc["node_id"]))
                sections.setdefault(key, ([], []))[0].append(doc)
                totals["checkpoints"] += 1
            elif kind in chains:
                key = (chains[kind], str(doc["node_id"]))
                int(doc["seq"])
                sections.setdefault(key, ([], []))[1].append(doc)
                totals["rows" if kind == "row" else "events"] += 1
            else:
                raise BundleError(f"{name}: line {number}: unknown record {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{name}: line {number}: a {kind} without {exc}") from None
    result = store.VerifyResult(signatures_checked=True)
    if trailer is None or any(trailer.get(k) != v for k, v in totals.items()):
        result.problems.append(proof.VerifyProblem(
            proof.DELETED, chain.CHAIN_ROWS, "", 0,
            f"{name} is not whole: its end record is missing or does not count what it "
            f"holds ({totals})"))
    redacted = shown = 0
    for (chain_name, node_id), (cps, rows) in sorted(sections.items()):
        if chain_name not in CHAIN_TABLES:
            raise BundleError(f"{name}: a checkpoint of unknown chain {chain_name!r}")
        rows.sort(key=lambda r: int(r["seq"]))
        report = proof.check_chain(chain_name, node_id, sorted(cps, key=lambda c: c["seq"]),
                                   rows, public_key, anchors="any", first_prev=None)
        result.add(report, chain_name)
        result.nodes = sorted(set(result.nodes) | {node_id})
        for r in rows:
            if proof.TIME_FIELD[chain_name] in r:
                shown += 1
            else:
                redacted += 1
    return BundleResult(result, header, redacted, shown)
