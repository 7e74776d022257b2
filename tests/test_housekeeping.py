"""Housekeeping: local rate ledgers idle for over a week, and the worker sessions of finished PostgreSQL jobs, are
pruned automatically (a ledger when another is opened; sessions when a store is opened or a job completes)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from crawler.rate.ledger import FileLedger, prune_idle
from crawler.rate.rules import Rules
from crawler.stores.model import WorkerInfo
from crawler.stores.pg_jobs import PgJobStore
from tests.pg import private_schema, schema_url

RULES = Rules(limit=200, window=60.0, max_per_second=10, burst=1, margin=0.1)
WEEK = 7 * 86400


async def _use(directory: Path, name: str) -> Path:
    """Open the ledger `name` in `directory`, reserve one start in it, close it; its file."""
    ledger = FileLedger(name, directory=directory)
    await ledger.open(RULES)
    try:
        await ledger.reserve(RULES, "test:1")
    finally:
        await ledger.aclose()
    return ledger.path


def _age(db: Path, seconds: float) -> None:
    """Date the ledger's files `seconds` back (its last use)."""
    then = time.time() - seconds
    for part in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if part.exists():
            os.utime(part, (then, then))


async def test_a_ledger_idle_for_over_a_week_goes_when_another_is_opened(tmp_path: Path) -> None:
    """Opening a ledger removes the ledgers unused for over 7 days; one used 6 days ago stays, and so does the
    one being opened however old."""
    old, recent, mine = [await _use(tmp_path, n) for n in ("old", "recent", "mine")]
    _age(old, WEEK + 3600)
    _age(recent, WEEK - 86400)
    _age(mine, WEEK + 3600)
    ledger = FileLedger("mine", directory=tmp_path)
    await ledger.open(RULES)
    await ledger.aclose()
    assert not old.exists() and not old.with_suffix(".lock").exists()
    assert not list(tmp_path.glob("ledger-old*"))
    assert recent.exists() and mine.exists()
    assert prune_idle(tmp_path) == []  # nothing else is old


HOLDER = """
import asyncio, sys
from pathlib import Path
from crawler.rate.ledger import FileLedger
from crawler.rate.rules import Rules

async def main() -> None:
    ledger = FileLedger("held", directory=Path(sys.argv[1]))
    await ledger.open(Rules(limit=200, window=60.0, max_per_second=10, burst=1, margin=0.1))
    print("open", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
    await ledger.aclose()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_ledger_another_process_has_open_is_never_removed(tmp_path: Path) -> None:
    """A ledger open in another process (a `crawler work` service idle for a week) stays however old its file;
    once that process has closed it, the next open elsewhere removes it."""
    held = await _use(tmp_path, "held")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, str(tmp_path),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), timeout=30) == b"open\n"
    _age(held, WEEK + 3600)
    await _use(tmp_path, "other")
    assert held.exists()
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    _age(held, WEEK + 3600)  # its close touched nothing that counts as a use, but be sure
    await _use(tmp_path, "other")
    assert not held.exists()


@pytest.fixture
async def store() -> AsyncIterator[PgJobStore]:
    with private_schema("crawler_h") as name:
        async with PgJobStore(schema_url(name), stall_limit=10, heartbeat_timeout=2) as s:
            yield s


async def _sessions(store: PgJobStore) -> set[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        cur = await conn.execute("SELECT job, session FROM crawler_sessions")
        return {(str(j), str(s)) for j, s in await cur.fetchall()}


async def test_sessions_of_finished_jobs_are_folded_into_the_job_and_removed(store: PgJobStore) -> None:
    """A done job's sessions whose worker left are folded into the job (its counters and workers unchanged) and
    deleted; a live worker's session of it stays until that worker leaves; a running job's sessions all stay."""
    entries = [("alice", "alice", None, None)]
    for jid in ("done", "running"):
        assert await store.create_job(jid, "posts", {}, entries)
    for w in ("gone", "live"):
        await store.register(WorkerInfo(w, "h", 1, "k" * 16, "local", None, live=True))
    await store.grant("done", "gone:aaaaaa", 0, 12)
    await store.commit("done", "gone:aaaaaa", [], 10, 9)
    await store.give_back("done", "gone:aaaaaa", 10)
    await store.commit("done", "live:bbbbbb", [], 5, 5)
    await store.commit("running", "gone:cccccc", [], 3, 3)
    await store.set_status("done", "done")
    await store.leave("gone")
    before = {j.id: (j.requests_sent, j.credits_billed, j.rows) for j in await store.jobs()}
    assert before["done"] == (15, 14, 0)

    assert (await store.housekeep()).sessions == 1
    assert await _sessions(store) == {("done", "live:bbbbbb"), ("running", "gone:cccccc")}
    assert {j.id: (j.requests_sent, j.credits_billed, j.rows) for j in await store.jobs()} == before
    assert {w.id for w in await store.workers("done")} == {"gone", "live"}  # `crawler jobs` still lists both

    await store.leave("live")
    again = PgJobStore(store.url, stall_limit=10, heartbeat_timeout=2)
    async with again:  # a starter or worker opening the store prunes
        assert await _sessions(again) == {("running", "gone:cccccc")}
        assert {j.id: (j.requests_sent, j.credits_billed, j.rows) for j in await again.jobs()} == before
        assert {w.id for w in await again.workers("done")} == {"gone", "live"}


async def _workers(store: PgJobStore) -> set[str]:
    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        cur = await conn.execute("SELECT id FROM crawler_workers")
        return {str(i) for (i,) in await cur.fetchall()}


async def _backdate(store: PgJobStore, worker: str, column: str, seconds: float) -> None:
    """Move a worker's `column` (its last heartbeat, or its end) `seconds` back on the database's clock."""
    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        await conn.execute(f"UPDATE crawler_workers SET {column} = now() - make_interval(secs => %s) WHERE id = %s",
                           (seconds, worker))


DAY = 86400


async def test_rows_of_workers_that_ended_a_day_ago_or_went_silent_for_a_week_are_pruned(store: PgJobStore) -> None:
    """The housekeeping that folds sessions also removes the rows of workers that ended cleanly over a day ago and
    of workers silent for over a week (killed); a worker that ended just now stays listed by `crawler jobs`, and
    the rows of live workers stay, also one whose last heartbeat is days old (a starter exporting after its
    session left)."""
    assert await store.create_job("j", "posts", {}, [("alice", "alice", None, None)])
    for w in ("ended_old", "ended_now", "killed", "exporting", "live"):
        await store.register(WorkerInfo(w, "h", 1, "k" * 16, "local", "j", live=True))
    await store.retire("ended_old")
    await store.retire("ended_now")
    await _backdate(store, "ended_old", "ended", DAY + 3600)
    await _backdate(store, "killed", "seen", WEEK + 3600)
    await store.leave("exporting")  # its session ended; the process goes on without a heartbeat
    await _backdate(store, "exporting", "seen", WEEK - DAY)
    await store.beat("live", "j")

    pruned = await store.housekeep()
    assert (pruned.sessions, pruned.workers) == (0, 2)
    assert await _workers(store) == {"ended_now", "exporting", "live"}
    assert {w.id: w.live for w in await store.workers("j")} == {"ended_now": False, "exporting": False, "live": True}

    await _backdate(store, "ended_now", "ended", DAY + 3600)
    async with PgJobStore(store.url, stall_limit=10, heartbeat_timeout=2) as again:  # opening a store prunes
        assert await _workers(again) == {"exporting", "live"}
