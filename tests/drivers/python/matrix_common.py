"""What the Python scenarios of the driver matrix share: the environment the Rust test
(tests/tests/drivers.rs) sets, the expected results, and running every client of both
apps at once.

Each app's schema holds kv(k, v = '<role>:<k>') for k in 1..100 and an empty
items(run, client, n, note).
"""

import asyncio
import os
import sys
import time
from dataclasses import dataclass

BATCH = 25
TX_ROWS = 5
# What each client leaves in items: the batch and the committed transaction, nothing of
# the rolled-back one.
WANT_NOTES = {"batch": BATCH, "commit": TX_ROWS}
# Loop rounds that also fail a statement inside a transaction: early, and past the
# drivers' prepare thresholds.
FAIL_AT = (1, 6, 25)


class WrongResult(Exception):
    pass


def check(ok, what):
    if not ok:
        raise WrongResult(what)


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"environment variable {name} is not set")
    return value


@dataclass
class App:
    user: str
    password: str
    clients: int


@dataclass
class Target:
    host: str
    port: int
    dbname: str
    apps: list
    loops: int
    run: str


def target(label):
    apps = [
        App(env(f"DP_APP{i}_USER"), env(f"DP_APP{i}_PASSWORD"), int(env(f"DP_APP{i}_CLIENTS")))
        for i in (1, 2)
    ]
    return Target(
        host=env("DP_HOST"),
        port=int(env("DP_PORT")),
        dbname=env("DP_DBNAME"),
        apps=apps,
        loops=int(os.environ.get("DP_STATEMENTS", "50")),
        run=f"{label}-{os.getpid()}-{time.time_ns()}",
    )


def kv_key(client, n):
    return (client * 7 + n) % 100 + 1


def kv_value(app, k):
    return f"{app.user}:{k}"


def own_statement(client, placeholder):
    """Apps build some SQL with literals, so each client has statements of its own,
    prepared only on the servers it happened to use. With 100 as the parameter it
    returns 100 - client."""
    return f"SELECT count(*)::int FROM kv WHERE k <= {placeholder} AND k > {client}"


def main(label, worker):
    """Runs `worker(target, app, client)` -> statements for every client of both apps at
    once; prints one summary line, or every failure and exits 1."""
    t = target(label)

    async def all_clients():
        jobs = [(app, c) for app in t.apps for c in range(app.clients)]
        results = await asyncio.gather(
            *(worker(t, app, c) for app, c in jobs), return_exceptions=True
        )
        failures = [
            f"{app.user} client {c}: {type(r).__name__}: {r}"
            for (app, c), r in zip(jobs, results)
            if isinstance(r, BaseException)
        ]
        statements = sum(r for r in results if isinstance(r, int))
        return len(jobs), failures, statements

    clients, failures, statements = asyncio.run(all_clients())
    if failures:
        print(f"{label}: {len(failures)} of {clients} clients failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print(f"{label}: ok, {clients} clients of 2 roles, {statements} statements")
