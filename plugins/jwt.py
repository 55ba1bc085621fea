# mypy: disallow-untyped-defs
"""``jwt``: JSON Web Tokens checked with PyJWT (SPEC §4).

Options (``[auth.options]``), all checked at start-up:

``algorithms``
    list from HS256 HS384 HS512 RS256 ES256 EdDSA; default ``["HS256"]``.
    HMAC and public-key algorithms cannot be mixed: a public key that can be
    read by anyone must never be accepted as an HMAC secret.
``key`` | ``key_file`` | ``jwks_file`` | ``jwks_url`` | ``oidc_issuer``
    exactly one: the HMAC secret or a PEM public key inline (``{env = ...}``
    works), a file holding it, a JWKS file whose keys are chosen by the
    token's ``kid`` header (several keys, for rotation), a JWKS served over
    http(s), or an OpenID Connect issuer whose discovery document names the
    JWKS (``<issuer>/.well-known/openid-configuration``; ``iss`` must then
    equal the issuer). ``key_file`` and ``jwks_file`` are re-read when they
    change on disk (checked at most every ``file_check`` seconds, and at once
    for an unknown ``kid``).
``jwks_refresh``
    seconds between fetches of a ``jwks_url``/``oidc_issuer`` key set;
    default 300. A token naming an unknown ``kid`` also triggers a fetch, at
    most every 30 s. A failed fetch keeps the last good set (logged once per
    outage); until a first set is fetched tokens get 503 (Unavailable).
``file_check``
    seconds between checks of ``key_file``/``jwks_file`` for a change;
    default 5.
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

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from wsgate.plugins import Authenticator, OptionError, Principal, Refused, Unavailable

from ._principal import (
    PrincipalError,
    bool_option,
    check_option_keys,
    parse_permissions,
    permission_mask,
    principal_from_mapping,
    seconds_option,
    url_host,
    url_option,
)

#: HMAC algorithms and the shortest secret each accepts (RFC 7518 §3.2: the hash size).
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ALGORITHMS = (*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
MIN_RSA_BITS = 2048

OPTIONS = ("algorithms", "key", "key_file", "jwks_file", "jwks_url", "oidc_issuer",
           "jwks_refresh", "file_check", "issuer", "audience", "leeway", "require_exp",
           "claims", "private_key_file", "default_ttl")
KEY_SOURCES = ("key", "key_file", "jwks_file", "jwks_url", "oidc_issuer")
#: An unknown ``kid`` triggers a fetch of a remote key set at most this often (seconds).
UNKNOWN_KID_REFETCH = 30.0
#: Until a first key set is fetched, a fetch is tried again at most this often (seconds).
FIRST_FETCH_RETRY = 5.0
#: A remote key set (or discovery document) fetch gives up after this many seconds...
FETCH_TIMEOUT = 10.0
#: ... and refuses an answer larger than this many bytes.
MAX_JWKS_BYTES = 1024 * 1024

log = logging.getLogger(__name__)

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

        sources = [k for k in KEY_SOURCES if k in options]
        if len(sources) != 1:
            raise OptionError("key",
                              "give exactly one of " + ", ".join(KEY_SOURCES[:-1])
                              + f" and {KEY_SOURCES[-1]}"
                              + (f" (got {', '.join(sources)})" if sources else ""))
        self._source = sources[0]
        self._clock = time.monotonic  # seams for tests
        self._sleep = asyncio.sleep
        self._key: bytes | _PublicKey | None = None
        self._jwks: dict[str | None, jwt.PyJWK] = {}
        # key_file / jwks_file: the file and what it looked like when last read.
        self._file: str | None = None
        self._file_stamp: tuple[int, int, int] | None = None
        self._file_checked = 0.0
        self._file_broken = False
        self.file_check = seconds_option(options, "file_check", 5.0)
        # jwks_url / oidc_issuer: the remote key set.
        self.jwks_url: str | None = None
        self.oidc_issuer: str | None = None
        self.jwks_refresh = seconds_option(options, "jwks_refresh", 300.0, above=True)
        self._refetch_interval = UNKNOWN_KID_REFETCH
        self._fetched = False  # a good set was fetched at least once
        self._last_unknown_fetch: float | None = None
        self._last_attempt: float | None = None
        self._jwks_uri: str | None = None  # oidc_issuer: from the discovery document
        self._outage = False
        self._fetching: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._client: AsyncHTTPClient | None = None
        if self._source not in ("jwks_url", "oidc_issuer"):
            for key in ("jwks_refresh",):
                if key in options:
                    raise OptionError(key, "only applies with jwks_url or oidc_issuer")
        if self._source not in ("key_file", "jwks_file") and "file_check" in options:
            raise OptionError("file_check", "only applies with key_file or jwks_file")
        if self._source == "jwks_file":
            self._file = _file_option(options["jwks_file"], "jwks_file")
            self._jwks = self._load_jwks(options["jwks_file"])
            self._file_stamp = _stamp(self._file)
        elif self._source == "jwks_url":
            self.jwks_url = url_option(options["jwks_url"], "jwks_url")
        elif self._source == "oidc_issuer":
            # Kept as written: it is compared with iss as is (some issuers end in "/").
            self.oidc_issuer = url_option(options["oidc_issuer"], "oidc_issuer")
            if self.issuer is not None and self.issuer != self.oidc_issuer:
                raise OptionError("issuer", f"must equal oidc_issuer ({self.oidc_issuer}) "
                                  "or be left out")
            self.issuer = self.oidc_issuer
        else:
            source = self._source
            raw = _read_file(options[source], source) if source == "key_file" else options["key"]
            if not isinstance(raw, (str, bytes)) or not raw:
                raise OptionError(source, "must be a non-empty string")
            self._key = self._verification_key(raw, source)
            if source == "key_file":
                self._file = options["key_file"]
                self._file_stamp = _stamp(options["key_file"])
        self._file_checked = self._clock()
        if self.remote and self.hmac:
            raise OptionError(self._source, "a key set fetched over the network holds public "
                              "keys: list RS256, ES256 or EdDSA in algorithms, not HMAC")
        if self.remote and "private_key_file" in options:
            raise OptionError("private_key_file", f"cannot be checked against a key set from "
                              f"{self._source}; mint with a key_file or jwks_file config")

        self._signing_key: bytes | PrivateKeyTypes | None = None
        self._signing_alg = ""
        self._signing_kid: str | None = None
        self._load_signing_key(options.get("private_key_file"))
        if self.remote:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass  # built outside the server (check-config, wsgate token): fetch when asked
            else:
                self._start_refresher()

    @property
    def remote(self) -> bool:
        """The keys come from jwks_url or oidc_issuer."""
        return self._source in ("jwks_url", "oidc_issuer")

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
        return self._parse_jwks(doc, "jwks_file", str(path))

    def _parse_jwks(self, doc: object, source: str, name: str, *,
                    lenient: bool = False) -> dict[str | None, jwt.PyJWK]:
        """The keys of a JWKS document.

        A remote set (``lenient``) skips the keys wsgate cannot use (another
        algorithm, encryption keys, private parts) instead of refusing the
        whole set: identity providers publish more than signing keys.
        """
        raw_keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(raw_keys, list) or not raw_keys:
            raise OptionError(source, f"{name}: must be a JWKS: {{\"keys\": [...]}} "
                              "with at least one key")
        keys: dict[str | None, jwt.PyJWK] = {}
        for number, raw in enumerate(raw_keys, start=1):
            where = f"{source} key #{number}"
            if lenient:
                try:
                    jwk = self._parse_jwk(raw, where, len(raw_keys), keys)
                except OptionError as exc:
                    log.debug("%s: skipped: %s", name, exc.message)
                    continue
            else:
                jwk = self._parse_jwk(raw, where, len(raw_keys), keys)
            assert isinstance(raw, dict)
            keys[raw.get("kid")] = jwk
        if not keys:
            raise OptionError(source, f"{name}: holds no key usable with "
                              f"{', '.join(self.algorithms)}")
        return keys

    def _parse_jwk(self, raw: object, where: str, count: int,
                   keys: Mapping[str | None, jwt.PyJWK]) -> jwt.PyJWK:
        if not isinstance(raw, dict):
            raise OptionError(where, "must be a JSON object (a JWK)")
        if raw.get("use") not in (None, "sig"):
            raise OptionError(where, f"is for use {raw.get('use')!r}, not signatures")
        kid = raw.get("kid")
        if kid is None and count > 1:
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
        return jwk

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
        if self.remote:
            await self._remote_keys(credential)
        elif self._file is not None:
            self._check_file(credential)
        claims = self.decode(credential)
        return self.principal_from_claims(claims)

    async def close(self) -> None:
        """Stop refreshing the remote key set and close the HTTP client."""
        for task in (self._refresher, self._fetching):
            if task is not None and not task.done():
                task.cancel()
        self._refresher = self._fetching = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- keys that change -----------------------------------------------------

    def _unknown_kid(self, credential: str) -> bool:
        """The token names a kid the current set does not hold (False when unsure)."""
        if self._key is not None:
            return False
        try:
            kid = jwt.get_unverified_header(credential).get("kid")
        except jwt.InvalidTokenError:
            return False
        if kid is None:
            return not self._jwks
        return isinstance(kid, str) and kid not in self._jwks

    def _check_file(self, credential: str) -> None:
        """Re-read key_file/jwks_file if it changed (every file_check s, or for a new kid)."""
        now = self._clock()
        if now - self._file_checked < self.file_check and not self._unknown_kid(credential):
            return
        self._file_checked = now
        assert self._file is not None
        try:
            stamp = _stamp(self._file)
        except OSError as exc:
            self._file_problem(f"cannot be read: {exc.strerror}")
            return
        if stamp == self._file_stamp:
            return
        try:
            if self._source == "jwks_file":
                self._jwks = self._load_jwks(self._file)
            else:
                self._key = self._verification_key(_read_file(self._file, "key_file"), "key_file")
        except OptionError as exc:
            # Half-written, or a bad key: keep the old one, and look again next time.
            self._file_problem(exc.message)
            return
        self._file_stamp = stamp
        self._file_broken = False
        log.info("jwt: %s %s changed; its keys are now in use", self._source, self._file)

    def _file_problem(self, why: str) -> None:
        if not self._file_broken:
            log.warning("jwt: %s %s: %s; the keys read before stay in use",
                        self._source, self._file, why)
        self._file_broken = True

    async def _remote_keys(self, credential: str) -> None:
        """Make sure a fetched set is there, and fetch again for an unknown kid (rate-limited)."""
        if self._refresher is None or self._refresher.done():
            self._start_refresher()
        if not self._fetched:
            now = self._clock()
            if (self._fetching is not None and not self._fetching.done()) or (
                    self._last_attempt is None
                    or now - self._last_attempt >= FIRST_FETCH_RETRY):
                await self._fetch_once()
            if not self._fetched:
                raise Unavailable(f"the signing keys from {self._where()} could not be "
                                  "fetched yet")
            return
        if not self._unknown_kid(credential):
            return
        if self._fetching is not None and not self._fetching.done():
            await asyncio.shield(self._fetching)  # a fetch under way may bring it
            return
        now = self._clock()
        if (self._last_unknown_fetch is not None
                and now - self._last_unknown_fetch < self._refetch_interval):
            return  # decode refuses it: unknown key id
        self._last_unknown_fetch = now
        await self._fetch_once()

    def _start_refresher(self) -> None:
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await self._fetch_once()
            await self._sleep(self.jwks_refresh if self._fetched else
                                min(self.jwks_refresh, FIRST_FETCH_RETRY))

    async def _fetch_once(self) -> None:
        """One fetch; tokens arriving meanwhile wait for the same one."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        self._last_attempt = self._clock()
        try:
            url = self.jwks_url or self._jwks_uri
            if url is None:
                url = self._jwks_uri = await self._discover()
            try:
                doc = await self._get_json(url)
            except _FetchError:
                self._jwks_uri = None  # the provider may have moved it: discover again
                raise
            keys = self._parse_jwks(doc, self._source, url_host(url), lenient=True)
        except Exception as exc:
            if isinstance(exc, OptionError):
                why = f"the key set from {self._where()} is not usable: {exc.message}"
            elif isinstance(exc, _FetchError):
                why = str(exc)
            else:  # a bug or an unforeseen answer: still only "keep the old set"
                why = f"{self._where()}: {type(exc).__name__}"
                log.debug("jwt: key set fetch failed", exc_info=True)
            if not self._outage:
                kept = ("the keys fetched before stay in use" if self._fetched
                        else "tokens get 503 until a key set is fetched")
                log.warning("jwt: cannot fetch the signing keys: %s; %s", why, kept)
            self._outage = True
            return
        if self._outage:
            log.info("jwt: the signing keys from %s can be fetched again", self._where())
        self._outage = False
        if set(keys) != set(self._jwks):
            log.info("jwt: key set from %s: kids %s", self._where(),
                     ", ".join(sorted(str(k) for k in keys)))
        self._jwks = keys
        self._fetched = True

    async def _discover(self) -> str:
        assert self.oidc_issuer is not None
        # OpenID Connect Discovery 1.0 §4: the issuer without its trailing "/", then the path.
        doc = await self._get_json(self.oidc_issuer.rstrip("/")
                                   + "/.well-known/openid-configuration")
        if not isinstance(doc, dict):
            raise _FetchError(f"{url_host(self.oidc_issuer)}: the discovery document is not a "
                              "JSON object")
        if doc.get("issuer") != self.oidc_issuer:
            raise _FetchError(f"{url_host(self.oidc_issuer)}: the discovery document names "
                              f"issuer {str(doc.get('issuer'))[:100]!r}, not oidc_issuer")
        uri = doc.get("jwks_uri")
        try:
            return url_option(uri, "jwks_uri")
        except OptionError:
            raise _FetchError(f"{url_host(self.oidc_issuer)}: the discovery document has no "
                              "http(s) jwks_uri") from None

    async def _get_json(self, url: str) -> object:
        if self._client is None:
            # force_instance: close() must not close a client others share.
            self._client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_JWKS_BYTES)
        request = HTTPRequest(url, headers={"Accept": "application/json"},
                              connect_timeout=FETCH_TIMEOUT, request_timeout=FETCH_TIMEOUT,
                              follow_redirects=False)
        where = url_host(url)
        try:
            response = await self._client.fetch(request, raise_error=False)
        except HTTPClientError as exc:
            raise _FetchError(f"{where} did not answer ({exc.message})") from None
        except OSError as exc:
            raise _FetchError(f"{where} cannot be reached "
                              f"({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # the client's other failures (body too large...)
            raise _FetchError(f"{where} failed ({type(exc).__name__}: {exc})"[:300]) from None
        if response.code != 200:
            raise _FetchError(f"{where} answered {response.code}")
        try:
            return json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            raise _FetchError(f"{where} answered 200 with a body that is not JSON") from None

    def _where(self) -> str:
        return url_host(self.jwks_url or self.oidc_issuer or "")

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


class _FetchError(Exception):
    """A remote key set (or discovery document) could not be fetched; says why, no secrets."""


def _file_option(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(key, "must be a file path")
    return value


def _stamp(path: str) -> tuple[int, int, int]:
    """What says a file changed: its inode, size and modification time (ns)."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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
