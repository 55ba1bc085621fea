"""Witnesses (SPEC §5): every checkpoint copied to files and HTTP receivers outside
the database, in order, without ever holding up the audit writer."""

import base64
import importlib.util
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tornado.httpclient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for, wait_for_blocking
from wsgate.audit.witness import WitnessError, WitnessPublisher, read_witness
from wsgate.config import ConfigError, config_from_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "witness_receiver.py"
_spec = importlib.util.spec_from_file_location("witness_receiver", EXAMPLE)
assert _spec is not None and _spec.loader is not None
receiver_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(receiver_example)

#: Fast retries so a recovered witness is noticed quickly.
FAST = {"backoff": (0.02, 0.1)}
#: How long submit may take, even with every witness unreachable.
PROMPT = 0.05


def checkpoints(first, count, node="node-a"):
    """Checkpoint-like dicts, with fields beyond the minimum that must survive."""
    return [{"chain": "rows", "node_id": node, "seq": seq * 1000, "head_hash": f"{seq:064x}",
             "prev_hash": f"{seq - 1:064x}", "policy": None, "kind": "periodic",
             "signed_at": "2024-05-01T12:00:00.000000Z", "key_id": "0123456789abcdef",
             "signature": f"sig-{seq}"} for seq in range(first, first + count)]


def timed_submit(publisher, batch):
    started = time.perf_counter()
    publisher.submit(batch)
    took = time.perf_counter() - started
    assert took < PROMPT, f"submit took {took * 1000:.1f} ms"


@pytest.fixture
def reserved():
    """A socket bound to a local port but not listening: connections are refused
    until Receiver.start() listens on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


class Receiver:
    """examples/witness_receiver.py serving, in a thread, on an already bound socket."""

    def __init__(self, sock, path):
        self.server = receiver_example.WitnessReceiver(sock.getsockname(), path,
                                                       bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.server.server_address = sock.getsockname()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/checkpoints"
        self.thread = None

    def start(self):
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()


@pytest.fixture
def receiver(reserved, tmp_path):
    r = Receiver(reserved, tmp_path / "received.jsonl")
    yield r
    r.stop()


@pytest.fixture
def publishers():
    """Make publishers that are closed (without waiting) after the test."""
    made = []

    def make(urls, **kwargs):
        publisher = WitnessPublisher(urls, **kwargs)
        made.append(publisher)
        publisher.start()
        return publisher

    yield make
    for publisher in made:
        publisher.close(0.0)


def file_url(path):
    return Path(path).as_uri()


def jsonl(items):
    return "".join(json.dumps(i, sort_keys=True, separators=(",", ":")) + "\n" for i in items)


# -- delivery ---------------------------------------------------------------------------


def test_file_and_http_witnesses_receive_every_checkpoint_in_order(tmp_path, publishers):
    received = tmp_path / "receiver.jsonl"
    with subprocess.Popen([sys.executable, str(EXAMPLE), "0", "--file", str(received)],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            banner = proc.stdout.readline()
            assert banner.startswith("witness receiver on http://127.0.0.1:"), banner
            http_url = banner.split()[3] + "checkpoints"
            local = tmp_path / "witness.jsonl"  # does not exist yet: the witness creates it
            publisher = publishers([file_url(local), http_url])
            sent = checkpoints(1, 3) + checkpoints(4, 1) + checkpoints(5, 20)
            for batch in (sent[:3], sent[3:4], sent[4:]):
                publisher.submit(batch)
            wait_for_blocking(lambda: all(w.delivered == len(sent) for w in publisher.witnesses),
                              timeout=10)

            # One compact JSON object a line, keys sorted, every field kept.
            assert local.read_text() == jsonl(sent)
            assert received.read_text() == jsonl(sent)
            assert read_witness(str(local)) == sent
            assert read_witness(file_url(local)) == sent
            assert read_witness(http_url) == sent
            assert [(w.up, w.pending(), w.failures, w.dropped) for w in publisher.witnesses] \
                == [(True, 0, 0, 0)] * 2
            assert publisher.close(5.0) == 0
        finally:
            proc.terminate()
            proc.wait(10)


def test_down_witness_does_not_block_and_gets_everything_once_up(tmp_path, receiver,
                                                                  publishers):
    local = tmp_path / "witness.jsonl"
    publisher = publishers([file_url(local), receiver.url], **FAST)
    file_witness, http_witness = publisher.witnesses
    first, second = checkpoints(1, 5), checkpoints(6, 5)

    timed_submit(publisher, first)
    # Refused, retried, counted; the file witness is not held up meanwhile.
    wait_for_blocking(lambda: http_witness.failures >= 3, timeout=10)
    assert not http_witness.up and http_witness.pending() == 5
    wait_for_blocking(lambda: file_witness.delivered == 5, timeout=10)
    assert file_witness.up and file_witness.failures == 0
    timed_submit(publisher, second)
    assert http_witness.pending() == 10

    receiver.start()
    wait_for_blocking(lambda: http_witness.delivered == 10, timeout=10)
    assert http_witness.up and http_witness.pending() == 0
    assert read_witness(receiver.url) == first + second
    assert read_witness(str(local)) == first + second


def test_submit_returns_at_once_while_a_witness_hangs(caplog, publishers):
    # Listening, never answering: each POST waits for its full timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        publisher = publishers([url], timeout=0.3, **FAST)
        (witness,) = publisher.witnesses
        timed_submit(publisher, checkpoints(1, 1))
        for seq in range(2, 6):
            timed_submit(publisher, checkpoints(seq, 1))
        wait_for_blocking(lambda: witness.failures >= 1, timeout=10)
        assert not witness.up
        assert "timed out" in caplog.text

        # close gives up at its deadline and says how many were lost.
        started = time.monotonic()
        assert publisher.close(0.2) == 5
        assert time.monotonic() - started < 1.0
    lost = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert lost == [f"witness {url}: 5 checkpoints were not delivered before shutdown"]


def test_a_missing_directory_fails_until_it_exists(tmp_path, publishers):
    target = tmp_path / "later" / "witness.jsonl"
    publisher = publishers([file_url(target)], **FAST)
    (witness,) = publisher.witnesses
    publisher.submit(checkpoints(1, 2))
    wait_for_blocking(lambda: witness.failures >= 2, timeout=10)
    assert not witness.up and not target.parent.exists()  # directories are not made
    target.parent.mkdir()
    wait_for_blocking(lambda: witness.delivered == 2, timeout=10)
    assert read_witness(str(target)) == checkpoints(1, 2)


class Answers(BaseHTTPRequestHandler):
    """An HTTP witness that answers each POST with the next status of server.statuses
    (204 once they run out), keeping what it answered 2xx; GET is always 200."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.server.statuses.pop(0) if self.server.statuses else 204
        if status < 300:
            self.server.kept.append((self.path, self.headers["Authorization"],
                                     self.headers["Content-Type"], json.loads(body)))
        self.send_response(status)
        if status in (301, 302, 307):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        # A redirected POST that became a GET would "succeed" here.
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_only_2xx_answers_count_as_delivered(publishers):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    server.statuses = [500, 302, 404, 200]
    server.kept = []
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        publisher = publishers([f"http://ann:s%C3%A9same@127.0.0.1:{port}/cp?token=t1"], **FAST)
        (witness,) = publisher.witnesses
        publisher.submit(checkpoints(1, 3))
        wait_for_blocking(lambda: witness.delivered == 3, timeout=10)
        assert witness.failures == 3
        # The first checkpoint was retried until accepted, then the rest, in order, one
        # POST each, with the URL's user info as Basic authentication.
        basic = "Basic " + base64.b64encode("ann:sésame".encode()).decode()
        assert server.kept == [("/cp?token=t1", basic, "application/json", cp)
                               for cp in checkpoints(1, 3)]
    finally:
        server.shutdown()
        server.server_close()


def test_the_queue_is_bounded_and_drops_the_oldest(caplog, receiver, publishers):
    publisher = publishers([receiver.url], max_pending=5, **FAST)
    (witness,) = publisher.witnesses
    timed_submit(publisher, checkpoints(1, 12))
    assert witness.dropped == 7 and witness.pending() == 5
    wait_for_blocking(lambda: witness.failures >= 1, timeout=10)  # 8 is being retried: in flight
    timed_submit(publisher, checkpoints(13, 2))
    assert witness.dropped == 9 and witness.pending() == 5
    warnings = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING

    receiver.start()
    wait_for_blocking(lambda: witness.pending() == 0, timeout=10)
    # The checkpoint in flight when the queue overflowed again was kept.
    assert [cp["seq"] // 1000 for cp in read_witness(receiver.url)] == [8, 11, 12, 13, 14]


def test_a_checkpoint_that_cannot_be_sent_does_not_stop_the_others(tmp_path, publishers):
    local = tmp_path / "w.jsonl"
    publisher = publishers([file_url(local)])
    (witness,) = publisher.witnesses
    publisher.submit([{"chain": "rows", "seq": object()}, *checkpoints(1, 1)])
    wait_for_blocking(lambda: witness.delivered == 1, timeout=10)
    assert witness.dropped == 1
    assert read_witness(str(local)) == checkpoints(1, 1)


# -- what the logs show ------------------------------------------------------------------


def test_secrets_in_witness_urls_never_reach_the_logs(caplog, reserved, tmp_path, publishers):
    caplog.set_level(logging.DEBUG, logger="wsgate.audit.witness")
    port = reserved.getsockname()[1]
    receiver = Receiver(reserved, tmp_path / "received.jsonl")
    try:
        with socket.socket() as refused:
            refused.bind(("127.0.0.1", 0))
            never = (f"https://user:s3cret-pass@127.0.0.1:{refused.getsockname()[1]}"
                     "/x?token=abc-token")
            later = f"http://user:s3cret-pass@127.0.0.1:{port}/cp?token=abc-token"
            publisher = publishers([never, later], **FAST)
            publisher.submit(checkpoints(1, 2))
            wait_for_blocking(lambda: all(w.failures >= 3 for w in publisher.witnesses), timeout=10)
            receiver.start()
            wait_for_blocking(lambda: publisher.witnesses[1].delivered == 2, timeout=10)
            assert publisher.close(0.1) == 2
    finally:
        receiver.stop()
    # The credentials were sent (as Basic authentication), not dropped from the URL.
    assert read_witness(str(tmp_path / "received.jsonl")) == checkpoints(1, 2)

    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    for secret in ("s3cret", "abc-token", "token=", "user:"):
        assert secret not in caplog.text
        assert all(secret not in m for _, m in messages)
    warned = [m for level, m in messages if level == logging.WARNING]
    assert any(m.startswith(f"witness http://127.0.0.1:{port}/cp is failing") for m in warned)
    assert sum("is failing" in m for m in warned) == 2  # once each, not once per retry
    assert any(level == logging.INFO and m.startswith(f"witness http://127.0.0.1:{port}/cp is "
                                                      "back") for level, m in messages)
    assert any("checkpoints were not delivered" in m and "127.0.0.1" in m for m in warned)


# -- reading back --------------------------------------------------------------------


def test_read_witness_names_the_bad_line(tmp_path, receiver):
    good = jsonl(checkpoints(1, 1))
    path = tmp_path / "w.jsonl"
    for body, fragment in [
        (good + "\n" + "[1, 2]\n", "line 3: not a JSON object"),
        (good + "{not json\n", "line 2: not JSON"),
        (good + good + '{"chain": "rows", "node_id": "n", "seq": 5}\n',
         "line 3: not a checkpoint (no signature)"),
    ]:
        path.write_text(body)
        with pytest.raises(WitnessError) as info:
            read_witness(str(path))
        assert str(info.value) == f"witness {path}: {fragment}"

    # The same from an HTTP witness, named without its token.
    receiver.server.file.write_text(good + "42\n")
    receiver.start()
    with pytest.raises(WitnessError) as info:
        read_witness(receiver.url + "?token=abc")
    assert str(info.value) == f"witness {receiver.url}: line 2: not a JSON object"


def test_read_witness_takes_a_json_list(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(checkpoints(1, 3)))
    assert read_witness(file_url(path)) == checkpoints(1, 3)
    path.write_text(json.dumps([*checkpoints(1, 1), "x"]))
    with pytest.raises(WitnessError, match="item 2: not a JSON object"):
        read_witness(str(path))


def test_read_witness_says_when_it_cannot_read(tmp_path, reserved):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(WitnessError, match=re.escape(f"witness {missing} cannot be read")):
        read_witness(str(missing))
    url = f"http://127.0.0.1:{reserved.getsockname()[1]}/cp"
    with pytest.raises(WitnessError) as info:
        read_witness(url.replace("//", "//u:pw-secret@") + "?token=abc")
    assert str(info.value).startswith(f"witness {url} cannot be read: ")
    assert "pw-secret" not in str(info.value) and "abc" not in str(info.value)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("url, fragment", [
    ("ftp://host/x", "'ftp://host/x' is not a witness URL"),
    ("file://relative/x.jsonl", "is not a file URL with an absolute path"),
    ("/var/lib/w.jsonl", "'/var/lib/w.jsonl' is not a witness URL"),
    ("https:///x", "'https:///x' has no host"),
    ("ftp://user:pw-secret@host/x?token=abc", "'ftp://host/x' is not a witness URL"),
    ("https://host/x?token=abc def", "'https://host/x' contains spaces"),
    ("https://host:80x/x", "'https://host/x': its port is not a number"),
])
def test_bad_witness_urls_stop_the_config(url, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"audit": {"witness": ["file:///ok.jsonl", url]}}, source="w.toml")
    message = str(info.value)
    assert message.startswith("w.toml: [audit] witness[1]: ") and fragment in message
    assert message.endswith("use file:///absolute/path, http://host/path or https://host/path")
    assert "pw-secret" not in message and "abc" not in message


def test_witness_urls_in_the_config(monkeypatch):
    monkeypatch.setenv("WITNESS_URL", "https://w.example.com/cp?token=abc")
    cfg = config_from_dict({"audit": {"witness": [
        "file:///var/lib/wsgate/witness.jsonl", {"env": "WITNESS_URL"}]}})
    assert cfg.audit.witness == ("file:///var/lib/wsgate/witness.jsonl",
                                 "https://w.example.com/cp?token=abc")
    assert "abc" not in repr(cfg.audit)
    assert config_from_dict({}).audit.witness == ()


# -- /metrics ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_witness_state_shows_in_metrics(make_server, tmp_path, reserved):
    receiver = Receiver(reserved, tmp_path / "received.jsonl")
    local = tmp_path / "witness.jsonl"
    server = await make_server(metrics={"keys": ["mk"]},
                               audit={"witness": [file_url(local), receiver.url + "?token=abc"]})
    http_client = tornado.httpclient.AsyncHTTPClient()

    async def scrape():
        response = await http_client.fetch(server.base + "/metrics",
                                           headers={"Authorization": "Bearer mk"})
        text = response.body.decode()
        assert "abc" not in text
        return {(s.name, s.labels.get("witness")): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples if s.name.startswith("wsgate_witness_")}

    publisher = server.gateway.audit.witness
    try:
        publisher.submit(checkpoints(1, 4))
        await wait_for(lambda: publisher.witnesses[1].failures >= 1)
        m = await scrape()
        f, h = file_url(local), receiver.url
        assert (m["wsgate_witness_up", f], m["wsgate_witness_delivered_total", f],
                m["wsgate_witness_pending", f]) == (1, 4, 0)
        assert m["wsgate_witness_up", h] == 0
        assert m["wsgate_witness_pending", h] == 4
        assert m["wsgate_witness_failures_total", h] >= 1
        assert m["wsgate_witness_dropped_total", h] == 0

        receiver.start()
        await wait_for(lambda: publisher.witnesses[1].delivered == 4, timeout=15)
        m = await scrape()
        assert (m["wsgate_witness_up", h], m["wsgate_witness_pending", h],
                m["wsgate_witness_delivered_total", h]) == (1, 0, 4)
    finally:
        receiver.stop()
