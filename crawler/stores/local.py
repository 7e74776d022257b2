"""Crawl state for resume (SQLite, WAL): the job, every input item's status and cursor, the counters.

Also the disk-backed exact de-duplication set (the UNIQUE index on items.key). The CSV sink is the
only writer of progress: it fsyncs the CSV, then records the committed length here in one transaction.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawler import sqlite, testing

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

# Tables added after the first release; CREATE ... IF NOT EXISTS makes each a migration of older files.
MIGRATIONS = (
    # `crawler download`: one row per media file of an item (a post; photo posts have several files).
    """
    CREATE TABLE IF NOT EXISTS media (
        seq INTEGER NOT NULL,                   -- items.seq of the post
        n INTEGER NOT NULL,                     -- 0, or the image number of a photo post
        name TEXT NOT NULL UNIQUE,              -- path under DIR, built from digits and a fixed extension
        url TEXT NOT NULL,
        expected INTEGER,                       -- the length the API or the CDN announced, when known
        etag TEXT,                              -- the CDN's validator, sent back as If-Range
        durable INTEGER NOT NULL DEFAULT 0,     -- bytes of NAME.part fsynced; a resume continues here
        status TEXT NOT NULL DEFAULT 'pending', -- pending, done
        refreshed INTEGER NOT NULL DEFAULT 0,   -- 1 once the URL was renewed through /post-detail/
        PRIMARY KEY (seq, n)
    );
    """,
    # Row keys already committed by an item's offset-paginated walk (comments, replies, search, music and
    # challenge lists): a list that grew at its head between runs serves them again at later offsets.
    # Written in the same transaction as the rows; looked up per page, never loaded whole.
    """
    CREATE TABLE IF NOT EXISTS seen (
        seq INTEGER NOT NULL,                   -- items.seq
        key TEXT NOT NULL,                      -- the row's first column (comment_id, video_id, ...)
        PRIMARY KEY (seq, key)
    ) WITHOUT ROWID;
    """,
    # `comments --with-replies`: one reply walk per comment with replies, registered in the commit of its
    # comment page and walked with its own cursor, page count and failure (a failure row for the comment).
    """
    CREATE TABLE IF NOT EXISTS reply_walks (
        seq INTEGER NOT NULL,                   -- items.seq of the post
        comment_id TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending', -- pending, done, failed
        cursor TEXT,                            -- JSON of the next cursor
        pages INTEGER NOT NULL DEFAULT 0,
        rows INTEGER NOT NULL DEFAULT 0,
        reason TEXT, endpoint TEXT, detail TEXT,
        PRIMARY KEY (seq, comment_id)
    ) WITHOUT ROWID;
    """,
)


# Failure reasons that may change on a later try (`--retry-failed`); `not_found` and `private` need
# `--retry-failed=all`; `invalid_input` and `pagination_guard` never change by trying again.
RETRIABLE = ("retries_exhausted", "budget")

# A comments item's cursor once its comment walk has ended while reply walks remain (never an API cursor:
# those are numeric offsets).
COMMENTS_WALKED = "comments-walked"
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


@dataclass(frozen=True, slots=True)
class WalkUpdate:
    """What one committed page changes in a reply walk (`reply_walks`); the first one registers it."""

    seq: int
    comment_id: str
    status: str = "pending"  # pending, done, failed
    cursor: Any = None
    rows: int = 0
    pages: int = 0
    reason: str | None = None
    endpoint: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class MediaFile:
    """One media file of a download job, as stored."""

    seq: int
    n: int
    name: str
    url: str
    expected: int | None = None
    etag: str | None = None
    durable: int = 0
    status: str = "pending"
    refreshed: int = 0


class StateStore:
    """One job's state file. Opened once; `close()` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # synchronous=NORMAL is enough: the CSV is fsynced before its length is committed here, so losing the
        # last transaction to a power cut only means redoing those pages, never duplicating rows.
        self._db = sqlite.connect(path)
        self._db.executescript(SCHEMA)
        for migration in MIGRATIONS:
            self._db.executescript(migration)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(job)")}
        if "reserved" not in columns:
            # Requests reserved before they are sent (--max-credits across kills): a lease unused at a kill
            # counts as spent, so `job()` reports the larger of the two as requests_sent.
            self._db.execute("ALTER TABLE job ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Close the database (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]

    def job(self) -> JobRecord | None:
        """The stored job, if any."""
        row = self._db.execute(
            "SELECT command, input_sha, options, output, status, csv_length, failures_length,"
            " MAX(requests_sent, reserved),"
            " credits_billed, rows, runs FROM job WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return JobRecord(row[0], row[1], json.loads(row[2]), *row[3:])

    def create_job(self, command: str, input_sha: str, options: dict[str, Any], output: str) -> None:
        """Start a fresh job (any previous state is wiped)."""
        now = time.time()
        with self._tx():
            self._db.execute("DELETE FROM job")  # the reservation goes with it: --restart starts the budget over
            self._db.execute("DELETE FROM items")
            self._db.execute("DELETE FROM media")
            self._db.execute("DELETE FROM seen")
            self._db.execute("DELETE FROM reply_walks")
            self._db.execute(
                "INSERT INTO job (id, command, input_sha, options, output, status, created, updated)"
                " VALUES (1, ?, ?, ?, ?, 'ingesting', ?, ?)",
                (command, input_sha, json.dumps(options, sort_keys=True), output, now, now),
            )

    def complete(self) -> bool:
        """No item is pending: the job has nothing left to fetch.

        Decided from the items, never from the job's status flag: a flag written in a transaction of its
        own stays "done" when new items arrive in another (an edited input, a stop while reading it).
        """
        return self._db.execute("SELECT 1 FROM items WHERE status = 'pending' LIMIT 1").fetchone() is None

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
            walks = self._db.execute(
                "UPDATE reply_walks SET status = 'pending', reason = NULL, detail = NULL, endpoint = NULL"
                f" WHERE status = 'failed' AND reason IN ({marks})",
                wanted,
            ).rowcount
            # A done post whose reply walks are tried again resumes after its comment walk.
            self._db.execute("UPDATE items SET status = 'pending', cursor = ? WHERE status = 'done' AND seq IN"
                             " (SELECT seq FROM reply_walks WHERE status = 'pending')", (json.dumps(COMMENTS_WALKED),))
            self._db.execute("UPDATE job SET status = 'running' WHERE id = 1")
        return cur.rowcount + walks

    def begin_incoming(self) -> None:
        """Start reading a (possibly edited) input into a scratch table beside the job's items."""
        self._db.execute("DROP TABLE IF EXISTS temp.incoming")
        self._db.execute("CREATE TEMP TABLE incoming (pos INTEGER PRIMARY KEY, key TEXT NOT NULL, raw TEXT NOT NULL,"
                         " reason TEXT, detail TEXT)")

    def add_incoming(self, items: Iterable[tuple[str, str, str | None, str | None]]) -> None:
        """Append (key, raw, reason, detail) entries of the input being read."""
        with self._tx():
            self._db.executemany("INSERT INTO temp.incoming (key, raw, reason, detail) VALUES (?, ?, ?, ?)", items)

    def merge_incoming(self, input_sha: str) -> tuple[int, int]:
        """Make the job's items those of the input read into `incoming`, whose hash is `input_sha`, and mark the
        job running, in one transaction; return (items added, done items gone).

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
            for table in ("seen", "reply_walks"):  # a seq may be reused
                db.execute(f"DELETE FROM {table} WHERE seq NOT IN (SELECT seq FROM items)")
            before = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            db.execute("INSERT OR IGNORE INTO items (key, raw, status, reason, detail)"
                       " SELECT key, raw, CASE WHEN reason IS NULL THEN 'pending' ELSE 'failed' END, reason, detail"
                       " FROM temp.incoming ORDER BY pos")
            after = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            new_invalid = db.execute("SELECT COUNT(*) FROM temp.incoming WHERE reason = 'invalid_input'").fetchone()[0]
            db.execute("UPDATE job SET input_sha = ?, status = 'running', updated = ? WHERE id = 1",
                       (input_sha, time.time()))
        db.execute("DROP TABLE IF EXISTS temp.incoming")
        return after - before - new_invalid, gone

    def unseen(self, seq: int, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that item `seq` has not committed yet (one page's keys at a time)."""
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(k for (k,) in self._db.execute(
                f"SELECT key FROM seen WHERE seq = ? AND key IN ({marks})", (seq, *chunk)))
        return set(keys) - found

    def commit(
        self, csv_length: int, updates: Iterable[ItemUpdate], requests_sent: int, credits_billed: int,
        seen: Iterable[tuple[int, str]] = (), walks: Iterable[WalkUpdate] = (),
    ) -> None:
        """Record, in one transaction, the fsynced CSV length, item and reply-walk progress, seen row keys and
        the counters."""
        with self._tx():
            self._db.executemany("INSERT OR IGNORE INTO seen (seq, key) VALUES (?, ?)", seen)
            rows = 0
            for w in walks:
                rows += w.rows
                self._db.execute(
                    "INSERT INTO reply_walks (seq, comment_id, status, cursor, rows, pages, reason, endpoint, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (seq, comment_id) DO UPDATE SET"
                    " status = excluded.status,"
                    " cursor = CASE WHEN excluded.status = 'failed' THEN cursor ELSE excluded.cursor END,"
                    " rows = rows + excluded.rows, pages = pages + excluded.pages, reason = excluded.reason,"
                    " endpoint = excluded.endpoint, detail = excluded.detail",
                    (w.seq, w.comment_id, w.status, None if w.cursor is None else json.dumps(w.cursor), w.rows,
                     w.pages, w.reason, w.endpoint, w.detail),
                )
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
            testing.reached("committing")

    def progress(self) -> Progress:
        """Items by status."""
        counts = dict(self._db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
        return Progress(counts.get("pending", 0), counts.get("done", 0), counts.get("failed", 0))

    def failures(self) -> Iterator[tuple[str, str, str, str]]:
        """(input, endpoint, reason, detail) of every failed item, in input order; a failed reply walk's input
        is `VIDEO_ID,COMMENT_ID`, after its post's row."""
        for raw, endpoint, reason, detail in self._db.execute(
            "SELECT raw, endpoint, reason, detail FROM ("
            " SELECT seq, '' AS sub, raw, endpoint, reason, detail FROM items WHERE status = 'failed'"
            " UNION ALL SELECT w.seq, w.comment_id, i.key || ',' || w.comment_id, w.endpoint, w.reason, w.detail"
            " FROM reply_walks w JOIN items i ON i.seq = w.seq WHERE w.status = 'failed') ORDER BY seq, sub"
        ):
            yield raw, endpoint or "", reason or "", detail or ""

    def failure_counts(self) -> dict[str, int]:
        """Failed items (and reply walks) by reason."""
        counts: dict[str, int] = {}
        for table in ("items", "reply_walks"):
            for reason, n in self._db.execute(f"SELECT reason, COUNT(*) FROM {table} WHERE status = 'failed'"
                                              " GROUP BY reason"):
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def reply_walks(self, seq: int) -> list[tuple[str, Any, int]]:
        """(comment_id, cursor, pages so far) of a post's unfinished reply walks, in the order registered."""
        found = self._db.execute("SELECT comment_id, cursor, pages FROM reply_walks WHERE seq = ? AND"
                                 " status = 'pending' ORDER BY comment_id", (seq,)).fetchall()
        return [(cid, None if cur is None else json.loads(cur), pages) for cid, cur, pages in found]

    # --- media files (`crawler download`) ---

    def add_item(self, key: str, raw: str, reason: str | None = None, detail: str | None = None) -> int | None:
        """Insert one item unless its key is known; its seq when new, else None."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO items (key, raw, status, reason, detail) VALUES (?, ?, ?, ?, ?)",
            (key, raw, "failed" if reason else "pending", reason, detail))
        return cur.lastrowid if cur.rowcount else None

    def begin(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction for a batch of `add_item` / `add_media` calls."""
        return self._tx()

    def media(self, seq: int) -> list[MediaFile]:
        """The media files of one item, by image number."""
        return [MediaFile(*row) for row in self._db.execute(
            "SELECT seq, n, name, url, expected, etag, durable, status, refreshed FROM media WHERE seq = ? ORDER BY n",
            (seq,))]

    def pending_media(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str]]:
        """Pending items whose media files are known (seq, key) after ``after``, in input order."""
        return self._db.execute(
            "SELECT seq, key FROM items WHERE status = 'pending' AND seq > ?"
            " AND EXISTS (SELECT 1 FROM media WHERE media.seq = items.seq) ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()

    def add_media(self, files: Iterable[MediaFile], counters: tuple[int, int] | None = None) -> None:
        """Record an item's files, with the (requests_sent, credits_billed) of the call that found their URLs.

        Inside `begin()` it joins that transaction; alone it is its own.
        """
        with contextlib.nullcontext() if self._db.in_transaction else self._tx():
            for f in files:
                self._db.execute(
                    "INSERT OR IGNORE INTO media (seq, n, name, url, expected, refreshed) VALUES (?, ?, ?, ?, ?, ?)",
                    (f.seq, f.n, f.name, f.url, f.expected, f.refreshed))
            if counters is not None:
                self._set_counters(*counters)

    def refresh_media(self, seq: int, files: dict[int, tuple[str, int | None]], requests_sent: int,
                      credits_billed: int) -> None:
        """Store renewed (url, announced length) of an item's files, mark them refreshed, with the counters.

        A partial file without an ETag starts again: nothing proves the new URL serves the same bytes.
        """
        with self._tx():
            for n, (url, expected) in files.items():
                self._db.execute(
                    "UPDATE media SET url = ?, expected = COALESCE(?, expected), refreshed = 1,"
                    " durable = CASE WHEN etag IS NULL THEN 0 ELSE durable END WHERE seq = ? AND n = ?",
                    (url, expected, seq, n))
            self._db.execute("UPDATE media SET refreshed = 1 WHERE seq = ?", (seq,))
            self._set_counters(requests_sent, credits_billed)

    def media_progress(self, seq: int, n: int, *, durable: int, expected: int | None, etag: str | None) -> None:
        """Record how much of a file's .part is fsynced, and what the CDN said of it."""
        self._db.execute("UPDATE media SET durable = ?, expected = ?, etag = ? WHERE seq = ? AND n = ?",
                         (durable, expected, etag, seq, n))

    def media_done(self, seq: int, n: int, length: int) -> None:
        """A file is complete and renamed into place; its item is done when all its files are."""
        with self._tx():
            self._db.execute("UPDATE media SET status = 'done', durable = ?, expected = ? WHERE seq = ? AND n = ?",
                             (length, length, seq, n))
            left = self._db.execute("SELECT COUNT(*) FROM media WHERE seq = ? AND status != 'done'",
                                    (seq,)).fetchone()[0]
            if left == 0:
                self._db.execute("UPDATE items SET status = 'done' WHERE seq = ?", (seq,))
            testing.reached("media_committing")

    def fail_item(self, seq: int, reason: str, endpoint: str, detail: str) -> None:
        """Mark an item failed (its completed files stay done)."""
        self._db.execute("UPDATE items SET status = 'failed', reason = ?, endpoint = ?, detail = ? WHERE seq = ?",
                         (reason, endpoint, detail, seq))

    def set_counters(self, requests_sent: int, credits_billed: int) -> None:
        """Store the job's API counters."""
        self._set_counters(requests_sent, credits_billed)

    def _set_counters(self, requests_sent: int, credits_billed: int) -> None:
        self._db.execute("UPDATE job SET requests_sent = ?, credits_billed = ?, updated = ? WHERE id = 1",
                         (requests_sent, credits_billed, time.time()))

    def reserve(self, upto: int) -> None:
        """Record, before they are sent, that requests up to number `upto` of the job may be sent."""
        self._db.execute("UPDATE job SET reserved = MAX(reserved, ?) WHERE id = 1", (upto,))

    def release(self) -> None:
        """A run ended cleanly: the requests it reserved but never sent are not spent."""
        self._db.execute("UPDATE job SET reserved = requests_sent WHERE id = 1")

    def media_totals(self) -> tuple[int, int, int]:
        """(files done, their bytes, items whose URLs were refreshed)."""
        files, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(durable), 0) FROM media WHERE status = 'done'").fetchone()
        refreshed = self._db.execute("SELECT COUNT(DISTINCT seq) FROM media WHERE refreshed = 1").fetchone()[0]
        return int(files), int(size), int(refreshed)

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite.immediate(self._db)


class UserDirectory:
    """What the data directory knows of users across jobs: handle -> user id and the latest counts.

    Lets later jobs skip `/userid/` calls and lets `estimate` price walks it has counts for.
    """

    def __init__(self, path: Path, *, ttl_days: float = 7.0, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._ttl = ttl_days * 86400.0
        self._clock = clock
        self._db = sqlite.connect(path)
        # One process at a time sets the file up: two ingests sharing the data dir both saw a column missing and
        # both added it ("duplicate column name").
        sqlite.begin(self._db)
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
        self._db.execute("COMMIT")

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
