"""Issue 13 figures: `crawler history serve` over the history benchmark's store (10k users x 365 days).

The overview's first page: median of 5 warm requests (goal under 1 s), beside the same run's baseline
`history top --days 7 --limit 50` (one query, no page); the size of every kind of page (goal under 2 MB).
Called by bench_history.py on the store it loaded (SQLite and PostgreSQL); alone:
    .venv/bin/python benchmarks/bench_serve.py [--handles 10000] [--days 365]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from crawler.history import ready
from crawler.history.serve import make_app
from crawler.history.store import HistoryStore

GOAL_S, GOAL_BYTES = 1.0, 2 * 1024 * 1024


Get = Callable[[str], Awaitable[tuple[float, int]]]


@contextlib.asynccontextmanager
async def served(url: str) -> AsyncIterator[Get]:
    """`history serve` of the store at ``url`` on loopback; yields ``get(path)``: (seconds, body bytes) of one
    request, which must answer 200."""
    runner = web.AppRunner(make_app(url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            async def get(path: str) -> tuple[float, int]:
                start = time.perf_counter()
                async with s.get(base + path) as r:
                    body = await r.read()
                    assert r.status == 200, (path, r.status)
                return time.perf_counter() - start, len(body)

            yield get
    finally:
        await runner.cleanup()


async def _measure(url: str, handles: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with served(url) as get:
        cold, _ = await get("/")
        warm = [(await get("/"))[0] for _ in range(5)]
        out["overview_cold_s"], out["overview_warm_s"] = cold, statistics.median(warm)
        out["overview_sorted_s"] = statistics.median([(await get("/?sort=-followers&page=7"))[0]
                                                      for _ in range(3)])
        out["user_s"] = statistics.median([(await get(f"/u/user{handles // 2}"))[0] for _ in range(3)])
        sizes = {}
        for name, path in (("overview", "/"), ("overview, filtered", "/?q=user12"),
                           ("overview, last page", f"/?sort=handle&page={handles // 50}"),
                           ("user (all days)", f"/u/user{handles // 2}"),
                           ("user CSV", f"/u/user{handles // 2}.csv"),
                           ("compare x10", "/compare?" + "&".join(f"u=user{k}" for k in range(10)))):
            sizes[name] = (await get(path))[1]
        out["largest_bytes"] = max(sizes.values())
        out.update({f"bytes:{k}": float(v) for k, v in sizes.items()})
    return out


def measure(url: str, handles: int) -> dict[str, float]:
    """Serve the store at ``url`` on loopback and time/size its pages; also time the CLI's top query."""
    store = HistoryStore.open_readonly(url)
    try:
        top = []
        for _ in range(5):
            start = time.perf_counter()
            store.top("followers-gained", days=7, limit=50)
            top.append(time.perf_counter() - start)
    finally:
        store.close()
    figures = asyncio.run(_measure(url, handles))
    figures["top7_s"] = statistics.median(top)
    return figures


def line(label: str, r: dict[str, float]) -> str:
    """One printed line of figures."""
    biggest = max((k for k in r if k.startswith("bytes:")), key=lambda k: r[k])
    return (f"{label:<10} serve: overview first page {r['overview_warm_s'] * 1000:.0f} ms median of 5 warm"
            f" (cold {r['overview_cold_s'] * 1000:.0f} ms; goal < {GOAL_S * 1000:.0f} ms; baseline top --days 7"
            f" {r['top7_s'] * 1000:.0f} ms), sorted page 7 {r['overview_sorted_s'] * 1000:.0f} ms, user page"
            f" {r['user_s'] * 1000:.0f} ms | largest page {biggest[6:]} {r[biggest] / 1024:.0f} KiB"
            f" (goal < {GOAL_BYTES // 1024 // 1024} MiB)")


def main(argv: list[str] | None = None) -> None:
    """Build a SQLite store like bench_history's and measure it (PostgreSQL: run bench_history.py)."""
    import bench_history

    p = argparse.ArgumentParser()
    p.add_argument("--handles", type=int, default=10_000)
    p.add_argument("--days", type=int, default=365)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "history.db")
        store = HistoryStore(url)
        try:
            store.bulk_users(bench_history.users(args.handles, args.days))
            store.bulk_snapshots(bench_history.rows(args.handles, args.days))
            ready.rebuild_store(store)
        finally:
            store.close()
        r = measure(url, args.handles)
        print(line("sqlite", r))
        for k, v in r.items():
            if k.startswith("bytes:"):
                print(f"  {k[6:]}: {v / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
