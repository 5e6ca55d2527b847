"""The LISTEN scenario of the driver matrix (tests/tests/drivers.rs), for any driver.

DP_LISTENERS clients of app 1 LISTEN on a shared channel and on one of their own, and
some of them run short transactions between their notifications; DP_WORKERS clients of
app 1 run transactions all along; DP_SENDERS clients of app 1 each send DP_NOTIFICATIONS
numbered notifications on the shared channel (pg_notify, autocommit) and one on each
listener's own channel. App 2 listens on the same channel names and sends its own. Every
app 1 listener must get each of its app's notifications exactly once, in order per
sender, and nothing of app 2's; every app 2 listener exactly its app's (with
DP_ISOLATED=0, straight to Postgres, the other app's are skipped: there every app hears
every other).

A driver gives: connect(t, app) -> conn, listen(conn, channel, sink) (sink(channel,
payload) for each notification), pump(conn, seconds) (let notifications in),
transaction(conn, app, k) -> checked, notify(conn, channel, payload), close(conn).
"""

import asyncio
import os
import sys
import time

from matrix_common import WrongResult, check, env, kv_value

SHARED = "matrix_events"
DEADLINE = 120.0
ISOLATED = os.environ.get("DP_ISOLATED", "1") == "1"


class App:
    def __init__(self, user, password):
        self.user = user
        self.password = password


class Target:
    def __init__(self):
        self.host = env("DP_HOST")
        self.port = int(env("DP_PORT"))
        self.dbname = env("DP_DBNAME")
        self.apps = [App(env(f"DP_APP{i}_USER"), env(f"DP_APP{i}_PASSWORD")) for i in (1, 2)]
        self.listeners = int(os.environ.get("DP_LISTENERS", "50"))
        self.workers = int(os.environ.get("DP_WORKERS", "8"))
        self.senders = int(os.environ.get("DP_SENDERS", "2"))
        self.count = int(os.environ.get("DP_NOTIFICATIONS", "100"))
        self.others = int(os.environ.get("DP_OTHER_LISTENERS", "3"))


class Listener:
    def __init__(self, own, direct):
        self.own = own
        self.direct = direct
        self.got = []
        self.conn = None

    def sink(self, channel, payload):
        self.got.append((channel, payload))

    def verify(self, tags, count):
        nxt = {t: 0 for t in tags}
        directs = 0
        for channel, payload in self.got:
            if channel == self.own:
                if payload != self.direct and not ISOLATED:
                    continue
                check(payload == self.direct, f"{self.own}: unexpected {payload}")
                directs += 1
                continue
            check(channel == SHARED, f"{self.own}: a notification on {channel}")
            tag, _, seq = payload.rpartition(":")
            if tag not in nxt and not ISOLATED:
                continue
            check(tag in nxt, f"{self.own}: {payload} is not from its app")
            check(
                int(seq) == nxt[tag],
                f"{self.own}: {payload} out of order or repeated (expected {tag}:{nxt[tag]})",
            )
            nxt[tag] += 1
        for tag, n in nxt.items():
            check(n == count, f"{self.own}: {n} of {count} from {tag}")
        check(directs == 1, f"{self.own}: {directs} direct notifications")


def run(label, driver):
    t = Target()

    async def scenario():
        mine = [Listener(f"matrix_c{i}", f"direct:matrix_c{i}") for i in range(t.listeners)]
        theirs = [Listener(f"matrix_c{i}", f"app2-direct:matrix_c{i}") for i in range(t.others)]

        async def open_listener(app, l):
            l.conn = await driver.connect(t, app)
            await driver.listen(l.conn, SHARED, l.sink)
            await driver.listen(l.conn, l.own, l.sink)

        await asyncio.gather(*(open_listener(t.apps[0], l) for l in mine))
        await asyncio.gather(*(open_listener(t.apps[1], l) for l in theirs))
        tags = [f"app1-{s}" for s in range(t.senders)]
        sending = True
        done = {"transactions": 0}

        async def work(conn, app):
            k = 0
            while sending:
                await driver.transaction(conn, app, k % 100 + 1)
                done["transactions"] += 1
                k += 1

        async def listen_and_work(l, busy):
            # Listeners take their notifications in; some run transactions in between.
            while sending:
                if busy:
                    await driver.transaction(l.conn, t.apps[0], len(l.got) % 100 + 1)
                    done["transactions"] += 1
                await driver.pump(l.conn, 0.05)

        async def send(app, tag, directs):
            conn = await driver.connect(t, app)
            try:
                for seq in range(t.count):
                    await driver.notify(conn, SHARED, f"{tag}:{seq}")
                for channel, payload in directs:
                    await driver.notify(conn, channel, payload)
            finally:
                await driver.close(conn)

        workers = [await driver.connect(t, t.apps[0]) for _ in range(t.workers)]
        background = [asyncio.create_task(work(c, t.apps[0])) for c in workers]
        background += [
            asyncio.create_task(listen_and_work(l, i < 10)) for i, l in enumerate(mine + theirs)
        ]
        sends = [
            send(
                t.apps[0],
                tag,
                [(l.own, l.direct) for i, l in enumerate(mine) if i % t.senders == s],
            )
            for s, tag in enumerate(tags)
        ]
        sends.append(send(t.apps[1], "app2-0", [(l.own, l.direct) for l in theirs]))
        await asyncio.gather(*sends)
        started = time.monotonic()

        def complete():
            enough = all(len(l.got) >= t.senders * t.count + 1 for l in mine) and all(
                len(l.got) >= t.count + 1 for l in theirs
            )
            return enough and (ISOLATED or time.monotonic() - started > 2)

        while not complete() and time.monotonic() - started < DEADLINE:
            await asyncio.sleep(0.05)
        # A duplicate would arrive right behind the last one.
        await asyncio.sleep(0.5)
        sending = False
        await asyncio.gather(*background)
        failures = []
        for group, ls, ts in (("app 1", mine, tags), ("app 2", theirs, ["app2-0"])):
            for l in ls:
                try:
                    l.verify(ts, t.count)
                except WrongResult as e:
                    failures.append(f"{group} {e}")
        for c in workers + [l.conn for l in mine + theirs]:
            await driver.close(c)
        delivered = sum(len(l.got) for l in mine + theirs)
        return failures, delivered, done["transactions"]

    failures, delivered, transactions = asyncio.run(scenario())
    if failures:
        print(f"{label}: {len(failures)} listeners failed:", file=sys.stderr)
        for f in failures[:20]:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print(
        f"{label}: ok, {t.listeners + t.others} listeners of 2 roles, {delivered} notifications, "
        f"{transactions} transactions meanwhile"
    )


def checked_kv(app, k, v):
    check(v == kv_value(app, k), f"kv {k} = {v}")
