"""What the benchmark scripts share: names, ports, /proc readings and the
wsgate config they serve."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
WSGATE = str(Path(PYTHON).with_name("wsgate"))
TOKEN = "bench-token"
INGEST_KEY = "bench-ingest-key"
CUSTOMER = "5013bc52-da9a-11ee-844f-2fa34248de28"
AGENT = "8107ec3c-da9a-11ee-9a0c-5b1c1a1f4f3e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wsgate_config(port: int, workdir: Path, node_id: str, *, audit_url: str | None = None,
                  broker_url: str = "memory://", record_events: bool = False,
                  max_subscriptions: int = 1000) -> str:
    """The TOML a benchmarked wsgate serves: one static token, every topic allowed,
    pings, rate and connection limits out of the way, SQLite audit in workdir unless given,
    checkpoints signed as a deployment signs them (a key made in workdir).

    ``WSGATE_BENCH_AUDIT`` (environment), if set, is added to the [audit] table
    as it is: e.g. ``witness = ["file:///tmp/w.jsonl"]`` to measure a witness;
    ``WSGATE_BENCH_RECORD_EVENTS=1`` records every ingested event, as the
    defaults of a deployment do.
    """
    audit_url = audit_url or f"sqlite:///{workdir}/audit-{port}.db"
    key_file = workdir / "audit-signing.pem"
    if not key_file.exists():
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        key_file.write_bytes(Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    extra = os.environ.get("WSGATE_BENCH_AUDIT", "")
    return f"""
[server]
host = "127.0.0.1"
port = {port}
node_id = "{node_id}"
ping_interval = 600.0
ping_timeout = 60.0
max_subscriptions = {max_subscriptions}
max_messages_per_second = 0.0
refresh_interval = 0.0
idle_connection_timeout = 600.0
# Thousands of connections from 127.0.0.1, all one principal: off (the defaults
# are 100 per principal, 1000 per address).
max_connections_per_principal = 0
max_connections_per_ip = 0

[auth]
plugin = "static"
[auth.options.tokens."{TOKEN}"]
kind = "agent"
subject = "bench"
customer_id = "{CUSTOMER}"
agent_id = "{AGENT}"
permissions = ["customer_admin"]

[permissions]
plugin = "allow_all"

[ingest]
keys = ["{INGEST_KEY}"]

[audit]
url = "{audit_url}"
journal_path = "{workdir}/audit-{port}.journal"
record_events = {"true" if record_events or os.environ.get("WSGATE_BENCH_RECORD_EVENTS")
                  else "false"}
signing_key_file = "{key_file}"
{extra}

[broker]
url = "{broker_url}"

[logging]
level = "WARNING"
"""
