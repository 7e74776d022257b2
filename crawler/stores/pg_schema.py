"""The PostgreSQL job store's tables (`jobs.url`), and their installation: once per schema, any worker, any time."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from crawler.retry import retry_async

if TYPE_CHECKING:
    import psycopg

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
-- The starter's input ("-" for stdin, else a file's absolute path on that host; NULL for a keyword): another input
-- for the same output sharing under half its items is refused (`prepare.another_input`).
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS input TEXT;
-- The workers whose sessions of a finished job were folded into its counters (`pg_items.prune_sessions`).
ALTER TABLE crawler_jobs ADD COLUMN IF NOT EXISTS workers TEXT[] NOT NULL DEFAULT '{}';
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
-- When the worker's process ended cleanly (`WorkerRegistry.retire`); its row is pruned a day later.
ALTER TABLE crawler_workers ADD COLUMN IF NOT EXISTS ended TIMESTAMPTZ;
CREATE TABLE IF NOT EXISTS crawler_schema (fingerprint TEXT NOT NULL);
"""
# The schema a store holds: checked before any DDL, so a worker joining a busy job takes no table lock at all
# (ALTER TABLE takes an ACCESS EXCLUSIVE lock even when the column exists, and deadlocks with running commits).
FINGERPRINT = hashlib.sha256(SCHEMA.encode()).hexdigest()[:16]

# One schema install at a time (the advisory lock's key is arbitrary but fixed).
INSTALL_LOCK = 0x63726177
# With a hash of the key's ledger name: one worker registration of a key at a time.
REGISTER_LOCK = 0x72656769


async def install(conn: psycopg.AsyncConnection[Any], tries: int = 5) -> None:
    """Create the tables (and add the columns added since) under the install lock, on an autocommit connection.
    The DDL may meet another worker's transactions on the same tables: PostgreSQL then rolls it back (a deadlock),
    and trying again is what it asks for, up to ``tries`` times."""
    import psycopg

    async def once() -> None:
        async with conn.transaction():
            if await _current(conn):
                return
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
            await conn.execute(SCHEMA)
            # Every version's fingerprint is kept (the schema only ever adds): hosts of two versions on one
            # database (a rolling upgrade) each find theirs, rather than taking the table locks again at each open.
            await conn.execute("INSERT INTO crawler_schema (fingerprint) SELECT %s WHERE NOT EXISTS"
                               " (SELECT 1 FROM crawler_schema WHERE fingerprint = %s)", (FINGERPRINT, FINGERPRINT))

    # SQLSTATE class 40 (`postgres.rolled_back`): the transaction was rolled back for another's sake.
    await retry_async(once, retry_on=psycopg.errors.TransactionRollback, attempts=tries, base_delay=0.1, max_delay=0.4)


async def _current(conn: psycopg.AsyncConnection[Any]) -> bool:
    """The store holds this version's schema already (read with no lock stronger than a plain SELECT's)."""
    cur = await conn.execute("SELECT to_regclass('crawler_schema') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return False
    cur = await conn.execute("SELECT 1 FROM crawler_schema WHERE fingerprint = %s", (FINGERPRINT,))
    return await cur.fetchone() is not None
