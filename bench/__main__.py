"""The benchmark runner: ``make bench`` / ``python -m bench [--scenario S ...] [--quick]``.

Each scenario starts the server under test as a real process pinned to core 0
(wsgate: ``wsgate serve --config <generated toml>``; the naive yardstick:
``python -m bench.naive_server``) and the load generator (bench/loadgen.py)
pinned to core 1, runs for a bounded time, and prints a table with wsgate,
naive and their ratio. Every result is also saved as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    CUSTOMER,
    INGEST_KEY,
    PYTHON,
    RESULTS,
    ROOT,
    TOKEN,
    WSGATE,
    cpu_seconds,
    free_port,
    wsgate_config,
)
from bench.loadgen import agent_topics

FANOUT_TOPIC = f"customer_id:{CUSTOMER}:bench"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SCENARIOS = ("index", "fanout", "targeted", "idle", "storm")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(core: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *argv]
    return argv


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- servers -----------------------------------------------------------------


class Server:
    """A server process under test (kind: wsgate, naive or floor); a context manager."""

    def __init__(self, kind: str, workdir: Path, audit_url: str | None = None,
                 record_events: bool = False, max_subscriptions: int = 1000,
                 args: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.args = args
        self.port = free_port()
        self.workdir = workdir
        self.audit_url = audit_url or f"sqlite:///{workdir}/audit-{self.port}.db"
        self.record_events = record_events
        self.max_subscriptions = max_subscriptions
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{kind}-{self.port}.log"

    def config_text(self) -> str:
        return wsgate_config(self.port, self.workdir, f"bench-{self.port}-{uuid.uuid4().hex[:8]}",
                             audit_url=self.audit_url, record_events=self.record_events,
                             max_subscriptions=self.max_subscriptions)

    def __enter__(self) -> Server:
        out = self.log.open("wb")
        if self.kind == "wsgate":
            cfg = self.workdir / f"wsgate-{self.port}.toml"
            cfg.write_text(self.config_text())
            argv = [WSGATE, "serve", "--config", str(cfg)]
        else:
            argv = [PYTHON, "-m", f"bench.{self.kind}_server", str(self.port), *self.args]
        self.proc = subprocess.Popen(pinned(0, argv), stdout=out, stderr=subprocess.STDOUT,
                                     cwd=ROOT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.kind} did not listen on {self.port}")
        time.sleep(0.3)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


#: The Node storm generator (bench/storm_gen.js: no npm package needed).
NODE_STORM = [shutil.which("node") or "node", str(ROOT / "bench" / "storm_gen.js")]


def generator(spec: dict[str, Any], timeout: float,
              argv: list[str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(pinned(1, argv or [PYTHON, "-m", "bench.loadgen"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=raise_nofile)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def generator_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON result a generator process prints last; RuntimeError when it fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"the generator took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the generator failed (exit {proc.returncode}): {out[-500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_generator(spec: dict[str, Any], server: Server, timeout: float) -> dict[str, Any]:
    spec = dict(spec, host="127.0.0.1", port=server.port, token=TOKEN, ingest_key=INGEST_KEY,
                server_pid=server.pid)
    cpu0 = cpu_seconds(server.pid)
    t0 = time.monotonic()
    proc = generator(spec, timeout)
    result = generator_result(proc, timeout)
    result["server_cpu_incl_setup"] = round((cpu_seconds(server.pid) - cpu0) /
                                            (time.monotonic() - t0), 3)
    return result


# -- scenarios ---------------------------------------------------------------


def scale(args: argparse.Namespace, full: int, quick: int) -> int:
    return quick if args.quick else full


def fanout(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = args.connections or scale(args, 1000, 200)
    duration = args.duration or scale(args, 10, 3)
    spec = {"mode": "publish", "connections": n, "topic": FANOUT_TOPIC, "duration": duration,
            "recipients_per_event": n, "window": 50 * n, "publishers": 4, "sample_every": 20}
    out: dict[str, Any] = {"connections": n, "duration_s": duration}
    for kind in ("wsgate", "naive"):
        with Server(kind, work) as srv:
            out[kind] = run_generator(spec, srv, duration + 120)
    rate = out["wsgate"]["events_per_s"] / 2
    out["paced_events_per_s"] = round(rate, 1)
    paced = dict(spec, rate=rate)
    for kind in ("wsgate", "naive"):
        with Server(kind, work) as srv:
            out[kind + "_paced"] = run_generator(paced, srv, duration + 120)
    return out


def targeted(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = args.connections or scale(args, 5000, 500)
    duration = args.duration or scale(args, 10, 3)
    topics = agent_topics(n)
    base = {"mode": "publish", "connections": n, "topics_of": [[t] for t in topics],
            "targets": topics, "duration": duration, "recipients_per_event": 1,
            "window": 20_000, "publishers": 4, "sample_every": 1}
    out: dict[str, Any] = {"connections": n, "duration_s": duration}
    runs = (("wsgate_batch100", "wsgate", 100), ("wsgate_single", "wsgate", 1),
            ("naive_single", "naive", 1))
    for name, kind, per_post in runs:
        with Server(kind, work) as srv:
            out[name] = run_generator(dict(base, per_post=per_post), srv, duration + 180)
    return out


def idle(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = args.connections or scale(args, 10_000, 1000)
    out: dict[str, Any] = {"connections": n}
    topics = agent_topics(n)
    for kind in ("wsgate", "naive"):
        with Server(kind, work, max_subscriptions=10) as srv:
            before = rss_kib(srv.pid)
            spec = {"mode": "idle", "connections": n, "topics_of": [[t] for t in topics],
                    "host": "127.0.0.1", "port": srv.port, "token": TOKEN,
                    "connect_concurrency": 100}
            proc = generator(spec, 300)
            assert proc.stdout is not None and proc.stdin is not None
            ready = json.loads(proc.stdout.readline() or "{}")
            time.sleep(1.0)
            after = rss_kib(srv.pid)
            proc.stdin.write("STOP\n")
            proc.stdin.flush()
            proc.communicate(timeout=120)
            held = ready.get("ready", 0)
            out[kind] = {"connections": held, "setup_s": ready.get("setup_s"),
                         "rss_before_kib": before, "rss_after_kib": after,
                         "kib_per_connection": round((after - before) / max(1, held), 2)}
    return out


def pg_bench_url() -> str | None:
    """A database of its own on the bench PostgreSQL (created once), so runs never
    touch the tables the test suite uses; None when PostgreSQL is not reachable."""
    try:
        import psycopg
    except ImportError:
        return None
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True,
                             connect_timeout=3) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'wsgate_bench'")
            if found.fetchone() is None:
                conn.execute("CREATE DATABASE wsgate_bench")
    except Exception as exc:
        print(f"storm: PostgreSQL not used ({exc})", file=sys.stderr)
        return None
    return PG_URL.rsplit("/", 1)[0] + "/wsgate_bench"


def run_storm_generators(spec: dict[str, Any], server: Server, args: argparse.Namespace,
                         timeout: float) -> dict[str, Any]:
    """The storm from args.storm_procs generator processes (Python or Node, all on
    core 1), each with its share of the connections and topics of its own,
    measuring one window (each says ready once connected; all start together,
    then 1 s of warm-up); their figures summed."""
    procs = max(1, args.storm_procs)
    if args.storm_gen == "python" and procs == 1:
        return run_generator(spec, server, timeout)
    if args.storm_gen == "node" and shutil.which("node") is None:
        raise RuntimeError("--storm-gen node: node is not installed")
    argv = NODE_STORM if args.storm_gen == "node" else None
    n = spec["connections"]
    running = []
    for p in range(procs):
        share = n // procs + (p < n % procs)
        one = dict(spec, connections=share, topics_of=[[] for _ in range(share)],
                   tag=f"p{p}-", barrier=True, warmup=1.0, host="127.0.0.1",
                   port=server.port, token=TOKEN, server_pid=server.pid)
        running.append(generator(one, timeout, argv))
    try:
        for proc in running:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline() or "{}")
            if "ready" not in ready:
                raise RuntimeError(f"a storm generator did not connect: {ready}")
        for proc in running:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
    except BaseException:
        for proc in running:
            proc.kill()
        raise
    results = []
    for proc in running:
        results.append(generator_result(proc, timeout))
    rate = sum(r["subscribes_per_s"] for r in results)
    # Each Node process's foreign CPU counts the other generator processes: not them.
    foreign = [r["foreign_cpu_pct"] - 100 * (sum(o["generator_cpu"] for o in results)
                                             - r["generator_cpu"])
               for r in results if "foreign_cpu_pct" in r]
    server_cpu = statistics.mean(r["server_cpu"] for r in results)
    gen_cpu = sum(r["generator_cpu"] for r in results)
    return {"generator": args.storm_gen, "processes": procs, "connections": n,
            "subscribes_per_s": rate,
            "offered_per_s": sum(r.get("offered_per_s", 0.0) for r in results),
            "accepted": sum(r["accepted"] for r in results),
            "errors": [e for r in results for e in r["errors"]][:3],
            "reply_latency_ms": results[0]["reply_latency_ms"],
            "generator_cpu": round(gen_cpu, 3), "generator_saturated": gen_cpu > 0.8,
            "server_cpu": round(server_cpu, 3),
            "server_cpu_us_per_subscribe": round(1e6 * server_cpu / max(1.0, rate), 2),
            "foreign_cpu_pct": round(statistics.mean(foreign), 1) if foreign else None,
            "each": results}


def storm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = args.connections or scale(args, 200, 50)
    duration = args.duration or scale(args, 5, 2)
    spec = {"mode": "storm", "connections": n, "duration": duration, "in_flight": 1,
            "customer_id": CUSTOMER, "topics_of": [[] for _ in range(n)]}
    out: dict[str, Any] = {"connections": n, "duration_s": duration,
                           "generator": args.storm_gen, "processes": args.storm_procs}
    targets: list[tuple[str, str, str | None]] = [("wsgate_sqlite", "wsgate", None)]
    pg = pg_bench_url()
    if pg is not None:
        targets.append(("wsgate_postgres", "wsgate", pg))
    targets.append(("naive", "naive", None))
    for name, kind, url in targets:
        with Server(kind, work, audit_url=url, max_subscriptions=1_000_000) as srv:
            out[name] = run_storm_generators(spec, srv, args, duration + 120)
    return out


def index(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.index_bench import run

    sizes = (1000, 100_000) if args.quick else (1000, 100_000, 1_000_000)
    return run(sizes)


RUNNERS = {"fanout": fanout, "targeted": targeted, "idle": idle, "storm": storm, "index": index}


# -- report ------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def rows_for(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    if name == "fanout":
        w, v = r["wsgate"], r["naive"]
        rows.append(("fanout delivered msgs/s", f"{w['delivered_per_s']:,.0f}",
                     f"{v['delivered_per_s']:,.0f}", ratio(w["delivered_per_s"],
                                                           v["delivered_per_s"])))
        rows.append(("fanout events/s", f"{w['events_per_s']:,.1f}", f"{v['events_per_s']:,.1f}",
                     ratio(w["events_per_s"], v["events_per_s"])))
        wp, vp = r["wsgate_paced"], r["naive_paced"]
        for q in ("p50", "p99"):
            rows.append((f"fanout paced {r['paced_events_per_s']:.0f} ev/s latency {q} ms",
                         str(wp["latency_ms"].get(q, "-")), str(vp["latency_ms"].get(q, "-")),
                         ratio(vp["latency_ms"].get(q, 0), wp["latency_ms"].get(q, 0))
                         + " (naive/wsgate)"))
    elif name == "targeted":
        v = r["naive_single"]["events_per_s"]
        for key, label in (("wsgate_batch100", "targeted events/s, 100/POST"),
                           ("wsgate_single", "targeted events/s, 1/POST")):
            w = r[key]["events_per_s"]
            rows.append((label, f"{w:,.0f}", f"{v:,.0f} (1/POST)", ratio(w, v)))
    elif name == "idle":
        w, v = r["wsgate"], r["naive"]
        rows.append((f"idle KiB RSS per connection ({r['connections']:,})",
                     f"{w['kib_per_connection']:.1f}", f"{v['kib_per_connection']:.1f}",
                     ratio(w["kib_per_connection"], v["kib_per_connection"])))
    elif name == "storm":
        v = r["naive"]["subscribes_per_s"]
        for key in ("wsgate_sqlite", "wsgate_postgres"):
            if key in r:
                w = r[key]["subscribes_per_s"]
                gen = f"{r.get('generator', 'python')} x{r.get('processes', 1)}"
                rows.append((f"subscribes/s, durable audit ({key[7:]}), {gen} generator",
                             f"{w:,.0f} ({r[key]['server_cpu_us_per_subscribe']:.0f} us, "
                             f"generator {r[key]['generator_cpu']:.0%})",
                             f"{v:,.0f} (no audit)", ratio(w, v)))
    elif name == "index":
        # One event matched over and over (the index's own cost), then random held
        # topics (each match walks memory out of cache at 1M: DRAM latency).
        for key, label in (("same_event_us", "one event"), ("match_us", "random topics")):
            base = r["sizes"][0][key]
            for s in r["sizes"]:
                rows.append((f"index match us, {label}, {s['subscriptions']:,} subs",
                             f"{s[key]:.2f}", "-", f"{s[key] / base:.2f}x of 1k"))
    return rows


def warnings_for(name: str, r: dict[str, Any]) -> list[str]:
    notes = []
    for key, val in r.items():
        if not isinstance(val, dict):
            continue
        if val.get("generator_saturated"):
            notes.append(f"{name}/{key}: the generator used {val['generator_cpu']:.0%} of its "
                         "core: the figure may be the generator's limit")
        for field in ("lost", "dupes", "out_of_order"):
            if val.get(field):
                notes.append(f"{name}/{key}: {field} = {val[field]}")
        if name == "storm" and val.get("server_cpu", 1.0) < 0.8:
            notes.append(f"{name}/{key}: the server used {val['server_cpu']:.0%} of its core: "
                         "the rate is bound elsewhere (other processes on core 0, or waiting "
                         "on the store's commits)")
        if (val.get("foreign_cpu_pct") or 0) > 10:
            notes.append(f"{name}/{key}: other processes used {val['foreign_cpu_pct']}% of a "
                         "CPU during the window: the rate is disturbed")
        if val.get("server_closes"):
            notes.append(f"{name}/{key}: server closed connections: {val['server_closes']}")
        if val.get("post_errors"):
            notes.append(f"{name}/{key}: POST errors {val['post_errors']}")
        if val.get("errors"):
            notes.append(f"{name}/{key}: errors {val['errors']}")
    return notes


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run this scenario (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="small scale, short runs")
    parser.add_argument("--connections", type=int, help="override the connection count")
    parser.add_argument("--duration", type=float, help="override seconds of load")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this often")
    parser.add_argument("--storm-gen", choices=("python", "node"), default="python",
                        help="storm: the Python generator (bench/loadgen.py) or the Node one "
                             "(bench/storm_gen.js, cheaper per message)")
    parser.add_argument("--storm-procs", type=int, default=1,
                        help="storm: generator processes (all on core 1), default 1")
    args = parser.parse_args(argv)
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "results": {}}
    table: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wsgate-bench-") as tmp:
        for name in args.scenario or SCENARIOS:
            for rep in range(args.repeat):
                print(f"-- {name} (run {rep + 1}/{args.repeat})", file=sys.stderr, flush=True)
                result = RUNNERS[name](args, Path(tmp))
                report["results"].setdefault(name, []).append(result)
                table.extend(rows_for(name, result))
                notes.extend(warnings_for(name, result))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    widths = [max(len(row[i]) for row in [("scenario", "wsgate", "naive", "ratio"), *table])
              for i in range(4)]
    for row in [("scenario", "wsgate", "naive", "ratio"), *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for note in notes:
        print("note:", note)
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
