"""Check the generator's latency figure against a server that knows the answer.

    python -m bench.rx_check [RATE [BURN_US]]

Runs the paced fan-out spec (1,000 connections, RATE events/s, 8 s; default
10) against bench/floor_server.py, twice: with the generator as it is, and
with it wasting BURN_US (default 50) microseconds of CPU per read, i.e. a
generator as slow as the old one. The floor server notes, just before each
send, how long after the event's send time it is; the generator's latency
(kernel receive time - send time) should match that, give or take the
loopback path, in both runs, while the generator's read latency (the time it
parsed the frame) grows with BURN_US. Prints one JSON line per run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.__main__ import FANOUT_TOPIC, Server, raise_nofile, run_generator


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    burn = float(sys.argv[2]) if len(sys.argv) > 2 else 50.0
    n, duration = 1000, 8
    raise_nofile()
    for restamp, burn_us in ((False, 0.0), (True, 0.0), (True, burn), (False, burn)):
        spec = {"mode": "publish", "connections": n, "topic": FANOUT_TOPIC,
                "topics_of": [[] for _ in range(n)], "duration": duration,
                "recipients_per_event": n, "window": 50 * n, "publishers": 4,
                "sample_every": 5, "rate": rate, "burn_us": burn_us}
        with tempfile.TemporaryDirectory() as work:
            with Server("floor", Path(work), args=("restamp",) if restamp else ()) as srv:
                r = run_generator(spec, srv, duration + 120)
            floor = json.loads(srv.log.read_text().strip().splitlines()[-1])
        print(json.dumps({
            "rate": rate, "restamp": restamp, "burn_us": burn_us, "loadavg": os.getloadavg(),
            "generator_latency_ms": r["latency_ms"],
            "generator_read_latency_ms": r["read_latency_ms"],
            "server_send_latency_ms": floor.get("send_latency_ms"),
            "send_loop_us_per_frame": floor.get("send_loop_us_per_frame"),
            "send_loop_cpu_us_per_frame": floor.get("send_loop_cpu_us_per_frame"),
            "server_cpu_us_per_frame": r["server_cpu_us_per_frame"],
            "generator_cpu": r["generator_cpu"], "reads_unstamped": r["reads_unstamped"],
            "lost": r["lost"], "dupes": r["dupes"], "frames": r["frames_total"]}), flush=True)


if __name__ == "__main__":
    main()
