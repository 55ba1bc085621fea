"""Refresh: a connection's principal over time (SPEC §2 "Expiry and refresh").

- expiry: a connection closes with 4001 when its principal's ``expires_at`` passes;
- renewal: ``authenticate`` with a new token of the same principal extends it
  (an audit ``renew`` row either way; a refused token counts against the
  connection's refusal and bad-message limits, a backend that cannot decide
  does not); a new principal the authorizer refuses any held topic closes 4003;
- re-authorization: every ``[server] refresh_interval`` the authenticator
  re-checks each distinct principal once and the authorizer each held topic
  of its connections (4003 when refused).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from wsgate import errors, protocol
from wsgate.audit.records import ACCEPTED, REJECTED, RENEW, SUBSCRIBE, AuditSink, ConnectionInfo
from wsgate.gateway.admission import Admission
from wsgate.gateway.connection import Connection, rfc3339, utcnow
from wsgate.gateway.delivery import Close
from wsgate.gateway.limits import MessageLimits
from wsgate.plugins import Decision, Principal, Refused, Unavailable
from wsgate.topics import Topic

log = logging.getLogger("wsgate.gateway")


class Refresh:
    """Expiry timers, renewals and the periodic re-check.

    Args:
        admission: authenticates renewal tokens.
        decide: the checked authorizer (Subscriptions.decide).
        audit: where renew rows go.
        limits: counts refused renewals.
        close, close_flooding: the facade's.
    """

    def __init__(self, admission: Admission, decide: Callable[[Principal, Topic, str], Decision],
                 audit: AuditSink, limits: MessageLimits, close: Close,
                 close_flooding: Callable[[Connection], None]) -> None:
        self.admission = admission
        self.decide = decide
        self.audit = audit
        self.limits = limits
        self.close = close
        self.close_flooding = close_flooding

    def schedule_expiry(self, conn: Connection) -> None:
        """(Re)arm the 4001 close at the principal's ``expires_at``, if it has one."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        expires_at = conn.principal.expires_at
        if expires_at is not None:
            delay = max(0.0, (expires_at - utcnow()).total_seconds())
            conn.expiry = asyncio.get_running_loop().call_later(
                delay, self.close, conn, errors.CLOSE_EXPIRED, "credential expired")

    def _become(self, conn: Connection, principal: Principal) -> None:
        info = conn.info
        conn.info = ConnectionInfo(info.connection_id, principal, info.authenticator,
                                   info.remote_addr, info.origin, info.user_agent)
        self.schedule_expiry(conn)

    async def renew(self, conn: Connection, msg: protocol.ClientMessage) -> None:
        """``authenticate``: a new token for the same principal extends the connection."""
        try:
            principal = await self.admission.authenticate(msg.token)
        except (Refused, Unavailable) as exc:
            await self.audit.write_ends([conn.record(RENEW, "", REJECTED,
                                                     errors.UNAUTHENTICATED)])
            conn.transport.send_text(protocol.error(errors.UNAUTHENTICATED, str(exc), msg))
            # Each refusal is an audit row and, usually, a backend call: it counts
            # like a refused topic and like a bad message (a backend that cannot
            # decide is not the client's fault).
            if isinstance(exc, Refused):
                self._refused(conn)
            return
        old = conn.principal
        if (principal.subject, principal.kind, principal.customer_id) != \
                (old.subject, old.kind, old.customer_id):
            await self.audit.write_ends([conn.record(RENEW, "", REJECTED,
                                                     errors.UNAUTHENTICATED)])
            conn.transport.send_text(protocol.error(
                errors.UNAUTHENTICATED, "the new token is for another principal; "
                "open a new connection for it", msg))
            self._refused(conn)
            return
        if conn.closed:
            return
        if self._refused_any(conn, principal):
            # The new token carries fewer rights than a held topic needs: like the
            # periodic re-check, close 4003 at once (no await before it, so no
            # event of a refused topic goes out after the renew is decided); the
            # close ends every subscription with reason ``revoked``.
            self.close(conn, errors.CLOSE_REVOKED, "rights revoked: the new token may not "
                       "hold every subscribed topic")
            await self.audit.write_ends([conn.record(RENEW, "", REJECTED, errors.END_REVOKED)])
            return
        self._become(conn, principal)
        await self.audit.write_ends([conn.record(RENEW, "", ACCEPTED)])
        conn.transport.send_text(protocol.authenticated(msg, rfc3339(principal.expires_at)))

    def _refused(self, conn: Connection) -> None:
        """Count a refused renewal toward both limits; close 1008 past either."""
        if self.limits.too_many_bad(conn):
            self.close(conn, errors.CLOSE_POLICY, "too many bad messages")
        elif self.limits.too_many_refused(conn, 1):
            self.close_flooding(conn)

    def _refused_any(self, conn: Connection, principal: Principal) -> bool:
        """Whether the authorizer refuses principal any topic conn holds."""
        return any(not self.decide(principal, t, SUBSCRIBE).allowed
                   for t in conn.subscriptions.values())

    async def loop(self, interval: float, connections: Mapping[str, Connection]) -> None:
        """Re-check every connection every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.refresh_all(connections)

    async def refresh_all(self, connections: Mapping[str, Connection]) -> None:
        """Ask the authenticator to re-check every connected principal (4003 when refused).

        One ``refresh`` call per distinct principal per round, its answer applied
        to all the connections of that principal: a principal with many
        connections costs its backend one request, not one per connection.
        """
        authenticator = self.admission.authenticator
        groups: dict[Principal, list[Connection]] = {}
        for conn in list(connections.values()):
            if not conn.closed:
                groups.setdefault(conn.principal, []).append(conn)
        for old, conns in groups.items():
            try:
                principal = await authenticator.refresh(old)
            except Unavailable:
                continue
            except Exception:
                log.exception("authenticator %s failed to refresh", authenticator.name)
                continue
            fresh = principal if isinstance(principal, Principal) and \
                principal.subject == old.subject else None
            for conn in conns:
                # A connection renewed meanwhile was checked by its renewal.
                if conn.closed or conn.principal != old:
                    continue
                if fresh is None or self._refused_any(conn, fresh):
                    self.close(conn, errors.CLOSE_REVOKED, "rights revoked")
                    continue
                if fresh != old:
                    self._become(conn, fresh)
