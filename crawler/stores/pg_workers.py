"""The PostgreSQL job store's registry of workers: who works which job, who is alive (a heartbeat within the job's
``jobs.heartbeat_timeout``, by the database's clock), and the items no live worker holds; the rows of workers long
gone, pruned by the store's housekeeping (`prune`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from crawler import testing
from crawler.stores import pg_schema
from crawler.stores.model import WorkerInfo

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

# A worker's row is kept this long after its process ended cleanly (`crawler jobs` lists it meanwhile)...
ENDED_KEPT = 86400.0
# ...and this long after its last heartbeat when it never said so (killed, host lost). Generous: a live process's
# heartbeat may be over a day old (`leave` dates it a day back, and a starter then waits for other workers and
# exports without beating), never a week.
SILENT_KEPT = 7 * 86400.0


class WorkerRegistry:
    """The workers' calls of `PgJobStore` (which supplies `_run`, one transaction retried on a lost server)."""

    heartbeat_timeout: float

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def register(self, worker: WorkerInfo) -> list[WorkerInfo]:
        """Record a worker; the live workers of the same key on other hosts, for the ledger check.

        One registration of a key at a time (a lock held to the commit): each sees every worker registered before
        it, so two hosts starting together never both pass the check.
        """

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[WorkerInfo]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))",
                               (pg_schema.REGISTER_LOCK, worker.key_hash))
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
        """A worker's session ends cleanly: the items it held are free at once (no heartbeat timeout to wait for).
        Its heartbeat is dated a day back: its sessions count as finished (`pg_items.prune_sessions`)."""
        await self._leave(worker_id, ended=False)

    async def retire(self, worker_id: str) -> None:
        """A worker's process ends cleanly: it leaves, and its row is pruned a day later (`prune`)."""
        await self._leave(worker_id, ended=True)

    async def _leave(self, worker_id: str, *, ended: bool) -> None:
        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("UPDATE crawler_items SET owner = NULL WHERE owner = %s", (worker_id,))
            await conn.execute("UPDATE crawler_workers SET seen = now() - interval '1 day',"
                               " ended = CASE WHEN %s THEN now() ELSE ended END WHERE id = %s", (ended, worker_id))

        await self._run(run)

    async def workers(self, jid: str | None = None, heartbeat_timeout: float | None = None) -> list[WorkerInfo]:
        """Workers seen (of one job, or all), most recent first; live = a heartbeat within ``heartbeat_timeout``
        (the job's; default this store's). A worker of a job is one that works it now or had a session on it
        (`crawler_workers.job` is only the job it works now: NULL once a service idles), or whose sessions of the
        finished job were pruned (`crawler_jobs.workers`); while its row lasts (`prune`: a day after it ended)."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[WorkerInfo]:
            where = ("WHERE w.job = %s OR EXISTS (SELECT 1 FROM crawler_sessions s WHERE s.job = %s"
                     " AND left(s.session, length(w.id) + 1) = w.id || ':')"
                     " OR EXISTS (SELECT 1 FROM crawler_jobs j WHERE j.id = %s AND w.id = ANY(j.workers))"
                     ) if jid else ""
            cur = await conn.execute(
                "SELECT id, host, pid, key_hash, ledger, job, seen > now() - make_interval(secs => %s)"
                f" FROM crawler_workers w {where} ORDER BY seen DESC",
                (heartbeat_timeout or self.heartbeat_timeout, *((jid, jid, jid) if jid else ())))
            return [WorkerInfo(*r) for r in await cur.fetchall()]

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


async def prune(conn: psycopg.AsyncConnection[Any], ended_kept: float = ENDED_KEPT,
                silent_kept: float = SILENT_KEPT) -> int:
    """Delete the rows of workers that ended cleanly over ``ended_kept`` seconds ago or were last seen over
    ``silent_kept`` seconds ago (the database's clock); how many. Part of `PgJobStore.housekeep`'s transaction, after
    the sessions are folded (their worker ids go into the job's `workers`, which needs no row here)."""
    cur = await conn.execute(
        "DELETE FROM crawler_workers WHERE ended < now() - make_interval(secs => %s)"
        " OR seen < now() - make_interval(secs => %s)", (ended_kept, silent_kept))
    return max(cur.rowcount, 0)
