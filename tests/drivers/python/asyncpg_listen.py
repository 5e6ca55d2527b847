"""asyncpg LISTEN through the pooler's transaction port (`add_listener`), every
listener of two apps at once: see listen_common.py.
"""

import asyncio

import asyncpg

from listen_common import checked_kv, run


class Driver:
    @staticmethod
    async def connect(t, app):
        return await asyncpg.connect(
            host=t.host, port=t.port, database=t.dbname, user=app.user, password=app.password
        )

    @staticmethod
    async def listen(conn, channel, sink):
        await conn.add_listener(channel, lambda _c, _pid, ch, payload: sink(ch, payload))

    @staticmethod
    async def pump(conn, seconds):
        # asyncpg reads the socket by itself: notifications arrive while idle.
        await asyncio.sleep(seconds)

    @staticmethod
    async def transaction(conn, app, k):
        async with conn.transaction():
            v = await conn.fetchval("SELECT v FROM kv WHERE k = $1", k)
        checked_kv(app, k, v)

    @staticmethod
    async def notify(conn, channel, payload):
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    @staticmethod
    async def close(conn):
        await conn.close()


if __name__ == "__main__":
    run(f"asyncpg {asyncpg.__version__} LISTEN", Driver)
