#!/usr/bin/env node
'use strict';
// The subscribe storm's load generator in Node (bench `--scenario storm --storm-gen node`):
// the same JSON spec on stdin and the same JSON result on stdout as
// `python -m bench.loadgen` in storm mode, at a fraction of its CPU per message,
// so the generator can offer more subscribes than the server takes.
//
// A minimal RFC 6455 client on `net` (no npm package): each of spec.connections
// connections opens `GET /v1.0/ws?token=...`, waits for `connected`, then keeps
// spec.in_flight `subscribe` messages (one new topic each) outstanding: a new one
// is sent as soon as a `subscribed` reply arrives. With spec.barrier (several
// generator processes), it prints {"ready": n} once connected and starts only
// when a line `GO` arrives on stdin, so the processes measure one window. After
// spec.warmup seconds (default 1) it counts accepted topics and sent subscribes
// for spec.duration seconds, and reads its own CPU and the server's
// (/proc/<server_pid>/stat) and the machine's (/proc/stat).
const net = require('net');
const fs = require('fs');
const crypto = require('crypto');

const CLK_TCK = parseInt(process.env.CLK_TCK || '100', 10);

function cpuOf(pid) {
  if (!pid) return 0;
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (parseInt(f[11], 10) + parseInt(f[12], 10)) / CLK_TCK;
  } catch (e) {
    return 0;
  }
}
// Busy jiffies of each CPU (all but idle and iowait), from /proc/stat.
function busyJiffies() {
  const out = {};
  try {
    for (const line of fs.readFileSync('/proc/stat', 'utf8').split('\n')) {
      const m = /^(cpu\d+)\s+(.*)$/.exec(line);
      if (!m) continue;
      const v = m[2].split(/\s+/).slice(0, 8).map(Number);
      out[m[1]] = [v.reduce((a, b) => a + b, 0) - v[3] - v[4], v.reduce((a, b) => a + b, 0)];
    }
  } catch (e) {}
  return out;
}
const selfCpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

// Masked client text frame; mask keys come from a pool refilled in bulk.
let pool = crypto.randomBytes(65536);
let poolAt = 0;
function frame(text) {
  const payload = Buffer.from(text, 'utf8');
  const n = payload.length;
  const head = n < 126 ? 2 : n < 65536 ? 4 : 10;
  const out = Buffer.allocUnsafe(head + 4 + n);
  out[0] = 0x81;
  if (n < 126) out[1] = 0x80 | n;
  else if (n < 65536) {
    out[1] = 0x80 | 126;
    out.writeUInt16BE(n, 2);
  } else {
    out[1] = 0x80 | 127;
    out.writeBigUInt64BE(BigInt(n), 2);
  }
  if (poolAt + 4 > pool.length) {
    pool = crypto.randomBytes(65536);
    poolAt = 0;
  }
  pool.copy(out, head, poolAt, poolAt + 4);
  const k = out.subarray(head, head + 4);
  poolAt += 4;
  for (let i = 0; i < n; i++) out[head + 4 + i] = payload[i] ^ k[i & 3];
  return out;
}

class Conn {
  constructor(spec, i, onMessage) {
    this.i = i;
    this.onMessage = onMessage;
    this.buf = Buffer.alloc(0);
    this.upgraded = false;
    this.closed = false;
    this.sock = net.connect(spec.port, spec.host);
    this.sock.setNoDelay(true);
    this.sock.on('connect', () => {
      const key = crypto.randomBytes(16).toString('base64');
      this.sock.write(`GET /v1.0/ws?token=${encodeURIComponent(spec.token)} HTTP/1.1\r\n` +
        `Host: ${spec.host}:${spec.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${key}\r\n\r\n`);
    });
    this.sock.on('data', (d) => this.data(d));
    this.sock.on('error', (e) => this.onMessage(this, { type: '_error', error: String(e) }));
    this.sock.on('close', () => {
      this.closed = true;
      this.onMessage(this, { type: '_closed' });
    });
  }

  send(obj) {
    this.sock.write(frame(JSON.stringify(obj)));
  }

  data(d) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    if (!this.upgraded) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const status = this.buf.subarray(0, this.buf.indexOf('\r\n')).toString();
      if (!status.startsWith('HTTP/1.1 101')) {
        this.onMessage(this, { type: '_error', error: 'upgrade refused: ' + status });
        this.sock.destroy();
        return;
      }
      this.buf = this.buf.subarray(end + 4);
      this.upgraded = true;
    }
    let pos = 0;
    const b = this.buf;
    while (b.length - pos >= 2) {
      const op = b[pos] & 0x0f;
      let n = b[pos + 1] & 0x7f;
      let head = 2;
      if (n === 126) {
        if (b.length - pos < 4) break;
        n = b.readUInt16BE(pos + 2);
        head = 4;
      } else if (n === 127) {
        if (b.length - pos < 10) break;
        n = Number(b.readBigUInt64BE(pos + 2));
        head = 10;
      }
      if (b.length - pos < head + n) break;
      const payload = b.subarray(pos + head, pos + head + n);
      pos += head + n;
      if (op === 0x1) this.onMessage(this, JSON.parse(payload.toString('utf8')));
      else if (op === 0x9) this.sock.write(Buffer.concat([Buffer.from([0x8a, 0x80 | payload.length, 0, 0, 0, 0]), payload]));
      else if (op === 0x8) this.onMessage(this, { type: '_close_frame', code: n >= 2 ? payload.readUInt16BE(0) : 1005 });
    }
    this.buf = pos === b.length ? Buffer.alloc(0) : b.subarray(pos);
  }
}

function percentiles(v) {
  if (!v.length) return {};
  v.sort((a, b) => a - b);
  const at = (q) => +(1000 * v[Math.min(v.length - 1, Math.floor(q * v.length))]).toFixed(3);
  return { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1) };
}

async function main() {
  // stdin: the spec's line, then (barrier) `GO`
  const lines = [];
  const waiters = [];
  let pending = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (d) => {
    pending += d;
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (waiters.length) waiters.shift()(line);
      else lines.push(line);
    }
  });
  const nextLine = () => (lines.length ? Promise.resolve(lines.shift()) : new Promise((r) => waiters.push(r)));
  const spec = JSON.parse(await nextLine());
  const n = spec.connections;
  const inFlight = spec.in_flight || 1;
  const perMsg = spec.topics_per_message || 1;
  const tag = spec.tag || '';
  const customer = spec.customer_id;
  const errors = [];
  let connected = 0;
  let measuring = false;
  let stopping = false;
  let accepted = 0;
  let sent = 0;
  let outstanding = 0;
  const lat = [];
  let readyResolve;
  const ready = new Promise((r) => { readyResolve = r; });
  const state = [];

  const sendOne = (c) => {
    const s = state[c.i];
    const k = s.k++;
    const topics = [];
    for (let j = 0; j < perMsg; j++) topics.push(`customer_id:${customer}:storm:${tag}${c.i}-${k}-${j}`);
    s.sent.set(k, process.hrtime.bigint());
    c.send({ type: 'subscribe', topics, id: k });
    outstanding++;
    if (measuring) sent += perMsg;
  };

  const onMessage = (c, msg) => {
    const s = state[c.i];
    switch (msg.type) {
      case 'connected':
        if (++connected === n) readyResolve();
        return;
      case 'subscribed': {
        outstanding--;
        const t = s.sent.get(msg.id);
        s.sent.delete(msg.id);
        if (msg.rejected && msg.rejected.length) {
          if (errors.length < 3) errors.push('subscribe rejected: ' + JSON.stringify(msg.rejected[0]));
          return;
        }
        if (measuring) {
          accepted += msg.topics.length;
          if (t !== undefined) lat.push(Number(process.hrtime.bigint() - t) / 1e9);
        }
        if (!stopping) sendOne(c);
        return;
      }
      case '_closed':
        if (!stopping && errors.length < 3) errors.push(`connection ${c.i} closed`);
        return;
      case '_error':
      case 'error':
        if (errors.length < 3) errors.push(JSON.stringify(msg));
        return;
      default:
    }
  };

  // open the connections, a few hundred at a time
  const conns = new Array(n);
  const concurrency = spec.connect_concurrency || 200;
  for (let i = 0; i < n; i += concurrency) {
    const upto = Math.min(n, i + concurrency);
    for (let j = i; j < upto; j++) {
      state[j] = { k: 0, sent: new Map() };
      conns[j] = new Conn(spec, j, onMessage);
    }
    // wait until this slice said `connected` (or failed)
    const deadline = Date.now() + 60_000;
    while (connected < upto && errors.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    if (errors.length) break;
  }
  const t = setTimeout(() => errors.push('connect timeout'), 60_000);
  await Promise.race([ready, new Promise((r) => { const iv = setInterval(() => { if (errors.length) { clearInterval(iv); r(); } }, 50); })]);
  clearTimeout(t);
  if (errors.length) {
    process.stdout.write(JSON.stringify({ connections: connected, error: errors[0], errors }) + '\n');
    process.exit(1);
  }
  if (spec.barrier) {
    process.stdout.write(JSON.stringify({ ready: connected }) + '\n');
    await nextLine();
  }
  process.stdin.pause();
  for (const c of conns) for (let q = 0; q < inFlight; q++) sendOne(c);
  await new Promise((r) => setTimeout(r, 1000 * (spec.warmup === undefined ? 1 : spec.warmup)));
  const usage0 = selfCpu();
  const server0 = cpuOf(spec.server_pid);
  const busy0 = busyJiffies();
  const t0 = process.hrtime.bigint();
  const windowStart = Date.now() / 1000;
  measuring = true;
  await new Promise((r) => setTimeout(r, spec.duration * 1000));
  measuring = false;
  const t1 = process.hrtime.bigint();
  const usage1 = selfCpu();
  const server1 = cpuOf(spec.server_pid);
  const busy1 = busyJiffies();
  const acc = accepted;
  const snt = sent;
  stopping = true;
  const drainBy = Date.now() + 10_000;
  while (outstanding > 0 && Date.now() < drainBy) await new Promise((r) => setTimeout(r, 10));
  for (const c of conns) c.sock.destroy();
  const wall = Number(t1 - t0) / 1e9;
  const cpu = usage1 - usage0;
  // Percent of a CPU used by anything but the server and this process over the
  // window, summed over the CPUs (as the peers harness's foreign_cpu_pct).
  let busyPct = 0;
  for (const k of Object.keys(busy1)) {
    if (busy0[k]) busyPct += (100 * (busy1[k][0] - busy0[k][0])) / Math.max(1, busy1[k][1] - busy0[k][1]);
  }
  const out = {
    generator: 'node',
    connections: connected,
    in_flight: inFlight,
    subscribes_per_s: acc / wall,
    offered_per_s: snt / wall,
    accepted: acc,
    wall_s: +wall.toFixed(3),
    window_start: windowStart,
    errors: errors.slice(0, 3),
    reply_latency_ms: percentiles(lat),
    generator_cpu: +(cpu / wall).toFixed(3),
    generator_saturated: cpu / wall > 0.8,
    server_cpu: +((server1 - server0) / wall).toFixed(3),
    foreign_cpu_pct: +(busyPct - (100 * (server1 - server0)) / wall - (100 * cpu) / wall).toFixed(1),
    server_cpu_us_per_subscribe: +((1e6 * (server1 - server0)) / Math.max(1, acc)).toFixed(2),
  };
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(errors.length ? 1 : 0);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: String(e && e.stack ? e.stack : e) }) + '\n');
  process.exit(1);
});
