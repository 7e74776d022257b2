"""The one group-commit writer every kind of run shares: workers hand it items and wait for their commit.

A bounded queue between the workers and one writer task, so a slow commit slows the workers instead of filling
memory. The writer takes every item waiting (a group commit) and hands the group to the run's committer (the
CSV sink + state store, the PostgreSQL job, ingest's day files + history store), which commits it in one
transaction. On any error it fails every waiting commit, refuses later ones and stops: no worker waits for ever
on a commit that will not come.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# What one group commit does: commit `items` (one transaction), then say how each went, in the group's order (None:
# committed; an exception: that item's waiter raises it), or return None when every item committed. An exception
# the committer raises fails the whole group and stops the writer.
Committer = Callable[[list[T]], Awaitable[Sequence[Exception | None] | None]]


class WriterStopped(RuntimeError):
    """The writer ended (cancelled, or closed) before this commit could be made."""


class GroupWriter(Generic[T]):
    """The single writer of one run: `submit` from the workers, `run` in one task, `close` when no more come.

    ``capacity`` items may wait before `submit` waits for room; a group holds at most ``limit``. A commit starts
    ``interval`` seconds after the previous one at the earliest (a batching window: at most ~1/interval commits a
    second, however many workers). While ``gate`` is clear the writer holds the first item it took (a test or an
    operator stalls the writer with it: backpressure).
    """

    def __init__(self, commit: Committer[T], *, capacity: int = 64, limit: int = 1024, interval: float = 0.0,
                 gate: asyncio.Event | None = None) -> None:
        self._commit = commit
        self.capacity = capacity
        self.limit = limit
        self.interval = interval
        self._gate = gate
        self._waiting: collections.deque[tuple[T, asyncio.Future[None]]] = collections.deque()
        self._arrived = asyncio.Event()  # an item arrived, or close(): wakes the writer
        self._room = asyncio.Event()  # the queue has room (or the writer stopped): wakes submitters
        self._room.set()
        self._closed = False
        self.error: Exception | None = None  # what stopped the writer; every later submit raises it

    @property
    def queued(self) -> int:
        """Items waiting in the queue (not yet taken into a group)."""
        return len(self._waiting)

    async def submit(self, item: T) -> None:
        """Hand ``item`` to the writer and wait until it is committed; raise what failed it instead (the commit's
        error, the committer's verdict on this item, or `WriterStopped`)."""
        while len(self._waiting) >= self.capacity and self.error is None and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self.error is not None:
            raise self.error
        if self._closed:
            raise WriterStopped("the writer is closed: no more commits")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._arrived.set()
        await done

    def close(self) -> None:
        """No more items: the writer commits what waits, then `run` returns."""
        self._closed = True
        self._arrived.set()
        self._room.set()

    async def run(self) -> None:
        """The writer task: group-commit items until `close()` and none is left. On any error (or cancellation) it
        fails every waiting commit, refuses later ones, and raises it."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        group: list[tuple[T, asyncio.Future[None]]] = []
        try:
            while True:
                if not self._waiting:
                    if self._closed:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                self._take(group, 1)
                if self._gate is not None:
                    await self._gate.wait()
                self._take(group, self.limit)
                pause = last + self.interval - loop.time()
                if pause > 0 and not self._closed:
                    await asyncio.sleep(pause)  # a batching window, not a synchronisation guess
                    self._take(group, self.limit)
                await self._write(group)
                group = []
                last = loop.time()
        except BaseException as exc:
            self._fail(group, exc)
            raise

    def _take(self, group: list[tuple[T, asyncio.Future[None]]], limit: int) -> None:
        while self._waiting and len(group) < limit:
            group.append(self._waiting.popleft())
        self._room.set()

    async def _write(self, group: list[tuple[T, asyncio.Future[None]]]) -> None:
        verdicts = await self._commit([item for item, _ in group])
        if verdicts is not None and len(verdicts) != len(group):
            raise ValueError(f"the committer gave {len(verdicts)} verdicts for a group of {len(group)}")
        for i, (_, done) in enumerate(group):
            if done.done():  # its waiter was cancelled
                continue
            verdict = None if verdicts is None else verdicts[i]
            if verdict is None:
                done.set_result(None)
            else:
                done.set_exception(verdict)

    def _fail(self, group: list[tuple[T, asyncio.Future[None]]], exc: BaseException) -> None:
        self.error = exc if isinstance(exc, Exception) else WriterStopped("the writer stopped before this commit")
        for _, done in itertools.chain(group, self._waiting):
            if not done.done():
                done.set_exception(self.error)
        self._waiting.clear()
        self._room.set()
