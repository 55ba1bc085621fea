"""The configuration: one TOML file parsed once into frozen dataclasses.

Every default lives in this module and nowhere else. Loading checks every key
and type; an error names the file, the table and the key. A value written as
``{env = "NAME"}`` is read from the environment variable NAME (for secrets).

Plugin option tables (``[auth.options]``, ``[permissions.options]``) are kept
as plain mappings here: each plugin checks its own options when it is built.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsgate.audit.witness import check_witness_url
from wsgate.topics import is_uuid


class ConfigError(Exception):
    """A configuration file that cannot be used. The message says where and why."""


class Secret(str):
    """A string that must never be printed: its ``repr`` hides the value."""

    def __repr__(self) -> str:
        return "Secret('***')"


class ScopedSecret(Secret):
    """A key that may be limited to customers (ingest keys, HMAC secrets, audit API keys).

    Written as a string, ``{env = "NAME"}``, or ``{key = <either>, customers =
    ["<uuid>", ...]}``. ``customers`` is None for an unscoped key (all customers).
    """

    customers: frozenset[str] | None = None

    def __repr__(self) -> str:
        return "ScopedSecret('***')"

    def scope(self) -> str:
        """What the key may reach, for logs: its customer ids, or ``all``."""
        return "all" if self.customers is None else ",".join(sorted(self.customers))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Browser origins allowed to open a WebSocket; a request with no Origin header is allowed.
    allowed_origins: tuple[str, ...] = ()
    #: Identifies this process in the audit log (default: host name and port).
    node_id: str = ""
    #: Seconds between WebSocket pings sent by the server.
    ping_interval: float = 25.0
    #: Seconds a peer has to answer a ping before it is closed (at most ping_interval).
    ping_timeout: float = 10.0
    #: Largest client message in bytes (all its fragments); a bigger one closes with 1009.
    max_message_size: int = 65536
    #: Longest credential in bytes (UTF-8), at the upgrade and in ``authenticate``: a
    #: longer one is refused (401 / ``unauthenticated``) before the authenticator is asked.
    max_token_bytes: int = 8192
    #: Most frames one client message may take (its first frame and continuations,
    #: empty ones too); one more closes the connection with 1009.
    max_fragments: int = 1000
    #: Subscriptions one connection may hold.
    max_subscriptions: int = 1000
    #: The memory budget of one connection: bytes held for it (unsent events, replies
    #: and pongs, and its incoming message not yet whole); past it, closed with 4008.
    max_output_buffer: int = 1048576
    #: Bad client messages tolerated per minute before a 1008 close.
    max_bad_messages_per_minute: int = 20
    #: Topics refused in subscribe/unsubscribe replies (audit_unavailable aside) tolerated
    #: per minute before a 1008 close; each is an audit row, so there is no "unlimited".
    max_rejected_topics_per_minute: int = 100
    #: Client messages per second (averaged over 10 s) before a 1008 close; 0 = unlimited.
    max_messages_per_second: float = 100.0
    #: Open connections per principal subject and per remote address; 0 = unlimited.
    #: Each can cost ~1 MiB (max_output_buffer, subscriptions): docs/security.md
    #: ("Sizing the connection limits") says how to size them.
    max_connections_per_principal: int = 100
    max_connections_per_ip: int = 1000
    #: Seconds an HTTP connection may stay idle, and may take to send its body.
    idle_connection_timeout: float = 60.0
    body_timeout: float = 30.0
    #: Seconds given to open connections to close on SIGTERM.
    shutdown_timeout: float = 10.0
    #: Seconds between re-checks of connected principals (authenticator.refresh); 0 = never.
    refresh_interval: float = 300.0
    #: The event loop: "uvloop" (libuv; the standard loop where uvloop is not
    #: installed, with a warning) or "asyncio" (the standard library's).
    event_loop: str = "uvloop"


@dataclass(frozen=True)
class PluginConfig:
    plugin: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


#: The values of ``[server] event_loop``.
EVENT_LOOPS = ("uvloop", "asyncio")

#: The least ``[ingest] idempotency_max_bytes`` may give each ingest key: more
#: than the answer to a full batch (1000 event ids as JSON are about 39 KB).
MIN_IDEMPOTENCY_SHARE = 65536


@dataclass(frozen=True)
class IngestConfig:
    #: Bearer keys accepted on POST /v1.0/events; an entry
    #: ``{key = ..., customers = [...]}`` is scoped to those customers (SPEC §3).
    keys: tuple[ScopedSecret, ...] = ()
    #: Secrets for the X-Wsgate-Signature HMAC scheme (scoped the same way).
    hmac_secrets: tuple[ScopedSecret, ...] = ()
    #: Seconds a signed request's timestamp may differ from the server's clock.
    signature_window: int = 300
    max_body_bytes: int = 1048576
    max_batch: int = 1000
    #: Bytes of answers remembered by Idempotency-Key, shared equally among the
    #: ingest keys (keys and hmac_secrets); each key's share is evicted oldest first.
    idempotency_max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class AuditConfig:
    #: SQLAlchemy URL of the audit store.
    url: str = "sqlite:///wsgate-audit.db"
    #: Ed25519 private key (PEM) that signs chain checkpoints, inline or by file.
    signing_key: Secret | None = None
    signing_key_file: str = ""
    #: Ed25519 public key (PEM) that verify checks signatures against.
    verify_key_file: str = ""
    #: Rows between signed checkpoints.
    checkpoint_every: int = 1000
    #: Seconds rows may stay unsealed (after the last checkpoint) before one is signed.
    checkpoint_interval: float = 60.0
    #: Where unsubscribe rows wait while the store is down.
    journal_path: str = "wsgate-audit.journal"
    #: Milliseconds a group commit waits to gather more rows.
    group_commit_ms: float = 2.0
    #: Most rows in one transaction.
    group_commit_max_rows: int = 5000
    #: Seconds between attempts to reach a failed store (subscribes are refused meanwhile).
    retry_interval: float = 1.0
    #: Keys for GET /v1.0/audit and the review page; an entry
    #: ``{key = ..., customers = [...]}`` sees only those customers' rows (SPEC §6).
    api_keys: tuple[ScopedSecret, ...] = ()
    #: Record every ingested event (id, type, topics, payload hash) for `audit recipients`.
    record_events: bool = True
    #: Where every signed checkpoint is also kept, outside the database: file:///absolute/path
    #: (JSON lines, fsynced) or http(s)://host/path (POSTed). See docs/audit.md, "Witnesses".
    witness: tuple[Secret, ...] = ()


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "memory://"


@dataclass(frozen=True)
class HistoryConfig:
    #: Events kept per scope for resume; 0 disables history.
    size: int = 100
    #: Seconds an event stays resumable.
    ttl: float = 300.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class MetricsConfig:
    """Where ``GET /metrics`` is served; never openly on the main port."""

    #: Bearer keys that may scrape /metrics on the main port (empty: not served there).
    keys: tuple[Secret, ...] = ()
    #: A separate listener for /metrics only, no key needed (0: none). Keep it private.
    port: int = 0
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: PluginConfig = field(default_factory=lambda: PluginConfig(plugin="static"))
    permissions: PluginConfig = field(default_factory=lambda: PluginConfig(plugin="voipbin"))
    ingest: IngestConfig = field(default_factory=IngestConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: The file this was loaded from, for messages and relative paths.
    source: str = "<defaults>"


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("logging", "level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
    ("logging", "format"): ("text", "json"),
}


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a TOML config file.

    Raises:
        ConfigError: the file is missing, not TOML, or has an unknown key, a
            wrong type, a bad value or a missing environment variable. The
            message names the file, the table and the key.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return config_from_dict(raw, source=str(p))


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from an already parsed TOML document (see load_config)."""
    tables: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name == "source" or name not in hints:
            known = ", ".join(f"[{n}]" for n in hints if n != "source")
            raise ConfigError(f"{source}: unknown table [{name}] (known tables: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        tables[name] = _build(hints[name], value, source, name)
    cfg = Config(source=source, **tables)
    _check(cfg)
    return cfg


def _build(cls: Any, table: Mapping[str, Any], source: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(
                f"{source}: [{where}] unknown key {key!r} (known keys: {', '.join(sorted(names))})"
            )
        at = f"{source}: [{where}] {key}"
        if cls is PluginConfig and key == "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{at}: must be a table")
            values[key] = types.MappingProxyType(resolve_secrets(value, at))
            continue
        values[key] = _coerce(hints[key], value, at)
        choices = _CHOICES.get((where, key))
        if choices and values[key] not in choices:
            raise ConfigError(f"{at}: must be one of {', '.join(choices)}, not {value!r}")
    return cls(**values)


def resolve_secrets(value: Any, at: str) -> Any:
    """Replace every ``{env = "NAME"}`` inside value by the environment value (as Secret)."""
    if isinstance(value, dict):
        if set(value) == {"env"}:
            return _env_secret(value, at)
        return {k: resolve_secrets(v, f"{at}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_secrets(v, at) for v in value]
    return value


def _env_secret(value: Mapping[str, Any], at: str) -> Secret:
    name = value["env"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{at}: env must name an environment variable")
    if name not in os.environ:
        raise ConfigError(f"{at}: environment variable {name} is not set")
    return Secret(os.environ[name])


def _coerce(hint: Any, value: Any, at: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, at)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{at}: must be a list, not {_tname(value)}")
        return tuple(_coerce(args[0], v, f"{at}[{i}]") for i, v in enumerate(value))
    if hint is ScopedSecret:
        return _scoped_secret(value, at)
    if hint is Secret:
        if isinstance(value, dict) and set(value) == {"env"}:
            return _env_secret(value, at)
        if isinstance(value, str):
            return Secret(value)
        raise ConfigError(f'{at}: must be a string or {{env = "NAME"}}, not {_tname(value)}')
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}: must be a number, not {_tname(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}: must be an integer, not {_tname(value)}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{at}: must be a {hint.__name__}, not {_tname(value)}")
        return value
    raise ConfigError(f"{at}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def _scoped_secret(value: Any, at: str) -> ScopedSecret:
    if isinstance(value, dict) and set(value) != {"env"}:
        unknown = set(value) - {"key", "customers"}
        if unknown or "key" not in value or "customers" not in value:
            raise ConfigError(f'{at}: a scoped key is {{key = "..." or {{env = "NAME"}}, '
                              f'customers = ["<uuid>", ...]}}, not a table with '
                              f'{", ".join(sorted(value)) or "no keys"}')
        secret = ScopedSecret(_coerce(Secret, value["key"], f"{at}.key"))
        customers = value["customers"]
        if not isinstance(customers, list) or not customers:
            raise ConfigError(f"{at}.customers: must be a non-empty list of customer ids "
                              f"(leave customers out for a key of all customers)")
        for n, cid in enumerate(customers):
            if not isinstance(cid, str) or not is_uuid(cid):
                raise ConfigError(f"{at}.customers[{n}]: must be a UUID in canonical lower-case "
                                  f"form, like 5013bc52-da9a-11ee-844f-2fa34248de28, not "
                                  f"{cid!r}" if isinstance(cid, str) else
                                  f"{at}.customers[{n}]: must be a string, not {_tname(cid)}")
        secret.customers = frozenset(customers)
        return secret
    return ScopedSecret(_coerce(Secret, value, at))


def _tname(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


def _check(cfg: Config) -> None:
    s = cfg.server
    src = cfg.source

    def bad(table: str, key: str, why: str) -> ConfigError:
        return ConfigError(f"{src}: [{table}] {key}: {why}")

    if not 0 < s.port < 65536:
        raise bad("server", "port", f"must be 1 to 65535, not {s.port}")
    for name in ("ping_interval", "ping_timeout", "shutdown_timeout",
                 "idle_connection_timeout", "body_timeout"):
        if getattr(s, name) <= 0:
            raise bad("server", name, "must be greater than 0")
    if s.ping_timeout > s.ping_interval:
        raise bad("server", "ping_timeout", "must not be longer than ping_interval")
    for name in ("max_message_size", "max_fragments", "max_subscriptions", "max_output_buffer",
                 "max_bad_messages_per_minute", "max_rejected_topics_per_minute"):
        if getattr(s, name) < 1:
            raise bad("server", name, "must be at least 1")
    for name in ("max_messages_per_second", "max_connections_per_principal",
                 "max_connections_per_ip", "refresh_interval"):
        if getattr(s, name) < 0:
            raise bad("server", name, "must not be negative")
    for origin in s.allowed_origins:
        if origin != "*" and "://" not in origin:
            raise bad("server", "allowed_origins",
                      f"{origin!r} is not an origin like https://app.example.com")
    if s.max_token_bytes < 1:
        raise bad("server", "max_token_bytes", "must be at least 1")
    if s.event_loop not in EVENT_LOOPS:
        raise bad("server", "event_loop",
                  f"must be one of {', '.join(EVENT_LOOPS)}, not {s.event_loop!r}")
    if not cfg.auth.plugin:
        raise bad("auth", "plugin", "must name an authenticator")
    if not cfg.permissions.plugin:
        raise bad("permissions", "plugin", "must name an authorizer")
    i = cfg.ingest
    if i.max_body_bytes < 1 or i.max_batch < 1 or i.signature_window < 1:
        raise bad("ingest", "max_body_bytes/max_batch/signature_window", "must be at least 1")
    shares = max(1, len(i.keys) + len(i.hmac_secrets))
    if i.idempotency_max_bytes < MIN_IDEMPOTENCY_SHARE * shares:
        raise bad("ingest", "idempotency_max_bytes",
                  f"must be at least {MIN_IDEMPOTENCY_SHARE} bytes per ingest key "
                  f"({MIN_IDEMPOTENCY_SHARE * shares} for {shares}), not {i.idempotency_max_bytes}")
    a = cfg.audit
    if not a.url:
        raise bad("audit", "url", "must be a SQLAlchemy URL")
    if a.retry_interval <= 0:
        raise bad("audit", "retry_interval", "must be greater than 0")
    if a.checkpoint_interval <= 0:
        raise bad("audit", "checkpoint_interval", "must be greater than 0 (seconds)")
    if a.group_commit_ms < 0 or a.group_commit_max_rows < 1 or a.checkpoint_every < 1:
        raise bad("audit", "group_commit_ms/group_commit_max_rows/checkpoint_every",
                  "out of range")
    for n, url in enumerate(a.witness):
        try:
            check_witness_url(url)
        except ValueError as exc:
            raise bad("audit", f"witness[{n}]", str(exc)) from None
    if cfg.broker.url != "memory://" and not cfg.broker.url.startswith(("redis://", "rediss://")):
        raise bad("broker", "url", f"must be memory:// or redis://..., not {cfg.broker.url!r}")
    m = cfg.metrics
    if not 0 <= m.port < 65536:
        raise bad("metrics", "port", f"must be 1 to 65535, or 0 for no separate port, not {m.port}")
    if m.port and m.port == s.port and m.host == s.host:
        raise bad("metrics", "port", "must differ from [server] port (or leave it 0 and set keys)")
    if m.port and not m.host:
        raise bad("metrics", "host", "must name the address to listen on, e.g. 127.0.0.1")
    if cfg.history.size < 0 or cfg.history.ttl <= 0:
        raise bad("history", "size/ttl", "size must not be negative and ttl must be positive")
