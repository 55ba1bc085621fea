"""Checking a node's chain and its checkpoints: the proof ``verify`` gives an outsider.

Pure: no database, no files. ``store.verify`` feeds it rows streamed from the
store, ``bundle.verify_bundle`` rows read from a bundle; both get the same
answers. docs/audit.md ("What verify checks") states these rules for a
reviewer who writes a verifier of their own; keep the two in step.

For one node and one chain (``rows`` or ``events``), given its checkpoints
and its rows in ``seq`` order, :func:`check_chain` reports the first of:

- ``bad_signature``: a checkpoint whose signature does not verify (each one);
- ``broken_checkpoint_chain``: a chained checkpoint whose ``prev_hash`` is not
  the hash of the node's previous one (one was removed, replaced or inserted);
- ``missing_checkpoint``: more rows between two checkpoints, or after the
  last one, than the signed policy lets even a crash leave;
- ``unsigned``: rows, a verify key, and not one checkpoint;
- ``changed``, ``deleted``, ``inserted``: a row whose hash does not match its
  fields, a missing ``seq``, a row not linked to the one before it (and rows
  that differ from what a checkpoint signed).

:func:`check_witnessed` compares checkpoints a witness holds with the store's:
``witness_missing`` names one the store lost (a rolled-back tail, a deleted
node), ``witness_differs`` one the store holds in another form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from wsgate.audit import chain

#: Problem kinds.
CHANGED = "changed"
DELETED = "deleted"
INSERTED = "inserted"
BAD_SIGNATURE = "bad_signature"
BROKEN_CHECKPOINT_CHAIN = "broken_checkpoint_chain"
MISSING_CHECKPOINT = "missing_checkpoint"
UNSIGNED = "unsigned"
WITNESS_MISSING = "witness_missing"
WITNESS_DIFFERS = "witness_differs"

#: The fields a redacted row keeps (a customer bundle's rows of other customers).
REDACTED_FIELDS = ("node_id", "seq", "prev_hash", "row_hash")

#: Each chain's time field.
TIME_FIELD = {chain.CHAIN_ROWS: "occurred_at", chain.CHAIN_EVENTS: "published_at"}


@dataclass(frozen=True)
class VerifyProblem:
    """One break found by verify: what, in which chain of which node, at which seq."""

    kind: str
    chain: str
    node_id: str
    seq: int
    message: str


@dataclass(frozen=True)
class UnsealedTail:
    """Rows after a node's last checkpoint: no signature covers them yet.

    A running node always has a short one; a log whose tail is longer than
    its policy allows fails verify (``missing_checkpoint``).
    """

    chain: str
    node_id: str
    after_seq: int
    rows: int
    first_at: str | None
    last_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChainReport:
    """What :func:`check_chain` found for one node and chain."""

    problems: list[VerifyProblem] = field(default_factory=list)
    rows: int = 0
    checkpoints: int = 0
    tail: UnsealedTail | None = None


def is_chained(cp: Mapping[str, Any]) -> bool:
    """True for a checkpoint that is part of its node's checkpoint chain."""
    return cp.get("prev_hash") is not None


def check_chain(chain_name: str, node_id: str, checkpoints: Sequence[Mapping[str, Any]],
                rows: Iterable[Mapping[Any, Any]], public_key: Ed25519PublicKey | None, *,
                anchors: str = "prune", first_prev: str | None = chain.GENESIS) -> ChainReport:
    """Check one node's chain of ``chain_name`` against its checkpoints.

    Args:
        checkpoints: the node's checkpoints of this chain, oldest first
            (by seq, then by the order they were stored).
        rows: the node's rows in seq order (stored order within a seq), each
            with the chain's fields and ``row_hash``, or only REDACTED_FIELDS.
        public_key: the verify key; None checks chains and links, not signatures.
        anchors: which checkpoints may start the retained chain after seq 1:
            ``"prune"`` (a store: only a signed prune) or ``"any"`` (a bundle,
            which starts after a checkpoint).
        first_prev: what the first chained checkpoint's prev_hash must be, or
            None when the checkpoints start mid-chain (a bundle).

    Returns:
        The problems (each bad signature, the first break of the checkpoint
        chain, the first break of the row chain) and the unsealed tail.
    """
    report = ChainReport(checkpoints=len(checkpoints))
    kid = chain.key_id(public_key) if public_key is not None else None

    def problem(kind: str, seq: int, message: str) -> VerifyProblem:
        return VerifyProblem(kind, chain_name, node_id, seq, f"node {node_id!r}: {message}")

    good: list[Mapping[str, Any]] = []
    for c in checkpoints:
        if public_key is not None and (
                c.get("key_id") != kid or not chain.checkpoint_signature_ok(public_key, c)):
            why = (f"was signed by another key (key id {c.get('key_id')}, expected {kid})"
                   if c.get("key_id") != kid else "has a signature that does not verify")
            report.problems.append(problem(
                BAD_SIGNATURE, int(c["seq"]), f"the {c.get('kind')} checkpoint at seq "
                f"{c['seq']} {why}"))
        else:
            good.append(c)
    # Links are checked over every chained checkpoint: a hash does not cover the
    # signature, so a checkpoint with a mangled signature still links.
    linked = [c for c in checkpoints if is_chained(c)]
    broken = _check_links(linked, first_prev, problem)
    if broken is not None:
        report.problems.append(broken)

    noun = "row" if chain_name == chain.CHAIN_ROWS else "event"
    walk = _RowWalk(chain_name, noun, good, anchors, problem)
    row_problem = walk.run(rows)
    report.rows = walk.count
    if row_problem is not None:
        report.problems.append(row_problem)
        return report
    # Over every checkpoint: one with a bad signature is reported already.
    last_cp = max((int(c["seq"]) for c in checkpoints if c.get("kind") != "prune"),
                  default=None)
    sealed_at = last_cp if last_cp is not None else walk.first_seq - 1
    unsealed = walk.last_seq - sealed_at if walk.last_seq > sealed_at else 0
    if unsealed:
        report.tail = UnsealedTail(chain_name, node_id, sealed_at, unsealed,
                                   walk.times.get(sealed_at), walk.last_time)
    if broken is not None:
        return report
    if linked:
        last = linked[-1]
        policy = chain.Policy.parse(last.get("policy"))
        if policy is not None and unsealed > policy.max_gap:
            report.problems.append(problem(
                MISSING_CHECKPOINT, sealed_at + 1,
                f"{unsealed} {noun}s after the last checkpoint (seq {sealed_at}) are signed "
                f"by none, and its policy lets even a crash leave at most {policy.max_gap}: "
                "later checkpoints were removed"))
    elif public_key is not None and not checkpoints and walk.count:
        report.problems.append(problem(
            UNSIGNED, walk.first_seq,
            f"{walk.count} {noun}s and not one signed checkpoint: the node's checkpoints "
            "were removed, or it never ran with the signing key"))
    return report


def _check_links(linked: Sequence[Mapping[str, Any]], first_prev: str | None,
                 problem: Any) -> VerifyProblem | None:
    """The first break of a checkpoint chain: a link, an order or a gap past the policy."""
    before: Mapping[str, Any] | None = None
    for c in linked:
        seq = int(c["seq"])
        if before is None:
            expected = first_prev
        else:
            expected = chain.checkpoint_hash(before)
        if expected is not None and c["prev_hash"] != expected:
            where = (f"the checkpoint before it (seq {before['seq']})" if before is not None
                     else "the start of the node's checkpoint chain")
            return problem(BROKEN_CHECKPOINT_CHAIN, seq,
                           f"the {c.get('kind')} checkpoint at seq {seq} does not follow "
                           f"{where}: a checkpoint between them was removed or replaced")
        if before is not None:
            prev_seq = int(before["seq"])
            if seq < prev_seq:
                return problem(BROKEN_CHECKPOINT_CHAIN, seq,
                               f"the checkpoint at seq {seq} follows one at seq {prev_seq}: "
                               "checkpoints were reordered")
            policy = chain.Policy.parse(before.get("policy"))
            if policy is not None and seq - prev_seq > policy.max_gap:
                return problem(MISSING_CHECKPOINT, prev_seq + 1,
                               f"{seq - prev_seq} rows between the checkpoints at seq "
                               f"{prev_seq} and {seq}; the policy they were signed under "
                               f"allows at most {policy.max_gap}: a checkpoint is missing")
        before = c
    return None


class _RowWalk:
    """The row chain: hashes, seq order, links, and what checkpoints signed."""

    def __init__(self, chain_name: str, noun: str, checkpoints: Sequence[Mapping[str, Any]],
                 anchors: str, problem: Any) -> None:
        self.chain_name = chain_name
        self.noun = noun
        self.problem = problem
        self.time_field = TIME_FIELD[chain_name]
        self.signed: dict[int, list[Mapping[str, Any]]] = {}
        for c in checkpoints:
            self.signed.setdefault(int(c["seq"]), []).append(c)
        self.anchors = {int(c["seq"]): c for c in checkpoints
                        if anchors == "any" or c.get("kind") == "prune"}
        self.top = max(self.signed, default=0)
        self.count = 0
        self.first_seq = 1
        self.last_seq = 0
        self.last_time: str | None = None
        #: Time of the first row after each checkpoint (for the unsealed tail's range).
        self.times: dict[int, str | None] = {}

    def run(self, rows: Iterable[Mapping[Any, Any]]) -> VerifyProblem | None:
        noun, problem = self.noun, self.problem
        expected_seq: int | None = None
        prev = chain.GENESIS
        for row in rows:
            seq = int(row["seq"])
            self.count += 1
            if expected_seq is None:
                # Where the retained chain starts: seq 1, or just after an anchor.
                if seq == 1:
                    expected_seq = 1
                elif seq - 1 in self.anchors:
                    expected_seq, prev = seq, str(self.anchors[seq - 1]["head_hash"])
                else:
                    below = [s for s in self.anchors if s < seq]
                    missing = (max(below) + 1) if below else 1
                    return problem(DELETED, missing,
                                   f"{noun}s {missing}..{seq - 1} are missing and no signed "
                                   "checkpoint covers them")
                self.first_seq = seq
            if seq == self.last_seq:
                return problem(INSERTED, seq, f"two {noun}s have seq {seq}")
            if seq != expected_seq:
                return problem(DELETED, expected_seq,
                               f"{noun} seq {expected_seq} is missing (next is {seq})")
            redacted = self.time_field not in row
            if not redacted and chain.row_hash(self.chain_name, row) != row["row_hash"]:
                return problem(CHANGED, seq, f"{noun} seq {seq} was changed: its hash does "
                               "not match its fields")
            if row["prev_hash"] != prev:
                return problem(INSERTED, seq,
                               f"{noun} seq {seq} is not linked to the {noun} before it "
                               "(prev_hash mismatch): it was inserted, or the rows before it "
                               "were replaced")
            for c in self.signed.get(seq, ()):
                if c["head_hash"] != row["row_hash"]:
                    return problem(CHANGED, seq,
                                   f"{noun}s up to seq {seq} differ from what the "
                                   f"{c.get('kind')} checkpoint signed at {c.get('signed_at')}: "
                                   "they were rewritten")
            when = None if redacted else row.get(self.time_field)
            if seq - 1 in self.signed or seq == self.first_seq:
                self.times[seq - 1] = when  # the first row after a checkpoint
            prev = str(row["row_hash"])
            self.last_seq, self.last_time = seq, when
            expected_seq = seq + 1
        for c in self.signed.get(0, ()):
            if c["head_hash"] != chain.GENESIS:
                return problem(CHANGED, 0, f"the {c.get('kind')} checkpoint at seq 0 signs "
                               "a head other than the empty chain's")
        if self.top > self.last_seq and not (self.last_seq == 0 and self.top in self.anchors):
            start = self.last_seq + 1
            if self.last_seq == 0:
                below = [s for s in self.anchors if s < self.top]
                start = (max(below) + 1) if below else 1
            return problem(DELETED, start,
                           f"{noun}s {start}..{self.top} were signed by a checkpoint but "
                           "are gone")
        return None


def witness_key(cp: Mapping[str, Any]) -> tuple[str, str, int, str]:
    """How a witnessed checkpoint is found in the store: chain, node, seq, signature."""
    return (str(cp.get("chain")), str(cp.get("node_id")), int(cp.get("seq") or 0),
            str(cp.get("signature")))


def check_witnessed(witnessed: Iterable[Mapping[str, Any]],
                    stored: Iterable[Mapping[str, Any]], public_key: Ed25519PublicKey | None,
                    source: str) -> list[VerifyProblem]:
    """Compare the checkpoints a witness holds with the store's.

    Each witnessed checkpoint (with a good signature, when a key is given)
    must be in the store with the same fields. One that is missing means the
    store lost it: its rows were rolled back past it, or its node was
    deleted. Returns one problem per node and chain: the lowest seq missing
    or differing. A witnessed checkpoint whose signature does not verify is
    reported as ``bad_signature`` (the witness copy itself was forged).
    """
    by_key: dict[tuple[str, str, int, str], Mapping[str, Any]] = {
        witness_key(c): c for c in stored}
    first: dict[tuple[str, str], VerifyProblem] = {}

    def note(p: VerifyProblem) -> None:
        key = (p.chain, p.node_id)
        if key not in first or p.seq < first[key].seq:
            first[key] = p

    for w in witnessed:
        chain_name, node_id, seq, _ = witness_key(w)
        if public_key is not None and not chain.checkpoint_signature_ok(public_key, w):
            note(VerifyProblem(BAD_SIGNATURE, chain_name, node_id, seq,
                               f"node {node_id!r}: witness {source} holds a checkpoint at seq "
                               f"{seq} whose signature does not verify: the witness copy "
                               "was altered"))
            continue
        found = by_key.get(witness_key(w))
        if found is None:
            note(VerifyProblem(WITNESS_MISSING, chain_name, node_id, seq,
                               f"node {node_id!r}: the {w.get('kind')} checkpoint at seq {seq} "
                               f"(signed at {w.get('signed_at')}) that witness {source} holds "
                               "is not in the store: the log was rolled back past it, or the "
                               "node's rows and checkpoints were deleted"))
        elif any(found.get(f) != w.get(f) for f in chain.CHECKPOINT_FIELDS):
            note(VerifyProblem(WITNESS_DIFFERS, chain_name, node_id, seq,
                               f"node {node_id!r}: the checkpoint at seq {seq} differs from "
                               f"the copy witness {source} holds"))
    return sorted(first.values(), key=lambda p: (p.chain, p.node_id, p.seq))
