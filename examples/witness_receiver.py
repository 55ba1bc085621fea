"""A minimal HTTP witness for wsgate audit checkpoints (docs/audit.md, "Witnesses").

    python examples/witness_receiver.py PORT [--file witness.jsonl] [--host 127.0.0.1]

POST: the body must be one JSON object (a checkpoint); it is appended to the
file as one line, fsynced, and answered 204. GET: the file, as JSON lines.
Port 0 picks a free port; the address is printed on the first line of stdout.
Standard library only; put it behind a TLS proxy with authentication in production.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class WitnessReceiver(ThreadingHTTPServer):
    """An HTTP server that keeps every checkpoint POSTed to it in one JSONL file."""

    def __init__(self, address: tuple[str, int], path: str | Path,
                 bind_and_activate: bool = True) -> None:
        super().__init__(address, Handler, bind_and_activate)
        self.file = Path(path)
        self.lock = threading.Lock()  # one append at a time keeps lines whole


class Handler(BaseHTTPRequestHandler):
    server: WitnessReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            checkpoint = json.loads(body)
        except ValueError:
            checkpoint = None
        if not isinstance(checkpoint, dict):
            self.send_error(400, "the body must be one JSON object")
            return
        line = json.dumps(checkpoint, sort_keys=True, separators=(",", ":")) + "\n"
        with self.server.lock, open(self.server.file, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:
        with self.server.lock:
            data = self.server.file.read_bytes() if self.server.file.exists() else b""
        self.send_response(200)
        self.send_header("Content-Type", "application/jsonl")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Keep wsgate audit checkpoints.")
    parser.add_argument("port", type=int)
    parser.add_argument("--file", default="witness.jsonl")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with WitnessReceiver((args.host, args.port), args.file) as server:
        host, port = server.server_address[:2]
        print(f"witness receiver on http://{host}:{port}/ writing {args.file}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
