"""``wsgate listen``: connect, subscribe, print every frame as one JSON line.

Every frame goes to stdout as received. The reply to the subscribe decides
whether there is anything to listen to: topics the server refused are named
on stderr, and when it refused every one (or the whole subscribe) the command
ends with :data:`EXIT_NOTHING_SUBSCRIBED` instead of waiting for events that
can never come.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import tornado.httpclient
import tornado.websocket

from wsgate import errors

#: Exit codes (``wsgate listen --help`` lists them as :data:`EXIT_HELP`).
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_NOTHING_SUBSCRIBED = 3

EXIT_HELP = """\
exit status:
  0    interrupted (Ctrl-C), or the server closed the connection normally
       (1000, or 1001 when it shuts down)
  1    cannot connect, the server refused the connection (the HTTP status and
       its message are printed), or closed it with another code
  2    bad command line
  3    the server refused every topic (or the whole subscribe): nothing to
       listen to; each refusal is printed on stderr
  141  standard output was closed (`| head`): ends quietly, as `git log`

When only some topics are refused, they are named on stderr and listen goes
on with the others."""

#: The id of listen's one subscribe, echoed in its reply.
SUBSCRIBE_ID = "listen"


async def listen(url: str, token: str, topics: list[str], since: str | None = None,
                 out: TextIO | None = None) -> int:
    """Subscribe to topics and print every frame to ``out`` (stdout) as a line.

    Runs until the server closes the connection, or ends at once when nothing
    could be subscribed. Returns a process exit code (:data:`EXIT_HELP`).
    """
    stream = out or sys.stdout
    parts = urlsplit(url)
    query = (parts.query + "&" if parts.query else "") + urlencode({"token": token})
    request = tornado.httpclient.HTTPRequest(
        urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment)))
    try:
        ws = await tornado.websocket.websocket_connect(request)
    except tornado.httpclient.HTTPClientError as exc:
        body = exc.response.body.decode(errors="replace") if exc.response is not None else ""
        print(f"wsgate listen: {exc.code}: {body}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"wsgate listen: cannot connect to {parts.netloc}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await _print_frames(ws, topics, since, stream)
    finally:
        ws.close()


async def _print_frames(ws: tornado.websocket.WebSocketClientConnection, topics: list[str],
                        since: str | None, stream: TextIO) -> int:
    message: dict[str, object] = {"type": "subscribe", "topics": topics, "id": SUBSCRIBE_ID}
    if since:
        message["since"] = since
    await ws.write_message(json.dumps(message))
    answered = False
    while True:
        frame = await ws.read_message()
        if frame is None:
            print(f"wsgate listen: closed by the server: {ws.close_code} {ws.close_reason or ''}",
                  file=sys.stderr)
            return (EXIT_DONE if ws.close_code in (errors.CLOSE_NORMAL, errors.CLOSE_GOING_AWAY)
                    else EXIT_FAILED)
        text = frame if isinstance(frame, str) else frame.decode(errors="replace")
        print(text, file=stream, flush=True)
        if not answered:
            answered, subscribed = _subscribe_answer(text)
            if answered and not subscribed:
                return EXIT_NOTHING_SUBSCRIBED


def _subscribe_answer(text: str) -> tuple[bool, bool]:
    """Read a frame that may answer listen's subscribe: (is it the answer, did
    any topic get subscribed). Refusals are named on stderr."""
    try:
        frame = json.loads(text)
    except ValueError:
        return False, False
    if not isinstance(frame, dict):
        return False, False
    if frame.get("type") == "error":
        # listen sends nothing else, so an error answers its subscribe: refused whole.
        print(f"wsgate listen: the subscribe was refused: {frame.get('code')}: "
              f"{frame.get('message')}", file=sys.stderr)
        return True, False
    if frame.get("type") != "subscribed" or frame.get("id") != SUBSCRIBE_ID:
        return False, False
    for rejected in frame.get("rejected") or ():
        print(f"wsgate listen: refused {rejected.get('topic')}: {rejected.get('code')}: "
              f"{rejected.get('message')}", file=sys.stderr)
    if frame.get("topics"):
        return True, True
    print("wsgate listen: every topic was refused: nothing to listen to", file=sys.stderr)
    return True, False
