"""The voipbin authorizer: every rule of SPEC §4, allowed and refused."""

import pytest

from wsgate.plugins import OptionError, Principal
from wsgate.topics import parse_topic
from wsgate_plugins.voipbin import AllowAllAuthorizer, VoipbinAuthorizer

C = "5013bc52-da9a-11ee-844f-2fa34248de28"
OTHER_C = "6a1f0d3e-da9a-11ee-8d1c-3b8f2a1c9e77"
A = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"
OTHER_A = "9c2e4b10-da9a-11ee-b7a4-0f6d2e3c1a55"
CALL = "1f0e9d8c-da9b-11ee-a1b2-c3d4e5f60718"

authz = VoipbinAuthorizer({})


def agent(*permissions, customer_id=C, agent_id=A):
    return Principal("agent", agent_id, customer_id=customer_id, agent_id=agent_id,
                     permissions=frozenset(permissions))


def accesskey(customer_id=C):
    return Principal("accesskey", "key-1", customer_id=customer_id)


def direct(*resources, customer_id=C):
    return Principal("direct", "direct-1", customer_id=customer_id,
                     allowed_resources=frozenset(resources))


def decide(principal, topic, action="subscribe"):
    return authz.authorize(principal, parse_topic(topic), action)


def assert_denied(decision, *fragments):
    assert not decision.allowed
    assert decision.code == "forbidden"
    for fragment in fragments:
        assert fragment in decision.message


CUSTOMER_TOPICS = [f"customer_id:{C}", f"customer_id:{C}:call", f"customer_id:{C}:call:{CALL}",
                   f"customer_id:{C}:*:{CALL}", f"customer_id:{C}:call:*"]


@pytest.mark.parametrize("permission", ["customer_admin", "customer_manager"])
@pytest.mark.parametrize("topic", CUSTOMER_TOPICS)
def test_managing_agent_sees_its_customer(permission, topic):
    assert decide(agent(permission), topic).allowed


@pytest.mark.parametrize("permission", ["customer_admin", "customer_manager"])
def test_managing_agent_refused_other_customer(permission):
    decision = decide(agent(permission), f"customer_id:{OTHER_C}:call")
    assert_denied(decision, f"topic is for customer {OTHER_C}, you belong to {C}")


@pytest.mark.parametrize("permissions", [(), ("customer_agent",)])
def test_plain_agent_refused_customer_topics(permissions):
    decision = decide(agent(*permissions), f"customer_id:{C}:call")
    assert_denied(decision, "customer topics need the customer_admin or customer_manager")


@pytest.mark.parametrize("permissions", [(), ("customer_agent",), ("customer_admin",),
                                         ("customer_manager",)])
def test_agent_own_topics_allowed_other_agents_refused(permissions):
    principal = agent(*permissions)
    assert decide(principal, f"agent_id:{A}").allowed
    assert decide(principal, f"agent_id:{A}:call:{CALL}").allowed
    assert decide(principal, f"agent_id:{A}:*").allowed
    assert_denied(decide(principal, f"agent_id:{OTHER_A}:call"),
                  f"topic is for agent {OTHER_A}, you are agent {A}")


@pytest.mark.parametrize("topic", CUSTOMER_TOPICS)
def test_accesskey_sees_its_customer(topic):
    assert decide(accesskey(), topic).allowed


def test_accesskey_refused_other_customer_and_agent_topics():
    assert_denied(decide(accesskey(), f"customer_id:{OTHER_C}"), f"customer {OTHER_C}")
    assert_denied(decide(accesskey(), f"agent_id:{A}"), "agent topics are for agents only",
                  "'accesskey'")


def test_principal_without_customer_refused_customer_topics():
    assert_denied(decide(accesskey(customer_id=None), f"customer_id:{C}"),
                  "you belong to no customer")


def test_direct_token_four_segments_allowed_resource():
    assert decide(direct("call"), f"customer_id:{C}:call:{CALL}").allowed


@pytest.mark.parametrize("topic,fragment", [
    (f"customer_id:{C}:call", "exactly 4 segments"),
    (f"customer_id:{C}", "exactly 4 segments"),
    (f"customer_id:{C}:call:{CALL}:recording", "exactly 4 segments"),
    (f"customer_id:{C}:call:*", "wildcards"),
    (f"customer_id:{C}:*:{CALL}", "wildcards"),
    (f"customer_id:{C}:queuecall:{CALL}", "may not see 'queuecall' (its allowed_resources: call)"),
    (f"customer_id:{OTHER_C}:call:{CALL}", f"topic is for customer {OTHER_C}"),
    (f"agent_id:{A}:call:{CALL}", "agent topics are for agents only"),
])
def test_direct_token_refusals(topic, fragment):
    assert_denied(decide(direct("call"), topic), fragment)


def test_direct_token_without_resources_names_none():
    assert_denied(decide(direct(), f"customer_id:{C}:call:{CALL}"), "allowed_resources: none")


@pytest.mark.parametrize("topic", [f"customer_id:{C}", f"customer_id:{OTHER_C}:call:*",
                                   f"agent_id:{OTHER_A}", f"agent_id:{A}:call"])
@pytest.mark.parametrize("kind", ["agent", "accesskey", "direct"])
def test_super_admin_sees_everything(topic, kind):
    principal = Principal(kind, "root", customer_id=None,
                          agent_id=A if kind == "agent" else None,
                          permissions=frozenset({"project_super_admin"}))
    assert decide(principal, topic).allowed


@pytest.mark.parametrize("principal", [agent(), accesskey(), direct()])
def test_unsubscribe_is_always_allowed(principal):
    assert decide(principal, f"customer_id:{OTHER_C}:call", "unsubscribe").allowed
    assert decide(principal, f"agent_id:{OTHER_A}", "unsubscribe").allowed


def test_unknown_action_refused():
    assert_denied(decide(agent("customer_admin"), f"customer_id:{C}", "publish"),
                  "unknown action")


@pytest.mark.parametrize("cls", [VoipbinAuthorizer, AllowAllAuthorizer])
def test_options_refused(cls):
    with pytest.raises(OptionError) as info:
        cls({"strict": True})
    assert info.value.key == "strict"
    assert "known: none" in str(info.value)


def test_allow_all_allows_everything():
    allow_all = AllowAllAuthorizer({})
    assert allow_all.authorize(direct(), parse_topic(f"agent_id:{OTHER_A}"), "subscribe").allowed
