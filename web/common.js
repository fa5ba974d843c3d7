// Shared helpers for the msgbuf chat page and admin page.
// Plain ES module, no dependencies; served as /static/common.js.

/** Error thrown by api() for non-2xx answers; carries the server's error code. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status;
    this.code = code || 'http_' + status;
  }
}

/**
 * Call a JSON endpoint of the server.
 * Errors are answered as {"error": {"code", "message"}}; they become ApiError.
 */
export async function api(path, { method = 'GET', token, body } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, 'network', 'Server not reachable');
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = data && data.error ? data.error : {};
    throw new ApiError(res.status, err.code, err.message || text.slice(0, 200) || res.statusText);
  }
  return data;
}

/** Fetch plain text (used for /metrics). */
export async function fetchText(path, token) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, { headers, cache: 'no-store' });
  } catch {
    throw new ApiError(0, 'network', 'Server not reachable');
  }
  const text = await res.text();
  if (!res.ok) throw new ApiError(res.status, 'http_' + res.status, text.slice(0, 200) || res.statusText);
  return text;
}

/** True when the server runs with --insecure-dev (GET /dev/status answers {"insecureDev": true}). */
export async function isInsecureDev() {
  try {
    const res = await fetch('/dev/status', { cache: 'no-store' });
    if (!res.ok) return false;
    const data = await res.json();
    return data && data.insecureDev === true;
  } catch {
    return false;
  }
}

/** Get a development token (only works against a server started with --insecure-dev). */
export async function devToken(userId, admin) {
  const data = await api('/dev/token', { method: 'POST', body: { userId, admin: !!admin } });
  if (!data || typeof data.token !== 'string') throw new ApiError(500, 'internal', 'No token in answer');
  return data.token;
}

/** Read the claims of a JWT without verifying it (display only). */
export function jwtClaims(token) {
  try {
    const part = token.split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/** Token storage in sessionStorage (per tab, gone when the tab closes). */
export const session = {
  get(key) {
    try {
      return sessionStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, value);
    } catch {
      /* storage disabled: keep working without persistence */
    }
  },
};

/** Timestamps may come as ISO strings, epoch milliseconds or extended JSON {"$date": ...}. */
export function toDate(ts) {
  if (ts === null || ts === undefined || ts === '') return null;
  if (typeof ts === 'object' && ts.$date !== undefined) return toDate(ts.$date);
  if (typeof ts === 'object' && ts.$numberLong !== undefined) return toDate(Number(ts.$numberLong));
  const d = typeof ts === 'number' ? new Date(ts) : new Date(String(ts));
  return Number.isNaN(d.getTime()) ? null : d;
}

export function formatTime(ts) {
  const d = toDate(ts);
  if (!d) return '';
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function formatDateTime(ts) {
  const d = toDate(ts);
  if (!d) return '—';
  return d.toLocaleString([], {
    year: 'numeric',
    month: '2-digit',
    day: '2-digit',
    hour: '2-digit',
    minute: '2-digit',
    second: '2-digit',
  });
}

/** "3 s", "4 min", "2 h" */
export function formatAge(ms) {
  if (ms < 0 || !Number.isFinite(ms)) return '';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.round(m / 60);
  if (h < 48) return `${h} h`;
  return `${Math.round(h / 24)} d`;
}

/**
 * Tiny DOM builder: el('li', {class: 'x', dataset: {id: '1'}}, 'text', child).
 * Text is always inserted as text nodes (never as HTML).
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

/** Random id for clientMsgId (crypto.randomUUID needs a secure context; fall back otherwise). */
export function randomId() {
  if (globalThis.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Show a short message in an element with role=alert/status; empty text hides it. */
export function showNotice(node, text, kind = 'error') {
  if (!node) return;
  node.textContent = text || '';
  node.hidden = !text;
  node.dataset.kind = kind;
}
