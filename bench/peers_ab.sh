#!/usr/bin/env bash
# socket.io, then wsgate from two trees, in turn, on the shared peers harness:
#   bench/peers_ab.sh OUT.jsonl REPS TREE_A TREE_B [PEERS_DIR]
# TREE_A/TREE_B: wsgate source trees (e.g. `git archive REV | tar -x -C DIR`); each is
# served with PYTHONPATH=TREE from this checkout's .venv, with the config bench/peers.py
# writes (SQLite audit, defaults otherwise). PEERS_DIR: a writable copy of the harness
# (default build/peers, which `make bench-peers` makes). Prints one JSON line per run,
# each after a {"who": ..., "sc": ...} line; `make bench-peers` is the usual way.
set -euo pipefail
OUT=$1; REPS=${2:-2}; A=$3; B=$4
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${5:-$HERE/build/peers}"
CONF="$(mktemp -d)"
(cd "$HERE" && .venv/bin/python -c "
import sys, pathlib; from bench.peers import wsgate_config
pathlib.Path(sys.argv[1], 'wsgate.toml').write_text(wsgate_config(9000, pathlib.Path(sys.argv[1])))" "$CONF")
: > "$OUT"
for rep in $(seq "$REPS"); do
  for sc in "targeted 5000 --batch 10" "targeted 5000 --batch 1" "fanout 1000" "idle 10000"; do
    echo "{\"who\":\"socketio\",\"sc\":\"$sc\"}" >> "$OUT"
    (cd /tmp && "$PEERS/run.sh" socketio $sc --client raw 2>/dev/null) >> "$OUT"
    for t in "$A" "$B"; do
      echo "{\"who\":\"$t\",\"sc\":\"$sc\"}" >> "$OUT"
      (cd /tmp && SERVER_CMD="env PYTHONPATH=$t $HERE/.venv/bin/wsgate serve --config $CONF/wsgate.toml" \
        READY_URL=http://127.0.0.1:9000/healthz PORT=9000 "$PEERS/run.sh" external $sc --client raw \
        --url ws://127.0.0.1:9000/v1.0/ws --publish-url http://127.0.0.1:9000/v1.0/events \
        --token perf-token --auth "Bearer perf-ingest" 2>/dev/null) >> "$OUT"
    done
  done
done
