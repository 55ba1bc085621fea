"""Fan-out paced at a fixed rate, wsgate only: ``python -m bench.paced_fanout RATE``.

The ``fanout`` scenario paces at half of the saturation rate it just measured,
so two versions compared with it are paced at different rates; this runs the
same paced spec (1,000 connections, one topic, 8 s) at the rate given, and
prints one JSON line: latency percentiles (ms), server CPU per frame,
generator CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.__main__ import FANOUT_TOPIC, Server, raise_nofile, run_generator


def main() -> None:
    rate = float(sys.argv[1])
    n, duration = 1000, 8
    spec = {"mode": "publish", "connections": n, "topic": FANOUT_TOPIC, "duration": duration,
            "recipients_per_event": n, "window": 50 * n, "publishers": 4, "sample_every": 5,
            "rate": rate}
    raise_nofile()
    with tempfile.TemporaryDirectory() as work, Server("wsgate", Path(work)) as srv:
        r = run_generator(spec, srv, duration + 120)
    print(json.dumps({"rate": rate, "latency_ms": r["latency_ms"],
                      "events_per_s": round(r["events_per_s"], 1),
                      "server_cpu_us_per_frame": r["server_cpu_us_per_frame"],
                      "generator_cpu": r["generator_cpu"], "lost": r["lost"]}))


if __name__ == "__main__":
    main()
