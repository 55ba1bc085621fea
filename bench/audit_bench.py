"""Durable audited subscribes per second: SQLite and PostgreSQL, with and without group commit.

Each run starts a real AuditWriter on a fresh store (a SQLite file in WAL
mode with synchronous=FULL, or a fresh PostgreSQL schema), then
``--concurrency`` coroutines each await ``write_subscribes([one row])`` in a
loop until ``--rows`` rows are committed: every await is one acknowledged,
durable subscribe, as in the gateway.

    .venv/bin/python bench/audit_bench.py [--rows 20000] [--concurrency 200]
        [--windows 0,2] [--backends sqlite,postgres] [--pg-url URL]

Prints a table and writes JSON to bench/results/audit-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from wsgate.audit import chain
from wsgate.audit.records import ACCEPTED, SUBSCRIBE, AuditRecord, ConnectionInfo
from wsgate.audit.writer import AuditWriter
from wsgate.config import AuditConfig, Secret
from wsgate.plugins import Principal

CUSTOMER = "5013bc52-da9a-11ee-844f-2fa34248de28"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


async def run_one(url: str, journal: str, window_ms: float, rows: int, concurrency: int,
                  key_pem: str) -> dict[str, Any]:
    cfg = AuditConfig(url=url, journal_path=journal, group_commit_ms=window_ms,
                      signing_key=Secret(key_pem) if key_pem else None, checkpoint_every=1000)
    writer = AuditWriter(cfg, "bench-node")
    await writer.start()
    principal = Principal(kind="agent", subject="bench", customer_id=CUSTOMER)
    conns = [ConnectionInfo(f"conn-{i}", principal, "static", "10.0.0.1",
                            "https://app.example.com", "bench/1.0") for i in range(concurrency)]
    latencies: list[float] = []
    remaining = rows

    async def worker(i: int) -> None:
        nonlocal remaining
        info = conns[i]
        n = 0
        while remaining > 0:
            remaining -= 1
            n += 1
            record = AuditRecord(datetime.now(UTC), info, SUBSCRIBE,
                                 f"customer_id:{CUSTOMER}:call:{i}-{n}", ACCEPTED)
            t = time.perf_counter()
            await writer.write_subscribes([record])
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    commits = writer.commits
    await writer.close()
    latencies.sort()
    return {
        "rows": rows, "concurrency": concurrency, "group_commit_ms": window_ms,
        "seconds": round(elapsed, 3), "subscribes_per_s": round(rows / elapsed),
        "transactions": commits, "rows_per_transaction": round(rows / max(commits, 1), 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


def sqlite_store(tmp: Path, label: str) -> tuple[str, Any]:
    path = tmp / f"{label}.db"
    return f"sqlite:///{path}", lambda: None


def pg_store(base: str, prefix: str = "audit_bench") -> tuple[str, Any]:
    """A fresh schema on the PostgreSQL server at base: its URL and a function that drops it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url.render_as_string(hide_password=False), drop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--windows", default="0,2", help="group_commit_ms values, comma-separated")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--pg-url", default=os.environ.get("WSGATE_TEST_PG_URL", DEFAULT_PG))
    p.add_argument("--signed", action="store_true", help="sign a checkpoint every 1000 rows")
    p.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    windows = [float(w) for w in args.windows.split(",")]
    key_pem = ""
    if args.signed:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key_pem = chain.private_pem(Ed25519PrivateKey.generate())
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for backend in args.backends.split(","):
            for window in windows:
                label = f"{backend}-{window}"
                try:
                    url, cleanup = (sqlite_store(tmp, label) if backend == "sqlite"
                                    else pg_store(args.pg_url))
                except Exception as exc:
                    print(f"{backend}: skipped ({exc.__class__.__name__}: {exc})",
                          file=sys.stderr)
                    break
                try:
                    r = asyncio.run(run_one(url, str(tmp / f"{label}.journal"), window,
                                            args.rows, args.concurrency, key_pem))
                finally:
                    cleanup()
                r["backend"] = backend
                results.append(r)
                print(f"  {backend:9} window {window:>4} ms: {r['subscribes_per_s']:>7} /s",
                      file=sys.stderr)
    cols = ("backend", "group_commit_ms", "concurrency", "rows", "subscribes_per_s",
            "transactions", "rows_per_transaction", "p50_ms", "p99_ms")
    widths = {c: max(len(c), *(len(str(r[c])) for r in results)) for c in cols} if results \
        else {c: len(c) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in results:
        print("  ".join(str(r[c]).rjust(widths[c]) for c in cols))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"audit-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({
        "bench": "audit", "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "signed_checkpoints": bool(key_pem), "results": results,
    }, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
