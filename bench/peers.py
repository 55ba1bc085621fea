"""wsgate beside socket.io: ``make bench-peers`` / ``python -m bench.peers [options]``.

Drives the shared harness of ``../shared/peers`` (a socket.io 4.8 server and a
Node load generator, ``load/loadgen.js``; see its README.md). The harness
directory is read-only and ``run.sh`` writes into its own directory (``npm ci``,
results/logs), so it is copied to ``build/peers/`` first (re-copied when the
source changed; ``node_modules`` is kept while ``package-lock.json`` is the same).

For each scenario, socket.io and wsgate run in turn (A B A B, ``--repeat``
times each), both with the harness's raw client (``--client raw``); wsgate is
run by ``run.sh external`` as a user runs it: ``wsgate serve`` with the
defaults (``record_events = true``, INFO logging, the voipbin authorizer,
SQLite audit in a fresh temporary directory each run), a static token of a
``project_super_admin`` agent so it may subscribe to the topics the harness
invents, and, as ``bench/common.py`` does, connection limits and the client
message rate limit off and pings every 600 s.

The table gives the median of each side, their ratio, the server's CPU
microseconds per event (``cpu_pct_window / 100 / events per s``), messages
missing, and flags a run where other processes used more than 10 % of the
machine (``foreign_cpu_pct``) or the generator more than 90 % of its core.
Everything (each run's JSON line and the table) is saved in
``bench/results/peers-<time>.json``. Any failure (no harness, no node or npm,
a run that errors) ends with a non-zero exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import AGENT, CUSTOMER, RESULTS, ROOT, WSGATE, free_port

TOKEN = "perf-token"
INGEST_KEY = "perf-ingest"
BUILD = ROOT / "build" / "peers"
PREFIX_ENV = "WSGATE_PEERS_SERVER_PREFIX"

#: name -> (run.sh scenario, N, N with --quick, loadgen flags)
SCENARIOS: dict[str, tuple[str, int, int, tuple[str, ...]]] = {
    "fanout": ("fanout", 1000, 200, ()),
    "targeted-batch10": ("targeted", 5000, 1000, ("--batch", "10")),
    "targeted-batch1": ("targeted", 5000, 1000, ()),
    "idle": ("idle", 10_000, 2000, ()),
}
SYSTEMS = ("socketio", "wsgate")


class PeersError(RuntimeError):
    """A run that cannot be trusted or did not happen: the command fails."""


# -- the harness -------------------------------------------------------------


def _tree_digest(src: Path) -> str:
    """A digest of the harness's own files (not node_modules or results)."""
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if rel.parts[0] in ("node_modules", "results"):
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def prepare(src: Path, build: Path = BUILD) -> Path:
    """Copy the harness to a writable build directory (again when its files
    changed) and check that node and npm are there; returns the copy."""
    if not (src / "run.sh").is_file() or not (src / "load" / "loadgen.js").is_file():
        raise PeersError(f"no peers harness at {src} (run.sh and load/loadgen.js expected): "
                         "set PEERS=/path/to/peers")
    for tool in ("node", "npm", "taskset", "curl"):
        if shutil.which(tool) is None:
            raise PeersError(f"{tool} is not installed (the peers harness needs it)")
    digest = _tree_digest(src)
    stamp = build / ".source-digest"
    if stamp.is_file() and stamp.read_text() == digest:
        return build
    keep_modules = (build / "node_modules").is_dir() and (build / "package-lock.json").is_file() \
        and (src / "package-lock.json").read_bytes() == (build / "package-lock.json").read_bytes()
    if build.exists():
        for child in build.iterdir():
            if child.name in ("results",) or (keep_modules and child.name == "node_modules"):
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    build.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("node_modules", "results"):
            continue
        dest = build / rel
        if path.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            shutil.copyfile(path, dest)  # not copy2: the source is read-only
            dest.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
    if not keep_modules and (build / "node_modules").exists():
        shutil.rmtree(build / "node_modules")
    stamp.write_text(digest)
    print(f"peers: copied {src} to {build}", file=sys.stderr)
    return build


# -- wsgate for the harness ----------------------------------------------------


def wsgate_config(port: int, workdir: Path, record_events: bool = True) -> str:
    """wsgate as a user runs it (defaults kept: record_events, INFO logging), with
    the harness's token and ingest key, and bench/common.py's limits off."""
    return f"""
[server]
host = "127.0.0.1"
port = {port}
node_id = "peers-{port}"
# As bench/common.py: thousands of connections of one principal from 127.0.0.1,
# no client message rate limit, no pings during a run.
max_connections_per_principal = 0
max_connections_per_ip = 0
max_messages_per_second = 0.0
ping_interval = 600.0
ping_timeout = 60.0
idle_connection_timeout = 600.0

[auth]
plugin = "static"
[auth.options.tokens."{TOKEN}"]
kind = "agent"
subject = "perf"
customer_id = "{CUSTOMER}"
agent_id = "{AGENT}"
permissions = ["project_super_admin"]

[permissions]
plugin = "voipbin"

[ingest]
keys = ["{INGEST_KEY}"]

[audit]
url = "sqlite:///{workdir}/audit.db"
journal_path = "{workdir}/audit.journal"
{"" if record_events else "record_events = false  # not the default (--no-record-events)"}

[logging]
level = "INFO"
"""


def wait_gone(marker: str, timeout: float = 60.0) -> None:
    """Wait until no process has ``marker`` in its command line (Linux /proc)."""
    needle = marker.encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "cmdline").read_bytes():
                    alive = True
                    break
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.1)
    raise PeersError(f"a server started with {marker} still runs after {timeout:g} s")


def run_once(build: Path, system: str, scenario: str, args: argparse.Namespace,
             log: Path) -> dict[str, Any]:
    """One run.sh run; its JSON report, or PeersError."""
    kind, full_n, quick_n, flags = SCENARIOS[scenario]
    n = quick_n if args.quick else full_n
    loadgen = ["--client", "raw", *flags]
    duration = args.duration or (3.0 if args.quick else None)
    if kind == "idle":
        if args.quick:
            loadgen += ["--settle", "2", "--idle-hold", "3"]
    elif duration:
        loadgen += ["--duration", f"{duration:g}"]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="wsgate-peers-") as tmp:
        if system == "wsgate":
            port = free_port()
            cfg = Path(tmp) / "wsgate.toml"
            cfg.write_text(wsgate_config(port, Path(tmp), not args.no_record_events))
            prefix = args.server_cmd_prefix
            env.update(SERVER_CMD=f"{prefix} {shlex.quote(WSGATE)} serve --config "
                                  f"{shlex.quote(str(cfg))}".strip(),
                       READY_URL=f"http://127.0.0.1:{port}/healthz", PORT=str(port))
            argv = ["external", kind, str(n), *loadgen,
                    "--url", f"ws://127.0.0.1:{port}/v1.0/ws",
                    "--publish-url", f"http://127.0.0.1:{port}/v1.0/events",
                    "--token", TOKEN, "--auth", f"Bearer {INGEST_KEY}"]
        else:
            argv = [system, kind, str(n), *loadgen]
        with log.open("ab") as err:
            err.write(f"\n== {system} {scenario}: run.sh {shlex.join(argv)}\n".encode())
            err.flush()
            proc = subprocess.run(["bash", str(build / "run.sh"), *argv], cwd=build, env=env,
                                  stdout=subprocess.PIPE, stderr=err, timeout=900)
        if system == "wsgate":
            # run.sh sends SIGTERM and returns; a wsgate closing thousands of
            # connections (and writing their disconnect rows into tmp) would
            # still be using core 0 during the next run.
            wait_gone(str(cfg))
    lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    if proc.returncode != 0 or not lines:
        raise PeersError(f"{system} {scenario}: run.sh exited {proc.returncode}\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result.get("error"):
        raise PeersError(f"{system} {scenario}: {result['error']}\n{tail}")
    subscribed = result.get("connections", {}).get("subscribed")
    if subscribed != n:
        raise PeersError(f"{system} {scenario}: {subscribed} of {n} connections subscribed\n{tail}")
    return result


# -- figures -----------------------------------------------------------------


def figures(kind: str, r: dict[str, Any]) -> dict[str, float | None]:
    """The figures of one run: the scenario's main figure, CPU per event, missing."""
    server = r.get("server") or {}
    if kind == "idle":
        kib = server.get("rss_per_conn_after_hold_kb", server.get("rss_per_conn_kb"))
        return {"main": kib, "cpu_us_per_event": None, "missing": None, "foreign": None}
    events = r.get("publish_ev_per_s") or 0.0
    cpu = server.get("cpu_pct_window")
    return {
        "main": r.get("delivered_msgs_per_s") if kind == "fanout" else events,
        "cpu_us_per_event": round(cpu / 100 / events * 1e6, 1) if cpu is not None and events
        else None,
        "missing": r.get("messages_missing"),
        "foreign": r.get("foreign_cpu_pct"),
    }


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


LABELS = {
    "fanout": "fanout delivered msgs/s",
    "targeted-batch10": "targeted events/s, 10/POST",
    "targeted-batch1": "targeted events/s, 1/POST",
    "idle": "idle KiB RSS per connection",
}


def table_rows(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for scenario in args.scenario:
        kind, full_n, quick_n, _ = SCENARIOS[scenario]
        per: dict[str, list[dict[str, float | None]]] = {s: [] for s in SYSTEMS}
        for run in runs:
            if run["scenario"] == scenario:
                per[run["system"]].append(figures(kind, run["result"]))
        sio = median([f["main"] for f in per["socketio"]])
        ws = median([f["main"] for f in per["wsgate"]])
        ratio = f"{ws / sio:.2f}x" if ws is not None and sio else "-"
        digits = 1 if kind == "idle" else 0
        cpu = " / ".join(fmt(median([f["cpu_us_per_event"] for f in per[s]]), 1)
                         for s in SYSTEMS)
        missing = " / ".join(fmt(max((f["missing"] or 0 for f in per[s]), default=None))
                             if kind != "idle" else "-" for s in SYSTEMS)
        foreign = " / ".join(fmt(median([f["foreign"] for f in per[s]])) for s in SYSTEMS)
        each = " / ".join(",".join(fmt(f["main"], digits) for f in per[s]) for s in SYSTEMS)
        n = quick_n if args.quick else full_n
        rows.append((f"{LABELS[scenario]} ({n:,} conns)", fmt(sio, digits), fmt(ws, digits),
                     ratio, cpu, missing, foreign, each))
    return rows


HEADER = ("scenario", "socket.io", "wsgate", "wsgate/socket.io", "server CPU us/event (sio / ws)",
          "missing (sio / ws)", "foreign CPU % (sio / ws)", "each run (sio / ws)")


def warnings_of(runs: list[dict[str, Any]]) -> list[str]:
    notes = []
    for run in runs:
        r = run["result"]
        name = f"{run['scenario']} {run['system']} #{run['rep']}"
        foreign = r.get("foreign_cpu_pct")
        if foreign is not None and foreign > 10:
            notes.append(f"{name}: foreign_cpu_pct {foreign} > 10: other processes disturbed "
                         "this run, discard it")
        gen = (r.get("loadgen") or {}).get("cpu_pct_window")
        if gen is not None and gen > 90:
            notes.append(f"{name}: the load generator used {gen}% of its core: the figure may "
                         "be the generator's limit")
        if r.get("messages_missing"):
            notes.append(f"{name}: messages_missing = {r['messages_missing']}")
    return notes


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (HEADER, *rows)) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in (HEADER, *rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers",
                        help="the shared harness (read-only; default ../shared/peers)")
    parser.add_argument("--build", type=Path, default=BUILD,
                        help="where the harness is copied to (default build/peers)")
    parser.add_argument("--scenario", action="append", choices=tuple(SCENARIOS),
                        help="run this scenario (repeatable; default: all)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each server per scenario, taken in turn (default 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds of publishing per run (default 10, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer connections, 3 s runs")
    parser.add_argument("--server-cmd-prefix", default=os.environ.get(PREFIX_ENV, ""),
                        help="put in front of `wsgate serve ...`, e.g. 'env PYTHONPATH=/tmp/snap' "
                             f"to run another tree's wsgate (default: ${PREFIX_ENV})")
    parser.add_argument("--no-record-events", action="store_true",
                        help="wsgate with record_events = false (not the default): "
                             "how much of its cost is the audit row of each event")
    args = parser.parse_args(argv)
    args.scenario = args.scenario or list(SCENARIOS)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    try:
        build = prepare(args.peers.resolve(), args.build.resolve())
    except (PeersError, OSError) as exc:
        print(f"bench-peers: {exc}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = RESULTS / f"peers-{stamp}.log"
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "loadavg_start": os.getloadavg(), "runs": runs}
    failure = None
    try:
        for scenario in args.scenario:
            for rep in range(1, args.repeat + 1):
                for system in SYSTEMS:
                    print(f"-- {scenario}: {system} (run {rep}/{args.repeat}), "
                          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                    result = run_once(build, system, scenario, args, log)
                    runs.append({"scenario": scenario, "system": system, "rep": rep,
                                 "result": result})
    except (PeersError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        failure = exc
    report["loadavg_end"] = os.getloadavg()
    rows = table_rows(runs, args) if runs else []
    notes = warnings_of(runs)
    text = render(rows)
    report["table"] = text
    report["notes"] = notes
    path = RESULTS / f"peers-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(text)
    for note in notes:
        print("note:", note)
    print(f"load average {report['loadavg_start'][0]:.2f} at the start, "
          f"{report['loadavg_end'][0]:.2f} at the end (2 cores: the machine may be shared)")
    print(f"saved {path.relative_to(ROOT)} (run.sh logs: {log.relative_to(ROOT)})")
    if failure is not None:
        print(f"bench-peers: FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
