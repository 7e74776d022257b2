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

from crawler.ingest import TEST_NOW_ENV
from crawler.sim.data import WorldConfig
from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, environ, public_users
from tests.test_ingest import day, rows, snapshots, write_watch

WORLD = WorldConfig(seed=41, users=3_000, missing_fraction=0.0, private_fraction=0.0)


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
    from crawler.history import HistoryStore

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


def test_processes_opening_a_fresh_postgresql_history_together_never_fail() -> None:
    """Eight processes opening the same fresh PostgreSQL history schema at the same instant, 20 rounds: no error,
    and each schema ends at the current version, recorded once."""
    import multiprocessing

    import psycopg

    from crawler.history import SCHEMA_VERSION
    from tests.test_ingest import PG_URL

    names = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(20)]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE SCHEMA {name}")
    try:
        urls = [f"{PG_URL}?options=-csearch_path%3D{name}" for name in names]
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
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in names:
                got = conn.execute(f"SELECT version FROM {name}.schema_version ORDER BY version").fetchall()
                assert [v for (v,) in got] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in names:
                conn.execute(f"DROP SCHEMA {name} CASCADE")
