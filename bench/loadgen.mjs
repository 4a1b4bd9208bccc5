#!/usr/bin/env node
// Load generator for the Happy Robot real-time server (docs/PROTOCOL.md, v1).
//
//   node bench/loadgen.mjs <scenario> [--option value ...]      (--help for all options)
//
// Scenarios
//   fanout       R rooms x M subscribers, P publishers per room sending TASK_UPDATE
//                events; closed loop (a bounded number in flight per publisher) or a
//                fixed total rate.  Deliveries/s, latency percentiles and CDF, loss,
//                time until presence settles after the joins, server CPU per delivery.
//   connections  N idle connections, each joined to a room; server RSS per connection.
//   handshakes   C parallel loops of connect -> CONNECTION_ESTABLISHED -> close;
//                handshakes/s and server CPU per handshake.
//   joinstorm    N connected, identified clients join one fresh room at the same
//                moment; time until every client's USER_PRESENCE lists all N.
//
// Every client sends SET_USER and then JOIN_PROJECT, as the web app does.  Server CPU
// (utime + stime of /proc/PID/stat) and RSS (/proc/PID/status) are read when
// --server-pid is given; the load generator's own CPU comes from process.cpuUsage(),
// so a result shows whether the load generator stayed below its core.
//
// The result is printed as ONE line of JSON on stdout (progress goes to stderr with
// --verbose).  Only loopback targets are accepted, and every loop is bounded both in
// count and in time; a watchdog ends the process if anything hangs.
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { createRequire } from 'node:module';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import zlib from 'node:zlib';
import WebSocket from 'ws';

const require = createRequire(import.meta.url);
let bufferutil = null;
try { bufferutil = require('bufferutil'); } catch { /* plain JS masking below */ }

// ------------------------------------------------------------------------ options
const USAGE = `usage: node loadgen.mjs <fanout|connections|handshakes|joinstorm> [options]

common
  --url URL                 target (default ws://127.0.0.1:3001/ws); loopback hosts only
  --server-pid PID          read server CPU and RSS from /proc/PID
  --duration S              measured seconds (fanout 10, handshakes 5)
  --warmup S                unmeasured seconds before the window (fanout 3, handshakes 1)
  --connect-concurrency N   connection attempts in parallel while opening (default 64)
  --client lean|ws          receiving clients: lean = small built-in RFC 6455 client
                            (default), ws = the ws package
  --pub-client lean|ws      publishing clients (default ws)
  --deflate                 clients offer permessage-deflate (lean clients ask for
                            server_no_context_takeover and inflate each message)
  --label TEXT              copied into the result
  --verbose                 progress on stderr
  --time-limit S            hard limit for the whole process (default: computed)

fanout
  --rooms R                 rooms (default 1)
  --subs M                  subscribers per room (default 200)
  --pubs P                  publishers per room (default 1); they join the room too
  --mode closed|rate        closed loop (default) or fixed rate
  --inflight K              closed: events in flight per publisher (default 32); an event
                            is in flight until every other member of its room got it
  --rate E                  rate: events per second, all publishers together (default 100)
  --size BYTES              approximate size of each event (default 256)
  --max-events N            never publish more than N events (default 2000000)
  --drain S                 after the window, wait up to S s for late deliveries (default 5)
  --quiet-ms MS             presence counts as settled once every member saw the full
                            room and no USER_PRESENCE came for MS (default 300)

connections
  --connections N           idle joined connections (default 5000)
  --rooms R                 rooms to spread them over (default N/20)
  --hold S                  seconds to hold them while sampling RSS (default 3)

handshakes
  --concurrency C           parallel loops (default 32)
  --max-handshakes N        stop after N handshakes (default 200000)

joinstorm
  --clients N               clients joining at once (default 200)
  --storms S                storms, each into a fresh room (default 3)
  --storm-timeout S         give up on a storm after S s (default 30)
`;

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: Object.fromEntries([
      'url', 'server-pid', 'duration', 'warmup', 'connect-concurrency', 'client', 'pub-client',
      'label', 'time-limit', 'rooms', 'subs', 'pubs', 'mode', 'inflight', 'rate', 'size',
      'max-events', 'drain', 'quiet-ms', 'connections', 'hold', 'concurrency', 'max-handshakes',
      'clients', 'storms', 'storm-timeout',
    ].map((k) => [k, { type: 'string' }]).concat([['verbose', { type: 'boolean' }], ['help', { type: 'boolean' }],
      ['deflate', { type: 'boolean' }]])),
  });
} catch (e) {
  process.stderr.write(`loadgen: ${e.message}\n\n${USAGE}`);
  process.exit(2);
}
const A = parsed.values;
const scenario = parsed.positionals[0];
if (A.help) { process.stdout.write(USAGE); process.exit(0); }
if (!['fanout', 'connections', 'handshakes', 'joinstorm'].includes(scenario)) {
  process.stderr.write(`loadgen: give a scenario\n\n${USAGE}`);
  process.exit(2);
}
function fail(msg) { process.stderr.write(`loadgen: ${msg}\n`); process.exit(2); }
function numOpt(name, dflt, min = 0) {
  if (A[name] === undefined) return dflt;
  const v = Number(A[name]);
  if (!Number.isFinite(v) || v < min) fail(`--${name} must be a number >= ${min}`);
  return v;
}
const hs = scenario === 'handshakes';
const O = {
  url: A.url || 'ws://127.0.0.1:3001/ws',
  serverPid: A['server-pid'] ? numOpt('server-pid', 0, 1) : null,
  duration: numOpt('duration', hs ? 5 : 10, 0.1),
  warmup: numOpt('warmup', hs ? 1 : 3),
  connectConcurrency: numOpt('connect-concurrency', 64, 1),
  client: A.client || 'lean',
  pubClient: A['pub-client'] || 'ws',
  label: A.label || '',
  verbose: !!A.verbose,
  deflate: !!A.deflate,
  rooms: A.rooms === undefined ? null : numOpt('rooms', 1, 1),
  subs: numOpt('subs', 200, 1),
  pubs: numOpt('pubs', 1, 1),
  mode: A.mode || 'closed',
  inflight: numOpt('inflight', 32, 1),
  rate: numOpt('rate', 100, 0.1),
  size: numOpt('size', 256, 0),
  maxEvents: numOpt('max-events', 2e6, 1),
  drain: numOpt('drain', 5),
  quietMs: numOpt('quiet-ms', 300),
  connections: numOpt('connections', 5000, 1),
  hold: numOpt('hold', 3),
  concurrency: numOpt('concurrency', 32, 1),
  maxHandshakes: numOpt('max-handshakes', 200000, 1),
  clients: numOpt('clients', 200, 2),
  storms: numOpt('storms', 3, 1),
  stormTimeout: numOpt('storm-timeout', 30, 1),
};
for (const k of ['client', 'pubClient']) if (!['lean', 'ws'].includes(O[k])) fail(`--${k === 'client' ? 'client' : 'pub-client'} must be lean or ws`);
if (!['closed', 'rate'].includes(O.mode)) fail('--mode must be closed or rate');

let target;
try { target = new URL(O.url); } catch { fail(`not a URL: ${O.url}`); }
if (target.protocol !== 'ws:') fail('only ws:// URLs');
const targetHost = target.hostname.replace(/^\[(.*)\]$/, '$1');
if (!(targetHost === 'localhost' || targetHost === '::1' || /^127(\.\d{1,3}){3}$/.test(targetHost))) {
  fail(`${targetHost} is not a loopback address; this tool only loads servers on this machine`);
}
const targetPort = Number(target.port || 80);
const targetPath = (target.pathname || '/') + target.search;

// ------------------------------------------------------------------------ time, logging
const nowMs = () => performance.now();
const nowUs = () => Math.round(performance.now() * 1000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
function say(...parts) { if (O.verbose) process.stderr.write(`[loadgen +${(nowMs() / 1000).toFixed(1)}s] ${parts.join(' ')}\n`); }

// ------------------------------------------------------------------------ /proc
let clockTicks = 100;
try { clockTicks = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100; } catch { /* default */ }
function serverCpuSeconds() {
  if (!O.serverPid) return null;
  try {
    const stat = fs.readFileSync(`/proc/${O.serverPid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (Number(fields[11]) + Number(fields[12])) / clockTicks;
  } catch { return null; }
}
function serverRssKb() {
  if (!O.serverPid) return null;
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${O.serverPid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch { return null; }
}
function coreJiffies() {
  const cores = [];
  try {
    for (const line of fs.readFileSync('/proc/stat', 'utf8').split('\n')) {
      const m = /^cpu(\d+)\s+(.*)$/.exec(line);
      if (!m) continue;
      const v = m[2].split(/\s+/).map(Number);
      const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
      cores[Number(m[1])] = { busy: total - v[3] - v[4], total };
    }
  } catch { /* not Linux */ }
  return cores;
}

// Measures one window: wall time, server CPU, the load generator's CPU, core business.
class Window {
  constructor() {
    this.t0 = nowMs(); this.srv0 = serverCpuSeconds(); this.self0 = process.cpuUsage(); this.cores0 = coreJiffies();
  }
  close() {
    const wall = (nowMs() - this.t0) / 1000;
    const self = process.cpuUsage(this.self0);
    const srv1 = serverCpuSeconds();
    const cores1 = coreJiffies();
    const out = {
      wall_s: +wall.toFixed(3),
      loadgen_cpu_pct: +(((self.user + self.system) / 1e6 / wall) * 100).toFixed(1),
      loadgen_cpu_s: +((self.user + self.system) / 1e6).toFixed(3),
      server_cpu_s: this.srv0 !== null && srv1 !== null ? +(srv1 - this.srv0).toFixed(2) : null,
      server_cpu_pct: this.srv0 !== null && srv1 !== null ? +(((srv1 - this.srv0) / wall) * 100).toFixed(1) : null,
      core_busy_pct: cores1.map((c, i) => {
        const c0 = this.cores0[i];
        return c0 && c.total > c0.total ? +((100 * (c.busy - c0.busy)) / (c.total - c0.total)).toFixed(1) : null;
      }),
    };
    return out;
  }
}

// ------------------------------------------------------------------------ histogram
// Microsecond values: exact below 1024 us, above that 128 buckets per power of two
// (at most 0.8 % relative error), up to about 2^31 us.
class LatencyHistogram {
  constructor() { this.buckets = new Float64Array(1024 + 21 * 128); this.count = 0; this.total = 0; this.max = 0; this.min = Infinity; }
  record(us) {
    const v = us < 0 ? 0 : us > 2e9 ? 2e9 : Math.floor(us);
    let idx;
    if (v < 1024) idx = v;
    else {
      const octave = 31 - Math.clz32(v); // >= 10
      idx = 1024 + (octave - 10) * 128 + ((v >>> (octave - 7)) - 128);
    }
    this.buckets[idx]++;
    this.count++; this.total += v;
    if (v > this.max) this.max = v;
    if (v < this.min) this.min = v;
  }
  static upper(idx) {
    if (idx < 1024) return idx;
    const k = idx - 1024, octave = 10 + (k >> 7), sub = (k & 127) + 128;
    return ((sub + 1) << (octave - 7)) - 1;
  }
  quantile(q) {
    if (!this.count) return null;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let i = 0; i < this.buckets.length; i++) {
      seen += this.buckets[i];
      if (seen >= rank) return Math.min(LatencyHistogram.upper(i), this.max);
    }
    return this.max;
  }
  summary() {
    if (!this.count) return { count: 0 };
    const ms = (us) => +(us / 1000).toFixed(3);
    return { count: this.count, mean: ms(this.total / this.count), min: ms(this.min), p50: ms(this.quantile(0.5)),
      p90: ms(this.quantile(0.9)), p99: ms(this.quantile(0.99)), p999: ms(this.quantile(0.999)), max: ms(this.max) };
  }
  // [fraction, ms] points for a CDF plot
  cdf() {
    if (!this.count) return [];
    const qs = [0];
    for (let q = 0.01; q < 0.995; q += 0.01) qs.push(+q.toFixed(2));
    qs.push(0.995, 0.999, 0.9999, 1);
    return qs.map((q) => [q, +((q === 0 ? this.min : this.quantile(q)) / 1000).toFixed(3)]);
  }
}

// ------------------------------------------------------------------------ lean client
// A small RFC 6455 client over a plain TCP socket.  All reads land in one shared
// buffer (no allocation per read, no stream events per message); a frame that spans
// reads is copied aside.  Text frames are handed over as (buffer, start, end), valid
// only during the call.  Client frames are masked with a random key (bufferutil when
// available).  It does what the benchmark needs: text, binary and continuation
// frames, ping -> pong, the close handshake.
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const DEFLATE_TAIL = Buffer.from([0x00, 0x00, 0xff, 0xff]); // RFC 7692 7.2.2
const INFLATE_OPTS = { finishFlush: zlib.constants.Z_SYNC_FLUSH };
const SHARED_READ = Buffer.allocUnsafe(1 << 18);
let readAtUs = 0; // time of the read being parsed: one clock reading per read
const ST_CONNECTING = 0, ST_OPEN = 1, ST_CLOSING = 2, ST_CLOSED = 3;

class LeanClient {
  constructor(handlers) {
    this.h = handlers; // { text(buf, start, end), open(), close(reason) }
    this.state = ST_CONNECTING;
    this.head = null; // partial HTTP response
    this.rest = null; // partial frame carried to the next read
    this.parts = null; // fragments of a message
    this.closeReason = null;
    this.key = crypto.randomBytes(16).toString('base64');
    this.sock = net.connect({
      host: targetHost, port: targetPort, noDelay: true,
      onread: { buffer: SHARED_READ, callback: (n, buf) => { this.onBytes(buf, n); } },
    });
    this.sock.on('connect', () => {
      this.sock.write(`GET ${targetPath} HTTP/1.1\r\nHost: ${target.host}\r\nUpgrade: websocket\r\n` +
        `Connection: Upgrade\r\nSec-WebSocket-Key: ${this.key}\r\nSec-WebSocket-Version: 13\r\n` +
        (O.deflate ? 'Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n' : '') +
        '\r\n');
    });
    this.sock.on('error', (e) => { this.closeReason = this.closeReason || `socket: ${e.code || e.message}`; });
    this.sock.on('close', () => {
      const was = this.state;
      this.state = ST_CLOSED;
      if (this.killTimer) clearTimeout(this.killTimer);
      if (this.h.close) this.h.close(was === ST_CLOSING ? null : (this.closeReason || 'closed by server'));
    });
  }
  onBytes(buf, n) {
    readAtUs = nowUs();
    if (this.state === ST_CONNECTING) {
      const chunk = buf.toString('latin1', 0, n);
      this.head = this.head === null ? chunk : this.head + chunk;
      const end = this.head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (this.head.length > 8192) this.abort('oversized handshake response');
        return;
      }
      const head = this.head.slice(0, end);
      const tail = Buffer.from(this.head.slice(end + 4), 'latin1');
      this.head = null;
      const status = head.slice(0, head.indexOf('\r\n'));
      if (!/^HTTP\/1\.1 101 /.test(status + ' ')) { this.abort(`handshake refused: ${status}`); return; }
      const accept = /\r\nsec-websocket-accept:[ \t]*(\S+)/i.exec(head);
      const want = crypto.createHash('sha1').update(this.key + GUID).digest('base64');
      if (!accept || accept[1] !== want) { this.abort('bad Sec-WebSocket-Accept'); return; }
      const ext = /\r\nsec-websocket-extensions:[ \t]*([^\r]*)/i.exec(head);
      if (ext && /permessage-deflate/i.test(ext[1])) {
        // Each message is inflated on its own (inflateRawSync keeps no window between
        // messages), which is only right when the server promised not to keep one.
        if (!/server_no_context_takeover/i.test(ext[1])) { this.abort('server keeps deflate context'); return; }
        this.deflated = true;
      }
      this.state = ST_OPEN;
      if (this.h.open) this.h.open();
      if (tail.length) this.parse(tail, tail.length);
      return;
    }
    this.parse(buf, n);
  }
  parse(buf, n) {
    let b = buf, len = n;
    if (this.rest !== null) { b = Buffer.concat([this.rest, buf.subarray(0, n)]); len = b.length; this.rest = null; }
    let p = 0;
    for (;;) {
      if (len - p < 2) break;
      const b0 = b[p], b1 = b[p + 1];
      let size = b1 & 0x7f, hdr = 2;
      if (size === 126) { if (len - p < 4) break; size = b.readUInt16BE(p + 2); hdr = 4; }
      else if (size === 127) { if (len - p < 10) break; size = b.readUInt32BE(p + 2) * 2 ** 32 + b.readUInt32BE(p + 6); hdr = 10; }
      if (b1 & 0x80) { this.abort('server sent a masked frame'); return; }
      if (len - p < hdr + size) break;
      const start = p + hdr, end = start + size;
      p = end;
      const op = b0 & 0x0f, fin = (b0 & 0x80) !== 0;
      if (op === 1 || op === 2 || op === 0) {
        if (!fin || this.parts !== null) {
          if (this.parts === null) this.parts = [];
          this.parts.push(Buffer.from(b.subarray(start, end)));
          if (fin) { const whole = Buffer.concat(this.parts); this.parts = null; this.h.text(whole, 0, whole.length); }
        } else if (op === 1) {
          if (b0 & 0x40 && this.deflated) {
            const whole = zlib.inflateRawSync(Buffer.concat([b.subarray(start, end), DEFLATE_TAIL]), INFLATE_OPTS);
            this.h.text(whole, 0, whole.length);
          } else this.h.text(b, start, end);
        }
      } else if (op === 9) this.frame(10, b.subarray(start, end));
      else if (op === 8) {
        if (this.state === ST_OPEN) this.frame(8, b.subarray(start, Math.min(end, start + 2)));
        this.state = ST_CLOSING;
        this.sock.end();
        return;
      }
      if (this.state === ST_CLOSED) return;
    }
    if (p < len) this.rest = Buffer.from(b.subarray(p, len)); // the shared buffer is reused
  }
  frame(op, payload) {
    const n = payload.length;
    const hdr = n < 126 ? 2 : n < 65536 ? 4 : 10;
    const out = Buffer.allocUnsafe(hdr + 4 + n);
    out[0] = 0x80 | op;
    if (hdr === 2) out[1] = 0x80 | n;
    else if (hdr === 4) { out[1] = 0x80 | 126; out.writeUInt16BE(n, 2); }
    else { out[1] = 0x80 | 127; out.writeUInt32BE(Math.floor(n / 2 ** 32), 2); out.writeUInt32BE(n >>> 0, 6); }
    const mask = crypto.randomFillSync(out, hdr, 4).subarray(hdr, hdr + 4);
    if (bufferutil && n) bufferutil.mask(payload, mask, out, hdr + 4, n);
    else for (let i = 0; i < n; i++) out[hdr + 4 + i] = payload[i] ^ mask[i & 3];
    this.sock.write(out);
  }
  send(text) { if (this.state === ST_OPEN) this.frame(1, Buffer.from(text)); }
  close(code = 1000) {
    if (this.state === ST_CONNECTING) { this.sock.destroy(); return; }
    if (this.state !== ST_OPEN) return;
    const p = Buffer.allocUnsafe(2); p.writeUInt16BE(code, 0);
    this.frame(8, p);
    this.state = ST_CLOSING;
    this.killTimer = setTimeout(() => this.sock.destroy(), 3000); // server never answered
  }
  abort(reason) { this.closeReason = reason; this.sock.destroy(); }
  get isOpen() { return this.state === ST_OPEN; }
  get closed() { return this.state === ST_CLOSED; }
}

// The same interface over the ws package (for publishers, and --client ws).
class WsClient {
  constructor(handlers) {
    this.h = handlers;
    this.closeReason = null;
    this.closing = false;
    this.ws = new WebSocket(O.url, { perMessageDeflate: O.deflate, handshakeTimeout: 10000, maxPayload: 64 << 20 });
    this.ws.on('open', () => { if (this.h.open) this.h.open(); });
    this.ws.on('message', (data) => { readAtUs = nowUs(); this.h.text(data, 0, data.length); });
    this.ws.on('error', (e) => { this.closeReason = this.closeReason || `ws: ${e.code || e.message}`; });
    this.ws.on('close', () => { if (this.h.close) this.h.close(this.closing ? null : (this.closeReason || 'closed by server')); });
  }
  send(text) { if (this.ws.readyState === 1) this.ws.send(text); }
  close(code = 1000) { this.closing = true; if (this.ws.readyState === 0) this.ws.terminate(); else this.ws.close(code); }
  get isOpen() { return this.ws.readyState === 1; }
  get closed() { return this.ws.readyState === 3; }
}
const makeClient = (kind, handlers) => (kind === 'ws' ? new WsClient(handlers) : new LeanClient(handlers));

// ------------------------------------------------------------------------ message helpers
const B = (s) => Buffer.from(s, 'latin1');
const M_ESTABLISHED = B('"CONNECTION_ESTABLISHED"');
const M_PRESENCE = B('"USER_PRESENCE"');
const M_USERCOUNT = B('"userCount":');
const M_ERROR = B('"ERROR"');
const MARK = B('"hrb"'); // our stamp inside each event's payload: "hrb":"<pub>.<seq>.<sentUs>"

// buf may be the shared read buffer, with unrelated bytes past `end`: search a view.
function has(buf, start, end, needle) {
  return buf.subarray(start, end).indexOf(needle) >= 0;
}
// Position just after the key "hrb" in buf[start, end), or -1.  A plain scan of the
// first bytes (where servers put the payload) is cheaper than a native call per message.
function findMark(buf, start, end) {
  const lim = Math.min(end, start + 200) - 4;
  for (let i = start + 1; i < lim; i++) {
    if (buf[i] === 104 && buf[i + 1] === 114 && buf[i + 2] === 98 && buf[i - 1] === 34 && buf[i + 3] === 34) return i + 4;
  }
  if (end - start <= 200) return -1;
  const j = buf.subarray(start + 190, end).indexOf(MARK);
  return j >= 0 ? start + 190 + j + 5 : -1;
}
function userCount(buf, start, end) {
  const i = buf.lastIndexOf(M_USERCOUNT, end - M_USERCOUNT.length);
  if (i < start) return -1;
  let p = i + M_USERCOUNT.length, v = 0;
  while (p < end && buf[p] === 32) p++;
  while (p < end && buf[p] >= 48 && buf[p] <= 57) { v = v * 10 + (buf[p] - 48); p++; }
  return v;
}
const setUser = (userId, name) => JSON.stringify({ type: 'SET_USER', payload: { userId, userInfo: { name, email: `${userId}@bench.invalid` } } });
const joinProject = (projectId) => JSON.stringify({ type: 'JOIN_PROJECT', projectId });

const stats = { presenceMsgs: 0, presenceBytes: 0, errorsFromServer: 0, firstServerError: null, other: 0,
  unexpectedCloses: 0, closeReasons: {} };
let shuttingDown = false;
function noteClose(reason) {
  if (reason === null || shuttingDown) return;
  stats.unexpectedCloses++;
  stats.closeReasons[reason] = (stats.closeReasons[reason] || 0) + 1;
}
let lastPresenceMs = 0;

// A member: connects, sends SET_USER then JOIN_PROJECT (when it has a room), and
// resolves once joined (its first USER_PRESENCE).  onEvent gets every other frame that
// carries our stamp; presence updates member.count.
function openMember({ userId, room, kind, onEvent, onPresence = null, timeoutMs = 30000 }) {
  return new Promise((resolve, reject) => {
    const m = { userId, room, client: null, count: 0, fullAtMs: null, joined: false, onPresence };
    let settled = false;
    const done = (err) => {
      if (settled) return;
      settled = true; clearTimeout(timer);
      if (err) { m.client.close(); reject(err); } else resolve(m);
    };
    const timer = setTimeout(() => done(new Error('join timed out')), timeoutMs);
    m.client = makeClient(kind, {
      text(buf, start, end) {
        if (onEvent) {
          const at = findMark(buf, start, end);
          if (at >= 0) { onEvent(m, buf, at, end); return; }
        }
        if (has(buf, start, end, M_PRESENCE)) {
          stats.presenceMsgs++; stats.presenceBytes += end - start; lastPresenceMs = nowMs();
          m.count = userCount(buf, start, end);
          if (m.onPresence) m.onPresence(m, buf, start, end);
          if (!m.joined) { m.joined = true; done(null); }
          return;
        }
        if (has(buf, start, Math.min(end, start + 64), M_ESTABLISHED)) {
          m.client.send(setUser(userId, `Bench User${userId.replace(/\D/g, '')}`));
          if (room !== null) m.client.send(joinProject(room));
          else { m.joined = true; done(null); }
          return;
        }
        if (has(buf, start, end, M_ERROR)) {
          stats.errorsFromServer++;
          if (!stats.firstServerError) stats.firstServerError = buf.toString('utf8', start, Math.min(end, start + 300));
          return;
        }
        stats.other++;
      },
      close(reason) { noteClose(reason); done(new Error(reason || 'closed')); },
    });
  });
}

// Opens members with bounded parallelism; returns the joined ones and the errors.
async function openMany(specs, parallel) {
  const members = [], errors = {};
  let next = 0;
  const deadline = nowMs() + 120000;
  async function lane() {
    while (next < specs.length && nowMs() < deadline) {
      const spec = specs[next++];
      try { members.push(await openMember(spec)); } catch (e) { errors[e.message] = (errors[e.message] || 0) + 1; }
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, specs.length) }, lane));
  return { members, errors };
}

async function closeMany(members, waitMs = 3000) {
  shuttingDown = true;
  for (const m of members) m.client.close(1000);
  const until = nowMs() + waitMs;
  while (nowMs() < until && members.some((m) => !m.client.closed)) await sleep(20);
  for (const m of members) if (!m.client.closed && m.client.sock) m.client.sock.destroy();
  for (const m of members) if (!m.client.closed && m.client.ws) m.client.ws.terminate();
}

// Waits until every member saw its full room in USER_PRESENCE and presence has been
// quiet for quietMs; returns ms since `sinceMs` until the last member saw its full room.
async function presenceSettled(members, roomSize, sinceMs, quietMs, timeoutMs) {
  const deadline = nowMs() + timeoutMs;
  let allFullAt = null;
  while (nowMs() < deadline) {
    if (allFullAt === null && members.every((m) => m.count >= roomSize(m))) {
      allFullAt = nowMs();
      for (const m of members) if (m.fullAtMs === null) m.fullAtMs = allFullAt; // room smaller than planned
    }
    if (allFullAt !== null && nowMs() - lastPresenceMs >= quietMs) break;
    await sleep(10);
  }
  // the moment the last member got its full list, from the members' own timestamps
  let last = null;
  for (const m of members) if (m.fullAtMs !== null && (last === null || m.fullAtMs > last)) last = m.fullAtMs;
  const settled = members.every((m) => m.count >= roomSize(m));
  return { settled, ms: settled && last !== null ? Math.round(last - sinceMs) : null };
}
function trackFull(roomSize) {
  return (m) => { if (m.fullAtMs === null && m.count >= roomSize(m)) m.fullAtMs = nowMs(); };
}

// ------------------------------------------------------------------------ fanout
async function fanout() {
  const R = O.rooms || 1, M = O.subs, P = O.pubs, closed = O.mode === 'closed';
  const rooms = Array.from({ length: R }, (_, r) => ({ id: `bench-room-${r}`, members: 0 }));
  const hist = new LatencyHistogram();
  const pubs = [];
  for (let r = 0; r < R; r++) for (let k = 0; k < P; k++) pubs.push({ idx: pubs.length, room: rooms[r], member: null,
    seq: 0, inflight: 0, ring: null, mask: 0, winFrom: Infinity, winTo: Infinity, prefix: '', suffix: '' });

  let measuring = false, delivered = 0, windowDeliveries = 0, inWindowReceived = 0, lastDeliveryMs = 0;
  let published = 0, publishing = false, refillQueued = false;
  const maxLat = { v: 0 };

  const onEvent = (member, buf, at, end) => {
    // "<pub>.<seq>.<sentUs>"
    let i = at, pub = 0, seq = 0, sent = 0, c;
    while (i < end && ((c = buf[i]) < 48 || c > 57)) i++; // :" (and any spaces)
    while ((c = buf[i]) >= 48 && c <= 57) { pub = pub * 10 + c - 48; i++; }
    i++;
    while ((c = buf[i]) >= 48 && c <= 57) { seq = seq * 10 + c - 48; i++; }
    i++;
    while ((c = buf[i]) >= 48 && c <= 57 && i < end) { sent = sent * 10 + c - 48; i++; }
    delivered++;
    lastDeliveryMs = readAtUs / 1000;
    const p = pubs[pub];
    if (p === undefined) { stats.other++; return; }
    if (measuring) { windowDeliveries++; hist.record(readAtUs - sent); }
    if (seq >= p.winFrom && seq < p.winTo) inWindowReceived++;
    if (closed && seq < p.seq && p.seq - seq <= p.mask + 1) {
      const slot = seq & p.mask;
      if (p.ring[slot] > 0 && --p.ring[slot] === 0) {
        p.inflight--;
        if (!refillQueued) { refillQueued = true; setImmediate(refill); }
      }
    }
  };

  // joins: subscribers first, then publishers (who also join, or the server refuses to relay)
  const specs = [];
  for (let r = 0; r < R; r++) for (let s = 0; s < M; s++) specs.push({ userId: `sub-${r}-${s}`, room: rooms[r].id, kind: O.client, onEvent, r });
  say(`fanout: ${R} room(s) x ${M} subscribers + ${P} publisher(s) each, ${O.mode} -> ${O.url}`);
  const roomSizeOf = new Map(rooms.map((rm) => [rm.id, M + P]));
  const roomSize = (m) => roomSizeOf.get(m.room);
  const full = trackFull(roomSize);
  for (const s of specs) s.onPresence = full;
  const joinWin = new Window();
  const t0 = nowMs();
  const subsRes = await openMany(specs, O.connectConcurrency);
  const pubRes = await openMany(pubs.map((p) => ({ userId: `pub-${p.idx}`, room: p.room.id, kind: O.pubClient, onEvent, onPresence: full })), O.connectConcurrency);
  const joinMs = Math.round(nowMs() - t0);
  const all = [...subsRes.members, ...pubRes.members];
  for (const rm of rooms) roomSizeOf.set(rm.id, 0);
  for (const m of all) roomSizeOf.set(m.room, roomSizeOf.get(m.room) + 1);
  const settle = await presenceSettled(all, roomSize, t0, O.quietMs, 60000);
  const joinUse = joinWin.close();
  say(`joined ${all.length}/${specs.length + pubs.length} in ${joinMs} ms; presence full after ${settle.ms} ms (${stats.presenceMsgs} msgs)`);
  const byUser = new Map(pubRes.members.map((m) => [m.userId, m]));
  for (const p of pubs) p.member = byUser.get(`pub-${p.idx}`) || null;
  const active = pubs.filter((p) => p.member);
  if (!active.length) throw new Error('no publisher could join');
  for (const rm of rooms) rm.members = roomSizeOf.get(rm.id);

  // events: {"type":"TASK_UPDATE","projectId":..,"payload":{"hrb":"<pub>.<seq>.<sentUs>",...},"operationId":..}
  for (const p of active) {
    p.ring = new Int32Array(1 << Math.ceil(Math.log2(O.inflight * 4)));
    p.mask = p.ring.length - 1;
    p.prefix = `{"type":"TASK_UPDATE","projectId":"${p.room.id}","payload":{"hrb":"${p.idx}.`;
    const fixed = p.prefix.length + 24 + 80;
    p.suffix = `","taskId":"task-${p.idx}","status":"in_progress","title":"${'t'.repeat(Math.max(0, O.size - fixed))}"},"operationId":"op-${p.idx}"}`;
  }
  const sample = active[0].prefix + '0.1234567890' + active[0].suffix;
  const send = (p) => {
    const s = p.seq++;
    if (closed) { const n = p.room.members - 1; p.ring[s & p.mask] = n; if (n > 0) p.inflight++; }
    published++;
    p.member.client.send(p.prefix + s + '.' + nowUs() + p.suffix);
  };
  function refill() {
    refillQueued = false;
    if (!publishing) return;
    for (const p of active) {
      while (p.inflight < O.inflight && published < O.maxEvents && p.member.client.isOpen) send(p);
    }
  }

  publishing = true;
  let timer = null, due0 = 0, scheduled = 0, rr = 0;
  if (closed) refill();
  else {
    due0 = nowMs();
    const tick = () => {
      if (!publishing) return;
      const due = Math.floor(((nowMs() - due0) * O.rate) / 1000);
      let burst = 0;
      while (scheduled < due && published < O.maxEvents && burst < 10000) {
        const p = active[rr]; rr = (rr + 1) % active.length;
        scheduled++; burst++;
        if (p.member.client.isOpen) send(p);
      }
      timer = setTimeout(tick, 1);
    };
    tick();
  }
  await sleep(O.warmup * 1000);

  // the measured window
  for (const p of active) p.winFrom = p.seq;
  const publishedBefore = published;
  const win = new Window();
  measuring = true;
  const windowStart = nowMs(), windowEnd = windowStart + O.duration * 1000;
  let stalled = false;
  lastDeliveryMs = windowStart;
  while (nowMs() < windowEnd) {
    await sleep(Math.max(1, Math.min(100, windowEnd - nowMs())));
    if (nowMs() - Math.max(lastDeliveryMs, windowStart) > 3000) { stalled = true; break; }
  }
  measuring = false;
  const use = win.close();
  for (const p of active) p.winTo = p.seq;
  publishing = false;
  if (timer) clearTimeout(timer);
  const publishedInWindow = published - publishedBefore;
  let expected = 0;
  for (const p of active) expected += (p.winTo - p.winFrom) * (p.room.members - 1);
  const drainStart = nowMs();
  while (inWindowReceived < expected && nowMs() - drainStart < O.drain * 1000) await sleep(10);
  const drainMs = Math.round(nowMs() - drainStart);
  const rssKb = serverRssKb();
  await closeMany(all);

  const perSec = (x) => Math.round(x / use.wall_s);
  return {
    scenario: 'fanout', mode: O.mode, rooms: R, subs_per_room: M, pubs_per_room: P,
    inflight_per_pub: closed ? O.inflight : null, rate_events_per_s: closed ? null : O.rate,
    event_bytes: Buffer.byteLength(sample),
    joined: all.length, wanted: specs.length + pubs.length, join_errors: { ...subsRes.errors, ...pubRes.errors },
    join_ms: joinMs, presence_settled_ms: settle.ms, presence_settled: settle.settled,
    join_presence_msgs: stats.presenceMsgs, join_server_cpu_s: joinUse.server_cpu_s,
    measure_s: use.wall_s, published: publishedInWindow, events_per_s: perSec(publishedInWindow),
    deliveries: windowDeliveries, deliveries_per_s: perSec(windowDeliveries),
    expected_deliveries: expected, lost_deliveries: Math.max(0, expected - inWindowReceived),
    loss_pct: expected ? +((100 * Math.max(0, expected - inWindowReceived)) / expected).toFixed(4) : 0,
    drain_ms: drainMs, stalled,
    latency_ms: hist.summary(), latency_cdf_ms: hist.cdf(),
    server_cpu_pct: use.server_cpu_pct, server_cpu_s: use.server_cpu_s,
    server_cpu_us_per_delivery: use.server_cpu_s !== null && windowDeliveries ? +((use.server_cpu_s * 1e6) / windowDeliveries).toFixed(3) : null,
    loadgen_cpu_pct: use.loadgen_cpu_pct,
    loadgen_cpu_us_per_delivery: windowDeliveries ? +((use.loadgen_cpu_s * 1e6) / windowDeliveries).toFixed(3) : null,
    core_busy_pct: use.core_busy_pct,
    server_rss_kb: rssKb, total_deliveries: delivered,
  };
}

// ------------------------------------------------------------------------ connections
async function connections() {
  const N = O.connections, R = O.rooms || Math.ceil(N / 20);
  await sleep(500);
  const rssBefore = serverRssKb();
  say(`connections: ${N} over ${R} rooms, server RSS before ${rssBefore} kB`);
  const sizes = new Map();
  for (let i = 0; i < N; i++) sizes.set(`idle-room-${i % R}`, (sizes.get(`idle-room-${i % R}`) || 0) + 1);
  const size = (m) => sizes.get(m.room);
  const full = trackFull(size);
  const specs = Array.from({ length: N }, (_, i) => ({ userId: `idle-${i}`, room: `idle-room-${i % R}`, kind: O.client, onPresence: full }));
  const win = new Window();
  const t0 = nowMs();
  const res = await openMany(specs, O.connectConcurrency);
  const openMs = Math.round(nowMs() - t0);
  sizes.clear();
  for (const m of res.members) sizes.set(m.room, (sizes.get(m.room) || 0) + 1);
  const settle = await presenceSettled(res.members, size, t0, O.quietMs, 30000);
  const use = win.close();
  const samples = [];
  const holdUntil = nowMs() + O.hold * 1000;
  while (nowMs() < holdUntil) { samples.push(serverRssKb()); await sleep(250); }
  const rssAfter = serverRssKb();
  const n = res.members.length;
  await closeMany(res.members, 5000);
  return {
    scenario: 'connections', connections: N, opened: n, rooms: R, open_errors: res.errors,
    open_ms: openMs, opens_per_s: Math.round(n / (openMs / 1000)), presence_settled_ms: settle.ms,
    presence_msgs: stats.presenceMsgs,
    server_rss_before_kb: rssBefore, server_rss_after_kb: rssAfter,
    server_rss_max_kb: samples.length ? Math.max(...samples.filter((x) => x !== null)) : null,
    rss_per_conn_kb: rssBefore !== null && rssAfter !== null && n ? +((rssAfter - rssBefore) / n).toFixed(2) : null,
    server_cpu_s: use.server_cpu_s, server_cpu_us_per_open: use.server_cpu_s !== null && n ? Math.round((use.server_cpu_s * 1e6) / n) : null,
    loadgen_cpu_pct: use.loadgen_cpu_pct, core_busy_pct: use.core_busy_pct,
  };
}

// ------------------------------------------------------------------------ handshakes
async function handshakes() {
  const hist = new LatencyHistogram();
  const errors = {};
  let measuring = false, counted = 0, total = 0, attempts = 0, stop = false;
  const hardStop = nowMs() + (O.warmup + O.duration + 20) * 1000;
  const once = () => new Promise((resolve) => {
    const t = nowUs();
    let greeted = false, finished = false;
    const finish = (err) => {
      if (finished) return;
      finished = true; clearTimeout(timer);
      if (err) errors[err] = (errors[err] || 0) + 1;
      resolve(!err);
    };
    const timer = setTimeout(() => { client.abort ? client.abort('timeout') : client.ws.terminate(); finish('timeout'); }, 10000);
    const client = makeClient(O.client, {
      text(buf, start, end) {
        if (greeted || !has(buf, start, end, M_ESTABLISHED)) return;
        greeted = true;
        total++;
        if (measuring) { counted++; hist.record(nowUs() - t); }
        client.close(1000);
      },
      close(reason) { finish(greeted ? null : (reason || 'closed before CONNECTION_ESTABLISHED')); },
    });
  });
  async function loop() {
    while (!stop && attempts < O.maxHandshakes && nowMs() < hardStop) {
      attempts++;
      if (!(await once())) await sleep(20);
    }
  }
  say(`handshakes: ${O.concurrency} loops -> ${O.url}`);
  const loops = Promise.all(Array.from({ length: O.concurrency }, loop));
  await sleep(O.warmup * 1000);
  const win = new Window();
  measuring = true;
  await sleep(O.duration * 1000);
  measuring = false;
  const use = win.close();
  stop = true;
  shuttingDown = true;
  await loops;
  return {
    scenario: 'handshakes', concurrency: O.concurrency, client: O.client, measure_s: use.wall_s,
    handshakes: counted, handshakes_per_s: Math.round(counted / use.wall_s), total_handshakes: total,
    errors, latency_ms: hist.summary(),
    server_cpu_pct: use.server_cpu_pct,
    server_cpu_us_per_handshake: use.server_cpu_s !== null && counted ? +((use.server_cpu_s * 1e6) / counted).toFixed(1) : null,
    loadgen_cpu_pct: use.loadgen_cpu_pct, core_busy_pct: use.core_busy_pct, server_rss_kb: serverRssKb(),
  };
}

// ------------------------------------------------------------------------ joinstorm
async function joinstorm() {
  const N = O.clients;
  // connect and identify everyone first (not timed), then join all at the same moment
  const specs = Array.from({ length: N }, (_, i) => ({ userId: `storm-${i}`, room: null, kind: O.client }));
  const res = await openMany(specs, N);
  if (res.members.length < N) throw new Error(`only ${res.members.length}/${N} clients connected: ${JSON.stringify(res.errors)}`);
  const members = res.members;
  await sleep(300);
  const storms = [];
  let lastCores = null;
  for (let s = 0; s < O.storms; s++) {
    const room = `storm-room-${s}-${process.pid}`;
    const roomBytes = Buffer.from(`"${room}"`);
    let msgs = 0, bytes = 0, fullCount = 0, validated = 0, badLists = 0;
    for (const m of members) {
      m.count = 0; m.fullAtMs = null; m.room = room;
      m.onPresence = (mm, buf, start, end) => {
        if (!has(buf, start, end, roomBytes)) return; // presence of an earlier storm's room
        msgs++; bytes += end - start;
        if (mm.fullAtMs === null && mm.count >= N) {
          mm.fullAtMs = nowMs(); fullCount++;
          // check the full list once per client: N distinct connections, all our users
          try {
            const users = JSON.parse(buf.toString('utf8', start, end)).payload.activeUsers;
            const ids = new Set(users.map((u) => u.userId));
            validated++;
            if (users.length !== N || ids.size !== N) badLists++;
          } catch { badLists++; }
        }
      };
    }
    const win = new Window();
    const t0 = nowMs();
    for (const m of members) m.client.send(joinProject(room));
    const deadline = t0 + O.stormTimeout * 1000;
    while (fullCount < N && nowMs() < deadline) await sleep(2);
    const allFull = fullCount === N;
    const settleMs = allFull ? Math.max(...members.map((m) => m.fullAtMs)) - t0 : null;
    // keep listening until presence is quiet: counts every message the storm caused
    while (nowMs() - lastPresenceMs < O.quietMs && nowMs() < deadline + 5000) await sleep(10);
    const use = win.close();
    lastCores = use.core_busy_pct;
    storms.push({ room_members: N, settled: allFull, settle_ms: settleMs !== null ? +settleMs.toFixed(1) : null,
      presence_msgs: msgs, presence_mb: +(bytes / 1048576).toFixed(2), lists_checked: validated, bad_lists: badLists,
      server_cpu_s: use.server_cpu_s, loadgen_cpu_pct: use.loadgen_cpu_pct });
    say(`storm ${s + 1}: all ${N} full after ${settleMs} ms, ${msgs} presence msgs`);
    await sleep(200);
  }
  await closeMany(members);
  const ok = storms.filter((s) => s.settled).map((s) => s.settle_ms).sort((a, b) => a - b);
  return {
    scenario: 'joinstorm', clients: N, storms,
    settle_ms: ok.length === storms.length ? ok[Math.floor(ok.length / 2)] : null,
    presence_msgs: storms[0].presence_msgs, presence_mb: storms[0].presence_mb,
    server_cpu_s: storms.map((s) => s.server_cpu_s).filter((x) => x !== null).sort((a, b) => a - b)[Math.floor(storms.length / 2)] ?? null,
    loadgen_cpu_pct: Math.max(...storms.map((s) => s.loadgen_cpu_pct)), core_busy_pct: lastCores,
  };
}

// ------------------------------------------------------------------------ main
const limitS = A['time-limit'] !== undefined ? numOpt('time-limit', 0, 1)
  : 150 + O.warmup + O.duration + O.drain + O.hold + O.storms * (O.stormTimeout + 6);
const watchdog = setTimeout(() => {
  process.stdout.write(JSON.stringify({ scenario, label: O.label, error: `time limit of ${limitS} s reached` }) + '\n');
  process.exit(3);
}, limitS * 1000);

(async () => {
  const run = { fanout, connections, handshakes, joinstorm }[scenario];
  const result = await run();
  Object.assign(result, {
    label: O.label, url: O.url, server_pid: O.serverPid,
    server_errors: stats.errorsFromServer, first_server_error: stats.firstServerError,
    unexpected_closes: stats.unexpectedCloses, close_reasons: stats.closeReasons, other_msgs: stats.other,
    node: process.version, ws_version: require('ws/package.json').version, bufferutil: !!bufferutil,
    clients: { receive: O.client, publish: O.pubClient, deflate: O.deflate },
    loadgen_rss_mb: +(process.memoryUsage().rss / 1048576).toFixed(1),
  });
  process.stdout.write(JSON.stringify(result) + '\n');
  clearTimeout(watchdog);
  process.exit(0);
})().catch((e) => {
  process.stdout.write(JSON.stringify({ scenario, label: O.label, error: String((e && e.stack) || e) }) + '\n');
  process.exit(1);
});
