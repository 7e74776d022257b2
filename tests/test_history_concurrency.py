"""Several processes on one history store: concurrent ingests on SQLite, a fresh PostgreSQL schema opened by many at
once, a lost or silent PostgreSQL server, and days ingested out of order. Expected values come from the simulator's
world."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

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

