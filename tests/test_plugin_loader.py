"""The plugin loader: shipped and third-party entry points, paths, and its errors."""

import asyncio
import time

import pytest

from wsgate.plugins import (
    AUTHENTICATOR_GROUP,
    AUTHORIZER_GROUP,
    Authenticator,
    Authorizer,
    PluginError,
    Principal,
    Refused,
    Unavailable,
    build_plugin,
)
from wsgate_example_plugin import SignedTokenAuthenticator, sign
from wsgate_plugins.jwt import JWTAuthenticator
from wsgate_plugins.static import StaticAuthenticator
from wsgate_plugins.voipbin import AllowAllAuthorizer, VoipbinAuthorizer

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
SECRET = "example-signed-secret-0123456789abcdef"


def authenticator(spec, options):
    return build_plugin(AUTHENTICATOR_GROUP, spec, Authenticator, options)


def run(coro):
    return asyncio.run(coro)


def test_shipped_plugins_load_by_entry_point_name():
    static = authenticator("static", {"tokens": {"t": {"kind": "accesskey", "subject": "k"}}})
    assert isinstance(static, StaticAuthenticator) and static.name == "static"
    jwt_auth = authenticator("jwt", {"key": SECRET})
    assert isinstance(jwt_auth, JWTAuthenticator)
    assert isinstance(authenticator("http", {"url": "https://auth.example.com/check"}),
                      Authenticator)
    voipbin = build_plugin(AUTHORIZER_GROUP, "voipbin", Authorizer, {})
    assert isinstance(voipbin, VoipbinAuthorizer) and voipbin.name == "voipbin"
    assert isinstance(build_plugin(AUTHORIZER_GROUP, "allow_all", Authorizer, {}),
                      AllowAllAuthorizer)


def test_module_class_path_loads():
    plugin = build_plugin(AUTHORIZER_GROUP, "wsgate_plugins.voipbin:VoipbinAuthorizer",
                          Authorizer, {})
    assert isinstance(plugin, VoipbinAuthorizer)
    assert plugin.name == "wsgate_plugins.voipbin:VoipbinAuthorizer"


def test_example_plugin_by_entry_point_name_three_outcomes(tmp_path):
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    plugin = authenticator("example_signed", {"secret": SECRET, "revoked_file": str(revoked),
                                              "permissions": ["customer_admin"]})
    assert isinstance(plugin, SignedTokenAuthenticator)
    assert plugin.name == "example_signed"
    token = sign(SECRET, C, A, int(time.time()) + 60)

    principal = run(plugin.authenticate(token))
    assert (principal.kind, principal.subject, principal.customer_id, principal.agent_id) == (
        "agent", A, C, A)
    assert principal.permissions == {"customer_admin"}

    for bad, message in [
        (token[:-2] + ("AA" if not token.endswith("AA") else "BB"), "bad signature"),
        (sign(SECRET, C, A, int(time.time()) - 1), "token expired"),
        (sign("another-secret-of-enough-length-000000", C, A, int(time.time()) + 60),
         "bad signature"),
        ("v1.x.y", "malformed token"),
        (sign(SECRET, "C", A, int(time.time()) + 60), "malformed token"),
    ]:
        with pytest.raises(Refused, match=message) as info:
            run(plugin.authenticate(bad))
        assert bad not in str(info.value)

    revoked.write_text(f"{A}\n")
    with pytest.raises(Refused, match="agent revoked"):
        run(plugin.authenticate(token))
    assert run(plugin.refresh(principal)) is None

    revoked.unlink()
    with pytest.raises(Unavailable, match="revocation list cannot be read"):
        run(plugin.authenticate(token))

    minted = plugin.mint(Principal("agent", A, customer_id=C, agent_id=A), 60)
    no_revocations = authenticator("example_signed", {"secret": SECRET})
    assert run(no_revocations.authenticate(minted)).subject == A


def test_missing_module():
    with pytest.raises(PluginError) as info:
        authenticator("wsgate_nosuch.auth:Thing", {})
    assert str(info.value) == ("plugin 'wsgate_nosuch.auth:Thing': module 'wsgate_nosuch' "
                               "not found")


def test_missing_attribute():
    with pytest.raises(PluginError) as info:
        authenticator("wsgate_plugins.static:NoSuchAuthenticator", {})
    assert "module 'wsgate_plugins.static' has no attribute 'NoSuchAuthenticator'" in str(
        info.value)


@pytest.mark.parametrize("spec", ["wsgate_plugins.voipbin:VoipbinAuthorizer",
                                  "wsgate_plugins.static:OPTIONS"])
def test_class_of_the_wrong_kind(spec):
    with pytest.raises(PluginError) as info:
        authenticator(spec, {})
    assert "is not a subclass of wsgate.plugins.Authenticator" in str(info.value)


def test_authenticator_entry_point_is_not_an_authorizer():
    with pytest.raises(PluginError, match="no entry point of that name in group "
                                          "'wsgate.authorizers'"):
        build_plugin(AUTHORIZER_GROUP, "static", Authorizer, {})


def test_unknown_entry_point_lists_installed_names():
    with pytest.raises(PluginError) as info:
        authenticator("ldap", {})
    message = str(info.value)
    assert "plugin 'ldap': no entry point of that name in group 'wsgate.authenticators'" in message
    for name in ("example_signed", "http", "jwt", "static"):
        assert name in message


@pytest.mark.parametrize("spec,options,key", [
    ("example_signed", {"secret": "short"}, "'secret'"),
    ("example_signed", {"secret": SECRET, "permisions": []}, "'permisions'"),
    ("example_signed", {"secret": SECRET, "revoked_file": "/nonexistent/revoked.txt"},
     "'revoked_file'"),
    ("static", {"tokens": {"t": {"kind": "agent", "subject": "a", "agent_id": "x"}}},
     "'tokens[#1].agent_id'"),
    ("jwt", {"key": SECRET, "algorithms": ["HS256", "ES256"]}, "'algorithms'"),
    ("http", {"url": "localhost:9000"}, "'url'"),
])
def test_bad_option_names_plugin_and_key(spec, options, key):
    with pytest.raises(PluginError) as info:
        authenticator(spec, options)
    assert str(info.value).startswith(f"plugin {spec!r}: option {key}:")
    assert "short" not in str(info.value)
