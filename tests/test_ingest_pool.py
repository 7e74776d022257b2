"""Ingest's worker pool on its own (the plumbing the engine's pool will replace): every item once, soft and hard
stops, a worker's `RunStopped` stops the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest

from crawler.errors import BudgetExhausted, CrawlerError, Interrupted, RunStopped
from crawler.runs.ingest_pool import WorkerPool


async def numbers(n: int) -> AsyncGenerator[int, None]:
    for i in range(n):
        yield i


class Run:
    """A run's stop, as `Ingest` keeps it: the first error wins; stopping cancels the pool."""

    def __init__(self) -> None:
        self.stop: CrawlerError | None = None
        self.pool: WorkerPool[int]

    def request_stop(self, error: CrawlerError, *, soft: bool = False) -> None:
        self.stop = self.stop or error
        self.pool.cancel(soft=soft)


def pool_of(run: Run, handle: Callable[[int], Awaitable[None]], *,
            auto: Callable[[int], int] | None = None) -> WorkerPool[int]:
    run.pool = WorkerPool(handle=handle, stopped=lambda: run.stop, request_stop=run.request_stop, auto=auto,
                          capacity=4)
    return run.pool


async def test_every_item_is_handled_once_and_the_pool_ends() -> None:
    """Ten items, three workers: each item is handled exactly once and `run` returns when the last is done."""
    run, seen = Run(), []

    async def handle(i: int) -> None:
        await asyncio.sleep(0)
        seen.append(i)

    pool = pool_of(run, handle)
    await asyncio.wait_for(pool.run(numbers(10), 3), 5)
    assert sorted(seen) == list(range(10)) and pool.workers == 3


@pytest.mark.parametrize(("soft", "expected"), [(True, [0, 1]), (False, [])])
async def test_a_soft_stop_lets_busy_workers_finish_and_a_hard_one_does_not(soft: bool, expected: list[int]) -> None:
    """A soft stop (a spent budget) cancels the feeder and idle workers but lets the two busy workers finish their
    item; a hard stop cancels them too."""
    run, finished = Run(), []
    busy, release = asyncio.Semaphore(0), asyncio.Event()

    async def handle(i: int) -> None:
        busy.release()
        await release.wait()
        finished.append(i)

    pool = pool_of(run, handle)
    task = asyncio.create_task(pool.run(numbers(10), 2))
    await busy.acquire()
    await busy.acquire()  # both workers hold an item
    run.stop = BudgetExhausted("the budget is spent") if soft else Interrupted("stopped by SIGTERM", 143)
    pool.cancel(soft=soft)
    release.set()
    await asyncio.wait_for(task, 5)
    assert sorted(finished) == expected


async def test_a_worker_that_stops_the_run_ends_the_pool() -> None:
    """A handler raising `RunStopped` (a store given up) stops the run: the pool ends without the other items."""
    run, seen = Run(), []

    async def handle(i: int) -> None:
        seen.append(i)
        if i == 2:
            raise RunStopped("the history store was given up")

    pool = pool_of(run, handle)
    await asyncio.wait_for(pool.run(numbers(100), 1), 5)
    assert isinstance(run.stop, RunStopped) and seen == [0, 1, 2]


async def test_an_auto_pool_grows_after_each_item() -> None:
    """parallelism = "auto": after an item, the pool starts workers up to what ``auto`` asks for."""
    run = Run()

    async def handle(i: int) -> None:
        await asyncio.sleep(0)

    pool = pool_of(run, handle, auto=lambda workers: 4)
    await asyncio.wait_for(pool.run(numbers(10), 1), 5)
    assert pool.workers == 4
