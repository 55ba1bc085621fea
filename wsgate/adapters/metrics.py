"""``GET /metrics``: the gateway's Prometheus metrics, never served openly.

On the main port it needs ``Authorization: Bearer <key>`` with a key of
``[metrics] keys``; with no key configured it answers 404 there. The separate
listener of ``[metrics] port`` (bound to ``[metrics] host``, 127.0.0.1 by
default) serves it without a key: it is meant for a private interface.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

from wsgate.adapters.base import JSONHandler
from wsgate.errors import NOT_FOUND, UNAUTHENTICATED, HTTPFailure
from wsgate.metrics import GatewayMetrics


class MetricsHandler(JSONHandler):
    """Serves one gateway's registry in the format the scraper's Accept asks for."""

    def initialize(self, metrics: GatewayMetrics,
                   keys: Sequence[str] | Callable[[], Sequence[str]] | None) -> None:
        """Args:
            metrics: what to serve.
            keys: accepted Bearer keys, or a function returning the current ones
                (a SIGHUP reload changes them); an empty sequence turns the
                endpoint off (404); None serves without a key (the private listener).
        """
        if callable(keys):
            keys = keys()
        self.metrics = metrics
        self.keys = None if keys is None else tuple(k.encode() for k in keys)

    def _authorized(self) -> bool:
        if self.keys is None:
            return True
        if not self.keys:
            self.fail(HTTPFailure(404, NOT_FOUND,
                                  "metrics are not served on this port: set [metrics] keys "
                                  "to scrape it here, or [metrics] port for a private listener"))
            return False
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        token = given.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.keys:
            # Every key is compared, without stopping early, so timing tells nothing.
            ok |= hmac.compare_digest(token, key)
        if not (ok and token):
            self.set_header("WWW-Authenticate", 'Bearer realm="wsgate-metrics"')
            self.fail(HTTPFailure(401, UNAUTHENTICATED,
                                  "send Authorization: Bearer <key> with a key from "
                                  "[metrics] keys" if not token else
                                  "this metrics key is not accepted"))
            return False
        return True

    def get(self) -> None:
        if not self._authorized():
            return
        body, content_type = self.metrics.render(self.request.headers.get("Accept"))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


def metrics_route(metrics: GatewayMetrics,
                  keys: Sequence[str] | Callable[[], Sequence[str]] | None
                  ) -> tuple[str, type, dict[str, Any]]:
    """The ``/metrics`` URL spec (see MetricsHandler.initialize for keys)."""
    return (r"/metrics", MetricsHandler, {"metrics": metrics, "keys": keys})

