// msgbuf admin page: buffer statistics (polled every 2 s), delivery latency from
// /metrics, a 5-minute chart (inline SVG), per-user look-up (devices and buffered
// messages) and buffer clearing.
// Served as /static/admin.js.
import {
  $, el, api, ApiError, fetchText, isInsecureDev, devToken, session, formatDateTime, formatAge, toDate, showNotice,
} from '/static/common.js';

const TOKEN_KEY = 'msgbuf.adminToken';
const POLL_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000;
const PAGE_SIZE = 100;
const LATENCY_SUM = 'msgbuf_delivery_latency_seconds_sum';
const LATENCY_COUNT = 'msgbuf_delivery_latency_seconds_count';
const SVG_NS = 'http://www.w3.org/2000/svg';

const ui = {
  login: $('#admin-login'),
  loginForm: $('#admin-login-form'),
  token: $('#admin-token'),
  loginError: $('#admin-login-error'),
  devLogin: $('#admin-dev-login'),
  main: $('#admin-main'),
  logout: $('#admin-logout'),
  error: $('#admin-error'),
  pollStatus: $('#poll-status'),
  instance: $('#admin-instance'),
  stats: $('#stats'),
  updated: $('#stats-updated'),
  chart: $('#chart'),
  lookupForm: $('#lookup-form'),
  lookupUser: $('#lookup-user'),
  lookupButton: $('#lookup-button'),
  lookupError: $('#lookup-error'),
  buffered: $('#buffered'),
  devices: $('#devices'),
  firstPage: $('#first-page'),
  nextPage: $('#next-page'),
  clearButton: $('#clear-button'),
  clearResult: $('#clear-result'),
  dialog: $('#confirm-dialog'),
  confirmText: $('#confirm-text'),
};

const state = {
  token: null,
  pollTimer: null,
  polling: false,
  inflight: false,
  pollAgain: false,
  lastPollStart: 0,
  prevLatency: null, // {sum, count} of the previous poll
  samples: [], // {t, undelivered, latencyMs|null}
  lookup: { user: null, after: null, next: null, page: 1 },
};

// ---------------------------------------------------------------- sign in

async function showLogin(errorText) {
  stopPolling();
  ui.main.hidden = true;
  ui.login.hidden = false;
  setPollStatus('idle', 'not signed in');
  showNotice(ui.loginError, errorText || '');
  ui.devLogin.hidden = !(await isInsecureDev());
  ui.token.focus();
}

function useToken(token) {
  state.token = token;
  session.set(TOKEN_KEY, token);
  ui.token.value = '';
  ui.login.hidden = true;
  ui.main.hidden = false;
  showNotice(ui.error, '');
  state.samples = [];
  state.prevLatency = null;
  drawChart();
  startPolling();
  ui.lookupUser.focus();
}

ui.loginForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const token = ui.token.value.trim();
  if (!token || token.split('.').length !== 3) {
    showNotice(ui.loginError, 'Paste an admin JWT (three dot-separated parts).');
    ui.token.focus();
    return;
  }
  useToken(token);
});

ui.devLogin.addEventListener('click', async () => {
  ui.devLogin.disabled = true;
  try {
    useToken(await devToken('admin', true));
  } catch (e) {
    showNotice(ui.loginError, `Could not get a development token: ${e.message}`);
  } finally {
    ui.devLogin.disabled = false;
  }
});

ui.logout.addEventListener('click', () => {
  session.set(TOKEN_KEY, null);
  state.token = null;
  showLogin();
});

function authFailed(e) {
  if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
    session.set(TOKEN_KEY, null);
    state.token = null;
    showLogin(
      e.status === 403
        ? 'This token is not an admin token (forbidden).'
        : `The token was rejected: ${e.message}`,
    );
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- polling

function setPollStatus(name, text) {
  ui.pollStatus.dataset.state = name;
  ui.pollStatus.textContent = text;
}

function startPolling() {
  stopPolling();
  state.polling = true;
  poll();
}

function stopPolling() {
  state.polling = false;
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

async function poll() {
  if (!state.polling || !state.token) return;
  if (state.inflight) {
    state.pollAgain = true; // e.g. refresh requested after clearing a buffer
    return;
  }
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
  state.inflight = true;
  try {
    await pollOnce();
  } finally {
    state.inflight = false;
  }
  if (state.polling && !state.pollTimer) {
    const wait = state.pollAgain ? 0 : Math.max(200, POLL_MS - (Date.now() - state.lastPollStart));
    state.pollAgain = false;
    state.pollTimer = setTimeout(poll, wait);
  }
}

async function pollOnce() {
  state.lastPollStart = Date.now();
  const token = state.token;
  const [statsRes, metricsRes] = await Promise.allSettled([
    api('/api/messages/buffer-stats', { token }),
    fetchText('/metrics', token),
  ]);
  if (token !== state.token || !state.polling) return;

  let latencyMs = null;
  if (metricsRes.status === 'fulfilled') {
    latencyMs = latencyFromMetrics(metricsRes.value);
  } else {
    state.prevLatency = null;
  }
  setStat('latency', latencyMs === null ? '—' : formatMs(latencyMs));

  if (statsRes.status === 'fulfilled') {
    const s = statsRes.value || {};
    renderStats(s);
    showNotice(ui.error, '');
    setPollStatus('ok', 'live');
    ui.updated.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every 2 s.`;
    addSample({ t: Date.now(), undelivered: toNumber(s.undelivered), latencyMs });
  } else {
    const e = statsRes.reason;
    if (authFailed(e)) return;
    setPollStatus('error', 'stats unavailable');
    showNotice(ui.error, `Could not load buffer stats: ${e.message}`);
    addSample({ t: Date.now(), undelivered: null, latencyMs });
  }
}

function toNumber(v) {
  const n = typeof v === 'number' ? v : Number(v);
  return Number.isFinite(n) ? n : null;
}

function setStat(name, text) {
  const node = ui.stats.querySelector(`[data-stat="${name}"]`);
  if (node && node.textContent !== text) node.textContent = text;
}

function renderStats(s) {
  for (const key of ['undelivered', 'unacked', 'delivered', 'total', 'usersWithUndelivered', 'devices', 'onlineUsers', 'connections']) {
    const n = toNumber(s[key]);
    setStat(key, n === null ? '—' : n.toLocaleString('en-US').replace(/,/g, '\u202f'));
    const node = ui.stats.querySelector(`[data-stat="${key}"]`);
    if (node) node.dataset.value = n === null ? '' : String(n);
  }
  const oldest = toDate(s.oldestUndeliveredAt);
  setStat('oldestUndeliveredAt', oldest ? `${formatDateTime(oldest)} (${formatAge(Date.now() - oldest.getTime())} ago)` : '—');
  setStat('instance', s.instance ? String(s.instance) : '—');
  if (s.instance) {
    ui.instance.textContent = `instance ${s.instance}`;
    ui.instance.hidden = false;
  }
}

/** Sum every series of a metric in Prometheus text format; null when absent. */
export function metricSum(text, name) {
  let found = false;
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest && rest[0] !== ' ' && rest[0] !== '{' && rest[0] !== '\t') continue; // longer name
    const m = /^(?:\{.*\})?\s+(\S+)/.exec(rest);
    if (!m) continue;
    const v = Number(m[1]);
    if (!Number.isFinite(v)) continue;
    found = true;
    total += v;
  }
  return found ? total : null;
}

/** Mean delivery latency (ms) between this poll and the previous one, or null. */
function latencyFromMetrics(text) {
  const sum = metricSum(text, LATENCY_SUM);
  const count = metricSum(text, LATENCY_COUNT);
  const prev = state.prevLatency;
  state.prevLatency = sum === null || count === null ? null : { sum, count };
  if (!prev || sum === null || count === null) return null;
  const dCount = count - prev.count;
  const dSum = sum - prev.sum;
  if (dCount <= 0 || dSum < 0) return null; // nothing delivered, or the counters were reset
  return (dSum / dCount) * 1000;
}

function formatMs(ms) {
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 100) return `${ms.toFixed(1)} ms`;
  if (ms < 10_000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

// ---------------------------------------------------------------- chart

function addSample(sample) {
  state.samples.push(sample);
  const cutoff = Date.now() - WINDOW_MS;
  while (state.samples.length && state.samples[0].t < cutoff) state.samples.shift();
  drawChart();
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart() {
  // Draw in CSS pixels of the container, so labels keep their size on phones.
  const W = Math.max(280, Math.min(960, Math.round(ui.chart.clientWidth) || 640));
  const H = W < 480 ? 170 : 200;
  const pad = { l: 40, r: 48, t: 12, b: 26 };
  const iw = W - pad.l - pad.r;
  const ih = H - pad.t - pad.b;
  const now = Date.now();
  const t0 = now - WINDOW_MS;
  const samples = state.samples;
  // Counts: at least 0..5 so the five grid steps are whole numbers.
  const undeliveredMax = niceMax(Math.max(5, ...samples.map((s) => s.undelivered ?? 0)));
  const latencyMax = niceMax(Math.max(0, ...samples.map((s) => s.latencyMs ?? 0)));
  const x = (t) => pad.l + ((t - t0) / WINDOW_MS) * iw;
  const yU = (v) => pad.t + ih - (v / undeliveredMax) * ih;
  const yL = (v) => pad.t + ih - (v / latencyMax) * ih;

  const root = svg('svg', {
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-labelledby': 'chart-svg-title chart-svg-desc',
    preserveAspectRatio: 'xMidYMid meet',
  });
  const last = samples[samples.length - 1];
  const latencyPoints = samples.filter((s) => s.latencyMs !== null);
  root.append(
    svg('title', { id: 'chart-svg-title' }, 'Undelivered messages and delivery latency, last 5 minutes'),
    svg(
      'desc',
      { id: 'chart-svg-desc' },
      last
        ? `Latest: ${last.undelivered ?? 'unknown'} undelivered; latency ${last.latencyMs === null ? 'no deliveries' : formatMs(last.latencyMs)}.`
        : 'No data yet.',
    ),
  );

  // Grid and axes
  const grid = svg('g', { class: 'grid' });
  const STEPS = 5; // niceMax() values divide into 5 round steps
  for (let i = 0; i <= STEPS; i++) {
    const y = pad.t + (ih * i) / STEPS;
    grid.append(svg('line', { x1: pad.l, x2: pad.l + iw, y1: y, y2: y }));
    const uVal = undeliveredMax * (1 - i / STEPS);
    const lVal = latencyMax * (1 - i / STEPS);
    grid.append(svg('text', { x: pad.l - 6, y: y + 4, 'text-anchor': 'end', class: 'axis undelivered' }, fmtAxis(uVal)));
    grid.append(svg('text', { x: pad.l + iw + 6, y: y + 4, 'text-anchor': 'start', class: 'axis latency' }, fmtAxis(lVal)));
  }
  for (let m = 0; m <= 5; m++) {
    const t = t0 + m * 60_000;
    const label = m === 5 ? 'now' : W < 480 ? `−${5 - m}m` : `−${5 - m} min`;
    grid.append(svg('text', { x: x(t), y: H - 6, 'text-anchor': 'middle', class: 'axis' }, label));
  }
  root.append(grid);

  // Undelivered: one line, broken where the value is unknown.
  for (const seg of segments(samples, (s) => s.undelivered)) {
    if (seg.length === 1) {
      root.append(svg('circle', { class: 'series undelivered', cx: x(seg[0].t), cy: yU(seg[0].undelivered), r: 2.5 }));
    } else {
      root.append(svg('polyline', {
        class: 'series undelivered',
        points: seg.map((s) => `${x(s.t).toFixed(1)},${yU(s.undelivered).toFixed(1)}`).join(' '),
      }));
    }
  }
  // Latency: line segments plus a dot per measured interval (often isolated).
  for (const seg of segments(samples, (s) => s.latencyMs)) {
    if (seg.length > 1) {
      root.append(svg('polyline', {
        class: 'series latency',
        points: seg.map((s) => `${x(s.t).toFixed(1)},${yL(s.latencyMs).toFixed(1)}`).join(' '),
      }));
    }
  }
  for (const s of latencyPoints) {
    root.append(svg('circle', { class: 'series latency dot', cx: x(s.t), cy: yL(s.latencyMs), r: 3 }));
  }
  if (!samples.length) {
    root.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'axis' }, 'waiting for data…'));
  }

  ui.chart.replaceChildren(root);
  ui.chart.dataset.samples = String(samples.length);
  ui.chart.dataset.latencyPoints = String(latencyPoints.length);
}

function segments(samples, value) {
  const out = [];
  let cur = [];
  for (const s of samples) {
    if (value(s) === null || value(s) === undefined) {
      if (cur.length) out.push(cur);
      cur = [];
    } else {
      cur.push(s);
    }
  }
  if (cur.length) out.push(cur);
  return out;
}

function fmtAxis(v) {
  if (v >= 1000) return `${+(v / 1000).toFixed(1)}k`;
  if (v >= 10 || v === 0) return String(Math.round(v));
  return String(+v.toFixed(2));
}

let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawChart, 150);
});

// ---------------------------------------------------------------- look-up

ui.lookupUser.addEventListener('input', () => {
  ui.clearButton.disabled = !ui.lookupUser.value.trim();
});

ui.lookupForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const user = ui.lookupUser.value.trim();
  showNotice(ui.clearResult, '');
  delete ui.clearResult.dataset.deleted;
  if (!user) {
    showNotice(ui.lookupError, 'Enter a user id.');
    ui.lookupUser.focus();
    return;
  }
  lookup(user, null, 1);
});

ui.nextPage.addEventListener('click', () => {
  const l = state.lookup;
  if (l.user && l.next) lookup(l.user, l.next, l.page + 1);
});

ui.firstPage.addEventListener('click', () => {
  const l = state.lookup;
  if (l.user) lookup(l.user, null, 1);
});

async function lookup(user, after, page) {
  showNotice(ui.lookupError, '');
  ui.lookupButton.disabled = true;
  ui.buffered.setAttribute('aria-busy', 'true');
  try {
    const qs = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (after) qs.set('after', after);
    // Independent: a failure of one still shows the other.
    const [buffered, devices] = await Promise.allSettled([
      api(`/api/messages/buffered/${encodeURIComponent(user)}?${qs}`, { token: state.token }),
      api(`/api/users/${encodeURIComponent(user)}/devices`, { token: state.token }),
    ]);
    if (devices.status === 'fulfilled') renderDevices(user, (devices.value && devices.value.devices) || []);
    else ui.devices.replaceChildren();
    if (buffered.status === 'rejected') throw buffered.reason;
    const data = buffered.value;
    state.lookup = { user, after, next: data && data.next ? data.next : null, page };
    renderBuffered(user, (data && data.messages) || [], page);
    if (devices.status === 'rejected') throw devices.reason;
  } catch (e) {
    if (authFailed(e)) return;
    showNotice(ui.lookupError, `Look-up failed: ${e.message}`);
  } finally {
    ui.lookupButton.disabled = false;
    ui.buffered.removeAttribute('aria-busy');
  }
}

/** The user's devices: each catches up on its own (docs/PROTOCOL.md, "Devices"). */
function renderDevices(user, devices) {
  const caption = devices.length ? `Devices of ${user}: ${devices.length}` : `No devices registered for ${user}.`;
  const head = el('tr', {}, ...['Device', 'First seen', 'Last seen', 'Not received'].map((h) => el('th', { scope: 'col', text: h })));
  const rows = devices.map((d) =>
    el(
      'tr',
      { dataset: { device: d.deviceId || '', pending: String(d.pending ?? '') } },
      el('td', { class: 'mono', text: d.deviceId ?? '' }),
      el('td', { class: 'nowrap', text: formatDateTime(d.firstSeen) }),
      el('td', { class: 'nowrap', text: lastSeen(d.lastSeen) }),
      el('td', { text: String(d.pending ?? '—') }),
    ),
  );
  const table = el(
    'table',
    { class: 'data', dataset: { user, devices: String(devices.length) } },
    el('caption', { text: caption }),
    el('thead', {}, head),
    el('tbody', {}, rows),
  );
  ui.devices.replaceChildren(table);
}

function lastSeen(ts) {
  const d = toDate(ts);
  return d ? `${formatDateTime(d)} (${formatAge(Date.now() - d.getTime())} ago)` : '—';
}

function renderBuffered(user, messages, page) {
  const first = (page - 1) * PAGE_SIZE + 1;
  const caption = messages.length
    ? `Messages for ${user}: ${first}–${first + messages.length - 1}${state.lookup.next ? ' (more on the next page)' : ''}`
    : page > 1
      ? `No more messages for ${user}.`
      : `No buffered messages for ${user}.`;
  const head = el('tr', {}, ...['Id', 'From', 'Chat', 'Message', 'Sent', 'Delivered', 'Delivered by', 'Acked'].map((h) => el('th', { scope: 'col', text: h })));
  const rows = messages.map((m) =>
    el(
      'tr',
      { dataset: { id: m.id || '', delivered: m.delivered ? 'true' : 'false' } },
      el('td', { class: 'mono nowrap', title: m.id || '', text: shortId(m.id) }),
      el('td', { text: m.from ?? '' }),
      el('td', { text: m.chatId ?? '' }),
      el('td', { class: 'msg-text', text: m.message ?? '' }),
      el('td', { class: 'nowrap', text: formatDateTime(m.timestamp) }),
      el('td', { class: 'nowrap', text: m.delivered ? `yes, ${formatDateTime(m.deliveredAt)}` : 'no' }),
      el('td', { text: m.deliveredBy ?? '—' }),
      el('td', { class: 'nowrap', text: m.ackedAt ? formatDateTime(m.ackedAt) : '—' }),
    ),
  );
  const table = el(
    'table',
    { class: 'data', dataset: { user, count: String(messages.length) } },
    el('caption', { text: caption }),
    el('thead', {}, head),
    el('tbody', {}, rows),
  );
  ui.buffered.replaceChildren(table);
  ui.nextPage.hidden = !state.lookup.next;
  ui.firstPage.hidden = page <= 1;
  ui.clearButton.disabled = false;
}

function shortId(id) {
  if (!id) return '';
  const s = String(id);
  return s.length > 12 ? `…${s.slice(-10)}` : s;
}

// ---------------------------------------------------------------- clear buffer

function confirmDialog(text) {
  return new Promise((resolve) => {
    const d = ui.dialog;
    ui.confirmText.textContent = text;
    if (typeof d.showModal !== 'function') {
      resolve(window.confirm(text));
      return;
    }
    d.returnValue = '';
    d.addEventListener('close', () => resolve(d.returnValue === 'yes'), { once: true });
    d.showModal();
  });
}

ui.clearButton.addEventListener('click', async () => {
  const user = ui.lookupUser.value.trim();
  if (!user) return;
  showNotice(ui.clearResult, '');
  delete ui.clearResult.dataset.deleted;
  const ok = await confirmDialog(
    `Delete all undelivered messages buffered for “${user}”? They will never be delivered. This cannot be undone.`,
  );
  ui.clearButton.focus();
  if (!ok) return;
  ui.clearButton.disabled = true;
  try {
    const data = await api(`/api/messages/buffered/${encodeURIComponent(user)}`, { method: 'DELETE', token: state.token });
    const n = toNumber(data && data.deleted) ?? 0;
    ui.clearResult.dataset.deleted = String(n);
    ui.clearResult.dataset.user = user;
    showNotice(ui.clearResult, `Deleted ${n} undelivered message${n === 1 ? '' : 's'} for ${user}.`, 'ok');
    await lookup(user, null, 1);
    poll();
  } catch (e) {
    if (authFailed(e)) return;
    showNotice(ui.lookupError, `Clear failed: ${e.message}`);
  } finally {
    ui.clearButton.disabled = !ui.lookupUser.value.trim();
  }
});

// ---------------------------------------------------------------- start

const saved = session.get(TOKEN_KEY);
if (saved) useToken(saved);
else showLogin();
