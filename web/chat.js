// msgbuf chat page: sign in, WebSocket connection with automatic reconnect, a device id
// per browser (catch-up, sends from the user's other devices, the missed-history notice),
// offline-drain marking, receipts (✓ accepted, ✓✓ delivered) and batched acks.
// Served as /static/chat.js; protocol: JSON text frames {"event": "...", "data": {...}}.
import {
  $, el, api, ApiError, isInsecureDev, devToken, jwtClaims, session, formatTime, randomId, showNotice, toDate,
} from '/static/common.js';

const TOKEN_KEY = 'msgbuf.token';
const PEER_KEY = 'msgbuf.peer';
const CHAT_KEY = 'msgbuf.chatId';
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const ACK_BATCH_MS = 50;
const ACK_MAX_IDS = 200;
const USER_ID_RE = /^[A-Za-z0-9_.@:-]{1,128}$/; // the server's rule for user ids

const CLOSE_REASONS = {
  1001: 'server going away',
  1006: 'connection lost',
  1008: 'policy violation',
  1009: 'message too big',
  1011: 'server error',
  4001: 'connection too slow',
};

const ui = {
  login: $('#login'),
  loginForm: $('#login-form'),
  loginDev: $('#login-dev'),
  loginJwt: $('#login-jwt'),
  loginName: $('#login-name'),
  loginToken: $('#login-token'),
  loginButton: $('#login-button'),
  loginError: $('#login-error'),
  chat: $('#chat'),
  me: $('#me'),
  status: $('#status'),
  instance: $('#instance'),
  logout: $('#logout-button'),
  peer: $('#peer'),
  chatId: $('#chat-id'),
  messages: $('#messages'),
  emptyHint: $('#empty-hint'),
  sendForm: $('#send-form'),
  input: $('#message-input'),
  sendButton: $('#send-button'),
  sendError: $('#send-error'),
  historyNotice: $('#history-notice'),
  historyDismiss: $('#history-dismiss'),
};

const state = {
  token: null,
  me: null,
  devMode: false,
  ws: null,
  generation: 0, // bumps on each new socket; events of stale sockets are ignored
  joined: false,
  everOpened: false, // whether the current socket reached "open"
  attempt: 0,
  reconnectTimer: null,
  countdownTimer: null,
  drainRemaining: 0,
  inById: new Map(), // incoming message id -> li (de-duplication)
  outById: new Map(), // accepted outgoing message id -> li (receipts)
  byClientId: new Map(), // clientMsgId -> outgoing entry {li, frame, sent}
  earlyReceipts: new Map(), // receipts that came before message_accepted
  ackQueue: new Set(),
  ackTimer: null,
};

// ---------------------------------------------------------------- status line

function setStatus(stateName, text) {
  ui.status.dataset.state = stateName;
  ui.status.textContent = text;
  document.body.dataset.conn = stateName;
}

function setInstance(instance) {
  if (instance) {
    ui.instance.textContent = `instance ${instance}`;
    ui.instance.dataset.instance = instance;
    ui.instance.hidden = false;
  } else {
    ui.instance.textContent = '';
    delete ui.instance.dataset.instance;
    ui.instance.hidden = true;
  }
}

// ---------------------------------------------------------------- sign in / out

async function showLogin(errorText) {
  ui.chat.hidden = true;
  ui.login.hidden = false;
  setStatus('signed-out', 'signed out');
  setInstance(null);
  showNotice(ui.loginError, errorText || '');
  state.devMode = await isInsecureDev();
  ui.loginDev.hidden = !state.devMode;
  ui.loginJwt.hidden = state.devMode;
  (state.devMode ? ui.loginName : ui.loginToken).focus();
}

async function onLoginSubmit(ev) {
  ev.preventDefault();
  showNotice(ui.loginError, '');
  let token;
  ui.loginButton.disabled = true;
  try {
    if (state.devMode) {
      const name = ui.loginName.value.trim();
      if (!USER_ID_RE.test(name)) {
        showNotice(ui.loginError, 'User ids are 1–128 characters: letters, digits and _ . @ : -');
        ui.loginName.focus();
        return;
      }
      token = await devToken(name, false);
    } else {
      token = ui.loginToken.value.trim();
      if (!token || token.split('.').length !== 3) {
        showNotice(ui.loginError, 'Paste a JWT (three dot-separated parts).');
        ui.loginToken.focus();
        return;
      }
    }
  } catch (e) {
    showNotice(ui.loginError, `Sign-in failed: ${e.message}`);
    return;
  } finally {
    ui.loginButton.disabled = false;
  }
  session.set(TOKEN_KEY, token);
  startChat(token);
}

function claimedUser(token) {
  const c = jwtClaims(token) || {};
  return c.sub || c.userId || c.user_id || c.uid || null;
}

function startChat(token) {
  state.token = token;
  state.me = claimedUser(token);
  ui.me.textContent = state.me || '(unknown)';
  ui.login.hidden = true;
  ui.chat.hidden = false;
  ui.loginName.value = '';
  ui.loginToken.value = '';
  ui.peer.value = session.get(PEER_KEY) || '';
  ui.chatId.value = session.get(CHAT_KEY) || 'general';
  (ui.peer.value ? ui.input : ui.peer).focus();
  state.attempt = 0;
  connect();
}

function signOut(errorText) {
  clearTimers();
  const ws = state.ws;
  state.ws = null;
  state.generation++;
  state.joined = false;
  if (ws && ws.readyState <= WebSocket.OPEN) {
    try {
      ws.close(1000, 'signed out');
    } catch {
      /* ignore */
    }
  }
  session.set(TOKEN_KEY, null);
  state.token = null;
  state.me = null;
  state.inById.clear();
  state.outById.clear();
  state.byClientId.clear();
  state.earlyReceipts.clear();
  state.ackQueue.clear();
  state.drainRemaining = 0;
  ui.messages.replaceChildren();
  updateEmptyHint();
  showNotice(ui.sendError, '');
  ui.historyNotice.hidden = true;
  showLogin(errorText);
}

function clearTimers() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdownTimer);
  clearTimeout(state.ackTimer);
  state.reconnectTimer = null;
  state.countdownTimer = null;
  state.ackTimer = null;
}

// ---------------------------------------------------------------- connection

function wsUrl(token) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/ws?token=${encodeURIComponent(token)}`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdownTimer);
  state.reconnectTimer = null;
  state.countdownTimer = null;
  if (!state.token) return;
  const gen = ++state.generation;
  state.joined = false;
  state.everOpened = false;
  setStatus('connecting', 'connecting…');
  let ws;
  try {
    ws = new WebSocket(wsUrl(state.token));
  } catch (e) {
    scheduleReconnect(0, String(e.message || e));
    return;
  }
  state.ws = ws;
  ws.addEventListener('open', () => {
    if (gen !== state.generation) return;
    state.everOpened = true;
    // A stable device id: this browser catches up on what it missed, even what another
    // device of the same user already received (docs/PROTOCOL.md, "Devices").
    send({ event: 'join_chat', data: { deviceId: deviceId() } });
  });
  ws.addEventListener('message', (ev) => {
    if (gen !== state.generation) return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      console.warn('msgbuf: ignoring non-JSON frame');
      return;
    }
    handleFrame(frame);
  });
  ws.addEventListener('close', (ev) => {
    if (gen !== state.generation) return;
    state.ws = null;
    state.joined = false;
    // Sent but not yet accepted: resend (same clientMsgId) after the next join.
    for (const entry of state.byClientId.values()) {
      if (entry.li.dataset.status === 'pending') entry.sent = false;
    }
    const opened = state.everOpened;
    scheduleReconnect(ev.code, ev.reason);
    if (!opened) checkTokenStillValid();
  });
  // 'error' is always followed by 'close'; nothing to do here.
}

/** This browser's device id, made once and kept in localStorage (shared by its tabs). */
function deviceId() {
  const key = 'msgbuf.deviceId';
  let id = null;
  try {
    id = localStorage.getItem(key);
  } catch {
    // Storage disabled: an id for this page's life only.
  }
  if (!id || !/^[A-Za-z0-9_.:-]{1,64}$/.test(id)) {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    id = 'web-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
    try {
      localStorage.setItem(key, id);
    } catch {
      // As above.
    }
  }
  return id;
}

function send(frame) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function scheduleReconnect(code, reason) {
  if (!state.token) return;
  const exp = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
  const delay = Math.min(BACKOFF_MAX_MS, Math.round(exp * (0.8 + Math.random() * 0.4)));
  state.attempt++;
  const why = CLOSE_REASONS[code] || reason || (code ? `closed (${code})` : '');
  const until = Date.now() + delay;
  const tick = () => {
    const secs = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    setStatus('reconnecting', `reconnecting in ${secs}s${why ? ` — ${why}` : ''}`);
  };
  tick();
  setInstance(null);
  clearInterval(state.countdownTimer);
  state.countdownTimer = setInterval(tick, 1000);
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
}

// When the socket never opened, the upgrade may have been refused because the
// token is invalid or expired: ask a REST endpoint, and sign out on 401.
async function checkTokenStillValid() {
  const token = state.token;
  if (!token || !state.me) return;
  try {
    await api(`/api/messages/buffered/${encodeURIComponent(state.me)}?limit=1`, { token });
  } catch (e) {
    // Only if still signed in with the same token (not signed out/in meanwhile).
    if (state.token === token && e instanceof ApiError && e.status === 401) {
      signOut('Your token was rejected (expired or invalid). Please sign in again.');
    }
  }
}

window.addEventListener('online', () => {
  if (state.token && !state.ws) {
    state.attempt = 0;
    connect();
  }
});

// ---------------------------------------------------------------- frames

function handleFrame(frame) {
  const data = frame && frame.data ? frame.data : {};
  switch (frame && frame.event) {
    case 'joined':
      onJoined(data);
      break;
    case 'chat_message':
      onChatMessage(data);
      break;
    case 'message_accepted':
      onAccepted(data);
      break;
    case 'receipt':
      onReceipt(data);
      break;
    case 'error':
      onError(data);
      break;
    default:
      console.debug('msgbuf: unknown event', frame && frame.event);
  }
}

function onJoined(data) {
  state.joined = true;
  state.attempt = 0;
  if (data.userId) {
    state.me = data.userId;
    ui.me.textContent = data.userId;
  }
  state.drainRemaining = Number(data.pending) > 0 ? Number(data.pending) : 0;
  clearInterval(state.countdownTimer);
  state.countdownTimer = null;
  setStatus('connected', 'connected');
  setInstance(data.instance || null);
  // Stays up until dismissed: a later join that says false does not fill the gap.
  if (data.missedHistory === true) ui.historyNotice.hidden = false;
  ui.status.dataset.pending = String(state.drainRemaining);
  // Flush what was written while disconnected (and resend unaccepted ones).
  for (const entry of state.byClientId.values()) {
    if (!entry.sent && entry.li.dataset.status === 'pending') trySend(entry);
  }
  if (state.ackQueue.size) scheduleAckFlush();
}

function onChatMessage(m) {
  if (!m || !m.id) return;
  const fromDrain = state.drainRemaining > 0;
  if (fromDrain) state.drainRemaining--;
  const offline = fromDrain || m.redelivery === true;
  queueAck(m.id);
  if (state.inById.has(m.id) || state.outById.has(m.id)) return; // duplicate (e.g. redelivery after reconnect)
  // Sent by this user from another device (the sent-message sync): shown as sent.
  const mine = state.me && m.from === state.me && m.to !== state.me;
  const li = renderMessage({
    id: m.id,
    direction: mine ? 'out' : 'in',
    from: m.from,
    to: m.to,
    chatId: m.chatId,
    message: m.message,
    timestamp: m.timestamp,
    offline: offline && !mine,
  });
  stamp(li, m.timestamp);
  if (mine) {
    li.dataset.synced = 'true';
    li.querySelector('.meta').append(' ', el('span', { class: 'badge synced-badge', text: 'from your other device' }));
    // Receipts go to all of the sender's sockets and may overtake the sync.
    if (state.earlyReceipts.has(m.id)) {
      state.earlyReceipts.delete(m.id);
      setMessageStatus(li, 'delivered');
    } else {
      setMessageStatus(li, 'accepted');
    }
    state.outById.set(m.id, li);
  } else {
    state.inById.set(m.id, li);
  }
  appendMessage(li);
  // The conversation to continue is the other party's: for a synced send, its receiver.
  const other = mine ? m.to : m.from;
  if (!ui.peer.value.trim() && other) {
    ui.peer.value = other;
    session.set(PEER_KEY, other);
  }
}

function onAccepted(data) {
  const entry = data.clientMsgId ? state.byClientId.get(data.clientMsgId) : null;
  if (!entry) return;
  const li = entry.li;
  if (data.id) {
    li.dataset.id = data.id;
    state.outById.set(data.id, li);
  }
  if (data.timestamp) {
    const t = li.querySelector('time');
    if (t) {
      t.textContent = formatTime(data.timestamp);
      t.dateTime = String(data.timestamp);
    }
    stamp(li, data.timestamp);
  }
  if (li.dataset.status === 'pending' || li.dataset.status === 'failed') setMessageStatus(li, 'accepted');
  state.byClientId.delete(data.clientMsgId);
  if (data.id && state.earlyReceipts.has(data.id)) {
    state.earlyReceipts.delete(data.id);
    setMessageStatus(li, 'delivered');
  }
}

function onReceipt(data) {
  if (!data.id) return;
  const li = state.outById.get(data.id);
  if (li) {
    setMessageStatus(li, 'delivered');
  } else {
    state.earlyReceipts.set(data.id, data);
    if (state.earlyReceipts.size > 1000) {
      state.earlyReceipts.delete(state.earlyReceipts.keys().next().value);
    }
  }
}

function onError(data) {
  const text = `${data.message || data.code || 'error'}${data.code ? ` (${data.code})` : ''}`;
  if (data.clientMsgId && state.byClientId.has(data.clientMsgId)) {
    const entry = state.byClientId.get(data.clientMsgId);
    state.byClientId.delete(data.clientMsgId);
    setMessageStatus(entry.li, 'failed', text);
    showNotice(ui.sendError, `Message not sent: ${text}`);
    return;
  }
  if (data.code === 'unauthorized') {
    signOut(`Signed out by the server: ${text}`);
    return;
  }
  showNotice(ui.sendError, `Server error: ${text}`);
}

// ---------------------------------------------------------------- acks

function queueAck(id) {
  state.ackQueue.add(id);
  scheduleAckFlush();
}

function scheduleAckFlush() {
  if (state.ackTimer) return;
  state.ackTimer = setTimeout(flushAcks, ACK_BATCH_MS);
}

function flushAcks() {
  state.ackTimer = null;
  if (!state.joined || !state.ackQueue.size) return; // kept; sent after the next join
  const ids = Array.from(state.ackQueue);
  for (let i = 0; i < ids.length; i += ACK_MAX_IDS) {
    const chunk = ids.slice(i, i + ACK_MAX_IDS);
    if (!send({ event: 'ack', data: { ids: chunk } })) return;
    for (const id of chunk) state.ackQueue.delete(id);
  }
}

// ---------------------------------------------------------------- sending

function onSendSubmit(ev) {
  ev.preventDefault();
  showNotice(ui.sendError, '');
  const text = ui.input.value;
  if (!text.trim()) {
    ui.input.focus();
    return;
  }
  const to = ui.peer.value.trim();
  if (!USER_ID_RE.test(to)) {
    showNotice(ui.sendError, to ? 'User ids are 1–128 characters: letters, digits and _ . @ : -' : 'Enter the user id to send to.');
    ui.peer.focus();
    return;
  }
  const chatId = ui.chatId.value.trim() || 'general';
  ui.chatId.value = chatId;
  session.set(PEER_KEY, to);
  session.set(CHAT_KEY, chatId);
  const clientMsgId = randomId();
  const li = renderMessage({
    id: '',
    direction: 'out',
    from: state.me || 'me',
    to,
    chatId,
    message: text,
    timestamp: Date.now(),
    offline: false,
  });
  li.dataset.clientMsgId = clientMsgId;
  appendMessage(li, true);
  const entry = { li, sent: false, frame: { event: 'chat_message', data: { to, chatId, message: text, clientMsgId } } };
  state.byClientId.set(clientMsgId, entry);
  trySend(entry);
  ui.input.value = '';
  ui.input.focus();
}

function trySend(entry) {
  if (!state.joined) return;
  entry.sent = send(entry.frame);
}

// ---------------------------------------------------------------- rendering

const STATUS_TEXT = {
  pending: { mark: '…', label: 'sending' },
  accepted: { mark: '✓', label: 'accepted by the server' },
  delivered: { mark: '✓✓', label: 'delivered' },
  failed: { mark: '!', label: 'not sent' },
};

function renderMessage(m) {
  const isOut = m.direction === 'out';
  const time = el('time', { text: formatTime(m.timestamp) });
  if (m.timestamp) time.dateTime = String(m.timestamp);
  const meta = el(
    'div',
    { class: 'meta' },
    el('span', { class: 'from', text: isOut ? 'you' : m.from || '?' }),
    el('span', { class: 'arrow', 'aria-hidden': 'true', text: ' → ' }),
    el('span', { class: 'to', text: isOut ? m.to : 'you' }),
    el('span', { class: 'chat-tag', text: ` #${m.chatId || ''}` }),
    ' ',
    time,
  );
  if (m.offline) meta.append(' ', el('span', { class: 'badge offline-badge', text: 'sent while you were offline' }));
  const li = el(
    'li',
    {
      class: `msg ${isOut ? 'out' : 'in'}${m.offline ? ' offline' : ''}`,
      dataset: { id: m.id || '', direction: isOut ? 'out' : 'in' },
    },
    meta,
    el('p', { class: 'body', text: m.message ?? '' }),
  );
  if (isOut) {
    li.append(
      el('span', { class: 'ticks' },
        el('span', { class: 'tick-mark', 'aria-hidden': 'true' }),
        el('span', { class: 'tick-label visually-hidden' })),
    );
    setMessageStatus(li, 'pending');
  } else {
    li.dataset.status = 'delivered';
  }
  return li;
}

function setMessageStatus(li, status, detail) {
  li.dataset.status = status;
  const t = STATUS_TEXT[status];
  const mark = li.querySelector('.tick-mark');
  const label = li.querySelector('.tick-label');
  if (mark && t) mark.textContent = t.mark;
  if (label && t) label.textContent = detail ? `${t.label}: ${detail}` : t.label;
  const ticks = li.querySelector('.ticks');
  if (ticks && t) ticks.title = detail ? `${t.label}: ${detail}` : t.label;
}

/** Records the server's timestamp of a message (the browser's clock is not comparable). */
function stamp(li, timestamp) {
  const d = toDate(timestamp);
  if (d) li.dataset.ts = String(d.getTime());
}

/**
 * Where a message goes: by server timestamp among the stamped ones at the end of the list.
 * A join's catch-up sends in id order, and ids made on different instances are ordered
 * only to the second; a local send not yet accepted stays where it was written.
 */
function placeBefore(li) {
  const t = Number(li.dataset.ts);
  if (!li.dataset.ts || !Number.isFinite(t)) return null;
  let before = null;
  for (let node = ui.messages.lastElementChild; node; node = node.previousElementSibling) {
    if (!node.dataset.ts || Number(node.dataset.ts) <= t) break;
    before = node;
  }
  return before;
}

function appendMessage(li, forceScroll = false) {
  const list = ui.messages;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.insertBefore(li, placeBefore(li));
  updateEmptyHint();
  if (forceScroll || nearBottom) list.scrollTop = list.scrollHeight;
}

function updateEmptyHint() {
  ui.emptyHint.hidden = ui.messages.children.length > 0;
}

// ---------------------------------------------------------------- wiring

ui.loginForm.addEventListener('submit', onLoginSubmit);
ui.sendForm.addEventListener('submit', onSendSubmit);
ui.logout.addEventListener('click', () => signOut());
ui.historyDismiss.addEventListener('click', () => {
  ui.historyNotice.hidden = true;
  ui.input.focus();
});
ui.input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    ui.sendForm.requestSubmit();
  }
});
ui.peer.addEventListener('change', () => session.set(PEER_KEY, ui.peer.value.trim()));
ui.chatId.addEventListener('change', () => session.set(CHAT_KEY, ui.chatId.value.trim()));

const saved = session.get(TOKEN_KEY);
if (saved) startChat(saved);
else showLogin();
