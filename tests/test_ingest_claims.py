"""Several ingest runs on one history store: a user-day is claimed in the store before it is fetched, so each
watch-list user is fetched (and billed) once a day however many runs share the store; their commits never deadlock.

Runs on SQLite and on the PostgreSQL server (never skipped). Expected values come from the simulator's world and
its server-side record of every request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from crawler.history.store import HistoryStore
from crawler.sim.server import Simulator
from tests.conftest import SimFactory, fast_settings
from tests.test_cli import FAST_TOML, crawler, environ, public_users
from tests.test_ingest import (  # noqa: F401  (store_url: the fixture)
    DAY0,
    TEST_NOW_ENV,
    WORLD,
    day,
    rows,
    run,
    snapshots,
    store_url,
    write_watch,
)

PROFILE_PATHS = ("/userinfo-by-username/", "/userinfo-by-id/")


def profile_requests(sim: Simulator) -> Counter[str]:
    """How many profile requests the simulator received for each handle or user id (its own record)."""
    asked: Counter[str] = Counter()
    for target in sim.stats.targets:
        parts = urlsplit(target)
        if parts.path in PROFILE_PATHS:
            query = parse_qs(parts.query)
            asked.update(query.get("username", []) + query.get("userid", []))
    return asked


async def two_ingests_at_once(sim: Simulator, tmp: Path, url: str, lists: list[list[int]]) -> list[tuple[int, str]]:
    """`crawler ingest` of each watch list, each in its own directory with its own out-dir, all on the history at
    ``url``, started together; (exit code, stderr) of each."""
    HistoryStore(url).close()  # made before: two runs migrating one fresh schema together is item 7's test
    env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
    runs = []
    for n, watch in enumerate(lists):
        cwd = tmp / f"host{n}"
        cwd.mkdir()
        (cwd / "config.toml").write_text(FAST_TOML)
        write_watch(cwd / "watch.txt", [sim.world.handle(i) for i in watch])
        runs.append(crawler(["ingest", "watch.txt", "--out-dir", "out", "-q", "--history-url", url], env, cwd))
    return [(code, err) for code, _, err in await asyncio.gather(*runs)]


@pytest.mark.slow
async def test_two_ingests_on_one_history_fetch_each_user_once_a_day(simulator: SimFactory, tmp_path: Path,
                                                                     store_url: str) -> None:  # noqa: F811
    """Two ingests with overlapping watch lists run together on one history store: both exit 0, the simulator
    saw exactly one profile request for every user of either list, and each is snapshotted once that day."""
    async with simulator(world=WORLD, latency=(0.02, 0.05), record_arrivals=True) as sim:
        w = sim.world
        users = public_users(w, 240)
        lists = [users[:160], users[80:]]  # 80 users on both lists
        results = await two_ingests_at_once(sim, tmp_path, store_url, lists)
        asked = profile_requests(sim)
    for code, err in results:
        assert code == 0, err
    handles = {w.handle(i) for i in users}
    assert set(asked) == handles  # by name: the names were never bound before
    twice = {h: n for h, n in asked.items() if n != 1}
    assert not twice, f"{len(twice)} of {len(handles)} users fetched more than once: {sorted(twice.items())[:5]}"
    ids = sorted(w.user_id(i) for i in users)
    assert sorted(u for u, d in snapshots(store_url) if d == day(0)) == ids
    for n, watch in enumerate(lists):  # each run's day file holds the rows it fetched: together, each user once
        assert len(rows(tmp_path / f"host{n}" / "out" / f"profiles-{day(0)}.csv")) <= len(watch)
    assert sum(len(rows(tmp_path / f"host{n}" / "out" / f"profiles-{day(0)}.csv")) for n in range(2)) == len(ids)



def test_a_claim_keeps_other_runs_off_until_it_expires_on_the_stores_clock(store_url: str) -> None:  # noqa: F811
    """A run's claim on a user-day refuses other runs and not its owner; once past its expiry (the store's clock)
    another run takes it; a run's end releases its own claims and every expired one."""
    store = HistoryStore(store_url)
    try:
        d = dt.date(2026, 1, 1)

        def claim(owner: str, subject: str = "user:1") -> bool:
            with store.transaction():
                return store.claim(d, subject, owner, 60)

        assert claim("run-a") and not claim("run-b") and claim("run-a")
        assert claim("run-b", "user:2")  # another user, another day's work: no conflict
        store._exec("UPDATE claims SET expires = expires - 120 WHERE owner = 'run-a'")  # run-a died 60 s ago
        assert claim("run-b")
        assert claim("run-c", "user:3") and claim("run-a", "user:4")
        store._exec("UPDATE claims SET expires = expires - 120 WHERE owner = 'run-c'")
        store.release_claims("run-b")
        assert store.claims() == [(d.isoformat(), "user:4", "run-a")]
    finally:
        store.close()


async def test_a_user_claimed_by_a_live_run_is_left_to_it_and_a_dead_runs_claim_is_taken_over(
        simulator: SimFactory, tmp_path: Path, store_url: str) -> None:  # noqa: F811
    """A user another run holds a live claim on is not fetched (the summary says so); once that claim has expired
    (its run died without committing), the next run fetches the user, once, and leaves no claim behind."""
    async with simulator(world=WORLD, record_arrivals=True) as sim:
        w = sim.world
        users = public_users(w, 6)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in users])
        held = w.handle(users[2])
        store = HistoryStore(store_url)
        try:
            with store.transaction():
                assert store.claim(DAY0, f"name:{held}", "a-dead-run", 3600)
        finally:
            store.close()
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url)
        first = await run(tmp_path, settings, 0, with_posts=False)
        assert first.exit_code == 0
        assert "1 users were being fetched by another run on this history store" in first.outcomes[0].summary.notes
        assert set(profile_requests(sim)) == {w.handle(i) for i in users} - {held}
        store = HistoryStore(store_url)
        try:
            assert store.claims() == [(day(0), f"name:{held}", "a-dead-run")]
            store._exec("UPDATE claims SET expires = expires - 7200")  # an hour past its end
        finally:
            store.close()
        second = await run(tmp_path, settings, 0, with_posts=False)
        assert second.exit_code == 0 and not second.outcomes[0].summary.notes
        assert profile_requests(sim) == Counter({w.handle(i): 1 for i in users})
    assert sorted(u for u, d in snapshots(store_url) if d == day(0)) == sorted(w.user_id(i) for i in users)
    store = HistoryStore(store_url)
    try:
        assert store.claims() == []
    finally:
        store.close()


@pytest.mark.slow
async def test_transactions_postgresql_rolls_back_for_meeting_each_other_run_again(simulator: SimFactory,
                                                                                   tmp_path: Path) -> None:
    """Two ingests on one PostgreSQL history whose transactions are SERIALIZABLE (so PostgreSQL rolls back one of
    two that meet): each rolled-back transaction runs again, never "the connection was lost"; both exit 0, every
    user is fetched once and is in one day file once. (The retry itself is helper hstore's, crawler/stores/pg_jobs.py's
    Outage: this checks it with claims and with the day files of a commit run again.)"""
    from tests.serve_history import pg_schema

    with pg_schema() as url:
        strict = f"{url}%20-cdefault_transaction_isolation%3Dserializable"
        async with simulator(world=WORLD, latency=(0.02, 0.05), record_arrivals=True) as sim:
            w = sim.world
            users = public_users(w, 300)
            results = await two_ingests_at_once(sim, tmp_path, strict, [users[:200], users[100:]])
            asked = profile_requests(sim)
        for code, err in results:
            assert code == 0, err[-6000:]
        assert all("lost" not in err for _, err in results)
        # A warning for each transaction run again: none would mean the runs never met, and this checked nothing.
        assert sum(err.count("transaction rolled back") for _, err in results) > 0
        assert asked == Counter({w.handle(i): 1 for i in users})
        assert sorted(u for u, d in snapshots(url) if d == day(0)) == sorted(w.user_id(i) for i in users)
        assert sum(len(rows(tmp_path / f"host{n}" / "out" / f"profiles-{day(0)}.csv")) for n in range(2)) == len(users)
