// node-postgres through the pooler in transaction mode, every client of two apps at once.
//
// Named queries (`name:`) are parsed once per connection and then only bound and
// executed, so from the second use on they name a statement that was prepared on
// whichever server the client had then. Each client runs named parameterised queries in
// autocommit and in short transactions, failed statements followed by others in the same
// transaction, a batch of named inserts, and a rolled-back then a committed transaction,
// and checks every result.
//
// Environment: DP_HOST, DP_PORT, DP_DBNAME, DP_APP{1,2}_{USER,PASSWORD,CLIENTS},
// optional DP_STATEMENTS (loop length, default 50); NODE_PATH finds `pg`.
// Each app's schema holds kv(k, v = '<role>:<k>') for k in 1..100 and an empty
// items(run, client, n, note): see tests/tests/drivers.rs.

'use strict';

const { Client } = require('pg');
const pgVersion = require('pg/package.json').version;

const BATCH = 25;
const TX_ROWS = 5;
// Loop rounds that also fail a statement inside a transaction.
const FAIL_AT = [1, 6, 25];

function env(name) {
  const v = process.env[name];
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

const INSERT = {
  name: 'matrix-insert',
  text: 'INSERT INTO items (run, client, n, note) VALUES ($1, $2, $3, $4)',
};

async function worker(app, client, run, loops) {
  const conn = new Client({
    host: env('DP_HOST'),
    port: Number(env('DP_PORT')),
    database: env('DP_DBNAME'),
    user: app.user,
    password: app.password,
  });
  await conn.connect();
  let statements = 0;
  try {
    for (let n = 0; n < loops; n++) {
      const k = ((client * 7 + n) % 100) + 1;
      const kv = await conn.query({
        name: 'matrix-kv',
        text: 'SELECT v FROM kv WHERE k = $1',
        values: [k],
      });
      check(
        kv.rows.length === 1 && kv.rows[0].v === `${app.user}:${k}`,
        `kv ${k} = ${JSON.stringify(kv.rows)}`,
      );
      const sums = await conn.query({
        name: 'matrix-sums',
        text: 'SELECT $1::int * 2 + $2::int AS s, current_user::text AS u',
        values: [client, n],
      });
      const row = sums.rows[0];
      check(
        row.s === client * 2 + n && row.u === app.user,
        `arithmetic/current_user = ${JSON.stringify(row)}`,
      );
      await conn.query('BEGIN');
      const mine = await conn.query(ownStatement(client));
      await conn.query('COMMIT');
      check(mine.rows[0].c === 100 - client, `own statement = ${JSON.stringify(mine.rows)}`);
      statements += 5;
      if (FAIL_AT.includes(n)) {
        statements += await fail(conn, client);
      }
    }

    // node-postgres has no batch call; a run of named inserts in autocommit is what
    // apps do instead.
    for (let n = 0; n < BATCH; n++) {
      await conn.query({ ...INSERT, values: [run, client, n, 'batch'] });
    }
    statements += BATCH;

    await conn.query('BEGIN');
    await insertRows(conn, run, client, 'rollback');
    const inside = await conn.query({
      name: 'matrix-count',
      text: 'SELECT count(*)::int AS c FROM items WHERE run = $1 AND client = $2 AND note = $3',
      values: [run, client, 'rollback'],
    });
    check(inside.rows[0].c === TX_ROWS, `own uncommitted rows inside the transaction: ${inside.rows[0].c}`);
    await conn.query('ROLLBACK');
    await conn.query('BEGIN');
    await insertRows(conn, run, client, 'commit');
    await conn.query('COMMIT');
    statements += 2 * TX_ROWS + 5;

    const notes = await conn.query({
      name: 'matrix-notes',
      text: 'SELECT note, count(*)::int AS c FROM items WHERE run = $1 AND client = $2 GROUP BY note ORDER BY note',
      values: [run, client],
    });
    const got = JSON.stringify(notes.rows.map((r) => [r.note, r.c]));
    const want = JSON.stringify([['batch', BATCH], ['commit', TX_ROWS]]);
    check(got === want, `rows after commit/rollback: ${got}, want ${want}`);
    statements += 1;
  } finally {
    await conn.end();
  }
  return statements;
}

// Apps build some SQL with literals, so each client has statements of its own, prepared
// only on the servers it happened to use.
function ownStatement(client) {
  return {
    name: `matrix-own-${client}`,
    text: `SELECT count(*)::int AS c FROM kv WHERE k <= $1 AND k > ${client}`,
    values: [100],
  };
}

async function expectError(conn, query, sqlstate, what) {
  try {
    await conn.query(query);
  } catch (e) {
    check(e.code === sqlstate, `${what}: ${e.code} ${e.message}, want ${sqlstate}`);
    return;
  }
  check(false, `${what} did not fail`);
}

// A statement fails inside a transaction and the app runs another one before rolling
// back: that one fails as Postgres says (25P02), and the connection works as before.
async function fail(conn, client) {
  await conn.query('BEGIN');
  await expectError(
    conn,
    { name: 'matrix-div', text: 'SELECT 1 / $1::int', values: [0] },
    '22012',
    'division by zero',
  );
  await expectError(conn, ownStatement(client), '25P02', 'a statement in an aborted transaction');
  await conn.query('ROLLBACK');
  return 4;
}

async function insertRows(conn, run, client, note) {
  for (let n = 0; n < TX_ROWS; n++) {
    await conn.query({ ...INSERT, values: [run, client, n, note] });
  }
}

async function main() {
  const loops = Number(process.env.DP_STATEMENTS || '50');
  const run = `node-pg-${process.pid}-${Date.now()}`;
  const apps = [1, 2].map((i) => ({
    user: env(`DP_APP${i}_USER`),
    password: env(`DP_APP${i}_PASSWORD`),
    clients: Number(env(`DP_APP${i}_CLIENTS`)),
  }));
  const jobs = apps.flatMap((app) => [...Array(app.clients).keys()].map((c) => [app, c]));
  const results = await Promise.allSettled(jobs.map(([app, c]) => worker(app, c, run, loops)));
  const label = `node-postgres ${pgVersion} named queries`;
  const failures = results
    .map((r, i) => [r, jobs[i]])
    .filter(([r]) => r.status === 'rejected')
    .map(([r, [app, c]]) => `${app.user} client ${c}: ${r.reason && r.reason.stack ? r.reason.stack : r.reason}`);
  if (failures.length > 0) {
    console.error(`${label}: ${failures.length} of ${jobs.length} clients failed:`);
    failures.forEach((f) => console.error(`  ${f}`));
    process.exit(1);
  }
  const statements = results.reduce((sum, r) => sum + r.value, 0);
  console.log(`${label}: ok, ${jobs.length} clients of 2 roles, ${statements} statements`);
}

main().catch((e) => {
  console.error(`node-postgres named queries: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
