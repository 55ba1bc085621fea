"""Log lines as an operator reads them: fields, formats, level, and no secret ever."""

import hashlib
import hmac
import io
import json
import logging
import sys
import time

import pytest
import tornado.httpclient

from tests.conftest import CUSTOMER, INGEST_KEY, OTHER_CUSTOMER, TOKENS, event, wait_for
from wsgate.config import LoggingConfig
from wsgate.logs import setup_logging

CALL = f"customer_id:{CUSTOMER}:call:0c4b4cf2-da9b-11ee-b3a6-5f2b4c1d2e3f"
HMAC_SECRET = "hmac-secret-never-logged"
AUDIT_KEY = "audit-key-never-logged"
METRICS_KEY = "metrics-key-never-logged"
WRONG = "wrong-token-never-logged"
SECRETS = [*TOKENS, INGEST_KEY, HMAC_SECRET, AUDIT_KEY, METRICS_KEY, WRONG]


@pytest.fixture
def log_output(monkeypatch):
    """setup_logging(level, format) writing into a buffer; the root logger is restored."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("tornado.access").level)
    buffer = io.StringIO()

    def configure(level, fmt):
        monkeypatch.setattr(sys, "stderr", buffer)
        setup_logging(LoggingConfig(level=level, format=fmt))
        return buffer

    yield configure
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("tornado.access").setLevel(saved[2])


async def session(server):
    """A session with successes and errors of every kind the gateway logs."""
    http = tornado.httpclient.AsyncHTTPClient()
    client = await server.connect("admin-token", headers={"Origin": "https://app.example.com",
                                                          "User-Agent": "log-test"})
    await client.subscribe(CALL, f"customer_id:{OTHER_CUSTOMER}", "not-a-topic")
    await client.send("not json")
    assert (await client.recv())["code"] == "bad_request"
    await server.refused(token=WRONG)
    await server.refused(token=None, headers={"Authorization": f"Bearer {WRONG}"})
    await server.refused(token="admin-token", headers={"Origin": "https://evil.example"})
    assert (await server.post(event()))[0] == 202
    assert (await client.recv())["type"] == "call_created"
    assert (await server.post(event(), key=WRONG))[0] == 401
    assert (await server.post(b"{", key=INGEST_KEY))[0] == 400
    body = json.dumps(event()).encode()
    stamp = str(int(time.time()))
    bad_sig = hmac.new(b"another-secret", stamp.encode() + b"." + body,
                       hashlib.sha256).hexdigest()
    assert (await server.post(body, key=None, headers={
        "X-Wsgate-Timestamp": stamp, "X-Wsgate-Signature": f"v1={bad_sig}"}))[0] == 401
    good_sig = hmac.new(HMAC_SECRET.encode(), stamp.encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    assert (await server.post(body, key=None, headers={
        "X-Wsgate-Timestamp": stamp, "X-Wsgate-Signature": f"v1={good_sig}"}))[0] == 202
    assert (await client.recv())["type"] == "call_created"
    for key, code in ((WRONG, 401), (AUDIT_KEY, 200)):
        response = await http.fetch(server.base + "/v1.0/audit", raise_error=False,
                                    headers={"Authorization": f"Bearer {key}"})
        assert response.code == code
    for key, code in ((WRONG, 401), (METRICS_KEY, 200)):
        response = await http.fetch(server.base + "/metrics", raise_error=False,
                                    headers={"Authorization": f"Bearer {key}"})
        assert response.code == code
    client.ws.close(1000)
    await wait_for(lambda: not server.gateway.connections)
    return client


def config_tables():
    return {"ingest": {"keys": [INGEST_KEY], "hmac_secrets": [HMAC_SECRET]},
            "audit": {"api_keys": [AUDIT_KEY]}, "metrics": {"keys": [METRICS_KEY]}}


@pytest.mark.gen_test(timeout=30)
async def test_json_lines_carry_fields_and_no_secret(make_server, log_output):
    output = log_output("DEBUG", "json")
    server = await make_server(**config_tables())
    await session(server)
    text = output.getvalue()
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} was logged"
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)

    opened = [line for line in lines if line["message"] == "connection opened"]
    closed = [line for line in lines if line["message"] == "connection closed"]
    assert len(opened) == len(closed) == 1
    assert {k: opened[0][k] for k in ("subject", "kind", "customer_id", "remote_addr",
                                      "origin")} == {
        "subject": "alice", "kind": "agent", "customer_id": CUSTOMER,
        "remote_addr": "127.0.0.1", "origin": "https://app.example.com"}
    end = closed[0]
    assert end["connection_id"] == opened[0]["connection_id"]
    assert end["close_code"] == 1000 and end["subscriptions"] == 1
    assert end["duration_s"] >= 0

    ingest = [line for line in lines if line.get("path") == "/v1.0/events"]
    assert [(i["status"], i["events_accepted"]) for i in ingest] == [
        (202, 1), (401, 0), (400, 0), (401, 0), (202, 1)]
    assert ingest[0]["key_id"].startswith("key:") and ingest[-1]["key_id"].startswith("hmac:")
    assert ingest[1]["key_id"] is None and ingest[1]["level"] == "WARNING"
    assert all(i["duration_ms"] >= 0 and i["method"] == "POST" for i in ingest)
    upgrades = [line for line in lines if line.get("path", "").startswith("/v1.0/ws")]
    assert upgrades and all("token=***" in u["path"] or "token" not in u["path"]
                            for u in upgrades)
    # A metrics scrape is a DEBUG line: it would drown the log at INFO.
    scrape = [line for line in lines if line.get("path") == "/metrics" and line["status"] == 200]
    assert scrape and scrape[0]["level"] == "DEBUG"


@pytest.mark.gen_test(timeout=30)
async def test_text_lines_carry_fields_as_pairs(make_server, log_output):
    output = log_output("INFO", "text")
    server = await make_server(**config_tables())
    await session(server)
    text = output.getvalue()
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} was logged"
    closed = [line for line in text.splitlines() if "connection closed" in line]
    assert len(closed) == 1
    assert " INFO wsgate.gateway: connection closed connection_id=" in closed[0]
    for pair in ("subject=alice", "kind=agent", "close_code=1000", "subscriptions=1",
                 "remote_addr=127.0.0.1", "origin=https://app.example.com"):
        assert pair in closed[0]
    accepted = [line for line in text.splitlines() if "202 POST /v1.0/events" in line]
    assert len(accepted) == 2 and all("events_accepted=1" in line for line in accepted)
    assert "remote_addr=127.0.0.1 duration_ms=" in accepted[0]
    assert "status=" not in accepted[0], "the message already shows the status"
    # INFO level: the DEBUG scrape line is left out.
    assert "200 GET /metrics" not in text
    assert " DEBUG " not in text


def test_text_values_with_spaces_are_quoted(log_output):
    output = log_output("INFO", "text")
    logging.getLogger("wsgate.test").info("hello", extra={"who": "a b", "none": None})
    assert output.getvalue().rstrip().endswith('hello who="a b" none=-')


class _CountingStream(io.StringIO):
    """A stream that counts its writes (one write is one system call on a real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.mark.gen_test
async def test_lines_of_one_loop_iteration_are_written_together(log_output):
    import asyncio
    import threading

    log_output("INFO", "text")
    handler = logging.getLogger().handlers[0]
    stream = _CountingStream()
    handler.setStream(stream)
    log = logging.getLogger("wsgate.test")
    for n in range(5):
        log.info("line %d", n)
    assert stream.getvalue() == "", "written at the end of the loop iteration"
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
        f"line {n}" for n in range(5)]
    # Another thread's line is written at once, after any line still waiting.
    log.info("waiting")
    other = threading.Thread(target=log.warning, args=("from a thread",))
    other.start()
    other.join()
    assert stream.getvalue().splitlines()[-2:][0].endswith("waiting")
    assert stream.getvalue().rstrip().endswith("from a thread")
    # logging.shutdown() at exit flushes what waits.
    log.info("last")
    handler.flush()
    assert stream.getvalue().rstrip().endswith("last")


def test_text_time_and_fields_are_the_standard_formatters(log_output):
    """The cached time part is what logging.Formatter writes, across a second's edge."""
    log_output("INFO", "text")
    handler = logging.getLogger().handlers[0]
    reference = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for created in (1765080000.999, 1765080001.0, 1765080001.5, 1765166401.25):
        record = logging.getLogger("wsgate.t").makeRecord(
            "wsgate.t", logging.INFO, __file__, 1, "m %s", ("x",), None,
            extra={"a": 1, "b": "c d", "empty": ""})
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert handler.format(record) == reference.format(record) + ' a=1 b="c d" empty=""'


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("status", [202, 401, 500])
def test_access_lines_made_directly_equal_those_made_from_a_record(log_output, monkeypatch, fmt,
                                                                   status):
    """log_access writes its line without a LogRecord while only setup_logging's handler
    would see it: the line is the one the record would have made, byte for byte."""
    from wsgate import logs

    output = log_output("DEBUG", fmt)
    handler = logging.getLogger().handlers[0]
    own = {"events_accepted": 3, "key_id": "key 0", "key_scope": None, "odd": 'a="b"',
           "status": "shadowed"}
    for now in (1765080000.0, 1765080000.9996, 1765080001.25):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        assert logs._direct_handler(logging.INFO) is handler
        logs.log_access(status, "GET", "/v1.0/ws?token=secret&x=1", "10.0.0.1", 0.01234, own)
        direct = output.getvalue()
        output.seek(0)
        output.truncate()
        # A filter anywhere on the way makes the usual record (and sees it).
        seen: list[logging.LogRecord] = []
        logs.access_log.addFilter(lambda record, seen=seen: seen.append(record) or True)
        try:
            assert logs._direct_handler(logging.INFO) is None
            logs.log_access(status, "GET", "/v1.0/ws?token=secret&x=1", "10.0.0.1", 0.01234, own)
        finally:
            logs.access_log.filters.clear()
        handler.flush()
        assert len(seen) == 1
        assert direct == output.getvalue() and "secret" not in direct, (direct, output.getvalue())
        output.seek(0)
        output.truncate()


def test_a_log_capture_still_sees_access_records(log_output):
    from wsgate.logs import log_access

    output = log_output("INFO", "text")
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(capture)
    log_access(202, "POST", "/v1.0/events", "127.0.0.1", 0.001, {"events_accepted": 1})
    logging.getLogger().handlers[0].flush()
    assert [r.getMessage() for r in records] == ["202 POST /v1.0/events"]
    assert records[0].events_accepted == 1
    assert "202 POST /v1.0/events remote_addr=127.0.0.1" in output.getvalue()


def test_lines_left_by_a_loop_that_ended_go_out_with_the_next_loops(log_output):
    import asyncio

    log_output("INFO", "text")
    handler = logging.getLogger().handlers[0]
    stream = _CountingStream()
    handler.setStream(stream)
    log = logging.getLogger("wsgate.test")

    first = asyncio.new_event_loop()

    def last_callback() -> None:
        log.info("from the first loop")
        first.stop()  # this iteration is the last: the flush it scheduled never runs

    first.call_soon(last_callback)
    first.run_forever()
    first.close()
    assert stream.getvalue() == ""
    second = asyncio.new_event_loop()

    async def then() -> None:
        log.info("from the second loop")
        await asyncio.sleep(0)

    second.run_until_complete(then())
    second.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["from the first loop",
                                                          "from the second loop"]
