// A real headless browser (ENGINE: chromium or firefox, see engine.mjs) against a running
// edgestream server, over WebTransport.
// Usage: node wt_e2e.mjs HTTP_BASE TOKEN BAD_TOKEN COUNT
// Prints one JSON object per line: {"step": ...}. After "ready-for-shutdown" the caller stops
// the server; the last line is {"step":"result", ...}.
import { launch } from './engine.mjs';

const [base, token, badToken, countArg] = process.argv.slice(2);
const count = Number(countArg);
const say = (o) => console.log(JSON.stringify(o));

const browser = await launch();
try {
  const page = await browser.newPage();
  page.onConsole((text) => say({ step: 'console', text }));
  // A page served by the server itself: a secure context (127.0.0.1) with WebTransport.
  await page.goto(`${base}/healthz`);
  await page.exposeFunction('report', (o) => say(o));
  const result = await page.evaluate(async ({ base, token, badToken, count }) => {
    // --- a minimal reader of PROTOCOL.md section 2 frames ---
    const varint = (b, i) => {
      if (i >= b.length) return null;
      const len = 1 << (b[i] >> 6);
      if (i + len > b.length) return null;
      let v = b[i] & 0x3f;
      for (let k = 1; k < len; k++) v = v * 256 + b[i + k];
      return [v, i + len];
    };
    const str = (b, i) => {
      const r = varint(b, i); const [n, j] = r;
      return [new TextDecoder().decode(b.subarray(j, j + n)), j + n];
    };
    const parse = (type, body) => {
      if (type === 0x01) {
        const [org, a] = str(body, 0); const [epoch, b] = str(body, a);
        const [head, c] = varint(body, b); const [resume] = varint(body, c);
        return { t: 'subscribed', org, epoch, head, resume };
      }
      if (type === 0x02) {
        const [org, a] = str(body, 0); const [seq, b] = varint(body, a);
        const [ts, c] = varint(body, b); const [flags, d] = varint(body, c);
        return { t: 'event', org, seq, ts, flags, data: new TextDecoder().decode(body.subarray(d)) };
      }
      if (type === 0x04) {
        const [ts, a] = varint(body, 0); let [n, i] = varint(body, a); const heads = {};
        while (n-- > 0) { const [org, j] = str(body, i); const [h, k] = varint(body, j); heads[org] = h; i = k; }
        return { t: 'heartbeat', ts, heads };
      }
      return { t: 'other', type };
    };
    async function* frames(readable) {
      const reader = readable.getReader();
      let buf = new Uint8Array(0);
      for (;;) {
        for (;;) {
          const t = varint(buf, 0); if (!t) break;
          const l = varint(buf, t[1]); if (!l) break;
          if (buf.length < l[1] + l[0]) break;
          yield parse(t[0], buf.subarray(l[1], l[1] + l[0]));
          buf = buf.slice(l[1] + l[0]);
        }
        const { value, done } = await reader.read();
        if (done) return;
        const next = new Uint8Array(buf.length + value.length);
        next.set(buf); next.set(value, buf.length); buf = next;
      }
    }
    const hash = await (await fetch(`${base}/v1/cert-hash`)).json();
    const info = await (await fetch(`${base}/v1/info`)).json();
    const certHash = Uint8Array.from(atob(hash.value), (c) => c.charCodeAt(0));
    const open = (tok, extra = '') => new WebTransport(`${info.webtransport}?access_token=${tok}${extra}`, {
      serverCertificateHashes: [{ algorithm: 'sha-256', value: certHash }],
    });

    // 1. A bad token: the session closes with 4001, readable by the page.
    const bad = open(badToken);
    const badClose = await bad.closed.then((c) => c, (e) => ({ error: String(e) }));
    // An org the token does not grant: 4003.
    const forbidden = open(token, '&orgs=not-granted');
    const forbiddenClose = await forbidden.closed.then((c) => c, (e) => ({ error: String(e) }));

    // 2. A good one: SUBSCRIBED, then `count` events in order, and heartbeat datagrams.
    const wt = open(token);
    await wt.ready;
    let heartbeats = 0; let lastHeartbeat = null;
    (async () => {
      const r = wt.datagrams.readable.getReader();
      for (;;) {
        const { value, done } = await r.read(); if (done) return;
        const t = varint(value, 0); const l = varint(value, t[1]);
        const f = parse(t[0], value.subarray(l[1], l[1] + l[0]));
        if (f.t === 'heartbeat') { heartbeats++; lastHeartbeat = f; }
      }
    })().catch(() => {});
    const streams = wt.incomingUnidirectionalStreams.getReader();
    const { value: stream } = await streams.read();
    const it = frames(stream);
    const first = (await it.next()).value;
    const publish = async () => {
      for (let b = 0; b < count / 100; b++) {
        const batch = Array.from({ length: 100 }, (_, i) => ({ n: b * 100 + i }));
        const res = await fetch(`${base}/v1/orgs/acme/events`, {
          method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
          body: JSON.stringify(batch),
        });
        if (res.status !== 201) throw new Error(`publish ${res.status}`);
      }
    };
    const published = publish();
    const seqs = []; let payloadsOk = true;
    while (seqs.length < count) {
      const f = (await it.next()).value;
      if (f.t !== 'event') continue;
      seqs.push(f.seq);
      if (JSON.parse(f.data).n !== f.seq - 1) payloadsOk = false;
    }
    await published;
    const inOrder = seqs.every((s, i) => s === i + 1);
    // Wait for a heartbeat datagram (the test server sends them every 200 ms)
    // (bounded: 100 waits of 50 ms) naming the head after the last event.
    for (let i = 0; i < 100 && !(lastHeartbeat && lastHeartbeat.heads.acme === count); i++) {
      await new Promise((r) => setTimeout(r, 50));
    }

    // 3. Shutdown: the caller stops the server now; the page reads 4503.
    await window.report({ step: 'ready-for-shutdown' });
    const finalClose = await wt.closed.then((c) => c, (e) => ({ error: String(e) }));
    return { first, received: seqs.length, inOrder, payloadsOk, heartbeats, lastHeartbeat, badClose, forbiddenClose, finalClose };
  }, { base, token, badToken, count });
  say({ step: 'result', ...result });
} finally {
  await browser.close();
}
