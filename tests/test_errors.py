"""Every code the outside world can see is a name in wsgate/errors.py, and documented.

A call that spells a code as a string literal fails here naming file:line
(``HTTPFailure(401, "unauthenticated", ...)`` instead of
``HTTPFailure(401, errors.UNAUTHENTICATED, ...)``), and so does a code of
errors.py that no doc names, or an HTTP error answer whose status and code no
doc line gives together.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from wsgate import errors

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "wsgate").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
DOCS = [ROOT / "docs" / name for name in ("protocol.md", "audit.md", "operations.md")]

#: Calls that take a code: callee name -> (position of the code, its keyword).
#: ``error`` and ``rejection`` count only as protocol's (``protocol.error(...)``,
#: or a bare call inside protocol.py), not as ``log.error(...)``.
CODE_ARGUMENT = {"HTTPFailure": (1, "code"), "error": (0, "code"),
                 "rejection": (1, "code"), "deny": (1, "code")}
PROTOCOL_ONLY = {"error", "rejection"}


def code_calls(path: Path) -> Iterator[tuple[ast.Call, str, ast.expr]]:
    """(call, callee name, code argument) of every call in path that passes a code."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            name = func.id
            if name in PROTOCOL_ONLY and path.name != "protocol.py":
                continue
        elif isinstance(func, ast.Attribute):
            name = func.attr
            if name in PROTOCOL_ONLY and not (
                    isinstance(func.value, ast.Name) and func.value.id == "protocol"):
                continue
        else:
            continue
        if name not in CODE_ARGUMENT:
            continue
        position, keyword = CODE_ARGUMENT[name]
        if len(node.args) > position and not any(
                isinstance(a, ast.Starred) for a in node.args[:position + 1]):
            yield node, name, node.args[position]
        for kw in node.keywords:
            if kw.arg == keyword:
                yield node, name, kw.value


def is_literal(expr: ast.expr) -> bool:
    return isinstance(expr, ast.JoinedStr) or (
        isinstance(expr, ast.Constant) and isinstance(expr.value, str))


def literal_codes() -> list[str]:
    out = []
    for path in SOURCES:
        for call, name, code in code_calls(path):
            if is_literal(code):
                out.append(f"{path.relative_to(ROOT)}:{call.lineno}: {name}(...) spells the "
                           f"code {ast.unparse(code)}; use its name in wsgate/errors.py")
    return out


def test_no_code_is_spelled_as_a_string_literal() -> None:
    found = literal_codes()
    assert not found, "\n".join(found)


def test_the_scan_sees_the_calls_it_checks() -> None:
    # A scan that finds nothing passes whatever the code says: make sure it finds
    # the calls of each kind that exist today.
    seen = {name for path in SOURCES for _, name, _ in code_calls(path)}
    assert seen >= {"HTTPFailure", "error", "rejection"}


def constant(expr: ast.expr) -> str | None:
    """The value of ``errors.NAME`` or an imported ``NAME`` of errors.py, else None."""
    name = expr.attr if isinstance(expr, ast.Attribute) else (
        expr.id if isinstance(expr, ast.Name) else None)
    value = getattr(errors, name, None) if name is not None and name.isupper() else None
    return value if isinstance(value, str) else None


def http_answers() -> set[tuple[int | None, str]]:
    """(status, code) of every HTTP error answer wsgate gives; None: any status."""
    answers: set[tuple[int | None, str]] = set()
    for path in SOURCES:
        for call, name, code in code_calls(path):
            status = call.args[0] if call.args else None
            value = constant(code)
            if (name == "HTTPFailure" and value is not None and isinstance(status, ast.Constant)
                    and isinstance(status.value, int)):
                answers.add((status.value, value))
    answers |= {(status, code) for status, (code, _) in errors.GENERIC_ERRORS.items()}
    answers.add((None, errors.HTTP_ERROR))
    refusals = [errors.ConnectionRefused]
    while refusals:
        cls = refusals.pop()
        answers.add((cls.status, cls.code))
        refusals += cls.__subclasses__()
    return answers


def doc_lines() -> list[str]:
    return [line for path in DOCS for line in path.read_text().splitlines()]


def test_every_code_of_errors_py_is_documented() -> None:
    text = "\n".join(doc_lines())
    codes = {name: value for name, value in vars(errors).items()
             if name.isupper() and isinstance(value, str)}
    assert len(codes) > 20
    missing = [f"{name} = {value!r}" for name, value in sorted(codes.items())
               if f"`{value}`" not in text]
    assert not missing, f"not in docs/protocol.md, audit.md or operations.md: {missing}"


def test_every_http_error_answer_is_documented_with_its_status() -> None:
    answers = http_answers()
    # Today's HTTP answers, as a floor: a scan that lost some would pass with fewer.
    assert {(403, errors.ORIGIN_NOT_ALLOWED), (409, errors.REPLAYED),
            (503, errors.AUDIT_UNAVAILABLE), (429, errors.TOO_MANY_CONNECTIONS),
            (405, errors.METHOD_NOT_ALLOWED)} <= answers
    lines = doc_lines()
    missing = []
    for status, code in sorted(answers, key=lambda a: (a[0] or 0, a[1])):
        pattern = re.compile(rf"`{re.escape(code)}`")
        if not any(pattern.search(line) and (status is None or re.search(rf"\b{status}\b", line))
                   for line in lines):
            missing.append(f"{status} {code}")
    assert not missing, f"no doc line gives the status and the code together: {missing}"
