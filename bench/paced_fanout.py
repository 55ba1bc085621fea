"""Fan-out paced at a fixed rate: ``python -m bench.paced_fanout RATE [SECONDS [SERVER]]``.

The ``fanout`` scenario paces at half of the saturation rate it just measured,
so two versions compared with it are paced at different rates; this runs the
same paced spec (1,000 connections, one topic, 8 s by default) at the rate
given (events/s; 0 = saturated, as the ``fanout`` scenario's first run), and
prints one JSON line: latency percentiles (ms, kernel receive time - send
time; ``read_latency_ms`` is when the generator parsed the frame), server CPU
per frame, generator CPU, the load average. SERVER is ``wsgate`` (default),
``naive`` or ``floor`` (bench/floor_server.py: a bare loop of one ``send`` per
connection, the floor of any server that writes each frame with its own call).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.__main__ import FANOUT_TOPIC, Server, raise_nofile, run_generator


def main() -> None:
    rate = float(sys.argv[1])
    duration = float(sys.argv[2]) if len(sys.argv) > 2 else 8
    kind = sys.argv[3] if len(sys.argv) > 3 else "wsgate"
    n = 1000
    spec: dict[str, object] = {
        "mode": "publish", "connections": n, "topic": FANOUT_TOPIC, "duration": duration,
        "recipients_per_event": n, "window": 50 * n, "publishers": 4,
        "sample_every": 20, "rate": rate or None}
    if kind == "floor":
        spec["topics_of"] = [[] for _ in range(n)]  # it sends every event to everyone
    raise_nofile()
    with tempfile.TemporaryDirectory() as work, Server(kind, Path(work)) as srv:
        r = run_generator(spec, srv, duration + 120)
    print(json.dumps({"server": kind, "rate": rate, "latency_ms": r["latency_ms"],
                      "read_latency_ms": r["read_latency_ms"],
                      "events_per_s": round(r["events_per_s"], 1),
                      "delivered_per_s": round(r["delivered_per_s"]),
                      "server_cpu_us_per_frame": r["server_cpu_us_per_frame"],
                      "server_cpu": r["server_cpu"], "generator_cpu": r["generator_cpu"],
                      "lost": r["lost"], "dupes": r["dupes"],
                      "reads_unstamped": r["reads_unstamped"],
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
