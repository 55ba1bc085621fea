"""The ``wsgate`` command: serve, check-config, token, listen, audit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from wsgate.audit.records import AuditUnavailable
from wsgate.config import Config, ConfigError, load_config
from wsgate.logs import setup_logging
from wsgate.plugins import PERMISSIONS, Authenticator, Authorizer, PluginError, Principal

log = logging.getLogger("wsgate")

if TYPE_CHECKING:
    from wsgate.audit.nodelock import NodeBusy


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"wsgate: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging)
    if args.workers != 1:
        return _serve_workers(config, args.workers)
    return _serve(config)


def run_loop(kind: str, main: Coroutine[Any, Any, None]) -> None:
    """Run main to its end on the configured event loop (``[server] event_loop``).

    uvloop runs the same asyncio code for less CPU per callback and per
    socket operation (docs/performance.md); where it is not installed the
    standard loop runs it, and a warning says so.
    """
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("[server] event_loop = \"uvloop\" but uvloop is not installed: "
                        "running on the standard asyncio loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _serve(config: Config, sockets: list[socket.socket] | None = None,
           raw: Config | None = None,
           adjust: Callable[[Config], Config] | None = None) -> int:
    """Run ``wsgate.app.serve``; a failure to start is one line on stderr and
    the exit status (2: a plugin's config; 1: port, node lock or audit store)."""
    from wsgate.app import ListenError, serve
    from wsgate.audit.nodelock import NodeBusy, NodeLockError

    try:
        run_loop(config.server.event_loop, serve(config, sockets, raw, adjust))
    except PluginError as exc:
        print(f"wsgate: {config.source}: {exc}", file=sys.stderr)
        return 2
    except NodeBusy as exc:
        print(_busy(exc, config.server.port), file=sys.stderr)
        return 1
    except (ListenError, NodeLockError, AuditUnavailable) as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"wsgate: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _busy(exc: NodeBusy, port: int) -> str:
    return (f"wsgate: node id {exc.node_id!r} is already served by another process "
            f"(port {port}): {exc.detail}. Stop that process first, or give this one "
            "another [server] node_id.")


def _plugins(config: Config, path: str) -> tuple[Authenticator, Authorizer]:
    """Build the configured plugins, or exit 2 naming the file and the plugin's error."""
    from wsgate.app import build_plugins

    try:
        return build_plugins(config)
    except PluginError as exc:
        raise SystemExit(f"wsgate: {path}: {exc}") from None


#: A worker that exits sooner than this after its start stops the whole server
#: (it would fail again: bad config, store unreachable); later it is restarted.
WORKER_STARTUP_GRACE = 10.0


def _serve_workers(config: Config, workers: int) -> int:
    """``serve --workers N``: N processes sharing the port, each its own node.

    The parent binds one SO_REUSEPORT socket per worker (so the kernel spreads
    connections across workers), then forks: no event loop exists before the
    fork. Worker i is node ``<node_id>-w<i>`` with its own audit chain and
    journal (``<journal_path>.w<i>``) and, with ``[metrics] port`` P, metrics on
    P+i-1. SIGTERM or SIGINT to the parent drains every worker; SIGHUP is
    passed to every worker, which reloads the config file (each measures the
    change against the file it started from); a worker that dies later is
    restarted (from the last config file the workers accepted). Returns the
    exit status.

    Before binding with SO_REUSEPORT the parent binds the port once without it
    (a probe): a port any process listens on already, another ``serve
    --workers`` included, is refused (exit 1, naming the port, nothing written)
    rather than shared. The parent also holds the node lock of ``<node_id>``
    (see :mod:`wsgate.audit.nodelock`) and each worker its own node's: a second
    ``serve`` of this config exits 1 before it forks.
    """
    import dataclasses
    import os
    import signal
    import time

    import tornado.netutil

    from wsgate.app import (
        ListenError,
        build_plugins,
        listen,
        node_id_for,
        restart_changes,
    )
    from wsgate.audit import nodelock

    if workers < 1:
        print("wsgate: --workers must be 1 or more", file=sys.stderr)
        return 2
    parent = os.getpid()
    if config.broker.url == "memory://":
        print(f"wsgate: {config.source}: --workers {workers} needs a shared broker: with "
              '[broker] url = "memory://" an event posted to one worker would not reach '
              "the others. Set a redis:// url, or run one worker.", file=sys.stderr)
        return 2
    try:  # Report a bad plugin option once, not once per worker.
        authenticator, _ = build_plugins(config)
        asyncio.run(authenticator.close())
    except PluginError as exc:
        print(f"wsgate: {config.source}: {exc}", file=sys.stderr)
        return 2
    host = config.server.host
    # SO_REUSEPORT lets any process of this user bind a port that reuse-port
    # sockets listen on, and the kernel then gives it part of the connections:
    # an independent `serve --workers` (another config, so another node id and
    # node lock) would join this port, or this one join its. A probe turns that
    # away before anything is taken or written: the port bound once WITHOUT
    # SO_REUSEPORT fails (EADDRINUSE) whatever socket listens there.
    # Two servers starting in the same instant could both pass their probes
    # before either binds: the probe and the bind are made under a short lock
    # on the port (see _port_startup_lock), so the second probes after the
    # first has bound.
    with _port_startup_lock(host, config.server.port):
        if config.server.port:
            try:
                for probe in listen(host, config.server.port):
                    probe.close()
            except ListenError as exc:
                print(f"wsgate: {exc}", file=sys.stderr)
                return 1
        try:
            first = listen(host, config.server.port, reuse_port=True)
        except ListenError as exc:
            print(f"wsgate: {exc}", file=sys.stderr)
            return 1
    port = first[0].getsockname()[1]
    base = node_id_for(dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=port)))
    # The probe above refuses a second `serve --workers` of this config too; the
    # lock on the base node id (no worker's) is the second line, for one whose
    # startup lock was elsewhere (another TMPDIR). The workers inherit it; each
    # also takes its own node's lock.
    try:
        lock = nodelock.acquire(config.audit.url, base, f"pid {parent} on "
                                f"{socket.gethostname()}, port {port}, --workers {workers}")
    except nodelock.NodeBusy as exc:
        print(_busy(exc, port), file=sys.stderr)
        return 1
    except nodelock.NodeLockError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 1
    log = logging.getLogger("wsgate")
    running: dict[int, tuple[int, float]] = {}
    stopping = False

    def worker_config(c: Config, i: int) -> Config:
        m = c.metrics
        return dataclasses.replace(
            c,
            server=dataclasses.replace(c.server, port=port, node_id=f"{base}-w{i}"),
            audit=dataclasses.replace(c.audit, journal_path=f"{c.audit.journal_path}.w{i}"),
            metrics=dataclasses.replace(m, port=m.port + i - 1) if m.port else m)

    def spawn(i: int, sockets: list[socket.socket]) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Until its loop handles SIGHUP (a reload), one must not kill it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                code = _serve(worker_config(config, i), sockets, config,
                              lambda c: worker_config(c, i))
            except Exception:
                log.exception("worker %d failed", i)
            finally:
                logging.shutdown()
                os._exit(code)
        # The parent keeps no copy: a dead worker's socket must leave the
        # reuse-port group, or the kernel would keep queueing connections on it.
        for sock in sockets:
            sock.close()
        running[pid] = (i, time.monotonic())

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if os.getpid() != parent:  # a signal in a worker before it reset its handlers
            os._exit(1)
        stopping = True
        for pid in list(running):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reload(_signum: int, _frame: object) -> None:
        nonlocal config
        if os.getpid() != parent:
            return
        log.info("SIGHUP: passing it to %d workers", len(running))
        for pid in list(running):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        # A worker restarted later starts from what the workers now run: the
        # file, when they accept it (each worker logs why it does not).
        try:
            new = load_config(config.source)
            if restart_changes(config, new):
                return
            authenticator, _ = build_plugins(new)
            asyncio.run(authenticator.close())
        except (ConfigError, PluginError):
            return
        config = new

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for i in range(1, workers + 1):
        spawn(i, first if i == 1 else
              tornado.netutil.bind_sockets(port, host, reuse_port=True))
    log.info("%d workers on port %d (nodes %s-w1..w%d)", workers, port, base, workers)
    status = 0
    while running:
        pid, wait_status = os.waitpid(-1, 0)
        if pid not in running:
            continue
        i, started = running.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (0 if code == 0 else 1)
        elif time.monotonic() - started < WORKER_STARTUP_GRACE:
            log.error("worker %d exited (%d) while starting: stopping the others", i, code)
            status = code or 1
            stop(signal.SIGTERM, None)
        else:
            log.error("worker %d exited (%d): starting it again", i, code)
            spawn(i, tornado.netutil.bind_sockets(port, host, reuse_port=True))
    lock.release()
    return status


#: How long ``serve --workers`` waits for another server starting on the same
#: port to have bound it (see :func:`_port_startup_lock`).
PORT_STARTUP_WAIT = 10.0


def port_startup_lock_path(host: str | None, port: int) -> str:
    """The file ``serve --workers`` locks while it probes and binds ``host:port``."""
    import tempfile
    from urllib.parse import quote

    return os.path.join(tempfile.gettempdir(),
                        f"wsgate-port-{quote(host or '*', safe='')}-{port}.lock")


@contextlib.contextmanager
def _port_startup_lock(host: str | None, port: int) -> Iterator[None]:
    """Hold an exclusive ``flock`` on :func:`port_startup_lock_path` while the
    port is probed and bound (port 0: nothing to lock), waiting up to
    PORT_STARTUP_WAIT for a server that holds it. Best effort: a file that
    cannot be opened or locked in time is logged and the start goes on (the
    probe still refuses a port already bound). Nothing is written in the file.
    """
    import fcntl
    import time

    if not port:
        yield
        return
    path = port_startup_lock_path(host, port)
    log = logging.getLogger("wsgate")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        log.warning("cannot open the port's startup lock %s: %s", path, exc.strerror or exc)
        yield
        return
    try:
        deadline = time.monotonic() + PORT_STARTUP_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("the port's startup lock %s is still held after %.0f s: "
                                "going on", path, PORT_STARTUP_WAIT)
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # drops the lock


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    authenticator, _ = _plugins(config, args.file)
    asyncio.run(authenticator.close())
    print(f"{args.file}: OK (auth {config.auth.plugin}, permissions {config.permissions.plugin}, "
          f"broker {config.broker.url})")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config)
    authenticator, _ = _plugins(config, args.config)
    if not (args.subject or args.agent):
        print("wsgate token: give --subject (or --agent): the principal the token is for",
              file=sys.stderr)
        return 2
    expires = None
    if args.ttl:
        expires = datetime.now(UTC) + timedelta(seconds=args.ttl)
    try:
        principal = Principal(
            kind=args.kind, subject=args.subject or args.agent,
            customer_id=args.customer, agent_id=args.agent,
            permissions=frozenset(args.permission or ()),
            allowed_resources=frozenset(args.resource or ()), expires_at=expires)
        token = authenticator.mint(principal, args.ttl)
    except ValueError as exc:
        print(f"wsgate token: {exc}", file=sys.stderr)
        if args.kind == "agent":
            # Token plugins (jwt) read an agent's id back from its subject:
            # say which flags make a token the server accepts.
            print(f"wsgate token: for an agent pass --agent <uuid> --customer <uuid> "
                  f"(and no other --subject): the {config.auth.plugin} plugin reads the "
                  f"agent id from the token's subject (sub), so it must be the agent's UUID",
                  file=sys.stderr)
        return 2
    except (NotImplementedError, LookupError) as exc:
        print(f"wsgate token: {exc}", file=sys.stderr)
        return 2
    finally:
        asyncio.run(authenticator.close())
    print(token)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from wsgate.adapters.listen import EXIT_DONE, listen

    try:
        return asyncio.run(listen(args.url, args.token, args.topics, since=args.since))
    except KeyboardInterrupt:
        return EXIT_DONE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsgate", description="Real-time event gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes sharing the port, each its own node (needs a redis broker)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and its plugin options")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("token", help="mint a development token for the configured authenticator")
    p.add_argument("--config", required=True)
    p.add_argument("--subject", help="principal subject (default: the agent id)")
    p.add_argument("--kind", default="agent", choices=("agent", "accesskey", "direct"))
    p.add_argument("--customer", help="customer id (UUID)")
    p.add_argument("--agent", help="agent id (UUID)")
    p.add_argument("--permission", action="append", choices=PERMISSIONS,
                   help="a permission name; repeat for several")
    p.add_argument("--resource", action="append", help="an allowed resource (direct tokens)")
    p.add_argument("--ttl", type=float, default=None, help="seconds until the token expires")
    p.set_defaults(func=cmd_token)

    from wsgate.adapters.listen import EXIT_HELP as LISTEN_EXIT_HELP

    p = sub.add_parser("listen", help="subscribe and print every frame as a JSON line",
                       description="Connect, subscribe to the topics, and print every frame "
                                   "received\nas one JSON line, until interrupted.",
                       epilog=LISTEN_EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8080/v1.0/ws")
    p.add_argument("--token", required=True)
    p.add_argument("--since", help="resume after this event_id")
    p.add_argument("topics", nargs="+", metavar="TOPIC")
    p.set_defaults(func=cmd_listen)

    try:
        from wsgate.audit.cli import register
    except ImportError:  # pragma: no cover - the audit package is always installed
        pass
    else:
        register(sub)
    return parser


#: The exit status of a command whose standard output was closed before it was
#: done (``wsgate audit query | head``): 128 + SIGPIPE, the status ``git log``,
#: ``cat`` and ``seq`` end with there. Scripts with ``set -o pipefail`` see that
#: the output was cut short; plain pipelines report the reader's status.
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve",):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except BrokenPipeError:
        # Standard output is the only pipe these commands write to (serve
        # handles its sockets' errors itself): its reader went away. Stop
        # quietly, as git does, instead of a traceback.
        code = _stdout_closed()
    sys.exit(code)


def _stdout_closed() -> int:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail
    again ("Exception ignored ... BrokenPipeError"), and return EXIT_STDOUT_CLOSED."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_STDOUT_CLOSED


if __name__ == "__main__":
    main()
