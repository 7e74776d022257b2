"""The engine's pool on its own (what ingest's own pool was pinned to before it ran on the engine): every item once,
soft and hard stops, a worker's `RunStopped` stops the run, an "auto" pool grows, the source is closed on a stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest

from crawler.api.client import SendHook
from crawler.engine.pool import Engine, StopPolicy
from crawler.errors import BudgetExhausted, Interrupted, RunStopped
from crawler.options import EngineOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS, Pace


class Numbers:
    """An item source of n numbered items, from an async generator it holds (so only the engine closes it, never the
    garbage collector); remembers whether it was closed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False
        self.feed: AsyncGenerator[int, None] | None = None

    def items(self) -> AsyncGenerator[int, None]:
        self.feed = self._numbers()
        return self.feed

    async def _numbers(self) -> AsyncGenerator[int, None]:
        try:
            for i in range(self.n):
                yield i
        finally:
            self.closed = True


class FakeClient:
    """What an "auto" pool reads of a client: the pace and the measured latency."""

    def __init__(self, latency: float) -> None:
        self.pace = Pace(enabled=False)
        self.counters = type("Counters", (), {"latency": latency})()
        self.hook = SendHook()


def engine_of(source: Numbers, handle: Callable[[int], Awaitable[None]], *, workers: int | None,
              client: FakeClient | None = None) -> Engine[int]:
    return Engine(source=source, handler=handle, stop=StopPolicy(), client=client,  # type: ignore[arg-type]
                  options=EngineOptions(workers=workers, start=workers or 1))


async def test_every_item_is_handled_once_and_the_pool_ends() -> None:
    """Ten items, three workers: each item is handled exactly once and `run` returns when the last is done."""
    seen = []

    async def handle(i: int) -> None:
        await asyncio.sleep(0)
        seen.append(i)

    tally = await asyncio.wait_for(engine_of(Numbers(10), handle, workers=3).run(), 5)
    assert sorted(seen) == list(range(10)) and tally.workers == 3 and tally.items == 10 and tally.error is None


@pytest.mark.parametrize(("soft", "expected"), [(True, [0, 1]), (False, [])])
async def test_a_soft_stop_lets_busy_workers_finish_and_a_hard_one_does_not(soft: bool, expected: list[int]) -> None:
    """A soft stop (a spent budget) cancels the feeder and idle workers but lets the two busy workers finish their
    item; a hard stop (a stop with no signal drained first) cancels them too. The source is closed either way."""
    finished = []
    busy, release = asyncio.Semaphore(0), asyncio.Event()

    async def handle(i: int) -> None:
        busy.release()
        await release.wait()
        finished.append(i)

    source = Numbers(1000)  # more than the queue holds: the feeder waits on it, its source suspended
    engine = engine_of(source, handle, workers=2)
    task = asyncio.create_task(engine.run())
    await busy.acquire()
    await busy.acquire()  # both workers hold an item
    engine.stop.request_stop(BudgetExhausted("the budget is spent") if soft else Interrupted("stopped by SIGTERM", 143))
    release.set()
    tally = await asyncio.wait_for(task, 5)
    assert sorted(finished) == expected and tally.error is engine.stop.error
    assert source.closed  # at the stop, not whenever the generator is collected


async def test_a_worker_that_stops_the_run_ends_the_pool() -> None:
    """A handler raising `RunStopped` (a store given up) stops the run: the pool ends without the other items."""
    seen = []

    async def handle(i: int) -> None:
        seen.append(i)
        if i == 2:
            raise RunStopped("the history store was given up")

    tally = await asyncio.wait_for(engine_of(Numbers(100), handle, workers=1).run(), 5)
    assert isinstance(tally.error, RunStopped) and seen == [0, 1, 2]


async def test_a_stop_before_the_run_starts_nothing() -> None:
    """A stop requested while the run was being set up (a signal during an await before the pool): no item, no
    worker, and `run` returns at once (it used to leave a feeder waiting for workers that had already returned)."""
    seen = []

    async def handle(i: int) -> None:
        seen.append(i)

    engine = engine_of(Numbers(10), handle, workers=2)
    engine.stop.request_stop(Interrupted("stopped by SIGTERM", 143))
    tally = await asyncio.wait_for(engine.run(), 5)
    assert seen == [] and tally.workers == 0 and isinstance(tally.error, Interrupted)


async def test_an_auto_pool_grows_after_each_item() -> None:
    """parallelism = "auto": after an item, the pool starts workers up to what `auto_workers` asks for (with no
    rate limit and a latency measured, as many as it may: MAX_AUTO_WORKERS)."""

    async def handle(i: int) -> None:
        await asyncio.sleep(0)

    engine = engine_of(Numbers(10), handle, workers=None, client=FakeClient(latency=0.5))
    tally = await asyncio.wait_for(engine.run(), 5)
    assert tally.workers == MAX_AUTO_WORKERS and tally.items == 10
