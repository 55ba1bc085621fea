"""``wsgate listen``: connect, subscribe, print every frame as one JSON line."""

from __future__ import annotations

import json
import sys
from typing import TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import tornado.httpclient
import tornado.websocket

from wsgate import errors


async def listen(url: str, token: str, topics: list[str], since: str | None = None,
                 out: TextIO | None = None) -> int:
    """Run until the server closes the connection; returns a process exit code."""
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
        return 1
    except OSError as exc:
        print(f"wsgate listen: cannot connect to {parts.netloc}: {exc}", file=sys.stderr)
        return 1
    try:
        return await _print_frames(ws, topics, since, stream)
    finally:
        ws.close()


async def _print_frames(ws: tornado.websocket.WebSocketClientConnection, topics: list[str],
                        since: str | None, stream: TextIO) -> int:
    message: dict[str, object] = {"type": "subscribe", "topics": topics, "id": "listen"}
    if since:
        message["since"] = since
    await ws.write_message(json.dumps(message))
    while True:
        frame = await ws.read_message()
        if frame is None:
            print(f"wsgate listen: closed by the server: {ws.close_code} {ws.close_reason or ''}",
                  file=sys.stderr)
            return 0 if ws.close_code in (errors.CLOSE_NORMAL, errors.CLOSE_GOING_AWAY) else 1
        text = frame if isinstance(frame, str) else frame.decode(errors="replace")
        print(text, file=stream, flush=True)
