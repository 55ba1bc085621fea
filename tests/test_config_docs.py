"""docs/config.md states every default of wsgate/config.py, and config.example.toml
marks (and docs/config.md lists) every value it changes, so neither drifts."""

import dataclasses
import json
import re
import tomllib
from pathlib import Path

from wsgate.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"
EXAMPLE = ROOT / "config.example.toml"
MARK = "not the default"

#: Defaults computed at start-up rather than stored: how the page writes them.
COMPUTED = {("server", "node_id"): '"<hostname>:<port>"'}


def doc_tables() -> dict[str, dict[str, str]]:
    """``{table: {key: default cell}}`` from the ``## `[table]``` sections' tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `\[(\w+)\]`$", line)
        if heading:
            section = tables.setdefault(heading.group(1), {})
            continue
        if line.startswith("## ") or line.startswith("### "):
            section = None
            continue
        row = re.match(r"^\| `(\w+)` \| ([^|]*) \|", line)
        if section is not None and row:
            section[row.group(1)] = row.group(2).strip()
    return tables


def render(value: object) -> str | None:
    """A default as the page writes it (TOML); None for "no value"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, dict) or hasattr(value, "items"):
        return "{}" if not dict(value) else json.dumps(dict(value))
    raise AssertionError(f"no rendering for {value!r}")


def defaults() -> dict[tuple[str, str], object]:
    config = Config()
    return {(table.name, f.name): getattr(getattr(config, table.name), f.name)
            for table in dataclasses.fields(Config) if table.name != "source"
            for f in dataclasses.fields(getattr(config, table.name))}


def test_every_config_field_is_in_docs_config_md_with_its_default():
    tables = doc_tables()
    problems = []
    for (table, key), value in defaults().items():
        cell = tables.get(table, {}).get(key)
        if cell is None:
            problems.append(f"[{table}] {key}: no row in docs/config.md")
            continue
        want = COMPUTED.get((table, key), render(value))
        spans = re.findall(r"`([^`]*)`", cell)
        if want is None:
            ok = cell.startswith("none")
        else:
            ok = bool(spans) and spans[0] == want
        if not ok:
            problems.append(f"[{table}] {key}: docs say {cell!r}, the default is "
                            f"{want or 'none'}")
    assert not problems, "\n".join(problems)


def test_the_plugin_defaults_are_stated():
    tables = doc_tables()
    assert tables["auth"]["plugin"] == '`"static"`'
    assert tables["permissions"]["plugin"] == '`"voipbin"`'


def _changed() -> list[tuple[str, str]]:
    """(table, key) of every value in config.example.toml that is not the default."""
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    base = defaults()
    changed = []
    for table, values in raw.items():
        for key, value in values.items():
            default = base[(table, key)]
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if hasattr(default, "items"):
                default = dict(default)
            if value != default:
                changed.append((table, key))
    return changed


def test_the_example_marks_every_value_that_is_not_the_default():
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    section = ""
    marked: set[tuple[str, str]] = set()
    for line in lines:
        table = re.match(r"^\[(\w+)(?:\.(\w+))?\]", line)
        if table:
            section = table.group(1)
            if table.group(2) and MARK in line:
                marked.add((section, table.group(2)))
            continue
        key = re.match(r"^(\w+) =", line)
        if key and MARK in line:
            marked.add((section, key.group(1)))
    assert set(_changed()) == marked


def test_docs_config_md_lists_what_the_example_changes():
    text = DOC.read_text(encoding="utf-8")
    part = text[text.index("## What the example changes"):]
    listed = set(re.findall(r"^\| `\[(\w+)(?:\.options)?\] (\w+)`", part, re.M))
    changed = {(t, "tokens") if k == "options" else (t, k) for t, k in _changed()}
    assert changed == listed
