#!/usr/bin/env bash
# socket.io, then wsgate from two trees, in turn, on the shared peers harness:
#   bench/peers_ab.sh OUT.jsonl REPS TREE_A TREE_B [PEERS_DIR]
# TREE_A/TREE_B: wsgate source trees (e.g. `git archive REV | tar -x -C DIR`); each is
# served with PYTHONPATH=TREE from this checkout's .venv, with the config bench/peers.py
# writes (SQLite audit, defaults otherwise). PEERS_DIR: a writable copy of the harness
# (default build/peers, which `make bench-peers` makes). Prints one JSON line per run,
# each after a {"who": ..., "sc": ...} line; `make bench-peers` is the usual way.
# SCENARIOS="targeted 5000 --batch 1;fanout 1000" narrows the run (';' between scenarios).
set -euo pipefail
OUT=$1; REPS=${2:-2}; A=$3; B=$4
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${5:-$HERE/build/peers}"
# Each wsgate run gets a fresh directory (config, SQLite audit, journal), as
# bench/peers.py does: runs never share a store or its node lock.
fresh_config() {
  local dir; dir="$(mktemp -d)"
  (cd "$HERE" && .venv/bin/python -c "
import sys, pathlib; from bench.peers import wsgate_config
pathlib.Path(sys.argv[1], 'wsgate.toml').write_text(wsgate_config(9000, pathlib.Path(sys.argv[1])))" "$dir")
  echo "$dir"
}
# run.sh stops the server with SIGTERM and does not wait: a wsgate draining 5,000
# connections may still hold port 9000 when the next run starts.
wait_port_free() {
  for _ in $(seq 300); do
    pgrep -f "wsgate serve --config /tmp/tmp" > /dev/null || return 0
    sleep 0.1
  done
  echo "peers_ab: a wsgate server is still running after 30 s" >&2; return 1
}
: > "$OUT"
IFS=';' read -r -a SCS <<< "${SCENARIOS:-targeted 5000 --batch 10;targeted 5000 --batch 1;fanout 1000;idle 10000}"
for rep in $(seq "$REPS"); do
  for sc in "${SCS[@]}"; do
    echo "{\"who\":\"socketio\",\"sc\":\"$sc\"}" >> "$OUT"
    (cd /tmp && "$PEERS/run.sh" socketio $sc --client raw 2>/dev/null) >> "$OUT"
    for t in "$A" "$B"; do
      echo "{\"who\":\"$t\",\"sc\":\"$sc\"}" >> "$OUT"
      wait_port_free
      CONF="$(fresh_config)"
      (cd /tmp && SERVER_CMD="env PYTHONPATH=$t $HERE/.venv/bin/wsgate serve --config $CONF/wsgate.toml" \
        READY_URL=http://127.0.0.1:9000/healthz PORT=9000 "$PEERS/run.sh" external $sc --client raw \
        --url ws://127.0.0.1:9000/v1.0/ws --publish-url http://127.0.0.1:9000/v1.0/events \
        --token perf-token --auth "Bearer perf-ingest" 2>/dev/null) >> "$OUT"
      wait_port_free
      rm -rf "$CONF"
    done
  done
done
