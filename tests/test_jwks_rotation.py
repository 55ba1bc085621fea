"""Keys change without a restart (SPEC §4): jwks_url, oidc_issuer, key files re-read.

Every remote test runs a real HTTP server on a free loopback port that serves
a JWKS (and an OpenID Connect discovery document), rotates its keys, goes down
and comes back. The plugin's clock is replaced by a fake one, so the 30 s
rate limit on unknown-kid fetches is tested without waiting.
"""

import asyncio
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from wsgate.plugins import OptionError, Refused, Unavailable
from wsgate_plugins.jwt import JWTAuthenticator

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
K1, K2, K3 = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
LOGGER = "wsgate_plugins.jwt"


def jwk(private, kid):
    from jwt.algorithms import OKPAlgorithm
    data = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    data.update(kid=kid, use="sig", alg="EdDSA")
    return data


def token(private, kid=None, **extra):
    now = int(time.time())
    claims = {"sub": A, "customer_id": C, "permission": 0x20, "iat": now, "exp": now + 600}
    claims.update(extra)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, private, algorithm="EdDSA", headers=headers)


def public_pem(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


class KeyServer:
    """A real identity provider stand-in: serves its JWKS, rotates, goes down, comes back."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetches: list[str] = []
        self.discovery: dict | None = None
        self.body: bytes | None = None  # served instead of the JWKS when set
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def jwks_count(self) -> int:
        return sum(1 for p in self.fetches if p.endswith("/certs"))

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches.append(self.path)
                if self.path.endswith("/.well-known/openid-configuration") and outer.discovery:
                    body = json.dumps(outer.discovery).encode()
                elif self.path.endswith("/certs"):
                    body = outer.body or json.dumps({"keys": outer.keys}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None


@pytest.fixture
def server():
    s = KeyServer()
    yield s
    if s._server is not None:
        s.down()


async def _forever(_seconds: float) -> None:
    await asyncio.Event().wait()


def remote(options):
    """The plugin on a fake clock; its background refresh fetches once, then waits for close.

    (The periodic refresh has its own test, on the real clock.)
    """
    auth = JWTAuthenticator({"algorithms": ["EdDSA"], **options})
    clock = Clock()
    auth._clock = clock
    auth._sleep = _forever
    return auth, clock


def fetch_warnings(caplog):
    return [r for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING
            and "cannot fetch the signing keys" in r.getMessage()]


# --- jwks_url -------------------------------------------------------------------------


def test_a_token_signed_by_a_new_key_is_accepted_after_the_refetch_on_its_kid(server):
    server.keys = [jwk(K1, "k1")]

    async def scenario():
        auth, clock = remote({"jwks_url": f"{server.base}/certs"})
        try:
            assert (await auth.authenticate(token(K1, "k1"))).agent_id == A
            assert server.jwks_count() == 1
            server.keys = [jwk(K1, "k1"), jwk(K2, "k2")]  # the provider rotates
            clock.now += 1
            assert (await auth.authenticate(token(K2, "k2"))).agent_id == A
            assert server.jwks_count() == 2
            assert (await auth.authenticate(token(K1, "k1"))).agent_id == A  # still held
            assert server.jwks_count() == 2
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(server):
    server.keys = [jwk(K1, "k1")]

    async def scenario():
        auth, clock = remote({"jwks_url": f"{server.base}/certs"})
        try:
            await auth.authenticate(token(K1, "k1"))
            assert server.jwks_count() == 1
            clock.now += 100
            flood = [auth.authenticate(token(K3, f"nobody-{i}")) for i in range(50)]
            results = await asyncio.gather(*flood, return_exceptions=True)
            assert all(isinstance(r, Refused) and "unknown key id" in str(r) for r in results)
            assert server.jwks_count() == 2  # one fetch for the whole flood
            clock.now += 29
            for i in range(20):
                with pytest.raises(Refused, match="unknown key id"):
                    await auth.authenticate(token(K3, f"again-{i}"))
            assert server.jwks_count() == 2  # within 30 s of the last: none
            server.keys = [jwk(K1, "k1"), jwk(K3, "k3")]
            with pytest.raises(Refused, match="unknown key id"):
                await auth.authenticate(token(K3, "k3"))
            assert server.jwks_count() == 2
            clock.now += 1.5  # 30.5 s after the last fetch
            assert (await auth.authenticate(token(K3, "k3"))).agent_id == A
            assert server.jwks_count() == 3
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_provider_down_keeps_the_last_good_set_logs_once_and_recovers(server, caplog):
    server.keys = [jwk(K1, "k1")]
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario():
        auth, clock = remote({"jwks_url": f"{server.base}/certs"})
        try:
            await auth.authenticate(token(K1, "k1"))
            server.down()
            for i in range(5):  # five failed fetches (unknown kids, 31 s apart)
                clock.now += 31
                with pytest.raises(Refused, match="unknown key id"):
                    await auth.authenticate(token(K2, f"new-{i}"))
                # the last good set keeps working
                assert (await auth.authenticate(token(K1, "k1"))).agent_id == A
            warnings = fetch_warnings(caplog)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert server.base in warnings[0].getMessage()
            assert "the keys fetched before stay in use" in warnings[0].getMessage()

            server.keys = [jwk(K2, "k2")]
            server.up()  # the same port
            clock.now += 31
            assert (await auth.authenticate(token(K2, "k2"))).agent_id == A
            assert any("can be fetched again" in r.getMessage() for r in caplog.records)
            with pytest.raises(Refused, match="unknown key id"):  # k1 was rotated out
                await auth.authenticate(token(K1, "k1"))
            assert len(fetch_warnings(caplog)) == 1
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_no_key_set_at_start_answers_503_until_one_is_fetched(server, caplog):
    server.keys = [jwk(K1, "k1")]
    url = f"{server.base}/certs"
    server.down()
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario():
        auth, clock = remote({"jwks_url": url})
        try:
            for _ in range(3):
                with pytest.raises(Unavailable, match="could not be fetched yet") as info:
                    await auth.authenticate(token(K1, "k1"))
                assert server.base in str(info.value)
            assert len(fetch_warnings(caplog)) == 1
            assert "tokens get 503" in fetch_warnings(caplog)[0].getMessage()
            server.up()
            clock.now += 4  # tokens do not hammer a provider that is down...
            with pytest.raises(Unavailable):
                await auth.authenticate(token(K1, "k1"))
            assert server.jwks_count() == 0
            clock.now += 1  # ... but try again every 5 s
            assert (await auth.authenticate(token(K1, "k1"))).agent_id == A
            assert server.jwks_count() == 1
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_the_set_is_fetched_at_start_and_every_jwks_refresh_seconds(server):
    server.keys = [jwk(K1, "k1")]

    async def scenario():
        # Built on the running loop (as the server builds it): the first fetch starts at once.
        auth = JWTAuthenticator({"algorithms": ["EdDSA"], "jwks_url": f"{server.base}/certs",
                                 "jwks_refresh": 0.05})
        try:
            deadline = time.monotonic() + 10
            while server.jwks_count() < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert server.jwks_count() >= 1  # before any token
            server.keys = [jwk(K2, "k2")]
            while "k2" not in auth._jwks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert "k2" in auth._jwks  # picked up by the periodic refresh alone
            assert "k1" not in auth._jwks
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_an_oversized_or_bad_answer_keeps_the_set_and_is_logged(server, caplog):
    server.keys = [jwk(K1, "k1")]
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario():
        auth, clock = remote({"jwks_url": f"{server.base}/certs"})
        try:
            await auth.authenticate(token(K1, "k1"))
            server.body = b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}"
            clock.now += 31
            with pytest.raises(Refused, match="unknown key id"):
                await auth.authenticate(token(K2, "k2"))
            assert (await auth.authenticate(token(K1, "k1"))).agent_id == A
            assert len(fetch_warnings(caplog)) == 1
        finally:
            await auth.close()

    asyncio.run(scenario())


# --- oidc_issuer ----------------------------------------------------------------------


def test_oidc_discovery_finds_the_jwks_and_requires_the_issuer(server):
    issuer = f"{server.base}/realms/x"
    server.discovery = {"issuer": issuer, "jwks_uri": f"{issuer}/protocol/openid-connect/certs"}
    server.keys = [jwk(K1, "k1"), {"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB",
                                   "e": "AQAB"}]  # an encryption key is skipped, not fatal

    async def scenario():
        auth, clock = remote({"oidc_issuer": issuer})
        try:
            assert (await auth.authenticate(token(K1, "k1", iss=issuer))).agent_id == A
            assert "/realms/x/.well-known/openid-configuration" in server.fetches[0]
            with pytest.raises(Refused, match="wrong issuer"):
                await auth.authenticate(token(K1, "k1", iss="https://evil.example.com/realms/x"))
            with pytest.raises(Refused, match="iss"):
                await auth.authenticate(token(K1, "k1"))
            server.keys = [jwk(K2, "k2")]  # rotation: the JWKS again, not the discovery
            clock.now += 31
            assert (await auth.authenticate(token(K2, "k2", iss=issuer))).agent_id == A
            assert server.jwks_count() == 2
            assert sum(p.endswith("openid-configuration") for p in server.fetches) == 1
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_an_issuer_ending_in_a_slash_is_compared_as_written(server):
    issuer = f"{server.base}/tenant/"
    server.discovery = {"issuer": issuer, "jwks_uri": f"{server.base}/tenant/certs"}
    server.keys = [jwk(K1, "k1")]

    async def scenario():
        auth, _ = remote({"oidc_issuer": issuer})
        try:
            assert (await auth.authenticate(token(K1, "k1", iss=issuer))).agent_id == A
            assert server.fetches[0] == "/tenant/.well-known/openid-configuration"
            with pytest.raises(Refused, match="wrong issuer"):
                await auth.authenticate(token(K1, "k1", iss=issuer.rstrip("/")))
        finally:
            await auth.close()

    asyncio.run(scenario())


def test_oidc_discovery_naming_another_issuer_is_not_trusted(server):
    issuer = f"{server.base}/realms/x"
    server.discovery = {"issuer": "https://other.example.com", "jwks_uri": f"{issuer}/certs"}
    server.keys = [jwk(K1, "k1")]

    async def scenario():
        auth, _ = remote({"oidc_issuer": issuer})
        try:
            with pytest.raises(Unavailable):
                await auth.authenticate(token(K1, "k1", iss=issuer))
            assert server.jwks_count() == 0
        finally:
            await auth.close()

    asyncio.run(scenario())


# --- files re-read --------------------------------------------------------------------


def write(path, data: bytes) -> None:
    """Replace path atomically, as a deploy tool would."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def test_a_rewritten_jwks_file_is_picked_up_on_an_unknown_kid(tmp_path, caplog):
    path = str(tmp_path / "jwks.json")
    write(path, json.dumps({"keys": [jwk(K1, "k1")]}).encode())
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario():
        auth, clock = remote({"jwks_file": path})
        assert (await auth.authenticate(token(K1, "k1"))).agent_id == A
        write(path, json.dumps({"keys": [jwk(K1, "k1"), jwk(K2, "k2")]}).encode())
        assert (await auth.authenticate(token(K2, "k2"))).agent_id == A  # no wait
        write(path, b'{"keys": [')  # half-written: the keys read before stay
        for _ in range(3):
            clock.now += 10
            assert (await auth.authenticate(token(K2, "k2"))).agent_id == A
        broken = [r for r in caplog.records if "stay in use" in r.getMessage()]
        assert len(broken) == 1
        write(path, json.dumps({"keys": [jwk(K3, "k3")]}).encode())
        clock.now += 10
        with pytest.raises(Refused, match="unknown key id"):
            await auth.authenticate(token(K2, "k2"))
        assert (await auth.authenticate(token(K3, "k3"))).agent_id == A

    asyncio.run(scenario())


def test_a_rewritten_key_file_is_picked_up_after_file_check_seconds(tmp_path):
    path = str(tmp_path / "issuer.pem")
    write(path, public_pem(K1))

    async def scenario():
        auth, clock = remote({"key_file": path, "file_check": 5})
        assert (await auth.authenticate(token(K1))).agent_id == A
        write(path, public_pem(K2))
        clock.now += 1
        with pytest.raises(Refused, match="bad signature"):  # not checked yet
            await auth.authenticate(token(K2))
        clock.now += 5
        assert (await auth.authenticate(token(K2))).agent_id == A
        with pytest.raises(Refused, match="bad signature"):
            await auth.authenticate(token(K1))

    asyncio.run(scenario())


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize("options,key,fragment", [
    ({"jwks_url": "ftp://idp.example.com/certs"}, "jwks_url", "http:// or https://"),
    ({"jwks_url": "idp.example.com/certs"}, "jwks_url", "http:// or https://"),
    ({"oidc_issuer": "file:///etc/passwd"}, "oidc_issuer", "http:// or https://"),
    ({"jwks_url": "https://idp.example.com/certs", "jwks_refresh": 0}, "jwks_refresh",
     "greater than 0"),
    ({"jwks_url": "https://idp.example.com/certs", "jwks_refresh": -5}, "jwks_refresh",
     "greater than 0"),
    ({"jwks_url": "https://idp.example.com/certs", "jwks_file": "j.json"}, "key",
     "(got jwks_file, jwks_url)"),
    ({"jwks_url": "https://a.example.com/certs", "oidc_issuer": "https://a.example.com"},
     "key", "(got jwks_url, oidc_issuer)"),
    ({"oidc_issuer": "https://a.example.com/r", "issuer": "https://b.example.com"}, "issuer",
     "must equal oidc_issuer"),
    ({"jwks_url": "https://idp.example.com/certs", "algorithms": ["HS256"]}, "jwks_url",
     "public keys"),
    ({"jwks_url": "https://idp.example.com/certs", "private_key_file": "k.pem"},
     "private_key_file", "cannot be checked"),
    ({"key_file": "k.pem", "jwks_refresh": 60}, "jwks_refresh", "only applies with jwks_url"),
    ({"jwks_url": "https://idp.example.com/certs", "file_check": 1}, "file_check",
     "only applies with key_file"),
])
def test_bad_remote_options_name_the_key(options, key, fragment):
    options = {"algorithms": ["EdDSA"], **options}
    with pytest.raises(OptionError) as info:
        JWTAuthenticator(options)
    assert info.value.key == key
    assert fragment in str(info.value)
