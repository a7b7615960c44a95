// A real headless browser (ENGINE: chromium or firefox, see engine.mjs) running /edgestream.js
// (the browser client) against a running server.
// Usage: node client_e2e.mjs SCENARIO HTTP_BASE [TOKEN]
// Scenarios: auto, no-webtransport, disable-quic, unreachable-quic, drop, bad-token, refresh,
// restart, demo, chat.
// Prints JSON lines {"step": ...}; "kill" asks the caller to kill and restart the server; the
// last line is {"step":"result", ...}.
import { mkdirSync } from 'node:fs';
import { launch, engine } from './engine.mjs';

const [scenario, base, tokenArg] = process.argv.slice(2);
const say = (o) => console.log(JSON.stringify(o));
// --disable-quic forces the fallback on purpose (Chromium only).
const chromiumArgs = scenario === 'disable-quic' ? ['--disable-quic'] : [];

const browser = await launch({ chromiumArgs });
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
  page.onConsole((text) => say({ step: 'console', text }));
  await page.exposeFunction('report', (o) => say(o));
  if (scenario === 'demo') {
    await page.goto(`${base}/`);
    await page.click('#connect');
    await page.waitForFunction(() => document.getElementById('transport').textContent === 'webtransport');
    for (let i = 0; i < 5; i++) {
      await page.fill('#pbody', JSON.stringify({ hello: 'world', n: i }));
      await page.click('#publish');
      await page.waitForFunction((n) => Number(document.getElementById('count').textContent) >= n, i + 1);
    }
    await page.waitForFunction(() => Number(document.getElementById('hb').textContent) >= 1);
    // Chat in a room and upload a file from the page.
    await page.click('#join');
    await page.waitForFunction(() => document.getElementById('online').textContent.includes('demo'));
    await page.waitForFunction(() => document.getElementById('orgonline').textContent.includes('demo'));
    await page.click('#send');
    await page.waitForFunction(() => document.getElementById('chatlog').children.length >= 1);
    await page.setInputFile('#file', { name: 'report.bin', buffer: Buffer.alloc(300 * 1024, 'a') });
    await page.click('#uploadbtn');
    await page.waitForFunction(() => document.getElementById('uresult').textContent.includes('sha256'));
    mkdirSync(process.env.ARTIFACTS || 'test-artifacts', { recursive: true });
    const path = `${process.env.ARTIFACTS || 'test-artifacts'}/demo-${engine}.png`;
    await page.screenshot({ path, fullPage: true });
    const shown = await page.evaluate(() => ({
      transport: document.getElementById('transport').textContent,
      count: Number(document.getElementById('count').textContent),
      rows: document.querySelectorAll('#events tr').length,
      chat: [...document.querySelectorAll('#chatlog li')].map((li) => li.textContent),
      online: document.getElementById('online').textContent,
      orgOnline: document.getElementById('orgonline').textContent,
      upload: document.getElementById('uresult').textContent,
      progress: Number(document.getElementById('uprogress').value),
    }));
    say({ step: 'result', screenshot: path, ...shown });
  } else {
    await page.goto(`${base}/healthz`);
    const result = await page.evaluate(async ({ scenario, base, tokenArg }) => {
      const { EdgeStreamClient, brotliSupported } = await import('/edgestream.js');
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      const until = async (cond, ms = 30000) => {
        const end = Date.now() + ms;
        while (!cond()) { if (Date.now() > end) throw new Error('timed out waiting'); await sleep(20); }
      };
      const token = tokenArg || (await (await fetch(`${base}/v1/dev/token?sub=alice&orgs=acme&scope=subscribe%20publish`)).json()).token;
      const publish = async (from, n) => {
        for (let b = from; b < from + n; b += 100) {
          const batch = Array.from({ length: Math.min(100, from + n - b) }, (_, i) => ({ n: b + i }));
          const r = await fetch(`${base}/v1/orgs/acme/events`, {
            method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
            body: JSON.stringify(batch),
          });
          if (r.status !== 201) throw new Error(`publish ${r.status}`);
        }
      };
      if (scenario === 'no-webtransport') delete window.WebTransport;
      if (scenario === 'chat') {
        // ann over WebTransport (with the org's presence), bob over WebSocket (without), both
        // in room "lobby" of acme.
        const mint = async (sub) => (await (await fetch(`${base}/v1/dev/token?sub=${sub}&orgs=acme&scope=subscribe%20chat`)).json()).token;
        const ann = new EdgeStreamClient({ server: base, token: await mint('ann'), orgs: ['acme'], presence: true });
        const bob = new EdgeStreamClient({ server: base, token: await mint('bob'), orgs: ['acme'], transport: 'websocket' });
        const seen = { ann: [], bob: [] }; const presence = { ann: [], bob: [] };
        for (const [name, c] of [['ann', ann], ['bob', bob]]) {
          c.addEventListener('event', (e) => seen[name].push({ seq: e.detail.seq, ...e.detail.data }));
          c.addEventListener('presence', (e) => presence[name].push(e.detail));
        }
        await ann.connect(); await bob.connect();
        ann.join('acme', 'lobby'); bob.join('acme', 'lobby');
        const names = (m) => (m && m.members ? m.members.join(',') : '');
        await until(() => names(ann.members('acme', 'lobby')) === 'ann,bob');
        await until(() => names(ann.members('acme')) === 'ann,bob');
        await until(() => names(bob.members('acme', 'lobby')) === 'ann,bob');
        const before = { annLobby: ann.members('acme', 'lobby'), annOrg: ann.members('acme'), bobLobby: bob.members('acme', 'lobby') };
        const s1 = await ann.chat('acme', 'lobby', { text: 'hi bob' });
        const s2 = await bob.chat('acme', 'lobby', { text: 'hi ann' });
        await until(() => seen.ann.length >= 2 && seen.bob.length >= 2);
        const transports = [ann.transport, bob.transport];
        bob.close();
        await until(() => names(ann.members('acme', 'lobby')) === 'ann');
        await until(() => names(ann.members('acme')) === 'ann');
        const after = { annLobby: ann.members('acme', 'lobby'), annOrg: ann.members('acme') };
        ann.close();
        return { transports, acks: [s1, s2], ann: seen.ann, bob: seen.bob, annPresence: presence.ann,
                 bobPresence: presence.bob, bobOrg: bob.members('acme'), before, after };
      }
      if (scenario === 'refresh') {
        // A token that expires in 2 s; on 4009 the hook fetches a new one and the client resumes.
        const mint = async (ttl) => (await (await fetch(`${base}/v1/dev/token?sub=alice&orgs=acme&scope=subscribe%20publish&ttl=${ttl}`)).json()).token;
        let hookCalls = 0;
        const c = new EdgeStreamClient({ server: base, token: await mint('2s'), orgs: ['acme'],
                                         refreshToken: async () => { hookCalls++; return mint('1h'); } });
        const got = []; const resets = []; const codes = [];
        c.addEventListener('event', (e) => got.push(e.detail.seq));
        c.addEventListener('reset', (e) => resets.push(e.detail));
        c.addEventListener('status', (e) => codes.push(e.detail.reason));
        await c.connect();
        await publish(0, 50);
        await until(() => got.length >= 50);
        await until(() => hookCalls >= 1, 20000);
        await publish(50, 50);
        await until(() => got.length >= 100);
        c.close();
        return { hookCalls, seqs: got, resets: resets.length, reasons: codes };
      }
      const c = new EdgeStreamClient({ server: base, token: scenario === 'bad-token' ? token + 'x' : token, orgs: ['acme'] });
      const events = []; const resets = []; const statuses = [];
      c.addEventListener('event', (e) => events.push(e.detail));
      c.addEventListener('reset', (e) => resets.push(e.detail));
      c.addEventListener('status', (e) => statuses.push(e.detail));
      const seqs = () => events.map((e) => e.seq);
      const inOrder = () => seqs().every((s, i) => i === 0 || s === seqs()[i - 1] + 1);
      const dataOk = () => events.every((e) => e.data.n === e.seq - 1);
      if (scenario === 'bad-token') {
        const failed = await c.connect().then(() => null, (e) => String(e));
        await sleep(3000); // a retry loop would show up as more connects here
        return { failed, connects: c.stats.connects, statuses };
      }
      await c.connect();
      const transport = c.transport;
      if (scenario === 'restart') {
        await publish(0, 10);
        await until(() => events.length === 10);
        const before = { ...c.positions.acme };
        await window.report({ step: 'kill' });
        await until(() => resets.length > 0, 60000); // the restarted node has a new epoch
        await publish(0, 5);
        await until(() => events.length === 15, 30000);
        c.close();
        return { transport, before, after: c.positions.acme, resets, seqs: seqs(), reconnects: c.stats.reconnects };
      }
      if (scenario === 'drop') {
        await publish(0, 200);
        await until(() => events.length >= 100);
        c.reconnect();
        const more = publish(200, 300);
        await until(() => c.stats.reconnects >= 1);
        await more;
        await until(() => events.length >= 500);
        await sleep(300);
        c.close();
        return { transport, count: events.length, inOrder: inOrder(), dataOk: dataOk(), first: seqs()[0], reconnects: c.stats.reconnects, resets: resets.length };
      }
      await publish(0, 1000);
      await until(() => events.length >= 1000);
      // A payload over the brotli threshold: compressed for this client when it can decode it.
      const big = { n: 1000, text: 'compressible '.repeat(400) };
      await fetch(`${base}/v1/orgs/acme/events`, {
        method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
        body: JSON.stringify(big),
      });
      await until(() => events.length >= 1001);
      const bigOk = JSON.stringify(events[1000].data) === JSON.stringify(big);
      events.pop();
      await sleep(300);
      c.close();
      let second = null;
      if (scenario === 'unreachable-quic') {
        // The failure is remembered: the next client goes straight to WebSocket.
        const d = new EdgeStreamClient({ server: base, token, orgs: ['acme'] });
        const st = [];
        d.addEventListener('status', (e) => st.push(e.detail));
        const t0 = Date.now();
        await d.connect();
        second = { transport: d.transport, statuses: st, ms: Date.now() - t0 };
        d.close();
      }
      return { transport, count: events.length, inOrder: inOrder(), dataOk: dataOk(), first: seqs()[0], statuses, second, bigOk, brotli: brotliSupported() };
    }, { scenario, base, tokenArg });
    say({ step: 'result', ...result });
  }
} finally {
  await browser.close();
}
