"""The read queries over the history store: `crawler history growth|top|as-of|days|export|plot` and the web page.

`HistoryQueries.open_readonly` opens a store that cannot write (no migration; the database refuses writes): the
web page (`history serve`) holds only that. The writing store (store.py) has every query too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from crawler.errors import UsageError
from crawler.history import ready
from crawler.history.db import SNAPSHOT_COLUMNS, HistoryDb

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
class DayRow:
    """One day of `history days`."""

    day: str
    snapshotted: int
    missing: int | None  # watch-list users without a snapshot (None: no run recorded its list)
    requests_sent: int
    credits_billed: int
    runs: tuple[str, ...]  # how each run that wrote to the day ended
    by_date: bool  # a run wrote this day with --date (a backfill, not the fetch day)
    failures: int
    renames: tuple[RenameRow, ...] = ()
    gap: bool = False  # no run wrote this day


@dataclass(frozen=True, slots=True)
class TopRow:
    """One user's gain over a window."""

    handle: str
    user_id: str
    start: int | None
    end: int | None
    gained: int | None


@dataclass(frozen=True, slots=True)
class OverviewRow:
    """A user on the overview: latest snapshot (of ``day``) and the gain over each window (None: no snapshot)."""

    user_id: str
    handle: str
    nickname: str
    day: str
    followers: int | None
    following: int | None
    videos: int | None
    hearts: int | None
    gains: dict[int, int | None]


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """One snapshot of one user."""

    day: str
    handle: str
    followers: int | None
    following: int | None
    videos: int | None
    hearts: int | None


def parse_day(text: str, flag: str = "--date") -> dt.date:
    """A YYYY-MM-DD date, or a UsageError naming the flag."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a date as YYYY-MM-DD") from None


class HistoryQueries(HistoryDb):
    """What the history says: growth, rankings, days, and the web page's overview and series."""

    def resolve(self, handle: str) -> tuple[str, str]:
        """(user id, current handle) for any handle the user has had; UsageError if unknown."""
        h = handle.strip().lstrip("@").lower()
        # No handle holds a NUL byte, and PostgreSQL refuses one in a query: unknown without asking.
        rows = [] if "\x00" in h else self._rows(
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
        """Users ranked by what they gained between the first and last snapshot of the last ``days`` days; a user
        with fewer than two snapshots there (a missed night) has no gain and is left out."""
        if by not in METRICS:
            raise UsageError(f"--by {by}: use one of {', '.join(METRICS)}")
        column = METRICS[by]
        end = until or self.last_day()
        if end is None:
            return []
        start = end - dt.timedelta(days=days)
        if column == "followers" and days in ready.WINDOWS and until is None and self.version >= ready.VERSION:
            return self._top_ready(days, limit, start, end)
        # One pass: number each user's days both ways, keep the first and last, fold them per user (the last one's
        # number from the start is the user's count of snapshots in the window).
        rows = self._rows(
            f"WITH w AS (SELECT user_id, {column} AS v,"
            " ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY day) AS a,"
            " ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY day DESC) AS b"
            " FROM snapshots WHERE day >= ? AND day <= ?),"
            " g AS (SELECT user_id, MAX(CASE WHEN a = 1 THEN v END) AS first_v,"
            " MAX(CASE WHEN b = 1 THEN v END) AS last_v FROM w WHERE a = 1 OR b = 1 GROUP BY user_id"
            " HAVING MAX(a) > 1)"
            " SELECT u.handle, g.user_id, g.first_v, g.last_v, g.last_v - g.first_v AS gained FROM g"
            " JOIN users u ON u.user_id = g.user_id ORDER BY gained DESC NULLS LAST, u.handle LIMIT ?",
            (start.isoformat(), end.isoformat(), limit))
        return [TopRow(str(h), str(u), s, e, g) for h, u, s, e, g in rows]

    def _top_ready(self, days: int, limit: int, start: dt.date, end: dt.date) -> list[TopRow]:
        """`top` by followers over a window kept ready (ready.py), ending at the store's newest day: the users whose
        last snapshot is of that day, and those of the day before (their gain over ``days`` - 1, ready.LATE), from
        the kept data; older stragglers from their snapshots in the window."""
        s, e, e1 = start.isoformat(), end.isoformat(), (end - dt.timedelta(days=1)).isoformat()
        kept = [(e, days)] + ([(e1, ready.LATE[days])] if days in ready.LATE else [])
        parts = [f"SELECT * FROM (SELECT handle, user_id, f{n} AS first_v, followers AS last_v, g{n} AS gained"
                 f" FROM users WHERE s_last = ? AND d{n} IS NOT NULL ORDER BY g{n} DESC NULLS LAST, handle LIMIT ?)"
                 f" AS r{n}" for _, n in kept]
        params = [v for day, _ in kept for v in (day, limit)]
        # Older stragglers: per user (users by last day), the first snapshot of the window before their last one.
        rows = self._rows(
            "WITH l AS (SELECT u.handle, u.user_id, u.followers AS last_v, (SELECT f.day FROM snapshots f"
            " WHERE f.user_id = u.user_id AND f.day >= ? AND f.day < u.s_last ORDER BY f.day LIMIT 1) AS fd"
            " FROM users u WHERE u.s_last >= ? AND u.s_last < ?)"
            f" {' UNION ALL '.join(parts)} UNION ALL"
            " SELECT l.handle, l.user_id, x.followers, l.last_v, l.last_v - x.followers FROM l"
            " JOIN snapshots x ON x.user_id = l.user_id AND x.day = l.fd ORDER BY gained DESC NULLS LAST, handle"
            " LIMIT ?", (s, s, e1, *params, limit))
        return [TopRow(str(h), str(u), a, b, g) for h, u, a, b, g in rows]

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

    def days(self) -> list[DayRow]:
        """Every day from the first to the last one with snapshots or runs, gaps included."""
        snaps = {self._day(d): int(n) for d, n in self._rows("SELECT day, COUNT(*) FROM snapshots GROUP BY day")}
        fails = {self._day(d): int(n)
                 for d, n in self._rows("SELECT day, COUNT(DISTINCT input) FROM ingest_failures GROUP BY day")}
        runs: dict[str, list[tuple[Any, ...]]] = {}
        for row in self._rows("SELECT day, started_at, exit_code, requests_sent, credits_billed, watch_users, by_date"
                              " FROM ingest_runs ORDER BY day, started_at"):
            runs.setdefault(self._day(row[0]), []).append(row)
        renames: dict[str, list[RenameRow]] = {}
        for r in self.renames():
            renames.setdefault(r.day, []).append(r)
        known = sorted(set(snaps) | set(runs))
        if not known:
            return []
        out: list[DayRow] = []
        day, last = dt.date.fromisoformat(known[0]), dt.date.fromisoformat(known[-1])
        while day <= last:
            d = day.isoformat()
            mine = runs.get(d, [])
            watch = max((int(r[5]) for r in mine), default=0)
            ended = tuple("killed or still running" if r[2] is None else f"exit {r[2]}" for r in mine)
            out.append(DayRow(
                day=d, snapshotted=snaps.get(d, 0),
                missing=max(watch - snaps.get(d, 0), 0) if mine else None,
                requests_sent=sum(int(r[3]) for r in mine), credits_billed=sum(int(r[4]) for r in mine),
                runs=ended, by_date=any(bool(r[6]) for r in mine), failures=fails.get(d, 0),
                renames=tuple(renames.get(d, ())), gap=not mine and d not in snaps))
            day += dt.timedelta(days=1)
        return out

    # --- the web page's queries (crawler history serve) ---

    def overview(self, days: Sequence[int] = (1, 7, 30), until: dt.date | None = None) -> list[OverviewRow]:
        """Every user with their newest snapshot up to ``until`` and what they gained over each of ``days``.

        The gain over N days is `top`'s: the user's last minus first value among their snapshots in
        [end - N, end], end being ``until`` or the newest snapshot day of the store; None when the user has fewer
        than two snapshots there (a single one is no gain of 0).
        """
        newest = self.last_day()
        end = until or newest
        if end is None:
            return []
        if end == newest and set(days) <= set(ready.WINDOWS) and self.version >= ready.VERSION:
            return self._overview_ready(days, end)
        return self._overview_computed(days, end)

    def _overview_ready(self, days: Sequence[int], end: dt.date, ids: Sequence[str] | None = None
                        ) -> list[OverviewRow]:
        """`overview` at the store's newest day from the maintained data (``ids``: of those users only): a user
        whose last snapshot is of that day or the day before has the gains kept ready (ready.LATE); the older
        stragglers of the last 30 days are computed from their snapshots."""
        if ids is not None and not ids:
            return []
        e, e1 = end.isoformat(), (end - dt.timedelta(days=1)).isoformat()
        gains = ", ".join(f"CASE WHEN s_last = ? THEN g{n}"
                          f"{f' WHEN s_last = ? THEN g{ready.LATE[n]}' if n in ready.LATE else ''} END" for n in days)
        marks = [d for n in days for d in ((e, e1) if n in ready.LATE else (e,))]
        only = "" if ids is None else f" AND user_id IN ({', '.join('?' * len(ids))})"
        rows = self._rows("SELECT user_id, handle, nickname, s_last, followers, following, videos, hearts,"
                          f" {gains} FROM users WHERE s_last IS NOT NULL{only}", (*marks, *(ids or ())))
        n = len(days)
        out = [OverviewRow(str(r[0]), str(r[1]), "" if r[2] is None else str(r[2]), self._day(r[3]),
                           r[4], r[5], r[6], r[7], dict(zip(days, r[8:8 + n], strict=True))) for r in rows]
        since = (end - dt.timedelta(days=max(days, default=0))).isoformat()  # older stragglers: from their snapshots
        late = {r.user_id: r for r in self._overview_computed(days, end, late_since=since, ids=ids, late_until=e1)}
        return [late.get(r.user_id, r) for r in out]

    def _overview_computed(self, days: Sequence[int], end: dt.date, late_since: str | None = None,
                           ids: Sequence[str] | None = None, late_until: str | None = None) -> list[OverviewRow]:
        """`overview` from the snapshots (``late_since``: only the users whose last snapshot is from that day to
        before ``late_until``, by default ``end``; ``ids``: and of those users only)."""
        e = end.isoformat()
        starts = [(end - dt.timedelta(days=n)).isoformat() for n in days]
        late = "" if late_since is None else " WHERE u.s_last >= ? AND u.s_last < ?"
        if late_since is not None and ids is not None:
            late += f" AND u.user_id IN ({', '.join('?' * len(ids))})"
        # Index seeks on the (user_id, day) key only: per user, the newest snapshot up to the end and the first
        # one inside each window before it. (Grouping a month of every user's rows instead took 1.4 s at 10k users.)
        firsts = ", ".join(f"(SELECT f.followers FROM snapshots f WHERE f.user_id = l.user_id AND f.day >= ?"
                           f" AND f.day < l.last ORDER BY f.day LIMIT 1) AS f{i}" for i in range(len(days)))
        gains = ", ".join(f"CASE WHEN s.day >= ? THEN s.followers - g.f{i} END" for i in range(len(days)))
        rows = self._rows(
            "WITH l AS (SELECT u.user_id, u.handle, u.nickname, (SELECT MAX(m.day) FROM snapshots m"
            f" WHERE m.user_id = u.user_id AND m.day <= ?) AS last FROM users u{late}),"
            f" g AS (SELECT l.user_id, l.handle, l.nickname, l.last, {firsts} FROM l)"
            " SELECT g.user_id, g.handle, g.nickname, s.day, s.followers, s.following, s.videos, s.hearts,"
            # LEFT JOIN: users stay the outer loop (SQLite would otherwise walk all of snapshots first).
            f" {gains} FROM g LEFT JOIN snapshots s ON s.user_id = g.user_id AND s.day = g.last"
            " WHERE g.last IS NOT NULL",
            (e, *(() if late_since is None else (late_since, late_until or e, *(ids or ()))), *starts, *starts))
        n = len(days)
        return [OverviewRow(str(r[0]), str(r[1]), "" if r[2] is None else str(r[2]), self._day(r[3]),
                            r[4], r[5], r[6], r[7], dict(zip(days, r[8:8 + n], strict=True))) for r in rows]

    def series(self, user_id: str, since: dt.date | None = None, until: dt.date | None = None
               ) -> list[SeriesRow]:
        """One user's snapshots in a date range, oldest first."""
        rows = self._rows(
            "SELECT day, handle, followers, following, videos, hearts FROM snapshots WHERE user_id = ?"
            " AND day >= ? AND day <= ? ORDER BY day",
            (user_id, (since or dt.date(1970, 1, 1)).isoformat(), (until or dt.date(9999, 12, 31)).isoformat()))
        return [SeriesRow(self._day(d), str(h), f, fg, v, he) for d, h, f, fg, v, he in rows]

    def followers_since(self, user_ids: Sequence[str], since: dt.date) -> dict[str, list[tuple[str, int | None]]]:
        """(day, followers) per user from ``since`` on, for a page of users (the sparklines)."""
        out: dict[str, list[tuple[str, int | None]]] = {u: [] for u in user_ids}
        if not user_ids:
            return out
        marks = ", ".join("?" * len(user_ids))
        for u, d, f in self._rows(f"SELECT user_id, day, followers FROM snapshots WHERE user_id IN ({marks})"
                                  " AND day >= ? ORDER BY user_id, day", (*user_ids, since.isoformat())):
            out[str(u)].append((self._day(d), f))
        return out

    def posts_per_day(self, user_id: str, since: dt.date | None = None, until: dt.date | None = None
                      ) -> dict[str, int]:
        """How many of a user's stored posts were published on each UTC day of a range."""
        last = min(until or dt.date.max, dt.date(9998, 12, 31))  # the day after date.max does not exist
        lo = dt.datetime.combine(since or dt.date(1970, 1, 1), dt.time(), dt.UTC)
        hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC)
        rows = self._rows("SELECT create_time FROM posts WHERE user_id = ? AND create_time >= ? AND create_time < ?",
                          (user_id, int(lo.timestamp()), int(hi.timestamp())))
        out: dict[str, int] = {}
        for (t,) in rows:
            day = dt.datetime.fromtimestamp(int(t), dt.UTC).date().isoformat()
            out[day] = out.get(day, 0) + 1
        return out

    def user(self, user_id: str) -> tuple[str, str] | None:
        """(current handle, nickname) of a user id, None if unknown."""
        rows = self._rows("SELECT handle, nickname FROM users WHERE user_id = ?", (user_id,))
        return None if not rows else (str(rows[0][0]), "" if rows[0][1] is None else str(rows[0][1]))

    def safe_renames(self, user_id: str) -> list[RenameRow]:
        """`renames` of one user, or none on a version 1 store (which has no renames table)."""
        return self.renames(user_id) if self.version >= 2 else []

    def _normal(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """Portable values: days as text, times as ISO text, booleans as bool."""
        values = list(row)
        values[1] = self._day(values[1])
        values[2] = values[2].isoformat() if isinstance(values[2], dt.datetime) else str(values[2])
        values[9] = None if values[9] is None else bool(values[9])
        values[10] = None if values[10] is None else bool(values[10])
        return tuple(values)
