"""``GET /v1.0/audit`` and ``GET /v1.0/audit/verify``: the admin-only audit API (SPEC §5).

Authentication: ``Authorization: Bearer <key>`` with a key of ``[audit]
api_keys`` (compared in constant time). With no key configured the API is
off and answers 404, so an unconfigured server exposes nothing.

``GET /v1.0/audit`` takes the filters of ``wsgate audit query`` as query
parameters (``customer``, ``agent``, ``subject``, ``topic_prefix``,
``connection``, ``outcome``, ``since``, ``until``) plus ``limit`` (default
100, at most 1000) and ``cursor``, and answers
``{"rows": [...], "next_cursor": "<opaque>" | null}``, oldest first, each row
as ``wsgate.audit.query.public_row`` shows it (values as stored, an empty one
as null). Pass ``next_cursor`` back as ``cursor`` for the next page.
Every parameter is taken at most once and checked before the store is asked
(docs/audit.md, "HTTP API"): bad input is a 400 naming it, never a 5xx.

``GET /v1.0/audit/verify`` answers the verify result as JSON (``ok``,
``first``, ``problems``...), status 200 either way.

The review page's views (docs/audit.md, "HTTP API"): ``GET
/v1.0/audit/summary`` (the rows filters; counts per hour, top principals by
refusals, refusals by code), ``GET /v1.0/audit/connections/<id>`` (one
connection's timeline) and ``GET /v1.0/audit/recipients/<event_id>`` (who
could see a recorded event).

A scoped key (``{key = ..., customers = [...]}``, SPEC §6 "Scoped review
keys") sees only rows whose ``customer_id`` is one of its customers: the
filter is forced on every page and on the CSV export; a ``customer`` filter
outside its list is 403 ``forbidden`` (naming no row), and verify, which
reports on the whole log (other customers' rows included), is 403 for it.
The summary counts only its customers' rows; a timeline or an event with
nothing of its customers is 404, exactly as if unknown; an event's other
customers' topics and recipients are left out.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from wsgate.adapters.base import JSONHandler
from wsgate.audit.query import (
    DEFAULT_PAGE,
    MAX_PAGE,
    AuditFilter,
    AuditReader,
    EventInfo,
    FilterError,
    check_text,
    parse_count,
    recipient_dict,
)
from wsgate.audit.witness import WitnessError
from wsgate.errors import (
    AUDIT_UNAVAILABLE,
    BAD_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
    UNAUTHENTICATED,
    HTTPFailure,
)
from wsgate.topics import is_uuid

FILTERS = ("customer", "agent", "subject", "topic_prefix", "connection", "outcome",
           "since", "until", "action", "code")


#: Bearer keys, or a function returning the current ones (read at each request).
Keys = Sequence[str] | Callable[[], Sequence[str]]


class AuditKeyHandler(JSONHandler):
    """Base of the audit endpoints: checks the audit API key (constant time)."""

    def initialize(self, reader: AuditReader | None, api_keys: Keys) -> None:
        """Args:
            reader: the audit reader (its queries run in worker threads); may be
                None only when api_keys is empty.
            api_keys: the accepted Bearer keys, or a function that returns the
                current ones (a SIGHUP reload changes them); empty turns the API
                off (404).
        """
        if callable(api_keys):
            api_keys = api_keys()
        self.reader = reader
        self.api_keys = tuple(k.encode() for k in api_keys)
        #: The customers each key may read (None: all), in api_keys' order.
        self.scopes: tuple[frozenset[str] | None, ...] = tuple(
            getattr(k, "customers", None) for k in api_keys)
        #: The customers the request's key may read (None: all), once authorized.
        self.scope: frozenset[str] | None = None

    def _authorized(self) -> bool:
        if not self.api_keys:
            self.fail(HTTPFailure(404, NOT_FOUND,
                                  "the audit API is off: set [audit] api_keys to enable it"))
            return False
        header = self.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        token = given.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key, without stopping early, so timing tells nothing.
        ok = False
        for key, customers in zip(self.api_keys, self.scopes, strict=True):
            if hmac.compare_digest(token, key):
                ok = True
                self.scope = customers
        if not ok or not token:
            self.set_header("WWW-Authenticate", 'Bearer realm="wsgate-audit"')
            self.fail(HTTPFailure(
                401, UNAUTHENTICATED,
                "send Authorization: Bearer <key> with a key from [audit] api_keys"
                if not token else "this audit API key is not accepted"))
            return False
        return True

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        # A path part that is not UTF-8 is checked by the handler (a 400 naming it),
        # not refused by Tornado with a bare "malformed request".
        return value.decode("utf-8", "surrogateescape")

    def _store_failed(self, exc: Exception) -> None:
        self.fail(HTTPFailure(503, AUDIT_UNAVAILABLE,
                              f"the audit store cannot be read now ({exc.__class__.__name__})"))


    def param(self, name: str, strip: bool = True) -> str | None:
        """The query parameter ``name`` as sent, or None when absent.

        Read from the raw query: Tornado's own accessors drop control characters
        (a NUL would vanish instead of being refused) and pick the last of
        repeated values.

        Raises:
            FilterError: given more than once, or not UTF-8.
        """
        values = self.request.query_arguments.get(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise FilterError(f"{name}: given more than once")
        try:
            value = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise FilterError(f"{name}: not valid UTF-8") from None
        return value.strip() if strip else value

    def page_args(self, default: int = DEFAULT_PAGE) -> tuple[int, str | None] | None:
        """``limit`` and ``cursor``; None after answering 400 for a bad one."""
        try:
            # Not stripped: " 5" is as malformed as "+5".
            raw_limit = self.param("limit", strip=False)
            limit = (parse_count(raw_limit, "limit", 1, MAX_PAGE) if raw_limit is not None
                     else default)
            cursor = self.param("cursor") or None
        except FilterError as exc:
            self.fail(HTTPFailure(400, BAD_REQUEST, str(exc)))
            return None
        return limit, cursor

    def parsed_filter(self) -> AuditFilter | None:
        """The query string's filters; None after answering 400 for a bad one."""
        try:
            args: dict[str, Any] = {name: self.param(name) or None for name in FILTERS}
            flt = AuditFilter.parse(**args)
        except FilterError as exc:
            self.fail(HTTPFailure(400, BAD_REQUEST, str(exc)))
            return None
        if self.scope is None:
            return flt
        if flt.customer is not None and flt.customer not in self.scope:
            self.fail(HTTPFailure(403, FORBIDDEN,
                                  "this audit API key may read only its customers' rows: "
                                  "leave customer out or give one of its customers"))
            return None
        return dataclasses.replace(flt, customers=self.scope)

    async def fetch_page(self, flt: AuditFilter, cursor: str | None,
                         limit: int) -> dict[str, Any] | None:
        """One page of matching rows; None after answering 400 (bad cursor) or 503."""
        assert self.reader is not None
        try:
            page: dict[str, Any] = await self.reader.apage(flt, cursor, limit)
        except FilterError as exc:
            self.fail(HTTPFailure(400, BAD_REQUEST, str(exc)))
            return None
        except SQLAlchemyError as exc:
            self._store_failed(exc)
            return None
        return page


class AuditAPIHandler(AuditKeyHandler):
    """``GET /v1.0/audit``: one page of audit rows."""

    async def get(self) -> None:
        if not self._authorized():
            return
        paging = self.page_args()
        if paging is None:
            return
        limit, cursor = paging
        flt = self.parsed_filter()
        if flt is None:
            return
        page = await self.fetch_page(flt, cursor, limit)
        if page is None:
            return
        self.write_json(200, page)


class AuditVerifyHandler(AuditKeyHandler):
    """``GET /v1.0/audit/verify``: the whole-log check, as JSON (403 for a scoped key)."""

    async def get(self) -> None:
        if not self._authorized():
            return
        if self.scope is not None:
            # The result speaks of the whole log (every customer's rows): refused.
            self.fail(HTTPFailure(403, FORBIDDEN,
                                  "verify checks every customer's rows: it needs an audit API "
                                  "key without customers"))
            return
        try:
            assert self.reader is not None
            result = await self.reader.averify()
        except SQLAlchemyError as exc:
            self._store_failed(exc)
            return
        except WitnessError as exc:  # its message names the witness, never a secret
            self.fail(HTTPFailure(503, AUDIT_UNAVAILABLE, f"verify cannot read a witness: {exc}"))
            return
        self.write_json(200, result.to_dict())


class AuditSummaryHandler(AuditKeyHandler):
    """``GET /v1.0/audit/summary``: the overview's counts for the rows filter."""

    async def get(self) -> None:
        if not self._authorized():
            return
        flt = self.parsed_filter()
        if flt is None:
            return
        assert self.reader is not None
        try:
            summary = await self.reader.asummary(flt)
        except SQLAlchemyError as exc:
            self._store_failed(exc)
            return
        self.write_json(200, summary)


class AuditConnectionHandler(AuditKeyHandler):
    """``GET /v1.0/audit/connections/<connection_id>``: one connection's timeline."""

    async def get(self, raw_id: str) -> None:
        if not self._authorized():
            return
        paging = self.page_args(MAX_PAGE)
        if paging is None:
            return
        limit, cursor = paging
        connection_id = raw_id.strip()
        try:
            if not connection_id:
                raise FilterError("connection id: missing; give it in the path, "
                                  "/v1.0/audit/connections/<connection_id>")
            check_text("connection id", connection_id)
        except FilterError as exc:
            self.fail(HTTPFailure(400, BAD_REQUEST, str(exc)))
            return
        assert self.reader is not None
        try:
            found = await self.reader.atimeline(connection_id, self.scope, cursor, limit)
        except FilterError as exc:
            self.fail(HTTPFailure(400, BAD_REQUEST, str(exc)))
            return
        except SQLAlchemyError as exc:
            self._store_failed(exc)
            return
        if found is None:
            # The same answer whether the connection is unknown or another customer's.
            self.fail(HTTPFailure(404, NOT_FOUND, "no audit row of this connection is "
                                  "recorded that this key may read"))
            return
        self.write_json(200, found)


def visible_event(ev: EventInfo, scope: frozenset[str] | None) -> dict[str, Any] | None:
    """The event as a key of ``scope`` may see it, or None when it may not see it.

    A scoped key sees an event published on a ``customer_id:<C>`` topic of one of
    its customers, without the topics of any other customer.
    """
    shown = {"event_id": ev.event_id, "type": ev.type, "topics": list(ev.topics),
             "published_at": ev.published_at, "node_id": ev.node_id,
             "payload_sha256": ev.payload_sha256}
    if scope is None:
        return shown
    if not ev.customers() & scope:
        return None
    shown["topics"] = [t for t in ev.topics if not t.startswith("customer_id:")
                       or t.split(":")[1] in scope]
    return shown


class AuditRecipientsHandler(AuditKeyHandler):
    """``GET /v1.0/audit/recipients/<event_id>``: who could see a recorded event."""

    async def get(self, raw_id: str) -> None:
        if not self._authorized():
            return
        event_id = raw_id.strip().lower()
        if not is_uuid(event_id):
            self.fail(HTTPFailure(400, BAD_REQUEST,
                                  "event id: must be the UUID of an event, like "
                                  "0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"))
            return
        assert self.reader is not None
        try:
            found = await self.reader.arecipients(event_id)
        except SQLAlchemyError as exc:
            self._store_failed(exc)
            return
        shown = None if found is None else visible_event(found[0], self.scope)
        if found is None or shown is None:
            # The same answer whether the event is unknown or another customer's.
            self.fail(HTTPFailure(404, NOT_FOUND,
                                  "no event with this id is recorded that this key may read "
                                  "(is [audit] record_events on?)"))
            return
        recipients = [recipient_dict(r) for r in found[1]
                      if self.scope is None or r.customer_id in self.scope]
        self.write_json(200, {"event": shown, "recipients": recipients})


Route = tuple[str, type, dict[str, Any]]


def audit_routes(reader: AuditReader | None, api_keys: Keys) -> list[Route]:
    """The URL specs of the audit API for a given reader and keys (see
    AuditKeyHandler.initialize)."""
    init = {"reader": reader, "api_keys": api_keys}
    return [
        (r"/v1\.0/audit", AuditAPIHandler, init),
        (r"/v1\.0/audit/verify", AuditVerifyHandler, init),
        (r"/v1\.0/audit/summary", AuditSummaryHandler, init),
        (r"/v1\.0/audit/connections/(.*)", AuditConnectionHandler, init),
        (r"/v1\.0/audit/recipients/(.*)", AuditRecipientsHandler, init),
    ]
