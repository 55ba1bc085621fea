"""The hash chain and the checkpoint signatures (SPEC §5, "Tamper evident").

Everything here is pure: no database, no I/O. docs/audit.md describes the
same scheme for a reviewer who wants to verify a log without wsgate; keep the
two in step.

Row hash::

    row_hash = hex(SHA-256(canonical({field: value for field in FIELDS} + prev_hash)))

where ``canonical`` is JSON with sorted keys, no whitespace, UTF-8, non-ASCII
characters written as themselves, ``null`` for a missing value, integers as
JSON numbers. The first row of a node's chain has ``prev_hash = GENESIS``.

Checkpoint signature: Ed25519 over ``canonical(checkpoint fields)``. Each
chained checkpoint also names the hash of the node's previous one
(``prev_hash``) and the signing policy it was made under, so checkpoints form
a chain of their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import json.encoder
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

#: prev_hash of the first row of every chain.
GENESIS = "0" * 64

#: The two chains each node keeps: subscription rows and ingested events.
CHAIN_ROWS = "rows"
CHAIN_EVENTS = "events"

#: Fields of an audit_rows row covered by its hash, in the order docs/audit.md lists them.
ROW_FIELDS: tuple[str, ...] = (
    "seq", "occurred_at", "node_id", "connection_id", "action", "topic", "outcome",
    "code", "kind", "subject", "customer_id", "agent_id", "authenticator",
    "remote_addr", "origin", "user_agent", "prev_hash",
)

#: Fields of an audit_events row covered by its hash. ``topics`` is hashed as a JSON list.
EVENT_FIELDS: tuple[str, ...] = (
    "seq", "published_at", "node_id", "event_id", "type", "topics",
    "ingest_key_id", "payload_sha256", "prev_hash",
)

#: Fields of a checkpoint covered by its signature: a chained checkpoint (one
#: with a ``prev_hash``) signs all of them; an unchained one (``prune``, and
#: those written before checkpoints chained) signs the first seven.
CHECKPOINT_FIELDS: tuple[str, ...] = (
    "chain", "node_id", "seq", "head_hash", "signed_at", "kind", "key_id",
    "prev_hash", "policy",
)
UNCHAINED_CHECKPOINT_FIELDS = CHECKPOINT_FIELDS[:7]

CHAIN_FIELDS = {CHAIN_ROWS: ROW_FIELDS, CHAIN_EVENTS: EVENT_FIELDS}

#: Longest stored text: valid topics are at most 512 bytes; rejected ones may be anything,
#: and an indexed column must stay under PostgreSQL's btree limit (2704 bytes) in UTF-8.
MAX_TEXT = 600


def format_time(when: datetime) -> str:
    """The one text form of a timestamp in the log: ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC).

    Stored as text so SQLite and PostgreSQL hold, sort and hash the same bytes.

    Raises:
        ValueError: ``when`` is naive (a time without a zone is ambiguous in a log).
    """
    if when.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    # %-formatting the fields is twice as fast as isoformat and several times
    # faster than strftime, and this runs for every row.
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 (faster than f-strings)
        when.year, when.month, when.day, when.hour, when.minute, when.second, when.microsecond)


def parse_stored_time(text: str) -> datetime:
    """Inverse of :func:`format_time`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def clean_text(value: str | None, limit: int = MAX_TEXT) -> str | None:
    """Make client-supplied text storable everywhere, the same way on every backend.

    PostgreSQL refuses NUL characters and no UTF-8 codec accepts lone
    surrogates (a client can send both inside JSON); one such row must not
    fail the whole group commit. NUL becomes U+FFFD, a surrogate ``?``, and
    text longer than ``limit`` characters is cut and ends with ``...``.
    """
    if value is None:
        return None
    if len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the common case, kept cheap: this runs for every field of every row
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return value


# One encoder for every call: json.dumps with options builds a new one each time,
# which costs more than the encoding itself at thousands of rows per second.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


_encode_str = json.encoder.encode_basestring


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of a mapping: sorted keys, no spaces, UTF-8."""
    return _ENCODER.encode(obj).encode("utf-8")


# Each chain's fields in sorted order, with their JSON key prefixes, for _canonical_row.
_SORTED = {name: [(f, ("{" if i == 0 else ",") + json.dumps(f) + ":")
                  for i, f in enumerate(sorted(fields))]
           for name, fields in CHAIN_FIELDS.items()}


def _canonical_row(chain: str, row: Mapping[str, Any]) -> str:
    """canonical() of the chain's fields of row, built directly (3-4x faster).

    Produces exactly the text of ``canonical({f: row[f] for f in fields})``
    (a test checks it); values other than str, int and None go through the
    general encoder.
    """
    return "".join([prefix + _json_text(row.get(name))
                    for name, prefix in _SORTED[chain]]) + "}"


def _json_text(value: Any) -> str:
    """The canonical JSON text of one field value (as _canonical_row writes it)."""
    if type(value) is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return _ENCODER.encode(value)


class RowTemplate:
    """The canonical text of a chain's rows that share some field values, as a template.

    The writer hashes thousands of rows a second whose fields are mostly those of
    their connection. A template holds the JSON of those fixed fields once;
    :meth:`hash` fills in the others. ``template.hash(row)`` equals
    ``row_hash(chain, row)`` for every row whose fixed fields have the values given
    here (a test checks it).

    Args:
        chain: CHAIN_ROWS or CHAIN_EVENTS.
        fixed: field -> value of the fields every row hashed with this template has.
    """

    __slots__ = ("varying", "_text")

    def __init__(self, chain: str, fixed: Mapping[str, Any]) -> None:
        varying = []
        parts = []
        for name, prefix in _SORTED[chain]:
            if name in fixed:
                parts.append((prefix + _json_text(fixed[name])).replace("%", "%%"))
            else:
                varying.append(name)
                parts.append(prefix.replace("%", "%%") + "%s")
        #: The fields hash() reads from a row, in the order they appear in the text.
        self.varying: tuple[str, ...] = tuple(varying)
        self._text = "".join(parts) + "}"

    def hash(self, row: Mapping[str, Any]) -> str:
        """The row's hex SHA-256, as row_hash computes it."""
        text = self._text % tuple([_json_text(row[name]) for name in self.varying])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The events chain's fields in the order their canonical text has them (sorted);
# EventTemplate writes that text by hand, so it checks the order at import.
_EVENT_TEXT_ORDER = ("event_id", "ingest_key_id", "node_id", "payload_sha256", "prev_hash",
                     "published_at", "seq", "topics", "type")
if tuple(name for name, _ in _SORTED[CHAIN_EVENTS]) != _EVENT_TEXT_ORDER:
    raise RuntimeError("EventTemplate is out of step with EVENT_FIELDS")


class EventTemplate:
    """The canonical text of one node's events rows, as a template (cf. RowTemplate).

    The writer hashes every ingested event. Its rows hold ``topics`` as the stored
    JSON text, which :func:`encode_topics` makes canonical, so the text goes into
    the hashed document as it is (row_hash decodes and re-encodes it).
    ``template.hash(row)`` equals ``row_hash(CHAIN_EVENTS, row)`` for every row of
    this node whose ``topics`` is ``encode_topics`` of its list (a test checks it).

    Args:
        node_id: the node whose rows this template hashes.
    """

    __slots__ = ("_text",)

    def __init__(self, node_id: str) -> None:
        parts = []
        for name, prefix in _SORTED[CHAIN_EVENTS]:
            if name == "node_id":
                parts.append((prefix + _json_text(node_id)).replace("%", "%%"))
            else:
                parts.append(prefix.replace("%", "%%") + "%s")
        self._text = "".join(parts) + "}"

    def hash(self, row: Mapping[str, Any]) -> str:
        """The row's hex SHA-256, as row_hash computes it."""
        enc = _encode_str
        seq, topics = row["seq"], row["topics"]
        try:
            if type(seq) is not int or type(topics) is not str:
                raise TypeError
            text = self._text % (
                enc(row["event_id"]), enc(row["ingest_key_id"]), enc(row["payload_sha256"]),
                enc(row["prev_hash"]), enc(row["published_at"]), seq, topics,
                enc(row["type"]))
        except TypeError:  # a value that is not text (None): the general encoder
            return row_hash(CHAIN_EVENTS, row)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def row_hash(chain: str, row: Mapping[str, Any]) -> str:
    """The hex SHA-256 of a row of ``chain`` (its fields include prev_hash).

    For the events chain, ``row["topics"]`` may be the stored JSON text or a list.
    """
    if chain == CHAIN_EVENTS and isinstance(row.get("topics"), str):
        row = dict(row, topics=json.loads(row["topics"]))
    return hashlib.sha256(_canonical_row(chain, row).encode("utf-8")).hexdigest()


def encode_topics(topics: Sequence[str]) -> str:
    """The stored JSON text of an event's topic list (canonical, so it hashes the same).

    Exactly ``json.dumps(list(topics), separators=(",", ":"), ensure_ascii=False)``,
    written directly for a list of str (a test checks it): this runs for every event.
    """
    try:
        return "[" + ",".join([_encode_str(t) for t in topics]) + "]"
    except TypeError:  # an item that is not a str
        return json.dumps(list(topics), separators=(",", ":"), ensure_ascii=False)


# --- signing -------------------------------------------------------------------------

class SigningKeyError(ValueError):
    """A signing or verify key that cannot be used; the message says why."""


def load_private_key(pem: str | bytes) -> Ed25519PrivateKey:
    """Read an Ed25519 private key in PEM (PKCS#8), unencrypted.

    Raises:
        SigningKeyError: not PEM, encrypted, or not an Ed25519 key.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key must be Ed25519, not {type(key).__name__}")
    return key


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Read an Ed25519 public key in PEM (SubjectPublicKeyInfo).

    Raises:
        SigningKeyError: not PEM or not an Ed25519 key.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"the verify key must be Ed25519, not {type(key).__name__}")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    """The PEM text of a public key (what verify_key_file holds)."""
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def private_pem(private: Ed25519PrivateKey) -> str:
    """The PEM text of a private key (what signing_key / signing_key_file hold)."""
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def checkpoint_doc(checkpoint: Mapping[str, Any]) -> bytes:
    """The canonical bytes a checkpoint's signature and hash cover.

    A chained checkpoint (``prev_hash`` set) covers every CHECKPOINT_FIELDS
    field; an unchained one the UNCHAINED_CHECKPOINT_FIELDS. Nulling a chained
    checkpoint's ``prev_hash`` therefore breaks its signature.
    """
    fields = (CHECKPOINT_FIELDS if checkpoint.get("prev_hash") is not None
              else UNCHAINED_CHECKPOINT_FIELDS)
    return canonical({f: checkpoint.get(f) for f in fields})


def checkpoint_hash(checkpoint: Mapping[str, Any]) -> str:
    """The hex SHA-256 of :func:`checkpoint_doc`: what the node's next checkpoint
    names as its ``prev_hash``."""
    return hashlib.sha256(checkpoint_doc(checkpoint)).hexdigest()


def sign_checkpoint(private: Ed25519PrivateKey, checkpoint: Mapping[str, Any]) -> str:
    """Base64 Ed25519 signature over :func:`checkpoint_doc`."""
    return base64.b64encode(private.sign(checkpoint_doc(checkpoint))).decode()


def checkpoint_signature_ok(public: Ed25519PublicKey, checkpoint: Mapping[str, Any]) -> bool:
    """True when ``checkpoint["signature"]`` signs its fields under ``public``."""
    try:
        sig = base64.b64decode(str(checkpoint.get("signature") or ""), validate=True)
        public.verify(sig, checkpoint_doc(checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return True


# --- checkpoint policy -------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """When a node signs: the rules a chained checkpoint states it was signed under.

    ``every``: the node signs when this many rows follow its last checkpoint;
    ``interval``: ...or when rows have stayed unsealed this many seconds;
    ``slack``: rows a checkpoint may lag behind ``every`` (0: wsgate signs at
    the exact row). So two consecutive checkpoints of a node and chain are at
    most ``every + slack`` rows apart, and so is the unsealed tail, crash or not.
    """

    every: int
    interval: float
    slack: int = 0

    def text(self) -> str:
        """The canonical JSON text stored (and signed) in a checkpoint's ``policy``."""
        return canonical({"checkpoint_every": self.every,
                          "checkpoint_interval": self.interval,
                          "slack": self.slack}).decode()

    @property
    def max_gap(self) -> int:
        """The most rows allowed between two checkpoints, and in the unsealed tail."""
        return self.every + self.slack

    @classmethod
    def parse(cls, text: str | None) -> Policy | None:
        """The policy of a stored ``policy`` text; None when absent or malformed."""
        if not text:
            return None
        try:
            doc = json.loads(text)
            every, interval, slack = (doc["checkpoint_every"], doc["checkpoint_interval"],
                                      doc["slack"])
        except (ValueError, TypeError, KeyError):
            return None
        if (type(every) is not int or type(slack) is not int or every < 1 or slack < 0
                or type(interval) not in (int, float) or interval < 0):
            return None
        return cls(every, float(interval), slack)
