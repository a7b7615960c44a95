// edgestream browser client: WebTransport first, WebSocket fallback, resume without gaps or
// duplicates, gap and dead-link detection. An ES module with no dependencies and no build step.
// Wire contract: PROTOCOL.md. Types: edgestream.d.ts.

const T = { SUBSCRIBED: 1, EVENT: 2, RESET: 3, HEARTBEAT: 4, ERROR: 5, PONG: 6, UNSUBSCRIBED: 7,
            CHAT_ACK: 8, PRESENCE: 9, SUBSCRIBE: 0x10, UNSUBSCRIBE: 0x11, REFRESH: 0x12, PING: 0x13,
            UPLOAD_PROGRESS: 0x0a, UPLOAD_DONE: 0x0b, JOIN: 0x14, LEAVE: 0x15, CHAT: 0x16,
            UPLOAD_BEGIN: 0x17 };
const RESUME = ['new', 'recovered', 'reset'];
const WT_FAILED_KEY = 'edgestream.webtransport-failed-until';
// This browser's place (0-99) in the server's --webtransport-share, kept so a client does not
// flip between transports from one connection to the next.
const BUCKET_KEY = 'edgestream.rollout-bucket';
// A session silent (no datagram, no stream byte) this many heartbeat intervals is dead.
const DEAD_AFTER_INTERVALS = 2.5;
// Liveness probes: a session silent for longer than its traffic makes usual (four mean gaps
// between receipts, at least PROBE_AFTER_MIN_MS, at most 1.25 heartbeat intervals) is sent a
// PING; no byte back within PROBE_TIMEOUT_MIN_MS (or four round trips) means dead. A node
// killed under a busy session is noticed in about half a second, not after 2.5 intervals.
const PROBE_AFTER_MIN_MS = 200;
const PROBE_TIMEOUT_MIN_MS = 400;

/** Something arrived on `conn`: the link is alive; keeps the mean gap and the probe's RTT. */
function heard(conn) {
  const now = Date.now();
  const gap = now - conn.lastSeen;
  conn.meanGap = conn.meanGap === undefined ? gap : conn.meanGap * 0.8 + gap * 0.2;
  if (conn.probeAt) {
    // The org went quiet, the link is fine: wait at least this long before the next probe,
    // so a quiet spell costs one or two probes, not one every 200 ms while the mean catches up
    // (with 10,000 subscribers of one org that is 10,000 PINGs after each burst, not 100,000).
    conn.meanGap = Math.max(conn.meanGap, gap);
    conn.rtt = now - conn.probeAt; conn.probeAt = 0;
  }
  conn.lastSeen = now;
}
const enc = new TextEncoder();
const dec = new TextDecoder();

// ---- frames (PROTOCOL.md section 2) ----
function readVarint(b, i) {
  if (i >= b.length) return null;
  const len = 1 << (b[i] >> 6);
  if (i + len > b.length) return null;
  let v = b[i] & 0x3f;
  for (let k = 1; k < len; k++) v = v * 256 + b[i + k];
  return [v, i + len];
}
function varintBytes(v) {
  if (v < 64) return [v];
  if (v < 16384) return [0x40 | (v >> 8), v & 0xff];
  if (v < 2 ** 30) return [0x80 | (v >>> 24), (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
  const hi = Math.floor(v / 2 ** 32), lo = v >>> 0;
  return [0xc0 | (hi >>> 24), (hi >>> 16) & 0xff, (hi >>> 8) & 0xff, hi & 0xff,
          lo >>> 24, (lo >>> 16) & 0xff, (lo >>> 8) & 0xff, lo & 0xff];
}
function strBytes(s) { const b = enc.encode(s); return [...varintBytes(b.length), ...b]; }
export function encodeFrame(type, parts) {
  const body = parts.flat();
  return new Uint8Array([...varintBytes(type), ...varintBytes(body.length), ...body]);
}
function readStr(b, i) {
  const r = readVarint(b, i);
  if (!r || r[1] + r[0] > b.length) throw new Error('truncated string');
  return [dec.decode(b.subarray(r[1], r[1] + r[0])), r[1] + r[0]];
}
function need(r) { if (!r) throw new Error('truncated frame'); return r; }
export function decodeBody(type, b) {
  switch (type) {
    case T.SUBSCRIBED: {
      const [org, a] = readStr(b, 0); const [epoch, c] = readStr(b, a);
      const [head, d] = need(readVarint(b, c)); const [resume] = need(readVarint(b, d));
      return { type: 'subscribed', org, epoch, head, resume: RESUME[resume] };
    }
    case T.EVENT: {
      const [org, a] = readStr(b, 0); const [seq, c] = need(readVarint(b, a));
      const [ts, d] = need(readVarint(b, c)); const [flags, e] = need(readVarint(b, d));
      return { type: 'event', org, seq, ts, flags, payload: b.subarray(e) };
    }
    case T.RESET: {
      const [org, a] = readStr(b, 0); const [epoch, c] = readStr(b, a); const [head] = need(readVarint(b, c));
      return { type: 'reset', org, epoch, head };
    }
    case T.HEARTBEAT: {
      const [ts, a] = need(readVarint(b, 0)); let [n, i] = need(readVarint(b, a)); const heads = {};
      while (n-- > 0) { const [org, j] = readStr(b, i); const [h, k] = need(readVarint(b, j)); heads[org] = h; i = k; }
      return { type: 'heartbeat', ts, heads };
    }
    case T.ERROR: { const [code, a] = need(readVarint(b, 0)); const [message] = readStr(b, a); return { type: 'error', code, message }; }
    case T.PONG: return { type: 'pong', body: b };
    case T.UNSUBSCRIBED: return { type: 'unsubscribed', org: readStr(b, 0)[0] };
    case T.CHAT_ACK: {
      const [id, a] = readStr(b, 0); const [seq] = need(readVarint(b, a));
      return { type: 'chat_ack', id, seq };
    }
    case T.UPLOAD_PROGRESS: {
      const [id, a] = readStr(b, 0); const [received, c] = need(readVarint(b, a)); const [size] = need(readVarint(b, c));
      return { type: 'upload_progress', id, received, size };
    }
    case T.UPLOAD_DONE: {
      const [id, a] = readStr(b, 0); const [size, c] = need(readVarint(b, a)); const [sha256] = readStr(b, c);
      return { type: 'upload_done', id, size, sha256 };
    }
    case T.PRESENCE: {
      const [org, a] = readStr(b, 0); const [room, c] = readStr(b, a);
      const [online, d] = need(readVarint(b, c)); let [count, i] = need(readVarint(b, d));
      const changes = [];
      while (count-- > 0) {
        const [user, j] = readStr(b, i); const [joined, k] = need(readVarint(b, j));
        changes.push({ user, joined: joined === 1 }); i = k;
      }
      return { type: 'presence', org, room, online, changes };
    }
    default: return { type: 'unknown', kind: type };
  }
}
/** Splits a byte stream into frames. */
class FrameReader {
  constructor() { this.buf = new Uint8Array(0); }
  push(chunk) {
    const next = new Uint8Array(this.buf.length + chunk.length);
    next.set(this.buf); next.set(chunk, this.buf.length); this.buf = next;
    const out = [];
    for (;;) {
      const t = readVarint(this.buf, 0); if (!t) break;
      const l = readVarint(this.buf, t[1]); if (!l) break;
      if (this.buf.length < l[1] + l[0]) break;
      out.push(decodeBody(t[0], this.buf.subarray(l[1], l[1] + l[0])));
      this.buf = this.buf.slice(l[1] + l[0]);
    }
    return out;
  }
}
function decodeOne(bytes) { const f = new FrameReader().push(bytes); return f[0]; }

/** Whether this browser can decode brotli (DecompressionStream('brotli')). */
export function brotliSupported() {
  try { new DecompressionStream('brotli'); return true; } catch { return false; }
}
async function unbrotli(bytes) {
  const s = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('brotli'));
  return new Uint8Array(await new Response(s).arrayBuffer());
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const NO_RETRY = new Set([4001, 4003]);

export class EdgeStreamClient extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.server HTTP base URL of the server
   * @param {string} o.token JWT
   * @param {string[]} [o.orgs] orgs to subscribe
   * @param {'auto'|'webtransport'|'websocket'} [o.transport]
   * @param {() => Promise<string>} [o.refreshToken] called on 4009 for a new token
   * @param {number} [o.webTransportTimeoutMs] how long a WebTransport session may take to open
   * @param {boolean} [o.presence] receive the presence of the subscribed orgs (rooms joined are
   *   heard either way)
   */
  constructor(o) {
    super();
    this.server = o.server.replace(/\/$/, '');
    this.token = o.token;
    this.wanted = new Set(o.orgs || []);
    this.rooms = new Set();          // "org\u0000room", joined again after every reconnect
    this._pendingChats = new Map();  // id -> { frame, resolve }, sent again after a reconnect
    this.mode = o.transport || 'auto';
    this.refreshToken = o.refreshToken;
    this.wtTimeout = o.webTransportTimeoutMs || 4000;
    this.wantPresence = !!o.presence;
    this._presence = new Map();      // "org\u0000room" -> { online, members: Set | null }
    this.transport = null;
    this.positions = {};
    this.stats = { connects: 0, reconnects: 0, events: 0, heartbeats: 0 };
    this._closed = false; this._conn = null; this._attempt = 0; this._wake = null;
  }

  _status(state, reason) {
    this.dispatchEvent(new CustomEvent('status', { detail: { state, transport: this.transport, reason } }));
  }

  /** Connects (and keeps reconnecting until close()). Resolves once the first session is up. */
  async connect() {
    this._closed = false;
    return new Promise((resolve, reject) => { this._firstUp = resolve; this._firstFail = reject; this._loop(); });
  }

  async _loop() {
    while (!this._closed) {
      let outcome;
      try {
        outcome = await this._session();
      } catch (e) {
        outcome = { code: 0, reason: String(e && e.message || e) };
      }
      if (this._closed) break;
      const { code, reason } = outcome;
      if (NO_RETRY.has(code)) {
        this._status('failed', `${code} ${reason}`);
        if (this._firstFail) { this._firstFail(new Error(`${code} ${reason}`)); this._firstFail = null; }
        this._closed = true;
        return;
      }
      let delay;
      if (code === 4503) delay = Math.random() * 500; // draining: at once, with jitter
      else if (code === 4009 && this.refreshToken) {
        try { this.token = await this.refreshToken(); } catch { /* retry with backoff */ }
        delay = 0;
      } else if (outcome.up) delay = Math.random() * 250; // a session that was up: retry quickly
      else delay = Math.min(30000, 500 * 2 ** this._attempt) * (0.5 + Math.random() / 2);
      if (!outcome.up) this._attempt++; else this._attempt = 0;
      this._status('reconnecting', `${code || ''} ${reason}`.trim());
      this.stats.reconnects++;
      await new Promise((r) => { this._wake = r; setTimeout(r, delay); });
    }
    this._status('closed', 'closed by the application');
  }

  _query(format, fallback) {
    const p = new URLSearchParams();
    p.set('access_token', this.token);
    p.set('orgs', [...this.wanted].join(','));
    const since = [];
    for (const org of this.wanted) {
      const pos = this.positions[org];
      if (pos) since.push(`${org}:${pos.epoch}:${pos.seq}`);
    }
    if (since.length) p.set('since', since.join(','));
    if (brotliSupported()) p.set('enc', 'br');
    if (format) p.set('format', format);
    if (this.wantPresence) p.set('presence', '1');
    if (fallback) p.set('fallback', fallback);
    return p.toString();
  }

  /** This browser's rollout bucket, 0-99 (stable across page loads when storage allows). */
  _bucket() {
    try {
      let b = localStorage.getItem(BUCKET_KEY);
      if (b === null) { b = String(Math.floor(Math.random() * 100)); localStorage.setItem(BUCKET_KEY, b); }
      return Number(b);
    } catch {
      return this._ephemeralBucket ??= Math.floor(Math.random() * 100);
    }
  }

  _wtRemembered() {
    try { return Number(localStorage.getItem(WT_FAILED_KEY) || 0) > Date.now(); } catch { return false; }
  }
  _rememberWtFailure() {
    try { localStorage.setItem(WT_FAILED_KEY, String(Date.now() + 5 * 60 * 1000)); } catch { /* private mode */ }
  }

  /** One session; resolves with its close code and reason when it ends. */
  async _session() {
    const info = await (await fetch(`${this.server}/v1/info`)).json();
    this.heartbeatMs = info.heartbeat_ms || 5000;
    this.stats.connects++;
    // Why WebTransport is not used (`fallback`: the reason's code, sent to the server).
    let why = ''; let fallback = '';
    const wtWanted = this.mode !== 'websocket';
    const share = info.webtransport_share ?? 100;
    if (wtWanted && typeof WebTransport === 'undefined') {
      why = 'WebTransport not available in this browser'; fallback = 'unsupported';
    } else if (this.mode === 'auto' && this._wtRemembered()) {
      why = 'WebTransport failed recently'; fallback = 'remembered';
    } else if (this.mode === 'auto' && this._bucket() >= share) {
      why = `not in the server's WebTransport share (${share}%)`; fallback = 'share';
    }
    if (wtWanted && !why) {
      try {
        return await this._webtransport(info);
      } catch (e) {
        if (e && e.sessionClose) return e.sessionClose;
        why = `WebTransport failed: ${e && e.message || e}`;
        fallback = (e && e.fallback) || 'refused';
        this._rememberWtFailure();
        if (this.mode === 'webtransport') throw e;
      }
    }
    if (this.mode === 'webtransport') throw new Error(why);
    return this._websocket(info, why, fallback);
  }

  _up(transport, reason) {
    this.transport = transport;
    this._attempt = 0;
    this._status('connected', reason || `connected over ${transport}`);
    if (this._firstUp) { this._firstUp(); this._firstUp = null; this._firstFail = null; }
  }

  async _webtransport(info) {
    const opts = {};
    if (info.cert_hash) {
      const value = Uint8Array.from(atob(info.cert_hash.value), (c) => c.charCodeAt(0));
      opts.serverCertificateHashes = [{ algorithm: 'sha-256', value }];
    }
    const wt = new WebTransport(`${info.webtransport}?${this._query()}`, opts);
    let timer;
    const timeout = new Promise((_, rej) => {
      timer = setTimeout(() => rej(Object.assign(new Error('timed out'), { fallback: 'timeout' })), this.wtTimeout);
    });
    try {
      await Promise.race([wt.ready, timeout]);
    } catch (e) {
      clearTimeout(timer);
      // Refused after the handshake (a close code): not a transport failure.
      const c = await Promise.race([wt.closed.then((x) => x, () => null), sleep(50).then(() => null)]);
      try { wt.close(); } catch { /* already closed */ }
      if (c && c.closeCode) throw { sessionClose: { code: c.closeCode, reason: c.reason, up: false } };
      throw e;
    }
    clearTimeout(timer);
    // The control stream: opened once, on first use (concurrent sends share it), and read for
    // the answers that travel on it (CHAT_ACK, the member list of JOIN, ERROR, PONG).
    let control = null;
    const openControl = () => control ??= (async () => {
      const s = await wt.createBidirectionalStream();
      (async () => {
        const fr = new FrameReader(); const sr = s.readable.getReader();
        for (;;) {
          const { value: chunk, done: fin } = await sr.read(); if (fin) return;
          for (const f of fr.push(chunk)) await this._frame(f, conn);
        }
      })().catch(() => {});
      return s.writable.getWriter();
    })();
    const conn = {
      kind: 'webtransport',
      send: async (bytes) => { const w = await openControl(); await w.write(bytes); },
      // Uploads go on later bidirectional streams, after the control stream.
      openUpload: async () => { await openControl(); return wt.createBidirectionalStream(); },
      drop: () => { try { wt.close({ closeCode: 0, reason: 'client reconnect' }); } catch { /* closed */ } },
      // Liveness probes go as PING datagrams (answered with PONG datagrams).
      probe: (bytes) => {
        conn.datagramWriter ??= wt.datagrams.writable.getWriter();
        conn.datagramWriter.write(bytes).catch(() => {});
      },
    };
    this._conn = conn;
    conn.onFirstFrame = () => this._up('webtransport');
    // A session that opens but delivers nothing (no frame within the WebTransport timeout:
    // a stalled flow-control window) is a WebTransport failure: fall back, and remember it.
    conn.stallAfter = Date.now() + Math.max(this.wtTimeout, DEAD_AFTER_INTERVALS * this.heartbeatMs);
    const done = this._watch(conn);
    (async () => {
      const r = wt.incomingUnidirectionalStreams.getReader();
      for (;;) {
        const { value, done: end } = await r.read(); if (end) return;
        (async () => {
          const fr = new FrameReader(); const sr = value.getReader();
          for (;;) {
            const { value: chunk, done: fin } = await sr.read(); if (fin) return;
            heard(conn);
            for (const f of fr.push(chunk)) await this._frame(f, conn);
          }
        })().catch(() => {});
      }
    })().catch(() => {});
    (async () => {
      const r = wt.datagrams.readable.getReader();
      for (;;) {
        const { value, done: end } = await r.read(); if (end) return;
        heard(conn);
        const f = decodeOne(value); if (f) await this._frame(f, conn);
      }
    })().catch(() => {});
    const closed = await Promise.race([wt.closed.then((c) => c, (e) => ({ closeCode: 0, reason: String(e) })), done]);
    conn.dead = true;
    try { wt.close(); } catch { /* closed */ }
    if (conn.stalled) throw Object.assign(new Error('the session delivered nothing'), { fallback: 'stalled' });
    // Sessions that keep falling behind the heads the heartbeats announce (a window that
    // delivers some bytes, then stops) count as stalled from the second in a row.
    this._wtGaps = closed.gap ? (this._wtGaps || 0) + 1 : 0;
    if (this._wtGaps >= 2) {
      this._wtGaps = 0;
      throw Object.assign(new Error('the session fell behind twice in a row'), { fallback: 'stalled' });
    }
    return { code: closed.closeCode || 0, reason: closed.reason || 'connection lost', up: !!conn.up };
  }

  async _websocket(info, why, fallback) {
    const ws = new WebSocket(`${info.websocket}?${this._query('bin', fallback)}`);
    ws.binaryType = 'arraybuffer';
    const conn = {
      kind: 'websocket',
      send: async (bytes) => ws.send(bytes),
      drop: () => { try { ws.close(1000, 'client reconnect'); } catch { /* closed */ } },
      probe: (bytes) => { try { ws.send(bytes); } catch { /* closing */ } },
    };
    let queue = Promise.resolve();
    const closed = new Promise((resolve) => {
      ws.onopen = () => { this._conn = conn; };
      conn.onFirstFrame = () => this._up('websocket', why || 'connected over websocket');
      ws.onmessage = (m) => {
        heard(conn);
        const f = decodeOne(new Uint8Array(m.data));
        if (f) queue = queue.then(() => this._frame(f, conn)); // keep order across async decoding
      };
      ws.onclose = (c) => resolve({ code: c.code, reason: c.reason || 'connection lost' });
      ws.onerror = () => {};
    });
    const done = this._watch(conn);
    const r = await Promise.race([closed, done]);
    conn.dead = true;
    try { ws.close(); } catch { /* closed */ }
    await queue;
    return { ...r, up: !!conn.up };
  }

  /** Dead-link and gap detection; resolves when the connection must be dropped. */
  _watch(conn) {
    conn.lastHeartbeat = conn.lastSeen = Date.now();
    conn.gapSince = {};
    conn.presenceSeen = new Set();   // groups whose snapshot came on this connection
    return new Promise((resolve) => {
      const every = Math.min(50, this.heartbeatMs / 4);
      const t = setInterval(() => {
        if (conn.dead) { clearInterval(t); return; }
        const now = Date.now();
        let reason = null; let gap = false;
        // Jittered per connection, so the subscribers of one org do not probe in step.
        conn.jitter ??= 1 + Math.random() / 4;
        const probeAfter = Math.min(1.25 * this.heartbeatMs,
          conn.jitter * Math.max(PROBE_AFTER_MIN_MS, 4 * (conn.meanGap ?? this.heartbeatMs)));
        if (conn.up && !conn.probeAt && now - conn.lastSeen > probeAfter) {
          conn.probeAt = now;
          conn.probe(encodeFrame(T.PING, [enc.encode('live?')]));
        }
        if (conn.probeAt && now - conn.probeAt > Math.max(PROBE_TIMEOUT_MIN_MS, 4 * (conn.rtt ?? 50))) {
          reason = 'no answer to a liveness probe';
        }
        // Anything the server sent proves the link: a heartbeat datagram, a stream byte, a
        // WebSocket message. Silence for 2.5 intervals: dead; resume elsewhere at once.
        if (now - conn.lastSeen > DEAD_AFTER_INTERVALS * this.heartbeatMs) {
          reason = `nothing received for ${DEAD_AFTER_INTERVALS} heartbeat intervals`;
        }
        for (const [org, since] of Object.entries(conn.gapSince)) {
          if (now - since > this.heartbeatMs) { reason = `gap in ${org}`; gap = true; }
        }
        if (!conn.up && conn.stallAfter && now > conn.stallAfter) {
          conn.stalled = true;
          reason = 'the WebTransport session delivered nothing';
        }
        if (conn.forced) reason = conn.forced;
        if (reason) { clearInterval(t); conn.drop(); resolve({ code: 0, reason, up: !!conn.up, gap }); }
      }, every);
    });
  }

  async _frame(f, conn) {
    // The session counts as up once the server speaks: authentication happens after the
    // transport opens, so an open that ends in 4001 never reports "connected".
    if (conn.onFirstFrame) {
      const up = conn.onFirstFrame; conn.onFirstFrame = null; conn.up = true; up();
      // Rooms and unacknowledged chat messages carry over to the new session; a chat sent
      // twice is acknowledged once with its first seq (the server dedupes by id).
      for (const k of this.rooms) {
        const [org, room] = k.split('\u0000');
        conn.send(encodeFrame(T.JOIN, [strBytes(org), strBytes(room)])).catch(() => {});
      }
      for (const p of this._pendingChats.values()) conn.send(p.frame).catch(() => {});
    }
    switch (f.type) {
      case 'subscribed': {
        const pos = this.positions[f.org];
        if (f.resume !== 'recovered' || !pos || pos.epoch !== f.epoch) {
          if (f.resume === 'reset' || (pos && pos.epoch !== f.epoch)) {
            this.dispatchEvent(new CustomEvent('reset', { detail: { org: f.org, epoch: f.epoch, head: f.head } }));
          }
          this.positions[f.org] = { epoch: f.epoch, seq: f.head };
        }
        break;
      }
      case 'event': {
        const pos = this.positions[f.org];
        if (!pos || f.seq <= pos.seq) return; // at most once
        if (f.seq !== pos.seq + 1) { conn.forced = `gap in ${f.org}`; return; }
        const bytes = f.flags & 1 ? await unbrotli(f.payload) : f.payload;
        if (conn.dead && this._conn !== conn) return;
        if (f.seq !== this.positions[f.org].seq + 1) return;
        this.positions[f.org] = { epoch: pos.epoch, seq: f.seq };
        delete conn.gapSince[f.org];
        this.stats.events++;
        this.dispatchEvent(new CustomEvent('event', { detail: { org: f.org, seq: f.seq, ts: f.ts, data: JSON.parse(dec.decode(bytes)) } }));
        break;
      }
      case 'reset':
        this.positions[f.org] = { epoch: f.epoch, seq: f.head };
        this.dispatchEvent(new CustomEvent('reset', { detail: { org: f.org, epoch: f.epoch, head: f.head } }));
        break;
      case 'heartbeat': {
        conn.lastHeartbeat = Date.now();
        this.stats.heartbeats++;
        for (const [org, head] of Object.entries(f.heads)) {
          const pos = this.positions[org];
          if (pos && head > pos.seq) conn.gapSince[org] ??= Date.now();
          else delete conn.gapSince[org];
        }
        this.dispatchEvent(new CustomEvent('heartbeat', { detail: { ts: f.ts, heads: f.heads } }));
        break;
      }
      case 'error':
        this.dispatchEvent(new CustomEvent('error', { detail: { code: f.code, message: f.message } }));
        break;
      case 'chat_ack': {
        const p = this._pendingChats.get(f.id);
        if (p) { this._pendingChats.delete(f.id); p.resolve(f.seq); }
        break;
      }
      case 'presence': {
        // The first frame of a group on a connection is its snapshot: it replaces what the
        // previous connection told. A frame listing nobody is a count (above the server's
        // member limit) or an empty group: the list is unknown (null) or empty.
        const key = `${f.org}\u0000${f.room}`;
        const snapshot = !conn.presenceSeen || !conn.presenceSeen.has(key);
        if (conn.presenceSeen) conn.presenceSeen.add(key);
        let g = this._presence.get(key);
        if (!g || snapshot) { g = { online: 0, members: new Set() }; this._presence.set(key, g); }
        g.online = f.online;
        if (f.changes.length === 0) g.members = f.online > 0 ? null : new Set();
        else {
          if (!g.members) g.members = new Set();
          for (const c of f.changes) { if (c.joined) g.members.add(c.user); else g.members.delete(c.user); }
        }
        this.dispatchEvent(new CustomEvent('presence', { detail: {
          org: f.org, room: f.room, online: f.online, changes: f.changes, snapshot,
          members: g.members ? [...g.members].sort() : null,
        } }));
        break;
      }
      default:
    }
  }

  /** Replaces the token: sent as REFRESH now, used for every later connection. */
  setToken(token) {
    this.token = token;
    if (this._conn && !this._conn.dead) this._conn.send(encodeFrame(T.REFRESH, [strBytes(token)])).catch(() => {});
  }

  /** Subscribes to one more org (resuming from its last position, if any). */
  subscribe(org) {
    this.wanted.add(org);
    const pos = this.positions[org];
    const f = encodeFrame(T.SUBSCRIBE, [strBytes(org), strBytes(pos ? pos.epoch : ''), varintBytes(pos ? pos.seq : 0)]);
    if (this._conn && !this._conn.dead) this._conn.send(f).catch(() => {});
  }

  /** Stops receiving an org. */
  /**
   * Who is present in an org (room '') or a room, as the server's frames told it:
   * `{ online, members }`, `members` sorted, or null above the server's member limit; null
   * when nothing was heard of the group.
   */
  members(org, room = '') {
    const g = this._presence.get(`${org}\u0000${room}`);
    return g ? { online: g.online, members: g.members ? [...g.members].sort() : null } : null;
  }

  unsubscribe(org) {
    this.wanted.delete(org);
    this._presence.delete(`${org}\u0000`);
    if (this._conn && !this._conn.dead) this._conn.send(encodeFrame(T.UNSUBSCRIBE, [strBytes(org)])).catch(() => {});
  }

  /** Joins a room of an org (PROTOCOL.md section 8); kept across reconnects. */
  join(org, room) {
    this.rooms.add(`${org}\u0000${room}`);
    if (this._conn && !this._conn.dead && this._conn.up) {
      this._conn.send(encodeFrame(T.JOIN, [strBytes(org), strBytes(room)])).catch(() => {});
    }
  }

  /** Leaves a room. */
  leave(org, room) {
    this.rooms.delete(`${org}\u0000${room}`);
    this._presence.delete(`${org}\u0000${room}`);
    if (this._conn && !this._conn.dead && this._conn.up) {
      this._conn.send(encodeFrame(T.LEAVE, [strBytes(org), strBytes(room)])).catch(() => {});
    }
  }

  /**
   * Sends a chat message (any JSON value) to a room; resolves with its seq in the org once the
   * server has stored it, rejects after `timeoutMs` without an acknowledgement (a refusal
   * arrives as an `error` event).
   */
  chat(org, room, body, timeoutMs = 10000) {
    const id = crypto.randomUUID();
    const frame = encodeFrame(T.CHAT, [strBytes(org), strBytes(room), strBytes(id), [...enc.encode(JSON.stringify(body))]]);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this._pendingChats.delete(id); reject(new Error('no CHAT_ACK in time')); }, timeoutMs);
      this._pendingChats.set(id, { frame, resolve: (seq) => { clearTimeout(timer); resolve(seq); } });
      if (this._conn && !this._conn.dead && this._conn.up) this._conn.send(frame).catch(() => {});
    });
  }

  /**
   * Uploads a File or Blob to an org (PROTOCOL.md section 9): over a WebTransport stream when
   * connected through it, over HTTP (PUT, with upload progress) otherwise. `onProgress(received,
   * size)` follows the bytes the server has stored. Resolves with `{id, size, sha256}`.
   */
  async upload(org, file, { onProgress } = {}) {
    const name = file.name || 'upload';
    const conn = this._conn;
    if (conn && !conn.dead && conn.up && conn.openUpload) {
      const s = await conn.openUpload();
      const w = s.writable.getWriter();
      await w.write(encodeFrame(T.UPLOAD_BEGIN, [strBytes(org), strBytes(name), varintBytes(file.size),
        strBytes(file.type || ''), strBytes(''), varintBytes(0)]));
      const answers = (async () => {
        const fr = new FrameReader(); const sr = s.readable.getReader();
        for (;;) {
          const { value, done } = await sr.read();
          if (done) throw new Error('the upload stream ended without UPLOAD_DONE');
          for (const f of fr.push(value)) {
            if (f.type === 'upload_progress' && onProgress) onProgress(f.received, f.size);
            if (f.type === 'upload_done') { if (onProgress) onProgress(f.size, f.size); return { id: f.id, size: f.size, sha256: f.sha256 }; }
            if (f.type === 'error') throw new Error(`upload refused (${f.code}): ${f.message}`);
          }
        }
      })();
      const r = file.stream().getReader();
      for (;;) { const { value, done } = await r.read(); if (done) break; await w.write(value); }
      await w.close();
      return answers;
    }
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open('PUT', `${this.server}/v1/orgs/${encodeURIComponent(org)}/uploads?name=${encodeURIComponent(name)}`);
      xhr.setRequestHeader('authorization', `Bearer ${this.token}`);
      xhr.upload.onprogress = (e) => { if (onProgress) onProgress(e.loaded, e.total || file.size); };
      xhr.onload = () => {
        let body = {}; try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
        if (xhr.status === 201) resolve({ id: body.id, size: body.size, sha256: body.sha256 });
        else reject(new Error(`upload refused (${xhr.status}): ${body.error || xhr.statusText}`));
      };
      xhr.onerror = () => reject(new Error('upload failed'));
      xhr.send(file);
    });
  }

  /** Drops the current connection and reconnects with `since` (the demo's resume button). */
  reconnect() {
    if (this._conn && !this._conn.dead) this._conn.forced = 'reconnect requested';
  }

  /** Closes for good: no more reconnects. */
  close() {
    this._closed = true;
    if (this._conn) this._conn.drop();
    if (this._wake) this._wake();
  }
}
