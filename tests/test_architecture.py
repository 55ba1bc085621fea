"""Which way the imports go (docs/architecture.md): the core imports no framework.

The core is every module of wsgate/ except the adapters (wsgate/adapters/),
the composition root (wsgate/app.py) and the command line (wsgate/__main__.py).
A core module that imports Tornado, an adapter or the root fails here, and so
does a gateway room that imports the metrics (they flow through the Observer
protocol) and an adapter that reaches into a gateway room. Imports made only
for type checking (under ``if TYPE_CHECKING:``) do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wsgate"
EDGE = ("wsgate.adapters", "wsgate.app", "wsgate.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import that runs, wherever it is in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))
#: The gateway's rooms: adapters reach them only through the Gateway facade.
ROOMS = {p.stem for p in (PACKAGE / "gateway").glob("*.py")} - {
    "__init__", "connection", "observer", "facade"}


def breaches(rule: str) -> list[str]:
    out = []
    for path in MODULES:
        me = module_name(path)
        for line, name in runtime_imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            edge = any(under(me, e) for e in EDGE)
            if rule == "core" and not edge and (
                    under(name, "tornado") or any(under(name, e) for e in EDGE)):
                out.append(where)
            if rule == "metrics" and under(me, "wsgate.gateway") and (
                    under(name, "wsgate.metrics") or under(name, "prometheus_client")):
                out.append(where)
            if rule == "rooms" and under(me, "wsgate.adapters") and name.startswith(
                    "wsgate.gateway.") and name.split(".")[2] in ROOMS:
                out.append(where)
    return out


@pytest.mark.parametrize("rule", ["core", "metrics", "rooms"])
def test_imports_go_one_way(rule: str) -> None:
    assert breaches(rule) == []


def test_the_check_sees_a_breach(tmp_path: Path) -> None:
    """The scan finds a Tornado import in a core module (so the rule can fail)."""
    probe = PACKAGE / "gateway" / "_architecture_probe.py"
    probe.write_text("import tornado.web\n")
    try:
        MODULES.append(probe)
        assert [b for b in breaches("core") if "_architecture_probe" in b] == [
            "wsgate/gateway/_architecture_probe.py:1 imports tornado.web"]
    finally:
        MODULES.remove(probe)
        probe.unlink()
