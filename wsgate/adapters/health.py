"""``/healthz`` and ``/readyz``."""

from __future__ import annotations

from wsgate.adapters.base import JSONHandler
from wsgate.gateway import Gateway


class HealthHandler(JSONHandler):
    """``/healthz``: the process answers."""

    def get(self) -> None:
        self.write_json(200, {"status": "ok"})


class ReadyHandler(JSONHandler):
    """``/readyz``: audit store and broker reachable, not draining."""

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def get(self) -> None:
        checks = {
            "audit": self.gateway.audit.healthy(),
            "broker": self.gateway.broker.healthy(),
            "accepting": not self.gateway.draining,
        }
        self.write_json(200 if all(checks.values()) else 503,
                        {"ready": all(checks.values()), "checks": checks})
