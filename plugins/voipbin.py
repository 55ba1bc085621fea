# mypy: disallow-untyped-defs
"""``voipbin`` (the default authorizer) and ``allow_all``.

The VoIPBin rules of SPEC §4, checked in this order for a subscribe:

1. ``project_super_admin`` may subscribe to any valid topic.
2. ``customer_id:<C>...``: C must be the principal's customer, and then an
   agent needs ``customer_admin`` or ``customer_manager``; an access key
   always may; a direct token only to ``customer_id:<C>:<resource>:<id>``
   (exactly 4 segments, no ``*``) with ``<resource>`` in its
   ``allowed_resources``.
3. ``agent_id:<A>...``: only the agent whose id is A.

Everything else is ``forbidden`` with a message naming the rule. Ids are
not secrets: a refusal may show the topic's id and the principal's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wsgate.plugins import Authorizer, Decision, Principal
from wsgate.topics import Topic

from ._principal import check_option_keys

MANAGING_PERMISSIONS = ("customer_admin", "customer_manager")
#: A direct token sees one resource: customer_id:<C>:<resource>:<id>.
DIRECT_TOPIC_SEGMENTS = 4


class VoipbinAuthorizer(Authorizer):
    """VoIPBin's subscription rules (SPEC §4). Takes no options.

    Unsubscribe is always allowed: a client may always drop what it holds.
    Refusing it would only keep events flowing to a connection that asked to
    stop (possibly because its rights shrank), and it cannot widen what the
    client sees. Whether the topic is held at all is the gateway's
    ``not_subscribed`` check, not a permission question.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Raises: OptionError for any option (there are none)."""
        super().__init__(options)
        check_option_keys(options, (), "voipbin")

    def authorize(self, principal: Principal, topic: Topic, action: str) -> Decision:
        """Apply the rules of the module docstring; see Authorizer.authorize."""
        if action == "unsubscribe":
            return Decision.allow()
        if action != "subscribe":
            return Decision.deny(f"unknown action {action!r}")
        if "project_super_admin" in principal.permissions:
            return Decision.allow()
        if topic.scope == "customer_id":
            return _customer_topic(principal, topic)
        return _agent_topic(principal, topic)


def _customer_topic(principal: Principal, topic: Topic) -> Decision:
    customer = topic.scope_id
    if principal.customer_id is None:
        return Decision.deny(f"topic is for customer {customer}; you belong to no customer")
    if customer != principal.customer_id:
        return Decision.deny(f"topic is for customer {customer}, "
                             f"you belong to {principal.customer_id}")
    if principal.kind == "accesskey":
        return Decision.allow()
    if principal.kind == "agent":
        if principal.permissions.intersection(MANAGING_PERMISSIONS):
            return Decision.allow()
        return Decision.deny("customer topics need the customer_admin or customer_manager "
                             "permission; agents may subscribe to their own agent_id topics")
    # A direct token: one concrete resource, nothing wider.
    if len(topic.segments) != DIRECT_TOPIC_SEGMENTS:
        return Decision.deny("a direct token may only subscribe to "
                             "customer_id:<customer>:<resource>:<id> (exactly 4 segments), "
                             f"this topic has {len(topic.segments)}")
    if topic.has_wildcard:
        return Decision.deny("a direct token may not use '*' wildcards")
    resource = topic.segments[2]
    if resource not in principal.allowed_resources:
        allowed = ", ".join(sorted(principal.allowed_resources)) or "none"
        return Decision.deny(f"this direct token may not see {resource!r} "
                             f"(its allowed_resources: {allowed})")
    return Decision.allow()


def _agent_topic(principal: Principal, topic: Topic) -> Decision:
    if principal.kind != "agent":
        return Decision.deny(f"agent topics are for agents only; you are {principal.kind!r}")
    if topic.scope_id != principal.agent_id:
        return Decision.deny(f"topic is for agent {topic.scope_id}, you are agent "
                             f"{principal.agent_id}")
    return Decision.allow()


class AllowAllAuthorizer(Authorizer):
    """Allows every action on every topic. For development and benchmarks only:
    with it, any authenticated client sees every customer's events. Takes no options.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Raises: OptionError for any option (there are none)."""
        super().__init__(options)
        check_option_keys(options, (), "allow_all")

    def authorize(self, principal: Principal, topic: Topic, action: str) -> Decision:
        """Always Decision.allow()."""
        return Decision.allow()
