"""wsgate.adapters.tornado_compat: each assumption about Tornado, checked against
the installed Tornado.

A Tornado release that changes one of them fails a test here instead of
production. The numbers in the docstrings are those of the assumptions listed
in wsgate/adapters/tornado_compat.py.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import random
import socket
from typing import Any

import pytest
import tornado
import tornado.httpclient
import tornado.httpserver
import tornado.iostream
import tornado.tcpserver
import tornado.testing
import tornado.util
import tornado.web

from wsgate.adapters import tornado_compat
from wsgate.adapters.base import JSONHandler
from wsgate.adapters.tornado_compat import (
    prepend_read,
    request_finished,
    response_reason,
    take_read_buffer,
    websocket_mask_python,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def streams(io_loop: Any) -> Any:
    """A factory of connected ``(IOStream, IOStream)`` pairs over ``socket.socketpair()``."""
    made: list[tornado.iostream.IOStream] = []

    def make() -> tuple[tornado.iostream.IOStream, tornado.iostream.IOStream]:
        a, b = socket.socketpair()
        pair = (tornado.iostream.IOStream(a), tornado.iostream.IOStream(b))
        made.extend(pair)
        return pair

    yield make
    for stream in made:
        stream.close()


# -- 1. the WebSocket mask ------------------------------------------------------

def rfc6455_mask(mask: bytes, data: bytes) -> bytes:
    """RFC 6455 section 5.3, as written: octet i XOR mask octet i mod 4."""
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(data))


def test_websocket_mask_is_tornados_helper():
    """1: ``tornado.util._websocket_mask`` exists and is what wsgate masks with
    (not the slower fallback); it is ``tornado.speedups``' C function when that
    extension is built."""
    assert tornado_compat.websocket_mask is getattr(tornado.util, "_websocket_mask", None)
    if importlib.util.find_spec("tornado.speedups") is None or \
            os.environ.get("TORNADO_NO_EXTENSION"):
        pytest.skip("this Tornado has no C speedups")
    speedups = importlib.import_module("tornado.speedups")
    assert tornado_compat.websocket_mask is speedups.websocket_mask


@pytest.mark.parametrize("mask_function", [tornado_compat.websocket_mask, websocket_mask_python],
                         ids=["tornado", "fallback"])
def test_websocket_mask_applies_the_rfc_6455_mask(mask_function):
    """1: both the helper and the fallback give the RFC's result, as bytes, for
    random masks and data of lengths 0 to 65537, multiples of 4 or not."""
    rng = random.Random(6455)
    for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 125, 126, 127, 1000, 65535, 65536, 65537):
        mask, data = rng.randbytes(4), rng.randbytes(n)
        masked = mask_function(mask, data)
        assert type(masked) is bytes
        assert masked == rfc6455_mask(mask, data), f"length {n}"
        assert mask_function(mask, masked) == data, f"length {n}"


# -- 2. the read buffer: prepend_read and take_read_buffer -------------------------

HEAD = b"GET /v1.0/ws HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("read", ["read_until_regex", "read_until", "read_bytes"])
async def test_bytes_given_with_prepend_read_are_read_first(streams, read):
    """2: bytes given with ``prepend_read`` come before those still in the
    socket, for each read Tornado's HTTP server makes (``read_until_regex`` for
    a head, as ``HTTP1Connection`` calls it; ``read_bytes`` for a body)."""
    stream, peer = streams()
    await peer.write(HEAD[10:] + b"BODY")  # in the socket, not yet read by the stream
    prepend_read(stream, HEAD[:10])
    prepend_read(stream, b"")
    if read == "read_until_regex":
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=65536)
    elif read == "read_until":
        head = await stream.read_until(b"\r\n\r\n")
    else:
        head = await stream.read_bytes(len(HEAD))
    assert head == HEAD
    assert await stream.read_bytes(4) == b"BODY"


@pytest.mark.gen_test(timeout=10)
async def test_a_server_hands_over_a_stream_that_has_read_nothing():
    """4, the condition under which ``GatewayHTTPServer`` may read the socket
    itself and later ``prepend_read``: when ``handle_stream`` runs, the request
    the client sent before the accept is still in the socket, the stream has
    buffered none of it, and it watches the socket for neither reading nor
    writing (``loop.remove_reader``/``remove_writer`` find nothing to remove)."""
    seen: asyncio.Future[tuple[bool, bool, bytes, bytes]] = asyncio.Future()

    class Probe(tornado.tcpserver.TCPServer):
        def handle_stream(self, stream, address):
            loop = asyncio.get_running_loop()
            fd = stream.socket.fileno()
            seen.set_result((loop.remove_reader(fd), loop.remove_writer(fd),
                             take_read_buffer(stream), stream.socket.recv(1024)))
            stream.close()

    listener, port = tornado.testing.bind_unused_port()
    server = Probe()
    server.add_sockets([listener])
    # Blocking connect and send: both complete in the kernel before the
    # server's loop accepts, so the request is waiting when handle_stream runs.
    client = socket.create_connection(("127.0.0.1", port))
    try:
        client.sendall(HEAD)
        watched_read, watched_write, buffered, in_socket = await seen
    finally:
        client.close()
        server.stop()
    assert (watched_read, watched_write) == (False, False)
    assert buffered == b""
    assert in_socket == HEAD


@pytest.mark.gen_test(timeout=10)
async def test_take_read_buffer_returns_what_the_stream_read_and_did_not_deliver(streams):
    """2: after a read, what the stream took from the socket beyond it (here a
    WebSocket frame sent with the handshake, in the same send) is returned once;
    the stream keeps none of it, so its next read gets only newer bytes."""
    stream, peer = streams()
    assert take_read_buffer(stream) == b""
    frame = b"\x81\x84abcd" + bytes(b ^ k for b, k in zip(b"ping", b"abcd", strict=True))
    await peer.write(HEAD + frame)
    assert await stream.read_until(b"\r\n\r\n") == HEAD
    assert await stream.read_bytes(2) == frame[:2]
    assert take_read_buffer(stream) == frame[2:]
    assert take_read_buffer(stream) == b""
    await peer.write(b"later")
    assert await stream.read_bytes(5, partial=True) == b"later"
    prepend_read(stream, b"given")
    assert take_read_buffer(stream) == b"given"


# -- 5. unsent output at the upgrade ---------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_writing_reports_output_not_yet_in_the_socket(streams):
    """5: ``writing()`` is False once a write is all in the socket and True
    while one is not (4 MiB to a peer that has not read); ``write(b"")``
    resolves only after the earlier write has reached the socket, and then
    ``writing()`` is False."""
    stream, peer = streams()
    await stream.write(b"101")
    assert not stream.writing()
    assert await peer.read_bytes(3) == b"101"

    big = bytes(range(256)) * (16 * 1024)
    order: list[str] = []
    written = stream.write(big)
    written.add_done_callback(lambda _: order.append("big"))
    assert stream.writing()
    flushed = stream.write(b"")
    flushed.add_done_callback(lambda _: order.append("flush"))
    assert not flushed.done()
    assert await peer.read_bytes(len(big)) == big
    await flushed
    assert written.done()
    assert order == ["big", "flush"]
    assert not stream.writing()


# -- 3. what a RequestHandler keeps to itself -------------------------------------

class Probe(tornado.web.RequestHandler):
    """Answers with ``response_reason`` as its body, and notes ``request_finished``."""

    def initialize(self, seen: list[tuple[str, bool]]) -> None:
        self.seen = seen

    def get(self, how: str) -> None:
        self.seen.append(("before finish", request_finished(self)))
        if how == "given":
            self.set_status(299, "Fine Thanks")
        elif how == "standard":
            self.set_status(404)
        elif how == "unknown":
            self.set_status(299)
        elif how == "error":
            raise tornado.web.HTTPError(418)
        elif how == "error-given":
            raise tornado.web.HTTPError(503, reason="Busy Now")
        self.finish(response_reason(self))
        self.seen.append(("after finish", request_finished(self)))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.seen.append(("write_error", request_finished(self)))
        self.finish(response_reason(self))

    def on_finish(self) -> None:
        self.seen.append(("on_finish", request_finished(self)))


class Teapot(JSONHandler):
    def get(self) -> None:
        raise tornado.web.HTTPError(418)


@pytest.fixture
def probe_url(io_loop: Any) -> Any:
    seen: list[tuple[str, bool]] = []
    app = tornado.web.Application([(r"/json/teapot", Teapot),
                                   (r"/(\w[\w-]*)", Probe, {"seen": seen})])
    listener, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([listener])
    yield f"http://127.0.0.1:{port}", seen
    server.stop()
    io_loop.run_sync(server.close_all_connections)


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("how, status, reason", [
    ("given", 299, "Fine Thanks"),
    ("standard", 404, "Not Found"),
    ("unknown", 299, "Unknown"),
    ("error", 418, "I'm a Teapot"),
    ("error-given", 503, "Busy Now"),
])
async def test_response_reason_is_the_reason_in_the_status_line(probe_url, how, status, reason):
    """3: ``response_reason`` is the phrase the client reads in the status line:
    one given to ``set_status`` or ``HTTPError``, the standard one, or Unknown."""
    base, _ = probe_url
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/{how}",
                                                                 raise_error=False)
    assert (response.code, response.reason) == (status, reason)
    assert response.body.decode() == reason


@pytest.mark.gen_test(timeout=10)
async def test_a_json_error_without_a_code_of_its_own_carries_the_reason(probe_url):
    """3, as wsgate uses it: ``JSONHandler.write_error`` gives a status it has
    no code for the reason phrase of its status line as the message."""
    base, _ = probe_url
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/json/teapot",
                                                                raise_error=False)
    assert (response.code, response.reason) == (418, "I'm a Teapot")
    assert json.loads(response.body) == {"error": {"code": "error", "message": "I'm a Teapot"}}


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("how, expected", [
    ("standard", [("before finish", False), ("on_finish", True), ("after finish", True)]),
    ("error", [("before finish", False), ("write_error", False), ("on_finish", True)]),
])
async def test_request_finished_turns_true_at_finish(probe_url, how, expected):
    """3: ``request_finished`` is False until ``finish()`` runs, whether the
    handler or ``send_error`` calls it, and True from then on."""
    base, seen = probe_url
    await tornado.httpclient.AsyncHTTPClient().fetch(f"{base}/{how}", raise_error=False)
    assert seen == expected


# -- the fence ---------------------------------------------------------------------

def is_private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__")
                                                          and name.endswith("__"))


def private_names_in(tree: ast.AST) -> set[str]:
    """Private names a piece of Tornado's source defines: attributes it assigns
    (``self._x = ...``), function, method and class names, names it assigns or
    imports as. (Not names it only reads, such as ``os._exit``.)"""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
    return {n for n in names if is_private(n)}


def tornado_private_names() -> set[str]:
    package = pathlib.Path(tornado.__file__).parent
    names: set[str] = set()
    for path in package.rglob("*.py"):
        if "test" not in path.relative_to(package).parts:
            names |= private_names_in(ast.parse(path.read_text(encoding="utf-8")))
    return names


def own_private_names(cls: type) -> set[str]:
    """Private names a Tornado class has: in its class dict, or set or read on self or cls."""
    names = {n for n in vars(cls) if is_private(n)}
    for node in ast.walk(ast.parse(inspect.getsource(cls))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in ("self", "cls") and is_private(node.attr):
            names.add(node.attr)
    return names


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "plugins":
        parts[0] = "wsgate_plugins"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def fence_breaches(path: pathlib.Path, tornado_private: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(ROOT)
    found: list[str] = []
    # Names a tornado import binds here: "tornado" for `import tornado.web`,
    # `web` for `from tornado import web`, `IOStream` for `from tornado.iostream import IOStream`.
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tornado":
                    bound.add(alias.asname or "tornado")
                    if any(is_private(p) for p in alias.name.split(".")):
                        found.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tornado":
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if any(is_private(p) for p in [*node.module.split("."), alias.name]):
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base: ast.expr = node
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)} "
                             "(on a Tornado module or class)")
            elif node.attr in tornado_private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)} (a Tornado private name)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and \
                len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and \
                node.args[1].value in tornado_private:
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)} (a Tornado private name)")
    module = None
    for cls_node in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.bases):
        module = module or importlib.import_module(module_name(path))
        cls = getattr(module, cls_node.name)
        theirs: set[str] = set()
        for base_cls in cls.__mro__:
            if base_cls.__module__.split(".")[0] == "tornado":
                theirs |= own_private_names(base_cls)
        for node in ast.walk(cls_node):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("self", "cls") and node.attr in theirs:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)} "
                             f"(private to {cls.__name__}'s Tornado base class)")
        for stmt in cls_node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defined = {stmt.name}
            elif isinstance(stmt, ast.Assign):
                defined = {t.id for t in stmt.targets if isinstance(t, ast.Name)}
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                defined = {stmt.target.id}
            else:
                continue
            for name in sorted(defined & theirs):
                found.append(f"{where}:{stmt.lineno}: {cls.__name__}.{name} "
                             f"(overrides the private name of its Tornado base class)")
    return found


def test_only_the_compat_module_touches_tornado_private_names():
    """Every Python file under wsgate/ and plugins/ except wsgate/adapters/tornado_compat.py,
    parsed with ``ast``, is checked for five things; each is a Tornado private
    name (one starting with ``_``, not a ``__dunder__``) used outside the fence:

    - an ``import`` or ``from ... import`` of a tornado module whose dotted path
      or imported name has a private part (``from tornado.util import _websocket_mask``);
    - a private attribute on a name a tornado import bound in that file
      (``tornado.util._websocket_mask``, ``IOStream._read_buffer``);
    - ``x._name`` on anything but a bare ``self`` or ``cls``, where ``_name``
      is a private name the installed Tornado's source (outside its tests)
      defines: assigns as an attribute or a name, defines as a function, method
      or class, or imports as: ``stream._read_buffer``, ``handler._reason``
      (not ``os._exit``, which Tornado only calls);
    - ``getattr``/``setattr``/``hasattr``/``delattr`` with such a name as a string;
    - in a top-level class that subclasses a Tornado class (found by
      importing the module), ``self._name``/``cls._name`` anywhere in its body,
      or a method or class attribute ``_name`` defined in it, where ``_name`` is
      in the class dict of one of the Tornado classes of its MRO or set or read
      on ``self``/``cls`` in their source: ``self._finished`` in a
      RequestHandler, and also a wsgate attribute or method that would
      silently override Tornado's own of the same name.

    A wsgate private name that merely coincides with one of Tornado's, on an
    object that is not Tornado's, is reported too: rename it.
    """
    tornado_private = tornado_private_names()
    assert {"_read_buffer", "_reason", "_finished", "_websocket_mask"} <= tornado_private
    sources = sorted([*ROOT.glob("wsgate/**/*.py"), *ROOT.glob("plugins/**/*.py")])
    assert ROOT / "wsgate" / "adapters" / "websocket.py" in sources
    fence = ROOT / "wsgate" / "adapters" / "tornado_compat.py"
    found = [breach for path in sources if path != fence
             for breach in fence_breaches(path, tornado_private)]
    assert not found, "Tornado private names outside wsgate/adapters/tornado_compat.py:\n" + \
        "\n".join(found)
