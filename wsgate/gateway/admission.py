"""Admission: who may open a connection, and how many each may hold.

Turns a credential into a principal through the authenticator plugin (with a
time limit, its answer checked, the credential kept out of every log line),
and keeps the per-principal and per-address connection counts. Refusals are
domain errors (:mod:`wsgate.errors`); the WebSocket adapter maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import traceback

from wsgate import errors
from wsgate.config import ServerConfig
from wsgate.gateway.connection import Connection, utcnow
from wsgate.plugins import Authenticator, Principal, Refused, Unavailable

log = logging.getLogger("wsgate.gateway")

#: Longest wait for an authenticator before the client gets 503.
AUTHENTICATE_TIMEOUT = 10.0


class Admission:
    """The authenticator, checked, and the connection counts.

    Args:
        authenticator: the configured plugin.
        server: the ``[server]`` table (connection limits).
    """

    def __init__(self, authenticator: Authenticator, server: ServerConfig) -> None:
        self.authenticator = authenticator
        self.server = server
        self.draining = False
        self._per_subject: dict[str, int] = {}
        self._per_ip: dict[str, int] = {}

    async def authenticate(self, credential: str) -> Principal:
        """Ask the authenticator, checking what it answers.

        A credential longer than ``[server] max_token_bytes`` is refused without
        asking the authenticator (a backend is not sent arbitrarily large tokens).

        Raises:
            Refused: 401.
            Unavailable: 503 (also for a plugin that fails, hangs or answers nonsense).
        """
        limit = self.server.max_token_bytes
        if len(credential) > limit or len(credential.encode("utf-8", "replace")) > limit:
            raise Refused(f"the token is longer than {limit} bytes")
        try:
            principal = await asyncio.wait_for(
                self.authenticator.authenticate(credential), AUTHENTICATE_TIMEOUT)
        except (Refused, Unavailable):
            raise
        except TimeoutError:
            raise Unavailable("the authenticator did not answer in time") from None
        except Exception as exc:
            # A plugin's message may quote the credential: log the traceback without it.
            detail = "".join(traceback.format_exception(exc)).replace(credential, "***")
            log.error("authenticator %s failed: %s", self.authenticator.name, detail)
            raise Unavailable("the authenticator failed; try again later") from None
        if not isinstance(principal, Principal):
            log.error("authenticator %s returned %s, not a Principal",
                      self.authenticator.name, type(principal).__name__)
            raise Unavailable("the authenticator gave an invalid answer")
        if principal.expires_at is not None and principal.expires_at <= utcnow():
            raise Refused("the credential has expired")
        return principal

    def admit(self, principal: Principal, remote_addr: str) -> None:
        """Check the per-principal and per-address connection limits.

        Raises:
            errors.Draining: the node is shutting down (503).
            errors.TooManyConnections: over a limit (429).
        """
        if self.draining:
            raise errors.Draining("the server is shutting down; reconnect to another node")
        s = self.server
        if s.max_connections_per_principal and \
                self._per_subject.get(principal.subject, 0) >= s.max_connections_per_principal:
            raise errors.TooManyConnections(
                f"at most {s.max_connections_per_principal} connections per principal")
        if s.max_connections_per_ip and \
                self._per_ip.get(remote_addr, 0) >= s.max_connections_per_ip:
            raise errors.TooManyConnections(
                f"at most {s.max_connections_per_ip} connections per address")

    def opened(self, conn: Connection) -> None:
        """Count an opened connection against its principal and address."""
        for counter, key in ((self._per_subject, conn.principal.subject),
                             (self._per_ip, conn.info.remote_addr)):
            counter[key] = counter.get(key, 0) + 1

    def closed(self, conn: Connection) -> None:
        """Release what :meth:`opened` counted."""
        for counter, key in ((self._per_subject, conn.principal.subject),
                             (self._per_ip, conn.info.remote_addr)):
            left = counter.get(key, 1) - 1
            if left > 0:
                counter[key] = left
            else:
                counter.pop(key, None)
