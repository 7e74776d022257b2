"""Crawl state for resume (SQLite, WAL): the job, every input item's status and cursor, the counters.

Also the disk-backed exact de-duplication set (the UNIQUE index on items.key). The CSV sink is the
only writer of progress: it fsyncs the CSV, then records the committed length here in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawler import killpoints

SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    command TEXT NOT NULL, input_sha TEXT NOT NULL, options TEXT NOT NULL, output TEXT NOT NULL,
    status TEXT NOT NULL,              -- ingesting, running, done
    csv_length INTEGER NOT NULL DEFAULT 0,
    failures_length INTEGER NOT NULL DEFAULT 0,
    requests_sent INTEGER NOT NULL DEFAULT 0, credits_billed INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0, runs INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    raw TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending, done, failed
    cursor TEXT,                              -- JSON of the next cursor of a walk in progress
    rows INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    reason TEXT, endpoint TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS items_status ON items(status, seq);
"""


# Failure reasons that may change on a later try (`--retry-failed`); `not_found` and `private` need
# `--retry-failed=all`; `invalid_input` and `pagination_guard` never change by trying again.
RETRIABLE = ("retries_exhausted", "budget")
RETRIABLE_ALL = (*RETRIABLE, "not_found", "private")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The stored job row."""

    command: str
    input_sha: str
    options: dict[str, Any]
    output: str
    status: str
    csv_length: int
    failures_length: int
    requests_sent: int
    credits_billed: int
    rows: int
    runs: int


@dataclass(frozen=True, slots=True)
class Progress:
    """Counts of items by status."""

    pending: int
    done: int
    failed: int

    @property
    def total(self) -> int:
        """All items."""
        return self.pending + self.done + self.failed


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """What one committed page or item changes."""

    seq: int
    status: str  # pending (walk goes on), done, failed
    cursor: Any = None  # next cursor when pending
    rows: int = 0
    pages: int = 0
    reason: str | None = None
    endpoint: str | None = None
    detail: str | None = None


class StateStore:
    """One job's state file. Opened once; `close()` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is enough: the CSV is fsynced before its length is committed here, so losing the
        # last transaction to a power cut only means redoing those pages, never duplicating rows.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def job(self) -> JobRecord | None:
        """The stored job, if any."""
        row = self._db.execute(
            "SELECT command, input_sha, options, output, status, csv_length, failures_length, requests_sent,"
            " credits_billed, rows, runs FROM job WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return JobRecord(row[0], row[1], json.loads(row[2]), *row[3:])

    def create_job(self, command: str, input_sha: str, options: dict[str, Any], output: str) -> None:
        """Start a fresh job (any previous state is wiped)."""
        now = time.time()
        with self._tx():
            self._db.execute("DELETE FROM job")
            self._db.execute("DELETE FROM items")
            self._db.execute(
                "INSERT INTO job (id, command, input_sha, options, output, status, created, updated)"
                " VALUES (1, ?, ?, ?, ?, 'ingesting', ?, ?)",
                (command, input_sha, json.dumps(options, sort_keys=True), output, now, now),
            )

    def set_input_sha(self, input_sha: str) -> None:
        """Record the input's hash once it has been read whole."""
        self._db.execute("UPDATE job SET input_sha = ?, updated = ? WHERE id = 1", (input_sha, time.time()))

    def set_status(self, status: str) -> None:
        """Mark the job ingesting / running / done."""
        self._db.execute("UPDATE job SET status = ?, updated = ? WHERE id = 1", (status, time.time()))

    def start_run(self) -> None:
        """Count one more run of this job."""
        self._db.execute("UPDATE job SET runs = runs + 1, updated = ? WHERE id = 1", (time.time(),))

    def add_items(self, items: Iterable[tuple[str, str, str | None, str | None]]) -> int:
        """Insert (key, raw, reason, detail) items, skipping exact duplicates; return how many were new.

        Items with a reason are stored already failed (invalid input).
        """
        added = 0
        with self._tx():
            for key, raw, reason, detail in items:
                status = "failed" if reason else "pending"
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO items (key, raw, status, reason, detail) VALUES (?, ?, ?, ?, ?)",
                    (key, raw, status, reason, detail),
                )
                added += cur.rowcount
        return added

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, str, Any, int, int]]:
        """Pending items (seq, key, raw, cursor, rows and pages so far) after ``after``, in input order."""
        found = self._db.execute(
            "SELECT seq, key, raw, cursor, rows, pages FROM items WHERE status = 'pending' AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(seq, key, raw, None if cur is None else json.loads(cur), rows, pages)
                for seq, key, raw, cur, rows, pages in found]

    def retry_failed(self, reasons: Iterable[str] = RETRIABLE) -> int:
        """Put items failed for one of ``reasons`` back to pending (they resume from their last committed
        cursor); return how many.

        By default only reasons that can change are retried (RETRIABLE). Invalid input and a walk a
        pagination guard ended never are: the line or the API would be the same again.
        """
        wanted = sorted(set(reasons) - {"invalid_input", "pagination_guard"})
        marks = ", ".join("?" for _ in wanted) or "NULL"
        with self._tx():
            cur = self._db.execute(
                "UPDATE items SET status = 'pending', reason = NULL, detail = NULL, endpoint = NULL"
                f" WHERE status = 'failed' AND reason IN ({marks})",
                wanted,
            )
            self._db.execute("UPDATE job SET status = 'running' WHERE id = 1")
        return cur.rowcount

    def begin_incoming(self) -> None:
        """Start reading a (possibly edited) input into a scratch table beside the job's items."""
        self._db.execute("DROP TABLE IF EXISTS temp.incoming")
        self._db.execute("CREATE TEMP TABLE incoming (pos INTEGER PRIMARY KEY, key TEXT NOT NULL, raw TEXT NOT NULL,"
                         " reason TEXT, detail TEXT)")

    def add_incoming(self, items: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """Append (key, raw, reason, detail) entries of the input being read."""
        with self._tx():
            self._db.executemany("INSERT INTO temp.incoming (key, raw, reason, detail) VALUES (?, ?, ?, ?)", items)

    def merge_incoming(self) -> tuple[int, int]:
        """Make the job's items those of the input read into `incoming`; return (items added, done items gone).

        Done and failed items still in the input are kept as they are (nothing is fetched twice); new items
        are appended in input order; items no longer in the input are dropped unless done (their rows stay
        in the CSV). Invalid lines are keyed by line number, so they are replaced by the new input's.
        """
        db = self._db
        with self._tx():
            db.execute("CREATE INDEX IF NOT EXISTS temp.incoming_key ON incoming(key)")
            gone = db.execute("SELECT COUNT(*) FROM items WHERE status = 'done' AND key NOT IN"
                              " (SELECT key FROM temp.incoming)").fetchone()[0]
            db.execute("DELETE FROM items WHERE (status != 'done' AND key NOT IN (SELECT key FROM temp.incoming))"
                       " OR reason = 'invalid_input'")
            before = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            db.execute("INSERT OR IGNORE INTO items (key, raw, status, reason, detail)"
                       " SELECT key, raw, CASE WHEN reason IS NULL THEN 'pending' ELSE 'failed' END, reason, detail"
                       " FROM temp.incoming ORDER BY pos")
            after = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            new_invalid = db.execute("SELECT COUNT(*) FROM temp.incoming WHERE reason = 'invalid_input'").fetchone()[0]
        db.execute("DROP TABLE IF EXISTS temp.incoming")
        return after - before - new_invalid, gone

    def commit(
        self, csv_length: int, updates: Iterable[ItemUpdate], requests_sent: int, credits_billed: int
    ) -> None:
        """Record, in one transaction, the fsynced CSV length, item progress and the job's counters."""
        with self._tx():
            rows = 0
            for u in updates:
                rows += u.rows
                # A failure keeps the cursor of the last committed page, so a retry resumes there.
                self._db.execute(
                    "UPDATE items SET status = ?, cursor = CASE WHEN ? = 'failed' THEN cursor ELSE ? END,"
                    " rows = rows + ?, pages = pages + ?, reason = ?, endpoint = ?, detail = ? WHERE seq = ?",
                    (u.status, u.status, None if u.cursor is None else json.dumps(u.cursor), u.rows, u.pages,
                     u.reason, u.endpoint, u.detail, u.seq),
                )
            self._db.execute(
                "UPDATE job SET csv_length = ?, rows = rows + ?, requests_sent = ?, credits_billed = ?, updated = ?"
                " WHERE id = 1",
                (csv_length, rows, requests_sent, credits_billed, time.time()),
            )
            killpoints.reached("committing")

    def progress(self) -> Progress:
        """Items by status."""
        counts = dict(self._db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
        return Progress(counts.get("pending", 0), counts.get("done", 0), counts.get("failed", 0))

    def failures(self) -> Iterator[tuple[str, str, str, str]]:
        """(input, endpoint, reason, detail) of every failed item, in input order."""
        for raw, endpoint, reason, detail in self._db.execute(
            "SELECT raw, endpoint, reason, detail FROM items WHERE status = 'failed' ORDER BY seq"
        ):
            yield raw, endpoint or "", reason or "", detail or ""

    def failure_counts(self) -> dict[str, int]:
        """Failed items by reason."""
        return dict(
            self._db.execute("SELECT reason, COUNT(*) FROM items WHERE status = 'failed' GROUP BY reason").fetchall()
        )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


class UserDirectory:
    """What the data directory knows of users across jobs: handle -> user id and the latest counts.

    Lets later jobs skip `/userid/` calls and lets `estimate` price walks it has counts for.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS users (handle TEXT PRIMARY KEY, user_id TEXT NOT NULL,"
            " videos INTEGER, followers INTEGER, following INTEGER, updated REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS users_id ON users(user_id)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(users)")}
        if "private" not in columns:  # added after the first release of this file
            self._db.execute("ALTER TABLE users ADD COLUMN private INTEGER")

    def close(self) -> None:
        """Close the database (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def user_id(self, handle: str) -> str | None:
        """The known id of a handle."""
        row = self._db.execute("SELECT user_id FROM users WHERE handle = ?", (handle,)).fetchone()
        return None if row is None else str(row[0])

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
        """Remember a handle's id (and counts, when known)."""
        if not handle or not user_id:
            return
        self._db.execute(
            "INSERT INTO users (handle, user_id, videos, followers, following, private, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(handle) DO UPDATE SET user_id = excluded.user_id,"
            " videos = COALESCE(excluded.videos, videos), followers = COALESCE(excluded.followers, followers),"
            " following = COALESCE(excluded.following, following), private = COALESCE(excluded.private, private),"
            " updated = excluded.updated",
            (handle, user_id, videos, followers, following, private, time.time()),
        )
