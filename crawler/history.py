"""Dated profile snapshots and the growth queries over them (SQLite by default, PostgreSQL by URL).

One store class speaks both databases: the SQL is shared (`?` placeholders are rewritten to `%s` for
psycopg) and only the connection, the DDL types and the bulk path differ. Snapshots are keyed by
(user id, day), so a re-run of a day replaces that day's row and a renamed account keeps one history.
"""

from __future__ import annotations

import csv
import datetime as dt
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawler.config import check_history_url
from crawler.endpoints import Post, Profile
from crawler.errors import UsageError

SCHEMA_VERSION = 2

# Migrations by version; {date}/{ts}/{bool}/{int} are filled per database.
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
    ],
}

SNAPSHOT_COLUMNS = ("user_id", "day", "fetched_at", "handle", "followers", "following", "hearts", "videos", "likes",
                    "verified", "private")
METRICS = {"followers-gained": "followers", "hearts-gained": "hearts", "videos-gained": "videos",
           "following-gained": "following"}


@dataclass(frozen=True, slots=True)
class GrowthRow:
    """One day of a handle's curve."""

    day: str
    followers: int | None
    delta: int | None


@dataclass(frozen=True, slots=True)
class RenameRow:
    """A user's handle changed from ``old`` to ``new``, first seen on ``day``."""

    user_id: str
    old: str
    new: str
    day: str


@dataclass(frozen=True, slots=True)
class TopRow:
    """One user's gain over a window."""

    handle: str
    user_id: str
    start: int | None
    end: int | None
    gained: int | None


def parse_day(text: str, flag: str = "--date") -> dt.date:
    """A YYYY-MM-DD date, or a UsageError naming the flag."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a date as YYYY-MM-DD") from None


class HistoryStore:
    """Profile snapshots in SQLite (a path) or PostgreSQL (a postgresql:// URL). Opened once, closed idempotently."""

    def __init__(self, url: str) -> None:
        try:
            check_history_url(url)
        except ValueError as exc:
            raise UsageError(f"history.url: {exc}") from None
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._db: Any
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise UsageError("history.url is PostgreSQL but psycopg is not installed: pip install "
                                 "'crawler[postgres]'") from None
            try:
                self._db = psycopg.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
                raise UsageError(f"cannot connect to the history database: {first}") from None
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA cache_size=-32768")  # 32 MB: index inserts of a big backfill stay in memory
        self._migrate()

    def __repr__(self) -> str:
        # A PostgreSQL URL may carry a password: show only the kind of store.
        return f"HistoryStore({'postgresql' if self.postgres else 'sqlite'})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- plumbing ---

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(self._sql(sql), params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._exec(sql, params).fetchall())

    def _begin(self) -> None:
        self._db.execute("BEGIN")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        types = ({"date": "DATE", "ts": "TIMESTAMPTZ", "bool": "BOOLEAN", "int": "BIGINT"} if self.postgres
                 else {"date": "TEXT", "ts": "TEXT", "bool": "INTEGER", "int": "INTEGER"})
        self._exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if self.postgres:  # several ingest processes may start together: one migrates at a time
            self._exec("SELECT pg_advisory_lock(7426001)")
        try:
            row = self._rows("SELECT MAX(version) FROM schema_version")
            current = row[0][0] or 0
            for version in sorted(v for v in MIGRATIONS if v > current):
                self._begin()
                for statement in MIGRATIONS[version]:
                    self._exec(statement.format(**types))
                self._exec("INSERT INTO schema_version (version) VALUES (?)", (version,))
                self._commit()
        finally:
            if self.postgres:
                self._exec("SELECT pg_advisory_unlock(7426001)")

    def _day(self, value: Any) -> str:
        return value.isoformat() if isinstance(value, dt.date) else str(value)

    # --- writes ---

    def record_snapshot(self, day: dt.date, profile: Profile, *, also_handle: str | None = None,
                        fetched_at: dt.datetime | None = None) -> None:
        """Store (or replace) the user's snapshot for ``day``; remember its handle(s)."""
        when = (fetched_at or dt.datetime.now(dt.UTC)).isoformat()
        d = day.isoformat()
        self._begin()
        try:
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
            self._commit()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def record_rename(self, user_id: str, old: str, new: str, day: dt.date) -> None:
        """Remember that ``user_id`` went from handle ``old`` to ``new`` on ``day`` (idempotent)."""
        self._exec("INSERT INTO renames (user_id, old_handle, new_handle, day) VALUES (?, ?, ?, ?)"
                   " ON CONFLICT DO NOTHING", (user_id, old, new, day.isoformat()))

    def newest_post_time(self, user_id: str, before: dt.date) -> int | None:
        """create_time of the newest post of a user first stored before ``before`` (the incremental stop)."""
        rows = self._rows("SELECT MAX(create_time) FROM posts WHERE user_id = ? AND first_day < ?",
                          (user_id, before.isoformat()))
        value = rows[0][0] if rows else None
        return None if value is None else int(value)

    def record_posts(self, day: dt.date, user_id: str, posts: Iterable[Post]) -> None:
        """Remember posts (first day seen is kept on conflict)."""
        rows = [(p.video_id, user_id, p.create_time, day.isoformat()) for p in posts]
        if not rows:
            return
        sql = self._sql("INSERT INTO posts (video_id, user_id, create_time, first_day) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (video_id) DO NOTHING")
        if self.postgres:
            with self._db.cursor() as cur:
                cur.executemany(sql, rows)
        else:
            self._begin()
            self._db.executemany(sql, rows)
            self._commit()

    def bulk_snapshots(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Load snapshot rows (SNAPSHOT_COLUMNS order) fast: COPY on PostgreSQL, one transaction on SQLite."""
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

    # --- queries ---

    def resolve(self, handle: str) -> tuple[str, str]:
        """(user id, current handle) for any handle the user has had; UsageError if unknown."""
        h = handle.strip().lstrip("@").lower()
        rows = self._rows(
            "SELECT h.user_id, u.handle FROM handles h JOIN users u ON u.user_id = h.user_id"
            " WHERE h.handle = ? ORDER BY h.last_day DESC LIMIT 1", (h,))
        if not rows:
            raise UsageError(f"no history for @{h} (run `crawler ingest` first, or check the spelling)")
        return str(rows[0][0]), str(rows[0][1])

    def growth(self, handle: str, since: dt.date | None = None, until: dt.date | None = None) -> list[GrowthRow]:
        """Day, followers and change from the previous snapshot, for one handle."""
        user_id, _ = self.resolve(handle)
        rows = self._rows(
            "SELECT day, followers FROM snapshots WHERE user_id = ? AND day >= ? AND day <= ? ORDER BY day",
            (user_id, (since or dt.date(1970, 1, 1)).isoformat(), (until or dt.date(9999, 12, 31)).isoformat()))
        out: list[GrowthRow] = []
        previous: int | None = None
        for day, followers in rows:
            delta = None if previous is None or followers is None else followers - previous
            out.append(GrowthRow(self._day(day), followers, delta))
            previous = followers
        return out

    def renames(self, user_id: str | None = None) -> list[RenameRow]:
        """Every rename (of one user, or all), oldest first."""
        where, params = ("WHERE user_id = ?", (user_id,)) if user_id is not None else ("", ())
        rows = self._rows(f"SELECT user_id, old_handle, new_handle, day FROM renames {where}"
                          " ORDER BY day, user_id", params)
        return [RenameRow(str(u), str(o), str(n), self._day(d)) for u, o, n, d in rows]

    def last_day(self) -> dt.date | None:
        """The newest snapshot day."""
        value = self._rows("SELECT MAX(day) FROM snapshots")[0][0]
        return None if value is None else dt.date.fromisoformat(self._day(value))

    def top(self, by: str = "followers-gained", days: int = 7, limit: int = 20,
            until: dt.date | None = None) -> list[TopRow]:
        """Users ranked by what they gained between the first and last snapshot of the last ``days`` days."""
        if by not in METRICS:
            raise UsageError(f"--by {by}: use one of {', '.join(METRICS)}")
        column = METRICS[by]
        end = until or self.last_day()
        if end is None:
            return []
        start = end - dt.timedelta(days=days)
        # One pass: number each user's days both ways, keep the first and last, fold them per user.
        rows = self._rows(
            f"WITH w AS (SELECT user_id, {column} AS v,"
            " ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY day) AS a,"
            " ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY day DESC) AS b"
            " FROM snapshots WHERE day >= ? AND day <= ?),"
            " g AS (SELECT user_id, MAX(CASE WHEN a = 1 THEN v END) AS first_v,"
            " MAX(CASE WHEN b = 1 THEN v END) AS last_v FROM w WHERE a = 1 OR b = 1 GROUP BY user_id)"
            " SELECT u.handle, g.user_id, g.first_v, g.last_v, g.last_v - g.first_v AS gained FROM g"
            " JOIN users u ON u.user_id = g.user_id ORDER BY gained DESC NULLS LAST, u.handle LIMIT ?",
            (start.isoformat(), end.isoformat(), limit))
        return [TopRow(str(h), str(u), s, e, g) for h, u, s, e, g in rows]

    def as_of(self, day: dt.date) -> list[tuple[Any, ...]]:
        """Every user's latest snapshot on or before ``day`` (SNAPSHOT_COLUMNS order)."""
        cols = ", ".join(f"s.{c}" for c in SNAPSHOT_COLUMNS)
        rows = self._rows(
            f"SELECT {cols} FROM snapshots s JOIN (SELECT user_id, MAX(day) AS day FROM snapshots WHERE day <= ?"
            " GROUP BY user_id) m ON s.user_id = m.user_id AND s.day = m.day ORDER BY s.handle, s.user_id",
            (day.isoformat(),))
        return [self._normal(r) for r in rows]

    def snapshots(self) -> Iterator[tuple[Any, ...]]:
        """Every snapshot, by user then day."""
        cols = ", ".join(SNAPSHOT_COLUMNS)
        cur = self._exec(f"SELECT {cols} FROM snapshots ORDER BY user_id, day")
        while batch := cur.fetchmany(5000):
            for row in batch:
                yield self._normal(row)

    def count(self, user_id: str | None = None) -> int:
        """Snapshots stored (for one user, or all)."""
        if user_id is None:
            return int(self._rows("SELECT COUNT(*) FROM snapshots")[0][0])
        return int(self._rows("SELECT COUNT(*) FROM snapshots WHERE user_id = ?", (user_id,))[0][0])

    def _normal(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """Portable values: days as text, times as ISO text, booleans as bool."""
        values = list(row)
        values[1] = self._day(values[1])
        values[2] = values[2].isoformat() if isinstance(values[2], dt.datetime) else str(values[2])
        values[9] = None if values[9] is None else bool(values[9])
        values[10] = None if values[10] is None else bool(values[10])
        return tuple(values)


def export_csv(store: HistoryStore, path: Path) -> int:
    """Write every snapshot to a CSV (atomically); return the row count."""
    from crawler.sinks import cell

    tmp = path.with_name(path.name + ".part")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SNAPSHOT_COLUMNS)
        for row in store.snapshots():
            writer.writerow([cell(v) for v in row])
            n += 1
    tmp.replace(path)
    return n


def plot_growth(store: HistoryStore, handles: Sequence[str], path: Path, *, since: dt.date | None = None,
                until: dt.date | None = None) -> list[str]:
    """Draw the follower curve of each handle into a PNG; return the series labels in drawing order."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install 'crawler[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    labels: list[str] = []
    try:
        for n, handle in enumerate(handles):
            rows = store.growth(handle, since, until)
            _, current = store.resolve(handle)
            days = [dt.date.fromisoformat(r.day) for r in rows]
            values = [r.followers if r.followers is not None else float("nan") for r in rows]
            label = f"@{current}" if current == handle.lstrip("@").lower() else f"@{current} (was @{handle})"
            ax.plot(days, values, marker="o", markersize=3.5, linewidth=2.2,  # type: ignore[arg-type]
                    color=f"C{n % 10}", label=label)
            labels.append(label)
        ax.set_title("Followers per day")
        ax.set_ylabel("followers")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))  # type: ignore[no-untyped-call]
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never on them
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return labels
