"""The engine every kind of run shares: a feeder, a pool of workers (fixed or "auto"), the stop policy, the tally.

A run wires its ports: an item source (what to work on, in order), a handler (one item: its walk, its transfer),
a committer (the writer that commits what handlers submit; optional), a credit lease (sized to the pool) and a
progress reporter. The engine feeds items to workers through a bounded queue, grows an "auto" pool by the one rule
(`pacing.auto_workers`), and stops by `StopPolicy`: a first signal or a spent budget drains the requests under way
(their answers are paid for), a second signal or any other stop ends the items under way at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from crawler.api.client import Client
from crawler.engine.lease import CreditLease, lease_size
from crawler.engine.stop import GracefulStop, stop_sending
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    QuotaSpent,
    RunStopped,
    ShapeChanged,
    rank,
)
from crawler.options import EngineOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS, auto_workers

T = TypeVar("T")  # the item type of a run
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)


class ItemSource(Protocol[T_co]):
    """What a run works on, in order (local: the state store's pending items; PostgreSQL: the job's queue, which also
    holds each item until the engine releases it, `HeldItems`)."""

    def items(self) -> AsyncIterator[T_co]:
        """The items to hand to workers; the engine stops reading it on a stop."""
        ...


@runtime_checkable
class HeldItems(Protocol[T_contra]):
    """An item source that holds each item it gave until the engine releases it (PostgreSQL: pgqueuer's callback
    waits, heartbeating the queue job, until its item ends). Optional: the engine looks for it on its source."""

    def release(self, item: T_contra) -> None:
        """The item ended, however it ended (done, failed, stopped, never handed to a worker)."""
        ...

    def resize(self, workers: int) -> None:
        """"auto": the pool has grown to `workers`; take as many items at a time."""
        ...


Handler = Callable[[T], Awaitable[None]]  # one item, to its end (an ItemFailed is the handler's to record)


class Committer(Protocol):
    """The run's writer: commits what the handlers submit, in groups, until its input is closed."""

    async def run(self) -> None:
        """Commit until the input is closed (`close`) and everything queued is committed."""
        ...

    def close(self) -> None:
        """Nothing more will be submitted."""
        ...


class Reporter(Protocol):
    """The progress line, for as long as the workers run."""

    async def run(self) -> None:
        """Report until cancelled."""
        ...


# Answers after which no later request can succeed: the run stops sending and keeps the answers under way.
DRAINING: tuple[type[RunStopped], ...] = (BalanceExhausted, QuotaSpent, ShapeChanged)


class StopPolicy(GracefulStop):
    """How a run stops; the one place a run's stop is recorded and signals are turned into stops.

    `request_stop(error)` keeps the worst error (`errors.rank`: it decides the exit) and tells the engine whether
    to stop softly: a spent --max-credits budget, a first signal (`signalled`, which also makes the client refuse
    any further request and cancels the calls with nothing under way), or an answer that says no later request can
    succeed (an empty balance, a spent daily quota, answers of a changed shape: `DRAINING`, which refuses the same
    way) lets the requests under way be answered and committed: they are paid for, and the credits billed stay
    exact. Any other stop, or a second signal, is hard: the items under way end at once.
    """

    def __init__(self, *, quiet: bool = True) -> None:
        self.error: CrawlerError | None = None
        self.quiet = quiet
        self._listeners: list[Callable[[bool], None]] = []

    def attach(self, client: Client) -> None:
        """From now on a first signal drains the requests under way on `client`."""
        self.client = client

    @property
    def draining(self) -> bool:
        """A first signal came: the requests under way are being answered and committed."""
        return self._draining

    def listen(self, on_stop: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``on_stop(soft)`` on every stop; returns the function that stops listening."""
        self._listeners.append(on_stop)
        return lambda: self._listeners.remove(on_stop)

    def request_stop(self, error: CrawlerError) -> None:
        """End the run: the worst error decides the exit; the listeners stop their work (softly or at once)."""
        if self.error is None or rank(error) < rank(self.error):
            self.error = error
        soft = isinstance(error, BudgetExhausted) or (isinstance(error, Interrupted) and self._draining)
        if isinstance(error, DRAINING) and hasattr(self, "client"):
            soft = True
            if self.client.hook.refusal is None:  # the first such answer: nothing more is sent
                waiting, _ = stop_sending(self.client, error)
                for task in waiting:
                    task.cancel()
        for on_stop in list(self._listeners):
            on_stop(soft)


@dataclass(slots=True)
class Tally:
    """What the engine counts of one run: items ended, workers started, when it began and ended (its clock)."""

    items: int = 0
    workers: int = 0
    started: float = 0.0
    ended: float = 0.0
    error: CrawlerError | None = None

    @property
    def elapsed(self) -> float:
        """Seconds the workers ran."""
        return max(self.ended - self.started, 0.0)


@dataclass(slots=True)
class _Pool:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    idle: set[asyncio.Task[Any]] = field(default_factory=set)  # workers waiting for an item
    feeder: asyncio.Task[None] | None = None
    tg: asyncio.TaskGroup | None = None


class Engine(Generic[T]):
    """One run's pool of workers over its ports. Build it, then ``tally = await engine.run()`` (once)."""

    def __init__(self, *, source: ItemSource[T], handler: Handler[T], stop: StopPolicy, options: EngineOptions,
                 client: Client | None = None, committer: Committer | None = None, budget: CreditLease | None = None,
                 reporter: Reporter | None = None, drain_items: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._held = source if isinstance(source, HeldItems) else None
        self._handler = handler
        self.stop = stop
        self._options = options
        self._client = client
        self._committer = committer
        self._budget = budget
        self._reporter = reporter
        # A soft stop lets the items under way finish their step (a crawl commits its page) or, False, only the
        # requests on the wire (a download: media transfers are free and continue with Range next run).
        self._drain_items = drain_items
        self._clock = clock
        self._target = options.workers or options.start
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=2 * max(MAX_AUTO_WORKERS, self._target))
        self._pool = _Pool()
        self.tally = Tally()

    async def run(self) -> Tally:
        """Work every item of the source, or until a stop; the committer has committed all it was given."""
        self.tally.started = self.tally.ended = self._clock()
        await asyncio.sleep(0)
        if self.stop.error is not None:  # a stop that came while the run was being set up: start nothing
            return self._end()
        unlisten = self.stop.listen(self._on_stop)
        try:
            await self._run()
        finally:
            unlisten()
        return self._end()

    async def _run(self) -> None:
        committer, reporter = self._committer, self._reporter
        async with asyncio.TaskGroup() as outer:
            writer = outer.create_task(committer.run()) if committer is not None else None
            progress = outer.create_task(reporter.run()) if reporter is not None else None
            try:
                async with asyncio.TaskGroup() as tg:
                    self._pool.tg = tg
                    self._pool.feeder = tg.create_task(self._feed())
                    self._pool.tasks.append(self._pool.feeder)
                    for _ in range(self._target):
                        self._spawn()
            finally:
                self._pool.tg = None
                while not self._queue.empty():  # fed but never worked (a stop)
                    self._release(self._queue.get_nowait())
                if progress is not None:
                    progress.cancel()
                if committer is not None and writer is not None and not writer.done():
                    committer.close()

    def _end(self) -> Tally:
        self.tally.ended = self._clock()
        self.tally.error = self.stop.error
        return self.tally

    def _on_stop(self, soft: bool) -> None:
        """Cancel the feeder and idle workers; a hard stop (or a soft one of a run that drains only requests)
        also the workers whose item is under way, except (soft) those whose request is on the wire."""
        current = asyncio.current_task()
        pool = self._pool
        wire = self._client.hook.on_wire if self._client is not None else set()
        for task in pool.tasks:
            if task is current:
                continue
            if soft and task is not pool.feeder and task not in pool.idle and (self._drain_items or task in wire):
                continue
            task.cancel()

    def _spawn(self) -> None:
        pool = self._pool
        if pool.tg is None or self.stop.error is not None:
            return
        self.tally.workers += 1
        if self._budget is not None:
            self._budget.size = lease_size(self.tally.workers)  # a credit per worker drawn at a time
        pool.tasks.append(pool.tg.create_task(self._worker()))

    def _grow(self) -> None:
        """"auto": enough workers to keep the key's rate busy at the latency seen so far."""
        # Stopping: _spawn() starts nobody, so the loop below would never end.
        if self._options.workers is not None or self._client is None or self.stop.error is not None:
            return
        if self._pool.tg is None:
            return
        self._target = auto_workers(self._client.pace, self._client.counters.latency, self._target)
        while self.tally.workers < self._target:
            self._spawn()
        if self._held is not None:
            self._held.resize(self._target)

    def _release(self, item: T) -> None:
        if self._held is not None:
            self._held.release(item)

    async def _feed(self) -> None:
        """Queue the source's items in order, wait until all are worked, then let the workers go."""
        items = self._source.items()
        try:
            async for item in items:
                try:
                    await self._queue.put(item)
                except asyncio.CancelledError:
                    self._release(item)
                    raise
        finally:
            if isinstance(items, AsyncGenerator):  # closed now, on a stop too (not whenever it is collected)
                await items.aclose()
        await self._queue.join()
        for task in self._pool.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while self.stop.error is None:
            self._pool.idle.add(me)
            try:
                item = await self._queue.get()
            finally:
                self._pool.idle.discard(me)
            try:
                await self._handler(item)
            except RunStopped as exc:
                self.stop.request_stop(exc)
                return
            finally:
                self._queue.task_done()
                self._release(item)
            self.tally.items += 1
            self._grow()
