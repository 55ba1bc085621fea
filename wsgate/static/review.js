// The audit review page: talks to GET /v1.0/audit, /v1.0/audit/verify,
// /v1.0/audit/export.csv, /v1.0/audit/summary, /v1.0/audit/connections/<id> and
// /v1.0/audit/recipients/<event_id> with the reviewer's key as a Bearer header.
//
// Views live in the URL's fragment, so each is linkable and Back works:
// #rows?<filters>, #overview?<filters>, #recipients/<event_id>, #connection/<id>.
//
// Rules this file keeps:
// - the key lives in sessionStorage (this tab only) and in headers, never in a URL;
// - audit data is shown with textContent only: topics, subjects and user agents
//   come from clients and must never be parsed as HTML;
// - charts are plain SVG built here (no library, no inline script or style).
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
  const SVG = "http://www.w3.org/2000/svg";
  // The filters of the rows query, as the form names them (limit aside).
  const FILTERS = ["customer", "agent", "subject", "topic_prefix", "connection", "action",
    "outcome", "code", "since", "until"];
  // Ids longer than this are shown shortened, the full value on hover and copy.
  const SHORT = 12;
  const ID_COLUMNS = new Set(["customer_id", "agent_id", "connection_id", "node_id"]);
  const TIME_COLUMNS = new Set(["occurred_at", "subscribed_at"]);

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
    await route();
  }

  // -- filters and pages --------------------------------------------------------

  function readFilter() {
    const params = new URLSearchParams();
    const form = $("filters");
    for (const name of FILTERS) {
      const field = form.elements[name];
      let value = field.value.trim();
      if (value && field.dataset.exact !== undefined && field.dataset.shown === field.value) {
        // Shown rounded (datetime-local keeps milliseconds): send the linked value.
        value = field.dataset.exact;
      } else if (value && field.type === "datetime-local") {
        // datetime-local has no zone; the labels say UTC, so it is sent as UTC.
        value = `${value}Z`;
      }
      if (value) params.set(name, value);
    }
    return params;
  }

  // Show a view's filter in the form (from a link or the Back button).
  function fillFilter(params) {
    const form = $("filters");
    for (const name of FILTERS) {
      const field = form.elements[name];
      const value = params.get(name) || "";
      delete field.dataset.exact;
      delete field.dataset.shown;
      if (field.type === "datetime-local" && value) {
        const shown = value.replace(/Z$/i, "").replace(/(\.\d{3})\d*$/, "$1");
        field.value = shown;
        field.dataset.exact = value;
        field.dataset.shown = field.value;
      } else {
        field.value = value;
      }
    }
    const limit = params.get("limit");
    form.elements.limit.value = ["25", "100", "500"].includes(limit) ? limit : "100";
  }

  function pageSize() {
    return $("filters").elements.limit.value;
  }

  // Go to a view: a new history entry, or the same view again when nothing changed.
  function navigate(hash) {
    if (location.hash === `#${hash}`) {
      route();
    } else {
      location.hash = hash;
    }
  }

  function listHash(view, params) {
    const query = params.toString();
    return query ? `${view}?${query}` : view;
  }

  async function search(event) {
    if (event) event.preventDefault();
    const params = readFilter();
    if (pageSize() !== "100") params.set("limit", pageSize());
    navigate(listHash(currentView === "overview" ? "overview" : "rows", params));
  }

  async function showRows(params) {
    filter = new URLSearchParams(params);
    filter.delete("limit");
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

  // A value as text, an empty one as "".
  const text = (value) => (value === null || value === undefined ? "" : String(value));

  function copyButton(value) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.dataset.copy = value;
    button.title = "Copy";
    button.setAttribute("aria-label", `Copy ${value}`);
    return button;
  }

  // An id, shortened when long: the full value is its title and what Copy copies.
  // A connection id links to that connection's timeline.
  function idCell(value, link, whole) {
    const wrap = document.createElement("span");
    wrap.className = "id";
    const label = link ? document.createElement("a") : document.createElement("span");
    if (link) label.href = `#connection/${encodeURIComponent(value)}`;
    label.className = "id-text";
    label.title = value;
    label.dataset.full = value;
    label.textContent = value.length > SHORT && !whole ? `${value.slice(0, 8)}…` : value;
    wrap.append(label, copyButton(value));
    return wrap;
  }

  function cell(column, label, value) {
    const td = document.createElement("td");
    td.dataset.column = column;
    td.dataset.label = label;
    const shown = text(value);
    if (shown.length > SHORT && ID_COLUMNS.has(column) || shown && column === "connection_id") {
      td.append(idCell(shown, column === "connection_id"));
    } else if (TIME_COLUMNS.has(column) && shown.includes("T")) {
      // Date and time may go on two lines: a break is allowed after the "T".
      const at = shown.indexOf("T") + 1;
      td.append(shown.slice(0, at), document.createElement("wbr"), shown.slice(at));
    } else {
      td.textContent = shown;
      // The cell may be cut to its column: the whole value on hover.
      if (shown.length > 8) td.title = shown;
    }
    return td;
  }

  function render(rows) {
    const body = $("rows").tBodies[0];
    const lines = rows.map((row) => {
      const tr = document.createElement("tr");
      tr.className = row.outcome;
      for (const [column, label] of COLUMNS) tr.append(cell(column, label, row[column]));
      return tr;
    });
    body.replaceChildren(...lines);
  }

  async function copy(event) {
    const button = event.target.closest("button.copy");
    if (!button) return;
    const value = button.dataset.copy;
    let done = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(value);
        done = true;
      }
    } catch (_) {
      done = false;
    }
    if (!done) {
      // No Clipboard API (plain HTTP): copy through a selected, off-screen text field.
      const area = document.createElement("textarea");
      area.value = value;
      area.className = "offscreen";
      document.body.append(area);
      area.select();
      try { done = document.execCommand("copy"); } catch (_) { done = false; }
      area.remove();
    }
    button.classList.add(done ? "copied" : "failed");
    button.title = done ? "Copied" : "Copy failed: select the text instead";
    setTimeout(() => {
      button.classList.remove("copied", "failed");
      button.title = "Copy";
    }, 1500);
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
    for (const name of FILTERS) {
      delete form.elements[name].dataset.exact;
      delete form.elements[name].dataset.shown;
    }
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

  // -- views --------------------------------------------------------------------

  let currentView = "rows";
  const VIEWS = ["rows", "overview", "recipients", "timeline"];

  function showView(view) {
    currentView = view;
    for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
    // The filters apply to the rows and the overview only.
    $("filters").hidden = !(view === "rows" || view === "overview");
    for (const name of ["rows", "overview", "recipients"]) {
      const tab = $(`tab-${name}`);
      if (name === view) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    say("");
  }

  // Fetch JSON from the API; null after saying why it failed.
  async function fetchJson(path, params) {
    let response;
    try {
      response = await call(path, params);
    } catch (error) {
      if (!(error instanceof SignedOut)) say(`The gateway cannot be reached: ${error.message}`, true);
      return null;
    }
    if (!response.ok) {
      say(await problem(response), true);
      return null;
    }
    return response.json();
  }

  function facts(list, pairs) {
    list.replaceChildren(...pairs.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      if (value instanceof Node) dd.append(value);
      else dd.textContent = text(value) || "—";
      return [dt, dd];
    }));
  }

  // -- overview: plain SVG charts -----------------------------------------------

  function svg(name, attrs, children) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children || []) node.append(child);
    return node;
  }

  function svgText(x, y, content, attrs) {
    const node = svg("text", { x, y, ...attrs });
    node.textContent = content;
    return node;
  }

  // A bar: a link to the rows it counts (when it counts any), with its number in
  // data-count and in a <title> (the tooltip).
  function bar(kind, count, rowsParams, label, rect) {
    const title = svg("title");
    title.textContent = `${label}: ${count}`;
    const shape = svg("rect", { ...rect, class: `bar ${kind}` }, [title]);
    if (!count) return shape;
    const link = svg("a", {
      href: `#${listHash("rows", rowsParams)}`, class: "bar-link",
      "data-kind": kind, "data-count": count, "aria-label": `${label}: ${count}`,
    }, [shape]);
    return link;
  }

  // The filter on screen with some filters replaced (for a bar's link).
  function narrowed(changes) {
    const params = new URLSearchParams(filter);
    for (const [key, value] of Object.entries(changes)) {
      if (value === null || value === undefined) params.delete(key);
      else params.set(key, value);
    }
    return params;
  }

  function hoursChart(hours) {
    const body = $("chart-hours").querySelector(".chart-body");
    if (!hours.length) {
      body.replaceChildren(document.createTextNode("No rows in this range."));
      return;
    }
    const most = Math.max(1, ...hours.flatMap((h) => [h.subscribes, h.refusals]));
    const slot = Math.max(8, Math.min(48, Math.floor(900 / hours.length)));
    const barWidth = Math.max(3, Math.floor((slot - 2) / 2));
    const left = 36, top = 8, height = 140, bottom = 34;
    const width = left + slot * hours.length + 70;
    const scale = (n) => Math.round((n / most) * height);
    const chart = svg("svg", {
      width, height: top + height + bottom, viewBox: `0 0 ${width} ${top + height + bottom}`,
      role: "img", "aria-label": "Subscribes and refusals per hour",
    });
    chart.append(
      svg("line", { x1: left, y1: top + height, x2: width, y2: top + height, class: "axis" }),
      svgText(left - 4, top + 10, String(most), { class: "tick", "text-anchor": "end" }),
      svgText(left - 4, top + height, "0", { class: "tick", "text-anchor": "end" }));
    hours.forEach((h, i) => {
      const x = left + i * slot;
      const group = svg("g", { class: "hour", "data-hour": h.hour });
      for (const [kind, count, outcome, offset] of [
        ["subscribes", h.subscribes, "accepted", 0], ["refusals", h.refusals, "rejected", barWidth]]) {
        const size = scale(count);
        group.append(bar(kind, count,
          narrowed({ since: h.since, until: h.until, action: "subscribe", outcome }),
          `${h.hour.slice(0, 13).replace("T", " ")}:00 UTC, ${kind}`,
          { x: x + offset, y: top + height - size, width: barWidth, height: Math.max(size, 0) }));
      }
      chart.append(group);
    });
    // Label the first and last hour, and a few between when there is room.
    const every = Math.max(1, Math.ceil(hours.length / Math.max(1, Math.floor(width / 110))));
    hours.forEach((h, i) => {
      if (i % every && i !== hours.length - 1) return;
      const x = left + i * slot;
      chart.append(svgText(x, top + height + 14, h.hour.slice(11, 16), { class: "tick" }));
      if (i === 0 || h.hour.slice(11, 13) === "00") {
        chart.append(svgText(x, top + height + 28, h.hour.slice(0, 10), { class: "tick" }));
      }
    });
    const legend = document.createElement("p");
    legend.className = "legend";
    for (const [kind, name] of [["subscribes", "subscribes"], ["refusals", "refusals"]]) {
      const key = document.createElement("span");
      key.className = `key ${kind}`;
      key.textContent = name;
      legend.append(key);
    }
    body.replaceChildren(chart, legend);
  }

  // Horizontal bars: one per item, its label on the left and its number on the right.
  function rankChart(id, items, labelOf, paramsOf, kind) {
    const body = $(id).querySelector(".chart-body");
    if (!items.length) {
      body.replaceChildren(document.createTextNode("No refusals in this range."));
      return;
    }
    const most = Math.max(1, ...items.map((item) => item.refusals));
    const labelWidth = 150, barSpace = 160, row = 24;
    const width = labelWidth + barSpace + 40;
    const chart = svg("svg", {
      width, height: items.length * row + 4, viewBox: `0 0 ${width} ${items.length * row + 4}`,
      role: "img", "aria-label": $(id).querySelector("figcaption").textContent,
    });
    items.forEach((item, i) => {
      const y = i * row + 2;
      const label = labelOf(item);
      const size = Math.max(2, Math.round((item.refusals / most) * barSpace));
      const caption = svgText(labelWidth - 6, y + 15,
        label.length > 24 ? `${label.slice(0, 23)}…` : label,
        { class: "label", "text-anchor": "end" });
      const full = svg("title");
      full.textContent = label;
      caption.append(full);
      chart.append(caption,
        bar(kind, item.refusals, paramsOf(item), label,
          { x: labelWidth, y: y + 3, width: size, height: row - 8 }),
        svgText(labelWidth + size + 4, y + 15, String(item.refusals), { class: "tick" }));
    });
    body.replaceChildren(chart);
  }

  async function showOverview(params) {
    filter = new URLSearchParams(params);
    filter.delete("limit");
    say("Loading…");
    const summary = await fetchJson("/v1.0/audit/summary", filter);
    if (!summary || currentView !== "overview") return;
    say(summary.rows ? "" : "No audit rows match these filters.");
    $("overview-totals").textContent =
      `${summary.rows} rows: ${summary.subscribes} subscribes, ${summary.refusals} refusals.` +
      (summary.hours_truncated ? " Only the latest hours are drawn: narrow the range to see earlier ones." : "");
    hoursChart(summary.hours);
    rankChart("chart-principals", summary.top_refused,
      (p) => (p.customer_id ? `${p.subject} · ${p.customer_id.slice(0, 8)}…` : p.subject),
      (p) => narrowed({ action: "subscribe", outcome: "rejected", subject: p.subject,
        customer: p.customer_id }),
      "principal");
    rankChart("chart-codes", summary.refusals_by_code, (c) => c.code || "(none)",
      (c) => narrowed({ action: "subscribe", outcome: "rejected", code: c.code }), "code");
  }

  // -- recipients of an event ---------------------------------------------------

  const RECIPIENT_COLUMNS = [
    ["connection_id", "Connection"], ["subject", "Subject"], ["kind", "Kind"],
    ["customer_id", "Customer"], ["agent_id", "Agent"], ["subscription", "Subscription"],
    ["event_topic", "Matched topic"], ["subscribed_at", "Subscribed (UTC)"],
    ["node_id", "Node"], ["remote_addr", "Remote address"]];

  async function showRecipients(eventId) {
    $("event-id").value = eventId;
    $("event-info").hidden = true;
    $("recipients-count").textContent = "";
    $("recipients").tBodies[0].replaceChildren();
    if (!eventId) return;
    say("Loading…");
    const found = await fetchJson(`/v1.0/audit/recipients/${encodeURIComponent(eventId)}`);
    if (!found || currentView !== "recipients") return;
    say("");
    const ev = found.event;
    facts($("event-info"), [
      ["Event ID", idCell(ev.event_id, false)], ["Type", ev.type],
      ["Topics", ev.topics.join("\n")], ["Published (UTC)", ev.published_at],
      ["Node", ev.node_id], ["Payload SHA-256", idCell(ev.payload_sha256, false)]]);
    $("event-info").hidden = false;
    const n = found.recipients.length;
    $("recipients-count").textContent = n === 1
      ? "1 connection held a matching subscription when it was published."
      : `${n} connections held a matching subscription when it was published.`;
    $("recipients").tBodies[0].replaceChildren(...found.recipients.map((r) => {
      const tr = document.createElement("tr");
      for (const [column, label] of RECIPIENT_COLUMNS) tr.append(cell(column, label, r[column]));
      return tr;
    }));
  }

  // -- one connection's timeline ------------------------------------------------

  let timelineId = null;
  let timelineCursor = null;

  function timelineItems(rows) {
    return rows.map((row) => {
      const li = document.createElement("li");
      li.className = `${row.action} ${row.outcome}`;
      const when = document.createElement("time");
      when.textContent = row.occurred_at;
      const what = document.createElement("span");
      what.className = "what";
      what.textContent = `${row.action} ${row.outcome}` + (row.code ? ` (${row.code})` : "");
      const topicText = document.createElement("span");
      topicText.className = "topic";
      topicText.textContent = row.topic || "";
      li.append(when, what, topicText);
      return li;
    });
  }

  async function showTimeline(connectionId) {
    timelineId = connectionId;
    $("timeline-id").replaceChildren(idCell(connectionId, false, true));
    $("timeline-info").replaceChildren();
    $("timeline").replaceChildren();
    $("timeline-more").hidden = true;
    $("timeline-rows-link").href =
      `#${listHash("rows", new URLSearchParams({ connection: connectionId }))}`;
    say("Loading…");
    const found = await fetchJson(`/v1.0/audit/connections/${encodeURIComponent(connectionId)}`);
    if (!found || currentView !== "timeline" || timelineId !== connectionId) return;
    say("");
    const p = found.principal;
    const counts = found.counts.map((c) => `${c.rows} ${c.action} ${c.outcome}`).join(", ");
    facts($("timeline-info"), [
      ["Principal", `${p.subject} (${p.kind})`],
      ["Customer", p.customer_id ? idCell(p.customer_id, false) : null],
      ["Agent", p.agent_id ? idCell(p.agent_id, false) : null],
      ["Authenticator", p.authenticator], ["Remote address", found.remote_addr],
      ["Origin", found.origin], ["User agent", found.user_agent],
      ["Node", found.nodes.join(", ")],
      ["First row (UTC)", found.first_at], ["Last row (UTC)", found.last_at],
      ["Rows", counts],
      ["End", found.end
        ? `closed: ${found.end.code} at ${found.end.at}`
        : "no end recorded: still open, or closed while holding no subscription"]]);
    $("timeline").replaceChildren(...timelineItems(found.rows));
    timelineCursor = found.next_cursor;
    $("timeline-more").hidden = !timelineCursor;
  }

  async function moreTimeline() {
    if (!timelineCursor || !timelineId) return;
    const id = timelineId;
    const page = await fetchJson(`/v1.0/audit/connections/${encodeURIComponent(id)}`,
      new URLSearchParams({ cursor: timelineCursor }));
    if (!page || timelineId !== id) return;
    $("timeline").append(...timelineItems(page.rows));
    timelineCursor = page.next_cursor;
    $("timeline-more").hidden = !timelineCursor;
  }

  // -- the router ---------------------------------------------------------------

  async function route() {
    if (!key) return;
    const hash = location.hash.replace(/^#/, "");
    const at = hash.indexOf("?");
    const path = at < 0 ? hash : hash.slice(0, at);
    const params = new URLSearchParams(at < 0 ? "" : hash.slice(at + 1));
    let rest = "";
    const slash = path.indexOf("/");
    const view = slash < 0 ? path : path.slice(0, slash);
    if (slash >= 0) {
      try { rest = decodeURIComponent(path.slice(slash + 1)); } catch (_) { rest = ""; }
    }
    if (view === "connection" && rest) {
      showView("timeline");
      await showTimeline(rest);
    } else if (view === "recipients") {
      showView("recipients");
      await showRecipients(rest.trim());
    } else if (view === "overview") {
      showView("overview");
      fillFilter(params);
      await showOverview(params);
    } else {
      showView("rows");
      fillFilter(params);
      await showRows(params);
    }
  }

  function findRecipients(event) {
    event.preventDefault();
    const id = $("event-id").value.trim();
    navigate(id ? `recipients/${encodeURIComponent(id)}` : "recipients");
  }

  // -- wiring -------------------------------------------------------------------

  for (const [table, columns] of [["rows", COLUMNS], ["recipients", RECIPIENT_COLUMNS]]) {
    $(table).tHead.rows[0].replaceChildren(...columns.map(([column, label]) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.dataset.column = column;
      th.textContent = label;
      return th;
    }));
  }
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", search);
  $("clear").addEventListener("click", clearFilters);
  $("next").addEventListener("click", nextPage);
  $("prev").addEventListener("click", previousPage);
  $("export").addEventListener("click", exportCsv);
  $("verify").addEventListener("click", verify);
  $("filters").elements.limit.addEventListener("change", () => search());
  $("recipients-form").addEventListener("submit", findRecipients);
  $("timeline-more").addEventListener("click", moreTimeline);
  document.addEventListener("click", copy);
  window.addEventListener("hashchange", route);

  if (key) {
    showReview(true);
    route();
  } else {
    showReview(false);
  }
})();
