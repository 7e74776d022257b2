"""The work queue of PostgreSQL jobs: pgqueuer, wrapped once (as retry.py wraps tenacity).

The queue hands items out and takes a dead worker's items back: pgqueuer heartbeats every picked job from a
background task on the database clock, and a job whose heartbeat is older than `jobs.heartbeat_timeout` is
picked again by any worker. It is not the record of what is done: that is `crawler_items` (pg_jobs.py), and
only items not done there are enqueued. Pinned version and measured edges: tests/test_pgqueuer_edges.py.
`ItemQueue` is one consumer; `QueueItemSource` turns a worker's consumers into the engine's item source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from crawler.config import masked
from crawler.errors import CrawlerError, UsageError
from crawler.retry import Stall, retry_until_stall
from crawler.stores import postgres
from crawler.stores.pg_schema import INSTALL_LOCK
from crawler.stores.postgres import StoreLost

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("crawler.queue")


def one_line(exc: BaseException) -> str:
    """An error as one line: its type and message (libpq's span several lines; a URL's password masked)."""
    return f"{type(exc).__name__}: {' '.join(masked(str(exc)).split())}"


class _OneLine(logging.Filter):
    """pgqueuer's warnings and errors at the default level, each on one line with its error's message (it logs each
    lost connection with a traceback, and a PostgreSQL outage is no bug), and each kind at most once every
    `REPEAT` seconds (during an outage it logs a failed flush a few times a second); -vv (debug) shows all it logs,
    as it logs it."""

    REPEAT = 10.0

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[object, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        if record.levelno < logging.WARNING:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        kind = (record.msg, type(exc).__name__)
        now = time.monotonic()
        if now - self._last.get(kind, -self.REPEAT) < self.REPEAT:
            return False
        self._last[kind] = now
        if exc is not None:
            record.msg, record.args = f"{record.getMessage()}: {one_line(exc)}", None
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("pgqueuer").addFilter(_OneLine())


def entrypoint(jid: str) -> str:
    """The queue entrypoint of a job: one per job, so a worker asks only for the jobs it works on."""
    return f"crawler_{jid}"


def dedupe_key(jid: str, seq: int) -> str:
    """At most one queued or picked queue job per item."""
    return f"{jid}:{seq}"


async def _connect(url: str, heartbeat_timeout: float = 30.0) -> psycopg.AsyncConnection[Any]:
    # pgqueuer's psycopg driver needs an autocommit connection; keepalives and lock bounds as the store's.
    return await postgres.connect(url, name="crawler-queue", heartbeat_timeout=heartbeat_timeout)


async def install(url: str) -> None:
    """Create pgqueuer's tables once per schema (under the same lock as ours)."""
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    conn = await _connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock(%s)", (INSTALL_LOCK,))
        queries = Queries(PsycopgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
    finally:
        await conn.close()


async def enqueue(url: str, jid: str, seqs: Sequence[int]) -> None:
    """Put items on the queue; items already queued or picked are skipped (dedupe key)."""
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    if not seqs:
        return
    conn = await _connect(url)
    try:
        queries = Queries(PsycopgDriver(conn))
        for start in range(0, len(seqs), 5000):
            chunk = list(seqs[start:start + 5000])
            await queries.enqueue([entrypoint(jid)] * len(chunk), [str(s).encode() for s in chunk], [0] * len(chunk),
                                  dedupe_key=[dedupe_key(jid, s) for s in chunk], on_conflict="skip")
    finally:
        await conn.close()


def _driver(listen: psycopg.AsyncConnection[Any], queries: psycopg.AsyncConnection[Any]) -> Any:
    """pgqueuer's psycopg driver with its queries on a connection of their own.

    The driver reads notifications with `notifies(timeout=1.0)`, which holds its connection for up to a second
    at a time, and runs every query on that same connection: measured, 1.9 queue jobs a second with batch size 1
    (tests/test_pgqueuer_edges.py). LISTEN and the reader keep the first connection; queries take the second.
    """
    from pgqueuer.db import PsycopgDriver
    from psycopg import AsyncRawCursor
    from psycopg.rows import dict_row

    class TwoConnections(PsycopgDriver):
        async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
            cursor = AsyncRawCursor(queries, row_factory=dict_row)
            await cursor.execute(query, args or None)
            return await cursor.fetchall()

        async def execute(self, query: str, *args: object) -> str:
            cursor = AsyncRawCursor(queries)
            await cursor.execute(query, args or None)
            return cursor.statusmessage or ""

    return TwoConnections(listen)


class ItemQueue:
    """One worker's consumer of one job's queue: `await q.run(handler)` until `q.stop()`.

    `handler(seq)` runs for each item handed out, at most `concurrency` at a time in this process; the
    heartbeat of a picked item stops with the process (a kill, a SIGSTOP), and after `heartbeat_timeout`
    another worker gets it.
    """

    def __init__(self, url: str, jid: str, *, concurrency: int, heartbeat_timeout: float, poll: float) -> None:
        self.url = url
        self.jid = jid
        self.concurrency = max(2, concurrency)
        self.heartbeat_timeout = heartbeat_timeout
        self.poll = poll
        self._qm: Any = None
        self._stopping = False
        self.ran = False  # set once `run()` is connected and taking items (the caller's outage clock resets)

    def stop(self) -> None:
        """Take no more items; `run()` returns once the items in hand are done."""
        self._stopping = True
        if self._qm is not None:
            self._qm.shutdown.set()

    async def run(self, handler: Callable[[int], Awaitable[None]]) -> None:
        """Take items until stopped; a lost connection ends it with the driver's error (the caller retries)."""
        from pgqueuer.models import Job
        from pgqueuer.qm import QueueManager
        from pgqueuer.queries import Queries

        if self._stopping:
            return
        try:
            conn = await _connect(self.url, self.heartbeat_timeout)
        except Exception as exc:
            raise UsageError(f"jobs.url = {masked(self.url)}: {type(exc).__name__}") from exc
        try:
            conn2 = await _connect(self.url, self.heartbeat_timeout)
        except BaseException:
            await conn.close()
            raise
        try:
            qm = QueueManager(Queries(_driver(conn, conn2)))
            self._qm = qm

            @qm.entrypoint(entrypoint(self.jid), accepts_context=False)
            async def on_item(job: Job) -> None:
                await handler(int((job.payload or b"0").decode()))

            if self._stopping:
                return
            self.ran = True
            # batch_size 1: an item waits in the queue, not in a worker that is busy with another one.
            await qm.run(dequeue_timeout=timedelta(seconds=self.poll), batch_size=1,
                         max_concurrent_tasks=self.concurrency,
                         heartbeat_timeout=timedelta(seconds=self.heartbeat_timeout),
                         log_aggregation_interval=timedelta(0))
        finally:
            self._qm = None
            for c in (conn, conn2):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), 2.0)


class QueueItemSource:
    """A PostgreSQL job's items for one worker, as the engine's item source (`engine.pool.ItemSource`, `HeldItems`).

    pgqueuer calls back once per item and completes the item's queue job when the callback returns (heartbeating it
    meanwhile), so each callback puts its item on the queue `items()` yields and waits until `release(seq)`: the
    engine releases every item it was given when the item ends, however it ends. `run()` runs the consumers of the
    job's queue: one, and one more each time the engine grows an "auto" pool (`resize`); `items()` ends when they
    all have (`stop()`: they take no more items; those in hand go on). The queue is bounded by the consumers' caps:
    at most `taking` callbacks wait at once.
    """

    def __init__(self, url: str, jid: str, *, concurrency: int, heartbeat_timeout: float, where: str,
                 stall_limit: float, lost: Callable[[CrawlerError], None]) -> None:
        self.url = url
        self.jid = jid
        self.heartbeat_timeout = heartbeat_timeout
        self._where = where
        self._stall_limit = stall_limit
        self._lost = lost  # the run's stop, for the queue lost past the stall limit (StoreLost)
        self.taking = concurrency  # the items taken at a time, the consumers' caps together
        self.queues = [self._consumer(concurrency)]
        self._items: asyncio.Queue[int | None] = asyncio.Queue()  # None: every consumer ended
        self._held: dict[int, asyncio.Future[None]] = {}  # seq -> its callback's release
        self._tg: asyncio.TaskGroup | None = None
        self._stopped = False
        self._refusing = False

    def _consumer(self, concurrency: int) -> ItemQueue:
        return ItemQueue(self.url, self.jid, concurrency=concurrency, heartbeat_timeout=self.heartbeat_timeout,
                         poll=min(1.0, self.heartbeat_timeout / 4))

    async def run(self) -> None:
        """Run the consumers until every one has ended (a `stop()`, or the queue lost: `lost(StoreLost)`)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for queue in self.queues:
                    tg.create_task(self._take_items(queue))
        finally:
            self._tg = None
            self._items.put_nowait(None)

    async def items(self) -> AsyncIterator[int]:
        """The items pgqueuer hands this worker, as it hands them, until the consumers have ended."""
        while (seq := await self._items.get()) is not None:
            yield seq

    def release(self, seq: int) -> None:
        """The item ended: its callback returns and pgqueuer completes its queue job."""
        done = self._held.pop(seq, None)
        if done is not None and not done.done():
            done.set_result(None)

    def resize(self, workers: int) -> None:
        """parallelism = "auto": take `workers` items at a time. pgqueuer fixes a consumer's cap when it starts, so the
        difference is taken by one more consumer, started at once: the items in hand go on, none waits for them."""
        more = workers - self.taking
        if more < 2 or self._stopped or self._tg is None:  # a consumer takes at least 2 at a time
            return
        log.debug("parallelism auto: %d -> %d items at a time", self.taking, workers)
        queue = self._consumer(more)
        self.queues.append(queue)
        self.taking = workers
        self._tg.create_task(self._take_items(queue))

    def stop(self, *, refuse: bool = False) -> None:
        """Every consumer takes no more items (those in hand go on); `refuse`: a callback still to come returns at
        once (the run stopped: nothing will work its item)."""
        self._stopped = True
        self._refusing = self._refusing or refuse
        for queue in self.queues:
            queue.stop()

    def close(self) -> None:
        """The run has ended: stop, and release every item still held (queued, never worked)."""
        self.stop(refuse=True)
        for seq in list(self._held):
            self.release(seq)

    async def _on_item(self, seq: int) -> None:
        """A consumer's callback: hand the item on and wait until it is released (shielded: a stop cancels the
        engine's worker, never the library's task)."""
        if self._refusing or seq in self._held:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held[seq] = done
        self._items.put_nowait(seq)
        await asyncio.shield(done)

    async def _take_items(self, queue: ItemQueue) -> None:
        """Run a queue consumer; a lost connection is retried until retry.stall_limit (then StoreLost)."""
        stall = Stall(self._stall_limit)

        async def consume() -> None:
            queue.ran = False
            try:
                if not self._stopped:
                    await queue.run(self._on_item)
            finally:
                if queue.ran:  # it ran again since the last failure: a new outage, with its own stall limit
                    stall.answered()

        try:
            await retry_until_stall(
                consume, retriable=lambda _: not self._stopped, stall=stall,
                on_retry=lambda exc, *_: log.warning("the job queue (%s) failed: %s; retrying", self._where,
                                                     one_line(exc)),
                lost=lambda: StoreLost(f"{self._where} has not answered for {stall.limit:g} s (retry.stall_limit);"
                                       " what was committed is kept: start PostgreSQL and run the same command again"))
        except StoreLost as exc:
            self._lost(exc)
        except Exception:
            if not self._stopped:
                raise
