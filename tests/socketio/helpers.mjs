// Helpers of the Socket.IO end-to-end tests: tokens, clients (socket.io-client and a
// protocol-v1 WebSocket client) whose events land in an inbox that a test waits on with a
// deadline, and a condition poller. No fixed sleeps anywhere.
import { randomBytes } from 'node:crypto';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

export const A = process.env.MSGBUF_A;
export const B = process.env.MSGBUF_B;
if (!A || !B) {
  throw new Error('set MSGBUF_A and MSGBUF_B to two msgbuf instances (scripts/socketio-test does)');
}
/** Deadline of every wait, in ms. */
export const T = Number(process.env.SOCKETIO_TEST_TIMEOUT_MS || 20000);

/** A user id unique to this run, so tests never see each other's messages. */
export function user(name) {
  return `${name}-${randomBytes(4).toString('hex')}`;
}

/** A token from the instance's `/dev/token` (the instances run with --insecure-dev). */
export async function token(base, userId, admin = false) {
  const res = await fetch(`${base}/dev/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ userId, admin }),
  });
  if (res.status !== 200) throw new Error(`/dev/token: ${res.status}`);
  return (await res.json()).token;
}

/** GET with a bearer token; the JSON body. */
export async function getJson(url, bearer) {
  const res = await fetch(url, { headers: { authorization: `Bearer ${bearer}` } });
  if (res.status !== 200) throw new Error(`GET ${url}: ${res.status}`);
  return res.json();
}

/** Events received, in order; `next` takes the first that matches, waiting up to `ms`. */
export class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(event, data) {
    this.items.push({ event, data });
    this.waiters = this.waiters.filter((w) => !w.take());
  }

  next(event, match = () => true, ms = T) {
    return new Promise((resolve, reject) => {
      const w = {
        take: () => {
          const i = this.items.findIndex((x) => x.event === event && match(x.data));
          if (i < 0) return false;
          const [x] = this.items.splice(i, 1);
          clearTimeout(w.timer);
          resolve(x.data);
          return true;
        },
      };
      if (w.take()) return;
      w.timer = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        const seen = this.items.map((x) => x.event).join(', ') || 'nothing';
        reject(new Error(`timed out after ${ms} ms waiting for \`${event}\` (inbox: ${seen})`));
      }, ms);
      this.waiters.push(w);
    });
  }

  /** The `n` next `chat_message`s (in arrival order). */
  async chats(n, ms = T) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await this.next('chat_message', () => true, ms));
    return out;
  }

  count(event) {
    return this.items.filter((x) => x.event === event).length;
  }
}

const open = new Set();

/** Closes every client the helpers opened (call from `afterEach`). */
export function closeAll() {
  for (const c of open) c.close();
  open.clear();
}

/**
 * A socket.io-client socket for `userId` on `base`, every event in `socket.inbox`. It
 * re-joins on every (re)connect, as the Node app did, unless `join: false`.
 */
export async function sio(base, userId, { join = true, transports, auth, query, ...opts } = {}) {
  const socket = io(base, {
    auth: auth ?? { token: await token(base, userId) },
    query,
    transports: transports ?? ['polling', 'websocket'],
    forceNew: true,
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
    ackTimeout: T,
    ...opts,
  });
  socket.inbox = new Inbox();
  socket.onAny((event, data) => socket.inbox.push(event, data));
  socket.on('connect_error', (err) => socket.inbox.push('connect_error', err));
  socket.on('disconnect', (reason) => socket.inbox.push('disconnect', reason));
  socket.on('connect', () => socket.inbox.push('connect', socket.id));
  if (join) socket.on('connect', () => socket.emit('join_chat', userId));
  open.add(socket);
  return socket;
}

/** Connects and joins; the `joined` data. */
export async function sioJoined(base, userId, opts = {}) {
  const socket = await sio(base, userId, opts);
  const joined = await socket.inbox.next('joined');
  return { socket, joined };
}

/** A protocol-v1 client on `/ws` (the `ws` package), every event in `client.inbox`. */
export async function v1(base, userId) {
  const url = `${base.replace(/^http/, 'ws')}/ws?token=${await token(base, userId)}`;
  const ws = new WebSocket(url);
  const client = {
    inbox: new Inbox(),
    send: (event, data) => ws.send(JSON.stringify({ event, data })),
    close: () => ws.close(),
  };
  ws.on('message', (text) => {
    const { event, data } = JSON.parse(text.toString());
    client.inbox.push(event, data);
  });
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  open.add(client);
  client.send('join_chat', {});
  await client.inbox.next('joined');
  return client;
}

/** Polls `check` until it returns a truthy value, or fails after `ms` naming `what`. */
export async function until(what, check, ms = T) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
