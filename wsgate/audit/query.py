"""Reading the audit log: filters, streaming queries, pages, exports, recipients.

Used by ``wsgate audit`` (directly) and by the HTTP API (through the async
wrappers of :class:`AuditReader`, which run in a thread so the event loop
never waits on the database).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, and_, case, exists, func, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from wsgate.audit import chain, store
from wsgate.audit.orm import EVENTS, ROWS, AuditRow
from wsgate.audit.records import ACCEPTED, REJECTED, RENEW, SUBSCRIBE, UNSUBSCRIBE
from wsgate.audit.witness import read_witness, redact_url
from wsgate.config import AuditConfig
from wsgate.errors import (
    END_DISCONNECT,
    END_EXPIRED,
    END_REVOKED,
    END_SHUTDOWN,
    END_SLOW_CONSUMER,
    END_UNCLEAN_SHUTDOWN,
)
from wsgate.topics import matches

#: The fields of a row as the CLI and the HTTP API show them, in this order (SPEC §7).
FIELDS: tuple[str, ...] = (
    "seq", "occurred_at", "node_id", "connection_id", "action", "topic", "outcome", "code",
    "kind", "subject", "customer_id", "agent_id", "authenticator", "remote_addr", "origin",
    "user_agent",
)
FORMATS = ("table", "csv", "jsonl")
OUTCOMES = (ACCEPTED, REJECTED)
ACTIONS = (SUBSCRIBE, UNSUBSCRIBE, RENEW)
MAX_PAGE = 1000
DEFAULT_PAGE = 100
#: The most hours one overview covers (the latest ones: twelve weeks).
MAX_HOURS = 2016
#: How many principals the overview ranks by refusals.
TOP_REFUSED = 10
#: The codes of an accepted unsubscribe that say the connection itself ended (SPEC §5).
CONNECTION_ENDS = frozenset({END_DISCONNECT, END_EXPIRED, END_REVOKED, END_SLOW_CONSUMER,
                             END_SHUTDOWN, END_UNCLEAN_SHUTDOWN})


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the filter and the fix."""


#: The longest time text taken (``2024-05-01T12:00:00.123456+02:00`` is 32).
MAX_TIME_TEXT = 64


def _shown(value: str, most: int = 40) -> str:
    """A value as an error message quotes it: repr, cut to ``most`` characters."""
    return repr(value if len(value) <= most else value[:most] + "...")


def parse_time(value: str, name: str = "time") -> datetime:
    """Parse an ISO 8601 time or date into an aware UTC datetime.

    ``2024-05-01``, ``2024-05-01T12:00``, ``2024-05-01T12:00:00.5Z`` and
    ``...+02:00`` are accepted; a time without a zone is taken as UTC. Only
    printable ASCII is taken, and the time must lie in years 1 to 9999 once
    converted to UTC (``9999-12-31T23:59:59-23:59`` does not).

    Raises:
        FilterError: not ISO 8601, or out of range; the message names ``name``.
    """
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        # fromisoformat takes a trailing NUL; nothing here is sent that way.
        if len(text) > MAX_TIME_TEXT or not (text.isascii() and text.isprintable()):
            raise ValueError
        when = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{name}: {_shown(value)} is not an ISO 8601 time (for example 2024-05-01 or "
            "2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise FilterError(
            f"{name}: {_shown(value)} is out of range: in UTC it must fall in the years "
            "1 to 9999") from None


def parse_count(value: str, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` written in ASCII digits (``0005`` is 5).

    Not ``int()`` alone: it also takes ``+5``, `` 5``, ``5_0`` and other
    scripts' digits (``\u0665``).

    Raises:
        FilterError: anything else; the message names ``name``.
    """
    most = len(str(high))
    if re.fullmatch(rf"[0-9]{{1,{most}}}", value) is None or not low <= int(value) <= high:
        raise FilterError(f"{name}: must be a whole number from {low} to {high} in ASCII digits")
    return int(value)


def check_text(name: str, value: str) -> None:
    """A text filter must be something a stored value can equal.

    Stored text never holds NUL (``chain.clean_text``) nor is longer than
    ``chain.MAX_TEXT``; PostgreSQL refuses NUL in a parameter, and a lone
    surrogate (from a command line that was not UTF-8) cannot be sent at all.

    Raises:
        FilterError: NUL, too long, or not UTF-8; the message names ``name``.
    """
    if "\x00" in value:
        raise FilterError(f"{name}: must not contain NUL")
    if len(value) > chain.MAX_TEXT:
        raise FilterError(f"{name}: at most {chain.MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FilterError(f"{name}: not valid UTF-8") from None


@dataclass(frozen=True)
class AuditFilter:
    """Which rows to return. Every given filter must hold (AND); None means any.

    ``topic_prefix`` matches by whole segments: ``customer_id:C:call``
    matches ``customer_id:C:call`` and ``customer_id:C:call:X``, not
    ``customer_id:C:callback``. ``since`` is inclusive, ``until`` exclusive.
    ``action`` and ``code`` match exactly (the overview's bars link to them).
    """

    customer: str | None = None
    agent: str | None = None
    subject: str | None = None
    topic_prefix: str | None = None
    connection: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: Rows of these customers only (a scoped review key's), on top of the rest.
    customers: frozenset[str] | None = None
    action: str | None = None
    code: str | None = None

    @classmethod
    def parse(cls, customer: str | None = None, agent: str | None = None,
              subject: str | None = None, topic_prefix: str | None = None,
              connection: str | None = None, outcome: str | None = None,
              since: str | None = None, until: str | None = None,
              action: str | None = None, code: str | None = None) -> AuditFilter:
        """Build a filter from text (command-line flags, query parameters).

        Raises:
            FilterError: a bad outcome, action or time; the message names the filter.
        """
        texts = {"customer": customer, "agent": agent, "subject": subject,
                 "topic_prefix": topic_prefix, "connection": connection, "code": code}
        for name, value in texts.items():
            if value:
                check_text(name, value)
        if outcome is not None and outcome not in OUTCOMES:
            raise FilterError(f"outcome: must be accepted or rejected, not {_shown(outcome)}")
        if action is not None and action not in ACTIONS:
            raise FilterError(f"action: must be one of {', '.join(ACTIONS)}, not "
                              f"{_shown(action)}")
        start = parse_time(since, "since") if since else None
        end = parse_time(until, "until") if until else None
        if start and end and end <= start:
            raise FilterError("until must be later than since")
        return cls(customer or None, agent or None, subject or None, topic_prefix or None,
                   connection or None, outcome, start, end, action=action or None,
                   code=code or None)

    def where(self) -> list[ColumnElement[bool]]:
        """The SQL conditions of this filter on audit_rows."""
        t = ROWS.c
        out: list[ColumnElement[bool]] = []
        if self.customer:
            out.append(t.customer_id == self.customer)
        if self.customers is not None:
            out.append(t.customer_id.in_(sorted(self.customers)))
        if self.agent:
            out.append(t.agent_id == self.agent)
        if self.subject:
            out.append(t.subject == self.subject)
        if self.connection:
            out.append(t.connection_id == self.connection)
        if self.outcome:
            out.append(t.outcome == self.outcome)
        if self.action:
            out.append(t.action == self.action)
        if self.code:
            out.append(t.code == self.code)
        if self.topic_prefix:
            prefix = self.topic_prefix.rstrip(":")
            out.append(or_(t.topic == prefix, t.topic.startswith(prefix + ":", autoescape=True)))
        if self.since:
            out.append(t.occurred_at >= chain.format_time(self.since))
        if self.until:
            out.append(t.occurred_at < chain.format_time(self.until))
        return out


@dataclass(frozen=True)
class Recipient:
    """A connection whose accepted subscription matched an event when it was published."""

    node_id: str
    connection_id: str
    subscription: str
    event_topic: str
    subscribed_seq: int
    subscribed_at: str
    kind: str
    subject: str
    customer_id: str | None
    agent_id: str | None
    authenticator: str
    remote_addr: str


RECIPIENT_FIELDS = tuple(Recipient.__dataclass_fields__)


@dataclass(frozen=True)
class EventInfo:
    """A recorded event, as ``recipients`` found it."""

    event_id: str
    type: str
    topics: tuple[str, ...]
    published_at: str
    node_id: str
    payload_sha256: str = ""

    def customers(self) -> frozenset[str]:
        """The customers whose ``customer_id:<C>`` topics the event was published on."""
        return frozenset(t.split(":")[1] for t in self.topics
                         if t.startswith("customer_id:") and t.count(":") >= 1)


def _cursor_encode(occurred_at: str, row_id: int) -> str:
    raw = json.dumps([occurred_at, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: The range of the id column (BigInteger, and SQLite's INTEGER): 64-bit signed.
ID_MIN, ID_MAX = -(2 ** 63), 2 ** 63 - 1
#: Longer than any cursor this API returns (about 60 characters).
MAX_CURSOR = 200


def _cursor_decode(cursor: str) -> tuple[str, int]:
    """The (occurred_at, id) of a cursor from :func:`_cursor_encode`.

    Raises:
        FilterError: anything else: not base64 JSON ``[time, id]``, an id outside
            the column's 64-bit range, or a time not in the stored form.
    """
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        occurred_at, row_id = json.loads(raw)
        # bool is an int to Python, and a number past 64 bits overflows the column.
        if (not isinstance(occurred_at, str) or type(row_id) is not int
                or not ID_MIN <= row_id <= ID_MAX):
            raise ValueError
        if chain.format_time(chain.parse_stored_time(occurred_at)) != occurred_at:
            raise ValueError
    except (ValueError, TypeError, RecursionError):
        raise FilterError("cursor: not a cursor this API returned") from None
    return occurred_at, row_id


class AuditReader:
    """Read side of the audit store.

    Args:
        engine: a SQLAlchemy engine on the audit store (``store.make_engine``).
        public_key: the key checkpoints are verified with, or None.

    The sync methods block; the ``a``-prefixed ones run them in a thread.
    """

    def __init__(self, engine: Engine, public_key: Ed25519PublicKey | None = None,
                 witnesses: Sequence[str] = ()) -> None:
        self.engine = engine
        self.public_key = public_key
        #: The witnesses verify compares with by default: the config's file witnesses.
        self.witnesses = tuple(witnesses)

    @classmethod
    def from_config(cls, config: AuditConfig) -> AuditReader:
        """A reader on the configured store, with the configured verify key.

        Raises:
            AuditStoreError: a configured key cannot be read.
        """
        key = store.verify_key(config)
        return cls(store.make_engine(config.url), key,
                   [w for w in config.witness if w.startswith("file://")])

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    # --- rows -------------------------------------------------------------------------

    def rows(self, flt: AuditFilter, *, after: str | None = None,
             limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Matching rows, oldest first (by occurred_at, then insertion order), streamed.

        Rows are fetched in batches with a server-side cursor where the driver
        has one, so a million rows use little memory. ``after`` is a cursor
        from :meth:`page`.
        """
        t = ROWS.c
        conds = flt.where()
        if after is not None:
            at, row_id = _cursor_decode(after)
            conds.append(or_(t.occurred_at > at, and_(t.occurred_at == at, t.id > row_id)))
        stmt = select(ROWS.c.id, *(t[f] for f in FIELDS)).where(*conds).order_by(
            t.occurred_at, t.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            # Closed explicitly: a consumer that stops early must not leak the cursor.
            with conn.execution_options(yield_per=1000).execute(stmt) as result:
                for r in result:
                    yield dict(r._mapping)

    def page(self, flt: AuditFilter, cursor: str | None = None,
             limit: int = DEFAULT_PAGE) -> dict[str, Any]:
        """One page for the HTTP API: ``{"rows": [...], "next_cursor": str | None}``.

        ``next_cursor`` is None on the last page.
        """
        limit = max(1, min(limit, MAX_PAGE))
        got = list(self.rows(flt, after=cursor, limit=limit + 1))
        more = len(got) > limit
        got = got[:limit]
        next_cursor = _cursor_encode(got[-1]["occurred_at"], got[-1]["id"]) if more else None
        return {"rows": [public_row(r) for r in got], "next_cursor": next_cursor}

    async def apage(self, flt: AuditFilter, cursor: str | None = None,
                    limit: int = DEFAULT_PAGE) -> dict[str, Any]:
        """:meth:`page` in a worker thread."""
        return await asyncio.to_thread(self.page, flt, cursor, limit)

    # --- verify ----------------------------------------------------------------------

    def verify(self, witnesses: Sequence[str] | None = None) -> store.VerifyResult:
        """``store.verify`` with this reader's key, compared with these witnesses
        (paths or URLs; default: the reader's own).

        Raises:
            WitnessError: a witness cannot be read, or holds a malformed line.
        """
        sources = self.witnesses if witnesses is None else witnesses
        held = [(redact_url(source), read_witness(source)) for source in sources]
        return store.verify(self.engine, self.public_key, held)

    async def averify(self) -> store.VerifyResult:
        """:meth:`verify` in a worker thread."""
        return await asyncio.to_thread(self.verify)

    # --- recipients ------------------------------------------------------------------

    def event(self, event_id: str) -> EventInfo | None:
        """The recorded event with this id (the earliest, if recorded twice), or None."""
        e = EVENTS.c
        with self.engine.connect() as conn:
            r = conn.execute(select(EVENTS).where(e.event_id == event_id)
                             .order_by(e.published_at, e.id).limit(1)).first()
        if r is None:
            return None
        return EventInfo(r.event_id, r.type, tuple(json.loads(r.topics)), r.published_at,
                         r.node_id, r.payload_sha256)

    def recipients(self, ev: EventInfo) -> list[Recipient]:
        """Who could see this event: every connection, on any node, whose accepted
        subscription matched one of its topics (SPEC §1 rule) when it was
        published, i.e. subscribed at or before ``published_at`` with no
        accepted end of that subscription (same connection and topic) by then.

        Clocks of different nodes are compared as they are: keep them in sync.
        """
        s = ROWS
        end = aliased(AuditRow)
        ended = exists().where(and_(
            end.node_id == s.c.node_id, end.connection_id == s.c.connection_id,
            end.topic == s.c.topic, end.action == UNSUBSCRIBE, end.outcome == ACCEPTED,
            end.seq > s.c.seq, end.occurred_at <= ev.published_at))
        parsed = [tuple(t.split(":")) for t in ev.topics]
        scopes = sorted({":".join(t[:2]) for t in parsed})
        found: dict[tuple[str, str, str], Recipient] = {}
        with self.engine.connect() as conn:
            for scope in scopes:
                stmt = select(s).where(
                    s.c.action == SUBSCRIBE, s.c.outcome == ACCEPTED,
                    s.c.occurred_at <= ev.published_at,
                    or_(s.c.topic == scope, s.c.topic.startswith(scope + ":", autoescape=True)),
                    ~ended).order_by(s.c.occurred_at, s.c.id)
                result = conn.execution_options(yield_per=1000).execute(stmt)
                for r in result:
                    sub = tuple(r.topic.split(":"))
                    hit = next((":".join(t) for t in parsed if matches(sub, t)), None)
                    key = (r.node_id, r.connection_id, r.topic)
                    if hit is None or key in found:
                        continue
                    found[key] = Recipient(
                        r.node_id, r.connection_id, r.topic, hit, r.seq, r.occurred_at, r.kind,
                        r.subject, r.customer_id, r.agent_id, r.authenticator, r.remote_addr)
        return list(found.values())

    # --- review page: overview and connection timeline --------------------------------

    def summary(self, flt: AuditFilter) -> dict[str, Any]:
        """Counts of the rows matching ``flt`` for the review page's overview, each
        computed in SQL (GROUP BY), on SQLite and PostgreSQL alike.

        A *subscribe* is an accepted subscribe row, a *refusal* a rejected
        subscribe row. Answers ``{"rows", "subscribes", "refusals", "hours",
        "hours_truncated", "top_refused", "refusals_by_code"}``: ``hours`` runs
        from the first to the last hour (UTC) with a matching row, gaps as
        zeros, at most :data:`MAX_HOURS` (the latest; then ``hours_truncated``),
        each with the ``since``/``until`` that select its rows (the hour,
        clipped to the filter's own range); ``top_refused`` holds the
        :data:`TOP_REFUSED` principals (subject and customer) with the most
        refusals, most first; ``refusals_by_code`` every code, most first.
        """
        t = ROWS.c
        conds = flt.where()
        hour = func.substr(t.occurred_at, 1, 13)
        subscribed = and_(t.action == SUBSCRIBE, t.outcome == ACCEPTED)
        refused = and_(t.action == SUBSCRIBE, t.outcome == REJECTED)

        def tally(cond: ColumnElement[bool]) -> Any:
            return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

        with self.engine.connect() as conn:
            total, subs, refs = conn.execute(
                select(func.count(), tally(subscribed), tally(refused)).where(*conds)).one()
            by_hour = conn.execute(
                select(hour, tally(subscribed), tally(refused)).where(*conds)
                .group_by(hour).order_by(hour.desc()).limit(MAX_HOURS + 1)).all()
            count = func.count().label("refusals")
            principals = conn.execute(
                select(t.subject, t.customer_id, count).where(*conds, refused)
                .group_by(t.subject, t.customer_id)
                .order_by(count.desc(), t.subject, t.customer_id).limit(TOP_REFUSED)).all()
            count = func.count().label("refusals")
            codes = conn.execute(
                select(t.code, count).where(*conds, refused)
                .group_by(t.code).order_by(count.desc(), t.code)).all()
        counted = {h: (int(s), int(r)) for h, s, r in by_hour}
        hours: list[dict[str, Any]] = []
        if counted:
            last = datetime.fromisoformat(max(counted) + ":00:00+00:00")
            first = datetime.fromisoformat(min(counted) + ":00:00+00:00")
            first = max(first, last - timedelta(hours=MAX_HOURS - 1))
            at = first
            while at <= last:
                key = at.strftime("%Y-%m-%dT%H")
                s, r = counted.get(key, (0, 0))
                start = max(at, flt.since) if flt.since else at
                stop = at + timedelta(hours=1)
                stop = min(stop, flt.until) if flt.until else stop
                hours.append({"hour": key + ":00:00Z", "since": chain.format_time(start),
                              "until": chain.format_time(stop), "subscribes": s,
                              "refusals": r})
                at += timedelta(hours=1)
        return {
            "rows": int(total), "subscribes": int(subs), "refusals": int(refs),
            "hours": hours,
            "hours_truncated": len(by_hour) > MAX_HOURS or (
                bool(counted) and min(counted) + ":00:00Z" < hours[0]["hour"]),
            "top_refused": [{"subject": subj, "customer_id": cust or None, "refusals": int(n)}
                            for subj, cust, n in principals],
            "refusals_by_code": [{"code": code or None, "refusals": int(n)}
                                 for code, n in codes],
        }

    async def asummary(self, flt: AuditFilter) -> dict[str, Any]:
        """:meth:`summary` in a worker thread."""
        return await asyncio.to_thread(self.summary, flt)

    def timeline(self, connection_id: str, customers: frozenset[str] | None = None,
                 cursor: str | None = None, limit: int = MAX_PAGE) -> dict[str, Any] | None:
        """One connection from its first row to its last, or None when no row of it
        (of ``customers``, when given) is recorded.

        Answers ``{"connection_id", "nodes", "principal", "remote_addr",
        "origin", "user_agent", "first_at", "last_at", "counts", "end",
        "rows", "next_cursor"}``: ``principal`` (kind, subject, customer_id,
        agent_id, authenticator), address, origin and user agent are those of its
        first row; ``counts`` the rows by action and outcome; ``end`` the
        ``{"at", "code"}`` of the row that closed it (an accepted unsubscribe
        with a connection end reason, or a renew refused as ``revoked``), or
        None: still open, or closed while holding no subscription (nothing is
        recorded then). ``rows`` is one page of its rows, oldest first, as
        :meth:`page` gives them.
        """
        flt = AuditFilter(connection=connection_id, customers=customers)
        t = ROWS.c
        conds = flt.where()
        order = (t.occurred_at, t.id)
        with self.engine.connect() as conn:
            first = conn.execute(select(ROWS).where(*conds).order_by(*order).limit(1)).first()
            if first is None:
                return None
            last = conn.execute(select(ROWS).where(*conds)
                                .order_by(t.occurred_at.desc(), t.id.desc()).limit(1)).one()
            counts = conn.execute(select(t.action, t.outcome, func.count()).where(*conds)
                                  .group_by(t.action, t.outcome)).all()
            nodes = conn.execute(select(t.node_id).where(*conds).distinct()
                                 .order_by(t.node_id)).scalars().all()
        ended = (last.action == UNSUBSCRIBE and last.outcome == ACCEPTED
                 and last.code in CONNECTION_ENDS) or (
            last.action == RENEW and last.outcome == REJECTED and last.code == END_REVOKED)
        head = public_row(first._asdict())
        return {
            "connection_id": first.connection_id,
            "nodes": list(nodes),
            "principal": {k: head[k] for k in ("kind", "subject", "customer_id", "agent_id",
                                               "authenticator")},
            "remote_addr": head["remote_addr"], "origin": head["origin"],
            "user_agent": head["user_agent"],
            "first_at": first.occurred_at, "last_at": last.occurred_at,
            "counts": [{"action": a, "outcome": o, "rows": int(n)}
                       for a, o, n in sorted(counts)],
            "end": {"at": last.occurred_at, "code": last.code} if ended else None,
            **self.page(flt, cursor, limit),
        }

    async def atimeline(self, connection_id: str, customers: frozenset[str] | None = None,
                        cursor: str | None = None,
                        limit: int = MAX_PAGE) -> dict[str, Any] | None:
        """:meth:`timeline` in a worker thread."""
        return await asyncio.to_thread(self.timeline, connection_id, customers, cursor, limit)

    async def arecipients(self, event_id: str) -> tuple[EventInfo, list[Recipient]] | None:
        """:meth:`event` and its :meth:`recipients` in a worker thread; None: no such event."""
        def both() -> tuple[EventInfo, list[Recipient]] | None:
            ev = self.event(event_id)
            return None if ev is None else (ev, self.recipients(ev))
        return await asyncio.to_thread(both)


def public_row(row: dict[str, Any], fields: tuple[str, ...] = FIELDS) -> dict[str, Any]:
    """A row as JSON shows it (the HTTP API, JSON lines): exactly ``fields``, in
    order, with an empty value (NULL or ``""`` in the store) as None.

    Only the output changes: the stored row, and the hash over it, keep ``""``.
    """
    return {f: None if (value := row.get(f)) == "" else value for f in fields}


# --- output formats -------------------------------------------------------------------

_TABLE_SAMPLE = 200
_NUMERIC = {"seq", "subscribed_seq"}
#: First characters that make a spreadsheet read a cell as a formula (OWASP CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, out: IO[str],
               fields: tuple[str, ...] = FIELDS) -> int:
    """Write rows to ``out`` as ``table``, ``csv`` or ``jsonl``; return how many.

    Streams: only a table buffers (its first 200 rows, to size the columns).
    An empty value (NULL or ``""``) is ``null`` in JSON lines, an empty cell in
    CSV and ``-`` in a table. JSON lines carry other values exactly as stored;
    a CSV cell that begins with ``=``, ``+``, ``-``, ``@``, tab or CR gets a
    leading ``'`` so no spreadsheet runs it as a formula.
    """
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(public_row(row, fields), ensure_ascii=False) + "\n")
            count += 1
    elif fmt == "csv":
        # RFC 4180 line ends: the writer quotes a value holding CR or LF only when
        # they are line-end characters, and a bare CR left unquoted starts a new row
        # in spreadsheets (a client could forge rows with a topic).
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv_cell(row.get(f)) for f in fields])
            count += 1
    elif fmt == "table":
        it = iter(rows)
        head: list[dict[str, Any]] = []
        for row in it:
            head.append(row)
            if len(head) >= _TABLE_SAMPLE:
                break
        widths = {f: max([len(f)] + [len(_cell(r.get(f))) for r in head]) for f in fields}

        def line(cells: dict[str, str]) -> str:
            return "  ".join(cells[f].rjust(widths[f]) if f in _NUMERIC
                             else cells[f].ljust(widths[f]) for f in fields).rstrip() + "\n"

        out.write(line({f: f for f in fields}))
        for row in _chain(head, it):
            out.write(line({f: _cell(row.get(f)) for f in fields}))
            count += 1
    else:
        raise FilterError(f"format: must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return count


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        # Client-sent text (a topic, a User-Agent) must not run in the reviewer's
        # spreadsheet; numbers here are never negative, so none is changed.
        return "'" + value
    return value


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    # A control character in a client-sent topic must not garble the terminal.
    return re.sub(r"[\x00-\x1f\x7f]", "?", str(value))


def _chain(first: list[dict[str, Any]], rest: Iterator[dict[str, Any]]
           ) -> Iterator[dict[str, Any]]:
    yield from first
    yield from rest


def recipient_dict(r: Recipient) -> dict[str, Any]:
    """A recipient as a JSON-ready dict."""
    return asdict(r)
