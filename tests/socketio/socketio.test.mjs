// msgbuf's Socket.IO endpoint with the real socket.io-client 4.x, against two instances
// (A and B) on one replica set: what a client of the Node Socket.IO server sees after the
// move. Run by scripts/socketio-test (`node --test`).
import { createHmac } from 'node:crypto';
import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';

import { A, B, closeAll, getJson, sio, sioJoined, token, user, v1 } from './helpers.mjs';

afterEach(closeAll);

/** Sends with an acknowledgement callback; the callback's argument. */
function send(socket, to, message, extra = {}) {
  return socket.emitWithAck('chat_message', { to, chatId: 'chat-1', message, ...extra });
}

test('a message crosses instances live, with message_accepted and a receipt once acked', async () => {
  const [alice, bob] = [user('alice'), user('bob')];
  const { socket: a } = await sioJoined(A, alice);
  const { socket: b, joined } = await sioJoined(B, bob);
  assert.equal(joined.userId, bob);
  assert.equal(joined.pending, 0);

  a.emit('chat_message', { to: bob, chatId: 'chat-1', message: 'hi bob', clientMsgId: 'x-1' });
  const accepted = await a.inbox.next('message_accepted');
  assert.equal(accepted.clientMsgId, 'x-1');
  const got = await b.inbox.next('chat_message');
  assert.deepEqual(
    { id: got.id, from: got.from, to: got.to, chatId: got.chatId, message: got.message },
    { id: accepted.id, from: alice, to: bob, chatId: 'chat-1', message: 'hi bob' },
  );
  assert.equal(got.redelivery, undefined);

  b.emit('ack', { ids: [got.id] });
  const receipt = await a.inbox.next('receipt');
  assert.deepEqual([receipt.id, receipt.status], [accepted.id, 'delivered']);
});

test('the ack callback of chat_message carries the stored id', async () => {
  const [alice, carol] = [user('alice'), user('carol')];
  const { socket: a } = await sioJoined(A, alice);
  const answer = await send(a, carol, 'stored for carol', { clientMsgId: 'cb-1' });
  assert.match(answer.id, /^[0-9a-f]{24}$/);
  assert.equal(answer.clientMsgId, 'cb-1');
  const event = await a.inbox.next('message_accepted');
  assert.deepEqual(answer, event, 'the callback gets the message_accepted object');
  // carol is offline: the message waits in MongoDB under that id.
  const page = await getJson(`${B}/api/messages/buffered/${carol}`, await token(B, carol));
  assert.deepEqual(
    page.messages.map((m) => [m.id, m.from, m.message]),
    [[answer.id, alice, 'stored for carol']],
  );
  // Refusals reach the callback too.
  const refused = await send(a, 'not a user id', 'x', { clientMsgId: 'cb-2' });
  assert.equal(refused.error.code, 'bad_request');
  assert.equal((await a.inbox.next('error')).clientMsgId, 'cb-2');
});

test('an offline receiver drains 30 messages oldest first when it joins', async () => {
  const [alice, dave] = [user('alice'), user('dave')];
  const { socket: a } = await sioJoined(A, alice);
  const ids = [];
  for (let i = 0; i < 30; i++) ids.push((await send(a, dave, `m${i}`)).id);

  const { socket: d, joined } = await sioJoined(B, dave);
  assert.equal(joined.pending, 30);
  const got = await d.inbox.chats(30);
  assert.deepEqual(got.map((m) => m.message), ids.map((_, i) => `m${i}`));
  assert.deepEqual(got.map((m) => m.id), ids);
  // Acked (an array of ids), they are pending no more: a receipt each, and a new join
  // finds nothing to drain.
  d.emit('ack', got.map((m) => m.id));
  const receipts = [];
  for (let i = 0; i < 30; i++) receipts.push((await a.inbox.next('receipt')).id);
  assert.deepEqual(receipts.sort(), [...ids].sort());
  const { joined: again } = await sioJoined(A, dave);
  assert.equal(again.pending, 0);
});

test('three sockets of one user on two instances all receive a live message', async () => {
  const [alice, erin] = [user('alice'), user('erin')];
  const sockets = [
    (await sioJoined(A, erin)).socket,
    (await sioJoined(A, erin, { transports: ['websocket'] })).socket,
    (await sioJoined(B, erin)).socket,
  ];
  const { socket: a } = await sioJoined(B, alice);
  const { id } = await send(a, erin, 'to every device');
  for (const s of sockets) {
    const got = await s.inbox.next('chat_message');
    assert.deepEqual([got.id, got.message], [id, 'to every device']);
  }
});

test('a repeated clientMsgId gets one id and one stored message', async () => {
  const [alice, frank] = [user('alice'), user('frank')];
  const { socket: a } = await sioJoined(A, alice);
  const first = await send(a, frank, 'once', { clientMsgId: 'same-1' });
  const second = await send(a, frank, 'once', { clientMsgId: 'same-1' });
  assert.equal(second.id, first.id);
  const page = await getJson(`${A}/api/messages/buffered/${frank}`, await token(A, frank));
  assert.deepEqual(page.messages.map((m) => m.id), [first.id]);
  const { socket: f } = await sioJoined(B, frank);
  assert.equal((await f.inbox.next('chat_message')).id, first.id);
});

/** An HS256 JWT signed with another secret. */
function forged(sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${body}.${createHmac('sha256', 'not-the-secret').update(body).digest('base64url')}`;
}

test('a missing or bad token gets connect_error with a clear message', async () => {
  const cases = [
    [{}, /missing token/],
    [{ token: 'garbage' }, /malformed token/],
    [{ token: forged('mallory') }, /token signature invalid/],
  ];
  for (const [auth, message] of cases) {
    const s = await sio(A, 'mallory', { auth, reconnection: false, join: false });
    const err = await s.inbox.next('connect_error');
    assert.match(err.message, message);
    assert.equal(s.connected, false);
  }
  // A client that cannot set `auth` passes the token in the query.
  const q = user('quinn');
  const s = await sio(B, q, { auth: {}, query: { token: await token(B, q) } });
  assert.equal((await s.inbox.next('joined')).userId, q);
});

test('nobody joins as another user', async () => {
  const [mallory, victim, alice] = [user('mallory'), user('victim'), user('alice')];
  const m = await sio(A, mallory, { join: false });
  await m.inbox.next('connect');
  const answer = await m.emitWithAck('join_chat', victim);
  assert.equal(answer.error.code, 'forbidden');
  assert.equal((await m.inbox.next('error')).code, 'forbidden');
  const byObject = await m.emitWithAck('join_chat', { userId: victim });
  assert.equal(byObject.error.code, 'forbidden');

  // Nothing was joined: a message to the victim stays undelivered. Mallory then joins as
  // herself and gets a later message, so the first one had its chance to be pushed.
  const { socket: a } = await sioJoined(B, alice);
  const toVictim = await send(a, victim, 'not for mallory');
  assert.equal((await m.emitWithAck('join_chat', mallory)).userId, mallory);
  const toMallory = await send(a, mallory, 'for mallory');
  assert.equal((await m.inbox.next('chat_message')).id, toMallory.id);
  assert.equal(m.inbox.count('chat_message'), 0);
  const page = await getJson(`${A}/api/messages/buffered/${victim}`, await token(A, victim));
  assert.deepEqual(page.messages.map((x) => [x.id, x.delivered]), [[toVictim.id, false]]);
});

test('the long-polling transport delivers both ways', async () => {
  const [paula, alice] = [user('paula'), user('alice')];
  const { socket: p } = await sioJoined(A, paula, { transports: ['polling'] });
  const { socket: a } = await sioJoined(B, alice, { transports: ['polling'] });
  assert.equal(p.io.engine.transport.name, 'polling');
  const { id } = await send(a, paula, 'over polling');
  const got = await p.inbox.next('chat_message');
  assert.deepEqual([got.id, got.message], [id, 'over polling']);
  p.emit('ack', got.id);
  assert.equal((await a.inbox.next('receipt')).id, id);
  const back = await send(p, alice, 'polling back');
  assert.equal((await a.inbox.next('chat_message')).id, back.id);
  assert.equal(p.io.engine.transport.name, 'polling');
});

test('a v1 client and a Socket.IO client talk to each other', async () => {
  const [vera, sid] = [user('vera'), user('sid')];
  const v = await v1(A, vera);
  const { socket: s } = await sioJoined(B, sid);

  v.send('chat_message', { to: sid, chatId: 'mixed', message: 'from v1', clientMsgId: 'v-1' });
  const accepted = await v.inbox.next('message_accepted');
  const got = await s.inbox.next('chat_message');
  assert.deepEqual([got.id, got.from, got.message], [accepted.id, vera, 'from v1']);
  s.emit('ack', [got.id]);
  assert.equal((await v.inbox.next('receipt')).id, accepted.id);

  const { id } = await send(s, vera, 'from socket.io');
  const back = await v.inbox.next('chat_message');
  assert.deepEqual([back.id, back.from, back.message], [id, sid, 'from socket.io']);
  v.send('ack', { ids: [back.id] });
  assert.equal((await s.inbox.next('receipt')).id, id);
});

test('a client whose transport drops reconnects by itself and gets what was sent meanwhile', async () => {
  const [alice, rita] = [user('alice'), user('rita')];
  const { socket: r } = await sioJoined(A, rita, { transports: ['websocket'] });
  await r.inbox.next('connect'); // the first one
  const { socket: a } = await sioJoined(B, alice);
  const before = await send(a, rita, 'before');
  assert.equal((await r.inbox.next('chat_message')).id, before.id);
  r.emit('ack', before.id);

  // The connection dies without a goodbye (no close frame), as when a network drops.
  r.io.engine.transport.ws.terminate();
  assert.equal(await r.inbox.next('disconnect'), 'transport close');
  const meanwhile = [];
  for (let i = 0; i < 3; i++) meanwhile.push((await send(a, rita, `meanwhile ${i}`)).id);

  // The client reconnects and re-joins on its own; each message arrives (drained, live,
  // or re-sent after the ack timeout if it was pushed to the dead connection).
  await r.inbox.next('connect');
  const seen = new Set();
  while (seen.size < meanwhile.length) {
    const m = await r.inbox.next('chat_message');
    seen.add(m.id);
  }
  assert.deepEqual([...seen].sort(), [...meanwhile].sort());
});
