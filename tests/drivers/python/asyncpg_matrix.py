"""asyncpg through the pooler in transaction mode, every client of two apps at once.

asyncpg prepares every statement it runs (named, cached per connection), so each
`fetch` after the first reuses a statement that may live on another server by then.
Each client runs fetch/fetchval in autocommit and in short transactions, explicit
prepared statements (one with a name of our own), failed statements followed by others
in the same transaction, executemany, and a rolled-back then a committed transaction,
and checks every result. The default statement cache stays on: apps do not turn it off for us.
Environment: see matrix_common.py.
"""

import asyncpg

from matrix_common import (
    BATCH,
    FAIL_AT,
    TX_ROWS,
    WANT_NOTES,
    check,
    kv_key,
    kv_value,
    main,
    own_statement,
)

INSERT = "INSERT INTO items (run, client, n, note) VALUES ($1, $2, $3, $4)"


async def worker(t, app, client):
    conn = await asyncpg.connect(
        host=t.host, port=t.port, database=t.dbname, user=app.user, password=app.password
    )
    statements = 0
    try:
        get_kv = await conn.prepare("SELECT v FROM kv WHERE k = $1")
        sums = await conn.prepare(
            "SELECT $1::int * 2 + $2::int AS s, current_user::text AS u",
            name=f"matrix_sums_{client}",
        )
        for n in range(t.loops):
            k = kv_key(client, n)
            rows = await conn.fetch("SELECT v FROM kv WHERE k = $1", k)
            check([r["v"] for r in rows] == [kv_value(app, k)], f"fetch kv {k} = {rows}")
            v = await get_kv.fetchval(k)
            check(v == kv_value(app, k), f"prepared kv {k} = {v}")
            row = await sums.fetchrow(client, n)
            check(
                (row["s"], row["u"]) == (client * 2 + n, app.user),
                f"arithmetic/current_user = {row}",
            )
            async with conn.transaction():
                mine = await conn.fetchval(own_statement(client, "$1"), 100)
            check(mine == 100 - client, f"own statement = {mine}")
            statements += 6
            if n in FAIL_AT:
                statements += await fail(conn, client)

        await conn.executemany(INSERT, [(t.run, client, n, "batch") for n in range(BATCH)])
        statements += BATCH

        tx = conn.transaction()
        await tx.start()
        await insert_rows(conn, t.run, client, "rollback")
        count = await conn.fetchval(
            "SELECT count(*)::int FROM items WHERE run = $1 AND client = $2 AND note = $3",
            t.run,
            client,
            "rollback",
        )
        check(count == TX_ROWS, f"own uncommitted rows inside the transaction: {count}")
        await tx.rollback()
        async with conn.transaction():
            await insert_rows(conn, t.run, client, "commit")
        statements += 2 * TX_ROWS + 1

        rows = await conn.fetch(
            "SELECT note, count(*)::int AS c FROM items WHERE run = $1 AND client = $2 GROUP BY note",
            t.run,
            client,
        )
        notes = {r["note"]: r["c"] for r in rows}
        check(notes == WANT_NOTES, f"rows after commit/rollback: {notes}, want {WANT_NOTES}")
        statements += 1
    finally:
        await conn.close()
    return statements


async def fail(conn, client):
    """A statement fails inside a transaction and the app runs another one before
    rolling back: that one fails as Postgres says (25P02), and the connection works as
    before afterwards."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.fetchval("SELECT 1 / $1::int", 0)
        check(False, "division by zero did not fail")
    except asyncpg.DivisionByZeroError:
        pass
    try:
        await conn.fetchval(own_statement(client, "$1"), 100)
        check(False, "a statement in an aborted transaction did not fail")
    except asyncpg.InFailedSQLTransactionError:
        pass
    await tx.rollback()
    return 4


async def insert_rows(conn, run, client, note):
    for n in range(TX_ROWS):
        await conn.execute(INSERT, run, client, n, note)


if __name__ == "__main__":
    main(f"asyncpg {asyncpg.__version__}", worker)
