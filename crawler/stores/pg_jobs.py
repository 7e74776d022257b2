"""The PostgreSQL job store (`jobs.url`): a job's items, cursors, counters and rows, shared by every worker.

Sits where `local.py` + the CSV sit for a local job. Workers take items handed out by the queue (`pg_queue.py`,
pgqueuer), and commit each page's rows with the item's new cursor in one transaction that holds only if
the item's version is still the one the worker took (a taker bumps it), so a worker that lost its item to a
takeover writes nothing. Rows carry a natural key (job, item, row id) with ON CONFLICT DO NOTHING as a
second net. Every wait on a lost server is bounded by `retry.stall_limit` (postgres.py: `Outage`). The tables are
in pg_schema.py, the SQL of the writes in pg_items.py, the records in model.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from crawler.config import masked
from crawler.errors import RunStopped, UsageError
from crawler.stores import pg_items, pg_schema, pg_workers, postgres
from crawler.stores.model import Created, PageCommit, PgJob, Progress, Pruned, Taken
from crawler.stores.pg_workers import WorkerRegistry
from crawler.stores.postgres import Outage, deadline, shut_down

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("crawler.stores.pg_jobs")
T = TypeVar("T")


class PgJobStore(WorkerRegistry):
    """The job tables in PostgreSQL. `async with PgJobStore(url, ...)`; every call retries a lost server."""

    def __init__(self, url: str, *, stall_limit: float = 300.0, heartbeat_timeout: float = 30.0,
                 connect_timeout: float = 5.0) -> None:
        self.url = url
        self.where = f"jobs.url = {masked(url)}"
        self.heartbeat_timeout = heartbeat_timeout
        self._connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._outage = Outage(self.where, stall_limit)

    @property
    def stall_limit(self) -> float:
        """How long a lost server is waited for (``retry.stall_limit``)."""
        return self._outage.stall_limit

    @stall_limit.setter
    def stall_limit(self, seconds: float) -> None:
        self._outage.stall_limit = seconds

    async def __aenter__(self) -> PgJobStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect and create the tables; unreachable is a usage error naming jobs.url (exit 2)."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UsageError(f"{self.where} needs psycopg: pip install 'crawler[distributed]'") from None
        try:
            await self._connect()
            assert self._conn is not None
            await pg_schema.install(self._conn)
            await self.housekeep()
        except Exception as exc:
            await self.aclose()
            if not (postgres.retriable(exc) or "psycopg" in type(exc).__module__):  # any error of the driver
                raise
            why = " ".join(masked(str(exc)).split())  # one line: libpq's messages span several
            raise UsageError(f"{self.where}: cannot use PostgreSQL ({type(exc).__name__}: {why}); start it or fix"
                             " the URL") from None

    def abandon(self, error: RunStopped) -> None:
        """A stop (SIGTERM/SIGINT): from now on a call that finds the server away raises `error` at once instead of
        retrying until retry.stall_limit (nothing more can be committed; what was is kept). A server that answers
        still gets the calls of a clean end."""
        self._outage.abandon(error)

    async def _connect(self) -> None:
        self._conn = await postgres.connect(self.url, name="crawler", heartbeat_timeout=self.heartbeat_timeout,
                                            connect_timeout=self._connect_timeout)

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        await postgres.close(conn)

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run `fn` in one transaction; a lost server (or a transaction rolled back for another's sake) is retried
        with backoff until the stall limit.

        Shielded: a caller cancelled (a stop) leaves the transaction to finish or roll back on its own, never the
        connection half-way through a query for the next caller.
        """
        task = asyncio.ensure_future(self._run_now(fn))
        task.add_done_callback(postgres.retrieved)  # a caller cancelled meanwhile never reads its error
        return await asyncio.shield(task)

    async def _run_now(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._lock:
            return await self._outage.retry(functools.partial(self._once, fn), stall=self._outage.streak)

    async def _once(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        try:
            if self._conn is None or self._conn.closed:
                await self._connect()
            conn = self._conn
            assert conn is not None
            with deadline(self.stall_limit, functools.partial(shut_down, conn)):
                async with conn.transaction():
                    result = await fn(conn)
        except Exception as exc:
            if postgres.unreachable(exc):  # rolled back: the same transaction again on the same connection
                await self.aclose()
            raise
        if self._outage.streak.since is not None:
            log.warning("%s answers again", self.where)
        return result

    async def outside(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call()` (a new try each time: an idempotent piece of work on a connection of its own, such as putting
        items on the queue) until it gets an answer: a lost server is retried with backoff like the store's own
        calls, StoreLost after the stall limit, the stop at once after `abandon()`."""
        return await self._outage.retry(call)

    # --- jobs ---

    async def create_job(self, jid: str, command: str, options: dict[str, Any],
                         entries: Iterable[tuple[str, str, str | None, str | None]], *, output: str | None = None,
                         inherit: bool = True, heartbeat_timeout: float | None = None, bom: bool = False,
                         raw: bool = False, input_name: str | None = None,
                         check: pg_items.InputCheck | None = None) -> Created | None:
        """Create the job with its items (one transaction: a job is never seen half-read); None if it exists.

        Another job of the same command, options and `output` (host:path of OUT.csv) is the one an edited input
        supersedes: in the same transaction the new job continues it (`inherit`; False: --restart, it starts over)
        and it is deleted, so no worker spends on it any more; unless `check` refuses this input by raising.

        `entries` is read once per try (a lost connection runs the transaction again): a list or another
        re-iterable, never a one-shot iterator, which would give the retry only the entries after the cut."""
        if iter(entries) is entries:
            raise TypeError("create_job needs re-iterable entries (a retried transaction reads them again)")
        text = json.dumps(options, sort_keys=True)
        return await self._run(lambda conn: pg_items.create(
            conn, jid, command, text, entries, output=output, inherit=inherit, heartbeat_timeout=heartbeat_timeout,
            bom=bom, raw=raw, input_name=input_name, check=check))

    async def job(self, jid: str) -> PgJob | None:
        """A job by id (or a unique id prefix)."""
        found = await self._jobs("WHERE id LIKE %s", (jid + "%",))
        return found[0] if len(found) == 1 else None

    async def jobs(self) -> list[PgJob]:
        """Every job, oldest first."""
        return await self._jobs("", ())

    async def open_jobs(self) -> list[PgJob]:
        """Jobs with items left to work on (not done, budget not spent), oldest first."""
        return await self._jobs("WHERE status = 'running'", ())

    async def _jobs(self, where: str, args: tuple[Any, ...]) -> list[PgJob]:
        async def run(conn: psycopg.AsyncConnection[Any]) -> list[PgJob]:
            cur = await conn.execute(
                "SELECT id, command, options, status, max_credits, GREATEST(j.requests_sent + COALESCE(s.sent, 0),"
                " j.reserved + COALESCE(s.reserved, 0)), j.credits_billed + COALESCE(s.billed, 0),"
                " j.rows + COALESCE(s.rows, 0), extract(epoch FROM created), heartbeat_timeout, bom, raw"
                " FROM crawler_jobs j LEFT JOIN"
                " (SELECT job, sum(requests_sent) AS sent, sum(reserved) AS reserved, sum(credits_billed) AS billed,"
                " sum(rows) AS rows FROM crawler_sessions GROUP BY job) s ON s.job = j.id"
                f" {where} ORDER BY created, id", args)
            return [PgJob(r[0], r[1], json.loads(r[2]), r[3], r[4], int(r[5]), int(r[6]), int(r[7]), float(r[8]),
                          None if r[9] is None else float(r[9]), bool(r[10]), bool(r[11]))
                    for r in await cur.fetchall()]

        return await self._run(run)

    async def resume(self, jid: str, max_credits: int | None, *, retry: Sequence[str] = (), bom: bool = False,
                     raw: bool = False) -> None:
        """The starter (re)opens a job: its budget and output.bom/output.raw (what `crawler export` writes with)
        are the ones given now; items failed for `retry` go back."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            if retry:
                await conn.execute("UPDATE crawler_items SET status = 'pending', reason = NULL, endpoint = NULL,"
                                   " detail = NULL WHERE job = %s AND status = 'failed' AND reason = ANY(%s)",
                                   (jid, list(retry)))
            await conn.execute(
                "UPDATE crawler_jobs SET max_credits = %s, bom = %s, raw = %s, updated = now(), status = CASE WHEN"
                " EXISTS (SELECT 1 FROM crawler_items WHERE job = %s AND status = 'pending') THEN 'running'"
                " ELSE status END WHERE id = %s", (max_credits, bom, raw, jid, jid))

        await self._run(run)

    async def set_status(self, jid: str, status: str, *, when: str | None = None) -> None:
        """Set a job's status (only from `when`, if given)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            extra = " AND status = %s" if when else ""
            await conn.execute(f"UPDATE crawler_jobs SET status = %s, updated = now() WHERE id = %s{extra}",
                               (status, jid, *((when,) if when else ())))

        await self._run(run)

    async def housekeep(self) -> Pruned:
        """Housekeeping, run whenever a starter or worker opens the store and when a job completes, in one
        transaction: the sessions of finished jobs whose workers are gone, folded into their jobs
        (`pg_items.prune_sessions`), then the rows of workers long gone (`pg_workers.prune`)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> Pruned:
            return Pruned(await pg_items.prune_sessions(conn), await pg_workers.prune(conn))

        return await self._run(run)

    async def delete_job(self, jid: str) -> None:
        """Forget a job (`--restart`)."""
        await self._run(lambda conn: conn.execute("DELETE FROM crawler_jobs WHERE id = %s", (jid,)))

    # --- items ---

    async def take(self, jid: str, seq: int, owner: str) -> Taken | None:
        """Hold a pending item from now on (its version moves on, so an earlier holder's commits fail)."""
        return await self._run(lambda conn: pg_items.take(conn, jid, seq, owner))

    async def commit(self, jid: str, session: str, pages: Sequence[PageCommit], sent: int, billed: int) -> None:
        """Commit pages in one transaction: each only if its item is still at the version held (`committed`, the
        item's new version in `new_version`), its rows new to the item (`inserted`), and this worker session's
        requests/credits so far (absolute: a transaction run again after a lost COMMIT reply counts nothing twice)."""
        for page in pages:
            page.token = secrets.token_hex(8)

        attempts = 0

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal attempts
            attempts += 1
            await pg_items.commit(conn, jid, session, pages, sent, billed, again=attempts > 1)

        await self._run(run)

    async def grant(self, jid: str, session: str, have: int, want: int) -> int:
        """Reserve up to `want` more requests of the job's budget for a session already granted `have`, before
        sending them; how many were granted. Idempotent: run again after a lost COMMIT reply, it finds the
        session's grant already above `have` and hands that back instead of reserving twice. The job gone (deleted by
        --restart): LeaseLost."""
        return await self._run(lambda conn: pg_items.grant(conn, jid, session, have, want))

    async def give_back(self, jid: str, session: str, used: int) -> None:
        """A session ends cleanly: of the requests it was granted, only the `used` ones stay spent (absolute, so
        run twice it gives back nothing more)."""
        await self._run(lambda conn: conn.execute("UPDATE crawler_sessions SET reserved = LEAST(reserved, %s)"
                                                  " WHERE job = %s AND session = %s", (used, jid, session)))

    async def progress(self, jid: str) -> Progress:
        """Items by status."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> Progress:
            cur = await conn.execute("SELECT status, count(*) FROM crawler_items WHERE job = %s GROUP BY status",
                                     (jid,))
            counts = {s: int(n) for s, n in await cur.fetchall()}
            return Progress(counts.get("pending", 0), counts.get("done", 0), counts.get("failed", 0))

        return await self._run(run)

    async def failure_counts(self, jid: str) -> dict[str, int]:
        """Failed items and reply walks by reason."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
            cur = await conn.execute(
                "SELECT reason, count(*) FROM (SELECT reason FROM crawler_items WHERE job = %s AND status = 'failed'"
                " UNION ALL SELECT reason FROM crawler_walks WHERE job = %s AND status = 'failed') f GROUP BY reason",
                (jid, jid))
            return {r: int(n) for r, n in await cur.fetchall()}

        return await self._run(run)

    async def failures(self, jid: str) -> list[tuple[str, str, str, str]]:
        """(input, endpoint, reason, detail) of every failed item and reply walk, in input order."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str, str, str]]:
            cur = await conn.execute(
                "SELECT raw, endpoint, reason, detail FROM ("
                " SELECT seq, '' AS sub, raw, endpoint, reason, detail FROM crawler_items WHERE job = %s"
                " AND status = 'failed' UNION ALL SELECT w.seq, w.comment_id, i.key || ',' || w.comment_id,"
                " w.endpoint, w.reason, w.detail FROM crawler_walks w JOIN crawler_items i ON i.job = w.job"
                " AND i.seq = w.seq WHERE w.job = %s AND w.status = 'failed') f ORDER BY seq, sub", (jid, jid))
            return [(r or "", e or "", s or "", d or "") for r, e, s, d in await cur.fetchall()]

        return await self._run(run)

    async def rows(self, jid: str, batch: int = 2000) -> AsyncIterator[list[Any]]:
        """Every row's cells in a stable order (input order, then commit order), streamed. A lost server is
        retried until the stall limit (then StoreLost): the stream goes on after the rows already given."""
        given = 0
        delay = 0.1
        down: float | None = None
        while True:
            try:
                async with contextlib.aclosing(self._export(jid, given, batch)) as chunks:
                    async for chunk in chunks:
                        down, delay = None, 0.1
                        for (cells,) in chunk:
                            yield list(json.loads(cells))
                            given += 1
                return
            except Exception as exc:
                if not postgres.retriable(exc):
                    raise
                down = await self._outage.pause(exc, down, delay, "lost during the export")
                delay = min(delay * 2, 2.0)

    async def _export(self, jid: str, given: int, batch: int) -> AsyncGenerator[list[tuple[str]]]:
        """The job's rows after the first `given`, in chunks of `batch`: a separate connection, as the export streams
        through a server-side cursor while nothing else runs."""
        conn = await postgres.connect(self.url, name="crawler-export", heartbeat_timeout=self.heartbeat_timeout,
                                      connect_timeout=self._connect_timeout, autocommit=False, bound=False)
        try:
            async with conn.cursor(name="crawler_export") as cur:
                # (seq, n) is unique: the order is the same every time, so OFFSET skips exactly those given.
                await cur.execute("SELECT cells FROM crawler_rows WHERE job = %s ORDER BY seq, n OFFSET %s",
                                  (jid, given))
                while chunk := await cur.fetchmany(batch):
                    yield chunk
        finally:
            await postgres.close(conn)
