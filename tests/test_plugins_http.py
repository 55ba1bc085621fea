"""The http authenticator against a real Tornado backend on an unused port."""

import asyncio
import contextlib
import functools
import json
import time

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from tests.conftest import wait_for
from wsgate.plugins import OptionError, Principal, Refused, Unavailable
from wsgate_plugins.http import HTTPAuthenticator

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
AGENT = {"kind": "agent", "subject": A, "customer_id": C, "agent_id": A,
         "permissions": ["customer_admin"]}


class Backend:
    """What the test backend answers, and every request it received."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.release = asyncio.Event()
        self.url = ""


class AuthHandler(RequestHandler):
    def initialize(self, backend):
        self.backend = backend

    async def post(self):
        body = json.loads(self.request.body)
        self.backend.requests.append(body)
        self.backend.headers.append(dict(self.request.headers))
        if "subject" in body:
            return self.refresh(body)
        token = body["token"]
        if token.startswith("slow"):
            await self.backend.release.wait()
        if token in ("good", "slow-good") or token.startswith("user-"):
            self.write(AGENT)
        elif token == "soon-expired":
            self.write({**AGENT, "expires_at": "2001-01-01T00:00:00Z"})
        elif token == "bad" or token.startswith("refused-"):
            self.set_status(401)
            self.write({"error": "nope"})
        elif token == "forbidden":
            self.set_status(403)
        elif token == "boom":
            self.set_status(500)
        elif token == "teapot":
            self.set_status(418)
        elif token == "tok-html":
            self.write("<html>hello</html>")
        elif token == "tok-badfield":
            self.write({**AGENT, "customer_id": "not-a-uuid"})
        else:
            self.set_status(400)

    def refresh(self, body):
        assert body["principal"]["subject"] == body["subject"]
        subject = body["subject"]
        if subject == A:
            self.write({**body["principal"], "permissions": ["customer_manager"]})
        elif subject == "revoked":
            self.set_status(404)
        elif subject == "impostor":
            self.write({**AGENT, "subject": "someone-else", "agent_id": None,
                        "kind": "accesskey"})
        else:
            self.set_status(502)


@contextlib.asynccontextmanager
async def backend_server():
    backend = Backend()
    sock, port = bind_unused_port()
    server = HTTPServer(Application([("/auth", AuthHandler, {"backend": backend})]))
    server.add_sockets([sock])
    backend.url = f"http://127.0.0.1:{port}/auth"
    try:
        yield backend
    finally:
        backend.release.set()
        server.stop()
        await server.close_all_connections()


@contextlib.asynccontextmanager
async def plugin(**options):
    """A backend and an authenticator pointed at it, both closed afterwards."""
    async with backend_server() as backend:
        auth = HTTPAuthenticator({"url": backend.url, **options})
        try:
            yield backend, auth
        finally:
            await auth.close()


def scenario(test):
    """Run an async test body on a fresh event loop."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))
    return wrapper


@scenario
async def test_allowed_token_gives_principal_and_is_cached():
    async with plugin(headers={"Authorization": "Bearer backend-key"}) as (backend, auth):
        principal = await auth.authenticate("good")
        assert principal == Principal("agent", A, customer_id=C, agent_id=A,
                                      permissions=frozenset({"customer_admin"}))
        assert await auth.authenticate("good") == principal
        assert backend.requests == [{"token": "good"}]
        assert backend.headers[0]["Authorization"] == "Bearer backend-key"
        assert backend.headers[0]["Content-Type"] == "application/json"


@pytest.mark.parametrize("token", ["bad", "forbidden"])
@scenario
async def test_refused_token_is_negatively_cached(token):
    async with plugin() as (backend, auth):
        for _ in range(3):
            with pytest.raises(Refused, match="refused by the authentication backend"):
                await auth.authenticate(token)
        assert len(backend.requests) == 1


@scenario
async def test_cache_ttl_zero_asks_every_time():
    async with plugin(cache_ttl=0, negative_cache_ttl=0) as (backend, auth):
        await auth.authenticate("good")
        await auth.authenticate("good")
        for _ in range(2):
            with pytest.raises(Refused):
                await auth.authenticate("bad")
        assert len(backend.requests) == 4


@scenario
async def test_answer_not_cached_past_principal_expiry():
    async with plugin() as (backend, auth):
        await auth.authenticate("soon-expired")
        await auth.authenticate("soon-expired")
        assert len(backend.requests) == 2


@scenario
async def test_bounded_cache_evicts_least_recently_used():
    async with plugin(cache_size=2) as (backend, auth):
        for token in ("user-a", "user-b", "user-c"):  # user-a is evicted
            await auth.authenticate(token)
        await auth.authenticate("user-c")  # hit
        assert len(backend.requests) == 3
        await auth.authenticate("user-a")  # miss: evicts user-b
        assert len(backend.requests) == 4
        await auth.authenticate("user-c")  # still cached
        assert len(backend.requests) == 4
        assert len(auth._cache) == 2


@pytest.mark.parametrize("token,fragment", [
    ("boom", "answered HTTP 500"),
    ("teapot", "answered HTTP 418"),
    ("unknown-to-backend", "answered HTTP 400"),
    ("tok-html", "not JSON"),
    ("tok-badfield", "invalid principal: answer.customer_id: must be a canonical"),
])
@scenario
async def test_backend_errors_are_unavailable_not_refused(token, fragment, caplog):
    async with plugin() as (backend, auth):
        for _ in range(2):
            with pytest.raises(Unavailable) as info:
                await auth.authenticate(token)
            assert fragment in str(info.value)
        assert len(backend.requests) == 2, "failures are never cached"
    assert fragment in caplog.text
    assert token not in caplog.text


@scenario
async def test_backend_down_is_unavailable():
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there now: connection refused
    auth = HTTPAuthenticator({"url": f"http://127.0.0.1:{port}/auth", "timeout": 5})
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port} cannot be reached"):
        await auth.authenticate("good")
    assert time.monotonic() - started < 2
    await auth.close()


@scenario
async def test_slow_backend_is_unavailable_within_the_timeout():
    async with plugin(timeout=0.2) as (backend, auth):
        started = time.monotonic()
        with pytest.raises(Unavailable, match="did not answer"):
            await auth.authenticate("slow")
        elapsed = time.monotonic() - started
        assert 0.15 < elapsed < 1.5
        assert len(backend.requests) == 1


@scenario
async def test_concurrent_requests_for_one_token_share_one_backend_call():
    async with plugin() as (backend, auth):
        tasks = [asyncio.ensure_future(auth.authenticate("slow-good")) for _ in range(5)]
        await wait_for(lambda: len(backend.requests) == 1)
        backend.release.set()
        principals = await asyncio.gather(*tasks)
        assert {p.subject for p in principals} == {A}
        assert len(backend.requests) == 1


@scenario
async def test_refresh_updates_revokes_and_fails_open_to_unavailable():
    async with plugin() as (backend, auth):
        principal = await auth.authenticate("good")
        updated = await auth.refresh(principal)
        assert updated is not None and updated.permissions == {"customer_manager"}
        assert backend.requests[-1] == {"subject": A, "principal": {
            "kind": "agent", "subject": A, "customer_id": C, "agent_id": A,
            "permissions": ["customer_admin"], "allowed_resources": [], "expires_at": None}}

        revoked = Principal("accesskey", "revoked", customer_id=C)
        assert await auth.refresh(revoked) is None
        with pytest.raises(Unavailable, match="HTTP 502 to a refresh"):
            await auth.refresh(Principal("accesskey", "flaky", customer_id=C))
        with pytest.raises(Unavailable, match="another subject"):
            await auth.refresh(Principal("accesskey", "impostor", customer_id=C))


@scenario
async def test_revoked_refresh_drops_cached_answers():
    async with plugin() as (backend, auth):
        await auth.authenticate("user-x")
        await auth.authenticate("user-x")
        assert len(backend.requests) == 1
        gone = Principal("accesskey", "revoked", customer_id=C)
        auth._cache_put(b"k" * 32, gone, 60)
        assert await auth.refresh(gone) is None
        assert auth._cache_get(b"k" * 32) is None
        await auth.authenticate("user-x")  # other subjects stay cached
        assert len(backend.requests) == 2


@scenario
async def test_refresh_disabled_keeps_principal_without_asking():
    async with plugin(refresh=False) as (backend, auth):
        principal = Principal("accesskey", "revoked", customer_id=C)
        assert await auth.refresh(principal) is principal
        assert backend.requests == []


@pytest.mark.parametrize("options,key,fragment", [
    ({}, "url", "is required"),
    ({"url": "ftp://auth.example.com/"}, "url", "http:// or https://"),
    ({"url": "auth.example.com"}, "url", "http:// or https://"),
    ({"url": "https://a.example.com", "refresh_url": "x"}, "refresh_url", "http://"),
    ({"url": "https://a.example.com", "timeout": 0}, "timeout", "greater than 0"),
    ({"url": "https://a.example.com", "cache_ttl": -1}, "cache_ttl", "must be at least 0"),
    ({"url": "https://a.example.com", "negative_cache_ttl": "10"}, "negative_cache_ttl",
     "number of seconds"),
    ({"url": "https://a.example.com", "cache_size": 0}, "cache_size", "at least 1"),
    ({"url": "https://a.example.com", "refresh": "yes"}, "refresh", "true or false"),
    ({"url": "https://a.example.com", "headers": {"Bad Name": "x"}}, "headers", "header name"),
    ({"url": "https://a.example.com", "headers": {"X-Key": "sec\nret"}}, "headers.X-Key",
     "one-line"),
    ({"url": "https://a.example.com", "cache": 1}, "cache", "unknown option"),
])
def test_bad_options_name_the_key(options, key, fragment):
    with pytest.raises(OptionError) as info:
        HTTPAuthenticator(options)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "sec\nret" not in str(info.value)


@scenario
async def test_messages_name_host_never_url_secrets():
    sock, port = bind_unused_port()
    sock.close()
    auth = HTTPAuthenticator({"url": f"http://user:pw@127.0.0.1:{port}/auth?key=topsecret"})
    with pytest.raises(Unavailable) as info:
        await auth.authenticate("good")
    assert "topsecret" not in str(info.value) and "pw" not in str(info.value)
    await auth.close()
