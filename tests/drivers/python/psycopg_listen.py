"""psycopg 3 LISTEN through the pooler's transaction port (`conn.notifies()`), every
listener of two apps at once: see listen_common.py.

psycopg reads notifications only while it uses the connection; those that come in
during a query are kept and yielded by the next `notifies()`, which is all the listeners
use (psycopg warns against mixing it with notify handlers).
"""

import psycopg
from psycopg import sql

from listen_common import checked_kv, run


class Driver:
    @staticmethod
    async def connect(t, app):
        return await psycopg.AsyncConnection.connect(
            host=t.host,
            port=t.port,
            dbname=t.dbname,
            user=app.user,
            password=app.password,
            autocommit=True,
        )

    @staticmethod
    async def listen(conn, channel, sink):
        conn.matrix_sink = sink
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    @staticmethod
    async def pump(conn, seconds):
        async for n in conn.notifies(timeout=seconds):
            conn.matrix_sink(n.channel, n.payload)

    @staticmethod
    async def transaction(conn, app, k):
        async with conn.transaction():
            cur = await conn.execute("SELECT v FROM kv WHERE k = %s", (k,))
            (v,) = await cur.fetchone()
        checked_kv(app, k, v)

    @staticmethod
    async def notify(conn, channel, payload):
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    @staticmethod
    async def close(conn):
        await conn.close()


if __name__ == "__main__":
    run(f"psycopg {psycopg.__version__} LISTEN", Driver)
