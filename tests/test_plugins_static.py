"""The static authenticator: tokens from options or a file, precise option errors."""

import asyncio
import json
from datetime import UTC, datetime

import pytest

from wsgate.plugins import OptionError, Principal, Refused
from wsgate_plugins._principal import PrincipalError, principal_from_mapping
from wsgate_plugins.static import StaticAuthenticator

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
ADMIN = {"kind": "agent", "subject": "alice", "customer_id": C, "agent_id": A,
         "permissions": ["customer_admin"]}
KEY = {"kind": "accesskey", "subject": "key-1", "customer_id": C}


def run(coro):
    return asyncio.run(coro)


def test_known_token_gives_its_principal():
    auth = StaticAuthenticator({"tokens": {"dev-admin-token": ADMIN, "key-token": KEY}})
    principal = run(auth.authenticate("dev-admin-token"))
    assert principal == Principal("agent", "alice", customer_id=C, agent_id=A,
                                  permissions=frozenset({"customer_admin"}))
    assert run(auth.authenticate("key-token")).kind == "accesskey"


@pytest.mark.parametrize("token", ["", "dev-admin-toke", "dev-admin-token ", "DEV-ADMIN-TOKEN"])
def test_unknown_token_refused(token):
    auth = StaticAuthenticator({"tokens": {"dev-admin-token": ADMIN}})
    with pytest.raises(Refused, match="^unknown token$"):
        run(auth.authenticate(token))


def test_expired_token_refused():
    auth = StaticAuthenticator({"tokens": {
        "old": {**KEY, "expires_at": datetime(2001, 1, 1, tzinfo=UTC)},
        "new": {**KEY, "subject": "key-2", "expires_at": "2999-01-01T00:00:00Z"}}})
    with pytest.raises(Refused, match="token expired"):
        run(auth.authenticate("old"))
    assert run(auth.authenticate("new")).expires_at == datetime(2999, 1, 1, tzinfo=UTC)


def test_tokens_file_toml_and_json(tmp_path):
    toml_file = tmp_path / "tokens.toml"
    toml_file.write_text(f'[tokens."file-token"]\nkind = "accesskey"\nsubject = "k"\n'
                         f'customer_id = "{C}"\n')
    json_file = tmp_path / "tokens.json"
    json_file.write_text(json.dumps({"tokens": {"json-token": ADMIN}}))
    auth = StaticAuthenticator({"tokens": {"inline": KEY}, "tokens_file": str(toml_file)})
    assert run(auth.authenticate("file-token")).subject == "k"
    assert run(auth.authenticate("inline")).subject == "key-1"
    assert run(StaticAuthenticator({"tokens_file": str(json_file)})
               .authenticate("json-token")).subject == "alice"


@pytest.mark.parametrize("options,key,fragment", [
    ({}, "tokens", "give tokens"),
    ({"tokens": {}}, "tokens", "no token is configured"),
    ({"tokens": []}, "tokens", "must be a table"),
    ({"tokens": {"t": ADMIN}, "token": {}}, "token", "unknown option"),
    ({"tokens": {"": KEY}}, "tokens[#1]", "non-empty"),
    ({"tokens": {"a": KEY, "b": {**ADMIN, "customer_id": "5013BC52-DA9A-11EE-844F-2FA34248DE28"}}},
     "tokens[#2].customer_id", "canonical lower-case UUID"),
    ({"tokens": {"a": {**ADMIN, "kind": "robot"}}}, "tokens[#1].kind", "agent, accesskey, direct"),
    ({"tokens": {"a": {**ADMIN, "subject": ""}}}, "tokens[#1].subject", "non-empty"),
    ({"tokens": {"a": {**ADMIN, "agent_id": None}}}, "tokens[#1].agent_id", "required"),
    ({"tokens": {"a": {**ADMIN, "permissions": ["customer_admn"]}}}, "tokens[#1].permissions",
     "unknown permission 'customer_admn'"),
    ({"tokens": {"a": {**ADMIN, "permissions": "customer_admin"}}}, "tokens[#1].permissions",
     "must be a list"),
    ({"tokens": {"a": {**KEY, "allowed_resources": "call"}}}, "tokens[#1].allowed_resources",
     "list of non-empty strings"),
    ({"tokens": {"a": {**KEY, "expires_at": datetime(2030, 1, 1)}}}, "tokens[#1].expires_at",
     "time zone"),
    ({"tokens": {"a": {**KEY, "role": "x"}}}, "tokens[#1].role", "unknown principal field"),
    ({"tokens": {"a": "alice"}}, "tokens[#1]", "must be a table"),
    ({"tokens_file": "tokens.yaml"}, "tokens_file", ".toml or .json"),
    ({"tokens_file": "/nonexistent/tokens.toml"}, "tokens_file", "cannot be read"),
])
def test_bad_options_name_the_key_never_the_token(options, key, fragment):
    with pytest.raises(OptionError) as info:
        StaticAuthenticator(options)
    assert info.value.key == key
    assert fragment in str(info.value)
    for token in options.get("tokens", {}) if isinstance(options.get("tokens"), dict) else ():
        if token:
            assert repr(token) not in str(info.value)


def test_secret_token_never_in_messages(tmp_path):
    secret = "s3cr3t-token-value"
    with pytest.raises(OptionError) as info:
        StaticAuthenticator({"tokens": {secret: {**ADMIN, "customer_id": "nope"}}})
    assert secret not in str(info.value)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"tokens": {secret: KEY}}))
    with pytest.raises(OptionError) as info:
        StaticAuthenticator({"tokens": {secret: ADMIN}, "tokens_file": str(dup)})
    assert info.value.key == "tokens_file[#1]"
    assert "listed twice" in str(info.value) and secret not in str(info.value)


@pytest.mark.parametrize("content,fragment", [
    ("tokens = [", "not valid TOML"),
    ('[other]\nx = 1\n', "exactly one table, tokens"),
])
def test_bad_tokens_file(tmp_path, content, fragment):
    path = tmp_path / "t.toml"
    path.write_text(content)
    with pytest.raises(OptionError, match=fragment):
        StaticAuthenticator({"tokens_file": str(path)})


def test_mint_returns_configured_token_by_subject():
    auth = StaticAuthenticator({"tokens": {"dev-admin-token": ADMIN, "key-token": KEY}})
    wanted = run(auth.authenticate("key-token"))
    assert auth.mint(wanted, None) == "key-token"
    with pytest.raises(LookupError, match="cannot create tokens"):
        auth.mint(Principal("accesskey", "bob", customer_id=C), 60)


def test_principal_mapping_accepts_voipbin_mask_and_epoch():
    principal = principal_from_mapping({**ADMIN, "permissions": 0x1 | 0x40 | 0x2,
                                        "expires_at": 1_900_000_000}, where="x")
    assert principal.permissions == {"project_super_admin", "customer_manager"}
    assert principal.expires_at == datetime.fromtimestamp(1_900_000_000, UTC)
    with pytest.raises(PrincipalError, match=r"^x\.permissions: .*negative"):
        principal_from_mapping({**ADMIN, "permissions": -1}, where="x")


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_an_expiry_outside_the_years_1_to_9999_in_utc_names_the_field(value):
    from wsgate_plugins._principal import parse_expiry

    with pytest.raises(PrincipalError, match="expires_at.*not a representable time"):
        parse_expiry(value, where="tokens['x']")
