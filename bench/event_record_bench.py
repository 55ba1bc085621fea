"""CPU per recorded event: the audit writer thread's, and the event loop's.

In process, no server: a real AuditWriter on a fresh store (a SQLite file in
WAL mode with synchronous=FULL, or a fresh PostgreSQL schema) records
``--events`` ingested events, posted as ``--per-job`` events per
``write_events`` call (one call per POST in the gateway) with ``--inflight``
calls outstanding at a time, as concurrent POSTs would. The events look like
real ones: an id as the server makes one (time-ordered), type ``call_created``, one topic
``agent_id:<uuid>:call:<uuid>``, a key id, a SHA-256 hex and an aware time.

Reported per event: the writer thread's CPU (its own clock,
``time.pthread_getcpuclockid``), the event loop thread's CPU (building the
records, submitting, settling), and the transactions committed.

    .venv/bin/python bench/event_record_bench.py [--events 100000] [--per-job 10,1]
        [--inflight 32] [--backends sqlite,postgres] [--pg-url URL] [--profile FILE]

It imports whichever ``wsgate`` comes first on sys.path, so an older tree can be
measured with ``PYTHONPATH=/that/tree`` from a directory outside this one.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import wsgate
from bench import audit_bench
from wsgate.audit.records import EventRecord
from wsgate.audit.writer import AuditWriter
from wsgate.config import AuditConfig
from wsgate.events import new_event_ids

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def make_inputs(n: int) -> list[tuple[str, str, str]]:
    """(event id, topic, payload sha256) of n events, made before the clock starts."""
    out = []
    for _ in range(n):
        ev = new_event_ids(1)[0]  # as the server makes them when a backend gives none
        topic = f"agent_id:{uuid.uuid4()}:call:{uuid.uuid4()}"
        out.append((ev, topic, hashlib.sha256(ev.encode()).hexdigest()))
    return out


async def run_one(url: str, journal: str, events: int, per_job: int, inflight: int,
                  window_ms: float, profile: str | None) -> dict[str, Any]:
    cfg = AuditConfig(url=url, journal_path=journal, group_commit_ms=window_ms)
    writer = AuditWriter(cfg, "bench-node")
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        run = writer._loop  # profile what the writer thread does for the rows

        def profiled() -> None:
            prof.enable()
            try:
                run()
            finally:
                prof.disable()
        writer._loop = profiled  # type: ignore[method-assign]
    await writer.start()
    thread = writer._thread
    assert thread is not None and thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    inputs = make_inputs(events)
    jobs = [inputs[i:i + per_job] for i in range(0, events, per_job)]
    key_id = "bearer:5f2b4c1d"
    now: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731

    async def worker(mine: list[list[tuple[str, str, str]]]) -> None:
        for job in mine:
            moment = now()
            await writer.write_events([EventRecord(ev, "call_created", (topic,), key_id, h, moment)
                                       for ev, topic, h in job])

    stat = f"/proc/self/task/{thread.native_id}/stat"
    u0, s0 = _ticks(stat)
    w0 = time.clock_gettime(clock)
    l0 = time.thread_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(jobs[i::inflight]) for i in range(inflight)))
    elapsed = time.perf_counter() - t0
    loop_cpu = time.thread_time() - l0
    writer_cpu = time.clock_gettime(clock) - w0
    u1, s1 = _ticks(stat)
    n_commits = writer.commits
    await writer.close()
    if prof is not None and profile:
        prof.dump_stats(profile)
    return {
        "events": events, "per_job": per_job, "inflight": inflight,
        "writer_us_per_event": round(writer_cpu / events * 1e6, 2),
        "writer_sys_share": round((s1 - s0) / max(u1 - u0 + s1 - s0, 1), 2),
        "loop_us_per_event": round(loop_cpu / events * 1e6, 2),
        "commits": n_commits, "events_per_commit": round(events / max(n_commits, 1), 1),
        "events_per_s": round(events / elapsed),
    }


def _ticks(stat: str) -> tuple[int, int]:
    """A thread's user and system CPU in clock ticks (0, 0 where /proc is not)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def sqlite_store(tmp: Path, label: str) -> tuple[str, Callable[[], None]]:
    return f"sqlite:///{tmp / label}.db", lambda: None


def pg_store(base: str) -> tuple[str, Callable[[], None]]:
    return audit_bench.pg_store(base, prefix="event_bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--per-job", default="10,1",
                   help="events per write_events call, comma-separated")
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--window-ms", type=float, default=2.0, help="[audit] group_commit_ms")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--pg-url", default=os.environ.get("WSGATE_TEST_PG_URL", DEFAULT_PG))
    p.add_argument("--profile", help="write the writer thread's cProfile stats here "
                                     "(of the last run)")
    p.add_argument("--label", default="", help="a name for this tree in the output")
    args = p.parse_args(argv)
    print(f"# wsgate from {Path(wsgate.__file__).parent} {args.label}".rstrip(), flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for backend in args.backends.split(","):
            for per_job in (int(x) for x in args.per_job.split(",")):
                label = f"{backend}-{per_job}"
                url, cleanup = (sqlite_store(tmp, label) if backend == "sqlite"
                                else pg_store(args.pg_url))
                try:
                    r = asyncio.run(run_one(url, str(tmp / f"{label}.journal"), args.events,
                                            per_job, args.inflight, args.window_ms,
                                            args.profile))
                finally:
                    cleanup()
                sys_share = r["writer_sys_share"]
                print(f"{args.label:>6} {backend:8} per_job {per_job:>2}: writer "
                      f"{r['writer_us_per_event']:7.2f} us/event (sys {sys_share:.0%})  loop "
                      f"{r['loop_us_per_event']:6.2f} us/event  {r['events_per_commit']:7.1f} "
                      f"events/commit  {r['events_per_s']:>6}/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
