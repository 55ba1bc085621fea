"""``wsgate audit ...``: query, export, verify, recipients, prune (SPEC §7).

Wire it into the main parser with :func:`register`; each subcommand sets
``func``, which takes the parsed arguments and returns the exit code:

- 0: done (verify: the log is whole);
- 1: verify found a problem (the first bad row is named by seq), prune
  refused a log that does not verify, or recipients found no such event;
- 2: bad input: a bad flag value, date, config file or key;
- 3: the audit store cannot be read or written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import IO, Any

from sqlalchemy.exc import SQLAlchemyError

from wsgate.audit import query, store
from wsgate.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORE = 3


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` command and its subcommands to an argparse subparsers object."""
    audit = subparsers.add_parser(
        "audit", help="query, export and verify the audit log",
        description="Review the audit log: who subscribed to what, when, and whether "
                    "they were allowed.")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, metavar="FILE",
                       help="the wsgate TOML config (its [audit] table is used)")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--customer", metavar="ID", help="rows of this customer id")
        p.add_argument("--agent", metavar="ID", help="rows of this agent id")
        p.add_argument("--subject", metavar="S", help="rows of this principal subject")
        p.add_argument("--topic-prefix", metavar="T",
                       help="topics equal to T or under it, by whole segments")
        p.add_argument("--connection", metavar="ID", help="rows of this connection id")
        p.add_argument("--outcome", choices=query.OUTCOMES, help="accepted or rejected")
        p.add_argument("--since", metavar="T", help="at or after this ISO 8601 time (UTC "
                       "when no zone is given)")
        p.add_argument("--until", metavar="T", help="before this ISO 8601 time")

    q = sub.add_parser("query", help="print matching rows, oldest first")
    common(q)
    filters(q)
    q.add_argument("--format", choices=query.FORMATS, default="table")
    q.set_defaults(func=cmd_query)

    e = sub.add_parser("export", help="write matching rows to a file (streamed)")
    common(e)
    filters(e)
    e.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    e.add_argument("--output", metavar="FILE", help="where to write (default: stdout)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check the hash chains and checkpoint signatures")
    common(v)
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("recipients", help="who could see an event when it was published")
    common(r)
    r.add_argument("event_id", metavar="EVENT_ID")
    r.add_argument("--format", choices=query.FORMATS, default="table")
    r.set_defaults(func=cmd_recipients)

    p = sub.add_parser("prune", help="delete rows older than a date, keeping the log verifiable")
    common(p)
    p.add_argument("--before", required=True, metavar="DATE",
                   help="delete rows that occurred before this ISO 8601 time")
    p.set_defaults(func=cmd_prune)
    return audit


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``audit`` subcommand; return the exit code."""
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def _err(message: str) -> None:
    print(f"wsgate audit: {message}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return None


def _filter(args: argparse.Namespace) -> query.AuditFilter:
    return query.AuditFilter.parse(
        customer=args.customer, agent=args.agent, subject=args.subject,
        topic_prefix=args.topic_prefix, connection=args.connection, outcome=args.outcome,
        since=args.since, until=args.until)


def _with_reader(args: argparse.Namespace,
                 body: Callable[[query.AuditReader], int]) -> int:
    """Load the config, open a reader, run body; map errors to exit codes."""
    cfg = _load(args)
    if cfg is None:
        return EXIT_USAGE
    try:
        reader = query.AuditReader.from_config(cfg.audit)
    except store.AuditStoreError as exc:
        _err(str(exc))
        return EXIT_USAGE
    try:
        store.require_schema(reader.engine)
        return body(reader)
    except query.FilterError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except store.AuditStoreError as exc:
        _err(str(exc))
        return EXIT_STORE
    except SQLAlchemyError as exc:
        detail = exc.args[0] if exc.args else exc
        _err(f"the audit store failed: {exc.__class__.__name__}: {detail}")
        return EXIT_STORE
    finally:
        reader.close()


def cmd_query(args: argparse.Namespace) -> int:
    """``audit query``: print matching rows to stdout."""
    def body(reader: query.AuditReader) -> int:
        flt = _filter(args)
        query.write_rows(reader.rows(flt), args.format, sys.stdout)
        return EXIT_OK
    return _with_reader(args, body)


def cmd_export(args: argparse.Namespace) -> int:
    """``audit export``: stream matching rows to --output (or stdout)."""
    def body(reader: query.AuditReader) -> int:
        flt = _filter(args)
        out: IO[str]
        if args.output:
            try:
                out = open(args.output, "w", encoding="utf-8", newline="")
            except OSError as exc:
                raise query.FilterError(f"--output: {exc}") from None
            with out:
                n = query.write_rows(reader.rows(flt), args.format, out)
            print(f"wrote {n} rows to {args.output}", file=sys.stderr)
        else:
            query.write_rows(reader.rows(flt), args.format, sys.stdout)
        return EXIT_OK
    return _with_reader(args, body)


def cmd_verify(args: argparse.Namespace) -> int:
    """``audit verify``: exit 0 when whole, else 1 naming the first bad row by seq."""
    def body(reader: query.AuditReader) -> int:
        result = reader.verify()
        sigs = ("signatures checked" if result.signatures_checked
                else "signatures NOT checked: no signing or verify key configured")
        summary = (f"{result.rows_checked} rows, {result.events_checked} events, "
                   f"{result.checkpoints_checked} checkpoints on {len(result.nodes)} node(s); "
                   f"{sigs}")
        first = result.first
        if first is None:
            print(f"OK: the audit log is whole ({summary})")
            return EXIT_OK
        print(f"FAILED: first bad {'row' if first.chain == 'rows' else 'event'} is seq "
              f"{first.seq} of node {first.node_id} ({first.kind}): {first.message}")
        for p in result.problems:
            if p is not first:
                print(f"  also: {p.chain} seq {p.seq} of node {p.node_id} ({p.kind}): "
                      f"{p.message}")
        print(f"checked {summary}")
        return EXIT_FOUND
    return _with_reader(args, body)


def cmd_recipients(args: argparse.Namespace) -> int:
    """``audit recipients EVENT_ID``: connections that could see the event."""
    def body(reader: query.AuditReader) -> int:
        ev = reader.event(args.event_id)
        if ev is None:
            _err(f"no event {args.event_id!r} is recorded (is [audit] record_events on?)")
            return EXIT_FOUND
        found = reader.recipients(ev)
        if args.format == "table":
            print(f"event {ev.event_id} ({ev.type}) published {ev.published_at} by node "
                  f"{ev.node_id} on {', '.join(ev.topics)}: {len(found)} subscription(s)")
        query.write_rows((query.recipient_dict(r) for r in found), args.format, sys.stdout,
                         fields=query.RECIPIENT_FIELDS)
        return EXIT_OK
    return _with_reader(args, body)


def cmd_prune(args: argparse.Namespace) -> int:
    """``audit prune --before DATE``: delete old rows behind a signed prune checkpoint."""
    def body(reader: query.AuditReader) -> int:
        before = query.parse_time(args.before, "--before")
        cfg = _load(args)
        assert cfg is not None
        try:
            key = store.signing_key(cfg.audit)
        except store.AuditStoreError as exc:
            _err(str(exc))
            return EXIT_USAGE
        if key is None:
            _err("prune needs [audit] signing_key or signing_key_file: the prune checkpoint "
                 "that keeps the shortened log verifiable must be signed")
            return EXIT_USAGE
        writer_engine = store.make_engine(cfg.audit.url, writer=True)
        try:
            result = store.prune(writer_engine, before, key)
        except store.AuditStoreError as exc:
            _err(f"nothing pruned: {exc}")
            return EXIT_FOUND
        finally:
            writer_engine.dispose()
        print(f"pruned {result.rows_deleted} rows and {result.events_deleted} events "
              f"before {before.isoformat()}; {len(result.checkpoints)} prune checkpoint(s) "
              "signed")
        return EXIT_OK
    return _with_reader(args, body)
