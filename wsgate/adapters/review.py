"""The audit review page (``/audit/``) and its CSV export (``/v1.0/audit/export.csv``).

The page is static HTML, CSS and JavaScript from ``wsgate/static``: it holds
no data and no secret. It asks the reviewer for a key of ``[audit]
api_keys``, keeps it in the tab's sessionStorage, and calls the JSON API of
:mod:`wsgate.adapters.audit_api` (rows, verify, summary, connection timeline,
recipients) and the export below with
``Authorization: Bearer``; the key never appears in a URL.

``GET /v1.0/audit/export.csv`` takes the same filters as ``GET /v1.0/audit``
and answers every matching row, oldest first, as CSV with the SPEC §7 columns
(the format of ``wsgate audit query --format csv``, cells that a spreadsheet
would run as formulas quoted by ``write_rows``). Rows are read page by page,
so memory stays flat however long the export.

With no ``[audit] api_keys`` none of this is served: like the API, each URL
answers 404 with a message saying how to turn it on.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from pathlib import Path

import tornado.iostream
import tornado.web
from sqlalchemy.exc import SQLAlchemyError

from wsgate.adapters.audit_api import AuditKeyHandler, Keys, Route
from wsgate.adapters.base import JSONHandler
from wsgate.audit.query import MAX_PAGE, AuditReader, write_rows
from wsgate.errors import NOT_FOUND, HTTPFailure

log = logging.getLogger("wsgate.audit.review")

STATIC_DIR = str(Path(__file__).resolve().parent.parent / "static")

#: The page runs only its own script and talks only to this origin; nothing may frame it.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ReviewPageHandler(tornado.web.StaticFileHandler):
    """Serves the review page's files with headers that keep it self-contained."""

    def set_extra_headers(self, path: str) -> None:
        for name, value in _PAGE_HEADERS.items():
            self.set_header(name, value)

    def parse_url_path(self, url_path: str) -> str:
        # No file name holds a NUL, and os.path.realpath raises on one (a 500).
        if "\x00" in url_path:
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)


class AuditExportHandler(AuditKeyHandler):
    """``GET /v1.0/audit/export.csv``: every row matching the filters, as CSV."""

    async def get(self) -> None:
        if not self._authorized():
            return
        assert self.reader is not None
        flt = self.parsed_filter()
        if flt is None:
            return
        # The first page is read before any byte is sent, so a store that is
        # down still gets a proper 503 instead of an empty file.
        page = await self.fetch_page(flt, None, MAX_PAGE)
        if page is None:
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition",
                        f'attachment; filename="wsgate-audit-{stamp}.csv"')
        self.set_header("Cache-Control", "no-store")
        first = True
        while True:
            out = io.StringIO()
            write_rows(page["rows"], "csv", out)
            text = out.getvalue()
            if not first:
                # write_rows starts every call with the header line: keep only the first.
                text = text.split("\n", 1)[1]
            first = False
            self.write(text)
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                # The reviewer's browser went away mid-download: nobody to answer.
                log.info("audit export: the client closed the connection before the end")
                return
            if page["next_cursor"] is None:
                break
            try:
                page = await self.reader.apage(flt, page["next_cursor"], MAX_PAGE)
            except SQLAlchemyError:
                # Too late for an error status: end the chunked body abruptly so the
                # download fails visibly instead of looking complete.
                log.exception("audit export interrupted")
                if self.request.connection is not None:
                    self.request.connection.close()  # type: ignore[attr-defined]
                return
        self.finish()


class ReviewPageOffHandler(JSONHandler):
    """``/audit`` and everything under it while no ``[audit] api_keys`` is set."""

    def get(self, *args: str) -> None:
        self.fail(HTTPFailure(404, NOT_FOUND,
                              "the audit review page is off: set [audit] api_keys to enable "
                              "it, then sign in here with one of those keys"))


def review_routes(reader: AuditReader | None, api_keys: Keys) -> list[Route]:
    """The review page and export URL specs. With no audit key (at start), the
    page's URLs answer 404 saying how to turn it on, and the export the API's 404."""
    init = {"reader": reader, "api_keys": api_keys}
    if not (api_keys() if callable(api_keys) else api_keys):
        return [
            (r"/audit(?:/.*)?", ReviewPageOffHandler, {}),
            (r"/v1\.0/audit/export\.csv", AuditExportHandler, init),
        ]
    return [
        (r"/audit", tornado.web.RedirectHandler, {"url": "/audit/"}),
        (r"/audit/(.*)", ReviewPageHandler,
         {"path": STATIC_DIR, "default_filename": "review.html"}),
        (r"/v1\.0/audit/export\.csv", AuditExportHandler, init),
    ]
