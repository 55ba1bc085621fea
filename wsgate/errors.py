"""Every code the outside world can see, defined once.

Reply codes go in ``rejected`` entries and ``error`` frames, close codes end
WebSocket connections, and :class:`HTTPFailure` carries an HTTP status with the
JSON error body ``{"error": {"code": ..., "message": ...}}``. The strings are
fixed by SPEC and docs/protocol.md: clients, backends and operators match on
them. Use the names, never the strings (tests/test_errors.py checks both).
"""

from __future__ import annotations

from typing import Any

# Reject codes in subscribed/unsubscribed replies (SPEC §2).
INVALID_TOPIC = "invalid_topic"
FORBIDDEN = "forbidden"
LIMIT_EXCEEDED = "limit_exceeded"
NOT_SUBSCRIBED = "not_subscribed"
AUDIT_UNAVAILABLE = "audit_unavailable"

# Codes of `error` frames.
BAD_REQUEST = "bad_request"
UNAUTHENTICATED = "unauthenticated"

# Codes of HTTP error bodies (docs/protocol.md, "HTTP error codes"). HTTP answers
# also carry BAD_REQUEST and UNAUTHENTICATED (above) and AUDIT_UNAVAILABLE.
# Any endpoint:
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
INTERNAL_ERROR = "internal_error"
#: Any other status Tornado answers by itself; the message is its reason phrase.
HTTP_ERROR = "error"
# The WebSocket upgrade:
ORIGIN_NOT_ALLOWED = "origin_not_allowed"
AUTH_UNAVAILABLE = "auth_unavailable"
UPGRADE_REQUIRED = "upgrade_required"
TOO_MANY_CONNECTIONS = "too_many_connections"
SHUTTING_DOWN = "shutting_down"
#: The code of a ConnectionRefused that names none (its subclasses do).
UNAVAILABLE = "unavailable"
# Ingest:
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
PAYLOAD_TOO_LARGE = "payload_too_large"
BATCH_TOO_LARGE = "batch_too_large"
BAD_JSON = "bad_json"
REPLAYED = "replayed"
INVALID_EVENT = "invalid_event"
#: An Idempotency-Key sent again (same ingest key) with another body: 422.
IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
BROKER_UNAVAILABLE = "broker_unavailable"

#: The code and message of a bare HTTP error answer, by status (Tornado's own
#: errors, an unknown path, a failure of the server); other statuses get HTTP_ERROR.
GENERIC_ERRORS: dict[int, tuple[str, str]] = {
    400: (BAD_REQUEST, "the request is malformed"),
    404: (NOT_FOUND, "no such endpoint"),
    405: (METHOD_NOT_ALLOWED, "this endpoint does not take that method"),
    500: (INTERNAL_ERROR, "the server failed; the error is logged"),
}

# WebSocket close codes (SPEC §2).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_EXPIRED = 4001
CLOSE_REVOKED = 4003
CLOSE_SLOW_CONSUMER = 4008
#: Not sent by anyone: the code recorded for a connection that ended without a
#: close frame (RFC 6455 reserves 1006 for this).
CLOSE_NO_CODE = 1006

# Why an accepted subscription ended: the code of an accepted unsubscribe row (SPEC §5).
END_CLIENT = "client"
END_DISCONNECT = "disconnect"
END_EXPIRED = "expired"
END_REVOKED = "revoked"
END_SLOW_CONSUMER = "slow_consumer"
END_SHUTDOWN = "shutdown"
END_UNCLEAN_SHUTDOWN = "unclean_shutdown"

#: The audit end reason for each close code the server itself sends.
END_REASON_FOR_CLOSE = {
    CLOSE_GOING_AWAY: END_SHUTDOWN,
    CLOSE_EXPIRED: END_EXPIRED,
    CLOSE_REVOKED: END_REVOKED,
    CLOSE_SLOW_CONSUMER: END_SLOW_CONSUMER,
}


class HTTPFailure(Exception):
    """An HTTP error answer: status, a machine code and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        #: The ingest key that authenticated the request, when one did (for the log).
        self.key_id: str | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}


class ConnectionRefused(Exception):
    """The core refuses to open a connection; an adapter answers ``status`` with
    the JSON error body of ``code`` and the message."""

    status = 503
    code = UNAVAILABLE


class Draining(ConnectionRefused):
    """The node is shutting down: reconnect to another."""

    status = 503
    code = SHUTTING_DOWN


class TooManyConnections(ConnectionRefused):
    """The principal or the address holds its limit of connections."""

    status = 429
    code = TOO_MANY_CONNECTIONS
