"""Issue 22 figures: the history at the size one key can feed, on SQLite and PostgreSQL.

Two stores per backend, 300k users x 30 days and 10k users x 1,095 days, bulk-loaded (`bulk_snapshots`, then the
rebuild of the kept-ready data), each beside a baseline of the same run: a bare insert of the same rows into an
unindexed table, and a plain indexed query of the same data (50 snapshots of the last day by the day index; one
user's snapshots by the primary key). Measured, median of 5 warm: the overview's first page, its first page sorted
by each gain (1/7/30 days), page 100, `history top --days 7|30 --limit 50`, a user page (the web page over
loopback, as bench_serve.py), each again mid-night (a few thousand users on a new day, the rest not yet); the
bytes per snapshot (table + indexes); ingest's commits (through its own committer) on the large store, on the
same users after one night, on fewer users with as many days, and on an empty store.
    .venv/bin/python benchmarks/bench_history_scale.py [--quick] [--only sqlite|postgresql] [--size 300000x30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bench_history
import bench_serve
from bench_history import DAY0, PG_URL

from crawler.api.records import Profile
from crawler.history import ready
from crawler.history.store import HistoryStore
from crawler.runs.ingest_calls import StoreCalls
from crawler.runs.ingest_commit import Commit, IngestCommitter
from crawler.runs.ingest_files import PROFILES, DayFiles
from crawler.runs.ingest_report import Tally

SIZES = ((300_000, 30), (10_000, 1_095))
QUICK = ((3_000, 30), (100, 1_095))
PAGES = {"overview": "/", "sorted gain1": "/?sort=-gain1", "sorted gain7": "/?sort=-gain7",
         "sorted gain30": "/?sort=-gain30", "page 100": "/?page=100"}
COMMITS, PER_COMMIT = 30, 100  # ingest commit cost: 30 commits of 100 profiles each (checkpoints included)...
SINGLES, ROUNDS = 400, 5  # ...and 400 of one profile; the stores measured by turns, in 5 rounds


def _median(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median of ``repeat`` warm calls (one call first warms the caches): bench_history's timer."""
    fn()
    return bench_history._timed(fn, repeat)


@contextmanager
def pg_schema() -> Iterator[str]:
    """A private schema on the local server, dropped after; yields its URL."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def store_url(backend: str) -> Iterator[str]:
    if backend == "postgresql":
        with pg_schema() as url:
            yield url
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yield str(Path(tmp) / "history.db")


async def _pages(url: str, user: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with bench_serve.served(url) as get:
        for name, path in (*PAGES.items(), ("user page", f"/u/{user}")):
            await get(path)  # warm
            out[name] = statistics.median([(await get(path))[0] for _ in range(5)])
    return out


def sizes(store: HistoryStore, rows: int) -> dict[str, float]:
    """Bytes per snapshot: the table, its indexes, both."""
    if store.postgres:
        table, total = store._rows("SELECT pg_relation_size('snapshots'), pg_total_relation_size('snapshots')")[0]
        table, total = int(table), int(total)
    else:
        found = dict(store._rows("SELECT d.name, SUM(d.pgsize) FROM dbstat d JOIN sqlite_schema s ON s.name = d.name"
                                 " WHERE s.tbl_name = 'snapshots' GROUP BY d.name"))
        table, total = int(found["snapshots"]), sum(int(v) for v in found.values())
    return {"table_b": table / rows, "indexes_b": (total - table) / rows, "total_b": total / rows}


def profiles(handles: int, start: int, count: int) -> list[Profile]:
    """One ingest commit's profiles: the ``start``-th to the next ``count`` users of a walk over the whole store in
    a stride (7,919 is prime: every user once before any again)."""
    out = []
    for k in range(count):
        u = ((start + k) * 7919) % handles
        out.append(Profile(user_id=str(6_800_000_000_000_000_000 + u), handle=f"user{u}", nickname=f"User {u}",
                           sec_uid="", verified=False, private=False, followers=1000 + u, following=10, videos=5,
                           hearts=100, likes=0, signature=""))
    return out


async def _commits(url: str, handles: int, day: dt.date, size: int, count: int, skip: int) -> list[float]:
    """Seconds of ``count`` commits of ``size`` profiles each through ingest's own committer (`IngestCommitter`):
    the rows appended to the day file and fsynced, then one store transaction (the rename check, the snapshot
    and the kept-ready data, the failure cleared, the file's length, the run's spend). The users walked start
    after the first ``skip`` (those an earlier call committed)."""
    calls = StoreCalls(url, stall_limit=300.0)
    store = await calls.open(connect_timeout=5.0)
    started = dt.datetime.now(dt.UTC)
    try:
        with tempfile.TemporaryDirectory() as out:
            files = calls.files = DayFiles(Path(out), store, uuid.uuid4().hex, raw=False, bom=False)
            committer = IngestCommitter(calls, files, Tally(), spend=lambda: (0, 0), put_run_day=lambda sent, billed:
                                        store.put_run_day("bench", day, by_date=False, started_at=started,
                                                          requests_sent=sent, credits_billed=billed,
                                                          watch_users=handles))
            fetched = dt.datetime(day.year, day.month, day.day, 2, tzinfo=dt.UTC)
            times = []
            for i in range(count):
                start = skip + i * size
                when = day + dt.timedelta(days=start // handles)  # a small store's users again: the next night
                group = [Commit(when, p.handle, PROFILES, profile=p, fetched_at=fetched)
                         for p in profiles(handles, start, size)]
                start = time.perf_counter()
                await committer.commit(group)
                times.append(time.perf_counter() - start)
    finally:
        await calls.close(opened=True)
    return times


def commit_costs(stores: dict[str, tuple[str, int, dt.date]]) -> dict[str, float]:
    """Ingest's commits on each store (name: its URL, users and the day written): COMMITS commits of PER_COMMIT
    profiles (a burst; the mean carries the WAL checkpoints some commits make) and SINGLES commits of one profile
    (at the key's 200 requests a minute, a profile every 0.3 s, each commit holds one). The stores take turns in
    ROUNDS, so a busy neighbour on the shared cores weighs on all of them alike. Mean and median of each."""
    times: dict[str, list[float]] = {}
    bursts, singles = COMMITS // ROUNDS, SINGLES // ROUNDS
    for r in range(ROUNDS):
        for name, (url, handles, day) in stores.items():
            for kind, size, count, skip in (("", PER_COMMIT, bursts, r * bursts * PER_COMMIT),
                                            ("one_", 1, singles, COMMITS * PER_COMMIT + r * singles)):
                got = asyncio.run(_commits(url, handles, day, size, count, skip))
                times.setdefault(f"commit_{name}_{kind}", []).extend(got)
    return {f"{k}{stat}_s": fn(v) for k, v in times.items()
            for stat, fn in (("mean", statistics.mean), ("median", statistics.median))}


def load_store(url: str, handles: int, days: int) -> None:
    """A store of ``handles`` users x ``days`` days, its kept data rebuilt."""
    store = HistoryStore(url)
    try:
        store.bulk_users(bench_history.users(handles, days))
        store.bulk_snapshots(bench_history.rows(handles, days))
        ready.rebuild_store(store)
    finally:
        store.close()


def midnight(url: str, handles: int) -> dict[str, float]:
    """The pages and `top` again, once the commits put a few thousand users on a new day (the rest are the day
    before's stragglers, as while a night's ingest runs)."""
    r = {f"{k} mid-night": v for k, v in asyncio.run(_pages(url, f"user{handles // 2}")).items()}
    store = HistoryStore(url)
    try:
        for n in (7, 30):
            r[f"top {n} mid-night"] = _median(lambda n=n: store.top("followers-gained", days=n, limit=50))  # type: ignore
    finally:
        store.close()
    return r


def baseline_query(store: HistoryStore, handles: int, days: int) -> dict[str, float]:
    """Plain indexed reads of the same snapshots: 50 of the last day (day index), one user's days (primary key)."""
    last = (DAY0 + dt.timedelta(days=days - 1)).isoformat()
    uid = str(6_800_000_000_000_000_000 + handles // 2)
    return {
        "plain page": _median(lambda: store._rows(
            "SELECT user_id, handle, followers FROM snapshots WHERE day = ? ORDER BY user_id LIMIT 50 OFFSET 4950",
            (last,))),
        "plain user": _median(lambda: store._rows(
            "SELECT day, followers FROM snapshots WHERE user_id = ? ORDER BY day", (uid,))),
    }


def run(backend: str, handles: int, days: int) -> dict[str, float]:
    """Load one store, measure it; the figures (seconds, bytes)."""
    total = handles * days
    with store_url(backend) as url:
        bare = bench_history.baseline(url, handles, days)
        if backend == "sqlite":
            os.remove(url + ".bare")
        store = HistoryStore(url)
        try:
            if store.postgres:
                store._exec("DROP TABLE bare")
            start = time.perf_counter()
            store.bulk_users(bench_history.users(handles, days))
            store.bulk_snapshots(bench_history.rows(handles, days))
            load = time.perf_counter() - start
            start = time.perf_counter()
            ready.rebuild_store(store)
            rebuild = time.perf_counter() - start
            if store.postgres:
                store._exec("ANALYZE")  # what autovacuum does after a load
            r: dict[str, float] = {"load_s": load, "bare_s": bare, "rebuild_s": rebuild, **sizes(store, total)}
            r |= baseline_query(store, handles, days)
            for n in (7, 30):
                r[f"top {n}"] = _median(lambda n=n: store.top("followers-gained", days=n, limit=50))  # type: ignore
        finally:
            store.close()
        r |= asyncio.run(_pages(url, f"user{handles // 2}"))
        after, few = DAY0 + dt.timedelta(days=days), min(handles, max(PER_COMMIT, 100_000 // days))
        # Beside the large store: an empty one; the same users after their first night (what grows with the
        # history's days, not with the watch list); as many days for fewer users (what grows with the users).
        with store_url(backend) as empty, store_url(backend) as first, store_url(backend) as small:
            load_store(first, handles, 1)
            load_store(small, few, days)
            r |= commit_costs({"large": (url, handles, after), "empty": (empty, handles, after),
                               "first": (first, handles, DAY0 + dt.timedelta(days=1)), "small": (small, few, after)})
        r["small_users"] = few
        r |= midnight(url, handles)
    print(line(backend, handles, days, r), flush=True)
    return r


def line(backend: str, handles: int, days: int, r: dict[str, float]) -> str:
    """The printed figures of one store."""
    total = handles * days
    ms = {k: v * 1000 for k, v in r.items() if not k.endswith(("_b", "_s", "_users"))}
    reads = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if not k.startswith("plain"))
    out = (f"{backend:<10} {handles:,} users x {days:,} days ({total:,} snapshots): load {r['load_s']:.0f} s"
           f" (bare insert {r['bare_s']:.0f} s, {r['load_s'] / r['bare_s']:.2f}x), rebuild {r['rebuild_s']:.0f} s\n"
           f"{'':<11}median of 5 warm, ms: {reads} (goal < 1000, user page < 100) | baseline plain indexed"
           f" query: 50 snapshots of a day {ms['plain page']:.1f}, one user's days {ms['plain user']:.1f}\n"
           f"{'':<11}bytes per snapshot: {r['total_b']:.0f} (table {r['table_b']:.0f}, indexes {r['indexes_b']:.0f})"
           f"; 300k users x 3 years: {r['total_b'] * 300_000 * 1_095 / 1e9:.0f} GB")

    def commit(name: str, one: str = "") -> str:
        return f"{r[f'commit_{name}_{one}median_s'] * 1000:.1f} / {r[f'commit_{name}_{one}mean_s'] * 1000:.1f} ms"

    for one, what in (("", f"{COMMITS} commits of {PER_COMMIT} profiles"), ("one_", f"{SINGLES} commits of 1 profile")):
        first, large, empty = (r[f"commit_{n}_{one}mean_s"] for n in ("first", "large", "empty"))
        out += (f"\n{'':<11}ingest, {what} (median / mean): this store {commit('large', one)}; the same users after"
                f" one night {commit('first', one)} ({large / first:.2f}x, goal < 1.5x); an empty store"
                f" {commit('empty', one)} ({large / empty:.2f}x); {r['small_users']:,.0f} users x the same days"
                f" {commit('small', one)}")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help=f"{QUICK[0][0]:,} x {QUICK[0][1]} and {QUICK[1][0]} x"
                   f" {QUICK[1][1]:,}")
    p.add_argument("--only", choices=("sqlite", "postgresql"), action="append")
    p.add_argument("--size", action="append", help="USERSxDAYS (repeatable; default both full sizes)")
    args = p.parse_args(argv)
    chosen = [tuple(int(v) for v in s.split("x")) for s in args.size] if args.size else QUICK if args.quick else SIZES
    results: dict[str, dict[str, float]] = {}
    for backend in args.only or ("sqlite", "postgresql"):
        for handles, days in chosen:
            results[f"{backend} {handles}x{days}"] = run(backend, handles, days)
    return results


if __name__ == "__main__":
    main()
