"""The ``wsgate`` command: serve, check-config, token, listen, audit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from wsgate.config import Config, ConfigError, load_config
from wsgate.logs import setup_logging
from wsgate.plugins import PERMISSIONS, Authenticator, Authorizer, PluginError, Principal


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"wsgate: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from wsgate.app import serve

    config = _load(args.config)
    setup_logging(config.logging)
    try:
        asyncio.run(serve(config))
    except PluginError as exc:
        print(f"wsgate: {args.config}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"wsgate: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _plugins(config: Config, path: str) -> tuple[Authenticator, Authorizer]:
    """Build the configured plugins, or exit 2 naming the file and the plugin's error."""
    from wsgate.app import build_plugins

    try:
        return build_plugins(config)
    except PluginError as exc:
        raise SystemExit(f"wsgate: {path}: {exc}") from None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    authenticator, _ = _plugins(config, args.file)
    asyncio.run(authenticator.close())
    print(f"{args.file}: OK (auth {config.auth.plugin}, permissions {config.permissions.plugin}, "
          f"broker {config.broker.url})")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config)
    authenticator, _ = _plugins(config, args.config)
    if not (args.subject or args.agent):
        print("wsgate token: give --subject (or --agent): the principal the token is for",
              file=sys.stderr)
        return 2
    expires = None
    if args.ttl:
        expires = datetime.now(UTC) + timedelta(seconds=args.ttl)
    try:
        principal = Principal(
            kind=args.kind, subject=args.subject or args.agent,
            customer_id=args.customer, agent_id=args.agent,
            permissions=frozenset(args.permission or ()),
            allowed_resources=frozenset(args.resource or ()), expires_at=expires)
        token = authenticator.mint(principal, args.ttl)
    except (ValueError, NotImplementedError, LookupError) as exc:
        print(f"wsgate token: {exc}", file=sys.stderr)
        return 2
    finally:
        asyncio.run(authenticator.close())
    print(token)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from wsgate.listen import listen

    try:
        return asyncio.run(listen(args.url, args.token, args.topics, since=args.since))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsgate", description="Real-time event gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="TOML config file")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and its plugin options")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("token", help="mint a development token for the configured authenticator")
    p.add_argument("--config", required=True)
    p.add_argument("--subject", help="principal subject (default: the agent id)")
    p.add_argument("--kind", default="agent", choices=("agent", "accesskey", "direct"))
    p.add_argument("--customer", help="customer id (UUID)")
    p.add_argument("--agent", help="agent id (UUID)")
    p.add_argument("--permission", action="append", choices=PERMISSIONS,
                   help="a permission name; repeat for several")
    p.add_argument("--resource", action="append", help="an allowed resource (direct tokens)")
    p.add_argument("--ttl", type=float, default=None, help="seconds until the token expires")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("listen", help="subscribe and print every frame as a JSON line")
    p.add_argument("--url", default="ws://127.0.0.1:8080/v1.0/ws")
    p.add_argument("--token", required=True)
    p.add_argument("--since", help="resume after this event_id")
    p.add_argument("topics", nargs="+", metavar="TOPIC")
    p.set_defaults(func=cmd_listen)

    try:
        from wsgate.audit.cli import register
    except ImportError:  # pragma: no cover - the audit package is always installed
        pass
    else:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve",):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
