"""What the data directory knows of users across jobs (SQLite, `users.db`): handle -> user id and the latest counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from crawler import sqlite


class UserDirectory:
    """What the data directory knows of users across jobs: handle -> user id and the latest counts.

    Lets later jobs skip `/userid/` calls and lets `estimate` price walks it has counts for.
    """

    def __init__(self, path: Path | None, *, ttl_days: float = 7.0, clock: Callable[[], float] = time.time) -> None:
        """Open (or create) `path`; None: an empty directory in memory, gone when closed."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._ttl = ttl_days * 86400.0
        self._clock = clock
        self._db = sqlite.connect(path if path is not None else ":memory:")
        # One process at a time sets the file up: two ingests sharing the data dir both saw a column missing and
        # both added it ("duplicate column name").
        with sqlite.immediate(self._db):
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS users (handle TEXT PRIMARY KEY, user_id TEXT NOT NULL,"
                " videos INTEGER, followers INTEGER, following INTEGER, updated REAL NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS users_id ON users(user_id)")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(users)")}
            if "private" not in columns:  # added after the first release of this file
                self._db.execute("ALTER TABLE users ADD COLUMN private INTEGER")
            if "bound" not in columns:
                # When the handle -> id binding was last confirmed by the API (a profile or /userid/ fetched by
                # handle); `updated` also moves when counts alone are refreshed. Older rows start from `updated`.
                self._db.execute("ALTER TABLE users ADD COLUMN bound REAL")
                self._db.execute("UPDATE users SET bound = updated")

    @classmethod
    def reading(cls, path: Path, *, ttl_days: float = 7.0) -> UserDirectory:
        """For a command that only reads (`estimate`): `path` if it exists, else an empty directory; neither the
        file nor the data directory is created."""
        return cls(path if path.exists() else None, ttl_days=ttl_days)

    def close(self) -> None:
        """Close the database (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def user_id(self, handle: str) -> str | None:
        """The known id of a handle, unless its binding is older than `crawl.id_ttl_days` (a handle can change
        hands: an expired entry is resolved again, one `/userid/` call)."""
        row = self._db.execute("SELECT user_id FROM users WHERE handle = ? AND bound > ?",
                               (handle, self._clock() - self._ttl)).fetchone()
        return None if row is None else str(row[0])

    def update_counts(self, user_id: str, *, videos: int | None = None, followers: int | None = None,
                      following: int | None = None, private: bool | None = None) -> None:
        """Refresh the counts of a user fetched by id, without touching (or confirming) any handle binding."""
        self._db.execute(
            "UPDATE users SET videos = COALESCE(?, videos), followers = COALESCE(?, followers),"
            " following = COALESCE(?, following), private = COALESCE(?, private), updated = ? WHERE user_id = ?",
            (videos, followers, following, private, self._clock(), user_id))

    def counts(self, handle_or_id: str) -> tuple[int | None, int | None, int | None, bool] | None:
        """(videos, followers, following, private) last seen for a handle or a user id."""
        row = self._db.execute(
            "SELECT videos, followers, following, private FROM users WHERE handle = ? OR user_id = ?"
            " ORDER BY updated DESC",
            (handle_or_id, handle_or_id),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], bool(row[3]))

    def learn(
        self,
        handle: str,
        user_id: str,
        *,
        videos: int | None = None,
        followers: int | None = None,
        following: int | None = None,
        private: bool | None = None,
    ) -> None:
        """Remember a handle's id as the API just answered it for that handle (and counts, when known).

        Only answers to a request made by handle belong here: a profile fetched by id says nothing about
        who owns a name a watch list once had (use `update_counts`).
        """
        if not handle or not user_id:
            return
        now = self._clock()
        self._db.execute(
            "INSERT INTO users (handle, user_id, videos, followers, following, private, updated, bound)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(handle) DO UPDATE SET user_id = excluded.user_id,"
            " videos = COALESCE(excluded.videos, videos), followers = COALESCE(excluded.followers, followers),"
            " following = COALESCE(excluded.following, following), private = COALESCE(excluded.private, private),"
            " updated = excluded.updated, bound = excluded.bound",
            (handle, user_id, videos, followers, following, private, now, now),
        )
