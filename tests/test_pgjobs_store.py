"""The PostgreSQL job store's transactions on a real server: a job run again, and transactions run again.

A transaction whose COMMIT held but whose reply was lost is run again by the store (`_run` retries a lost
connection): `Replaying` runs every transaction twice, as that retry does, to show each one idempotent.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest

from crawler.stores.model import ItemUpdate, PageCommit
from crawler.stores.pg_jobs import PgJobStore
from tests.pg import PG_URL as PG
from tests.pg import private_schema, schema_url

T = TypeVar("T")
ENTRIES = [("alice", "alice", None, None), ("bob", "bob", None, None)]


class Replaying(PgJobStore):
    """Every transaction run twice, the second as `_run`'s retry after a COMMIT whose reply was lost (`replay`:
    the first held; `roll_back_first`: the first was rolled back, as when the connection died before COMMIT)."""

    replay = False
    roll_back_first = False

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        if self.roll_back_first:
            self.roll_back_first = False
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            try:
                async with conn.transaction(force_rollback=True):
                    await fn(conn)
            finally:
                await conn.close()
        first = await super()._run(fn)
        return await super()._run(fn) if self.replay else first


@pytest.fixture
async def store() -> AsyncIterator[Replaying]:
    with private_schema("crawler_s") as name:
        async with Replaying(schema_url(name), stall_limit=10, heartbeat_timeout=2) as s:
            yield s


def page(seq: int, version: int, cursor: str) -> PageCommit:
    return PageCommit(seq, version, [(f"v-{cursor}", '["x"]')], ItemUpdate(seq, "pending", cursor={"c": cursor},
                                                                            rows=1, pages=1))


async def test_a_late_page_of_a_job_run_before_restart_does_not_commit_into_the_new_run(store: Replaying) -> None:
    """A worker holds item 1 of job J; J is run again (--restart: deleted, created anew) and item 1 taken by a new
    worker; the old worker's late page is refused and the item keeps the new worker's cursor."""
    assert await store.create_job("j1", "posts", {}, ENTRIES)
    old = await store.take("j1", 1, "old")
    assert old is not None
    await store.delete_job("j1")
    assert await store.create_job("j1", "posts", {}, ENTRIES)
    new = await store.take("j1", 1, "new")
    assert new is not None
    late = page(1, old.version, "old")
    await store.commit("j1", "old-session", [late], 1, 1)
    assert not late.committed
    mine = page(1, new.version, "new")
    await store.commit("j1", "new-session", [mine], 1, 1)
    assert mine.committed
    again = await store.take("j1", 1, "next")
    assert again is not None and again.cursor == {"c": "new"} and again.rows == 1


async def test_budget_and_counters_run_twice_count_once(store: Replaying) -> None:
    """grant, give_back and commit each run twice (a lost COMMIT reply): the job's budget and counters are as if
    each ran once, so --max-credits holds and `crawler jobs` equals what was sent."""
    assert await store.create_job("j2", "posts", {}, ENTRIES)
    await store.resume("j2", 20)
    taken = await store.take("j2", 1, "w")
    assert taken is not None
    store.replay = True
    assert await store.grant("j2", "s1", 0, 16) == 16
    assert await store.grant("j2", "s2", 0, 16) == 4  # the rest of the 20
    assert await store.grant("j2", "s2", 4, 16) == 0
    p = page(1, taken.version, "a")
    await store.commit("j2", "s1", [p], 10, 9)  # s1 sent 10 requests, 9 billed
    assert p.committed
    await store.commit("j2", "s1", [], 12, 11)  # and 2 more after its last page
    await store.give_back("j2", "s1", 12)  # of 16 granted, 12 used: 4 back
    store.replay = False
    job = await store.job("j2")
    assert job is not None
    assert (job.requests_sent, job.credits_billed, job.rows) == (16, 11, 1)  # s1's 12 sent + s2's 4 granted
    assert await store.grant("j2", "s3", 0, 16) == 4  # exactly the 4 given back
    assert await store.grant("j2", "s3", 4, 16) == 0


async def test_every_worker_uses_the_jobs_heartbeat_timeout_not_its_hosts(store: Replaying) -> None:
    """A job created with a 2 s heartbeat timeout, worked from a host whose jobs.heartbeat_timeout is 600 s: the
    worker's queue and its sweep of dead workers' items use the job's 2 s."""
    from crawler.config import Secret, Settings
    from crawler.runs.job_worker import JobWorker

    assert await store.create_job("j3", "posts", {}, ENTRIES, heartbeat_timeout=2.0)
    pg = await store.job("j3")
    assert pg is not None and pg.heartbeat_timeout == 2.0
    store.heartbeat_timeout = 600.0
    worker = JobWorker(store, pg, Settings(jobs_heartbeat_timeout=600.0), api_key=Secret("k"), worker_id="w")
    assert worker.queues[0].heartbeat_timeout == 2.0 and worker.heartbeat_timeout == 2.0


async def test_crawler_jobs_calls_a_worker_live_by_the_jobs_heartbeat_timeout(store: Replaying) -> None:
    """`crawler jobs` on a host whose jobs.heartbeat_timeout is 600 s, over a job with a 2 s one: a worker last seen
    5 s ago is not live, one seen now is."""
    from crawler.config import Settings
    from crawler.runs.job_export import jobs_report
    from crawler.stores.model import WorkerInfo

    assert await store.create_job("j5", "posts", {}, ENTRIES, heartbeat_timeout=2.0)
    for pid in (1, 2):
        await store.register(WorkerInfo(f"w{pid}", "h", pid, "k" * 16, "redis", "j5", live=True))
    conn = await psycopg.AsyncConnection.connect(store.url, autocommit=True)
    try:
        await conn.execute("UPDATE crawler_workers SET seen = now() - interval '5 seconds' WHERE id = 'w1'")
    finally:
        await conn.close()
    listing = json.loads(await jobs_report(Settings(jobs_heartbeat_timeout=600.0), url=store.url, as_json=True))
    assert {w["pid"]: w["live"] for w in listing[0]["workers"]} == {1: False, 2: True}


async def test_an_export_goes_on_after_a_postgresql_blip_and_a_loss_is_store_lost(store: Replaying) -> None:
    """The connections cut mid-export: the row stream goes on after the rows already given (each once, in order);
    PostgreSQL gone past the stall limit: StoreLost (the one-line exit 1), not a driver error."""
    from crawler.stores.postgres import StoreLost
    from tests.test_distributed import Proxy

    assert await store.create_job("j4", "posts", {}, ENTRIES)
    taken = await store.take("j4", 1, "w")
    assert taken is not None
    rows = [(f"r{i:02}", json.dumps([f"r{i:02}"])) for i in range(10)]
    p = PageCommit(1, taken.version, rows, ItemUpdate(1, "done", rows=10, pages=1))
    await store.commit("j4", "s", [p], 1, 1)
    assert p.committed
    schema_url = store.url.replace("127.0.0.1:5432", "127.0.0.1:{port}")
    async with Proxy() as proxy, PgJobStore(schema_url.format(port=proxy.port), stall_limit=30,
                                            heartbeat_timeout=2) as through:
        got = []
        async for values in through.rows("j4", batch=3):
            got.append(values[0])
            if len(got) == 4:
                proxy.cut()  # every connection dropped; new ones refused until up again
                proxy.up = True
        assert got == [rid for rid, _ in rows]
        gone = PgJobStore(schema_url.format(port=proxy.port), stall_limit=0.5, heartbeat_timeout=2)
        seen = 0
        with pytest.raises(StoreLost, match="has not answered"):
            async for _ in gone.rows("j4", batch=3):
                seen += 1
                proxy.cut()  # and stays down
    assert seen == 3


async def test_a_commit_tried_again_after_a_try_that_did_not_hold_commits(store: Replaying) -> None:
    """The first try of a commit rolled back (the connection died before COMMIT): the retry commits the page, and
    the worker's next page (at the version the retry gave) commits too."""
    assert await store.create_job("j5", "posts", {}, ENTRIES)
    taken = await store.take("j5", 1, "w")
    assert taken is not None
    store.roll_back_first = True
    first = page(1, taken.version, "a")
    await store.commit("j5", "s", [first], 1, 1)
    assert first.committed
    second = page(1, first.new_version, "b")
    await store.commit("j5", "s", [second], 2, 2)
    assert second.committed


async def test_an_item_cancelled_before_it_starts_still_releases_the_queue() -> None:
    """A stop (SIGTERM) that ends the run while items are held, one in a worker and two fed but never worked: every
    queue callback returns instead of waiting forever (pgqueuer's shutdown waits for its handlers, so the process
    would never exit); after the run one handed out still returns at once."""
    from crawler.engine.pool import Engine, StopPolicy
    from crawler.errors import Interrupted
    from crawler.options import EngineOptions
    from crawler.stores.pg_queue import QueueItemSource

    stop = StopPolicy()
    source = QueueItemSource("postgresql://127.0.0.1:1/none", "j", concurrency=2, heartbeat_timeout=2.0, where="pg",
                             stall_limit=1.0, lost=stop.request_stop)
    started = asyncio.Event()

    async def handler(seq: int) -> None:
        started.set()
        await asyncio.Event().wait()  # until the stop cancels it

    engine = Engine(source=source, handler=handler, stop=stop, options=EngineOptions(workers=1, start=1))
    run = asyncio.create_task(engine.run())
    callbacks = [asyncio.create_task(source._on_item(seq)) for seq in (1, 2, 3)]
    await asyncio.wait_for(started.wait(), 5)
    for _ in range(100):  # until the feeder has queued the other two (a few loop turns, bounded)
        if engine._queue.qsize() == 2:
            break
        await asyncio.sleep(0)
    assert engine._queue.qsize() == 2
    stop.request_stop(Interrupted("stopped by SIGTERM", 143))  # no client: a hard stop
    await asyncio.wait_for(run, 5)
    await asyncio.wait_for(asyncio.gather(*callbacks), 5)
    source.close()
    await asyncio.wait_for(source._on_item(4), 5)


@pytest.mark.slow
async def test_a_call_sent_into_a_silent_network_ends_at_the_stall_limit() -> None:
    """The network to PostgreSQL goes silent (every packet lost, nothing refused) while the store talks to it: the
    store's call ends with StoreLost about retry.stall_limit later, not after TCP's retransmissions (~15 minutes);
    keepalives alone never probe a connection with data in flight. Runs in a network namespace of its own."""
    import shutil
    import sys
    from pathlib import Path

    probe = await asyncio.create_subprocess_exec("unshare", "-n", "true", stderr=asyncio.subprocess.DEVNULL)
    if shutil.which("ip") is None or await asyncio.wait_for(probe.wait(), 10) != 0:
        pytest.fail("needs `unshare -n` (root or user namespaces) and `ip` (iproute2) to cut a network of its own")
    name = f"crawler_s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        row = conn.execute("SHOW unix_socket_directories").fetchone()
        assert row is not None
        sockets = str(row[0]).split(",")[0].strip()
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "-n", sys.executable, str(Path(__file__).with_name("silent_network.py")), sockets, name,
            "3", "2", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["outcome"] == "StoreLost", result
    assert result["seconds"] < 3 + 2 + 5, result  # the stall limit, one heartbeat timeout, and slack


async def test_a_job_created_across_a_lost_connection_has_every_item(store: Replaying, tmp_path: Any) -> None:
    """The store's connection killed while it creates a job from a spooled input (the COPY under way): the retried
    transaction reads the input again from its start, so the job holds every item, not only those after the cut."""
    from crawler.runs.distributed import _Spooled

    n = 200_000
    spool = tmp_path / "input.jsonl"
    spool.write_text("".join(json.dumps([f"user{i}", f"user{i}", None, None]) + "\n" for i in range(n)))
    assert store._conn is not None
    pid = store._conn.info.backend_pid
    creating = asyncio.get_running_loop().create_task(store.create_job("j6", "posts", {}, _Spooled(spool)))
    async with await psycopg.AsyncConnection.connect(PG, autocommit=True) as watcher:
        async with asyncio.timeout(60):
            while True:  # kill the store's session once its COPY is under way
                cur = await watcher.execute("SELECT query FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
                                            (pid,))
                row = await cur.fetchone()
                if row is not None and str(row[0]).startswith("COPY"):
                    await watcher.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    break
                assert not creating.done(), "the job was created before its COPY was seen"
                await asyncio.sleep(0.001)
    assert await asyncio.wait_for(creating, 60)
    progress = await store.progress("j6")
    assert progress.total == n, progress


async def test_a_worker_whose_job_is_deleted_by_a_restart_loses_its_item_instead_of_crashing(store: Replaying) -> None:
    """--restart deletes the job before it creates it anew (two transactions; the new one copies the whole input): a
    worker's commit or budget grant in between finds no job. Its page is refused and its grant is a lost lease (the
    item dropped, as on a takeover), not a foreign-key violation or an assertion that ends the worker."""
    from crawler.stores.model import LeaseLost

    assert await store.create_job("j6", "posts", {}, ENTRIES)
    taken = await store.take("j6", 1, "w")
    assert taken is not None
    await store.delete_job("j6")
    late = page(1, taken.version, "a")
    await store.commit("j6", "s", [late], 3, 3)
    assert not late.committed
    with pytest.raises(LeaseLost):
        await store.grant("j6", "s", 0, 4)
    await store.give_back("j6", "s", 0)
    assert await store.job("j6") is None


async def test_a_job_created_again_after_a_lost_connection_has_every_item(store: Replaying, tmp_path: Any) -> None:
    """The starter's create_job copies the input from its spool file; the connection lost mid-way runs the
    transaction again (`_run`'s retry): the job then has every input item, not only those after where the first try
    stopped reading (a spool read once was exhausted by the first try)."""
    from crawler.runs.distributed import _Spooled

    spool = tmp_path / "spool.jsonl"
    spool.write_text("".join(json.dumps([f"h{i}", f"@h{i}", None, None]) + "\n" for i in range(5)))
    store.roll_back_first = True  # the first try rolled back, as when the connection died before COMMIT
    assert await store.create_job("j7", "posts", {}, _Spooled(spool))
    progress = await store.progress("j7")
    assert (progress.total, progress.pending) == (5, 5)


async def test_putting_items_on_the_queue_waits_out_a_postgresql_blip(store: Replaying) -> None:
    """The queue's own connection (enqueue: the starter's items, a session's items handed back) refused for a while:
    the store retries it like its own calls, the items are queued once PostgreSQL answers; gone past the stall limit,
    StoreLost (the one-line exit 1), not a driver error that ends the process as an unexpected one."""
    from crawler.stores import pg_queue as itemqueue
    from crawler.stores.postgres import StoreLost
    from tests.test_distributed import Proxy

    await itemqueue.install(store.url)
    assert await store.create_job("j8", "posts", {}, ENTRIES)
    schema_url = store.url.replace("127.0.0.1:5432", "127.0.0.1:{port}")
    async with Proxy() as proxy:
        through = schema_url.format(port=proxy.port)
        proxy.up = False
        queued = asyncio.create_task(store.outside(lambda: itemqueue.enqueue(through, "j8", [1, 2])))
        async with asyncio.timeout(10):
            while proxy.refused < 2 and not queued.done():  # two tries refused (bounded)
                await asyncio.sleep(0.01)
        assert not queued.done()
        proxy.up = True
        await asyncio.wait_for(queued, 10)
        proxy.up = False
        store.stall_limit = 0.5
        with pytest.raises(StoreLost, match="has not answered"):
            await asyncio.wait_for(store.outside(lambda: itemqueue.enqueue(through, "j8", [1])), 10)
    async with await psycopg.AsyncConnection.connect(store.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM pgqueuer WHERE entrypoint = 'crawler_j8'")
        row = await cur.fetchone()
    assert row is not None and row[0] == 2


async def test_a_job_of_an_edited_input_continues_the_one_of_its_output_in_one_transaction(store: Replaying) -> None:
    """The job of an edited input (same command, options and output) takes over the committed state of the job it
    supersedes (done items with their rows, a walk's cursor, the counters) and adds only the new items; the old job
    is gone and a late page of its worker writes nothing; a first try rolled back changes nothing."""
    assert await store.create_job("old", "posts", {}, [*ENTRIES, ("carol", "carol", None, None)], output="h:/o.csv")
    first, second = await store.take("old", 1, "w"), await store.take("old", 2, "w")
    assert first is not None and second is not None
    await store.commit("old", "s", [PageCommit(1, first.version, [("v1", '["v1"]')],
                                               ItemUpdate(1, "done", rows=1, pages=1)), page(2, second.version, "b")],
                       3, 3)
    store.roll_back_first = True
    entries = [("bob", "bob", None, None), ("alice", "alice", None, None), ("dave", "dave", None, None)]
    created = await store.create_job("new", "posts", {}, entries, output="h:/o.csv")
    assert created is not None and (created.supersedes, created.added, created.gone) == ("old", 1, 0)
    assert await store.job("old") is None and [j.id for j in await store.open_jobs()] == ["new"]
    job = await store.job("new")
    assert job is not None and (job.requests_sent, job.credits_billed, job.rows) == (3, 3, 2)
    assert [rows[0] async for rows in store.rows("new")] == ["v1", "x"]
    late = page(2, second.version, "late")
    await store.commit("old", "s", [late], 4, 4)
    assert not late.committed
    bob = await store.take("new", 2, "w2")
    assert bob is not None and bob.cursor == {"c": "b"}  # the walk goes on where it was
    assert await store.take("new", 1, "w2") is None  # alice is done
    assert (await store.progress("new")).pending == 2  # bob and dave; carol (not done, not in the input) left
    assert await store.create_job("other", "posts", {}, entries, output="h:/other.csv") is not None
    assert await store.job("new") is not None  # another output: another job


async def test_opening_a_store_whose_schema_is_current_takes_no_table_lock(store: Replaying) -> None:
    """A worker joining a busy job opens the store while other sessions hold locks on its tables (a running commit
    holds ROW EXCLUSIVE; here an open transaction holds ACCESS SHARE on crawler_jobs): with the schema current, the
    open runs no DDL (ALTER TABLE would wait for an ACCESS EXCLUSIVE lock, and deadlock with a running commit)."""
    url = store.where.removeprefix("jobs.url = ")  # the fixture's URL (no password to mask)
    await _opens_while_jobs_are_locked(url)


async def test_a_store_another_version_installed_since_opens_without_ddl(store: Replaying,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts of two crawler versions on one job database (a rolling upgrade): after the other version installs
    its schema, this version's open still finds its own and runs no DDL under the workers' locks."""
    from crawler.stores import pg_schema

    url = store.where.removeprefix("jobs.url = ")
    mine = pg_schema.FINGERPRINT
    monkeypatch.setattr(pg_schema, "FINGERPRINT", "another-version")
    other = PgJobStore(url, stall_limit=10, heartbeat_timeout=2)
    await asyncio.wait_for(other.open(), 10)  # the other version installs (its fingerprint is new)
    await other.aclose()
    monkeypatch.setattr(pg_schema, "FINGERPRINT", mine)
    await _opens_while_jobs_are_locked(url)


async def _opens_while_jobs_are_locked(url: str) -> None:
    """A store opens within 10 s while another session holds ACCESS SHARE on crawler_jobs (so it ran no DDL)."""
    busy = await psycopg.AsyncConnection.connect(url)
    try:
        await busy.execute("LOCK TABLE crawler_jobs IN ACCESS SHARE MODE")  # held until the rollback below
        joining = PgJobStore(url, stall_limit=10, heartbeat_timeout=2)
        await asyncio.wait_for(joining.open(), 10)
        await joining.aclose()
    finally:
        await busy.rollback()
        await busy.close()
