"""The one group-commit writer (`engine.writer.GroupWriter`): group commits, per-item verdicts, and on any error
every waiting commit fails at once (none hangs) and later ones are refused. Every wait here is bounded."""

from __future__ import annotations

import asyncio

import pytest

from crawler.engine.writer import GroupWriter, WriterStopped

BOUND = 5.0  # seconds: a waiter that hangs fails the test instead of the suite


class Committer:
    """Records each group; fails the group that holds ``fail_on`` (with ``error``); holds a group while ``hold``
    is clear."""

    def __init__(self, *, fail_on: int | None = None, error: Exception | None = None) -> None:
        self.groups: list[list[int]] = []
        self.fail_on = fail_on
        self.error = error or OSError("disk on fire")
        self.hold = asyncio.Event()
        self.hold.set()
        self.entered = asyncio.Event()

    async def __call__(self, items: list[int]) -> None:
        self.entered.set()
        await self.hold.wait()
        if self.fail_on in items:
            raise self.error
        self.groups.append(items)


async def test_every_item_waiting_goes_into_one_commit() -> None:
    """Items submitted while a commit runs wait in the queue and are committed together, in order, in the next."""
    commit = Committer()
    writer = GroupWriter(commit)
    async with asyncio.timeout(BOUND), asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        commit.hold.clear()
        first = tg.create_task(writer.submit(0))
        await commit.entered.wait()
        rest = [tg.create_task(writer.submit(i)) for i in range(1, 6)]
        while writer.queued < 5:
            await asyncio.sleep(0)
        commit.hold.set()
        await asyncio.gather(first, *rest)
        writer.close()
    assert commit.groups == [[0], [1, 2, 3, 4, 5]]


async def test_an_error_in_one_commit_fails_every_waiter_and_refuses_later_ones() -> None:
    """The group that fails, the items queued behind it and a submit after it all raise the commit's error, at
    once; `run` raises it too."""
    commit = Committer(fail_on=0)
    writer = GroupWriter(commit, capacity=3)
    async with asyncio.timeout(BOUND):
        runner = asyncio.create_task(writer.run())
        commit.hold.clear()
        waiters = [asyncio.create_task(writer.submit(0))]
        await commit.entered.wait()
        waiters += [asyncio.create_task(writer.submit(i)) for i in range(1, 6)]  # 3 queued, 2 wait for room
        while writer.queued < 3:
            await asyncio.sleep(0)
        commit.hold.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        with pytest.raises(OSError, match="disk on fire"):
            await runner
        with pytest.raises(OSError, match="disk on fire"):
            await writer.submit(9)
    assert all(r is commit.error for r in results), results
    assert commit.groups == []


async def test_a_cancelled_writer_fails_every_waiter() -> None:
    """Cancelling the writer mid-commit fails its group and the queue with WriterStopped (a RuntimeError)."""
    commit = Committer()
    writer = GroupWriter(commit)
    async with asyncio.timeout(BOUND):
        runner = asyncio.create_task(writer.run())
        commit.hold.clear()
        waiters = [asyncio.create_task(writer.submit(0))]
        await commit.entered.wait()
        waiters.append(asyncio.create_task(writer.submit(1)))
        while writer.queued < 1:
            await asyncio.sleep(0)
        runner.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [WriterStopped, WriterStopped]


async def test_the_committer_fails_one_item_and_commits_the_others() -> None:
    """A verdict fails only its item's waiter (a page of an item another worker took over); the writer goes on."""
    lost = LookupError("taken over")

    async def commit(items: list[int]) -> list[Exception | None]:
        return [lost if i == 1 else None for i in items]

    writer = GroupWriter(commit)
    async with asyncio.timeout(BOUND):
        runner = asyncio.create_task(writer.run())
        results = await asyncio.gather(*(writer.submit(i) for i in range(3)), return_exceptions=True)
        assert await writer.submit(7) is None
        writer.close()
        await runner
    assert results == [None, lost, None]


async def test_close_commits_what_waits_and_then_refuses() -> None:
    """close() lets the writer commit the items already queued, then `run` returns; a later submit raises."""
    commit = Committer()
    writer = GroupWriter(commit)
    async with asyncio.timeout(BOUND):
        waiters = [asyncio.create_task(writer.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        writer.close()
        await writer.run()
        await asyncio.gather(*waiters)
        with pytest.raises(WriterStopped):
            await writer.submit(3)
    assert commit.groups == [[0, 1, 2]]


async def test_a_closed_gate_holds_the_first_item_and_the_queue_fills() -> None:
    """While the gate is clear the writer holds the first item and commits nothing; the rest wait in the queue
    up to its capacity, then submit waits (backpressure)."""
    commit = Committer()
    gate = asyncio.Event()
    writer = GroupWriter(commit, capacity=2, gate=gate)
    async with asyncio.timeout(BOUND):
        runner = asyncio.create_task(writer.run())
        waiters = [asyncio.create_task(writer.submit(i)) for i in range(4)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert writer.queued == 2 and commit.groups == [] and not any(w.done() for w in waiters)
        gate.set()
        await asyncio.gather(*waiters)
        writer.close()
        await runner
    assert sorted(i for g in commit.groups for i in g) == [0, 1, 2, 3]
