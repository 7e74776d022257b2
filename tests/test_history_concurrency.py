"""Several processes on one history store: concurrent ingests on SQLite, a fresh PostgreSQL schema opened by many at
once, a lost or silent PostgreSQL server, and days ingested out of order. Expected values come from the simulator's
world."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from crawler.runs.ingest import TEST_NOW_ENV
from crawler.sim.data import WorldConfig
from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, environ, public_users
from tests.test_ingest import day, rows, snapshots, write_watch

WORLD = WorldConfig(seed=41, users=3_000, missing_fraction=0.0, private_fraction=0.0)


@pytest.mark.slow
async def test_two_ingests_on_one_sqlite_history_both_complete(simulator: SimFactory, tmp_path: Path) -> None:
    """Two watch lists (overlapping) ingested at once from one directory into the default SQLite history both exit
    0, and every user of both lists has that day's snapshot."""
    async with simulator(world=WORLD, latency=(0.0, 0.01)) as sim:
        w = sim.world
        users = public_users(w, 120, min_videos=5, max_videos=40)
        lists = {"a": users[:80], "b": users[40:]}  # 40 users in both
        for name, picked in lists.items():
            write_watch(tmp_path / f"{name}.txt", [w.handle(i) for i in picked])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crawler", "ingest", f"{name}.txt", "--out-dir", f"out-{name}", "--posts", "-q",
            "--page-size", "10", cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE) for name in lists]
        ended = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
        for proc, (_, err) in zip(procs, ended, strict=True):
            assert proc.returncode == 0, err.decode()
    stored = {u for u, d in snapshots(str(tmp_path / ".crawler" / "history.db")) if d == day(0)}
    assert stored == {w.user_id(i) for i in users}
    for name, picked in lists.items():  # each out-dir's day file holds rows of its own list's users only
        got = {r["user_id"] for r in rows(tmp_path / f"out-{name}" / f"profiles-{day(0)}.csv")}
        assert got and got <= {w.user_id(i) for i in picked}


def _open_fresh_schemas(urls: list[str], barrier: Any, errors: Any) -> None:
    """A process that opens a history store at each of ``urls`` in turn, all of them together: each connects, then
    waits at ``barrier`` so every process's migration starts at once; what failed goes to ``errors``."""
    from crawler.history.store import HistoryStore

    class Together(HistoryStore):
        def _migrate(self) -> None:
            barrier.wait(30)
            super()._migrate()

    for url in urls:
        try:
            Together(url).close()
        except Exception as exc:
            errors.put(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                barrier.wait(30)  # a failed connect must not leave the others at the barrier


def open_together(urls: list[str]) -> None:
    """Eight spawned processes open each store of ``urls`` at the same instant (a barrier before each); none fails."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_open_fresh_schemas, args=(urls, barrier, errors)) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
    failed = []
    while not errors.empty():
        failed.append(errors.get())
    assert [p.exitcode for p in procs] == [0] * 8 and not failed, failed


@pytest.mark.slow
def test_processes_opening_a_fresh_postgresql_history_together_never_fail() -> None:
    """Eight processes opening the same fresh PostgreSQL history schema at the same instant, 20 rounds: no error,
    and each schema ends at the current version, recorded once."""

    import psycopg

    from crawler.history.db import SCHEMA_VERSION
    from tests.test_ingest import PG_URL

    names = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(20)]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE SCHEMA {name}")
    try:
        urls = [f"{PG_URL}?options=-csearch_path%3D{name}" for name in names]
        open_together(urls)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in names:
                got = conn.execute(f"SELECT version FROM {name}.schema_version ORDER BY version").fetchall()
                assert [v for (v,) in got] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in names:
                conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_history_together_migrate_it_once(tmp_path: Path) -> None:
    """Eight processes opening the same fresh SQLite history at the same instant, 20 rounds: no error, and each
    store records each schema version once (a process that read an old version migrates only what is left)."""
    import sqlite3

    from crawler.history.db import SCHEMA_VERSION

    paths = [str(tmp_path / f"h{n}.db") for n in range(20)]
    open_together(paths)
    for path in paths:
        with contextlib.closing(sqlite3.connect(path)) as db:
            got = [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version")]
        assert got == list(range(1, SCHEMA_VERSION + 1)), path

async def test_ingesting_an_earlier_day_again_records_no_rename(simulator: SimFactory, tmp_path: Path) -> None:
    """Days 1-5 ingested as the world renames users, then day 3 ingested again (`--date`, `--restart`), with the
    world as it is now and as it was on day 3 (`make demo` run twice): the store holds exactly the renames the world
    made."""
    from crawler.history.store import HistoryStore
    from crawler.runs.ingest import ingest
    from crawler.sim.data import World
    from tests.conftest import KEY, fast_settings

    world = WorldConfig(seed=41, users=3_000, missing_fraction=0.0, private_fraction=0.0, rename_probability=0.3)
    async with simulator(world=world) as sim:
        w = sim.world
        watch = public_users(w, 30)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        url = str(tmp_path / "history.db")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)

        async def ingest_day(d: int, *, restart: bool = False) -> None:
            result = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY,
                                  date=day(d), restart=restart, install_signals=False)
            assert result.exit_code == 0, result.outcomes

        for d in range(5):
            await ingest_day(d)
            if d < 4:
                sim.advance_day()
        await ingest_day(2)  # already snapshotted: nothing to fetch
        await ingest_day(2, restart=True)  # fetched again, the world as it is now (day 4)
        w.day = 2
        await ingest_day(2, restart=True)  # fetched again, the world as it was on day 2 (`make demo` twice)
    then = World(world)
    made = set()
    for d in range(1, 5):
        before = {i: then.handle(i) for i in watch}
        then.advance()
        made |= {(then.user_id(i), before[i], then.handle(i), day(d)) for i in watch if then.handle(i) != before[i]}
    assert made  # the world did rename some of them
    store = HistoryStore(url)
    try:
        assert {(r.user_id, r.old, r.new, r.day) for r in store.renames()} == made
    finally:
        store.close()


STAGED_ROLLBACKS = """
CREATE SEQUENCE staged_rollbacks;
CREATE FUNCTION staged_rollback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    CASE nextval('staged_rollbacks')
        WHEN 1 THEN RAISE EXCEPTION 'staged deadlock' USING ERRCODE = 'deadlock_detected';
        WHEN 2 THEN RAISE EXCEPTION 'staged conflict' USING ERRCODE = 'serialization_failure';
        ELSE NULL;
    END CASE;
    RETURN NEW;
END $$;
CREATE TRIGGER staged_rollback BEFORE INSERT ON snapshots FOR EACH ROW EXECUTE FUNCTION staged_rollback();
"""


@pytest.mark.slow
async def test_a_deadlock_and_a_serialization_failure_on_a_postgresql_history_are_retried(
        simulator: SimFactory, tmp_path: Path) -> None:
    """The PostgreSQL history rolls back ingest's first two commits (a deadlock, then a serialization failure, as
    another run's commits would cause): ingest asks again, never calls it a lost connection, exits 0, and every
    watch-list user is fetched once and snapshotted once."""
    import psycopg

    from crawler.history.store import HistoryStore
    from tests.test_cli import crawler
    from tests.test_ingest_edges import assert_day_0_complete, night_0_watch, pg_history

    with pg_history() as (direct, _):
        HistoryStore(direct).close()
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(STAGED_ROLLBACKS)
        async with simulator(world=WORLD) as sim:
            w = sim.world
            watch, env = night_0_watch(sim, tmp_path)
            code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "--posts", "-q",
                                          "--history-url", direct], env, tmp_path)
            assert code == 0 and "Traceback" not in err, err
            assert "transaction rolled back (DeadlockDetected); retrying" in err and "lost" not in err, err
            assert sim.stats.by_endpoint["/userinfo-by-username"] == len(watch)
        with psycopg.connect(direct, autocommit=True) as conn:
            assert conn.execute("SELECT last_value FROM staged_rollbacks").fetchone() == (len(watch) + 2,)
        assert_day_0_complete(w, watch, tmp_path / "out", direct)


async def test_a_job_store_call_to_a_server_that_never_answers_ends_at_the_stall_limit() -> None:
    """PostgreSQL accepts the job store's connection, then stops answering (a proxy that forwards nothing, so TCP
    still acknowledges every packet): the store's call ends with StoreLost within about twice retry.stall_limit."""
    import time

    import pytest

    from crawler.stores.pg_jobs import PgJobStore
    from crawler.stores.postgres import StoreLost
    from tests.test_distributed import Proxy
    from tests.test_ingest_edges import pg_history

    with pg_history() as (direct, _):
        async with Proxy() as proxy:
            url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?{direct.rpartition('?')[2]}"
            store = PgJobStore(url, stall_limit=2.0, heartbeat_timeout=30.0, connect_timeout=1.0)
            await store.open()
            try:
                await store.workers()
                proxy.freeze()
                began = time.monotonic()
                with pytest.raises(StoreLost):
                    await asyncio.wait_for(store.workers(), 30)
                assert time.monotonic() - began < 2 * 2.0 + 5
            finally:
                proxy.thaw()
                await store.aclose()


@pytest.mark.slow
async def test_ingest_on_a_postgresql_history_that_never_answers_ends_at_the_stall_limit(
        simulator: SimFactory, tmp_path: Path) -> None:
    """The history database accepts ingest's connection, then stops answering mid-run (a proxy that forwards
    nothing): ingest ends within about twice retry.stall_limit with one line naming history.url (exit 1); once it
    answers again, the same command completes the day with every snapshot and post stored once."""
    import time

    from tests.test_cli import crawler
    from tests.test_distributed import Proxy
    from tests.test_ingest_edges import assert_day_0_complete, ingest_until_two_snapshots, night_0_watch, pg_history

    with pg_history() as (direct, stored):
        async with simulator(world=WORLD, latency=(0.05, 0.05)) as sim, Proxy() as proxy:
            w = sim.world
            watch, env = night_0_watch(sim, tmp_path)
            with (tmp_path / "config.toml").open("a") as fh:
                fh.write("stall_limit = 2\n[http]\nconnect_timeout = 1\n")
            url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?{direct.rpartition('?')[2]}"  # the same schema
            args, proc = await ingest_until_two_snapshots(url, env, tmp_path, stored)
            proxy.freeze()
            began = time.monotonic()
            _, raw = await asyncio.wait_for(proc.communicate(), 60)
            err = raw.decode()
            assert proc.returncode == 1 and "Traceback" not in err, err
            assert time.monotonic() - began < 2 * 2 + 8, err
            line = err.strip().splitlines()[-1]
            assert line.startswith("crawler: history.url = ") and "has not answered for 2 s" in line, err
            proxy.thaw()
            code, _, err = await crawler(args, env, tmp_path)
            assert code == 0, err
        assert_day_0_complete(w, watch, tmp_path / "out", direct)


async def test_history_serve_on_a_server_that_never_answers_says_503_at_the_stall_limit() -> None:
    """The history page's PostgreSQL server accepts its session, then stops answering (a proxy that forwards
    nothing): a page's query ends within about retry.stall_limit plus a connect timeout with a 503 saying the store
    cannot be reached, never waits for ever."""
    import time

    import pytest
    from aiohttp import web

    from crawler.history.serve import History
    from crawler.history.store import HistoryStore
    from tests.test_distributed import Proxy
    from tests.test_ingest_edges import pg_history

    with pg_history() as (direct, _):
        HistoryStore(direct).close()
        async with Proxy() as proxy:
            url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?{direct.rpartition('?')[2]}"
            # Opened and closed off the loop: the proxy runs on it.
            history = await asyncio.to_thread(History, url, stall_limit=2.0, connect_timeout=1.0)
            try:
                assert await history.run(lambda store: store.last_day()) is None
                proxy.freeze()
                began = time.monotonic()
                with pytest.raises(web.HTTPServiceUnavailable):
                    await asyncio.wait_for(history.run(lambda store: store.last_day()), 30)
                assert time.monotonic() - began < 2.0 + 1.0 + 5
            finally:
                proxy.thaw()
                await asyncio.to_thread(history.close)
