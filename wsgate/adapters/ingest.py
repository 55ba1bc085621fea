"""``POST /v1.0/events`` on Tornado (SPEC §3): the body is read here, what it
means is decided by :class:`wsgate.ingest.IngestService`."""

from __future__ import annotations

from typing import Any

import tornado.web

from wsgate.adapters.base import JSONHandler
from wsgate.adapters.tornado_compat import request_finished
from wsgate.errors import PAYLOAD_TOO_LARGE, HTTPFailure
from wsgate.ingest import IngestService

#: Tornado's body limit for a chunked request, which data_received enforces itself.
_UNLIMITED = 1 << 62


@tornado.web.stream_request_body
class IngestHandler(JSONHandler):
    """Tornado's side of the ingest endpoint: reads the body (chunked, or after
    ``Expect: 100-continue``, or whatever the fast path leaves to Tornado)
    and answers what :class:`IngestService` says."""

    def initialize(self, service: IngestService) -> None:
        self.service = service
        self.limit = service.limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.key_id: str | None = None
        self.too_big = False
        #: Events published by this request (0 for a failure or an idempotent retry).
        self.accepted = 0

    def prepare(self) -> None:
        failure, self.key_id = self.service.precheck(self.request.headers)
        if failure is not None:
            self.fail(failure)
            return
        connection: Any = self.request.connection
        if connection is not None:
            # Leave room so our own 413 answers, not Tornado's generic 400. A chunked
            # body announces no length: Tornado would cut it with a bare 400 at the
            # first chunk header past its limit, so data_received counts it instead.
            chunked = "Content-Length" not in self.request.headers
            connection.set_max_body_size(_UNLIMITED if chunked else self.limit + 1)

    def on_finish(self) -> None:
        self.service.gateway.metrics.ingested(self.get_status(), self.accepted,
                                              self.request.request_time())

    def log_fields(self) -> dict[str, Any]:
        """Fields for this request's access log line (never the key itself)."""
        return {"events_accepted": self.accepted, "key_id": self.key_id,
                "key_scope": self.service.key_scope(self.key_id)}

    def data_received(self, chunk: bytes) -> None:
        if request_finished(self) or self.too_big:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_big = True
            self.chunks.clear()
            # Answering now makes Tornado stop reading the body and close the
            # connection once the answer is sent.
            self.fail(HTTPFailure(413, PAYLOAD_TOO_LARGE,
                                  f"the body is over {self.limit} bytes"))
            return
        self.chunks.append(chunk)

    async def post(self) -> None:
        if self.too_big:
            self.fail(HTTPFailure(413, PAYLOAD_TOO_LARGE,
                                  f"the body is over {self.limit} bytes"))
            return
        try:
            answer, self.key_id, self.accepted = await self.service.complete(
                self.request.headers, b"".join(self.chunks), self.key_id)
        except HTTPFailure as failure:
            self.key_id = failure.key_id or self.key_id
            self.fail(failure)
            return
        self.write_json(202, answer)
