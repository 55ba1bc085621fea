# mypy: disallow-untyped-defs
"""``static``: tokens listed in the config or in a file, each with its principal.

For development and tests. Options (``[auth.options]``)::

    tokens = { "dev-admin-token" = { kind = "agent", subject = "alice", ... } }
    tokens_file = "tokens.toml"     # or .json: {"tokens": {"<token>": {...}}}

At least one of the two is required; both may be given (a token may not be
in both). Tokens are never written in messages: an entry is named by its
position, ``tokens[#2]`` or ``tokens_file[#2]``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsgate.plugins import Authenticator, OptionError, Principal, Refused

from ._principal import PrincipalError, check_option_keys, principal_from_mapping

OPTIONS = ("tokens", "tokens_file")


class StaticAuthenticator(Authenticator):
    """Accepts exactly the tokens of its options table, each mapped to a fixed principal.

    Lookups go through a dict keyed by the SHA-256 of the token, so the time
    an answer takes does not depend on how much of a token an attacker has
    guessed. The tokens themselves are kept only for mint.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check and load the tokens.

        Raises:
            OptionError: an unknown option; neither ``tokens`` nor
                ``tokens_file``; a file that cannot be read or parsed; a token
                that is empty or listed twice; a principal field that is wrong
                (the key names the entry and field, e.g. ``tokens[#2].customer_id``).
        """
        super().__init__(options)
        check_option_keys(options, OPTIONS, "static")
        if "tokens" not in options and "tokens_file" not in options:
            raise OptionError("tokens", "give tokens (a table token -> principal) "
                              "or tokens_file, or both")
        self._by_digest: dict[bytes, Principal] = {}
        self._by_subject: dict[str, str] = {}
        self._principals: set[Principal] = set()
        if "tokens" in options:
            self._load(options["tokens"], "tokens")
        if "tokens_file" in options:
            self._load(_read_tokens_file(options["tokens_file"]), "tokens_file")
        if not self._by_digest:
            raise OptionError("tokens", "no token is configured: every client would be refused")

    def _load(self, table: object, key: str) -> None:
        if not isinstance(table, Mapping):
            raise OptionError(key, "must be a table mapping each token to its principal")
        for number, (token, fields) in enumerate(table.items(), start=1):
            where = f"{key}[#{number}]"
            if not isinstance(token, str) or not token:
                raise OptionError(where, "a token must be a non-empty string")
            try:
                principal = principal_from_mapping(fields, where=where)
            except PrincipalError as exc:
                raise OptionError(exc.key, exc.reason) from None
            digest = _digest(token)
            if digest in self._by_digest:
                raise OptionError(where, "this token is listed twice "
                                  f"(subjects {self._by_digest[digest].subject!r} "
                                  f"and {principal.subject!r})")
            self._by_digest[digest] = principal
            self._principals.add(principal)
            # Kept only for mint (`wsgate token`), which must hand out the token itself.
            self._by_subject.setdefault(principal.subject, token)

    async def authenticate(self, credential: str) -> Principal:
        """The principal configured for this token.

        Raises:
            Refused: ``unknown token``, or ``token expired`` when the
                configured ``expires_at`` has passed.
        """
        principal = self._by_digest.get(_digest(credential))
        if principal is None:
            raise Refused("unknown token")
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise Refused("token expired")
        return principal

    async def refresh(self, principal: Principal) -> Principal | None:
        """Keep a principal that one of this plugin's tokens still maps to.

        None (4003) once its token is gone: after a reload (SIGHUP) the plugin
        is rebuilt from the new options and every open connection re-checked.
        """
        return principal if principal in self._principals else None

    def mint(self, principal: Principal, ttl: float | None) -> str:
        """Return the configured token whose principal has the same subject (or,
        failing that, the same agent_id, as `wsgate token --agent` gives).

        A static authenticator cannot create tokens, so ``ttl`` is ignored.

        Raises:
            LookupError: no configured token has that subject or agent id.
        """
        if principal.subject in self._by_subject:
            return self._by_subject[principal.subject]
        if principal.agent_id is not None:
            for known in self._by_digest.values():
                if known.agent_id == principal.agent_id:
                    return self._by_subject[known.subject]
        subjects = ", ".join(repr(s) for s in sorted(self._by_subject)[:5])
        raise LookupError(
            f"no static token has subject {principal.subject!r} (configured subjects: "
            f"{subjects}); the static authenticator cannot create tokens: pass one of "
            "those as --subject, or add a token to tokens or tokens_file")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _read_tokens_file(path: object) -> Mapping[str, Any]:
    """The ``tokens`` table of a TOML or JSON file (by extension)."""
    if not isinstance(path, str) or not path:
        raise OptionError("tokens_file", "must be a path to a .toml or .json file")
    p = Path(path)
    if p.suffix not in (".toml", ".json"):
        raise OptionError("tokens_file", f"{path}: must end in .toml or .json")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptionError("tokens_file", f"{path}: cannot be read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        # The decoders' messages give a position, never the file's content.
        kind = p.suffix[1:].upper()
        raise OptionError("tokens_file", f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"tokens"}:
        raise OptionError("tokens_file", f"{path}: must hold exactly one table, tokens "
                          "(token -> principal)")
    tokens: Mapping[str, Any] = doc["tokens"]
    return tokens
