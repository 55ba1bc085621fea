"""Real stand-ins for what surrounds the gateway's core, for tests without a socket.

Each implements one seam for real (no MagicMock) and records what crossed it,
so a test asserts what a user would see: the frames a client receives, the
rows the audit log holds, the close codes.

- :class:`FakeTransport`: a client's WebSocket (``wsgate.gateway.connection.Transport``);
- :class:`ControlledAuditSink`: the audit log, whose subscribe commits the test
  releases (``wsgate.audit.records.AuditSink``);
- :class:`ScriptedAuthenticator`: an authenticator plugin whose answers the test writes;
- :class:`HeldBroker`: the memory broker, whose waits (``ready``, history reads)
  the test releases through a :class:`Gate`;
- :class:`ManualClock`: ``time.monotonic`` for a room module, moved by the test.

The memory broker itself is real and in-process: tests use it as it is.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wsgate.audit.records import AuditRecord, EventRecord
from wsgate.broker.memory import MemoryBroker
from wsgate.config import HistoryConfig
from wsgate.events import Event
from wsgate.plugins import Authenticator, Principal, Refused

if TYPE_CHECKING:
    from wsgate.audit.witness import WitnessPublisher


def unframe(wire: bytes) -> bytes:
    """The payload of one unmasked RFC 6455 text frame (as protocol.ws_frame builds it)."""
    assert wire[0] == 0x81, f"not a final text frame: {wire[:2]!r}"
    assert not wire[1] & 0x80, "a server frame was masked"
    n = wire[1] & 0x7F
    start = 2 if n < 126 else 4 if n == 126 else 10
    if n >= 126:
        n = int.from_bytes(wire[2:start], "big")
    assert len(wire) == start + n, "one frame per send_wire"
    return wire[start:]


class FakeTransport:
    """One client's WebSocket as the gateway sees it, keeping what the client would see.

    ``take()`` gives the messages the client received since the last ``take()``,
    in order, decoded from JSON: control frames (``send_text``) and event frames
    (``send_wire``, taken out of their RFC 6455 framing); ``events()`` gives
    every event frame. Like the real transport, nothing sent after ``close`` reaches
    the client; such sends are counted in ``after_close``.

    ``pending`` is what ``pending_bytes()`` reports (bytes written but not yet
    sent): set it to play a slow peer, or set ``stalled`` so each event frame
    adds its size to it, as with a peer that stopped reading. ``closes`` holds
    each ``close(code, reason)``.
    """

    def __init__(self) -> None:
        #: What reached the client, in order: texts (str) and event frames (bytes).
        self.sent: list[str | bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.pending = 0
        self.stalled = False
        self.after_close = 0
        self._taken = 0

    # -- the Transport Protocol ------------------------------------------------

    def send_text(self, text: str) -> None:
        if self.closes:
            self.after_close += 1
            return
        self.sent.append(text)

    def send_wire(self, frame: bytes) -> int:
        if self.closes:
            self.after_close += 1
            return self.pending
        self.sent.append(frame)
        if self.stalled:
            self.pending += len(frame)
        return self.pending

    def pending_bytes(self) -> int:
        return self.pending

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    # -- what the client saw -----------------------------------------------------

    @staticmethod
    def _decode(sent: str | bytes) -> Any:
        return json.loads(sent if isinstance(sent, str) else unframe(sent))

    def events(self) -> list[Any]:
        """The event frames the client received, in order, decoded."""
        return [self._decode(s) for s in self.sent if isinstance(s, bytes)]

    def take(self) -> list[Any]:
        """The messages received since the last take(), decoded."""
        new = self.sent[self._taken:]
        self._taken = len(self.sent)
        return [self._decode(s) for s in new]

    @property
    def close_code(self) -> int | None:
        """The code of the first close, or None while open."""
        return self.closes[0][0] if self.closes else None


#: The row of an AuditRecord a test compares: (action, topic, outcome, code).
Row = tuple[str, str, str, str]


class ControlledAuditSink:
    """An audit log whose subscribe commits happen when the test says, keeping every row.

    ``submit_subscribes`` holds each batch. ``commit()`` writes every held batch
    and calls each batch's ``done(None)``, oldest first; ``fail(error)`` writes
    nothing and calls ``done(error)``. ``write_ends`` and ``write_events`` never
    fail (the real sink journals what the store refuses). ``written`` holds every
    row written, in order (subscribe, unsubscribe and renew rows; ``rows()``
    gives them compactly), and ``events`` every event record.

    Args:
        node_id: the gateway's ``node_id`` (read from its sink).
    """

    witness: WitnessPublisher | None = None

    def __init__(self, node_id: str = "test-node") -> None:
        self.node_id = node_id
        self.held: list[tuple[list[AuditRecord], Callable[[Exception | None], None]]] = []
        self.written: list[AuditRecord] = []
        self.events: list[EventRecord] = []

    async def start(self) -> None:
        pass

    def submit_subscribes(self, records: Sequence[AuditRecord],
                          done: Callable[[Exception | None], None]) -> None:
        self.held.append((list(records), done))

    def commit(self) -> int:
        """Write every held batch and tell each caller; returns how many batches."""
        batches, self.held = self.held, []
        for records, done in batches:
            self.written.extend(records)
            done(None)
        return len(batches)

    def fail(self, error: Exception) -> int:
        """Refuse every held batch with error (an AuditUnavailable); returns how many."""
        batches, self.held = self.held, []
        for _, done in batches:
            done(error)
        return len(batches)

    async def write_ends(self, records: Sequence[AuditRecord]) -> None:
        self.written.extend(records)

    async def write_events(self, events: Sequence[EventRecord]) -> None:
        self.events.extend(events)

    def healthy(self) -> bool:
        return True

    def queue_depth(self) -> int:
        return sum(len(records) for records, _ in self.held)

    async def close(self) -> None:
        pass

    def rows(self, action: str | None = None) -> list[Row]:
        """(action, topic, outcome, code) of each row written, in order; only
        ``action``'s when given."""
        return [(r.action, r.topic, r.outcome, r.code) for r in self.written
                if action is None or r.action == action]


class ScriptedAuthenticator(Authenticator):
    """An authenticator plugin whose answers the test writes.

    Loaded by path (see ``SCRIPTED_AUTH``) and reached as ``gateway.authenticator``.
    ``answers`` maps a credential to what ``authenticate`` does with it: a
    :class:`Principal` is returned, an exception raised, an awaitable awaited
    (the plugin hangs until the test resolves it) and its result returned. Any
    other credential is refused with a message that quotes it, as a careless
    plugin's would. ``calls`` counts the ``authenticate`` calls. ``refreshed``
    maps a subject to what ``refresh`` does: a principal (or None: revoked) is
    returned, an exception raised; a subject not in it keeps its principal.
    Takes no options.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.answers: dict[str, Any] = {}
        self.calls = 0
        self.refreshed: dict[str, Principal | None | Exception] = {}

    async def authenticate(self, credential: str) -> Principal:
        self.calls += 1
        answer = self.answers.get(credential)
        if answer is None:
            raise Refused(f"unknown credential {credential}")
        if isinstance(answer, BaseException):
            raise answer
        if inspect.isawaitable(answer):
            return await answer
        return answer

    async def refresh(self, principal: Principal) -> Principal | None:
        answer = self.refreshed.get(principal.subject, principal)
        if isinstance(answer, BaseException):
            raise answer
        return answer


#: The config tables that make a gateway use the ScriptedAuthenticator.
SCRIPTED_AUTH = {"auth": {"plugin": "tests.fakes:ScriptedAuthenticator", "options": {}}}


class Gate:
    """Where a stand-in waits for the test: ``reached`` is set once something
    arrives at it, and it goes on once the test calls :meth:`open`."""

    def __init__(self, opened: bool = False) -> None:
        self.reached = asyncio.Event()
        self._opened = asyncio.Event()
        if opened:
            self._opened.set()

    async def passing(self) -> None:
        self.reached.set()
        await self._opened.wait()

    def open(self) -> None:
        self._opened.set()


class HeldBroker(MemoryBroker):
    """The memory broker, with the two waits of a networked broker held by gates.

    ``listening`` holds ``ready()`` (until events of newly watched scopes reach
    this node; open unless ``listening_open`` is False). ``reading`` holds each
    ``history_since()``; with ``read_first`` the history is read before the gate
    (events published meanwhile are not in the answer), otherwise after (they are).
    """

    def __init__(self, history: HistoryConfig, *, listening_open: bool = True,
                 read_first: bool = True) -> None:
        super().__init__(history)
        self.listening = Gate(opened=listening_open)
        self.reading = Gate()
        self.read_first = read_first

    async def ready(self, scope_keys: Iterable[str], timeout: float = 1.0) -> bool:
        await self.listening.passing()
        return await super().ready(scope_keys, timeout)

    async def history_since(self, scope_key: str, event_id: str, *,
                            with_since: bool = False) -> list[Event] | None:
        found = (await super().history_since(scope_key, event_id, with_since=with_since)
                 if self.read_first else None)
        await self.reading.passing()
        if not self.read_first:
            found = await super().history_since(scope_key, event_id, with_since=with_since)
        return found


class ManualClock:
    """A monotonic clock that moves only when the test calls :meth:`advance`.

    Put in place of a room module's ``time`` (the rooms call only
    ``time.monotonic()``): ``monkeypatch.setattr(limits, "time", clock)``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TCPProxy:
    """A TCP proxy in front of a service (Redis) that a test can break the way a
    network breaks.

    - :meth:`cut`: an outage: every connection dropped, new ones closed at once,
      until ``down`` is set False again;
    - ``flowing.clear()``: a stall: no byte passes either way but every
      connection stays open, as a peer gone silent does before TCP notices;
      ``flowing.set()`` lets bytes pass again.
    """

    def __init__(self, target: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.down = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on an unused loopback port; return it."""
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self.writers.discard(dst)

    def cut(self) -> None:
        """Drop every connection; refuse new ones until ``down`` is False."""
        self.down = True
        for writer in list(self.writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
