"""The queue library's edges we rely on (pgqueuer, pinned in constraints.txt), measured with its psycopg driver.

A worker SIGKILLed while it holds a queue job: the job is not lost (it stays `picked`, unlike a destructive
pop), nobody else gets it while its heartbeat is fresh, and once the heartbeat is older than the timeout
another worker picks the same job. The measured delay is printed (pytest -s) for the closing note.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from pgqueuer.db import PsycopgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from tests.pg import private_schema, schema_url

HEARTBEAT = 2.0

HOLDER = """
import asyncio, sys
from datetime import timedelta
import psycopg
from pgqueuer.db import PsycopgDriver
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

async def main():
    conn = await psycopg.AsyncConnection.connect(sys.argv[1], autocommit=True)
    qm = QueueManager(Queries(PsycopgDriver(conn)))

    @qm.entrypoint("edge")
    async def hold(job):
        print("picked", job.id, flush=True)
        await asyncio.sleep(3600)

    await qm.run(dequeue_timeout=timedelta(seconds=0.5), batch_size=1, max_concurrent_tasks=2,
                 heartbeat_timeout=timedelta(seconds=float(sys.argv[2])), log_aggregation_interval=timedelta(0))

asyncio.run(main())
"""


@pytest.fixture
def url() -> Iterator[str]:
    """pgqueuer's tables in a schema of this test's own."""
    with private_schema("crawler_q") as name:
        yield schema_url(name)


@pytest.mark.slow
async def test_a_sigkilled_holder_keeps_the_job_until_its_heartbeat_is_stale_then_another_worker_gets_it(
        url: str) -> None:
    """SIGKILL with a job in hand: the job stays picked (not lost), then the same job is picked by another worker,
    no sooner than the heartbeat timeout after the dead worker's last heartbeat (both on the database's clock)."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    queries = Queries(PsycopgDriver(conn))
    await queries.install()
    (jid,) = await queries.enqueue("edge", b"x")
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, url, str(HEARTBEAT),
                                                  stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 60)
    assert line.split() == [b"picked", str(jid).encode()]
    holder.kill()
    killed = time.monotonic()
    await holder.wait()
    status = await (await conn.execute("SELECT status, heartbeat FROM pgqueuer WHERE id = %s", (jid,))).fetchone()
    assert status is not None and status[0] == "picked"  # held by the dead worker, not lost
    last_beat = status[1]

    picked: list[tuple[int, float, float]] = []
    taker = QueueManager(Queries(PsycopgDriver(await psycopg.AsyncConnection.connect(url, autocommit=True))))

    @taker.entrypoint("edge")
    async def take(job: Job) -> None:
        row = await (await conn.execute("SELECT now() - %s", (last_beat,))).fetchone()
        assert row is not None
        picked.append((int(job.id), time.monotonic() - killed, row[0].total_seconds()))
        taker.shutdown.set()

    await asyncio.wait_for(taker.run(dequeue_timeout=timedelta(seconds=0.25), batch_size=1, max_concurrent_tasks=2,
                                     heartbeat_timeout=timedelta(seconds=HEARTBEAT),
                                     log_aggregation_interval=timedelta(0)), 60)
    await conn.close()
    assert [j for j, _, _ in picked] == [jid]
    _, delay, stale = picked[0]
    print(f"pgqueuer {HEARTBEAT:g} s heartbeat timeout: a SIGKILLed holder's job picked again {delay:.2f} s after the"
          f" kill, {stale:.2f} s after its last heartbeat")
    assert stale >= HEARTBEAT  # never while the dead worker's last heartbeat was fresh


async def test_the_queue_runs_its_queries_beside_the_notification_reader_not_behind_it(url: str) -> None:
    """pgqueuer's psycopg driver reads notifications with `notifies(timeout=1.0)`, holding its connection up to a
    second at a time (measured 1.9 queue jobs/s at batch size 1, 56 with the queries on a second connection):
    our driver sends the queue's queries on another connection than the one that LISTENs."""
    from crawler.stores.pg_queue import _driver

    listen = await psycopg.AsyncConnection.connect(url, autocommit=True)
    queries = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        driver = _driver(listen, queries)
        (row,) = await driver.fetch("SELECT pg_backend_pid() AS pid")
        assert row["pid"] == queries.info.backend_pid != listen.info.backend_pid
        await driver.add_listener("crawler_edge", lambda payload: None)
        (row,) = await driver.fetch("SELECT count(*) AS n FROM pg_listening_channels()")
        assert row["n"] == 0  # LISTEN stayed on the other connection
        await driver.__aexit__()
    finally:
        await listen.close()
        await queries.close()


async def test_two_consumers_of_one_job_hold_the_sum_of_their_caps_and_take_each_item_once(url: str) -> None:
    """A worker grown by parallelism = "auto" runs a second consumer of its job's queue beside the first: together
    they hold the sum of their caps at once (2 + 4), and every item is handled exactly once, the queue left empty."""
    from crawler.stores import pg_queue as itemqueue

    await itemqueue.install(url)
    await itemqueue.enqueue(url, "edge", list(range(1, 41)))
    queues = [itemqueue.ItemQueue(url, "edge", concurrency=n, heartbeat_timeout=HEARTBEAT, poll=0.2) for n in (2, 4)]
    seen: list[int] = []
    running, peak = [0], [0]
    full = asyncio.Event()

    async def handler(seq: int) -> None:
        seen.append(seq)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            if running[0] >= 6:
                full.set()
            await full.wait()  # the first items wait until both consumers hold all they may
        finally:
            running[0] -= 1
        if len(seen) >= 40 and running[0] == 0:
            for q in queues:
                q.stop()

    async with asyncio.timeout(60):
        await asyncio.gather(*(q.run(handler) for q in queues))
    assert peak[0] == 6
    assert sorted(seen) == list(range(1, 41))
    async with await psycopg.AsyncConnection.connect(url) as conn:
        left = await (await conn.execute("SELECT count(*) FROM pgqueuer")).fetchone()
    assert left == (0,)
