"""Per-connection message limits: rate, bad messages, refusals (SPEC §2, §5).

Each check records one thing a connection did and says whether it is now
past its limit; the gateway then closes it with 1008. The counters live on
the :class:`~wsgate.gateway.connection.Connection` (most never get one).
"""

from __future__ import annotations

import time

from wsgate import errors
from wsgate.config import ServerConfig
from wsgate.gateway.connection import Connection, MinuteCount


class MessageLimits:
    """``max_messages_per_second``, ``max_bad_messages_per_minute`` and
    ``max_rejected_topics_per_minute`` of one node."""

    def __init__(self, server: ServerConfig) -> None:
        self.rate = server.max_messages_per_second
        self.burst = max(1.0, server.max_messages_per_second * 10)
        self.max_bad = server.max_bad_messages_per_minute
        self.max_rejected = server.max_rejected_topics_per_minute

    def start(self, conn: Connection) -> None:
        """A new connection starts with a full bucket."""
        conn.rate_tokens = self.burst
        conn.rate_at = time.monotonic()

    def too_fast(self, conn: Connection) -> bool:
        """Take one message from the connection's bucket (refilled at ``rate`` per
        second, up to 10 s worth); True when it was empty. Never with rate 0."""
        if not self.rate:
            return False
        now = time.monotonic()
        conn.rate_tokens = min(self.burst, conn.rate_tokens + (now - conn.rate_at) * self.rate)
        conn.rate_at = now
        if conn.rate_tokens < 1.0:
            return True
        conn.rate_tokens -= 1.0
        return False

    def too_many_bad(self, conn: Connection) -> bool:
        """Count a bad message; True past the per-minute limit."""
        if conn.bad_messages is None:
            conn.bad_messages = MinuteCount()
        return conn.bad_messages.add(1, time.monotonic()) > self.max_bad

    def too_many_refused(self, conn: Connection, n: int) -> bool:
        """Count n refusals that each wrote a rejected audit row (topics, renewals);
        True once the connection is past ``max_rejected_topics_per_minute``."""
        if not n:
            return False
        if conn.rejected_topics is None:
            conn.rejected_topics = MinuteCount()
        return conn.rejected_topics.add(n, time.monotonic()) > self.max_rejected

    def refused_topics(self, rejected: list[dict[str, str]]) -> int:
        """How many of a reply's refusals count: ``audit_unavailable`` does not
        (that refusal is the server's fault)."""
        return sum(r["code"] != errors.AUDIT_UNAVAILABLE for r in rejected)

    @property
    def flood_reason(self) -> str:
        return f"too many refused topics: more than {self.max_rejected} in a minute"
