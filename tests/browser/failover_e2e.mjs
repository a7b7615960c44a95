// Chromium, through nginx, on two nodes sharing one CA-issued certificate (trusted through an
// NSS database under HOME, and --webtransport-developer-mode: QUIC refuses local trust anchors
// without it): the browser client subscribes, the caller SIGKILLs the node holding the
// session, and every event is reported with the time it arrived.
// Usage: HOME=... node failover_e2e.mjs BASE TOKEN TOTAL
// Prints {"step":"connected"}, then {"step":"event","seq","at"} per event and status lines;
// the last line is {"step":"result", ...}.
import { launch } from './engine.mjs';

const [base, token, totalArg] = process.argv.slice(2);
const total = Number(totalArg);
const say = (o) => console.log(JSON.stringify(o));

const browser = await launch({ chromiumArgs: ['--webtransport-developer-mode'] });
try {
  const page = await browser.newPage();
  page.onConsole((text) => say({ step: 'console', text }));
  await page.exposeFunction('report', (o) => say(o));
  await page.goto(`${base}/healthz`);
  const result = await page.evaluate(async ({ base, token, total }) => {
    const { EdgeStreamClient } = await import('/edgestream.js');
    const c = new EdgeStreamClient({ server: base, token, orgs: ['acme'] });
    const seqs = []; const resets = []; const transports = [];
    c.addEventListener('event', (e) => {
      seqs.push(e.detail.seq);
      window.report({ step: 'event', seq: e.detail.seq, at: Date.now() });
    });
    c.addEventListener('reset', (e) => resets.push(e.detail));
    c.addEventListener('status', (e) => {
      if (e.detail.state === 'connected') transports.push(e.detail.transport);
      window.report({ step: 'status', ...e.detail, at: Date.now() });
    });
    await c.connect();
    await window.report({ step: 'connected', transport: c.transport });
    const deadline = Date.now() + 60_000;
    while (seqs.length < total && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    c.close();
    return { seqs, resets: resets.length, transports, reconnects: c.stats.reconnects };
  }, { base, token, total });
  say({ step: 'result', ...result });
} finally {
  await browser.close();
}
