// The audit review page: talks to GET /v1.0/audit, /v1.0/audit/verify and
// /v1.0/audit/export.csv with the reviewer's key as a Bearer header.
//
// Rules this file keeps:
// - the key lives in sessionStorage (this tab only) and in headers, never in a URL;
// - audit data is shown with textContent only: topics, subjects and user agents
//   come from clients and must never be parsed as HTML.
"use strict";

(() => {
  const STORE = "wsgate-audit-key";
  // Who, when, what and the verdict first: they answer the reviewer's question;
  // the where and how columns follow.
  const COLUMNS = [
    ["seq", "Seq"], ["occurred_at", "Time (UTC)"], ["subject", "Subject"], ["kind", "Kind"],
    ["action", "Action"], ["topic", "Topic"], ["outcome", "Outcome"], ["code", "Code"],
    ["customer_id", "Customer"], ["agent_id", "Agent"], ["connection_id", "Connection"],
    ["node_id", "Node"], ["authenticator", "Authenticator"], ["remote_addr", "Remote address"],
    ["origin", "Origin"], ["user_agent", "User agent"]];
  const $ = (id) => document.getElementById(id);

  let key = sessionStorage.getItem(STORE);
  // The filter of the rows on screen, and the cursor of each page reached so far
  // (null: the first page), so "Previous" can go back without a server-side state.
  let filter = new URLSearchParams();
  let cursors = [null];
  let nextCursor = null;

  class SignedOut extends Error {}

  async function call(path, params) {
    const query = params && params.toString();
    const response = await fetch(query ? `${path}?${query}` : path, {
      headers: { Authorization: `Bearer ${key}` },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) {
      signOut("This key is not accepted. Sign in with a key from [audit] api_keys.");
      throw new SignedOut();
    }
    return response;
  }

  async function problem(response) {
    try {
      const body = await response.json();
      return body.error.message;
    } catch (_) {
      return `the server answered ${response.status}`;
    }
  }

  function say(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  // -- signing in and out -------------------------------------------------------

  function showReview(signedIn) {
    $("sign-in").hidden = signedIn;
    $("review").hidden = !signedIn;
    $("sign-out").hidden = !signedIn;
  }

  function signOut(message) {
    key = null;
    sessionStorage.removeItem(STORE);
    $("rows").tBodies[0].replaceChildren();
    $("verify-result").hidden = true;
    $("sign-in-error").textContent = message || "";
    showReview(false);
    $("key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const given = $("key").value.trim();
    $("key").value = "";
    if (!given) return;
    key = given;
    $("sign-in-error").textContent = "";
    try {
      // One row is enough to learn whether the key is accepted.
      const response = await call("/v1.0/audit", new URLSearchParams({ limit: "1" }));
      if (!response.ok) {
        $("sign-in-error").textContent = await problem(response);
        key = null;
        return;
      }
    } catch (error) {
      if (!(error instanceof SignedOut)) {
        $("sign-in-error").textContent = `The gateway cannot be reached: ${error.message}`;
        key = null;
      }
      return;
    }
    sessionStorage.setItem(STORE, key);
    showReview(true);
    await search();
  }

  // -- filters and pages --------------------------------------------------------

  function readFilter() {
    const params = new URLSearchParams();
    const form = $("filters");
    for (const name of ["customer", "agent", "subject", "topic_prefix", "connection", "outcome"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    for (const name of ["since", "until"]) {
      // datetime-local has no zone; the labels say UTC, so it is sent as UTC.
      const value = form.elements[name].value;
      if (value) params.set(name, `${value}Z`);
    }
    return params;
  }

  function pageSize() {
    return $("filters").elements.limit.value;
  }

  async function search(event) {
    if (event) event.preventDefault();
    filter = readFilter();
    cursors = [null];
    await showPage();
  }

  async function showPage() {
    const params = new URLSearchParams(filter);
    params.set("limit", pageSize());
    const cursor = cursors[cursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    say("Loading…");
    let response;
    try {
      response = await call("/v1.0/audit", params);
    } catch (error) {
      if (!(error instanceof SignedOut)) say(`The gateway cannot be reached: ${error.message}`, true);
      return;
    }
    if (!response.ok) {
      say(await problem(response), true);
      return;
    }
    const page = await response.json();
    nextCursor = page.next_cursor;
    render(page.rows);
    const size = Number(pageSize());
    const first = (cursors.length - 1) * size + 1;
    const pageNumber = cursors.length;
    $("page-info").textContent = page.rows.length
      ? `Page ${pageNumber} · rows ${first}–${first + page.rows.length - 1}`
      : `Page ${pageNumber}`;
    $("prev").disabled = cursors.length === 1;
    $("next").disabled = !nextCursor;
    say(page.rows.length ? "" : "No audit rows match these filters.");
  }

  function render(rows) {
    const body = $("rows").tBodies[0];
    const lines = rows.map((row) => {
      const tr = document.createElement("tr");
      tr.className = row.outcome;
      for (const [column] of COLUMNS) {
        const td = document.createElement("td");
        td.dataset.column = column;
        const value = row[column];
        td.textContent = value === null || value === undefined ? "" : String(value);
        tr.append(td);
      }
      return tr;
    });
    body.replaceChildren(...lines);
  }

  async function nextPage() {
    if (!nextCursor) return;
    cursors.push(nextCursor);
    await showPage();
  }

  async function previousPage() {
    if (cursors.length === 1) return;
    cursors.pop();
    await showPage();
  }

  function clearFilters() {
    const form = $("filters");
    const size = form.elements.limit.value;
    form.reset();
    form.elements.limit.value = size;
    search();
  }

  // -- export and verify --------------------------------------------------------

  async function exportCsv() {
    // The filter of the rows on screen, not what is typed but not yet searched.
    say("Exporting…");
    let response;
    try {
      response = await call("/v1.0/audit/export.csv", filter);
    } catch (error) {
      if (!(error instanceof SignedOut)) say(`The export failed: ${error.message}`, true);
      return;
    }
    if (!response.ok) {
      say(await problem(response), true);
      return;
    }
    const blob = await response.blob();
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = match ? match[1] : "wsgate-audit.csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    say(`Exported the current filter to ${link.download}.`);
  }

  function describe(result) {
    const nodes = result.nodes.length === 1 ? "1 node" : `${result.nodes.length} nodes`;
    const counted = `${result.rows_checked} subscription rows and ${result.events_checked} ` +
      `events of ${nodes} were checked`;
    const signatures = result.signatures_checked
      ? `${result.checkpoints_checked} signed checkpoints were verified.`
      : "Checkpoint signatures were not checked: no verify key is configured " +
        "([audit] verify_key_file).";
    const witnessed = (result.witnesses || []).length
      ? ` ${result.witnessed_checked} checkpoints held by ${result.witnesses.length} witness(es) ` +
        "were found in the store, unchanged."
      : "";
    const unsealed = (result.unsealed || []).map((t) =>
      `Not signed yet: ${t.rows} ${t.chain === "rows" ? "rows" : "events"} of node ${t.node_id} ` +
      `after seq ${t.after_seq} (${t.first_at || "?"} to ${t.last_at || "?"}); no checkpoint ` +
      "or witness vouches for them until the node signs its next one.");
    if (result.ok) {
      return [`The audit log is whole: nothing was changed, removed or inserted. ${counted}. ` +
        `${signatures}${witnessed}`, ...unsealed];
    }
    const first = result.first;
    const lines = [`The audit log is NOT whole. The first bad ${first.chain === "rows" ? "row" : "entry"} ` +
      `is seq ${first.seq} of node ${first.node_id} (${first.kind.replaceAll("_", " ")}): ${first.message}`];
    for (const p of result.problems) {
      if (p !== first && !(p.seq === first.seq && p.node_id === first.node_id && p.chain === first.chain)) {
        lines.push(`Also: ${p.chain} chain of node ${p.node_id}, seq ${p.seq} (${p.kind.replaceAll("_", " ")}): ${p.message}`);
      }
    }
    lines.push(`${counted}. ${signatures}${witnessed}`, ...unsealed);
    return lines;
  }

  async function verify() {
    const box = $("verify-result");
    box.hidden = false;
    box.className = "";
    box.replaceChildren(document.createTextNode("Checking the whole log…"));
    $("verify").disabled = true;
    try {
      const response = await call("/v1.0/audit/verify");
      if (!response.ok) {
        box.className = "bad";
        box.replaceChildren(document.createTextNode(await problem(response)));
        return;
      }
      const result = await response.json();
      box.className = result.ok ? "good" : "bad";
      box.replaceChildren(...describe(result).map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      }));
    } catch (error) {
      if (!(error instanceof SignedOut)) {
        box.className = "bad";
        box.replaceChildren(document.createTextNode(`The check failed: ${error.message}`));
      }
    } finally {
      $("verify").disabled = false;
    }
  }

  // -- wiring -------------------------------------------------------------------

  $("rows").tHead.rows[0].replaceChildren(...COLUMNS.map(([, label]) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = label;
    return th;
  }));
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", search);
  $("clear").addEventListener("click", clearFilters);
  $("next").addEventListener("click", nextPage);
  $("prev").addEventListener("click", previousPage);
  $("export").addEventListener("click", exportCsv);
  $("verify").addEventListener("click", verify);
  $("filters").elements.limit.addEventListener("change", () => search());

  if (key) {
    showReview(true);
    search();
  } else {
    showReview(false);
  }
})();
