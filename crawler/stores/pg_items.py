"""The SQL of the PostgreSQL job store's writes on one connection, inside the transaction `PgJobStore` runs: a job's
creation (or continuation of the job an edited input supersedes), an item's take, a group of pages' commit, a
budget grant. The store runs a transaction again after a lost connection or a rollback: so may these functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from crawler import testing
from crawler.stores.model import Created, LeaseLost, PageCommit, Taken

if TYPE_CHECKING:
    import psycopg

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


# Asked before an edited input continues a job: (that job's input, (valid items of this input it has, valid items
# in this input)); it raises to refuse (the transaction rolls back: nothing created, that job untouched).
InputCheck = Callable[[str, tuple[int, int]], object]


async def create(conn: psycopg.AsyncConnection[Any], jid: str, command: str, text: str,
                 entries: Iterable[tuple[str, str, str | None, str | None]], *, output: str | None, inherit: bool,
                 heartbeat_timeout: float | None, bom: bool, raw: bool, input_name: str | None = None,
                 check: InputCheck | None = None) -> Created | None:
    """`PgJobStore.create_job`'s transaction (`text`: the options' JSON); None if the job exists."""
    cur = await conn.execute(
        "INSERT INTO crawler_jobs (id, command, options, heartbeat_timeout, bom, raw, output, input)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
        (jid, command, text, heartbeat_timeout, bom, raw, output, input_name))
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
    if old is not None and inherit and check is not None:
        await _check_input(conn, old, check)
    if old is not None and await _hold(conn, old):
        if inherit:
            return await _continue_job(conn, old, jid)
        await conn.execute("DELETE FROM crawler_jobs WHERE id = %s", (old,))
    else:
        old = None
    await _add_items(conn, jid, 0)
    return Created(old)


async def _check_input(conn: psycopg.AsyncConnection[Any], old: str, check: InputCheck) -> None:
    """Ask `check` about this input (`crawler_wanted`) against job `old`'s, if that job recorded its input."""
    cur = await conn.execute("SELECT input FROM crawler_jobs WHERE id = %s", (old,))
    row = await cur.fetchone()
    if row is None or row[0] is None:
        return
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM crawler_items i WHERE i.job = %s AND i.key = w.key)),"
        " count(*) FROM crawler_wanted w WHERE reason IS NULL", (old,))
    counts = await cur.fetchone()
    assert counts is not None
    check(str(row[0]), (int(counts[0]), int(counts[1])))


async def take(conn: psycopg.AsyncConnection[Any], jid: str, seq: int, owner: str) -> Taken | None:
    """`PgJobStore.take`'s transaction: the item's version moves on (an earlier holder's commits fail)."""
    cur = await conn.execute(
        "UPDATE crawler_items SET version = nextval('crawler_version'), owner = %s WHERE job = %s AND seq = %s"
        " AND status = 'pending' RETURNING key, raw, cursor, rows, pages, version", (owner, jid, seq))
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute("SELECT comment_id, cursor, pages FROM crawler_walks WHERE job = %s AND seq = %s"
                             " AND status = 'pending' ORDER BY comment_id", (jid, seq))
    walks = [(c, None if w is None else json.loads(w), p) for c, w, p in await cur.fetchall()]
    return Taken(seq, row[0], row[1], None if row[2] is None else json.loads(row[2]), row[3], row[4], row[5], walks)


async def commit(conn: psycopg.AsyncConnection[Any], jid: str, session: str, pages: Sequence[PageCommit], sent: int,
                 billed: int, *, again: bool) -> None:
    """`PgJobStore.commit`'s transaction; ``again``: an earlier try of it may have held (its reply was lost)."""
    if again and pages and await _held_before(conn, jid, pages):
        return
    rows_total = 0
    for page in pages:
        rows_total += await _commit_page(conn, jid, page)
    # Only while the job exists: a --restart deletes it before creating it anew (its pages are refused above).
    await conn.execute(
        "INSERT INTO crawler_sessions AS s (job, session, requests_sent, credits_billed, rows)"
        " SELECT %s, %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM crawler_jobs WHERE id = %s)"
        " ON CONFLICT (job, session) DO UPDATE SET requests_sent ="
        " GREATEST(s.requests_sent, excluded.requests_sent), credits_billed = GREATEST(s.credits_billed,"
        " excluded.credits_billed), rows = s.rows + excluded.rows",
        (jid, session, sent, billed, rows_total, jid))


async def _held_before(conn: psycopg.AsyncConnection[Any], jid: str, pages: Sequence[PageCommit]) -> bool:
    """The server went away during an earlier try, perhaps during COMMIT: if it held, the tokens it wrote say so
    (the pages are marked as then committed), and nothing is written twice (the versions would refuse it anyway)."""
    cur = await conn.execute("SELECT seq, token FROM crawler_items WHERE job = %s AND seq = ANY(%s)",
                             (jid, [p.seq for p in pages]))
    tokens = dict(await cur.fetchall())
    if not any(tokens.get(p.seq) == p.token for p in pages):
        return False
    cur = await conn.execute("SELECT seq, version FROM crawler_items WHERE job = %s AND seq = ANY(%s)"
                             " AND token = ANY(%s)", (jid, [p.seq for p in pages], [p.token for p in pages]))
    versions = dict(await cur.fetchall())
    for p in pages:
        p.committed = tokens.get(p.seq) == p.token
        if p.committed:
            p.new_version = int(versions[p.seq])
    return True


async def _commit_page(conn: psycopg.AsyncConnection[Any], jid: str, page: PageCommit) -> int:
    """One page, only if its item is still at the version held: its rows, reply walks and the item's new state;
    how many of its rows were new to the item."""
    page.committed, page.inserted = False, 0
    cur = await conn.execute("SELECT version FROM crawler_items WHERE job = %s AND seq = %s FOR UPDATE",
                             (jid, page.seq))
    found = await cur.fetchone()
    if found is None or found[0] != page.version:
        return 0
    if page.rows:
        async with conn.cursor() as c:
            await c.executemany("INSERT INTO crawler_rows (job, seq, rid, cells) VALUES (%s, %s, %s, %s)"
                                " ON CONFLICT DO NOTHING", [(jid, page.seq, rid, cells) for rid, cells in page.rows])
            page.inserted = max(c.rowcount, 0)
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
         page.inserted if u.rows else 0, u.pages, u.reason, u.endpoint, u.detail, page.token, jid, page.seq))
    bumped = await cur.fetchone()
    assert bumped is not None
    page.new_version = int(bumped[0])
    page.committed = True
    return page.inserted


async def grant(conn: psycopg.AsyncConnection[Any], jid: str, session: str, have: int, want: int) -> int:
    """`PgJobStore.grant`'s transaction: run again after a lost COMMIT reply, it finds the session's grant already
    above `have` and hands that back instead of reserving twice."""
    # The job row is the budget's lock (a short transaction; a frozen holder is ended by the server).
    cur = await conn.execute("SELECT max_credits, reserved FROM crawler_jobs WHERE id = %s FOR UPDATE", (jid,))
    row = await cur.fetchone()
    if row is None:  # deleted (--restart): the item this request is for is no longer this worker's
        raise LeaseLost()
    cur = await conn.execute("SELECT reserved FROM crawler_sessions WHERE job = %s AND session = %s", (jid, session))
    mine = await cur.fetchone()
    if mine is not None and int(mine[0]) > have:
        return int(mine[0]) - have
    testing.reached("granting")
    n = want
    if row[0] is not None:
        cur = await conn.execute("SELECT COALESCE(sum(reserved), 0) FROM crawler_sessions WHERE job = %s", (jid,))
        total = await cur.fetchone()
        assert total is not None
        n = max(0, min(want, int(row[0]) - int(row[1]) - int(total[0])))
    if n:
        await conn.execute("INSERT INTO crawler_sessions (job, session, reserved) VALUES (%s, %s, %s)"
                           " ON CONFLICT (job, session) DO UPDATE SET reserved = excluded.reserved",
                           (jid, session, have + n))
    return n


# A session's worker: the session id is "worker id:6 hex digits" (`JobWorker.session`).
_WORKER = "left(s.session, length(s.session) - 7)"


async def prune_sessions(conn: psycopg.AsyncConnection[Any], quiet_for: float = 86400.0) -> int:
    """Fold the sessions of finished (done) jobs into their job's row and delete them; the number deleted.

    Only sessions whose worker is gone: it left (`leave` dates its last beat a day back) or has not been seen for
    `quiet_for` seconds. A worker still around may commit its session's counters again (absolute values), which
    would then count twice. Sums are linear, so every total `_jobs` shows stays what it was; the workers go into
    the job's `workers` so `crawler jobs` still lists them.
    """
    cur = await conn.execute(
        "WITH gone AS (DELETE FROM crawler_sessions s USING crawler_jobs j WHERE s.job = j.id AND j.status = 'done'"
        " AND NOT EXISTS (SELECT 1 FROM crawler_workers w WHERE left(s.session, length(w.id) + 1) = w.id || ':'"
        " AND w.seen > now() - make_interval(secs => %s))"
        f" RETURNING s.job, {_WORKER} AS worker, s.reserved, s.requests_sent, s.credits_billed, s.rows),"
        " sums AS (SELECT job, sum(reserved) AS reserved, sum(requests_sent) AS sent, sum(credits_billed) AS billed,"
        " sum(rows) AS rows, array_agg(DISTINCT worker) AS workers, count(*) AS n FROM gone GROUP BY job)"
        " UPDATE crawler_jobs j SET reserved = j.reserved + sums.reserved, requests_sent = j.requests_sent + sums.sent,"
        " credits_billed = j.credits_billed + sums.billed, rows = j.rows + sums.rows,"
        " workers = ARRAY(SELECT DISTINCT unnest(j.workers || sums.workers)) FROM sums WHERE j.id = sums.job"
        " RETURNING sums.n", (quiet_for,))
    return sum(int(r[0]) for r in await cur.fetchall())
