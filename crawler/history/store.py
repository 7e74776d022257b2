"""The writing history store: migrations, dated profile snapshots, renames, and ingest's bookkeeping (walks,
failures, day files, runs, claims). SQLite by default, PostgreSQL by URL (connection and shared SQL: db.py).

Snapshots are keyed by (user id, day), so a re-run of a day replaces that day's row and a renamed account keeps
one history. The store answers every query of queries.py too.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crawler.api.records import Post, Profile
from crawler.config import check_history_url
from crawler.errors import UsageError
from crawler.history import ready
from crawler.history.db import SCHEMA_VERSION, SNAPSHOT_COLUMNS
from crawler.history.queries import HistoryQueries

# Migrations by version (up to db.SCHEMA_VERSION); {date}/{ts}/{bool}/{int} are filled per database.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, handle TEXT NOT NULL, nickname TEXT,"
        " first_day {date} NOT NULL, last_day {date} NOT NULL)",
        "CREATE TABLE IF NOT EXISTS handles (handle TEXT NOT NULL, user_id TEXT NOT NULL,"
        " first_day {date} NOT NULL, last_day {date} NOT NULL, PRIMARY KEY (handle, user_id))",
        "CREATE TABLE IF NOT EXISTS snapshots (user_id TEXT NOT NULL, day {date} NOT NULL, fetched_at {ts} NOT NULL,"
        " handle TEXT NOT NULL, followers {int}, following {int}, hearts {int}, videos {int}, likes {int},"
        " verified {bool}, private {bool}, PRIMARY KEY (user_id, day))",
        "CREATE INDEX IF NOT EXISTS snapshots_day ON snapshots (day, user_id)",
        "CREATE TABLE IF NOT EXISTS posts (video_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, create_time {int},"
        " first_day {date} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS posts_user ON posts (user_id, create_time)",
    ],
    # Version 2 (scheduled crawls): renames seen by ingest, one row per change of handle.
    2: [
        "CREATE TABLE IF NOT EXISTS renames (user_id TEXT NOT NULL, old_handle TEXT NOT NULL,"
        " new_handle TEXT NOT NULL, day {date} NOT NULL, PRIMARY KEY (user_id, day, old_handle, new_handle))",
        # Ingest follows users, not names: a watch-list name stays bound to the user it first resolved to.
        "CREATE TABLE IF NOT EXISTS watch_names (name TEXT PRIMARY KEY, user_id TEXT NOT NULL, day {date} NOT NULL)",
        # A v1 store's names: each handle's latest user (v1 resolved watch-list names into `handles`).
        "INSERT INTO watch_names (name, user_id, day) SELECT h.handle, h.user_id, h.first_day FROM handles h"
        " WHERE NOT EXISTS (SELECT 1 FROM handles g WHERE g.handle = h.handle AND (g.last_day > h.last_day"
        " OR (g.last_day = h.last_day AND g.user_id > h.user_id))) ON CONFLICT DO NOTHING",
        # Each user's posts walk: complete through `through` (create_time of the newest post of the last
        # complete walk); a walk cut short keeps its cursor, the watermark it walks down to (`stop_at`) and
        # the newest post it started from (`top`, the next watermark). v1 stores start with no watermark:
        # their next walk goes to the end once, repairing posts v1's incremental stop may have skipped.
        "CREATE TABLE IF NOT EXISTS walks (user_id TEXT PRIMARY KEY, through {int}, cursor TEXT, stop_at {int},"
        " top {int}, rows {int} NOT NULL DEFAULT 0, day {date}, day_pages {int} NOT NULL DEFAULT 0, walked {date})",
        # What ingest could not fetch on a day (the day's failures files are written from here).
        "CREATE TABLE IF NOT EXISTS ingest_failures (day {date} NOT NULL, input TEXT NOT NULL, part TEXT NOT NULL,"
        " endpoint TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (day, input, part))",
        # One row per ingest run and day it wrote to: its spend that day and how it ended (NULL: killed or running).
        "CREATE TABLE IF NOT EXISTS ingest_runs (run_id TEXT NOT NULL, day {date} NOT NULL, by_date {bool} NOT NULL,"
        " started_at {ts} NOT NULL, ended_at {ts}, exit_code {int}, requests_sent {int} NOT NULL DEFAULT 0,"
        " credits_billed {int} NOT NULL DEFAULT 0, watch_users {int} NOT NULL DEFAULT 0, PRIMARY KEY (run_id, day))",
        # The committed length of each day file: rows past it (a kill between write and commit) are cut off.
        "CREATE TABLE IF NOT EXISTS ingest_files (path TEXT PRIMARY KEY, length {int} NOT NULL)",
    ],
    # Version 3 (several runs on one store): the user-days runs are working on (see HistoryStore.claim).
    3: [
        "CREATE TABLE IF NOT EXISTS claims (day {date} NOT NULL, subject TEXT NOT NULL, owner TEXT NOT NULL,"
        " expires {int} NOT NULL, PRIMARY KEY (day, subject))",
    ],
    # Version 4 (reads that do not grow with the users): each user's latest counts and gains (ready.py), filled
    # by the same rebuild as `crawler history rebuild`.
    4: ready.migration(),
    # Version 5: the gains of the day-before stragglers kept too (ready.LATE), then every kept column filled. On
    # SQLite, the snapshots in one B-tree keyed by (user, day), a table without rowid, instead of a rowid table
    # beside its primary-key index: a quarter less disk, and a user's days on one or two pages. The upgrade rewrites
    # the table once (about 5 s per million snapshots, and as much free disk again). PostgreSQL's tables are heaps.
    5: [*ready.late_migration(), *(ready.SQLITE_ONLY + sql for sql in (
        "CREATE TABLE snapshots_v5 (user_id TEXT NOT NULL, day {date} NOT NULL, fetched_at {ts} NOT NULL,"
        " handle TEXT NOT NULL, followers {int}, following {int}, hearts {int}, videos {int}, likes {int},"
        " verified {bool}, private {bool}, PRIMARY KEY (user_id, day)) WITHOUT ROWID",
        f"INSERT INTO snapshots_v5 ({', '.join(SNAPSHOT_COLUMNS)}) SELECT {', '.join(SNAPSHOT_COLUMNS)}"
        " FROM snapshots ORDER BY user_id, day",
        "DROP TABLE snapshots",
        "ALTER TABLE snapshots_v5 RENAME TO snapshots",
        "CREATE INDEX snapshots_day ON snapshots (day, user_id)"))],
}


@dataclass(frozen=True, slots=True)
class WalkState:
    """Where a user's posts walk stands (see the `walks` table)."""

    through: int | None = None
    cursor: Any = None  # the next cursor of a walk cut short, None when no walk is pending
    stop_at: int | None = None
    top: int | None = None
    rows: int = 0
    day: str | None = None  # the day `day_pages` counts
    day_pages: int = 0
    walked: str | None = None  # the day of the last complete walk



class HistoryStore(HistoryQueries):
    """Profile snapshots in SQLite (a path) or PostgreSQL (a postgresql:// URL), migrated to the newest schema on
    opening. Opened once, closed idempotently."""

    def __init__(self, url: str, *, stall_limit: float = 300.0, connect_timeout: float = 5.0) -> None:
        try:
            check_history_url(url)
        except ValueError as exc:
            raise UsageError(f"history.url: {exc}") from None
        super().__init__(url, stall_limit=stall_limit, connect_timeout=connect_timeout)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _migrate(self) -> None:
        types = ({"date": "DATE", "ts": "TIMESTAMPTZ", "bool": "BOOLEAN", "int": "BIGINT"} if self.postgres
                 else {"date": "TEXT", "ts": "TEXT", "bool": "INTEGER", "int": "INTEGER"})
        if self.postgres:  # several ingest processes may start together: one migrates at a time, all DDL under
            self._exec("SELECT pg_advisory_lock(7426001)")  # the lock (two CREATE IF NOT EXISTS can collide)
        try:
            with self.transaction():  # SQLite: under the write lock (a read, then a write, may fail at once else)
                self._exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self._current()
            if current > SCHEMA_VERSION:  # an older crawler would leave the newer kept data stale
                raise UsageError(f"the history store has schema version {current}, newer than this crawler's"
                                 f" {SCHEMA_VERSION}: upgrade crawler on this host too")
            for version in sorted(v for v in MIGRATIONS if v > current):
                with self.transaction():  # a failed step is rolled back whole
                    if self._current() >= version:  # SQLite: another process did it between the read and BEGIN
                        continue
                    ready.run_migration(self, version, MIGRATIONS[version], types)
                    self._exec("INSERT INTO schema_version (version) VALUES (?)", (version,))
        finally:
            if self.postgres:
                self._exec("SELECT pg_advisory_unlock(7426001)")

    def _current(self) -> int:
        return int(self._rows("SELECT MAX(version) FROM schema_version")[0][0] or 0)

    # --- writes ---

    def record_snapshot(self, day: dt.date, profile: Profile, *, also_handle: str | None = None,
                        fetched_at: dt.datetime | None = None) -> None:
        """Store (or replace) the user's snapshot for ``day``; remember its handle(s)."""
        with self.transaction():
            self.put_snapshot(day, profile, also_handle=also_handle, fetched_at=fetched_at)

    def put_snapshot(self, day: dt.date, profile: Profile, *, also_handle: str | None = None,
                     fetched_at: dt.datetime | None = None) -> None:
        """`record_snapshot` inside the caller's transaction."""
        when = (fetched_at or dt.datetime.now(dt.UTC)).isoformat()
        d = day.isoformat()
        self._exec(
            "INSERT INTO snapshots (user_id, day, fetched_at, handle, followers, following, hearts, videos,"
            " likes, verified, private) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id, day) DO UPDATE SET fetched_at = excluded.fetched_at,"
            " handle = excluded.handle, followers = excluded.followers, following = excluded.following,"
            " hearts = excluded.hearts, videos = excluded.videos, likes = excluded.likes,"
            " verified = excluded.verified, private = excluded.private",
            (profile.user_id, d, when, profile.handle, profile.followers, profile.following, profile.hearts,
             profile.videos, profile.likes, profile.verified, profile.private),
        )
        self._exec(
            "INSERT INTO users (user_id, handle, nickname, first_day, last_day) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET"
            " handle = CASE WHEN excluded.last_day >= users.last_day THEN excluded.handle ELSE users.handle END,"
            " nickname = excluded.nickname,"
            " first_day = CASE WHEN excluded.first_day < users.first_day THEN excluded.first_day"
            " ELSE users.first_day END,"
            " last_day = CASE WHEN excluded.last_day > users.last_day THEN excluded.last_day"
            " ELSE users.last_day END",
            (profile.user_id, profile.handle, profile.nickname, d, d),
        )
        for handle in {profile.handle, also_handle or profile.handle}:
            self._exec(
                "INSERT INTO handles (handle, user_id, first_day, last_day) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (handle, user_id) DO UPDATE SET"
                " first_day = CASE WHEN excluded.first_day < handles.first_day THEN excluded.first_day"
                " ELSE handles.first_day END,"
                " last_day = CASE WHEN excluded.last_day > handles.last_day THEN excluded.last_day"
                " ELSE handles.last_day END",
                (handle, profile.user_id, d, d),
            )
        ready.refresh(self, [profile.user_id], added=d)

    def record_rename(self, user_id: str, old: str, new: str, day: dt.date) -> None:
        """Remember that ``user_id`` went from handle ``old`` to ``new`` on ``day`` (idempotent)."""
        self._exec("INSERT INTO renames (user_id, old_handle, new_handle, day) VALUES (?, ?, ?, ?)"
                   " ON CONFLICT DO NOTHING", (user_id, old, new, day.isoformat()))

    # --- ingest's bookkeeping (see crawler/runs/ingest.py); put_* run inside the caller's transaction ---

    def bound_ids(self, names: Sequence[str]) -> dict[str, str]:
        """The user each watch-list name is bound to, for the names that have one."""
        return dict(self._in("SELECT name, user_id FROM watch_names WHERE name IN ({})", names))

    def bind(self, name: str, user_id: str, day: dt.date) -> None:
        """Bind a watch-list name to the user it resolved to (the first binding stays)."""
        self._exec("INSERT INTO watch_names (name, user_id, day) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                   (name, user_id, day.isoformat()))

    def snapshotted(self, user_ids: Sequence[str], day: dt.date) -> dict[str, bool]:
        """Users with a snapshot on ``day``, and whether it says private."""
        rows = self._in("SELECT user_id, private FROM snapshots WHERE day = ? AND user_id IN ({})", user_ids,
                        day.isoformat())
        return {str(u): bool(p) for u, p in rows}

    def last_videos(self, user_ids: Sequence[str]) -> dict[str, tuple[int | None, int | None, bool]]:
        """Each user's video counts in their last two snapshots (newest first; None: no such snapshot) and
        whether the last says private (what `estimate ingest` prices the posts walks from)."""
        rows = self._in("SELECT user_id, day, videos, private FROM snapshots WHERE user_id IN ({})"
                        " ORDER BY user_id, day DESC", user_ids)
        seen: dict[str, list[tuple[int | None, bool]]] = {}
        for uid, _day, videos, private in rows:
            got = seen.setdefault(str(uid), [])
            if len(got) < 2:
                got.append((None if videos is None else int(videos), bool(private)))
        return {u: (v[0][0], v[1][0] if len(v) > 1 else None, v[0][1]) for u, v in seen.items()}

    def handle_of(self, user_id: str, *, until: dt.date | None = None) -> str | None:
        """The user's handle as last stored (``until``: None when that handle is of a later day than this one)."""
        rows = self._rows("SELECT handle, last_day FROM users WHERE user_id = ?", (user_id,))
        if not rows or (until is not None and self._day(rows[0][1]) > until.isoformat()):
            return None
        return str(rows[0][0])

    def day_failures(self, day: dt.date, inputs: Sequence[str]) -> dict[tuple[str, str], str]:
        """(input, part) -> reason of what failed on ``day`` among ``inputs``."""
        rows = self._in("SELECT input, part, reason FROM ingest_failures WHERE day = ? AND input IN ({})", inputs,
                        day.isoformat())
        return {(str(i), str(p)): str(r) for i, p, r in rows}

    def put_failure(self, day: dt.date, input_key: str, part: str, endpoint: str, reason: str, detail: str) -> None:
        """Record (or replace) what failed for an input on ``day``."""
        self._exec("INSERT INTO ingest_failures (day, input, part, endpoint, reason, detail) VALUES (?, ?, ?, ?, ?, ?)"
                   " ON CONFLICT (day, input, part) DO UPDATE SET endpoint = excluded.endpoint,"
                   " reason = excluded.reason, detail = excluded.detail",
                   (day.isoformat(), input_key, part, endpoint, reason, detail))

    def clear_failure(self, day: dt.date, input_key: str, part: str) -> None:
        """An input that failed earlier on ``day`` succeeded."""
        self._exec("DELETE FROM ingest_failures WHERE day = ? AND input = ? AND part = ?",
                   (day.isoformat(), input_key, part))

    def failures(self, day: dt.date, part: str) -> list[tuple[str, str, str, str]]:
        """(input, endpoint, reason, detail) of what is still failed on ``day`` (one part)."""
        rows = self._rows("SELECT input, endpoint, reason, detail FROM ingest_failures WHERE day = ? AND part = ?"
                          " ORDER BY input", (day.isoformat(), part))
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]

    def walk_state(self, user_id: str) -> WalkState:
        """Where the user's posts walk stands (a fresh state for a user never walked)."""
        rows = self._rows("SELECT through, cursor, stop_at, top, rows, day, day_pages, walked FROM walks"
                          " WHERE user_id = ?", (user_id,))
        if not rows:
            return WalkState()
        through, cursor, stop_at, top, n, day, pages, walked = rows[0]
        return WalkState(through, None if cursor is None else json.loads(cursor), stop_at, top, int(n),
                         None if day is None else self._day(day), int(pages),
                         None if walked is None else self._day(walked))

    def put_walk(self, user_id: str, w: WalkState) -> None:
        """Store where the user's posts walk stands."""
        self._exec(
            "INSERT INTO walks (user_id, through, cursor, stop_at, top, rows, day, day_pages, walked)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET through = excluded.through,"
            " cursor = excluded.cursor, stop_at = excluded.stop_at, top = excluded.top, rows = excluded.rows,"
            " day = excluded.day, day_pages = excluded.day_pages, walked = excluded.walked",
            (user_id, w.through, None if w.cursor is None else json.dumps(w.cursor), w.stop_at, w.top, w.rows,
             w.day, w.day_pages, w.walked))

    def known_posts(self, video_ids: Sequence[str]) -> set[str]:
        """Those of ``video_ids`` already stored."""
        return {str(v) for (v,) in self._in("SELECT video_id FROM posts WHERE video_id IN ({})", video_ids)}

    def put_posts(self, day: dt.date, user_id: str, posts: Iterable[Post]) -> None:
        """Remember posts (the first day seen is kept on conflict), inside the caller's transaction."""
        rows = sorted((p.video_id, user_id, p.create_time, day.isoformat()) for p in posts)  # key order: no deadlock
        if not rows:
            return
        sql = self._sql("INSERT INTO posts (video_id, user_id, create_time, first_day) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (video_id) DO NOTHING")
        if self.postgres:
            with self._db.cursor() as cur:
                cur.executemany(sql, rows)
        else:
            self._db.executemany(sql, rows)

    def file_length(self, path: str) -> int | None:
        """The committed length of a day file, None if it was never opened by ingest."""
        rows = self._rows("SELECT length FROM ingest_files WHERE path = ?", (path,))
        return int(rows[0][0]) if rows else None

    def put_file_length(self, path: str, length: int) -> None:
        """Record a day file's committed length."""
        self._exec("INSERT INTO ingest_files (path, length) VALUES (?, ?)"
                   " ON CONFLICT (path) DO UPDATE SET length = excluded.length", (path, length))

    def put_run_day(self, run_id: str, day: dt.date, *, by_date: bool, started_at: dt.datetime, requests_sent: int,
                    credits_billed: int, watch_users: int) -> None:
        """Add a run's spend on ``day`` (the row appears with the run's first commit that day)."""
        self._exec(
            "INSERT INTO ingest_runs (run_id, day, by_date, started_at, requests_sent, credits_billed, watch_users)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, day) DO UPDATE SET"
            " requests_sent = ingest_runs.requests_sent + excluded.requests_sent,"
            " credits_billed = ingest_runs.credits_billed + excluded.credits_billed,"
            " watch_users = excluded.watch_users",
            (run_id, day.isoformat(), by_date, started_at.isoformat(), requests_sent, credits_billed, watch_users))

    def end_run(self, run_id: str, exit_code: int, ended_at: dt.datetime) -> None:
        """Record how a run ended on every day it wrote to."""
        self._exec("UPDATE ingest_runs SET exit_code = ?, ended_at = ? WHERE run_id = ?",
                   (exit_code, ended_at.isoformat(), run_id))

    # --- claims: several runs on one store fetch each user once a day (see crawler/runs/ingest.py) ---

    def _clock(self) -> str:
        """The store's own clock in whole seconds, as SQL: every run sharing the store reads the same one."""
        return ("CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)" if self.postgres
                else "CAST(strftime('%s', 'now') AS INTEGER)")

    def claim(self, day: dt.date, subject: str, owner: str, ttl: int) -> bool:
        """Claim ``subject`` (a user, or a name not bound yet) on ``day`` for run ``owner`` for ``ttl`` seconds of the
        store's clock; False while another run's claim on it is alive. Inside the caller's transaction, so the
        caller reads what the user needs after the claim, never before it (the holder's commit is then seen)."""
        now = self._clock()
        rows = self._rows(
            f"INSERT INTO claims (day, subject, owner, expires) VALUES (?, ?, ?, {now} + ?)"
            " ON CONFLICT (day, subject) DO UPDATE SET owner = excluded.owner, expires = excluded.expires"
            f" WHERE claims.owner = excluded.owner OR claims.expires < {now} RETURNING owner",
            (day.isoformat(), subject, owner, ttl))
        return bool(rows)

    def renew_claims(self, owner: str, ttl: int) -> None:
        """Keep run ``owner``'s claims alive another ``ttl`` seconds (its heartbeat)."""
        self._exec(f"UPDATE claims SET expires = {self._clock()} + ? WHERE owner = ?", (ttl, owner))

    def release_claim(self, day: dt.date, subject: str, owner: str) -> None:
        """Run ``owner`` is done with ``subject`` on ``day`` (what it fetched is committed)."""
        self._exec("DELETE FROM claims WHERE day = ? AND subject = ? AND owner = ?", (day.isoformat(), subject, owner))

    def release_claims(self, owner: str) -> None:
        """Run ``owner`` ends: its claims go, and so do the expired claims of runs that died."""
        self._exec(f"DELETE FROM claims WHERE owner = ? OR expires < {self._clock()}", (owner,))

    def claims(self) -> list[tuple[str, str, str]]:
        """(day, subject, owner) of every claim, alive or expired."""
        return [(self._day(d), str(s), str(o))
                for d, s, o in self._rows("SELECT day, subject, owner FROM claims ORDER BY day, subject")]

    def restart_day(self, day: dt.date, files: Mapping[str, int], user_ids: Sequence[str]) -> None:
        """`ingest --restart`: forget ``day``'s snapshots of the watch list's users (others sharing the store keep
        theirs) and its profile failures; each of ``files`` (its profiles file) gets the committed length given
        (the rows it keeps)."""
        with self.transaction():
            ids = list(user_ids)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                self._exec(f"DELETE FROM snapshots WHERE day = ? AND user_id IN ({', '.join('?' * len(chunk))})",
                           (day.isoformat(), *chunk))
            ready.refresh(self, ids)
            self._exec("DELETE FROM ingest_failures WHERE day = ? AND part = 'profiles'", (day.isoformat(),))
            for path, length in files.items():
                self.put_file_length(path, length)

    def bulk_snapshots(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Load snapshot rows (SNAPSHOT_COLUMNS order) fast: COPY on PostgreSQL, one transaction on SQLite. The
        maintained data is not kept up to date: `rebuild` after loading."""
        n = 0
        if self.postgres:
            with self._db.cursor() as cur, cur.copy(
                f"COPY snapshots ({', '.join(SNAPSHOT_COLUMNS)}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
                    n += 1
            return n
        self._begin()
        cur = self._db.executemany(
            f"INSERT INTO snapshots ({', '.join(SNAPSHOT_COLUMNS)}) VALUES ({', '.join('?' * len(SNAPSHOT_COLUMNS))})"
            " ON CONFLICT (user_id, day) DO NOTHING", rows)
        n = int(cur.rowcount)
        self._commit()
        return n

    def bulk_users(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Load (user_id, handle, first_day, last_day) into users and handles."""
        data = list(rows)
        for table, cols in (("users", "user_id, handle, first_day, last_day"),
                            ("handles", "user_id, handle, first_day, last_day")):
            sql = self._sql(f"INSERT INTO {table} ({cols}) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
            if self.postgres:
                with self._db.cursor() as cur:
                    cur.executemany(sql, data)
            else:
                self._begin()
                self._db.executemany(sql, data)
                self._commit()
