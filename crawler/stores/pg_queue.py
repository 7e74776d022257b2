"""The work queue of PostgreSQL jobs: pgqueuer, wrapped once (as retry.py wraps tenacity).

The queue hands items out and takes a dead worker's items back: pgqueuer heartbeats every picked job from a
background task on the database clock, and a job whose heartbeat is older than `jobs.heartbeat_timeout` is
picked again by any worker. It is not the record of what is done: that is `crawler_items` (pgjobs.py), and
only items not done there are enqueued. Pinned version and measured edges: tests/test_pgqueuer_edges.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from crawler.config import masked
from crawler.errors import UsageError
from crawler.stores.pg_jobs import _INSTALL_LOCK, bound_session, connect_kwargs

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
    import psycopg

    # pgqueuer's psycopg driver needs an autocommit connection; keepalives and lock bounds as the store's.
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, application_name="crawler-queue",
                                                 **connect_kwargs(heartbeat_timeout, 5.0))
    try:
        await bound_session(conn, heartbeat_timeout)
    except BaseException:
        await conn.close()
        raise
    return conn


async def install(url: str) -> None:
    """Create pgqueuer's tables once per schema (under the same lock as ours)."""
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    conn = await _connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_INSTALL_LOCK,))
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
