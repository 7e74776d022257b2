"""The engine's pool, stop policy and credit lease, on fakes and an injected clock (no network, no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crawler.api.client import Client, Counters, SendHook
from crawler.config import Settings
from crawler.engine.lease import LEASE_MAX, LocalLease, lease_size
from crawler.engine.pool import Engine, StopPolicy
from crawler.errors import BudgetExhausted, Interrupted, KeyRejected
from crawler.options import EngineOptions
from crawler.rate.pacing import Pace, RateGate


class FakeClient:
    """What the engine and the stop policy use of a client: the requests on the wire, the refusal, the pace."""

    def __init__(self, latency: float = 0.0) -> None:
        self.hook = SendHook()  # the real hook: the stop policy reads the requests on the wire and sets the refusal
        self.pace = Pace(limit=600, window=60.0)
        self.counters = Counters(latency=latency)

    @property
    def on_wire(self) -> set[asyncio.Task[Any]]:
        return self.hook.on_wire

    @property
    def refusing(self) -> Interrupted | None:
        return self.hook.refusal


class Items:
    """An item source of n numbered items."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def items(self) -> AsyncIterator[int]:
        for i in range(self.n):
            yield i


class Committer:
    """Commits what the handlers submit, in order, until its input is closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.committed: list[int] = []

    async def run(self) -> None:
        while (item := await self.queue.get()) is not None:
            self.committed.append(item)

    def close(self) -> None:
        self.queue.put_nowait(None)


class Requests:
    """A handler whose items each send one request; the test answers them (`answer`)."""

    def __init__(self, client: FakeClient, committer: Committer) -> None:
        self.client = client
        self.committer = committer
        self.started: list[int] = []
        self.answers: dict[int, asyncio.Future[None]] = {}

    async def __call__(self, item: int) -> None:
        if self.client.refusing is not None:  # what the client does after a first signal: nothing more leaves
            raise Interrupted(str(self.client.refusing), self.client.refusing.code)
        self.started.append(item)
        me = asyncio.current_task()
        assert me is not None
        self.answers[item] = asyncio.get_running_loop().create_future()
        self.client.on_wire.add(me)
        try:
            await self.answers[item]
        finally:
            self.client.on_wire.discard(me)
        await self.committer.queue.put(item)

    def answer(self) -> None:
        for future in self.answers.values():
            if not future.done():
                future.set_result(None)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def build(n: int, workers: int | None = 2, latency: float = 0.0) -> tuple[Engine[int], Requests, Committer, Clock]:
    client, committer, clock = FakeClient(latency), Committer(), Clock()
    handler = Requests(client, committer)
    stop = StopPolicy()
    stop.attach(client)  # type: ignore[arg-type]
    engine = Engine(source=Items(n), handler=handler, stop=stop, options=EngineOptions(workers=workers, start=2),
                    client=client, committer=committer, clock=clock)  # type: ignore[arg-type]
    return engine, handler, committer, clock


async def test_every_item_is_worked_and_committed_and_the_tally_counts_them_on_its_clock() -> None:
    """Five items through two workers: each handled once, each committed; the tally's time is the engine's clock."""
    engine, handler, committer, clock = build(5)
    run = asyncio.create_task(engine.run())
    for _ in range(3):  # two workers answer five items in three rounds, a second each
        await until(lambda: any(not f.done() for f in handler.answers.values()))
        clock.now += 1.0
        handler.answer()
    tally = await asyncio.wait_for(run, 5)
    clock.now += 1.0  # after the end: not counted
    assert sorted(committer.committed) == [0, 1, 2, 3, 4] and sorted(handler.started) == [0, 1, 2, 3, 4]
    assert tally.items == 5 and tally.workers == 2 and tally.error is None
    assert tally.elapsed == 3.0


async def test_a_first_signal_drains_the_requests_under_way_and_commits_them() -> None:
    """SIGINT while two requests are out: both answers are committed, no other item starts, exit 130."""
    engine, handler, committer, _ = build(10)
    run = asyncio.create_task(engine.run())
    await until(lambda: len(handler.started) == 2)
    assert engine.stop.signalled(Interrupted("stopped by SIGINT", 130)) == 2  # two answers to wait for
    await asyncio.sleep(0)
    handler.answer()
    tally = await asyncio.wait_for(run, 5)
    assert sorted(committer.committed) == [0, 1] and handler.started == [0, 1]
    assert isinstance(tally.error, Interrupted) and tally.error.code == 130


async def test_a_spent_budget_drains_the_requests_under_way() -> None:
    """A --max-credits stop is soft too: the other worker's request under way is answered and committed."""
    engine, handler, committer, _ = build(10)
    run = asyncio.create_task(engine.run())
    await until(lambda: len(handler.started) == 2)
    engine.stop.request_stop(BudgetExhausted("the --max-credits budget of 2 requests is spent"))
    await asyncio.sleep(0)
    handler.answer()
    tally = await asyncio.wait_for(run, 5)
    assert sorted(committer.committed) == [0, 1] and isinstance(tally.error, BudgetExhausted)


async def test_a_second_signal_stops_at_once() -> None:
    """SIGTERM, then SIGTERM again before the answers come: the run ends without waiting for them."""
    engine, handler, committer, _ = build(10)
    run = asyncio.create_task(engine.run())
    await until(lambda: len(handler.started) == 2)
    engine.stop.signalled(Interrupted("stopped by SIGTERM", 143))
    await asyncio.sleep(0)
    assert not run.done()  # the first one waits for the answers under way
    assert engine.stop.signalled(Interrupted("stopped by SIGTERM", 143)) == 0
    tally = await asyncio.wait_for(run, 5)  # nobody answers: only a hard stop ends it
    assert committer.committed == [] and tally.error is not None and tally.error.code == 143


async def test_an_auto_pool_grows_by_the_pacing_rule_and_sizes_the_lease() -> None:
    """parallelism "auto": after an item, workers grow to `auto_workers` at the measured latency; a lease of one
    credit per worker, at most LEASE_MAX."""
    engine, handler, committer, _ = build(40, workers=None, latency=2.0)
    lease = LocalLease(FakeState(), base=0, cap=None)
    engine._budget = lease
    run = asyncio.create_task(engine.run())
    await until(lambda: len(handler.started) == 2)
    handler.answer()
    await until(lambda: engine.tally.workers > 2)
    assert engine.tally.workers == 31  # 600/min, 2 s a request: ceil(10 * 2 * 1.5) + 1
    assert lease.size == LEASE_MAX
    while not run.done():
        handler.answer()
        await asyncio.sleep(0)
    assert sorted(committer.committed) == list(range(40))


class FakeState:
    """The state store's side of a local lease."""

    def __init__(self) -> None:
        self.reserved: list[int] = []
        self.released = False

    def reserve(self, upto: int) -> None:
        self.reserved.append(upto)

    def release(self) -> None:
        self.released = True


async def test_a_local_lease_reserves_a_lease_at_a_time_up_to_the_cap() -> None:
    """The n-th request of a run reserves the next `size` in the store when it is beyond the reservation, never
    beyond --max-credits; a clean end releases what was not sent."""
    state = FakeState()
    lease = LocalLease(state, base=10, cap=20, size=lease_size(4))  # type: ignore[arg-type]
    assert lease.left == 10
    for n in range(1, 11):
        await lease.take(n)
    assert state.reserved == [14, 18, 20]
    await lease.settle(10)
    assert state.released


async def test_the_credit_is_taken_before_the_rate_slot() -> None:
    """A request waits for its credit first, then for its rate slot: a slot is never held while the lease waits."""
    order: list[str] = []
    granted = asyncio.Event()

    class Gate(RateGate):
        async def acquire(self) -> float:
            order.append("slot")
            raise KeyRejected("stop here: nothing is sent in this test")

    async def take(n: int) -> None:
        order.append(f"credit {n}")
        await granted.wait()
        order.append("granted")

    client = Client(Settings(rate_enabled=False).client_options(), api_key="k", gate=Gate(Pace()), reserve=take)
    call = asyncio.create_task(client.get("/userid/", {"username": "a"}))
    await until(lambda: order)
    await asyncio.sleep(0)
    assert order == ["credit 1"]  # the slot is not asked for while the credit is pending
    granted.set()
    with pytest.raises(KeyRejected):
        await call
    assert order == ["credit 1", "granted", "slot"]


class HeldSource(Items):
    """An item source that holds its items until the engine releases them (`HeldItems`, as the PostgreSQL queue)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.released: list[int] = []
        self.sizes: list[int] = []

    def release(self, item: int) -> None:
        self.released.append(item)

    def resize(self, workers: int) -> None:
        self.sizes.append(workers)


async def test_a_source_that_holds_its_items_gets_each_back_once_and_follows_an_auto_pool() -> None:
    """A `HeldItems` source: every item it gave is released once when it ends, whether worked or fed and left by a
    stop; an "auto" pool tells it the workers it grew to."""
    engine, handler, _, _ = build(40, workers=None, latency=2.0)
    source = HeldSource(40)
    engine._source = engine._held = source
    run = asyncio.create_task(engine.run())
    await until(lambda: len(handler.started) == 2)
    handler.answer()
    await until(lambda: engine.tally.workers > 2)
    assert source.sizes[-1] == engine.tally.workers == 31
    await until(lambda: len(handler.started) >= 31)
    engine.stop.request_stop(KeyRejected("gone"))  # a hard stop: the items under way and those queued end
    await asyncio.wait_for(run, 5)
    assert sorted(source.released) == list(range(40))
