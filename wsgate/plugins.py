"""The plugin contracts and the loader (SPEC §4).

Two kinds of plugin, each a class built once at start-up from its options
table:

* :class:`Authenticator` turns a credential into a :class:`Principal`, raises
  :class:`Refused` (the client gets 401) or :class:`Unavailable` (503).
* :class:`Authorizer` decides whether a principal may subscribe to (or
  unsubscribe from) a topic, answering with a :class:`Decision`.

A plugin is named in the config by an entry-point name in the
``wsgate.authenticators`` / ``wsgate.authorizers`` group, or by a
``package.module:Class`` path. See docs/plugins.md.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any, TypeVar

from wsgate import errors
from wsgate.topics import Topic

AUTHENTICATOR_GROUP = "wsgate.authenticators"
AUTHORIZER_GROUP = "wsgate.authorizers"

KINDS = ("agent", "accesskey", "direct")
PERMISSIONS = ("project_super_admin", "customer_agent", "customer_admin", "customer_manager")


class PluginError(Exception):
    """A plugin that cannot be loaded or built; the message says which and why."""


class OptionError(PluginError):
    """A bad plugin option. Raise it from ``__init__``; ``key`` names the option."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"option {key!r}: {message}")
        self.key = key
        self.message = message


class Refused(Exception):
    """The credential is not valid (the client gets 401). The message is shown to it."""


class Unavailable(Exception):
    """The authenticator cannot decide now (its backend is down or slow): 503."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is connected, as the authenticator established it.

    Attributes:
        kind: ``agent``, ``accesskey`` or ``direct``.
        subject: a stable name for the principal (an agent id, a key id...);
            a token renewal must keep it.
        customer_id: the customer the principal belongs to, if any.
        agent_id: the agent's own id (agents only).
        permissions: permission names (see PERMISSIONS).
        allowed_resources: the resource names a direct token may see.
        expires_at: when the credential stops being valid (timezone-aware), or None.
    """

    kind: str
    subject: str
    customer_id: str | None = None
    agent_id: str | None = None
    permissions: frozenset[str] = field(default_factory=frozenset)
    allowed_resources: frozenset[str] = field(default_factory=frozenset)
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"principal kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not isinstance(self.subject, str) or not self.subject:
            raise ValueError("principal subject must be a non-empty string")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("principal expires_at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class Decision:
    """An authorizer's answer. When ``allowed`` is false, ``code`` and ``message`` say why."""

    allowed: bool
    code: str = ""
    message: str = ""

    @classmethod
    def allow(cls) -> Decision:
        return _ALLOW

    @classmethod
    def deny(cls, message: str, code: str = errors.FORBIDDEN) -> Decision:
        return cls(False, code, message)


_ALLOW = Decision(True)


class Authenticator(abc.ABC):
    """Base class of authenticators.

    Subclasses take their options table in ``__init__`` and check it there,
    raising :class:`OptionError` for a bad option so that start-up stops with
    a message naming the key.
    """

    #: The name written in the audit log; set by the loader to the configured name.
    name: str = ""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = options

    @abc.abstractmethod
    async def authenticate(self, credential: str) -> Principal:
        """Turn a credential into a principal.

        Returns:
            the principal.
        Raises:
            Refused: the credential is not valid; the message says why (no secrets).
            Unavailable: the answer cannot be known now.
        """

    async def refresh(self, principal: Principal) -> Principal | None:
        """Re-check a principal that is still connected.

        Called every ``server.refresh_interval`` seconds per connection.
        Return the (possibly updated) principal to keep it, or None when it
        lost its rights (the connection is closed with 4003). Raise
        :class:`Unavailable` to keep the connection and ask again later. The
        default keeps every principal.
        """
        return principal

    def mint(self, principal: Principal, ttl: float | None) -> str:
        """Make a development token for principal (``wsgate token``).

        Raises:
            NotImplementedError: this authenticator cannot mint tokens.
        """
        raise NotImplementedError(f"the {self.name or type(self).__name__} authenticator "
                                  "cannot mint tokens")

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the plugin holds (sessions, files). Called at shutdown."""


class Authorizer(abc.ABC):
    """Base class of authorizers: may this principal do this to this topic?"""

    name: str = ""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = options

    @abc.abstractmethod
    def authorize(self, principal: Principal, topic: Topic, action: str) -> Decision:
        """Decide. Must be fast and must not block: it runs on the event loop.

        Args:
            principal: who asks.
            topic: the parsed, valid topic.
            action: ``subscribe`` or ``unsubscribe``.
        Returns:
            a Decision; a refusal's message tells the client which rule refused it.
        """


P = TypeVar("P", bound=Authenticator | Authorizer)


def load_plugin_class(group: str, spec: str, base: type[P]) -> type[P]:
    """Find a plugin class by entry-point name or ``module:Class`` path.

    Raises:
        PluginError: no such entry point, module or attribute, or the object
            is not a subclass of ``base``.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise PluginError(f"plugin {spec!r}: a path is written 'package.module:Class'")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise PluginError(f"plugin {spec!r}: module {exc.name!r} not found") from None
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise PluginError(
                    f"plugin {spec!r}: module {module_name!r} has no attribute {attr!r}"
                ) from None
    else:
        found = entry_points(group=group, name=spec)
        if not found:
            names = sorted(ep.name for ep in entry_points(group=group))
            raise PluginError(
                f"plugin {spec!r}: no entry point of that name in group {group!r} "
                f"(installed: {', '.join(names) or 'none'}); "
                "give an entry-point name or a 'package.module:Class' path"
            )
        try:
            obj = next(iter(found)).load()
        except Exception as exc:
            raise PluginError(f"plugin {spec!r}: its entry point failed to load: {exc}") from exc
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise PluginError(
            f"plugin {spec!r}: {obj!r} is not a subclass of wsgate.plugins.{base.__name__}"
        )
    return obj


def build_plugin(group: str, spec: str, base: type[P], options: Mapping[str, Any]) -> P:
    """Load and instantiate a plugin with its options.

    Raises:
        PluginError: as load_plugin_class, or an option was refused (the
            message names the plugin and the key).
    """
    cls = load_plugin_class(group, spec, base)
    try:
        plugin = cls(options)
    except OptionError as exc:
        raise PluginError(f"plugin {spec!r}: {exc}") from None
    plugin.name = spec
    return plugin
