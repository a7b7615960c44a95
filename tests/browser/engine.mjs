// The browser engine a test runs on, chosen by the ENGINE environment variable:
// - `chromium` (default): Debian's Chromium through playwright-core;
// - `firefox`: Debian's firefox-esr (153 ESR) through puppeteer-core over WebDriver BiDi.
// Nothing is downloaded: both drive the installed binaries. Each launch gets a fresh profile.
//
// Both are wrapped in the few page calls the tests use, with one signature:
// goto, click, fill, evaluate(fn, arg), waitForFunction(fn, arg), exposeFunction,
// onConsole(cb), setInputFile(selector, {name, buffer}), screenshot({path, fullPage}).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const engine = process.env.ENGINE || 'chromium';
const WAIT = { timeout: 60_000 };

/// `chromiumArgs`: extra Chromium switches (ignored on Firefox).
export async function launch({ chromiumArgs = [] } = {}) {
  const profile = mkdtempSync(join(tmpdir(), `edgestream-${engine}-`));
  if (engine === 'firefox') {
    const { default: puppeteer } = await import('puppeteer-core');
    const browser = await puppeteer.launch({
      browser: 'firefox',
      executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
      headless: true,
      userDataDir: profile,
    });
    return {
      engine,
      async newPage({ viewport } = {}) {
        const page = await browser.newPage();
        if (viewport) await page.setViewport(viewport);
        return puppeteerPage(page, profile);
      },
      async close() {
        await browser.close();
        rmSync(profile, { recursive: true, force: true });
      },
    };
  }
  const { chromium } = await import('playwright-core');
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/lib/chromium/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', ...chromiumArgs],
  });
  return {
    engine,
    async newPage({ viewport } = {}) {
      const page = await context.newPage();
      if (viewport) await page.setViewportSize(viewport);
      return playwrightPage(page);
    },
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

function playwrightPage(page) {
  return {
    goto: (url) => page.goto(url),
    click: (sel) => page.click(sel),
    fill: (sel, value) => page.fill(sel, value),
    evaluate: (fn, arg) => page.evaluate(fn, arg),
    waitForFunction: (fn, arg) => page.waitForFunction(fn, arg, WAIT),
    exposeFunction: (name, fn) => page.exposeFunction(name, fn),
    onConsole: (cb) => page.on('console', (m) => cb(m.text())),
    setInputFile: (sel, { name, buffer }) =>
      page.setInputFiles(sel, { name, mimeType: 'application/octet-stream', buffer }),
    screenshot: (opts) => page.screenshot(opts),
  };
}

function puppeteerPage(page, profile) {
  return {
    goto: (url) => page.goto(url),
    click: (sel) => page.click(sel),
    fill: (sel, value) => page.locator(sel).fill(value),
    evaluate: (fn, arg) => page.evaluate(fn, arg),
    waitForFunction: (fn, arg) => page.waitForFunction(fn, WAIT, arg),
    exposeFunction: (name, fn) => page.exposeFunction(name, fn),
    onConsole: (cb) => page.on('console', (m) => cb(m.text())),
    async setInputFile(sel, { name, buffer }) {
      const path = join(profile, name);
      writeFileSync(path, buffer);
      const input = await page.$(sel);
      await input.uploadFile(path);
    },
    screenshot: (opts) => page.screenshot(opts),
  };
}
