"""Delivered messages per second with 1, 2 and 4 workers sharing a Redis broker.

``python -m bench.cluster_bench [--workers 1 2 4] [--connections 200] [--duration 5]``

For each worker count it starts ``wsgate serve --workers N`` (redis broker with
a key prefix of its own, ``allow_all`` authorizer, a static token, SQLite
audit), lets the load generator (bench/loadgen.py) open the WebSocket clients,
all subscribed to one topic, post batches of events for the duration and
count the event frames received; then it drains the server with SIGTERM.
Prints a table and writes JSON to bench/results/cluster-<time>.json.

Every event goes through Redis even with one worker (publish, then the
worker's own subscription hands it back), so the 1-worker row is the cost of
the clustered path on one process, not the memory broker's.

On a small machine the generator and the workers share the cores: read the
``gen cpu`` column (a saturated generator caps the figure) and the worker
CPU before concluding that more workers do not help.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (
    CUSTOMER,
    INGEST_KEY,
    PYTHON,
    RESULTS,
    ROOT,
    TOKEN,
    WSGATE,
    free_port,
    wsgate_config,
)

TOPIC = f"customer_id:{CUSTOMER}:bench"
REDIS_URL = os.environ.get("WSGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def cpu_seconds(pid: int) -> float:
    """CPU seconds of pid so far; 0 for a process that is gone."""
    try:
        return common.cpu_seconds(pid)
    except OSError:
        return 0.0


def workers_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def config_text(port: int, workdir: Path, prefix: str) -> str:
    sep = "&" if "?" in REDIS_URL else "?"
    return wsgate_config(port, workdir, f"bench-cluster-{port}",
                         broker_url=f"{REDIS_URL}{sep}prefix={prefix}")


def wait_ready(port: int, workers: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until /readyz answers 200 on 3 x workers fresh connections in a row (the
    kernel spreads them over the workers' sockets)."""
    deadline = time.monotonic() + 60
    streak = 0
    while streak < 3 * workers:
        if proc.poll() is not None:
            raise RuntimeError(f"wsgate exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"wsgate not ready in 60 s: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                streak = streak + 1 if r.status == 200 else 0
        except OSError:
            streak = 0
            time.sleep(0.1)


def run_one(workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    cfg = workdir / f"wsgate-{port}.toml"
    cfg.write_text(config_text(port, workdir, prefix))
    log = workdir / f"wsgate-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([WSGATE, "serve", "--config", str(cfg), "--workers",
                                 str(workers)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(port, workers, proc, log)
        pids = workers_of(proc.pid) or [proc.pid]  # --workers 1 serves in the process
        n = args.connections
        spec = {"mode": "publish", "connections": n, "topic": TOPIC,
                "duration": args.duration, "recipients_per_event": n, "window": 50 * n,
                "publishers": 4, "per_post": args.batch, "sample_every": 20,
                "host": "127.0.0.1", "port": port, "token": TOKEN, "ingest_key": INGEST_KEY}
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.monotonic()
        gen = subprocess.run([PYTHON, "-m", "bench.loadgen"], input=json.dumps(spec) + "\n",
                             capture_output=True, text=True, cwd=ROOT,
                             timeout=args.duration + 120)
        if gen.returncode != 0:
            raise RuntimeError(f"the generator failed: {gen.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(gen.stdout.strip().splitlines()[-1])
        result["workers_cpu_incl_setup"] = round(
            (sum(cpu_seconds(p) for p in pids) - cpu0) / (time.monotonic() - t0), 3)
        result["workers"] = workers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result_code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            result_code = proc.wait()
        _forget(prefix)
    result["exit_code"] = result_code
    return result


def _forget(prefix: str) -> None:
    """Delete the run's history streams."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:  # a leftover stream expires by itself (history ttl)
        print(f"note: could not delete {prefix}* keys: {exc}", file=sys.stderr)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workers':>7} {'delivered/s':>12} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>8} "
            f"{'lost':>5} {'dupes':>5} {'order':>5} {'gen cpu':>7} {'wrk cpu':>7} {'exit':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = r.get("latency_ms", {})
        lines.append(
            f"{r['workers']:>7} {r['delivered_per_s']:>12,.0f} {r['events_per_s']:>9,.0f} "
            f"{lat.get('p50', 0):>7.1f} {lat.get('p99', 0):>8.1f} {r['lost']:>5} "
            f"{r['dupes']:>5} {r['out_of_order']:>5} {r['generator_cpu']:>7.2f} "
            f"{r['workers_cpu_incl_setup']:>7.2f} {r['exit_code']:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of posting per run")
    parser.add_argument("--batch", type=int, default=10, help="events per POST")
    args = parser.parse_args(argv)
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        print(f"cluster_bench: Redis at {REDIS_URL} is needed: {exc}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsgate-cluster-bench-") as tmp:
        for n in args.workers:
            print(f"running {n} worker(s)...", file=sys.stderr, flush=True)
            rows.append(run_one(n, args, Path(tmp)))
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({
        "bench": "cluster", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "platform": platform.platform()},
        "connections": args.connections, "duration_s": args.duration, "batch": args.batch,
        "topic": TOPIC, "runs": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
