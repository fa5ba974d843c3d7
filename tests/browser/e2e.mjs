#!/usr/bin/env node
// Browser end-to-end test of the msgbuf chat page and admin page.
//
//   node tests/browser/e2e.mjs --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B
//
// Expects two server instances (A and B) started with --insecure-dev on the same
// MongoDB replica set (scripts/browser-test sets that up). Drives Debian's
// /usr/bin/chromium through playwright-core. Every check waits with Playwright's
// auto-waiting (locator.waitFor / waitForFunction) and a timeout; there are no
// fixed sleeps. Screenshots go to artifacts/screenshots/.
import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');

const { values: opts } = parseArgs({
  options: {
    a: { type: 'string' },
    b: { type: 'string' },
    screenshots: { type: 'string', default: path.join(repoRoot, 'artifacts', 'screenshots') },
    chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
    timeout: { type: 'string', default: process.env.E2E_TIMEOUT_MS || '20000' },
  },
});
if (!opts.a || !opts.b) {
  console.error('usage: node e2e.mjs --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B');
  process.exit(2);
}
for (const u of [opts.a, opts.b]) {
  const host = new URL(u).hostname;
  if (!/^127\.\d+\.\d+\.\d+$/.test(host) && host !== 'localhost' && host !== '[::1]') {
    console.error(`refusing non-loopback target ${u}`);
    process.exit(2);
  }
}
const A = opts.a.replace(/\/+$/, '');
const B = opts.b.replace(/\/+$/, '');
const TIMEOUT = Number(opts.timeout);
const SHOTS = opts.screenshots;
mkdirSync(SHOTS, { recursive: true });

// Unique names per run, so a re-run against the same database starts clean.
const run = Date.now().toString(36).slice(-6);
const alice = `alice-${run}`;
const bob = `bob-${run}`;
const carol = `carol-${run}`;
const dave = `dave-${run}`;

let passed = 0;
let failed = 0;
const pageErrors = [];
const pages = {}; // name -> page, for failure screenshots and logs
const consoleLog = [];

async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
  } catch (e) {
    failed++;
    console.log(`not ok ${passed + failed} - ${name}`);
    console.log(`  ${String(e && e.message ? e.message : e).split('\n').join('\n  ')}`);
    throw e;
  }
  passed++;
  console.log(`ok ${passed} - ${name} (${Date.now() - t0} ms)`);
}

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

/** The li of a message with the given text, optionally narrowed by a CSS suffix. */
function msg(page, text, extra = '') {
  return page.locator(`#messages li${extra}`).filter({ hasText: text });
}

async function signIn(page, base, user) {
  await page.goto(`${base}/`);
  await page.locator('#login-name').waitFor({ state: 'visible' });
  await page.locator('#login-name').fill(user);
  await page.locator('#login-button').click();
  await page.locator('#status[data-state="connected"]').waitFor();
}

async function sendMessage(page, to, text) {
  await page.locator('#peer').fill(to);
  await page.locator('#message-input').fill(text);
  await page.locator('#message-input').press('Enter');
}

async function tickText(li) {
  return (await li.locator('.tick-mark').textContent()).trim();
}

async function statValue(page, name) {
  const v = await page.locator(`#stats [data-stat="${name}"]`).getAttribute('data-value');
  return v === null || v === '' ? null : Number(v);
}

async function waitStat(page, name, expected) {
  await page.waitForFunction(
    ([n, want]) => {
      const node = document.querySelector(`#stats [data-stat="${n}"]`);
      return node && node.dataset.value !== '' && Number(node.dataset.value) === want;
    },
    [name, expected],
    { timeout: TIMEOUT },
  );
}

async function shot(page, file) {
  await page.screenshot({ path: path.join(SHOTS, file), fullPage: true });
}

/** One PNG that shows two pages side by side. */
async function sideBySide(browser, file, left, right) {
  const [l, r] = await Promise.all([left.page.screenshot({ fullPage: true }), right.page.screenshot({ fullPage: true })]);
  const ctx = await browser.newContext({ viewport: { width: 1600, height: 900 } });
  const p = await ctx.newPage();
  const img = (buf, title) =>
    `<figure><figcaption>${title}</figcaption><img src="data:image/png;base64,${buf.toString('base64')}"></figure>`;
  await p.setContent(`<!doctype html><html><head><style>
      body{margin:0;padding:12px;display:flex;gap:16px;align-items:flex-start;background:#888;font:14px sans-serif}
      figure{margin:0;background:#fff;padding:6px;border-radius:6px}
      figcaption{font-weight:bold;padding:2px 4px 6px}
      img{display:block;max-width:100%}
    </style></head><body>${img(l, left.title)}${img(r, right.title)}</body></html>`);
  await p.locator('img').nth(1).evaluate((i) => i.decode());
  await p.locator('img').nth(0).evaluate((i) => i.decode());
  await p.screenshot({ path: path.join(SHOTS, file), fullPage: true });
  await ctx.close();
}

async function newPage(browser, name, viewport) {
  const ctx = await browser.newContext({ viewport });
  ctx.setDefaultTimeout(TIMEOUT);
  const page = await ctx.newPage();
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  page.on('console', (m) => consoleLog.push(`[${name}] ${m.type()}: ${m.text()}`));
  pages[name] = page;
  return { ctx, page };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    await scenario(browser);
  } catch (e) {
    for (const [name, page] of Object.entries(pages)) {
      try {
        await page.screenshot({ path: path.join(SHOTS, `failure-${name}.png`), fullPage: true });
      } catch {
        /* page may be gone */
      }
    }
    if (!failed) {
      failed++;
      console.log(`not ok ${passed + failed} - unexpected error: ${e && e.stack ? e.stack : e}`);
    }
    console.log('--- browser console (last 60 lines) ---');
    for (const line of consoleLog.slice(-60)) console.log(line);
    if (pageErrors.length) console.log(`--- page errors ---\n${pageErrors.join('\n')}`);
  } finally {
    await browser.close();
  }
  writeFileSync(path.join(SHOTS, 'console.log'), consoleLog.join('\n') + '\n');
  console.log(`browser e2e: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

async function scenario(browser) {
  // Alice: desktop viewport on instance A. Bob: 375 px wide phone viewport on B.
  const { page: pa } = await newPage(browser, 'alice', { width: 1100, height: 760 });
  const { page: pb } = await newPage(browser, 'bob', { width: 375, height: 740 });

  // ---------------------------------------------------------------- offline delivery
  await check('chat page on A offers dev sign-in (name field)', async () => {
    await pa.goto(`${A}/`);
    await pa.locator('#login-name').waitFor({ state: 'visible' });
    assert((await pa.locator('#status').getAttribute('data-state')) === 'signed-out', 'status should be signed-out');
  });

  await check(`${alice} signs in on instance A and connects`, async () => {
    await signIn(pa, A, alice);
    await pa.locator('#instance[data-instance="A"]').waitFor();
    assert((await pa.locator('#me').textContent()).trim() === alice, 'header should show the user id');
    assert((await pa.locator('#chat-id').inputValue()) === 'general', 'chat id should default to "general"');
  });

  const m1 = `hello bob, you are offline (${run})`;
  await check('message to signed-out Bob is accepted (✓)', async () => {
    await sendMessage(pa, bob, m1);
    const li = msg(pa, m1, '[data-direction="out"]');
    await li.and(pa.locator('[data-status="accepted"], [data-status="delivered"]')).waitFor();
    assert((await li.getAttribute('data-id')) !== '', 'accepted message should carry its server id');
    assert((await pa.locator('#message-input').inputValue()) === '', 'message box should be cleared');
    if ((await li.getAttribute('data-status')) === 'accepted') {
      assert((await tickText(li)) === '✓', `expected ✓, got ${await tickText(li)}`);
    }
  });

  await check(`${bob} signs in on instance B (375 px viewport)`, async () => {
    await signIn(pb, B, bob);
    await pb.locator('#instance[data-instance="B"]').waitFor();
  });

  await check('Bob gets the message from the buffer, marked "sent while you were offline"', async () => {
    const li = msg(pb, m1, '[data-direction="in"]');
    await li.waitFor();
    assert(await li.evaluate((n) => n.classList.contains('offline')), 'message should have class offline');
    const badge = li.locator('.offline-badge');
    assert(await badge.isVisible(), 'offline badge should be visible');
    assert((await badge.textContent()).includes('offline'), 'badge text');
    assert((await li.locator('.from').textContent()).trim() === alice, 'sender shown');
  });

  await check('Alice sees ✓✓ after Bob acked the message', async () => {
    const li = msg(pa, m1, '[data-direction="out"][data-status="delivered"]');
    await li.waitFor();
    assert((await tickText(li)) === '✓✓', `expected ✓✓, got ${await tickText(li)}`);
  });

  await check('chat page fits a 375 px screen (no horizontal scrolling)', async () => {
    const { sw, cw } = await pb.evaluate(() => ({
      sw: document.documentElement.scrollWidth,
      cw: document.documentElement.clientWidth,
    }));
    assert(sw <= cw, `page is ${sw}px wide in a ${cw}px viewport`);
  });
  await shot(pb, 'chat-bob-offline-delivered.png');

  // ---------------------------------------------------------------- live exchange
  const m2 = `hi alice, live from B (${run})`;
  await check('live Bob → Alice: Alice receives (not offline), Bob sees ✓✓', async () => {
    await sendMessage(pb, alice, m2);
    const got = msg(pa, m2, '[data-direction="in"]');
    await got.waitFor();
    assert(!(await got.evaluate((n) => n.classList.contains('offline'))), 'live message must not be marked offline');
    const out = msg(pb, m2, '[data-direction="out"][data-status="delivered"]');
    await out.waitFor();
    assert((await tickText(out)) === '✓✓', 'expected ✓✓');
  });

  const m3 = `and back to bob, live from A (${run})`;
  await check('live Alice → Bob: Bob receives (not offline), Alice sees ✓✓', async () => {
    await sendMessage(pa, bob, m3);
    const got = msg(pb, m3, '[data-direction="in"]');
    await got.waitFor();
    assert(!(await got.evaluate((n) => n.classList.contains('offline'))), 'live message must not be marked offline');
    const out = msg(pa, m3, '[data-direction="out"][data-status="delivered"]');
    await out.waitFor();
    assert((await tickText(out)) === '✓✓', 'expected ✓✓');
    assert((await pb.locator('#messages li').count()) === 3, 'Bob should see exactly 3 messages (no duplicates)');
    assert((await pa.locator('#messages li').count()) === 3, 'Alice should see exactly 3 messages (no duplicates)');
  });
  await sideBySide(browser, 'chat-live-receipts.png', { page: pa, title: `${alice} on A` }, { page: pb, title: `${bob} on B` });

  await check('Bob reloads: session kept, nothing pending (acks were stored)', async () => {
    await pb.reload();
    await pb.locator('#status[data-state="connected"]').waitFor();
    assert((await pb.locator('#status').getAttribute('data-pending')) === '0', 'joined.pending should be 0');
    assert((await pb.locator('#messages li').count()) === 0, 'no message should be redelivered');
  });

  // ---------------------------------------------------------------- devices
  // Two browser contexts are two devices of one user (each its own localStorage deviceId).
  const phone = await newPage(browser, 'dave-phone', { width: 375, height: 740 });
  let laptop = await newPage(browser, 'dave-laptop', { width: 1100, height: 760 });
  await check(`${dave} signs in on two devices: a phone on B and a laptop on A`, async () => {
    await signIn(phone.page, B, dave);
    await signIn(laptop.page, A, dave);
    const ids = await Promise.all([phone.page, laptop.page].map((p) => p.evaluate(() => localStorage.getItem('msgbuf.deviceId'))));
    assert(ids[0] && ids[1] && ids[0] !== ids[1], `two device ids expected, got ${ids}`);
  });

  const d1 = `for dave while his laptop is closed (${run})`;
  const d2 = `and a second one (${run})`;
  const d3 = `dave answers from his phone (${run})`;
  await check("the laptop is closed; the phone reads what arrives and answers", async () => {
    await laptop.page.close();
    await sendMessage(pa, dave, d1);
    await sendMessage(pa, dave, d2);
    await msg(phone.page, d1, '[data-direction="in"]').waitFor();
    await msg(phone.page, d2, '[data-direction="in"]').waitFor();
    await sendMessage(phone.page, alice, d3);
    await msg(pa, d3, '[data-direction="in"]').waitFor();
    // Read (and acked) on the phone: Alice sees ✓✓ before the laptop is back.
    await msg(pa, d2, '[data-direction="out"][data-status="delivered"]').waitFor();
  });

  await check('the laptop reopened shows what it missed, and the phone\'s answer as sent', async () => {
    const page = await laptop.ctx.newPage();
    page.on('pageerror', (e) => pageErrors.push(`dave-laptop: ${e.message}`));
    pages['dave-laptop'] = page;
    laptop = { ctx: laptop.ctx, page };
    await signIn(page, A, dave);
    await msg(page, d1, '[data-direction="in"]').waitFor();
    await msg(page, d2, '[data-direction="in"]').waitFor();
    await msg(page, d3, '[data-direction="out"]').waitFor();
    const texts = await page.locator('#messages li .body').allTextContents();
    assert(
      JSON.stringify(texts) === JSON.stringify([d1, d2, d3]),
      `the laptop should show the three once, in order: ${JSON.stringify(texts)}`,
    );
  });
  await sideBySide(browser, 'chat-two-devices.png', { page: phone.page, title: `${dave}'s phone` }, { page: laptop.page, title: `${dave}'s laptop, reopened` });

  // ---------------------------------------------------------------- admin
  const { page: pad } = await newPage(browser, 'admin', { width: 1100, height: 900 });
  let u0;
  await check('admin page on A: dev admin login shows buffer stats', async () => {
    await pad.goto(`${A}/admin`);
    await pad.locator('#admin-dev-login').click();
    await pad.locator('#stats [data-stat="undelivered"][data-value]:not([data-value=""])').waitFor();
    u0 = await statValue(pad, 'undelivered');
    assert(Number.isInteger(u0) && u0 >= 0, `undelivered should be a count, got ${u0}`);
    await pad.locator('#stats [data-stat="instance"]').filter({ hasText: /^A$/ }).waitFor();
  });

  const m4 = `for carol, who never signed in (${run})`;
  await check(`message to offline ${carol} raises "undelivered" by 1`, async () => {
    await sendMessage(pa, carol, m4);
    await msg(pa, m4, '[data-direction="out"][data-status="accepted"]').waitFor();
    await waitStat(pad, 'undelivered', u0 + 1);
  });

  await check('chart draws the undelivered series', async () => {
    await pad.waitForFunction(() => Number(document.querySelector('#chart').dataset.samples) >= 2, null, { timeout: TIMEOUT });
    await pad.locator('#chart svg polyline.series.undelivered').first().waitFor();
  });

  const m5 = `one more for alice, to measure latency (${run})`;
  await check('a delivery on A shows up as a delivery latency point', async () => {
    await sendMessage(pb, alice, m5);
    await msg(pa, m5, '[data-direction="in"]').waitFor();
    await pad.waitForFunction(() => Number(document.querySelector('#chart').dataset.latencyPoints) >= 1, null, {
      timeout: TIMEOUT,
    });
    await pad.locator('#chart svg circle.series.latency').first().waitFor();
  });

  await check(`look-up of ${carol} lists the buffered message`, async () => {
    await pad.locator('#lookup-user').fill(carol);
    await pad.locator('#lookup-button').click();
    const row = pad.locator('#buffered tbody tr').filter({ hasText: m4 });
    await row.waitFor();
    assert((await pad.locator('#buffered tbody tr').count()) === 1, 'exactly one buffered message for carol');
    assert((await row.getAttribute('data-delivered')) === 'false', 'message should be undelivered');
  });
  await shot(pad, 'admin.png');
  await check(`look-up of ${dave} lists his two devices, neither missing anything`, async () => {
    await pad.locator('#lookup-user').fill(dave);
    await pad.locator('#lookup-button').click();
    await pad.locator(`#devices table[data-user="${dave}"][data-devices="2"]`).waitFor();
    const pending = await pad.locator('#devices tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.pending));
    assert(JSON.stringify(pending) === '["0","0"]', `devices should have nothing pending: ${pending}`);
    await pad.locator('#lookup-user').fill(carol);
    await pad.locator('#lookup-button').click();
    await pad.locator(`#devices table[data-user="${carol}"][data-devices="0"]`).waitFor();
  });

  await check('clear buffer asks for confirmation, then deletes 1 and "undelivered" goes back', async () => {
    await pad.locator('#clear-button').click();
    await pad.locator('#confirm-dialog[open]').waitFor();
    await pad.locator('#confirm-yes').click();
    await pad.locator('#clear-result[data-deleted="1"]').waitFor();
    assert((await pad.locator('#clear-result').textContent()).includes('Deleted 1'), 'result text');
    await waitStat(pad, 'undelivered', u0);
    await pad.locator('#buffered table[data-count="0"]').waitFor();
  });
  await shot(pad, 'admin-after-clear.png');

  await check('sign-out returns to the sign-in form', async () => {
    await pa.locator('#logout-button').click();
    await pa.locator('#status[data-state="signed-out"]').waitFor();
    await pa.locator('#login-name').waitFor({ state: 'visible' });
    assert((await pa.evaluate(() => sessionStorage.getItem('msgbuf.token'))) === null, 'token removed');
  });

  await check('no uncaught errors in the pages', async () => {
    assert(pageErrors.length === 0, `page errors:\n${pageErrors.join('\n')}`);
  });
}

main().catch((e) => {
  console.error(e);
  console.log(`browser e2e: ${passed} passed, ${failed || 1} failed`);
  process.exit(1);
});
