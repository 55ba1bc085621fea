"""The local journal: rows that must not be lost, kept while the store is down.

One JSON object a line: ``{"chain": "rows" | "events", "row": {...}}`` where
``row`` is the complete, already chained row (seq, prev_hash, row_hash
included). Because each entry carries its seq, replaying it is idempotent:
an entry whose (node_id, seq) is already stored was committed before a crash
and is skipped. That makes a crash between the commit and the truncation
harmless (exactly once).

Only the audit writer thread touches a journal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("wsgate.audit")


class Journal:
    """An append-only JSON-lines file, fsynced after each append."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Append (chain, row) entries durably (write, flush, fsync).

        Raises:
            OSError: the journal cannot be written either. The caller logs it:
                there is nowhere left to keep the rows.
        """
        if not entries:
            return
        data = "".join(
            json.dumps({"chain": c, "row": r}, separators=(",", ":"), ensure_ascii=False) + "\n"
            for c, r in entries
        ).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def set_aside(self) -> Path:
        """Copy the journal to ``<path>.conflict-<unix time>`` (fsynced) and return
        that path: rows that could not be stored are kept for a person to review.

        Raises:
            OSError: the copy cannot be written.
        """
        import time

        target = self.path.with_name(f"{self.path.name}.conflict-{int(time.time())}")
        data = self.path.read_bytes()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return target

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        """Every complete entry, in order.

        A damaged line (the process died in the middle of an append, which
        was therefore never acknowledged) is skipped with a warning.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        entries: list[tuple[str, dict[str, Any]]] = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                entries.append((str(doc["chain"]), dict(doc["row"])))
            except (ValueError, KeyError, TypeError):
                log.warning("audit journal %s: line %d is damaged and skipped", self.path, number)
        return entries

    def clear(self) -> None:
        """Empty the journal (after its entries are committed), durably."""
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
