"""The PostgreSQL job store (`jobs.url`): a job's items, cursors, counters and rows, shared by every worker.

Sits where `state.py` + the CSV sit for a local job. Workers take items handed out by the queue (`queue.py`,
pgqueuer), and commit each page's rows with the item's new cursor in one transaction that holds only if
the item's version is still the one the worker took (a taker bumps it), so a worker that lost its item to a
takeover writes nothing. Rows carry a natural key (job, item, row id) with ON CONFLICT DO NOTHING as a
second net. Every wait on a lost server is bounded by `retry.stall_limit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from crawler import testing
from crawler.config import masked
from crawler.errors import RunStopped, UsageError
from crawler.retry import Halt, Stall, jitter, retry_async, retry_until_stall
from crawler.stores.local import ItemUpdate, Progress, WalkUpdate

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("crawler.stores.pg_jobs")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS crawler_jobs (
    id TEXT PRIMARY KEY,                       -- first 12 hex digits of hash(command, options, input)
    command TEXT NOT NULL,
    options TEXT NOT NULL,                     -- JSON of the JobOptions that define the output
    status TEXT NOT NULL DEFAULT 'running',    -- running, budget (--max-credits spent), done
    max_credits BIGINT,                        -- the whole job's budget (requests), across workers
    reserved BIGINT NOT NULL DEFAULT 0,        -- requests granted to workers before they were sent
    requests_sent BIGINT NOT NULL DEFAULT 0,
    credits_billed BIGINT NOT NULL DEFAULT 0,
    rows BIGINT NOT NULL DEFAULT 0,
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The starter's settings every worker of the job uses (a worker's own config never changes them).
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS heartbeat_timeout DOUBLE PRECISION;  -- jobs.heartbeat_timeout
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS bom BOOLEAN NOT NULL DEFAULT false;   -- output.bom
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS raw BOOLEAN NOT NULL DEFAULT false;   -- output.raw
-- host:path of the starter's OUT.csv: a starter whose input was edited continues the job of that output.
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS output TEXT;
CREATE TABLE IF NOT EXISTS crawler_items (
    job TEXT NOT NULL REFERENCES crawler_jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    raw TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',    -- pending, done, failed
    cursor TEXT,                               -- JSON of the next cursor of a walk in progress
    rows INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    reason TEXT, endpoint TEXT, detail TEXT,
    version BIGINT NOT NULL DEFAULT 0,         -- crawler_version's next value at every take and every commit
    owner TEXT,                                -- the worker that took it last
    token TEXT,                                -- the last commit's token (an unknown COMMIT outcome is checked)
    PRIMARY KEY (job, seq)
);
CREATE INDEX IF NOT EXISTS crawler_items_pending ON crawler_items (job, seq) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS crawler_walks (
    job TEXT NOT NULL, seq INTEGER NOT NULL, comment_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', cursor TEXT,
    pages INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0,
    reason TEXT, endpoint TEXT, detail TEXT,
    PRIMARY KEY (job, seq, comment_id),
    FOREIGN KEY (job, seq) REFERENCES crawler_items (job, seq) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS crawler_rows (
    job TEXT NOT NULL, seq INTEGER NOT NULL,
    rid TEXT NOT NULL,                         -- the row's first column (video_id, user_id, comment_id...)
    n BIGINT GENERATED ALWAYS AS IDENTITY,     -- commit order within the item, for a stable export
    cells TEXT NOT NULL,                      -- JSON array of the row's values (types kept for the cell rules)
    PRIMARY KEY (job, seq, rid),
    FOREIGN KEY (job, seq) REFERENCES crawler_items (job, seq) ON DELETE CASCADE
);
-- Versions come from one sequence for every job: a job run again (--restart) never hands out a version a
-- worker of its earlier run may still hold, so that worker's late page cannot commit into the new job.
CREATE SEQUENCE IF NOT EXISTS crawler_version AS BIGINT;
-- A worker's counters on a job, one row per worker session (summed for the job): a commit touches only its own
-- row (never one row every worker waits on), with absolute values, so a retried transaction writes nothing twice.
CREATE TABLE IF NOT EXISTS crawler_sessions (
    job TEXT NOT NULL REFERENCES crawler_jobs(id) ON DELETE CASCADE,
    session TEXT NOT NULL,                     -- worker id:random, one per JobWorker
    reserved BIGINT NOT NULL DEFAULT 0,        -- requests of the budget granted to this session (unsent ones
                                               -- handed back at a clean end)
    requests_sent BIGINT NOT NULL DEFAULT 0,
    credits_billed BIGINT NOT NULL DEFAULT 0,
    rows BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job, session)
);
CREATE TABLE IF NOT EXISTS crawler_workers (
    id TEXT PRIMARY KEY,                       -- host:pid:random
    host TEXT NOT NULL, pid INTEGER NOT NULL,
    key_hash TEXT NOT NULL,                    -- the rate ledger's name (a hash of key and base URL)
    ledger TEXT NOT NULL,                      -- rate.shared, password masked
    job TEXT,
    started TIMESTAMPTZ NOT NULL DEFAULT now(),
    seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""

# One schema install at a time (the advisory lock's key is arbitrary but fixed).
_INSTALL_LOCK = 0x63726177
# With a hash of the key's ledger name: one worker registration of a key at a time.
_REGISTER_LOCK = 0x72656769


class StoreLost(RunStopped):
    """PostgreSQL (jobs.url) did not answer for retry.stall_limit seconds."""


class LeaseLost(Exception):
    """Another worker took the item over (its version moved on): this worker's page is discarded."""


def job_id(command: str, options: dict[str, Any], input_sha: str) -> str:
    """A PostgreSQL job's id: the first 12 hex digits of the hash of its command, options and input."""
    text = json.dumps({"command": command, "options": options, "input": input_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class PgJob:
    """A job row."""

    id: str
    command: str
    options: dict[str, Any]
    status: str
    max_credits: int | None
    requests_sent: int  # the conservative count: requests granted to workers are counted as sent
    credits_billed: int
    rows: int
    created: float
    heartbeat_timeout: float | None = None  # the starter's jobs.heartbeat_timeout (None: a job from before)
    bom: bool = False  # the starter's output.bom
    raw: bool = False  # the starter's output.raw


@dataclass(frozen=True, slots=True)
class Created:
    """A job just created; `supersedes`: the job of the same output it replaced (an edited input), now gone."""

    supersedes: str | None = None
    added: int = 0  # items new to the job it continues
    gone: int = 0  # done items of that job no longer in the input (their rows kept)


@dataclass(frozen=True, slots=True)
class Taken:
    """An item this worker now holds at `version`, with its unfinished reply walks."""

    seq: int
    key: str
    raw: str
    cursor: Any
    rows: int
    pages: int
    version: int
    walks: list[tuple[str, Any, int]]


@dataclass(slots=True)
class PageCommit:
    """One page (or one item's end) to commit: its rows (cell texts) and the item's new state."""

    seq: int
    version: int  # the version this worker holds
    rows: Sequence[tuple[str, str]]  # (row id, JSON of the row's values)
    update: ItemUpdate
    walks: Sequence[WalkUpdate] = ()
    token: str = ""
    committed: bool = False  # set when the commit held
    new_version: int = 0  # the item's version after the commit (the one this worker holds from then on)
    inserted: int = 0  # rows new to the item (the others were committed before: ON CONFLICT DO NOTHING)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as registered."""

    id: str
    host: str
    pid: int
    key_hash: str
    ledger: str
    job: str | None
    live: bool


def _is_connection_error(exc: BaseException) -> bool:
    """A lost server, or a lock not granted within lock_timeout (a frozen worker holds it): retried."""
    import psycopg

    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError,
                            psycopg.errors.IdleInTransactionSessionTimeout))


def rolled_back(exc: BaseException) -> bool:
    """The server rolled the transaction back for another's sake (a deadlock, a serialization failure): the same
    transaction is asked again on the same connection, and the connection was never lost."""
    import psycopg

    # By SQLSTATE class 40: psycopg's DeadlockDetected and SerializationFailure are not TransactionRollback's.
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40")


class Outage:
    """How a PostgreSQL caller waits out a lost server (the job store's rule, shared with ingest's history store):
    retries with backoff until the outage reaches ``retry.stall_limit`` (then StoreLost), the stop at once after
    `abandon()`. The waits, the limit and the stop are the retry seam's (`crawler.retry`)."""

    def __init__(self, where: str, stall_limit: float) -> None:
        self.where = where
        self.stall_limit = stall_limit
        self.streak = Stall(stall_limit)  # the store's own outage: it spans the store's calls
        self._halt = Halt()

    def abandon(self, error: RunStopped) -> None:
        """From now on, a lost server raises ``error`` at once instead of being waited for."""
        self._halt.set(error)

    def _began(self, exc: BaseException, what: str = "lost") -> None:
        log.warning("%s: %s (%s); retrying", self.where, "transaction rolled back" if rolled_back(exc) else what,
                    type(exc).__name__)

    async def pause(self, exc: BaseException, down: float | None, delay: float, what: str = "lost") -> float:
        """The step every retry takes after a lost server: the stop at once after `abandon()`, StoreLost once the
        outage (begun at `down`; None: now) reaches the stall limit, else the backoff `delay`, cut short by a
        stop. Returns when the outage began."""
        if self._halt.error is not None:
            raise self._halt.error from None
        stall = Stall(self.stall_limit, since=down)
        if down is None:
            self._began(exc, what)
        stall.failed()
        if stall.expired:
            raise self.lost() from None
        await self._halt.wait(min(jitter(delay), max(stall.left(), 0.01)))
        assert stall.since is not None
        return stall.since

    def lost(self) -> StoreLost:
        """The stop of a server that has not answered for the stall limit."""
        return StoreLost(f"{self.where} has not answered for {self.stall_limit:g} s (retry.stall_limit); what was"
                         " committed is kept: start PostgreSQL and run the same command again")

    async def retry(self, call: Callable[[], Awaitable[T]],
                    retriable: Callable[[BaseException], bool] = _is_connection_error, *,
                    stall: Stall | None = None) -> T:
        """Await ``call()`` (a new try each time) until it gets an answer: an error ``retriable`` says is worth
        another try is waited out until the stall limit (``stall``: the streak, if it outlives this call)."""
        stall = stall or Stall(self.stall_limit)
        stall.limit = self.stall_limit  # (a store's limit may have changed since its streak began)

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            if tries == 1:
                self._began(exc)

        return await retry_until_stall(call, retriable=retriable, stall=stall, lost=self.lost, halt=self._halt,
                                       on_retry=on_retry)


def shut_down(conn: Any) -> None:
    """End a PostgreSQL connection's stream from outside: a call waiting on it (a server that accepts TCP but never
    answers) fails at once, as on a lost connection. Closing the connection object stays its owner's part."""
    with contextlib.suppress(Exception), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:  # closed: none
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def deadline(seconds: float, expire: Callable[[], None]) -> Iterator[None]:
    """The per-call deadline of PostgreSQL calls: ``expire()`` (a `shut_down`) if the block takes longer than
    ``seconds`` (``retry.stall_limit``), so the call fails as on a lost connection and is retried on a new one."""
    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    finally:
        timer.cancel()


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def connect_kwargs(heartbeat_timeout: float, connect_timeout: float) -> dict[str, Any]:
    """libpq parameters of every connection of a worker: TCP keepalives (an idle connection) and a TCP user
    timeout (data in flight) so a peer gone silent (a cut network, a frozen host) is found dead within about the
    heartbeat timeout, and a connect timeout."""
    every = max(1, round(heartbeat_timeout / 3))
    # Keepalives only probe an idle connection: a query sent into a silent network waits on TCP's retransmissions
    # (about 15 minutes), so tcp_user_timeout bounds how long sent data may go unacknowledged.
    return {"connect_timeout": max(1, round(connect_timeout)), "keepalives": 1, "keepalives_idle": every,
            "keepalives_interval": every, "keepalives_count": 3,
            "tcp_user_timeout": max(1000, round(heartbeat_timeout * 1000))}


async def bound_session(conn: psycopg.AsyncConnection[Any], heartbeat_timeout: float) -> None:
    """A frozen worker (SIGSTOP, a swapped-out VM) must not hold a lock others wait on for longer than the
    heartbeat timeout: the server ends its session once it sits idle in a transaction that long, and a statement
    waiting for a lock gives up after it (LockNotAvailable, retried like a lost connection)."""
    ms = max(1000, round(heartbeat_timeout * 1000))
    await conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
    await conn.execute(f"SET lock_timeout = {ms}")


async def _add_items(conn: psycopg.AsyncConnection[Any], jid: str, after: int) -> int:
    """Add the input's items (`crawler_wanted`) that job `jid` does not have, numbered from `after` + 1 in input
    order; how many of them are to be fetched (invalid lines are stored failed)."""
    cur = await conn.execute(
        "INSERT INTO crawler_items (job, seq, key, raw, status, reason, detail)"
        " SELECT %s, %s + row_number() OVER (ORDER BY pos), key, raw,"
        " CASE WHEN reason IS NULL THEN 'pending' ELSE 'failed' END, reason, detail FROM crawler_wanted w"
        " WHERE NOT EXISTS (SELECT 1 FROM crawler_items i WHERE i.job = %s AND i.key = w.key) RETURNING status",
        (jid, after, jid))
    return sum(1 for (status,) in await cur.fetchall() if status == "pending")


async def _hold(conn: psycopg.AsyncConnection[Any], jid: str) -> bool:
    """Lock a job about to be deleted in the order a worker's commit takes its locks (items, then the job row):
    commits and grants under way end first; later ones wait, then find the job gone (never a deadlock). False: the
    job is gone already (another starter)."""
    await conn.execute("SELECT count(*) FROM (SELECT 1 FROM crawler_items WHERE job = %s ORDER BY seq FOR UPDATE) l",
                       (jid,))
    cur = await conn.execute("SELECT 1 FROM crawler_jobs WHERE id = %s FOR UPDATE", (jid,))
    return await cur.fetchone() is not None


async def _continue_job(conn: psycopg.AsyncConnection[Any], old: str, new: str) -> Created:
    """Job `new` (just created, its input in `crawler_wanted`) continues job `old` as a local job merges an edited
    input: done items and those still in the input keep their state, reply walks and rows (nothing is fetched
    twice); the input's other items are added after them; the counters (and so --max-credits) carry on. Then `old`
    is deleted: its workers' later pages and grants find nothing to write to. `old` is held (`_hold`)."""
    await conn.execute(
        "INSERT INTO crawler_items (job, seq, key, raw, status, cursor, rows, pages, reason, endpoint, detail)"
        " SELECT %s, seq, key, raw, status, cursor, rows, pages, reason, endpoint, detail FROM crawler_items"
        " WHERE job = %s AND reason IS DISTINCT FROM 'invalid_input'"
        " AND (status = 'done' OR key IN (SELECT key FROM crawler_wanted))", (new, old))
    await conn.execute(
        "INSERT INTO crawler_walks (job, seq, comment_id, status, cursor, pages, rows, reason, endpoint, detail)"
        " SELECT %s, w.seq, comment_id, w.status, w.cursor, w.pages, w.rows, w.reason, w.endpoint, w.detail"
        " FROM crawler_walks w JOIN crawler_items i ON i.job = %s AND i.seq = w.seq WHERE w.job = %s", (new, new, old))
    cur = await conn.execute(
        "INSERT INTO crawler_rows (job, seq, rid, cells) SELECT %s, r.seq, rid, cells FROM crawler_rows r"
        " JOIN crawler_items i ON i.job = %s AND i.seq = r.seq WHERE r.job = %s ORDER BY r.seq, r.n", (new, new, old))
    rows = max(cur.rowcount, 0)
    cur = await conn.execute("SELECT count(*) FILTER (WHERE status = 'done' AND key NOT IN"
                             " (SELECT key FROM crawler_wanted)), COALESCE(max(seq), 0) FROM crawler_items"
                             " WHERE job = %s", (old,))
    counts = await cur.fetchone()
    assert counts is not None
    added = await _add_items(conn, new, int(counts[1]))
    await conn.execute(
        "UPDATE crawler_jobs SET (requests_sent, reserved, credits_billed, rows) = (SELECT"
        " j.requests_sent + COALESCE(sum(s.requests_sent), 0), GREATEST(j.requests_sent"
        " + COALESCE(sum(s.requests_sent), 0), j.reserved + COALESCE(sum(s.reserved), 0)),"
        " j.credits_billed + COALESCE(sum(s.credits_billed), 0), %s FROM crawler_jobs j LEFT JOIN crawler_sessions s"
        " ON s.job = j.id WHERE j.id = %s GROUP BY j.id) WHERE id = %s", (rows, old, new))
    await conn.execute("DELETE FROM crawler_jobs WHERE id = %s", (old,))
    return Created(old, added, int(counts[0]))


class PgJobStore:
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
            import psycopg
        except ImportError:
            raise UsageError(f"{self.where} needs psycopg: pip install 'crawler[distributed]'") from None

        async def install() -> None:
            await self._connect()
            conn = self._conn
            assert conn is not None
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
                    await conn.execute(SCHEMA)
            except psycopg.errors.DeadlockDetected:
                # The schema's DDL met another worker's transactions on the same tables: PostgreSQL rolled
                # this one back; trying again is what it asks for.
                await self.aclose()
                raise

        try:
            await retry_async(install, retry_on=psycopg.errors.DeadlockDetected, attempts=5, base_delay=0.1,
                              max_delay=0.4)
        except Exception as exc:
            await self.aclose()
            if not _is_connection_error(exc) and "psycopg" not in type(exc).__module__:
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
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, application_name="crawler",
            **connect_kwargs(self.heartbeat_timeout, self._connect_timeout))
        try:
            await bound_session(conn, self.heartbeat_timeout)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a half-dead connection must not hold the run
                await asyncio.wait_for(conn.close(), 2.0)

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run `fn` in one transaction; a lost server is retried with backoff until the stall limit.

        Shielded: a caller cancelled (a stop) leaves the transaction to finish or roll back on its own, never the
        connection half-way through a query for the next caller.
        """
        task = asyncio.ensure_future(self._run_now(fn))
        task.add_done_callback(_retrieved)  # a caller cancelled meanwhile never reads its error: no "never retrieved"
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
            if _is_connection_error(exc):
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

    async def _pause(self, exc: BaseException, down: float | None, delay: float, what: str = "lost") -> float:
        """`Outage.pause` (the step every retry here takes after a lost server)."""
        return await self._outage.pause(exc, down, delay, what)

    # --- jobs ---

    async def create_job(self, jid: str, command: str, options: dict[str, Any],
                         entries: Iterable[tuple[str, str, str | None, str | None]], *, output: str | None = None,
                         inherit: bool = True, heartbeat_timeout: float | None = None, bom: bool = False,
                         raw: bool = False) -> Created | None:
        """Create the job with its items (one transaction: a job is never seen half-read); None if it exists.

        Another job of the same command, options and `output` (host:path of OUT.csv) is the one an edited input
        supersedes: in the same transaction the new job continues it (`inherit`; False: --restart, it starts over)
        and it is deleted, so no worker spends on it any more.

        `entries` is read once per try (a lost connection runs the transaction again): a list or another
        re-iterable, never a one-shot iterator, which would give the retry only the entries after the cut."""
        if iter(entries) is entries:
            raise TypeError("create_job needs re-iterable entries (a retried transaction reads them again)")
        text = json.dumps(options, sort_keys=True)

        async def run(conn: psycopg.AsyncConnection[Any]) -> Created | None:
            cur = await conn.execute(
                "INSERT INTO crawler_jobs (id, command, options, heartbeat_timeout, bom, raw, output)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (jid, command, text, heartbeat_timeout, bom, raw, output))
            if cur.rowcount == 0:
                return None
            await conn.execute("CREATE TEMP TABLE crawler_incoming (pos SERIAL, key TEXT, raw TEXT, reason TEXT,"
                               " detail TEXT) ON COMMIT DROP")
            async with conn.cursor() as c, c.copy("COPY crawler_incoming (key, raw, reason, detail) FROM STDIN") as cp:
                for entry in entries:
                    await cp.write_row(entry)
            # Exact de-duplication of the input: the first occurrence of a key keeps its place.
            await conn.execute("CREATE TEMP TABLE crawler_wanted ON COMMIT DROP AS SELECT DISTINCT ON (key) pos, key,"
                               " raw, reason, detail FROM crawler_incoming ORDER BY key, pos")
            cur = await conn.execute("SELECT id FROM crawler_jobs WHERE output = %s AND command = %s AND options = %s"
                                     " AND id != %s ORDER BY created DESC, id LIMIT 1", (output, command, text, jid))
            found = await cur.fetchone()
            old = None if found is None else str(found[0])
            if old is not None and await _hold(conn, old):
                if inherit:
                    return await _continue_job(conn, old, jid)
                await conn.execute("DELETE FROM crawler_jobs WHERE id = %s", (old,))
            else:
                old = None
            await _add_items(conn, jid, 0)
            return Created(old)

        return await self._run(run)

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

    async def delete_job(self, jid: str) -> None:
        """Forget a job (`--restart`)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("DELETE FROM crawler_jobs WHERE id = %s", (jid,))

        await self._run(run)

    # --- items ---

    async def take(self, jid: str, seq: int, owner: str) -> Taken | None:
        """Hold a pending item from now on (its version moves on, so an earlier holder's commits fail)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> Taken | None:
            cur = await conn.execute(
                "UPDATE crawler_items SET version = nextval('crawler_version'), owner = %s WHERE job = %s AND seq = %s"
                " AND status = 'pending' RETURNING key, raw, cursor, rows, pages, version", (owner, jid, seq))
            row = await cur.fetchone()
            if row is None:
                return None
            cur = await conn.execute("SELECT comment_id, cursor, pages FROM crawler_walks WHERE job = %s AND seq = %s"
                                     " AND status = 'pending' ORDER BY comment_id", (jid, seq))
            walks = [(c, None if w is None else json.loads(w), p) for c, w, p in await cur.fetchall()]
            return Taken(seq, row[0], row[1], None if row[2] is None else json.loads(row[2]), row[3], row[4], row[5],
                         walks)

        return await self._run(run)

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
            if attempts > 1 and pages:
                # The server went away during an earlier try, perhaps during COMMIT: if it held, the tokens
                # it wrote say so, and nothing is written twice (the versions would refuse it anyway).
                cur = await conn.execute("SELECT seq, token FROM crawler_items WHERE job = %s AND seq = ANY(%s)",
                                         (jid, [p.seq for p in pages]))
                tokens = dict(await cur.fetchall())
                if any(tokens.get(p.seq) == p.token for p in pages):
                    cur = await conn.execute("SELECT seq, version FROM crawler_items WHERE job = %s AND seq = ANY(%s)"
                                             " AND token = ANY(%s)", (jid, [p.seq for p in pages],
                                                                      [p.token for p in pages]))
                    versions = dict(await cur.fetchall())
                    for p in pages:
                        p.committed = tokens.get(p.seq) == p.token
                        if p.committed:
                            p.new_version = int(versions[p.seq])
                    return
            rows_total = 0
            for page in pages:
                page.committed, page.inserted = False, 0
                cur = await conn.execute("SELECT version FROM crawler_items WHERE job = %s AND seq = %s FOR UPDATE",
                                         (jid, page.seq))
                found = await cur.fetchone()
                if found is None or found[0] != page.version:
                    continue
                if page.rows:
                    async with conn.cursor() as c:
                        await c.executemany(
                            "INSERT INTO crawler_rows (job, seq, rid, cells) VALUES (%s, %s, %s, %s)"
                            " ON CONFLICT DO NOTHING", [(jid, page.seq, rid, cells) for rid, cells in page.rows])
                        page.inserted = max(c.rowcount, 0)
                rows_total += page.inserted
                walk_rows = page.inserted if not page.update.rows else 0
                for w in page.walks:
                    await conn.execute(
                        "INSERT INTO crawler_walks (job, seq, comment_id, status, cursor, rows, pages, reason,"
                        " endpoint, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (job, seq, comment_id)"
                        " DO UPDATE SET status = excluded.status, cursor = CASE WHEN excluded.status = 'failed' THEN"
                        " crawler_walks.cursor ELSE excluded.cursor END, rows = crawler_walks.rows + excluded.rows,"
                        " pages = crawler_walks.pages + excluded.pages, reason = excluded.reason,"
                        " endpoint = excluded.endpoint, detail = excluded.detail",
                        (jid, w.seq, w.comment_id, w.status, None if w.cursor is None else json.dumps(w.cursor),
                         walk_rows if w is page.walks[0] else 0, w.pages, w.reason, w.endpoint, w.detail))
                u = page.update
                cur = await conn.execute(
                    "UPDATE crawler_items SET status = %s, cursor = CASE WHEN %s = 'failed' THEN cursor ELSE %s END,"
                    " rows = rows + %s, pages = pages + %s, reason = %s, endpoint = %s, detail = %s,"
                    " version = nextval('crawler_version'), token = %s WHERE job = %s AND seq = %s RETURNING version",
                    (u.status, u.status, None if u.cursor is None else json.dumps(u.cursor),
                     page.inserted if u.rows else 0, u.pages, u.reason, u.endpoint, u.detail, page.token, jid,
                     page.seq))
                bumped = await cur.fetchone()
                assert bumped is not None
                page.new_version = int(bumped[0])
                page.committed = True
            # Only while the job exists: a --restart deletes it before creating it anew (its pages are refused above).
            await conn.execute(
                "INSERT INTO crawler_sessions AS s (job, session, requests_sent, credits_billed, rows)"
                " SELECT %s, %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM crawler_jobs WHERE id = %s)"
                " ON CONFLICT (job, session) DO UPDATE SET requests_sent ="
                " GREATEST(s.requests_sent, excluded.requests_sent), credits_billed = GREATEST(s.credits_billed,"
                " excluded.credits_billed), rows = s.rows + excluded.rows",
                (jid, session, sent, billed, rows_total, jid))

        await self._run(run)

    async def grant(self, jid: str, session: str, have: int, want: int) -> int:
        """Reserve up to `want` more requests of the job's budget for a session already granted `have`, before
        sending them; how many were granted. Idempotent: run again after a lost COMMIT reply, it finds the
        session's grant already above `have` and hands that back instead of reserving twice. The job gone (deleted by
        --restart): LeaseLost."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            # The job row is the budget's lock (a short transaction; a frozen holder is ended by the server).
            cur = await conn.execute("SELECT max_credits, reserved FROM crawler_jobs WHERE id = %s FOR UPDATE", (jid,))
            row = await cur.fetchone()
            if row is None:  # deleted (--restart): the item this request is for is no longer this worker's
                raise LeaseLost()
            cur = await conn.execute("SELECT reserved FROM crawler_sessions WHERE job = %s AND session = %s",
                                     (jid, session))
            mine = await cur.fetchone()
            if mine is not None and int(mine[0]) > have:
                return int(mine[0]) - have
            testing.reached("granting")
            n = want
            if row[0] is not None:
                cur = await conn.execute("SELECT COALESCE(sum(reserved), 0) FROM crawler_sessions WHERE job = %s",
                                         (jid,))
                total = await cur.fetchone()
                assert total is not None
                n = max(0, min(want, int(row[0]) - int(row[1]) - int(total[0])))
            if n:
                await conn.execute(
                    "INSERT INTO crawler_sessions (job, session, reserved) VALUES (%s, %s, %s)"
                    " ON CONFLICT (job, session) DO UPDATE SET reserved = excluded.reserved", (jid, session, have + n))
            return n

        return await self._run(run)

    async def give_back(self, jid: str, session: str, used: int) -> None:
        """A session ends cleanly: of the requests it was granted, only the `used` ones stay spent (absolute, so
        run twice it gives back nothing more)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("UPDATE crawler_sessions SET reserved = LEAST(reserved, %s) WHERE job = %s"
                               " AND session = %s", (used, jid, session))

        await self._run(run)

    async def progress(self, jid: str) -> Progress:
        """Items by status."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> Progress:
            cur = await conn.execute("SELECT status, count(*) FROM crawler_items WHERE job = %s GROUP BY status",
                                     (jid,))
            counts = {s: int(n) for s, n in await cur.fetchall()}
            return Progress(counts.get("pending", 0), counts.get("done", 0), counts.get("failed", 0))

        return await self._run(run)

    async def held_by_live(self, jid: str, heartbeat_timeout: float | None = None) -> int:
        """Pending items held by a worker that is alive (heartbeat within the job's jobs.heartbeat_timeout)."""
        timeout = heartbeat_timeout or self.heartbeat_timeout

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "SELECT count(*) FROM crawler_items i JOIN crawler_workers w ON w.id = i.owner WHERE i.job = %s"
                " AND i.status = 'pending' AND w.seen > now() - make_interval(secs => %s)",
                (jid, timeout))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def orphans(self, jid: str, limit: int = 5000, heartbeat_timeout: float | None = None) -> list[int]:
        """Pending items no live worker holds (never taken, or their holder is gone), in input order."""
        timeout = heartbeat_timeout or self.heartbeat_timeout

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[int]:
            cur = await conn.execute(
                "SELECT i.seq FROM crawler_items i LEFT JOIN crawler_workers w ON w.id = i.owner"
                " AND w.seen > now() - make_interval(secs => %s) WHERE i.job = %s AND i.status = 'pending'"
                " AND w.id IS NULL ORDER BY i.seq LIMIT %s", (timeout, jid, limit))
            return [int(r[0]) for r in await cur.fetchall()]

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
        import psycopg

        given = 0
        delay = 0.1
        down: float | None = None
        while True:
            try:
                # A separate connection: the export streams through a server-side cursor while nothing else runs.
                conn = await psycopg.AsyncConnection.connect(
                    self.url, application_name="crawler-export",
                    **connect_kwargs(self.heartbeat_timeout, self._connect_timeout))
                try:
                    async with conn.cursor(name="crawler_export") as cur:
                        # (seq, n) is unique: the order is the same every time, so OFFSET skips exactly those given.
                        await cur.execute("SELECT cells FROM crawler_rows WHERE job = %s ORDER BY seq, n OFFSET %s",
                                          (jid, given))
                        while True:
                            chunk = await cur.fetchmany(batch)
                            down, delay = None, 0.1
                            if not chunk:
                                return
                            for (cells,) in chunk:
                                yield list(json.loads(cells))
                                given += 1
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2.0)
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                down = await self._pause(exc, down, delay, "lost during the export")
                delay = min(delay * 2, 2.0)

    # --- workers ---

    async def register(self, worker: WorkerInfo) -> list[WorkerInfo]:
        """Record a worker; the live workers of the same key on other hosts, for the ledger check.

        One registration of a key at a time (a lock held to the commit): each sees every worker registered before
        it, so two hosts starting together never both pass the check.
        """

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[WorkerInfo]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))", (_REGISTER_LOCK, worker.key_hash))
            await conn.execute(
                "INSERT INTO crawler_workers (id, host, pid, key_hash, ledger, job) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET job = excluded.job, seen = now()",
                (worker.id, worker.host, worker.pid, worker.key_hash, worker.ledger, worker.job))
            cur = await conn.execute(
                "SELECT id, host, pid, key_hash, ledger, job FROM crawler_workers WHERE key_hash = %s AND host != %s"
                " AND seen > now() - make_interval(secs => %s)", (worker.key_hash, worker.host, self.heartbeat_timeout))
            others = [WorkerInfo(r[0], r[1], r[2], r[3], r[4], r[5], live=True) for r in await cur.fetchall()]
            testing.reached("registering")
            return others

        return await self._run(run)

    async def beat(self, worker_id: str, job: str | None) -> None:
        """This worker is alive (the database's clock)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("UPDATE crawler_workers SET seen = now(), job = %s WHERE id = %s", (job, worker_id))

        await self._run(run)

    async def leave(self, worker_id: str) -> None:
        """A worker ends cleanly: the items it held are free at once (no heartbeat timeout to wait for)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("UPDATE crawler_items SET owner = NULL WHERE owner = %s", (worker_id,))
            await conn.execute("UPDATE crawler_workers SET seen = now() - interval '1 day' WHERE id = %s",
                               (worker_id,))

        await self._run(run)

    async def workers(self, jid: str | None = None, heartbeat_timeout: float | None = None) -> list[WorkerInfo]:
        """Workers seen (of one job, or all), most recent first; live = a heartbeat within ``heartbeat_timeout``
        (the job's; default this store's). A worker of a job is one that works it now or had a session on it
        (`crawler_workers.job` is only the job it works now: NULL once a service idles)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[WorkerInfo]:
            where = ("WHERE w.job = %s OR EXISTS (SELECT 1 FROM crawler_sessions s WHERE s.job = %s"
                     " AND left(s.session, length(w.id) + 1) = w.id || ':')") if jid else ""
            cur = await conn.execute(
                "SELECT id, host, pid, key_hash, ledger, job, seen > now() - make_interval(secs => %s)"
                f" FROM crawler_workers w {where} ORDER BY seen DESC",
                (heartbeat_timeout or self.heartbeat_timeout, *((jid, jid) if jid else ())))
            return [WorkerInfo(*r) for r in await cur.fetchall()]

        return await self._run(run)
