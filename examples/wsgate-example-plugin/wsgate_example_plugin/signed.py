"""``example_signed``: agent tokens signed with a shared HMAC secret.

A token is ``v1.<customer_id>.<agent_id>.<expires>.<signature>``: ``expires``
is Unix seconds, and ``signature`` is the unpadded base64url HMAC-SHA256,
under the ``secret`` option, of everything before the last dot. An
application server that holds the secret makes tokens with :func:`sign`.

Options::

    [auth]
    plugin = "example_signed"
    [auth.options]
    secret = {env = "EXAMPLE_SIGNED_SECRET"}   # required, at least 32 characters
    permissions = ["customer_agent"]           # given to every agent (default)
    revoked_file = "revoked.txt"               # optional: agent ids, one per line;
                                               # must exist (empty: no one revoked)

It shows the three outcomes a wsgate authenticator has: a Principal, Refused
(401: bad format, bad signature, expired, revoked) and Unavailable (503: the
revocation file cannot be read now, so the plugin cannot decide).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsgate.plugins import PERMISSIONS, Authenticator, OptionError, Principal, Refused, Unavailable
from wsgate.topics import is_uuid

VERSION = "v1"
MIN_SECRET_CHARS = 32
OPTIONS = ("secret", "permissions", "revoked_file")


def sign(secret: str, customer_id: str, agent_id: str, expires: int) -> str:
    """Make a token for an agent of a customer, valid until ``expires`` (Unix seconds)."""
    body = f"{VERSION}.{customer_id}.{agent_id}.{expires}"
    return f"{body}.{_signature(secret, body)}"


def _signature(secret: str, body: str) -> str:
    digest = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class SignedTokenAuthenticator(Authenticator):
    """Accepts tokens made by :func:`sign` with the configured secret.

    Every token names an agent; the principal is that agent, with the
    configured permissions, expiring when the token does.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check every option now, so a mistake stops start-up with the key named.

        Raises:
            OptionError: an unknown option, a missing or short secret, an
                unknown permission name, a revoked_file that is not a string or
                cannot be read now.
        """
        super().__init__(options)
        for key in options:
            if key not in OPTIONS:
                raise OptionError(key, f"unknown option (known: {', '.join(OPTIONS)})")
        secret = options.get("secret")
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
            # Never echo the secret, not even its beginning.
            raise OptionError("secret", f"is required: a string of at least {MIN_SECRET_CHARS} "
                              'characters (use {env = "NAME"} to keep it out of the file)')
        self._secret = secret
        permissions = options.get("permissions", ["customer_agent"])
        if not isinstance(permissions, list) or not all(p in PERMISSIONS for p in permissions):
            raise OptionError("permissions",
                              f"must be a list of names from {', '.join(PERMISSIONS)}")
        self._permissions = frozenset(permissions)
        revoked_file = options.get("revoked_file")
        if revoked_file is not None and not isinstance(revoked_file, str):
            raise OptionError("revoked_file", "must be a file path")
        self._revoked_file = Path(revoked_file) if revoked_file else None
        if self._revoked_file is not None:
            # Unreadable later, the file makes every connection a 503 ("cannot
            # decide"); unreadable at start-up it is a mistake in the config.
            try:
                self._revoked_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise OptionError("revoked_file", f"cannot read {revoked_file!r}: {exc.strerror}; "
                                  "create it (an empty file revokes no one)") from None

    async def authenticate(self, credential: str) -> Principal:
        """Check format, signature, expiry and revocation, in that order.

        Raises:
            Refused: ``malformed token``, ``bad signature``, ``token expired``,
                ``agent revoked``; the token is never in the message.
            Unavailable: revoked_file is configured but cannot be read.
        """
        parts = credential.split(".")
        if len(parts) != 5 or parts[0] != VERSION:
            raise Refused(f"malformed token: expected {VERSION}.<customer>.<agent>.<expires>.<sig>")
        _, customer_id, agent_id, expires, signature = parts
        if not (is_uuid(customer_id) and is_uuid(agent_id) and expires.isascii()
                and expires.isdigit()):
            raise Refused("malformed token: bad customer id, agent id or expiry")
        expected = _signature(self._secret, credential.rpartition(".")[0])
        # compare_digest: the time taken must not tell how much of a forgery was right.
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise Refused("bad signature")
        if int(expires) <= time.time():
            raise Refused("token expired")
        if agent_id in self._revoked():
            raise Refused("agent revoked")
        return Principal(
            kind="agent", subject=agent_id, customer_id=customer_id, agent_id=agent_id,
            permissions=self._permissions,
            expires_at=datetime.fromtimestamp(int(expires), UTC),
        )

    async def refresh(self, principal: Principal) -> Principal | None:
        """Drop an agent whose id has since been written to revoked_file.

        Raises:
            Unavailable: the file cannot be read now (the connection is kept).
        """
        return None if principal.subject in self._revoked() else principal

    def mint(self, principal: Principal, ttl: float | None) -> str:
        """A token for an agent principal, valid ``ttl`` seconds (default one hour).

        Raises:
            ValueError: the principal is not an agent with customer and agent ids.
        """
        if principal.kind != "agent" or not principal.customer_id or not principal.agent_id:
            raise ValueError("example_signed tokens are for agents with a customer_id and agent_id")
        expires = int(time.time() + (3600 if ttl is None else ttl))
        return sign(self._secret, principal.customer_id, principal.agent_id, expires)

    def _revoked(self) -> frozenset[str]:
        if self._revoked_file is None:
            return frozenset()
        try:
            text = self._revoked_file.read_text(encoding="utf-8")
        except OSError as exc:
            # Refusing everyone (401) would log every agent out over a storage hiccup;
            # accepting everyone would ignore revocations. "Cannot decide" is honest: 503.
            raise Unavailable(f"the revocation list cannot be read: {exc.strerror}") from None
        return frozenset(line.strip() for line in text.splitlines() if line.strip())
