# mypy: disallow-untyped-defs
"""``jwt``: JSON Web Tokens checked with PyJWT (SPEC §4).

Options (``[auth.options]``), all checked at start-up:

``algorithms``
    list from HS256 HS384 HS512 RS256 ES256 EdDSA; default ``["HS256"]``.
    HMAC and public-key algorithms cannot be mixed: a public key that can be
    read by anyone must never be accepted as an HMAC secret.
``key`` | ``key_file`` | ``jwks_file``
    exactly one: the HMAC secret or a PEM public key inline (``{env = ...}``
    works), a file holding it, or a JWKS file whose keys are chosen by the
    token's ``kid`` header (several keys, for rotation).
``issuer``, ``audience``
    when set, tokens must carry a matching ``iss`` / ``aud``.
``leeway``
    seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``; default 30.
``require_exp``
    refuse tokens without ``exp``; default true.
``claims``
    renames claims: a table from ``customer_id``, ``agent_id``, ``subject``
    (default claim ``sub``), ``permission``, ``permissions``, ``type``,
    ``allowed_resources`` to the claim names the issuer uses.
``private_key_file``, ``default_ttl``
    for ``wsgate token``: the PEM private key that mints public-key tokens
    (HMAC configurations mint with ``key``), and the default lifetime in
    seconds (3600).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from wsgate.plugins import Authenticator, OptionError, Principal, Refused

from ._principal import (
    PrincipalError,
    bool_option,
    check_option_keys,
    parse_permissions,
    permission_mask,
    principal_from_mapping,
    seconds_option,
)

#: HMAC algorithms and the shortest secret each accepts (RFC 7518 §3.2: the hash size).
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ALGORITHMS = (*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
MIN_RSA_BITS = 2048

OPTIONS = ("algorithms", "key", "key_file", "jwks_file", "issuer", "audience", "leeway",
           "require_exp", "claims", "private_key_file", "default_ttl")
#: Principal-side names of the claims and the claim each is read from by default.
DEFAULT_CLAIMS: Mapping[str, str] = {
    "customer_id": "customer_id",
    "agent_id": "agent_id",
    "subject": "sub",
    "permission": "permission",
    "permissions": "permissions",
    "type": "type",
    "allowed_resources": "allowed_resources",
}

# The public keys the listed algorithms verify with (checked by _key_problem).
_PublicKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
              | ed448.Ed448PublicKey)


class JWTAuthenticator(Authenticator):
    """Validates signed JWTs and maps their claims (VoIPBin-compatible) to a principal.

    The claims: ``customer_id``; ``agent_id``, else ``sub``, for agents;
    ``permission`` (VoIPBin's integer bit mask) and/or ``permissions`` (list
    of names); ``type`` -> kind (``agent`` when absent);
    ``allowed_resources``; ``exp`` -> expires_at. The subject is the agent id
    when there is one, else ``sub``.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check every option and load the keys.

        Raises:
            OptionError: naming the key: an unknown option, an algorithm not
                supported, HMAC and public-key algorithms mixed, not exactly
                one key source, a key of the wrong type or too short for a
                listed algorithm, an unreadable file, a bad claim mapping.
        """
        super().__init__(options)
        check_option_keys(options, OPTIONS, "jwt")
        self.algorithms = _algorithms(options.get("algorithms", ["HS256"]))
        self.hmac = self.algorithms[0] in HMAC_ALGORITHMS
        self.issuer = _optional_str(options, "issuer")
        self.audience = _audience(options.get("audience"))
        self.leeway = seconds_option(options, "leeway", 30.0)
        self.default_ttl = seconds_option(options, "default_ttl", 3600.0, minimum=1.0)
        self._required = ["exp"] if bool_option(options, "require_exp", True) else []
        self.claims = _claim_names(options.get("claims", {}))

        sources = [k for k in ("key", "key_file", "jwks_file") if k in options]
        if len(sources) != 1:
            raise OptionError("key", "give exactly one of key, key_file and jwks_file"
                              + (f" (got {', '.join(sources)})" if sources else ""))
        self._key: bytes | _PublicKey | None = None
        self._jwks: dict[str | None, jwt.PyJWK] = {}
        if "jwks_file" in options:
            self._jwks = self._load_jwks(options["jwks_file"])
        else:
            source = sources[0]
            raw = _read_file(options[source], source) if source == "key_file" else options["key"]
            if not isinstance(raw, (str, bytes)) or not raw:
                raise OptionError(source, "must be a non-empty string")
            self._key = self._verification_key(raw, source)

        self._signing_key: bytes | PrivateKeyTypes | None = None
        self._signing_alg = ""
        self._signing_kid: str | None = None
        self._load_signing_key(options.get("private_key_file"))

    # --- start-up -----------------------------------------------------------

    def _verification_key(self, raw: str | bytes, source: str) -> bytes | _PublicKey:
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        if self.hmac:
            if source == "key_file":
                data = data.strip()
            if _looks_like_public_key(data):
                raise OptionError(source, "is a PEM/SSH key, but algorithms are HMAC: an HMAC "
                                  "secret must be a random string, never a key others can read")
            for alg, size in HMAC_ALGORITHMS.items():
                if alg in self.algorithms and len(data) < size:
                    raise OptionError(source, f"an {alg} secret needs at least {size} bytes, "
                                      f"this one has {len(data)}")
            return data
        public = _load_public_pem(data, source)
        for alg in self.algorithms:
            problem = _key_problem(alg, public)
            if problem:
                raise OptionError(source, f"{problem}; list in algorithms only what this key "
                                  "verifies")
        assert isinstance(public, _PublicKey)  # _key_problem passed for every algorithm
        return public

    def _load_jwks(self, path: object) -> dict[str | None, jwt.PyJWK]:
        try:
            doc = json.loads(_read_file(path, "jwks_file"))
        except json.JSONDecodeError as exc:
            raise OptionError("jwks_file", f"{path}: not valid JSON: {exc}") from None
        raw_keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(raw_keys, list) or not raw_keys:
            raise OptionError("jwks_file", f"{path}: must be a JWKS: {{\"keys\": [...]}} "
                              "with at least one key")
        keys: dict[str | None, jwt.PyJWK] = {}
        for number, raw in enumerate(raw_keys, start=1):
            where = f"jwks_file key #{number}"
            if not isinstance(raw, dict):
                raise OptionError(where, "must be a JSON object (a JWK)")
            kid = raw.get("kid")
            if kid is None and len(raw_keys) > 1:
                raise OptionError(where, "has no kid: with several keys each needs one")
            if kid is not None and not isinstance(kid, str):
                raise OptionError(where, "kid must be a string")
            if kid in keys:
                raise OptionError(where, f"kid {kid!r} is used twice")
            if "d" in raw:
                raise OptionError(where, "holds a private key; a JWKS for verification must "
                                  "hold public keys only")
            try:
                jwk = jwt.PyJWK.from_dict(raw)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError, TypeError):
                # PyJWT's own message may quote the JWK, secret parts included.
                raise OptionError(where, f"not a usable JWK (kty {raw.get('kty')!r}, "
                                  f"alg {raw.get('alg')!r})") from None
            alg = jwk.algorithm_name
            if alg not in self.algorithms:
                raise OptionError(where, f"is for {alg}, which is not in algorithms "
                                  f"({', '.join(self.algorithms)})")
            if alg in HMAC_ALGORITHMS:
                if len(jwk.key) < HMAC_ALGORITHMS[alg]:
                    raise OptionError(where, f"an {alg} secret needs at least "
                                      f"{HMAC_ALGORITHMS[alg]} bytes")
            else:
                problem = _key_problem(alg, jwk.key)
                if problem:
                    raise OptionError(where, problem)
            keys[kid] = jwk
        return keys

    def _load_signing_key(self, path: object) -> None:
        if path is None:
            if self.hmac and isinstance(self._key, bytes):
                self._signing_key = self._key
                self._signing_alg = self.algorithms[0]
            return
        if self.hmac:
            raise OptionError("private_key_file", "HMAC algorithms mint with key; "
                              "private_key_file is for RS256, ES256 and EdDSA")
        data = _read_file(path, "private_key_file").encode("utf-8")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise OptionError("private_key_file", f"{path}: not an unencrypted PEM "
                              "private key") from None
        public = private.public_key()
        fits = [alg for alg in self.algorithms if not _key_problem(alg, public)]
        if not fits or not isinstance(public, _PublicKey):
            raise OptionError("private_key_file", f"{path}: this key signs none of "
                              f"{', '.join(self.algorithms)}")
        spki = _spki(public)
        if self._jwks:
            kids = [kid for kid, jwk in self._jwks.items()
                    if isinstance(jwk.key, _PublicKey) and _spki(jwk.key) == spki]
            if not kids:
                raise OptionError("private_key_file", f"{path}: its public key is in no key "
                                  "of jwks_file, so tokens minted with it would be refused")
            self._signing_kid = kids[0]
            self._signing_alg = self._jwks[kids[0]].algorithm_name
        else:
            if isinstance(self._key, bytes) or self._key is None or _spki(self._key) != spki:
                raise OptionError("private_key_file", f"{path}: does not match the "
                                  "verification key, so tokens minted with it would be refused")
            self._signing_alg = fits[0]
        self._signing_key = private

    # --- the contract -------------------------------------------------------

    async def authenticate(self, credential: str) -> Principal:
        """Verify the token and build its principal.

        It is CPU work without I/O, done inline.

        Raises:
            Refused: ``malformed token``, ``unsigned tokens (alg none) are
                refused``, ``algorithm ... is not allowed``, ``unknown key id``,
                ``bad signature``, ``token expired``, ``token not yet valid``,
                ``wrong issuer``, ``wrong audience``, ``token has no ... claim``,
                or ``claim '...': ...`` for a claim of the wrong form. The
                token itself is never in the message.
        """
        claims = self.decode(credential)
        return self.principal_from_claims(claims)

    def decode(self, token: str) -> dict[str, Any]:
        """The verified claims of a token (see authenticate for the refusals)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Refused("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Refused("unsigned tokens (alg none) are refused")
        if alg not in self.algorithms:
            raise Refused(f"algorithm {alg[:20]!r} is not allowed "
                          f"(allowed: {', '.join(self.algorithms)})")
        key: bytes | _PublicKey | jwt.PyJWK = (
            self._key if self._key is not None else self._jwk_for(header))
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key, algorithms=[alg], issuer=self.issuer, audience=self.audience,
                leeway=self.leeway,
                options={"require": self._required, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Refused("token not yet valid (nbf or iat is in the future)") from None
        except jwt.InvalidIssuerError:
            raise Refused("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise Refused("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Refused(f"token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Refused("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise Refused(f"algorithm {alg!r} does not fit the key") from None
        except jwt.InvalidKeyError:
            raise Refused("the token's key is not accepted") from None
        except jwt.DecodeError:
            raise Refused("malformed token") from None
        except jwt.InvalidTokenError as exc:
            # The remaining PyJWT errors (iat of the wrong type...) describe
            # claims, never the token.
            raise Refused(f"invalid token: {exc}") from None
        return claims

    def _jwk_for(self, header: Mapping[str, Any]) -> jwt.PyJWK:
        kid = header.get("kid")
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        if kid is None:
            raise Refused("the token has no kid header, and several keys are configured")
        jwk = self._jwks.get(kid) if isinstance(kid, str) else None
        if jwk is None:
            raise Refused(f"unknown key id {str(kid)[:60]!r}")
        return jwk

    def principal_from_claims(self, claims: Mapping[str, Any]) -> Principal:
        """Map verified claims to a principal (see the class docstring).

        Raises:
            Refused: ``claim '<name>': ...`` naming the claim at fault.
        """
        names = self.claims
        kind = claims.get(names["type"], "agent")
        agent_claim = names["agent_id"]
        agent_id = claims.get(agent_claim)
        sub = claims.get(names["subject"])
        if agent_id is None and kind == "agent":
            agent_id, agent_claim = sub, names["subject"]
        try:
            permissions = parse_permissions(claims.get(names["permission"]),
                                            field=names["permission"])
            permissions |= parse_permissions(claims.get(names["permissions"]),
                                             field=names["permissions"])
            return principal_from_mapping({
                "kind": kind,
                "subject": agent_id if agent_id is not None else sub,
                "customer_id": claims.get(names["customer_id"]),
                "agent_id": agent_id,
                "permissions": sorted(permissions),
                "allowed_resources": claims.get(names["allowed_resources"]),
                "expires_at": claims.get("exp"),
            })
        except PrincipalError as exc:
            claim = {
                "kind": names["type"],
                "subject": f"{names['subject']} or {names['agent_id']}",
                "customer_id": names["customer_id"],
                "agent_id": agent_claim,
                "allowed_resources": names["allowed_resources"],
                "expires_at": "exp",
            }.get(exc.field, exc.field)
            if exc.reason == "is required":
                raise Refused(f"token has no {claim} claim") from None
            raise Refused(f"claim {claim!r}: {exc.reason}") from None

    def mint(self, principal: Principal, ttl: float | None) -> str:
        """Sign a token for principal, valid ``ttl`` seconds (default ``default_ttl``).

        HMAC configurations sign with ``key``; public-key ones with
        ``private_key_file`` (and the ``kid`` of its JWKS entry).

        Raises:
            NotImplementedError: no signing key is configured.
            ValueError: the principal cannot round-trip through a token (an
                agent id that differs from the subject, since the subject is
                read back from ``agent_id``; or a token this authenticator
                would refuse, e.g. an agent whose subject is not a UUID).
        """
        if self._signing_key is None:
            raise NotImplementedError("the jwt authenticator mints with key (HMAC) or "
                                      "private_key_file; neither is configured")
        if principal.agent_id is not None and principal.agent_id != principal.subject:
            raise ValueError("a token's subject is its agent_id: give the principal "
                             "subject == agent_id")
        names = self.claims
        now = int(time.time())
        claims: dict[str, Any] = {
            names["subject"]: principal.subject,
            names["type"]: principal.kind,
            "iat": now,
            "exp": now + int(self.default_ttl if ttl is None else ttl),
        }
        if principal.customer_id:
            claims[names["customer_id"]] = principal.customer_id
        if principal.agent_id:
            claims[names["agent_id"]] = principal.agent_id
        if principal.permissions:
            claims[names["permission"]] = permission_mask(principal.permissions)
        if principal.allowed_resources:
            claims[names["allowed_resources"]] = sorted(principal.allowed_resources)
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience[0]
        try:  # never hand out a token that authenticate() would refuse
            self.principal_from_claims(claims)
        except Refused as exc:
            raise ValueError(f"the token would be refused: {exc}") from None
        headers = {"kid": self._signing_kid} if self._signing_kid else None
        return jwt.encode(claims, self._signing_key, algorithm=self._signing_alg,  # type: ignore[arg-type]
                          headers=headers)


# --- option helpers -------------------------------------------------------------


def _algorithms(value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise OptionError("algorithms", f"must be a non-empty list from {', '.join(ALGORITHMS)}")
    for alg in value:
        if alg not in ALGORITHMS:
            hint = " (unsigned tokens are never accepted)" if alg.lower() == "none" else ""
            raise OptionError("algorithms", f"{alg!r} is not supported{hint}; "
                              f"choose from {', '.join(ALGORITHMS)}")
    kinds = {alg in HMAC_ALGORITHMS for alg in value}
    if len(kinds) > 1:
        raise OptionError("algorithms", "mixes HMAC (HS*) and public-key algorithms; a public "
                          "key must never be usable as an HMAC secret: configure one family")
    return list(dict.fromkeys(value))


def _optional_str(options: Mapping[str, Any], key: str) -> str | None:
    value = options.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise OptionError(key, "must be a non-empty string")
    return value


def _audience(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise OptionError("audience", "must be a string or a list of strings")
    return value


def _claim_names(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise OptionError("claims", "must be a table from principal field to claim name")
    names = dict(DEFAULT_CLAIMS)
    for field, claim in value.items():
        if field not in DEFAULT_CLAIMS:
            raise OptionError(f"claims.{field}", "unknown; the mappable claims are "
                              f"{', '.join(DEFAULT_CLAIMS)}")
        if not isinstance(claim, str) or not claim:
            raise OptionError(f"claims.{field}", "must be a non-empty claim name")
        names[field] = claim
    return names


def _read_file(path: object, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise OptionError(key, "must be a file path")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise OptionError(key, f"{path}: cannot be read: {why}") from None


def _looks_like_public_key(data: bytes) -> bool:
    head = data.lstrip()
    return head.startswith((b"-----BEGIN", b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-"))


def _load_public_pem(data: bytes, key: str) -> PublicKeyTypes:
    """A public key from a PEM public key, certificate or (unencrypted) private key."""
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        pass
    try:
        return x509.load_pem_x509_certificate(data).public_key()
    except (ValueError, TypeError):
        pass
    try:
        return serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError):
        pass
    raise OptionError(key, "is not a PEM public key, certificate or unencrypted private key "
                      "(public-key algorithms need one)")


def _key_problem(alg: str, key: object) -> str | None:
    """Why key cannot verify alg, or None when it can."""
    if alg == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            return f"RS256 needs an RSA key, not {_key_kind(key)}"
        if key.key_size < MIN_RSA_BITS:
            return f"an RSA key needs at least {MIN_RSA_BITS} bits, this one has {key.key_size}"
    elif alg == "ES256":
        if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
            return f"ES256 needs an EC P-256 key, not {_key_kind(key)}"
    elif alg == "EdDSA" and not isinstance(key, (ed25519.Ed25519PublicKey,
                                                 ed448.Ed448PublicKey)):
        return f"EdDSA needs an Ed25519 or Ed448 key, not {_key_kind(key)}"
    return None


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "an EdDSA key"
    return "this key"


def _spki(key: _PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
