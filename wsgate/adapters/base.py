"""What every wsgate HTTP handler shares: JSON error bodies."""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from wsgate.adapters.tornado_compat import response_reason
from wsgate.errors import GENERIC_ERRORS, HTTP_ERROR, HTTPFailure


class JSONHandler(tornado.web.RequestHandler):
    """A handler whose every error answer is ``{"error": {"code", "message"}}``."""

    def fail(self, failure: HTTPFailure) -> None:
        """Answer with failure's status and body, and end the request."""
        self.clear()
        self.set_status(failure.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(failure.body()))

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        code, message = GENERIC_ERRORS.get(status_code, (HTTP_ERROR, response_reason(self)))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": code, "message": message}}))


class NotFoundHandler(JSONHandler):
    """Every unknown path: a JSON 404."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)
