"""Ingest's worker pool: a feeder puts work on a bounded queue, workers (a fixed number, or "auto" grown to the
rate) take it. Plumbing only, kept apart so the engine's pool (`crawler/engine/pool.py`) can take its place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from crawler.errors import CrawlerError, RunStopped

T = TypeVar("T")


class WorkerPool(Generic[T]):
    """One run's feeder and workers. ``handle`` works one item; ``stopped`` is the run's stop (None: going on);
    ``request_stop`` stops the run (a worker's `RunStopped`); ``auto`` sizes an "auto" pool from the workers it has
    (None: a fixed pool)."""

    def __init__(self, *, handle: Callable[[T], Awaitable[None]], stopped: Callable[[], CrawlerError | None],
                 request_stop: Callable[[CrawlerError], None], auto: Callable[[int], int] | None,
                 capacity: int) -> None:
        self._handle = handle
        self._stopped = stopped
        self._request_stop = request_stop
        self._auto = auto
        self._work: asyncio.Queue[T] = asyncio.Queue(maxsize=capacity)
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[Any]] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.workers = 0  # workers started; an "auto" pool grows them (`_grow`)

    async def run(self, items: AsyncGenerator[T, None], workers: int) -> None:
        """Feed ``items`` to ``workers`` workers until every item is done or the run stops."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._feeder = tg.create_task(self._feed(items))
                self._tasks.append(self._feeder)
                self._tg = tg
                self._spawn(workers)
                stop = self._stopped()
                if stop is not None:  # a signal handled before these tasks existed (the ledger's
                    self._request_stop(stop)  # open awaits): without this the feeder waits forever
        finally:
            self._tg = None

    def cancel(self, *, soft: bool) -> None:
        """Stop the pool: ``soft`` lets busy workers finish the item in hand (only the feeder and idle workers are
        cancelled), else every task is."""
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current and (not soft or task is self._feeder or task in self._idle):
                task.cancel()

    async def _feed(self, items: AsyncGenerator[T, None]) -> None:
        """Queue the items, then let the workers go once every one is done."""
        async with aclosing(items) as feed:
            async for item in feed:
                await self._work.put(item)
        await self._work.join()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while self._stopped() is None:
            self._idle.add(me)
            try:
                item = await self._work.get()
            finally:
                self._idle.discard(me)
            try:
                await self._handle(item)
                self._grow()
            except RunStopped as exc:
                self._request_stop(exc)
                return
            finally:
                self._work.task_done()

    def _spawn(self, target: int) -> None:
        """Start workers until `target` run (none once stopping)."""
        while self._tg is not None and self._stopped() is None and self.workers < target:
            self.workers += 1
            self._tasks.append(self._tg.create_task(self._worker()))

    def _grow(self) -> None:
        """parallelism = "auto": workers enough to keep the rate busy at the latency seen so far."""
        if self._auto is not None:
            self._spawn(self._auto(self.workers))
