// node-postgres LISTEN through the pooler's transaction port (client.on('notification')).
//
// DP_LISTENERS clients of app 1 LISTEN on a shared channel and on one of their own, and
// run short transactions now and then; DP_WORKERS clients of app 1 run transactions all
// along; DP_SENDERS clients of app 1 each send DP_NOTIFICATIONS numbered notifications on
// the shared channel (pg_notify, in autocommit) and one on each listener's own channel.
// App 2 listens on the same channel names and sends its own. Every app 1 listener must get
// each of its app's notifications exactly once, in order per sender, and nothing of app
// 2's; every app 2 listener exactly its app's. The Rust side (tests/tests/drivers.rs)
// watches the app's server count meanwhile.
//
// Environment: DP_HOST, DP_PORT, DP_DBNAME, DP_APP{1,2}_{USER,PASSWORD}, optional
// DP_LISTENERS (50), DP_WORKERS (8), DP_SENDERS (2), DP_NOTIFICATIONS (100),
// DP_OTHER_LISTENERS (3), DP_ISOLATED (1; 0 straight to Postgres, where every app hears
// every other); NODE_PATH finds `pg`.

'use strict';

const { Client } = require('pg');
const pgVersion = require('pg/package.json').version;

const SHARED = 'matrix_events';
// Through the pooler an app hears only its own sessions' notifications.
const ISOLATED = (process.env.DP_ISOLATED || '1') === '1';
const DEADLINE_MS = 120000;

function env(name, fallback) {
  const v = process.env[name] || fallback;
  if (!v) {
    console.error(`environment variable ${name} is not set`);
    process.exit(2);
  }
  return v;
}

function check(ok, what) {
  if (!ok) {
    throw new Error(what);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function connect(app) {
  const conn = new Client({
    host: env('DP_HOST'),
    port: Number(env('DP_PORT')),
    database: env('DP_DBNAME'),
    user: app.user,
    password: app.password,
  });
  await conn.connect();
  return conn;
}

// A listening client: what it received, by channel, in arrival order.
async function listener(app, own) {
  const conn = await connect(app);
  const got = [];
  conn.on('notification', (n) => got.push([n.channel, n.payload]));
  await conn.query(`LISTEN ${SHARED}`);
  await conn.query(`LISTEN "${own}"`);
  return { conn, got, own };
}

async function transactions(conn, app, until) {
  let n = 0;
  while (!until()) {
    const k = (n % 100) + 1;
    await conn.query('BEGIN');
    const r = await conn.query('SELECT v FROM kv WHERE k = $1', [k]);
    await conn.query('COMMIT');
    check(r.rows.length === 1 && r.rows[0].v === `${app.user}:${k}`, `kv ${k} = ${JSON.stringify(r.rows)}`);
    n += 1;
  }
  return n;
}

async function send(app, tag, count, directs) {
  const conn = await connect(app);
  try {
    for (let seq = 0; seq < count; seq++) {
      await conn.query('SELECT pg_notify($1, $2)', [SHARED, `${tag}:${seq}`]);
    }
    for (const [channel, payload] of directs) {
      await conn.query('SELECT pg_notify($1, $2)', [channel, payload]);
    }
  } finally {
    await conn.end();
  }
}

// Checks one listener's notifications: per sender tag, 0..count-1 in order, once each,
// and exactly the direct ones it is owed.
function verify(l, senders, count, direct) {
  const next = new Map(senders.map((s) => [s, 0]));
  let directs = 0;
  for (const [channel, payload] of l.got) {
    if (channel === l.own) {
      if (payload !== direct && !ISOLATED) {
        continue;
      }
      check(payload === direct, `${l.own}: unexpected ${payload}`);
      directs += 1;
      continue;
    }
    check(channel === SHARED, `${l.own}: a notification on ${channel}`);
    const cut = payload.lastIndexOf(':');
    const tag = payload.slice(0, cut);
    const seq = Number(payload.slice(cut + 1));
    if (!next.has(tag) && !ISOLATED) {
      // Straight to Postgres (DP_DRIVERS_DIRECT): every app hears every app.
      continue;
    }
    check(next.has(tag), `${l.own}: ${payload} is not from its app`);
    check(seq === next.get(tag), `${l.own}: ${payload} out of order or repeated (expected ${tag}:${next.get(tag)})`);
    next.set(tag, seq + 1);
  }
  for (const [tag, n] of next) {
    check(n === count, `${l.own}: ${n} of ${count} from ${tag}`);
  }
  check(directs === 1, `${l.own}: ${directs} direct notifications`);
}

function expected(l, senders, count) {
  return senders.length * count + 1;
}

async function main() {
  const apps = [1, 2].map((i) => ({ user: env(`DP_APP${i}_USER`), password: env(`DP_APP${i}_PASSWORD`) }));
  const listeners = Number(env('DP_LISTENERS', '50'));
  const workers = Number(env('DP_WORKERS', '8'));
  const senders = Number(env('DP_SENDERS', '2'));
  const count = Number(env('DP_NOTIFICATIONS', '100'));
  const others = Number(env('DP_OTHER_LISTENERS', '3'));
  const mine = await Promise.all([...Array(listeners).keys()].map((i) => listener(apps[0], `matrix_c${i}`)));
  const theirs = await Promise.all([...Array(others).keys()].map((i) => listener(apps[1], `matrix_c${i}`)));
  const tags = [...Array(senders).keys()].map((s) => `app1-${s}`);
  let sending = true;
  const workerConns = await Promise.all([...Array(workers).keys()].map(() => connect(apps[0])));
  const work = workerConns.map((c) => transactions(c, apps[0], () => !sending));
  // The listeners run transactions too, between the notifications they get.
  const listenerWork = mine.slice(0, 10).map((l) => transactions(l.conn, apps[0], () => !sending));
  const sends = tags.map((tag, s) =>
    send(
      apps[0],
      tag,
      count,
      mine.filter((_, i) => i % senders === s).map((l) => [l.own, `direct:${l.own}`]),
    ),
  );
  sends.push(send(apps[1], 'app2-0', count, theirs.map((l) => [l.own, `app2-direct:${l.own}`])));
  await Promise.all(sends);
  sending = false;
  const transactionsRun = (await Promise.all([...work, ...listenerWork])).reduce((a, b) => a + b, 0);
  const started = Date.now();
  const complete = () =>
    mine.every((l) => l.got.length >= expected(l, tags, count)) &&
    theirs.every((l) => l.got.length >= expected(l, ['app2-0'], count)) &&
    (ISOLATED || Date.now() - started > 2000);
  while (!complete() && Date.now() - started < DEADLINE_MS) {
    await sleep(50);
  }
  // A duplicate would arrive right behind the last one.
  await sleep(500);
  const failures = [];
  for (const l of mine) {
    try {
      verify(l, tags, count, `direct:${l.own}`);
    } catch (e) {
      failures.push(`app 1 ${e.message}`);
    }
  }
  for (const l of theirs) {
    try {
      verify(l, ['app2-0'], count, `app2-direct:${l.own}`);
    } catch (e) {
      failures.push(`app 2 ${e.message}`);
    }
  }
  await Promise.all([...mine, ...theirs].map((l) => l.conn.end()));
  await Promise.all(workerConns.map((c) => c.end()));
  const label = `node-postgres ${pgVersion} LISTEN`;
  if (failures.length > 0) {
    console.error(`${label}: ${failures.length} listeners failed:`);
    failures.slice(0, 20).forEach((f) => console.error(`  ${f}`));
    process.exit(1);
  }
  const delivered = [...mine, ...theirs].reduce((a, l) => a + l.got.length, 0);
  console.log(
    `${label}: ok, ${listeners + others} listeners of 2 roles, ${delivered} notifications, ${transactionsRun} transactions meanwhile`,
  );
}

main().catch((e) => {
  console.error(`node-postgres LISTEN: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
