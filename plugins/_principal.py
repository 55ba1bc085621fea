# mypy: disallow-untyped-defs
"""Helpers shared by the shipped authenticators.

* :func:`principal_from_mapping` turns a mapping of fields (a static token's
  table, an HTTP backend's answer, claims already renamed by the JWT plugin)
  into a :class:`~wsgate.plugins.Principal`, raising :class:`PrincipalError`
  that names the bad field.
* :func:`principal_to_mapping` is its inverse, for JSON bodies.
* :func:`check_option_keys`, :func:`seconds_option` and :func:`bool_option`
  check plugin options; an unknown key is refused, so a typo in the config
  stops start-up instead of being silently ignored.

Nothing here ever puts a credential in a message: callers pass ``where`` (a
description such as ``tokens[#3]``), never the token itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from wsgate.config import _tname
from wsgate.plugins import KINDS, PERMISSIONS, OptionError, Principal
from wsgate.topics import is_uuid

#: VoIPBin's permission bit mask. Bits not listed here are other VoIPBin
#: permissions that do not concern event subscriptions: they are ignored.
PERMISSION_BITS: Mapping[int, str] = {
    0x01: "project_super_admin",
    0x10: "customer_agent",
    0x20: "customer_admin",
    0x40: "customer_manager",
}

#: The fields a principal mapping may hold; ``kind`` and ``subject`` are required.
FIELDS = ("kind", "subject", "customer_id", "agent_id", "permissions",
          "allowed_resources", "expires_at")

_UUID_FORM = "a canonical lower-case UUID like 5013bc52-da9a-11ee-844f-2fa34248de28"


class PrincipalError(ValueError):
    """A field that cannot become part of a principal.

    Attributes:
        field: the principal field at fault (one of FIELDS, or the unknown key).
        where: the caller's description of the source, e.g. ``tokens[#2]``.
        reason: what is wrong, without the field name.
    """

    def __init__(self, where: str, field: str, reason: str) -> None:
        self.where = where
        self.field = field
        self.reason = reason
        super().__init__(f"{self.key}: {reason}")

    @property
    def key(self) -> str:
        """``where.field``, or whichever of the two is not empty."""
        return ".".join(part for part in (self.where, self.field) if part)


def principal_from_mapping(data: object, *, where: str = "") -> Principal:
    """Build a principal from a mapping of its fields, checking each one.

    Args:
        data: a mapping with ``kind`` (agent, accesskey, direct) and
            ``subject`` (non-empty string), and optionally ``customer_id`` and
            ``agent_id`` (canonical lower-case UUIDs; an agent needs
            ``agent_id``), ``permissions`` (a list of names from
            wsgate.plugins.PERMISSIONS, or VoIPBin's integer bit mask),
            ``allowed_resources`` (a list of non-empty strings) and
            ``expires_at`` (a timezone-aware datetime, an RFC 3339 string
            with an offset, a number of seconds since the epoch, or None).
        where: how messages name the source, e.g. ``tokens[#2]``.
    Returns:
        the principal.
    Raises:
        PrincipalError: a field is missing, unknown or of the wrong form; the
            error names it.
    """
    if not isinstance(data, Mapping):
        raise PrincipalError(where, "", f"must be a table of principal fields, not {_tname(data)}")
    for key in data:
        if key not in FIELDS:
            raise PrincipalError(where, str(key),
                                 f"unknown principal field (known: {', '.join(FIELDS)})")
    for required in ("kind", "subject"):
        if data.get(required) is None:
            raise PrincipalError(where, required, "is required")
    kind = data["kind"]
    if kind not in KINDS:
        raise PrincipalError(where, "kind", f"must be one of {', '.join(KINDS)}, not {_show(kind)}")
    subject = data["subject"]
    if not isinstance(subject, str) or not subject.strip():
        raise PrincipalError(where, "subject", "must be a non-empty string")
    customer_id = _uuid_field(data, "customer_id", where)
    agent_id = _uuid_field(data, "agent_id", where)
    if kind == "agent" and agent_id is None:
        raise PrincipalError(where, "agent_id", "is required for an agent")
    permissions = parse_permissions(data.get("permissions"), where=where)
    resources = data.get("allowed_resources")
    if resources is None:
        resources = []
    if not isinstance(resources, list) or not all(isinstance(r, str) and r for r in resources):
        raise PrincipalError(where, "allowed_resources", "must be a list of non-empty strings")
    return Principal(
        kind=kind,
        subject=subject,
        customer_id=customer_id,
        agent_id=agent_id,
        permissions=permissions,
        allowed_resources=frozenset(resources),
        expires_at=parse_expiry(data.get("expires_at"), where=where),
    )


def parse_permissions(value: object, *, where: str = "",
                      field: str = "permissions") -> frozenset[str]:
    """Permission names from a list of names or VoIPBin's integer bit mask.

    None means no permission. Unknown names are refused (a typo would
    otherwise silently remove a right); unknown bits of a mask are ignored.

    Raises:
        PrincipalError: naming ``field``.
    """
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise PrincipalError(where, field, "a permission bit mask cannot be negative")
        return frozenset(name for bit, name in PERMISSION_BITS.items() if value & bit)
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        unknown = [p for p in value if p not in PERMISSIONS]
        if unknown:
            raise PrincipalError(where, field, f"unknown permission {_show(unknown[0])} "
                                 f"(known: {', '.join(PERMISSIONS)})")
        return frozenset(value)
    raise PrincipalError(where, field, "must be a list of permission names or an integer "
                         f"bit mask, not {_tname(value)}")


def permission_mask(permissions: Iterable[str]) -> int:
    """VoIPBin's integer bit mask for permission names (the inverse of parse_permissions)."""
    bits = {name: bit for bit, name in PERMISSION_BITS.items()}
    mask = 0
    for name in permissions:
        mask |= bits[name]
    return mask


def parse_expiry(value: object, *, where: str = "", field: str = "expires_at") -> datetime | None:
    """A timezone-aware UTC datetime from a datetime, RFC 3339 string or epoch seconds.

    Raises:
        PrincipalError: naming ``field``; a datetime without offset is refused
            because its meaning would depend on the server's time zone.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise PrincipalError(where, field, "is not a representable time") from None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise PrincipalError(where, field, "must be an RFC 3339 time like "
                                 "2030-01-01T00:00:00Z") from None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise PrincipalError(where, field, "needs a time zone offset (e.g. Z or +00:00)")
        try:
            return value.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:59:59-23:59 is past the year 9999 in UTC
            raise PrincipalError(where, field, "is not a representable time") from None
    raise PrincipalError(where, field, "must be a time (RFC 3339 string or seconds since "
                         f"the epoch), not {_tname(value)}")


def principal_to_mapping(principal: Principal) -> dict[str, Any]:
    """The JSON-ready form of a principal, as principal_from_mapping reads it."""
    return {
        "kind": principal.kind,
        "subject": principal.subject,
        "customer_id": principal.customer_id,
        "agent_id": principal.agent_id,
        "permissions": sorted(principal.permissions),
        "allowed_resources": sorted(principal.allowed_resources),
        "expires_at": (principal.expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
                       if principal.expires_at else None),
    }


def check_option_keys(options: Mapping[str, Any], known: Iterable[str], plugin: str) -> None:
    """Refuse option keys a plugin does not take.

    Raises:
        OptionError: naming the first unknown key and listing the known ones.
    """
    known = tuple(known)
    for key in options:
        if key not in known:
            listed = ", ".join(known) if known else "none"
            raise OptionError(key, f"unknown option for the {plugin} plugin (known: {listed})")


def seconds_option(options: Mapping[str, Any], key: str, default: float, *,
                   minimum: float = 0.0, above: bool = False) -> float:
    """A number of seconds: at least ``minimum``, or greater than it when ``above``.

    Raises:
        OptionError: naming key.
    """
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(key, "must be a number of seconds")
    if value < minimum or (above and value == minimum):
        raise OptionError(key, f"must be {'greater than' if above else 'at least'} {minimum:g}")
    return float(value)


def bool_option(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """A true/false option. Raises: OptionError naming key."""
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise OptionError(key, "must be true or false")
    return value


def _uuid_field(data: Mapping[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not is_uuid(value):
        raise PrincipalError(where, name, f"must be {_UUID_FORM}, not {_show(value)}")
    return str(value)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."



def url_option(value: object, key: str) -> str:
    """An http:// or https:// URL with a host, from option ``key``.

    Raises:
        OptionError: naming the key and what it got (scheme and host only).
    """
    if not isinstance(value, str):
        raise OptionError(key, "must be an http:// or https:// URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionError(key, f"must be an http:// or https:// URL with a host, not "
                          f"{parts.scheme or 'no scheme'}://{parts.hostname or ''}")
    return value


def url_host(url: str) -> str:
    """scheme://host:port only, for logs and messages: a URL may hold credentials
    or tokens in its query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
