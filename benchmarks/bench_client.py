"""Issue 2: the client beside a plain aiohttp loop, in the same run, against the simulator in its own process.

1. Throughput with the limiter off (zero latency, 429s off): requests/s and CPU seconds per 1,000 requests
   of this process (time.process_time) for `/user-posts/` pages at concurrency 32; medians of interleaved
   repetitions and the per-repetition ratio client/plain.
2. Budget: a scaled rolling window (200 per 10 s, latency 150-600 ms), many concurrent callers for a few
   windows; arrivals counted on the server (GET /__sim/stats sampled every 20 ms): fraction of the budget
   served after the first window, 429s, most requests the simulator saw in any window.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from itertools import cycle, islice
from typing import Any

import aiohttp
from _common import FAST, KEY, Arrivals, Figure, Sim, main_for, show, spread
from aiolimiter import AsyncLimiter

from crawler.api.client import Client
from crawler.config import Settings
from crawler.errors import CrawlerError
from crawler.rate.pacing import Pace, RateGate

NAME = "client"
CONCURRENCY = 32
CALLERS = 64  # budget run: many more callers than the rate needs
MAX_CALLS_PER_CALLER = 100_000  # bounded loops


def request_mix(n: int, users: int = 10_000) -> dict[str, list[dict[str, str]]]:
    """n calls per endpoint: `/user-posts/` first pages (count 30, ~15 KB) and `/userid/` (~30 B answers),
    cycling over public users that have posts."""
    from crawler.sim.data import World, WorldConfig

    world = World(WorldConfig(users=users))
    found: list[tuple[str, str]] = []
    for i in range(users):
        u = world.user(i)
        if u is not None and not u.private and u.videos > 0:
            found.append((u.user_id, u.handle))
        if len(found) >= 300:
            break
    return {
        "/user-posts/": [{"userid": uid, "count": "30", "cursor": "0"} for uid, _ in islice(cycle(found), n)],
        "/userid/": [{"username": handle} for _, handle in islice(cycle(found), n)],
    }


def fast_settings(url: str, **changes: Any) -> Settings:
    """The client with the limiter off and no retry waits."""
    return Settings(base_url=url, rate_enabled=False, retry_base_delay=0.0, retry_max_delay=0.0, **changes)


async def _pool(calls: list[dict[str, str]], one: Callable[[dict[str, str]], Awaitable[Any]], workers: int) -> None:
    it = iter(calls)

    async def worker() -> None:
        for params in it:
            await one(params)

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())


async def plain_loop(url: str, path: str, calls: list[dict[str, str]]) -> None:
    """The bare loop: one session, GET, read, json.loads (the client decodes every answer too)."""
    headers = {"X-Api-Key": KEY}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def one(params: dict[str, str]) -> None:
            async with session.get(url + path, params=params, headers=headers) as resp:
                json.loads(await resp.read())

        await _pool(calls, one, CONCURRENCY)


async def client_loop(url: str, path: str, calls: list[dict[str, str]]) -> None:
    """The same calls through crawler.api.client.Client.get (limiter off)."""
    async with Client(fast_settings(url), api_key=KEY) as client:

        async def one(params: dict[str, str]) -> None:
            await client.get(path, params)

        await _pool(calls, one, CONCURRENCY)


def measure(run: Callable[[], Coroutine[Any, Any, None]], n: int) -> tuple[float, float]:
    """(requests per second, CPU seconds of this process per 1,000 requests) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1000


def throughput(quick: bool) -> list[Figure]:
    """Part 1: requests/s and CPU per 1,000 requests, client vs plain loop, limiter off."""
    n, reps = (1000, 1) if quick else (5000, 3)
    mix = request_mix(n)
    figures: list[Figure] = []
    print(f"[client] throughput: {n:,} requests per endpoint at concurrency {CONCURRENCY}, limiter off, "
          f"zero latency, {reps} interleaved repetitions", flush=True)
    with Sim(*FAST) as sim:
        for path, calls in mix.items():
            rates: dict[str, list[float]] = {"plain": [], "client": []}
            cpus: dict[str, list[float]] = {"plain": [], "client": []}
            warm = calls[:200]
            measure(lambda: plain_loop(sim.url, path, warm), len(warm))  # noqa: B023 - called at once
            measure(lambda: client_loop(sim.url, path, warm), len(warm))  # noqa: B023
            for rep in range(reps):
                order = ("plain", "client") if rep % 2 == 0 else ("client", "plain")
                for kind in order:
                    loop = plain_loop if kind == "plain" else client_loop
                    rate, cpu = measure(lambda: loop(sim.url, path, calls), n)  # noqa: B023
                    rates[kind].append(rate)
                    cpus[kind].append(cpu)
                    print(f"  {path} rep {rep + 1} {kind:6s}: {rate:7.0f} req/s, {cpu:.3f} CPU s / 1,000 requests",
                          flush=True)
            rate_ratio = [c / p for c, p in zip(rates["client"], rates["plain"], strict=True)]
            cpu_ratio = [c / p for c, p in zip(cpus["client"], cpus["plain"], strict=True)]
            figures += [
                show(Figure(NAME, f"{path} requests/s, limiter off", spread(rates["client"], "{:.0f}"), "",
                            spread(rates["plain"], "{:.0f}"))),
                show(Figure(NAME, f"{path} requests/s ratio client/plain", spread(rate_ratio, "{:.2f}"))),
                show(Figure(NAME, f"{path} CPU s per 1,000 requests", spread(cpus["client"], "{:.3f}"), "<= 0.25",
                            spread(cpus["plain"], "{:.3f}"))),
                show(Figure(NAME, f"{path} CPU ratio client/plain", spread(cpu_ratio, "{:.2f}"))),
            ]
        stats = sim.stats()
    served = stats["requests"] - stats["served_429"]
    figures.append(show(Figure(NAME, "simulator 429s (throughput runs)", f"{stats['served_429']} of {served:,}", "0")))
    return figures


async def _budget_run(sim: Sim, arrivals: Arrivals, make_call: Callable[[], Any], duration: float) -> int:
    """Many callers for `duration` seconds while the server's counters are sampled; returns client 429s."""
    end = time.monotonic() + duration
    stop = asyncio.Event()
    limited = 0

    async def sampler() -> None:
        while not stop.is_set():
            stats = await asyncio.to_thread(sim.stats)
            arrivals.add(stats, time.monotonic())
            await asyncio.sleep(0.02)

    async def caller(call: Callable[[], Awaitable[bool]]) -> None:
        nonlocal limited
        for _ in range(MAX_CALLS_PER_CALLER):
            if time.monotonic() >= end:
                return
            if not await call():
                limited += 1

    async with make_call() as call, asyncio.TaskGroup() as tg:
        sampling = tg.create_task(sampler())
        async with asyncio.TaskGroup() as callers:
            for _ in range(CALLERS):
                callers.create_task(caller(call))
        await asyncio.sleep(0.3)  # the last answers reach the counters
        stop.set()
        await sampling
    return limited


class _ClientCall:
    def __init__(self, url: str, limit: int, window: float) -> None:
        self.client = Client(Settings(base_url=url, rate_limit=limit, rate_window=window), api_key=KEY)

    async def __aenter__(self) -> Callable[[], Awaitable[bool]]:
        await self.client.__aenter__()

        async def call() -> bool:
            try:
                await self.client.get("/user-posts/", {"userid": "6800000000000000005", "count": "30", "cursor": "0"})
            except CrawlerError:
                return False
            return True

        return call

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()


class _PlainCall:
    """aiohttp + AsyncLimiter(limit, window); a 429 is counted and the caller goes round again."""

    def __init__(self, url: str, limit: int, window: float) -> None:
        self.url, self.limiter = url, AsyncLimiter(limit, window)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Callable[[], Awaitable[bool]]:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        session = self.session

        async def call() -> bool:
            async with self.limiter, session.get(self.url + "/user-posts/", headers={"X-Api-Key": KEY},
                                   params={"userid": "6800000000000000005", "count": "30", "cursor": "0"}) as r:
                await r.read()
                return r.status != 429

        return call

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()


def budget(quick: bool) -> list[Figure]:
    """Part 2: the fraction of a scaled rolling-window budget used, 429s, most in any window."""
    limit, window, windows = (40, 2.0, 2) if quick else (200, 10.0, 4)
    sim_args = ("--rate-limit", str(limit), "--window", str(window), "--latency", "0.15,0.6")
    print(f"[client] budget: {limit} per {window:g} s rolling window, latency 150-600 ms, {CALLERS} callers, "
          f"{windows} windows measured after the first", flush=True)
    result: dict[str, tuple[float, int, int]] = {}
    for kind in ("client", "plain"):
        with Sim(*sim_args) as sim:
            arrivals = Arrivals()
            maker: Callable[[], Any] = (lambda: _ClientCall(sim.url, limit, window)) if kind == "client" else (
                lambda: _PlainCall(sim.url, limit, window))
            asyncio.run(_budget_run(sim, arrivals, maker, window * (windows + 1) + 1.0))
            stats = sim.stats()
        frac = arrivals.fraction_used(limit, window, windows)
        result[kind] = (frac, stats["served_429"], stats["max_in_window"])
        print(f"  {kind:6s}: fraction used {frac:.3f}, 429s {stats['served_429']}, "
              f"max in any window {stats['max_in_window']} (limit {limit})", flush=True)
    c, p = result["client"], result["plain"]
    scale = f" ({limit}/{window:g} s)"
    return [
        show(Figure(NAME, "budget fraction used after 1st window" + scale, f"{c[0]:.3f}", ">= 0.99", f"{p[0]:.3f}")),
        show(Figure(NAME, "429s" + scale, str(c[1]), "0", str(p[1]))),
        show(Figure(NAME, "max requests in any window" + scale, str(c[2]), f"<= {limit}", str(p[2]))),
    ]


def gate_pace(quick: bool) -> list[Figure]:
    """The rate gate alone (no network): starts per window it actually admits vs what it says it paces at."""
    limit, window = 200, 10.0
    n = 40 if quick else 100

    async def starts() -> float:
        gate = RateGate(Pace(limit=limit, window=window))
        first = await gate.acquire()
        for _ in range(n):
            last = await gate.acquire()
        return n / (last - first) * window

    pace = Pace(limit=limit, window=window)
    got = asyncio.run(starts())
    print(f"[client] rate gate alone, {limit} per {window:g} s: {got:.1f} starts per window over {n} starts "
          f"(Pace.effective_rate says {pace.effective_rate:.1f})", flush=True)
    return [show(Figure(NAME, f"rate gate alone: starts per {window:g} s (no network)", f"{got:.1f}",
                        f"{pace.effective_rate:.1f} (its own pace)"))]


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    return throughput(quick) + budget(quick) + gate_pace(quick)


if __name__ == "__main__":
    main_for(run, __doc__)
