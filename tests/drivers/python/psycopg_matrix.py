"""psycopg 3 through the pooler in transaction mode, every client of two apps at once.

    psycopg_matrix.py prepare    prepare_threshold=0: every statement is a named
                                 server-side prepared statement from its first use
    psycopg_matrix.py pipeline   pipeline mode with the default prepare_threshold, so
                                 hot statements get prepared in the middle of pipelines

Each client runs parameterised statements in autocommit (each its own transaction, so
on whichever server is free) and in short transactions, failed statements followed by
others, a batch insert (executemany) and a rolled-back then a committed transaction,
and checks every result. Environment: see matrix_common.py.
"""

import contextlib
import logging
import sys

import psycopg
from psycopg import errors

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

INSERT = "INSERT INTO items (run, client, n, note) VALUES (%s, %s, %s, %s)"


async def worker(t, app, client, pipeline):
    kwargs = {} if pipeline else {"prepare_threshold": 0}
    conn = await psycopg.AsyncConnection.connect(
        host=t.host,
        port=t.port,
        dbname=t.dbname,
        user=app.user,
        password=app.password,
        autocommit=True,
        **kwargs,
    )
    # Pipeline mode sends many statements before reading any result.
    maybe_pipeline = conn.pipeline if pipeline else contextlib.nullcontext
    own = own_statement(client, "%s")
    statements = 0
    async with conn:
        async with maybe_pipeline():
            pending = []
            for n in range(t.loops):
                k = kv_key(client, n)
                kv = await conn.execute("SELECT v FROM kv WHERE k = %s", (k,))
                sums = await conn.execute(
                    "SELECT %s::int * 2 + %s::int, current_user::text", (client, n)
                )
                async with conn.transaction():
                    mine = await conn.execute(own, (100,))
                pending.append((k, n, kv, sums, mine))
                statements += 5
                if n in FAIL_AT:
                    statements += await fail(conn, own, pipeline)
            for k, n, kv, sums, mine in pending:
                rows = await kv.fetchall()
                check(rows == [(kv_value(app, k),)], f"kv {k} = {rows}")
                row = await sums.fetchone()
                check(row == (client * 2 + n, app.user), f"arithmetic/current_user = {row}")
                row = await mine.fetchone()
                check(row == (100 - client,), f"own statement = {row}")

        async with maybe_pipeline():
            async with conn.cursor() as cur:
                await cur.executemany(
                    INSERT, [(t.run, client, n, "batch") for n in range(BATCH)]
                )
            statements += BATCH

        async with maybe_pipeline():
            async with conn.transaction(force_rollback=True):
                await insert_rows(conn, t.run, client, "rollback")
                count = await count_note(conn, t.run, client, "rollback")
                check(count == TX_ROWS, f"own uncommitted rows inside the transaction: {count}")
            async with conn.transaction():
                await insert_rows(conn, t.run, client, "commit")
            statements += 2 * TX_ROWS + 1

        cur = await conn.execute(
            "SELECT note, count(*)::int FROM items WHERE run = %s AND client = %s GROUP BY note",
            (t.run, client),
        )
        notes = dict(await cur.fetchall())
        check(notes == WANT_NOTES, f"rows after commit/rollback: {notes}, want {WANT_NOTES}")
        statements += 1
    return statements


async def fail(conn, own, pipeline):
    """A statement fails and the app runs another one before it knows: in pipeline
    mode the next one in the same pipeline (Postgres skips it), otherwise the next one
    in the same transaction (25P02). Either way the connection works as before after."""
    if pipeline:
        try:
            async with conn.pipeline():
                await conn.execute("SELECT 1 / %s::int", (0,))
                await conn.execute(own, (100,))
        except errors.DivisionByZero:
            return 2
        check(False, "division by zero did not fail")
    async with conn.transaction(force_rollback=True):
        try:
            await conn.execute("SELECT 1 / %s::int", (0,))
            check(False, "division by zero did not fail")
        except errors.DivisionByZero:
            pass
        try:
            await conn.execute(own, (100,))
            check(False, "a statement in an aborted transaction did not fail")
        except errors.InFailedSqlTransaction:
            pass
    return 4


async def insert_rows(conn, run, client, note):
    for n in range(TX_ROWS):
        await conn.execute(INSERT, (run, client, n, note))


async def count_note(conn, run, client, note):
    cur = await conn.execute(
        "SELECT count(*)::int FROM items WHERE run = %s AND client = %s AND note = %s",
        (run, client, note),
    )
    row = await cur.fetchone()
    return row[0]


def quiet_expected_pipeline_abort(record):
    """psycopg logs, as a warning, the "pipeline aborted" it meets while leaving a
    pipeline whose first error is already being raised: `fail` expects exactly that."""
    message = record.getMessage()
    return not ("error ignored terminating" in message and "pipeline aborted" in message)


if __name__ == "__main__":
    logging.getLogger("psycopg").addFilter(quiet_expected_pipeline_abort)
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("prepare", "pipeline"):
        sys.exit("usage: psycopg_matrix.py prepare|pipeline")
    pipeline = mode == "pipeline"
    label = f"psycopg {psycopg.__version__} " + (
        "pipeline mode" if pipeline else "prepare_threshold=0"
    )
    main(label, lambda t, app, client: worker(t, app, client, pipeline))
