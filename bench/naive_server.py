"""The obvious Tornado implementation of wsgate's wire protocol, as a yardstick.

Same wire: ``GET /v1.0/ws?token=...`` -> ``connected``; ``subscribe`` ->
``subscribed``; ``POST /v1.0/events`` with one event per POST; a dict of
topic -> set of handlers (exact match) and ``write_message`` to each. No
auth, no audit, no validation beyond what routing needs.

    python -m bench.naive_server PORT
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import uuid
from datetime import UTC, datetime

import tornado.web
import tornado.websocket

subscribers: dict[str, set[WS]] = {}


class WS(tornado.websocket.WebSocketHandler):
    def open(self) -> None:
        # As wsgate does: small frames go out at once instead of waiting on Nagle.
        self.set_nodelay(True)
        self.topics: set[str] = set()
        self.write_message({"type": "connected", "connection_id": str(uuid.uuid4()),
                            "expires_at": None})

    def on_message(self, message: str | bytes) -> None:
        msg = json.loads(message)
        if msg.get("type") == "subscribe":
            for topic in msg["topics"]:
                subscribers.setdefault(topic, set()).add(self)
                self.topics.add(topic)
            self.write_message({"type": "subscribed", "id": msg.get("id"),
                                "topics": msg["topics"], "rejected": []})

    def on_close(self) -> None:
        for topic in self.topics:
            subscribers.get(topic, set()).discard(self)


class Events(tornado.web.RequestHandler):
    def post(self) -> None:
        event = json.loads(self.request.body)
        frame = {"type": event["type"], "topic": None, "data": event["data"],
                 "event_id": str(uuid.uuid4()),
                 "published_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        sent: set[WS] = set()
        for topic in event["topics"]:
            frame["topic"] = topic
            text = json.dumps(frame, separators=(",", ":"))
            for ws in subscribers.get(topic, ()):
                if ws not in sent:
                    sent.add(ws)
                    ws.write_message(text)
        self.set_status(202)
        self.finish({"accepted": 1, "event_ids": [frame["event_id"]]})


async def main(port: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = tornado.web.Application([(r"/v1\.0/ws", WS), (r"/v1\.0/events", Events)])
    app.listen(port, "127.0.0.1")
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
