"""``wsgate audit ...``: query, export, verify, recipients, prune (SPEC §7).

Wire it into the main parser with :func:`register`; each subcommand sets
``func``, which takes the parsed arguments and returns the exit code:

- 0: done (verify: the log is whole);
- 1: verify found a problem (the first bad row is named by seq), prune
  refused a log that does not verify, or recipients found no such event;
- 2: bad input: a bad flag value, date, config file or key;
- 3: the audit store cannot be read or written;
- 141 (128 + SIGPIPE): standard output was closed before everything was
  written (``wsgate audit query | head``); nothing more is printed, as with
  ``git log | head`` (see ``wsgate.__main__.EXIT_STDOUT_CLOSED``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import IO, Any

from sqlalchemy.exc import SQLAlchemyError

from wsgate.audit import bundle, chain, query, store
from wsgate.audit.witness import WitnessError
from wsgate.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORE = 3

#: The exit codes above, for ``--help``.
EXIT_HELP = """\
exit status:
  0    done (verify: the log is whole)
  1    verify found a problem, prune refused a log that does not verify, or
       recipients found no such event
  2    bad input: a flag value, date, config file or key
  3    the audit store cannot be read or written
  141  standard output was closed early (`| head`): the output is cut short,
       quietly, as with `git log | head`"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` command and its subcommands to an argparse subparsers object."""
    audit = subparsers.add_parser(
        "audit", help="query, export and verify the audit log",
        description="Review the audit log: who subscribed to what, when, and whether\n"
                    "they were allowed.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND",
                               parser_class=_CommandParser)
    sub.required = True

    def common(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, metavar="FILE",
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
    e.add_argument("--bundle", metavar="OUT",
                   help="write a bundle that `audit verify --bundle` checks with the public "
                        "key alone (takes --customer, --since and --until only)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check the hash chains, checkpoints and witnesses",
                       description="Prove the audit log whole, or name the first bad row.\n"
                                   "With --bundle, check a bundle file with no database "
                                   "and no config.")
    common(v, required=False)
    v.add_argument("--witness", action="append", default=None, metavar="PATH_OR_URL",
                   help="compare with the checkpoints this witness holds (a JSONL file or "
                        "an http(s) URL); repeat for several (default: the file witnesses "
                        "of [audit] witness)")
    v.add_argument("--bundle", metavar="FILE", help="verify this bundle instead of a store")
    v.add_argument("--verify-key", metavar="PEM",
                   help="the Ed25519 public key (PEM file) a bundle is checked with")
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


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its ``--help`` ends with the exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_HELP)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


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
    """``audit export``: stream matching rows to --output (or stdout), or a bundle."""
    if args.bundle:
        return _export_bundle(args)

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


def _export_bundle(args: argparse.Namespace) -> int:
    others = [f"--{name.replace('_', '-')}" for name in
              ("agent", "subject", "topic_prefix", "connection", "outcome", "output")
              if getattr(args, name)]
    if others:
        _err(f"--bundle takes --customer, --since and --until only, not {', '.join(others)}: "
             "a bundle holds whole chains so that it verifies")
        return EXIT_USAGE

    def body(reader: query.AuditReader) -> int:
        flt = _filter(args)
        try:
            out = open(args.bundle, "w", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise query.FilterError(f"--bundle: {exc}") from None
        with out:
            stats = bundle.export_bundle(reader.engine, out, customer=flt.customer,
                                         since=flt.since, until=flt.until)
        print(f"wrote {stats.rows} rows and {stats.events} events ({stats.redacted} redacted) "
              f"with {stats.checkpoints} checkpoints in {stats.sections} chain section(s) "
              f"to {args.bundle}", file=sys.stderr)
        return EXIT_OK
    return _with_reader(args, body)


def cmd_verify(args: argparse.Namespace) -> int:
    """``audit verify``: exit 0 when whole, else 1 naming the first bad row by seq."""
    if args.bundle:
        return _verify_bundle(args)
    if not args.config:
        _err("verify needs --config FILE (the store to check), or --bundle FILE")
        return EXIT_USAGE
    if args.verify_key:
        _err("--verify-key is for --bundle; a store is checked with [audit] verify_key_file")
        return EXIT_USAGE

    def body(reader: query.AuditReader) -> int:
        try:
            result = reader.verify(args.witness)
        except WitnessError as exc:
            _err(str(exc))
            return EXIT_USAGE
        return _report(result)
    return _with_reader(args, body)


def _verify_bundle(args: argparse.Namespace) -> int:
    if args.witness:
        _err("--witness compares a store with its witnesses; it does not apply to --bundle")
        return EXIT_USAGE
    try:
        if args.verify_key:
            with open(args.verify_key, "rb") as f:
                key = chain.load_public_key(f.read())
        else:
            cfg = _load(args) if args.config else None
            found = store.verify_key(cfg.audit) if cfg is not None else None
            if found is None:
                _err("--bundle needs --verify-key PEM: the public key its checkpoints "
                     "were signed with")
                return EXIT_USAGE
            key = found
    except (OSError, chain.SigningKeyError, store.AuditStoreError) as exc:
        _err(f"--verify-key: {exc}")
        return EXIT_USAGE
    try:
        with open(args.bundle, encoding="utf-8") as src:
            found_bundle = bundle.verify_bundle(src, key, args.bundle)
    except (OSError, UnicodeDecodeError, bundle.BundleError) as exc:
        _err(f"--bundle: {exc}")
        return EXIT_USAGE
    h = found_bundle.header
    scope = f"customer {h['customer']}" if h.get("customer") else "every customer"
    window = f"{h.get('since') or 'the start'} to {h.get('until') or 'its end'}"
    print(f"bundle {args.bundle}: {scope}, {window}, made {h.get('created_at')}; "
          f"{found_bundle.shown} rows and events shown, {found_bundle.redacted} redacted")
    return _report(found_bundle.result)


def _report(result: store.VerifyResult) -> int:
    """Print a verify result: OK or FAILED naming the first problem; warnings for
    the unsealed tails. Returns the exit code."""
    sigs = ("signatures checked" if result.signatures_checked
            else "signatures NOT checked: no signing or verify key configured")
    witnesses = (f"; {result.witnessed_checked} witnessed checkpoints from "
                 f"{len(result.witnesses)} witness(es)" if result.witnesses else "")
    summary = (f"{result.rows_checked} rows, {result.events_checked} events, "
               f"{result.checkpoints_checked} checkpoints on {len(result.nodes)} node(s); "
               f"{sigs}{witnesses}")
    for t in result.unsealed:
        one = t.rows == 1
        noun = ("row" if t.chain == "rows" else "event") + ("" if one else "s")
        print(f"WARNING: node {t.node_id}: {t.rows} {noun} after seq {t.after_seq} "
              f"{'is' if one else 'are'} not signed by a checkpoint yet "
              f"({t.first_at or '?'} to {t.last_at or '?'}); a witness cannot vouch for "
              f"{'it' if one else 'them'}")
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
