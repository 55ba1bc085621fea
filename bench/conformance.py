"""RFC 6455 conformance: the Autobahn TestSuite fuzzing client against wsgate's layer.

    python -m bench.conformance --site DIR --python27 PATH [--cases 1.*,2.*] [--timeout S]

``make conformance`` installs the suite (Python 2.7 code) into DIR and runs
this. It starts bench/ws_echo.py (the real WebSocket layer in front of an
echo) on an unused loopback port, runs ``wstest -m fuzzingclient`` against it
with a spec for the chosen cases, and prints, per case group, how many cases
were OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED or FAILED (Autobahn's
verdicts on the behaviour and on the closing handshake), then each case that
was not OK. The full report (HTML and JSON) stays in DIR/reports. Exits 1 if
any case FAILED or the run did not finish in time.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

AGENT = "wsgate"
#: Groups 1-7 (framing, pings, reserved bits, opcodes, fragmentation, UTF-8,
#: closing) and 9 (limits and performance); 10 is skipped (auto-fragmentation,
#: informational), 12-13 need permessage-deflate, which wsgate never offers.
DEFAULT_CASES = "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*"
VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
WSTEST = ("import site, sys; site.addsitedir(sys.argv[1]); del sys.argv[1]; "
          "sys.argv[0] = 'wstest'; from autobahntestsuite.wstest import run; run()")


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the echo server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the echo server did not start") from None
            time.sleep(0.05)


def group_of(case: str) -> str:
    return case.split(".")[0]


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case.split("."))


def summarize(index: dict[str, dict[str, dict[str, object]]]) -> tuple[str, int]:
    """A table of verdicts per group (behaviour, then closing handshake), the
    cases that were not OK, and how many FAILED."""
    results = index.get(AGENT, {})
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    closes: dict[str, Counter[str]] = defaultdict(Counter)
    notes = []
    for case in sorted(results, key=case_key):
        r = results[case]
        counts[group_of(case)][str(r["behavior"])] += 1
        closes[group_of(case)][str(r["behaviorClose"])] += 1
        if r["behavior"] != "OK" or r["behaviorClose"] != "OK":
            notes.append(f"  {case}: behaviour {r['behavior']}, close {r['behaviorClose']}, "
                         f"close code {r.get('remoteCloseCode')}")
    lines = ["| group | cases | " + " | ".join(VERDICTS) + " | closing handshake OK |",
             "|---|---|" + "---|" * len(VERDICTS) + "---|"]
    total: Counter[str] = Counter()
    total_close: Counter[str] = Counter()
    for group in sorted(counts, key=int):
        c = counts[group]
        total.update(c)
        total_close.update(closes[group])
        lines.append(f"| {group} | {sum(c.values())} | "
                     + " | ".join(str(c[v]) for v in VERDICTS)
                     + f" | {closes[group]['OK']} |")
    lines.append(f"| all | {sum(total.values())} | "
                 + " | ".join(str(total[v]) for v in VERDICTS) + f" | {total_close['OK']} |")
    if notes:
        lines += ["", "Not OK:", *notes]
    return "\n".join(lines), total["FAILED"] + total_close["FAILED"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, type=Path,
                        help="where autobahntestsuite is installed (pip --target)")
    parser.add_argument("--python27", required=True, help="a Python 2.7 interpreter")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--exclude", default="", help="cases to leave out, e.g. 9.1.6,9.2.6")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds the whole run may take")
    args = parser.parse_args()
    site = args.site.resolve()
    reports = site.parent / "reports"
    port = unused_port()
    spec = {
        "outdir": str(reports),
        "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}],
        "cases": [c for c in args.cases.split(",") if c],
        "exclude-cases": [c for c in args.exclude.split(",") if c],
        "exclude-agent-cases": {},
    }
    spec_path = site.parent / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    (reports / "index.json").unlink(missing_ok=True)
    log = (site.parent / "echo.log").open("wb")
    echo = subprocess.Popen([sys.executable, "-m", "bench.ws_echo", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        wait_listening(port, echo)
        print(f"wstest -m fuzzingclient, cases {args.cases} against ws://127.0.0.1:{port} "
              f"(at most {args.timeout:.0f} s) ...", flush=True)
        try:
            subprocess.run([args.python27, "-c", WSTEST, str(site), "-m", "fuzzingclient",
                            "-s", str(spec_path)], cwd=site.parent, timeout=args.timeout,
                           stdout=(site.parent / "wstest.log").open("wb"),
                           stderr=subprocess.STDOUT, check=True)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"wstest did not finish in {args.timeout:.0f} s "
                             f"(log: {site.parent / 'wstest.log'})") from None
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"wstest exited with {exc.returncode} "
                             f"(log: {site.parent / 'wstest.log'})") from None
    finally:
        echo.terminate()
        echo.wait(10)
        log.close()
    index = json.loads((reports / "index.json").read_text())
    table, failed = summarize(index)
    print(f"\nAutobahn TestSuite, {time.monotonic() - started:.0f} s "
          f"(report: {reports / 'index.html'})\n")
    print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
