"""Issue 5 figure: bulk-load a year of daily snapshots for 10k handles (3.65M rows), then answer growth and top.

Run on SQLite and on PostgreSQL (CRAWLER_TEST_PG_URL, default the local server), each beside a baseline
measured in the same run: a bare executemany/COPY of the same rows into an unindexed table.
    .venv/bin/python benchmarks/bench_history.py [--handles 10000] [--days 365] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crawler.history import ready
from crawler.history.db import SNAPSHOT_COLUMNS
from crawler.history.store import HistoryStore

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY0 = dt.date(2025, 1, 1)


def rows(handles: int, days: int) -> Iterator[tuple[Any, ...]]:
    """Deterministic snapshots: day-major, as a daily job would write them."""
    for d in range(days):
        day = (DAY0 + dt.timedelta(days=d)).isoformat()
        fetched = f"{day}T02:15:00+00:00"
        for u in range(handles):
            base = (u * 7919) % 100_000 + 100
            followers = base + d * (u % 13) + (d * u) % 7
            yield (str(6_800_000_000_000_000_000 + u), day, fetched, f"user{u}", followers, 100 + u % 50,
                   followers * 20, 10 + d // 7, 5, u % 97 == 0, u % 31 == 0)


def users(handles: int, days: int) -> list[tuple[str, str, str, str]]:
    last = (DAY0 + dt.timedelta(days=days - 1)).isoformat()
    return [(str(6_800_000_000_000_000_000 + u), f"user{u}", DAY0.isoformat(), last) for u in range(handles)]


def _timed(fn: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def baseline(url: str, handles: int, days: int) -> float:
    """Seconds for a bare bulk insert of the same rows into an unindexed table (the same database)."""
    cols = ", ".join(f"{c} TEXT" for c in SNAPSHOT_COLUMNS)
    start = time.perf_counter()
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE bare ({cols})")
            with conn.cursor() as cur, cur.copy(f"COPY bare ({', '.join(SNAPSHOT_COLUMNS)}) FROM STDIN") as copy:
                for row in rows(handles, days):
                    copy.write_row(row)
    else:
        import sqlite3

        db = sqlite3.connect(url + ".bare", isolation_level=None)
        db.execute(f"CREATE TABLE bare ({cols})")
        db.execute("BEGIN")
        db.executemany(f"INSERT INTO bare VALUES ({', '.join('?' * len(SNAPSHOT_COLUMNS))})", rows(handles, days))
        db.execute("COMMIT")
        db.close()
    return time.perf_counter() - start


def run(url: str, label: str, handles: int, days: int) -> dict[str, float]:
    """Load, then query; returns the figures."""
    base = baseline(url, handles, days)
    store = HistoryStore(url)
    try:
        start = time.perf_counter()
        store.bulk_users(users(handles, days))
        n = store.bulk_snapshots(rows(handles, days))
        load = time.perf_counter() - start
        assert store.count() == handles * days == n or n == -1
        start = time.perf_counter()
        ready.rebuild_store(store)  # the bulk path leaves the maintained per-user data to this
        rebuild = time.perf_counter() - start
        growth = _timed(lambda: store.growth(f"user{handles // 2}"))
        growth_month = _timed(lambda: store.growth(f"user{handles // 3}", since=DAY0 + dt.timedelta(days=days - 30)))
        top = _timed(lambda: store.top("followers-gained", days=7, limit=20), repeat=3)
        top_month = _timed(lambda: store.top("followers-gained", days=30, limit=20), repeat=3)
        as_of = _timed(lambda: store.as_of(DAY0 + dt.timedelta(days=days // 2)), repeat=1)
    finally:
        store.close()
    import bench_serve

    serve = bench_serve.measure(url, handles)  # issue 13: the web page over the same store
    print(bench_serve.line(label, serve), flush=True)
    total = handles * days
    print(f"{label:<10} load {total:,} rows: {load:7.1f} s ({total / load:,.0f} rows/s; bare insert {base:.1f} s,"
          f" ratio {load / base:.2f}x; rebuild {rebuild:.1f} s) | growth {growth * 1000:.1f} ms"
          f" (30 days {growth_month * 1000:.1f} ms)"
          f" | top 7d {top * 1000:.0f} ms, top 30d {top_month * 1000:.0f} ms | as-of {as_of:.2f} s")
    return {"load_s": load, "baseline_s": base, "rebuild_s": rebuild, "growth_ms": growth * 1000,
            "top7_ms": top * 1000, "top30_ms": top_month * 1000, "as_of_s": as_of,
            **{f"serve_{k}": v for k, v in serve.items()}}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Both backends."""
    p = argparse.ArgumentParser()
    p.add_argument("--handles", type=int, default=10_000)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--quick", action="store_true", help="1,000 handles x 60 days")
    args = p.parse_args(argv)
    handles, days = (1_000, 60) if args.quick else (args.handles, args.days)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run(str(Path(tmp) / "history.db"), "sqlite", handles, days)
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in PG_URL else "?"
        results["postgresql"] = run(f"{PG_URL}{sep}options=-csearch_path%3D{schema}", "postgresql", handles, days)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return results


if __name__ == "__main__":
    main()
