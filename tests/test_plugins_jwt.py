"""The jwt authenticator with real keys: every algorithm, JWKS rotation, every refusal."""

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from wsgate.plugins import OptionError, Principal, Refused
from wsgate_plugins.jwt import JWTAuthenticator

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
SECRET = "a-development-secret-of-at-least-64-bytes-for-hs512-0123456789abcdef"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_KEY_2 = ed25519.Ed25519PrivateKey.generate()
PRIVATE_KEYS = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}


def public_pem(private) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(private) -> str:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()


def jwk(private, kid):
    """The public JWK of a private key, with its kid."""
    data = json.loads(_algorithm_for(private).to_jwk(private.public_key()))
    data["kid"] = kid
    return data


def _algorithm_for(private):
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
    if isinstance(private, rsa.RSAPrivateKey):
        return RSAAlgorithm
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return ECAlgorithm
    return OKPAlgorithm


def claims(**extra):
    now = int(time.time())
    base = {"sub": A, "customer_id": C, "permission": 0x20, "iat": now, "exp": now + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def run(coro):
    return asyncio.run(coro)


def authenticate(auth, token):
    return run(auth.authenticate(token))


def refused(auth, token, fragment):
    with pytest.raises(Refused) as info:
        authenticate(auth, token)
    assert fragment in str(info.value)
    assert token not in str(info.value)
    return str(info.value)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header, payload, key: bytes | None) -> str:
    """A token signed by hand, for what PyJWT refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(),
                                                 hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- accepted tokens -------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms(alg):
    auth = JWTAuthenticator({"algorithms": [alg], "key": SECRET})
    principal = authenticate(auth, jwt.encode(claims(), SECRET, algorithm=alg))
    assert principal.kind == "agent"
    assert principal.subject == principal.agent_id == A
    assert principal.customer_id == C
    assert principal.permissions == {"customer_admin"}
    assert principal.expires_at is not None and principal.expires_at.tzinfo is not None


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
@pytest.mark.parametrize("source", ["key", "key_file"])
def test_public_key_algorithms(alg, source, tmp_path):
    pem = public_pem(PRIVATE_KEYS[alg])
    if source == "key_file":
        (tmp_path / "pub.pem").write_text(pem)
        pem = str(tmp_path / "pub.pem")
    auth = JWTAuthenticator({"algorithms": [alg], source: pem})
    token = jwt.encode(claims(), PRIVATE_KEYS[alg], algorithm=alg)
    assert authenticate(auth, token).customer_id == C


def test_jwks_rotation_selects_key_by_kid(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(ED_KEY, "2024"), jwk(ED_KEY_2, "2025"),
                                         jwk(RSA_KEY, "rsa")]}))
    auth = JWTAuthenticator({"algorithms": ["EdDSA", "RS256"], "jwks_file": str(path)})
    old = jwt.encode(claims(), ED_KEY, algorithm="EdDSA", headers={"kid": "2024"})
    new = jwt.encode(claims(), ED_KEY_2, algorithm="EdDSA", headers={"kid": "2025"})
    rsa_token = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa"})
    for token in (old, new, rsa_token):
        assert authenticate(auth, token).subject == A
    refused(auth, jwt.encode(claims(), ED_KEY, algorithm="EdDSA", headers={"kid": "2025"}),
            "bad signature")
    refused(auth, jwt.encode(claims(), ED_KEY, algorithm="EdDSA", headers={"kid": "2019"}),
            "unknown key id '2019'")
    refused(auth, jwt.encode(claims(), ED_KEY, algorithm="EdDSA"), "no kid header")
    # A key bound to EdDSA never verifies an RS256 token, whatever the header says.
    refused(auth, jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "2024"}),
            "does not fit the key")


def test_single_key_jwks_needs_no_kid(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(EC_KEY, "only")]}))
    auth = JWTAuthenticator({"algorithms": ["ES256"], "jwks_file": str(path)})
    assert authenticate(auth, jwt.encode(claims(), EC_KEY, algorithm="ES256")).subject == A


def test_claim_mapping_voipbin_and_renamed():
    auth = JWTAuthenticator({"key": SECRET})
    key = authenticate(auth, jwt.encode(claims(sub="key-7", type="accesskey", permission=None),
                                        SECRET))
    assert key == Principal("accesskey", "key-7", customer_id=C,
                            expires_at=key.expires_at)
    direct = authenticate(auth, jwt.encode(
        claims(sub="d-1", type="direct", permission=None, allowed_resources=["call"]), SECRET))
    assert direct.kind == "direct" and direct.allowed_resources == {"call"}
    both = authenticate(auth, jwt.encode(
        claims(sub="x", agent_id=A, permission=0x1, permissions=["customer_manager"]), SECRET))
    assert both.subject == A
    assert both.permissions == {"project_super_admin", "customer_manager"}

    renamed = JWTAuthenticator({"key": SECRET, "claims": {"customer_id": "tenant",
                                                          "subject": "uid", "type": "kind"}})
    token = jwt.encode({"uid": A, "tenant": C, "kind": "agent", "permissions": ["customer_agent"],
                        "exp": int(time.time()) + 60}, SECRET)
    principal = authenticate(renamed, token)
    assert (principal.subject, principal.customer_id, principal.permissions) == (
        A, C, {"customer_agent"})
    assert principal.expires_at == datetime.fromtimestamp(
        jwt.decode(token, SECRET, algorithms=["HS256"])["exp"], UTC)


@pytest.mark.parametrize("extra,fragment", [
    ({"customer_id": "C-1"}, "claim 'customer_id': must be a canonical lower-case UUID"),
    ({"sub": "alice"}, "claim 'sub': must be a canonical lower-case UUID"),
    ({"sub": None}, "token has no sub or agent_id claim"),
    ({"type": "robot"}, "claim 'type': must be one of agent, accesskey, direct"),
    ({"permission": "admin"}, "claim 'permission': must be a list"),
    ({"permissions": ["root"]}, "claim 'permissions': unknown permission 'root'"),
    ({"allowed_resources": "call"}, "claim 'allowed_resources'"),
])
def test_bad_claims_refused_naming_the_claim(extra, fragment):
    auth = JWTAuthenticator({"key": SECRET})
    refused(auth, jwt.encode(claims(**extra), SECRET), fragment)


# --- refusals --------------------------------------------------------------------


def test_alg_none_refused():
    auth = JWTAuthenticator({"key": SECRET})
    refused(auth, hand_made({"alg": "none", "typ": "JWT"}, claims(), None), "alg none")
    refused(auth, hand_made({"alg": "None"}, claims(), None), "alg none")


def test_algorithm_not_listed_refused():
    auth = JWTAuthenticator({"algorithms": ["HS256"], "key": SECRET})
    refused(auth, jwt.encode(claims(), SECRET, algorithm="HS512"), "algorithm 'HS512' is not")
    refused(auth, jwt.encode(claims(), RSA_KEY, algorithm="RS256"), "algorithm 'RS256' is not")


def test_hs256_signed_with_the_rsa_public_key_refused():
    # The classic confusion attack: the public key (known to all) used as an HMAC secret.
    pem = public_pem(RSA_KEY)
    auth = JWTAuthenticator({"algorithms": ["RS256"], "key": pem})
    forged = hand_made({"alg": "HS256", "typ": "JWT"}, claims(), pem.encode())
    refused(auth, forged, "algorithm 'HS256' is not allowed")


def test_expired_not_yet_valid_and_leeway():
    auth = JWTAuthenticator({"key": SECRET, "leeway": 30})
    strict = JWTAuthenticator({"key": SECRET, "leeway": 0})
    now = int(time.time())
    recently_expired = jwt.encode(claims(exp=now - 10), SECRET)
    assert authenticate(auth, recently_expired).subject == A
    refused(strict, recently_expired, "token expired")
    refused(auth, jwt.encode(claims(exp=now - 3600), SECRET), "token expired")
    refused(auth, jwt.encode(claims(nbf=now + 3600), SECRET), "not yet valid")
    refused(auth, jwt.encode(claims(iat=now + 3600), SECRET), "not yet valid")
    assert authenticate(auth, jwt.encode(claims(nbf=now + 10), SECRET)).subject == A


def test_exp_required_unless_disabled():
    token = jwt.encode(claims(exp=None), SECRET)
    refused(JWTAuthenticator({"key": SECRET}), token, "token has no exp claim")
    lax = JWTAuthenticator({"key": SECRET, "require_exp": False})
    assert authenticate(lax, token).expires_at is None


def test_issuer_and_audience():
    auth = JWTAuthenticator({"key": SECRET, "issuer": "https://id.example.com",
                             "audience": ["wsgate", "events"]})
    good = claims(iss="https://id.example.com", aud="events")
    assert authenticate(auth, jwt.encode(good, SECRET)).subject == A
    refused(auth, jwt.encode({**good, "iss": "https://evil.example.com"}, SECRET), "wrong issuer")
    refused(auth, jwt.encode({**good, "aud": "other"}, SECRET), "wrong audience")
    refused(auth, jwt.encode(claims(aud="wsgate"), SECRET), "token has no iss claim")
    refused(auth, jwt.encode(claims(iss="https://id.example.com"), SECRET),
            "token has no aud claim")
    # No audience configured: a token meant for someone else is not for us (RFC 7519 4.1.3).
    refused(JWTAuthenticator({"key": SECRET}), jwt.encode(claims(aud="x"), SECRET),
            "wrong audience")


def test_bad_signature_refused():
    auth = JWTAuthenticator({"key": SECRET})
    refused(auth, jwt.encode(claims(), SECRET[::-1]), "bad signature")
    token = jwt.encode(claims(), SECRET)
    head, payload, sig = token.split(".")
    tampered = jwt.encode(claims(permission=0x1), SECRET).split(".")[1]
    refused(auth, f"{head}.{tampered}.{sig}", "bad signature")
    other = JWTAuthenticator({"algorithms": ["EdDSA"], "key": public_pem(ED_KEY)})
    refused(other, jwt.encode(claims(), ED_KEY_2, algorithm="EdDSA"), "bad signature")


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "....",
                                   b64(b'{"alg":"HS256"}') + ".!!!." + "x"])
def test_malformed_refused(token):
    with pytest.raises(Refused, match="malformed token"):
        authenticate(JWTAuthenticator({"key": SECRET}), token)


# --- options -------------------------------------------------------------------------


@pytest.mark.parametrize("options,key,fragment", [
    ({"key": SECRET, "secret": "x"}, "secret", "unknown option"),
    ({}, "key", "exactly one of key, key_file, jwks_file, jwks_url and oidc_issuer"),
    ({"key": SECRET, "key_file": "k.pem"}, "key", "(got key, key_file)"),
    ({"key": SECRET, "algorithms": ["none"]}, "algorithms", "unsigned tokens are never"),
    ({"key": SECRET, "algorithms": ["HS256", "RS256"]}, "algorithms", "mixes HMAC"),
    ({"key": SECRET, "algorithms": "HS256"}, "algorithms", "non-empty list"),
    ({"key": "short"}, "key", "an HS256 secret needs at least 32 bytes, this one has 5"),
    ({"key": SECRET[:40], "algorithms": ["HS512"]}, "key", "HS512 secret needs at least 64"),
    ({"key": public_pem(RSA_KEY)}, "key", "is a PEM/SSH key, but algorithms are HMAC"),
    ({"key": SECRET, "algorithms": ["RS256"]}, "key", "not a PEM public key"),
    ({"key": public_pem(RSA_KEY), "algorithms": ["ES256"]}, "key",
     "ES256 needs an EC P-256 key, not an RSA key"),
    ({"key": public_pem(EC_KEY), "algorithms": ["EdDSA"]}, "key", "EdDSA needs an Ed25519"),
    ({"key": public_pem(ED_KEY), "algorithms": ["RS256"]}, "key", "RS256 needs an RSA key"),
    ({"key": public_pem(RSA_KEY), "algorithms": ["RS256", "ES256"]}, "key", "ES256 needs"),
    ({"key": public_pem(ec.generate_private_key(ec.SECP384R1())), "algorithms": ["ES256"]},
     "key", "not an EC secp384r1 key"),
    ({"key": SECRET, "leeway": -1}, "leeway", "at least 0"),
    ({"key": SECRET, "leeway": "30"}, "leeway", "number of seconds"),
    ({"key": SECRET, "audience": []}, "audience", "string or a list"),
    ({"key": SECRET, "issuer": ""}, "issuer", "non-empty"),
    ({"key": SECRET, "claims": {"role": "r"}}, "claims.role", "unknown"),
    ({"key": SECRET, "claims": {"subject": ""}}, "claims.subject", "non-empty claim name"),
    ({"key": SECRET, "require_exp": "yes"}, "require_exp", "true or false"),
    ({"key": SECRET, "private_key_file": "k.pem"}, "private_key_file", "HMAC algorithms mint"),
    ({"key_file": "/nonexistent.pem"}, "key_file", "cannot be read"),
])
def test_bad_options_name_the_key(options, key, fragment):
    with pytest.raises(OptionError) as info:
        JWTAuthenticator(options)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)


def test_small_rsa_key_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(OptionError, match="at least 2048 bits, this one has 1024"):
        JWTAuthenticator({"algorithms": ["RS256"], "key": public_pem(small)})


@pytest.mark.parametrize("keys,fragment", [
    ([], "at least one key"),
    ([{"kty": "OKP", "crv": "Ed25519", "x": "AA"}, {"kty": "OKP"}], "has no kid"),
    (["x"], "must be a JSON object"),
    ([{"kty": "nope", "kid": "a"}], "not a usable JWK"),
    ([{"kty": "oct", "k": b64(SECRET.encode()), "kid": "a"}], "is for HS256, which is not in"),
    ([{"kid": "a", "d": "secret-part", "kty": "OKP", "crv": "Ed25519", "x": "AA"}],
     "holds a private key"),
])
def test_bad_jwks(tmp_path, keys, fragment):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    with pytest.raises(OptionError) as info:
        JWTAuthenticator({"algorithms": ["EdDSA"], "jwks_file": str(path)})
    assert fragment in str(info.value)
    assert "secret-part" not in str(info.value)
    assert info.value.key.startswith("jwks_file")


def test_duplicate_kid_refused(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(ED_KEY, "a"), jwk(ED_KEY_2, "a")]}))
    with pytest.raises(OptionError, match="kid 'a' is used twice"):
        JWTAuthenticator({"algorithms": ["EdDSA"], "jwks_file": str(path)})


# --- mint ------------------------------------------------------------------------------


AGENT = Principal("agent", A, customer_id=C, agent_id=A,
                  permissions=frozenset({"customer_admin", "customer_manager"}))


def test_mint_hmac_round_trips():
    auth = JWTAuthenticator({"algorithms": ["HS384"], "key": SECRET, "issuer": "me",
                             "audience": "wsgate"})
    token = auth.mint(AGENT, 120)
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    principal = authenticate(auth, token)
    assert principal.permissions == AGENT.permissions
    assert principal.expires_at is not None
    assert 100 < (principal.expires_at - datetime.now(UTC)).total_seconds() <= 120
    direct = Principal("direct", "d-1", customer_id=C, allowed_resources=frozenset({"call"}))
    assert authenticate(auth, auth.mint(direct, None)).allowed_resources == {"call"}


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_mint_with_private_key_file(alg, tmp_path):
    private = PRIVATE_KEYS[alg]
    (tmp_path / "priv.pem").write_text(private_pem(private))
    auth = JWTAuthenticator({"algorithms": [alg], "key": public_pem(private),
                             "private_key_file": str(tmp_path / "priv.pem")})
    token = auth.mint(AGENT, 60)
    assert jwt.get_unverified_header(token)["alg"] == alg
    principal = authenticate(auth, token)
    assert principal == dataclasses.replace(AGENT, expires_at=principal.expires_at)


def test_mint_with_jwks_uses_matching_kid(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(ED_KEY, "old"),
                                                             jwk(ED_KEY_2, "new")]}))
    (tmp_path / "priv.pem").write_text(private_pem(ED_KEY_2))
    auth = JWTAuthenticator({"algorithms": ["EdDSA"], "jwks_file": str(tmp_path / "jwks.json"),
                             "private_key_file": str(tmp_path / "priv.pem")})
    token = auth.mint(AGENT, 60)
    assert jwt.get_unverified_header(token)["kid"] == "new"
    assert authenticate(auth, token).subject == A


def test_mint_refusals(tmp_path):
    (tmp_path / "priv.pem").write_text(private_pem(ED_KEY_2))
    with pytest.raises(OptionError, match="does not match the verification key"):
        JWTAuthenticator({"algorithms": ["EdDSA"], "key": public_pem(ED_KEY),
                          "private_key_file": str(tmp_path / "priv.pem")})
    with pytest.raises(OptionError, match="signs none of RS256"):
        JWTAuthenticator({"algorithms": ["RS256"], "key": public_pem(RSA_KEY),
                          "private_key_file": str(tmp_path / "priv.pem")})
    verify_only = JWTAuthenticator({"algorithms": ["EdDSA"], "key": public_pem(ED_KEY)})
    with pytest.raises(NotImplementedError, match="private_key_file"):
        verify_only.mint(AGENT, 60)
    with pytest.raises(ValueError, match="subject is its agent_id"):
        JWTAuthenticator({"key": SECRET}).mint(
            Principal("agent", "alice", customer_id=C, agent_id=A), 60)
