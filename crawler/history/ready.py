"""The history's maintained data: per user, what the overview and `history top --days 1|7|30` read without walking
every user's snapshots (columns of `users`, kept up to date by every write of snapshots, in its transaction).

Per user: ``s_first``/``s_last`` (first and last snapshot day), the last snapshot's counts, and for each window N of
``KEPT`` the gain over the N days ending at the user's own last snapshot: ``dN`` the first snapshot day in
[s_last - N, s_last) (None: a single snapshot there, no gain), ``fN`` its followers and ``gN`` = last - ``fN``.
Those are window-independent: a user whose last snapshot is the store's newest day E has exactly the gain of
window N. A user whose last snapshot is older is a straggler: one of the day before (not reached yet tonight, most
users while the night's ingest runs) has as gain over the N days ending at E their own gain over N - 1 days
(``LATE``: the window [E - N, E] holds their snapshots of [s_last - (N - 1), s_last]), kept too; older stragglers
(who missed nights) are looked up per user (queries.py). `crawler history rebuild` recomputes all of it from the
snapshots.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

VERSION = 5  # the schema whose kept data the reads here expect (a store not migrated yet is read as before)
WINDOWS = (1, 7, 30)  # the gains kept ready (`top --days N`, the overview's columns)
LATE = {n: n - 1 for n in WINDOWS if n > 1}  # window N's gain of the day-before stragglers: their own over N - 1
KEPT = tuple(sorted({*WINDOWS, *LATE.values()}))  # every window a user's gain is kept for
COUNTS = ("followers", "following", "videos", "hearts")
COLUMNS = ("s_first", "s_last", *COUNTS, *(f"{c}{n}" for n in KEPT for c in "dfg"))
SQLITE_ONLY = "-- sqlite only\n"  # a migration statement a PostgreSQL store skips


def _add_columns(windows: Iterable[int], first: bool) -> list[str]:
    types = {f"{c}{n}": "{date}" if c == "d" else "{int}" for n in windows for c in "dfg"}
    if first:
        types = {"s_first": "{date}", "s_last": "{date}"} | {c: "{int}" for c in COUNTS} | types
    return [f"ALTER TABLE users ADD COLUMN {{if_missing}}{c} {t}" for c, t in types.items()]


def migration() -> list[str]:
    """Version 4's statements ({date}/{int}/{nulls_last} filled per database); version 5's rebuild fills the
    columns."""
    out = _add_columns(WINDOWS, True)
    # The top and the overview's sorted pages: the users of a last day by gain (NULL last), ties by handle (in code
    # point order, as the page sorts); by followers; by handle.
    for n in WINDOWS:
        out += [f"CREATE INDEX IF NOT EXISTS users_g{n} ON users (s_last, g{n} DESC{{nulls_last}}, handle{{c}})",
                f"CREATE INDEX IF NOT EXISTS users_g{n}_up ON users (s_last, g{n}, handle{{c}})"]
    out += ["CREATE INDEX IF NOT EXISTS users_followers ON users (followers, handle{c})",
            "CREATE INDEX IF NOT EXISTS users_followers_down ON users (followers DESC{nulls_last}, handle{c})",
            "CREATE INDEX IF NOT EXISTS users_handle ON users (handle{c})"]
    return out


def late_migration() -> list[str]:
    """Version 5's columns: the gains of the day-before stragglers (``LATE``), and one index that holds all a page
    or `top` reads of them: the day before's users are read from it alone, in one range, then sorted (without it,
    each is a lookup in the table: 1 s at 300k users)."""
    late = sorted(set(KEPT) - set(WINDOWS))
    return [*_add_columns(late, False), "CREATE INDEX IF NOT EXISTS users_late ON users (s_last, "
            + ", ".join(f"{c}{n}" for n in late for c in "dfg") + ", followers, handle, user_id)"]


def run_migration(db: Any, version: int, statements: Sequence[str], types: dict[str, str]) -> None:
    """Run a migration's statements (inside the store's migration transaction; a PostgreSQL store skips those
    marked SQLITE_ONLY); version 5, the last to add kept columns, then fills them all. A column the users table
    has already (a store whose schema_version was set back) is not added again: SQLite has no ADD COLUMN IF NOT
    EXISTS."""
    types = types | {"nulls_last": " NULLS LAST" if db.postgres else "",  # SQLite: NULLs sort last descending
                     "if_missing": "IF NOT EXISTS " if db.postgres else "",
                     "c": ' COLLATE "C"' if db.postgres else ""}  # code point order (SQLite's BINARY), as Python
    have = set() if db.postgres else {str(r[1]) for r in db._rows("PRAGMA table_info(users)")}
    for statement in statements:
        if db.postgres and statement.startswith(SQLITE_ONLY):
            continue
        if statement.startswith("ALTER TABLE users ADD COLUMN") and statement.split()[-2].removeprefix(
                "{if_missing}") in have:
            continue
        db._exec(statement.format(**types))
    if version == 5:
        rebuild(db)


def rebuild_store(db: Any) -> int:
    """`crawler history rebuild`: recompute every user's maintained data from the snapshots, in one transaction;
    the number of users."""
    with db.transaction():
        return rebuild(db)


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, dt.date) else str(value)


def stats(rows: Sequence[tuple[Any, ...]], first: Any) -> tuple[Any, ...]:
    """The maintained values (COLUMNS order) of a user from their first snapshot day and their snapshots of the
    last 30 days before the newest (or at least the first of each window and the newest), oldest first: (day,
    followers, following, videos, hearts)."""
    if not rows:
        return (None,) * len(COLUMNS)
    last = rows[-1]
    end = dt.date.fromisoformat(_iso(last[0]))
    out: list[Any] = [first, last[0], *last[1:5]]
    for n in KEPT:
        start = (end - dt.timedelta(days=n)).isoformat()
        inside = [r for r in rows[:-1] if _iso(r[0]) >= start]
        if not inside:
            out += [None, None, None]
            continue
        f = inside[0][1]
        out += [inside[0][0], f, None if f is None or last[1] is None else last[1] - f]
    return tuple(out)


def _update_sql() -> str:
    return f"UPDATE users SET {', '.join(f'{c} = ?' for c in COLUMNS)} WHERE user_id = ?"


def refresh(db: Any, user_ids: Iterable[str], added: str | None = None) -> None:
    """Recompute the maintained values of ``user_ids`` from their snapshots (inside the caller's transaction):
    a few indexed lookups per user, whatever the size of the history: the first and last day, the last snapshot,
    and the first snapshot of each window (a heap table's rows of one user lie on as many pages as days: only
    those rows are read, not the 30 days between). ``added``: the day of a snapshot just written (none deleted),
    which moves the kept first and last day at most (the first day's page of a long history is not read)."""
    for user_id in sorted(set(user_ids)):  # key order: no deadlock between two runs' commits
        kept = db._rows("SELECT s_first, s_last FROM users WHERE user_id = ?", (user_id,)) if added else []
        if kept and kept[0][0] is not None and kept[0][1] is not None and added is not None:
            first, last = min(_iso(kept[0][0]), added), max(_iso(kept[0][1]), added)
        else:
            first, last = _ends(db, user_id)
        rows = _window_rows(db, user_id, last)
        if last is not None and not any(_iso(r[0]) == _iso(last) for r in rows):  # kept days gone stale (a bulk
            first, last = _ends(db, user_id)  # load not rebuilt): looked up after all
            rows = _window_rows(db, user_id, last)
        db._exec(_update_sql(), (*stats(sorted(rows, key=lambda r: _iso(r[0])), first), user_id))


def _ends(db: Any, user_id: str) -> tuple[Any, Any]:
    """The user's first and last snapshot day: separate index probes (on SQLite, MIN and MAX in one query read all
    the user's days)."""
    first, last = db._rows("SELECT (SELECT MIN(day) FROM snapshots WHERE user_id = ?),"
                           " (SELECT MAX(day) FROM snapshots WHERE user_id = ?)", (user_id, user_id))[0]
    return first, last


def _window_rows(db: Any, user_id: str, last: Any) -> set[tuple[Any, ...]]:
    """The snapshot of ``last`` and the first of each kept window before it, in one round trip."""
    cols = ", ".join(COUNTS)
    rows: set[tuple[Any, ...]] = set()
    if last is not None:
        end = dt.date.fromisoformat(_iso(last))
        firsts = [f" UNION ALL SELECT * FROM (SELECT day, {cols} FROM snapshots WHERE user_id = ? AND day >= ?"
                  " AND day < ? ORDER BY day LIMIT 1) AS w" for _ in KEPT]
        params: list[Any] = [user_id, last]
        for n in KEPT:
            params += [user_id, (end - dt.timedelta(days=n)).isoformat(), last]
        rows.update(db._rows(f"SELECT day, {cols} FROM snapshots WHERE user_id = ? AND day = ?{''.join(firsts)}",
                             params))
    return rows


def rebuild(db: Any) -> int:
    """Recompute every user's maintained values from the snapshots (inside the caller's transaction, one pass over
    the snapshots in key order); the number of users."""
    db._exec(f"UPDATE users SET {', '.join(f'{c} = NULL' for c in COLUMNS)}")
    sql = db._sql(_update_sql())
    cur = db._db.cursor(name="rebuild") if db.postgres else db._db.cursor()  # PostgreSQL: streamed from the server
    cur.execute(f"SELECT user_id, day, {', '.join(COUNTS)} FROM snapshots ORDER BY user_id, day")
    batch: list[tuple[Any, ...]] = []
    user: Any = None
    first: Any = None
    window: list[tuple[Any, ...]] = []
    users = 0
    while chunk := cur.fetchmany(5000):
        for row in chunk:
            if row[0] != user:
                if user is not None:
                    batch.append((*stats(window, first), user))
                user, first, window = row[0], row[1], []
            window.append(row[1:])
            cutoff = (dt.date.fromisoformat(_iso(row[1])) - dt.timedelta(days=max(KEPT))).isoformat()
            while _iso(window[0][0]) < cutoff:
                window.pop(0)
        if len(batch) >= 1000:
            users += len(batch)
            _write(db, sql, batch)
            batch = []
    cur.close()
    if user is not None:
        batch.append((*stats(window, first), user))
    users += len(batch)
    _write(db, sql, batch)
    return users


def _write(db: Any, sql: str, batch: list[tuple[Any, ...]]) -> None:
    if not batch:
        return
    if db.postgres:
        with db._db.cursor() as cur:
            cur.executemany(sql, batch)
    else:
        db._db.executemany(sql, batch)
