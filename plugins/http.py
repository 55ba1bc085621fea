# mypy: disallow-untyped-defs
"""``http``: a backend URL validates each token; answers are cached.

Options (``[auth.options]``):

``url``
    required, ``http://`` or ``https://``: where tokens are POSTed.
``refresh_url``
    where re-checks are POSTed (default: ``url``).
``timeout``
    seconds for the whole request, connecting included; default 2.
``cache_ttl``, ``negative_cache_ttl``
    seconds a valid (default 60) or refused (default 10) answer is reused;
    0 turns that cache off.
``cache_size``
    most answers cached (least recently used go first); default 10000.
``headers``
    a table of extra request headers (values may be ``{env = "NAME"}``).
``refresh``
    re-check connected principals with the backend; default true.
``max_clients``
    concurrent requests to the backend; default 20.

The backend contract is in docs/plugins.md. In short: POST
``{"token": "..."}``; 200 with a principal object -> valid; 401 or 403 ->
refused (the client gets 401); anything else, a timeout or a connection
error -> the gateway answers 503, never 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from wsgate.plugins import Authenticator, OptionError, Principal, Refused, Unavailable

from ._principal import (
    PrincipalError,
    bool_option,
    check_option_keys,
    principal_from_mapping,
    principal_to_mapping,
    seconds_option,
    url_host,
    url_option,
)

log = logging.getLogger(__name__)

OPTIONS = ("url", "refresh_url", "timeout", "cache_ttl", "negative_cache_ttl", "cache_size",
           "headers", "refresh", "max_clients")
#: The largest backend answer read; a principal is a few hundred bytes.
MAX_ANSWER_BYTES = 64 * 1024
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

REFUSED_MESSAGE = "token refused by the authentication backend"


class HTTPAuthenticator(Authenticator):
    """Asks a backend whether a token is valid and who it belongs to.

    Answers are cached by the SHA-256 of the token (the token itself is never
    kept, logged or put in a message). A positive answer is reused for
    ``cache_ttl`` seconds but never past the principal's ``expires_at``; a
    refusal for ``negative_cache_ttl``. Concurrent requests for the same
    uncached token share one backend call.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check every option; the HTTP client is made on first use, on the running loop.

        Raises:
            OptionError: naming the key: unknown option, missing or non-HTTP
                url, a negative or non-numeric time, a cache_size below 1, a
                header that is not a string.
        """
        super().__init__(options)
        check_option_keys(options, OPTIONS, "http")
        if "url" not in options:
            raise OptionError("url", "is required: the backend URL that validates tokens")
        self.url = url_option(options["url"], "url")
        self.refresh_url = url_option(options.get("refresh_url", self.url), "refresh_url")
        self.timeout = seconds_option(options, "timeout", 2.0, above=True)
        self.cache_ttl = seconds_option(options, "cache_ttl", 60.0)
        self.negative_cache_ttl = seconds_option(options, "negative_cache_ttl", 10.0)
        self.cache_size = _integer(options, "cache_size", 10000)
        self.max_clients = _integer(options, "max_clients", 20)
        self.refresh_enabled = bool_option(options, "refresh", True)
        self.headers = _headers(options.get("headers", {}))
        self.headers["Content-Type"] = "application/json"
        self.headers.setdefault("Accept", "application/json")
        # digest -> (monotonic deadline, principal or refusal message)
        self._cache: OrderedDict[bytes, tuple[float, Principal | str]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Principal]] = {}
        self._client: AsyncHTTPClient | None = None

    async def authenticate(self, credential: str) -> Principal:
        """Validate the token with the backend, or from the cache.

        Raises:
            Refused: the backend answered 401 or 403 (now or within
                negative_cache_ttl).
            Unavailable: timeout, connection error, any other status, or a
                200 whose body is not a valid principal.
        """
        key = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache_get(key)
        if isinstance(cached, Principal):
            return cached
        if isinstance(cached, str):
            raise Refused(cached)
        task = self._inflight.get(key)
        if task is None:
            # Its own task, so one caller giving up does not cancel the others' answer.
            task = asyncio.ensure_future(self._ask(key, credential))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    def _settled(self, key: bytes, task: asyncio.Future[Principal]) -> None:
        del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: callers that gave up must not leave it "never retrieved"

    async def _ask(self, key: bytes, credential: str) -> Principal:
        response = await self._post(self.url, {"token": credential})
        if response.code in (401, 403):
            self._cache_put(key, REFUSED_MESSAGE, self.negative_cache_ttl)
            raise Refused(REFUSED_MESSAGE)
        if response.code != 200:
            raise self._unavailable(f"answered HTTP {response.code}")
        principal = self._principal(response)
        ttl = self.cache_ttl
        if principal.expires_at is not None:
            ttl = min(ttl, principal.expires_at.timestamp() - time.time())
        self._cache_put(key, principal, ttl)
        return principal

    async def refresh(self, principal: Principal) -> Principal | None:
        """Ask the backend whether principal still holds its rights.

        POSTs ``{"subject": ..., "principal": {...}}`` to refresh_url. With
        the ``refresh`` option false, keeps every principal without asking.

        Returns:
            the backend's (possibly updated) principal on 200, or None on
            401, 403 or 404 (revoked; its cached answers are dropped).
        Raises:
            Unavailable: anything else, including a 200 for another subject.
        """
        if not self.refresh_enabled:
            return principal
        response = await self._post(self.refresh_url, {
            "subject": principal.subject, "principal": principal_to_mapping(principal)})
        if response.code in (401, 403, 404):
            self._forget(principal.subject)
            return None
        if response.code != 200:
            raise self._unavailable(f"answered HTTP {response.code} to a refresh")
        updated = self._principal(response)
        if updated.subject != principal.subject:
            raise self._unavailable("answered a refresh with another subject")
        return updated

    async def close(self) -> None:
        """Close the HTTP client (its connections)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- internals ----------------------------------------------------------

    async def _post(self, url: str, body: Mapping[str, Any]) -> HTTPResponse:
        if self._client is None:
            # force_instance: close() must not close a client others share.
            self._client = AsyncHTTPClient(force_instance=True, max_clients=self.max_clients,
                                           max_body_size=MAX_ANSWER_BYTES)
        request = HTTPRequest(url, method="POST", body=json.dumps(body), headers=self.headers,
                              connect_timeout=self.timeout, request_timeout=self.timeout,
                              follow_redirects=False)
        try:
            return await self._client.fetch(request, raise_error=False)
        except HTTPClientError as exc:
            # 599: timeout or connection closed; the message holds no request data.
            raise self._unavailable(f"did not answer ({exc.message})") from None
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise self._unavailable(f"cannot be reached ({why})") from None
        except Exception as exc:
            # Anything else the client raises still means "cannot decide now", never 401.
            raise self._unavailable(f"failed ({type(exc).__name__})") from None

    def _principal(self, response: HTTPResponse) -> Principal:
        try:
            data = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            raise self._unavailable("answered 200 with a body that is not JSON") from None
        try:
            return principal_from_mapping(data, where="answer")
        except PrincipalError as exc:
            raise self._unavailable(f"answered 200 with an invalid principal: {exc}") from None

    def _unavailable(self, what: str) -> Unavailable:
        message = f"the authentication backend {url_host(self.url)} {what}"
        log.warning("%s", message)
        return Unavailable(message)

    def _cache_get(self, key: bytes) -> Principal | str | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        deadline, value = entry
        if deadline <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return value

    def _cache_put(self, key: bytes, value: Principal | str, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _forget(self, subject: str) -> None:
        stale = [k for k, (_, v) in self._cache.items()
                 if isinstance(v, Principal) and v.subject == subject]
        for k in stale:
            del self._cache[k]


def _integer(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(key, "must be an integer of at least 1")
    return value


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise OptionError("headers", "must be a table of header name -> value")
    headers: dict[str, str] = {}
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise OptionError("headers", f"{name!r} is not a valid header name")
        if not isinstance(header_value, str) or "\n" in header_value or "\r" in header_value:
            # The value may be a secret: never shown.
            raise OptionError(f"headers.{name}", "must be a one-line string")
        headers[name] = header_value
    return headers
