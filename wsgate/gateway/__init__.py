"""The core of a node: :class:`Gateway` and the rooms behind it (see facade.py).

Nothing in this package imports Tornado or an adapter (tests/test_architecture.py).
"""

from wsgate.gateway.connection import Connection, MinuteCount, Transport, rfc3339, utcnow
from wsgate.gateway.facade import Gateway

__all__ = ["Connection", "Gateway", "MinuteCount", "Transport", "rfc3339", "utcnow"]
