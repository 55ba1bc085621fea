"""CPU per transaction of one small insert: SQLAlchemy's ways against the driver's.

Why the audit writer commits through a kept DB-API connection
(``wsgate.audit.writer.GroupConnection``): at one event per POST a group
commit holds a few rows, so what a transaction costs besides its rows is
most of the writer's work. Three ways, each ``--n`` transactions of one row
into a SQLite file set up as the writer's store (WAL, ``synchronous=FULL``,
``BEGIN IMMEDIATE``), run in turn, twice:

- ``engine_begin``: ``with engine.begin() as conn`` per transaction (pool
  checkout and return with its rollback, events), as the writer did;
- ``kept_connection``: one SQLAlchemy ``Connection`` kept, ``conn.begin()`` each time;
- ``dbapi``: the driver's connection kept, ``BEGIN IMMEDIATE`` / ``executemany`` / ``commit``.

    .venv/bin/python -m bench.txn_cost [--n 2000] [--dir /tmp]

Prints the thread's CPU and the wall time per transaction; the wall time
includes the fsync of each commit, which costs no CPU.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

ROW = [(None, "x" * 64, "y" * 64)]
INSERT = "INSERT INTO t VALUES (?, ?, ?)"


def writer_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: Any, _record: Any) -> None:
        dbapi.isolation_level = None
        cur = dbapi.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT, c TEXT)")
    return engine


def ways(engine: Engine, path: Path, n: int) -> dict[str, Callable[[], None]]:
    def engine_begin() -> None:
        for _ in range(n):
            with engine.begin() as conn:
                conn.exec_driver_sql(INSERT, ROW)

    def kept_connection() -> None:
        with engine.connect() as conn:
            for _ in range(n):
                with conn.begin():
                    conn.exec_driver_sql(INSERT, ROW)

    def dbapi() -> None:
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("PRAGMA synchronous=FULL")
        for _ in range(n):
            cur = raw.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.executemany(INSERT, ROW)
            raw.commit()
            cur.close()
        raw.close()

    return {"engine_begin": engine_begin, "kept_connection": kept_connection, "dbapi": dbapi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp, "txn.db")
        engine = writer_engine(path)
        runs = ways(engine, path, args.n)
        for _ in range(2):
            for name, run in runs.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                run()
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                print(f"{name:16s} {cpu / args.n * 1e6:7.1f} us CPU  {wall / args.n * 1e6:7.1f} "
                      "us wall per transaction")
        engine.dispose()


if __name__ == "__main__":
    main()
