// The client package against a real edgestream server over WebSocket (Node's global
// WebSocket; Node 20 needs --experimental-websocket). The server is given by EDGESTREAM_URL:
// a development-mode node (tokens from /v1/dev/token, heartbeat 1 s), started by
// tests/client_package.rs, which runs these in `scripts/test-all`.
//
// Node has no WebTransport: in auto mode the client falls back by itself ("unsupported"). The
// stalled-session test gives it a stand-in WebTransport whose session opens and delivers
// nothing, the failure a browser meets when a flow-control window never refills.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EdgeStreamClient } from '../edgestream.js';

const base = process.env.EDGESTREAM_URL;
assert.ok(base, 'EDGESTREAM_URL names the server');

// Node has no localStorage; the client remembers WebTransport failures and its rollout bucket
// there when it can.
const store = new Map();
globalThis.localStorage = {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const LIMIT_MS = 30_000;

async function until(what, cond) {
  const deadline = Date.now() + LIMIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

async function token(org, sub = 'node') {
  const r = await fetch(`${base}/v1/dev/token?sub=${sub}&orgs=${org}`);
  return (await r.json()).token;
}

async function publish(tok, org, from, to) {
  const batch = [];
  for (let n = from; n < to; n++) batch.push({ n });
  const r = await fetch(`${base}/v1/orgs/${org}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${tok}` },
    body: JSON.stringify(batch),
  });
  assert.equal(r.status, 201, await r.text());
}

/// A client of `org` that records its events, resets and statuses.
function client(tok, org, opts = {}) {
  const c = new EdgeStreamClient({ server: base, token: tok, orgs: [org], ...opts });
  const seen = { events: [], resets: [], statuses: [] };
  c.addEventListener('event', (e) => seen.events.push(e.detail));
  c.addEventListener('reset', (e) => seen.resets.push(e.detail));
  c.addEventListener('status', (e) => seen.statuses.push(e.detail));
  return { c, seen };
}

const seqs = (seen) => seen.events.map((e) => e.seq);
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

async function metrics() {
  return (await fetch(`${base}/metrics`)).text();
}

test('events arrive in order, and exactly once across reconnect()', async () => {
  const org = 'order';
  const tok = await token(org);
  const { c, seen } = client(tok, org, { transport: 'websocket' });
  await c.connect();
  assert.equal(c.transport, 'websocket');
  await publish(tok, org, 0, 200);
  await until('200 events', () => seen.events.length >= 200);
  c.reconnect();
  const more = publish(tok, org, 200, 300);
  await until('a reconnect', () => c.stats.reconnects >= 1);
  await more;
  await until('300 events', () => seen.events.length >= 300);
  await sleep(200);
  c.close();
  assert.deepEqual(seqs(seen), range(1, 300), 'no gap, no duplicate');
  assert.ok(seen.events.every((e, i) => e.data.n === i), 'payloads in order');
  assert.equal(seen.resets.length, 0);
});

test('a position from another epoch is reset to the head, and events after it follow', async () => {
  const org = 'reset';
  const tok = await token(org);
  await publish(tok, org, 0, 5);
  const { c, seen } = client(tok, org, { transport: 'websocket' });
  c.positions[org] = { epoch: 'gone-epoch', seq: 3 };
  await c.connect();
  await until('the reset', () => seen.resets.length >= 1);
  assert.notEqual(seen.resets[0].epoch, 'gone-epoch');
  assert.equal(seen.resets[0].head, 5);
  await publish(tok, org, 5, 8);
  await until('3 events', () => seen.events.length >= 3);
  c.close();
  assert.equal(seen.resets.length, 1, 'the server said reset once');
  assert.deepEqual(seqs(seen), range(6, 8), 'the events after the head, none before');
  assert.equal(c.positions[org].epoch, seen.resets[0].epoch);
});

test('auto mode without WebTransport uses WebSocket and says why', async () => {
  const org = 'auto';
  const tok = await token(org);
  assert.equal(typeof globalThis.WebTransport, 'undefined');
  const { c, seen } = client(tok, org);
  await c.connect();
  await publish(tok, org, 0, 10);
  await until('10 events', () => seen.events.length >= 10);
  c.close();
  assert.equal(c.transport, 'websocket');
  assert.match(seen.statuses[0].reason, /not available/);
  assert.match(await metrics(), /sessions_by_client_total\{transport="websocket",fallback="unsupported",engine="[a-z]+"\} [1-9]/);
});

test('a WebTransport session that opens and delivers nothing falls back, and is remembered', async () => {
  const org = 'stalled';
  const tok = await token(org);
  let opened = 0;
  // Stand-in for a browser's WebTransport whose session opens and then never delivers a byte.
  globalThis.WebTransport = class {
    constructor() {
      opened++;
      this.ready = Promise.resolve();
      this.closed = new Promise((resolve) => { this._close = resolve; });
      const silent = new ReadableStream({ start() {} });
      this.incomingUnidirectionalStreams = silent;
      this.datagrams = { readable: new ReadableStream({ start() {} }) };
    }
    close() { this._close({ closeCode: 0, reason: 'closed by the client' }); }
    async createBidirectionalStream() { throw new Error('not in this stand-in'); }
  };
  try {
    const { c, seen } = client(tok, org, { webTransportTimeoutMs: 300 });
    await c.connect();
    assert.equal(c.transport, 'websocket');
    assert.equal(opened, 1);
    assert.match(seen.statuses.find((s) => s.state === 'connected').reason, /delivered nothing/);
    await publish(tok, org, 0, 3);
    await until('3 events', () => seen.events.length >= 3);
    c.close();
    // The next client goes straight to WebSocket: the failure is remembered.
    const second = client(tok, org);
    await second.c.connect();
    assert.equal(second.c.transport, 'websocket');
    assert.equal(opened, 1, 'no second WebTransport attempt');
    second.c.close();
    const m = await metrics();
    assert.match(m, /sessions_by_client_total\{transport="websocket",fallback="stalled",engine="[a-z]+"\} 1/);
    assert.match(m, /sessions_by_client_total\{transport="websocket",fallback="remembered",engine="[a-z]+"\} [1-9]/);
  } finally {
    delete globalThis.WebTransport;
    store.clear();
  }
});
