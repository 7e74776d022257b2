"""Crawl state for resume (SQLite, WAL): the job, every input item's status and cursor, the counters.

Also the disk-backed exact de-duplication set (the UNIQUE index on items.key). The CSV sink is the
only writer of progress: it fsyncs the CSV, then records the committed length here in one transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from crawler import sqlite, testing
from crawler.stores.media import MediaState, migrate_media
from crawler.stores.model import (
    COMMENTS_WALKED,
    RETRIABLE,
    ItemUpdate,
    JobRecord,
    Progress,
    WalkUpdate,
)

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
        name TEXT NOT NULL UNIQUE,              -- path under DIR without its extension (ext), digits and a kind
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


class StateStore(MediaState):
    """One job's state file. Opened once; `close()` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # synchronous=NORMAL is enough: the CSV is fsynced before its length is committed here, so losing the
        # last transaction to a power cut only means redoing those pages, never duplicating rows.
        self._db = sqlite.connect(path)
        self._db.executescript(SCHEMA)
        for migration in MIGRATIONS:
            self._db.executescript(migration)
        migrate_media(self._db)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(job)")}
        if "reserved" not in columns:
            # Requests reserved before they are sent (--max-credits across kills): a lease unused at a kill
            # counts as spent, so `job()` reports the larger of the two as requests_sent.
            self._db.execute("ALTER TABLE job ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0")
        if "input_name" not in columns:
            # The input the job was last run on: "-" for stdin, else the file's absolute path (NULL: a keyword, or
            # a job of an older release), so another input file given for the same output is noticed.
            self._db.execute("ALTER TABLE job ADD COLUMN input_name TEXT")

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

    def create_job(self, command: str, input_sha: str, options: dict[str, Any], output: str,
                   input_name: str | None = None) -> None:
        """Start a fresh job (any previous state is wiped)."""
        now = time.time()
        with self._tx():
            self._db.execute("DELETE FROM job")  # the reservation goes with it: --restart starts the budget over
            self._db.execute("DELETE FROM items")
            self._db.execute("DELETE FROM media")
            self._db.execute("DELETE FROM seen")
            self._db.execute("DELETE FROM reply_walks")
            self._db.execute(
                "INSERT INTO job (id, command, input_sha, options, output, status, created, updated, input_name)"
                " VALUES (1, ?, ?, ?, ?, 'ingesting', ?, ?, ?)",
                (command, input_sha, json.dumps(options, sort_keys=True), output, now, now, input_name),
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

    def input_name(self) -> str | None:
        """The input the job was last run on ("-" for stdin, a file's absolute path; None if not known)."""
        row = self._db.execute("SELECT input_name FROM job WHERE id = 1").fetchone()
        return None if row is None else row[0]

    def set_input_name(self, name: str | None) -> None:
        """Record the input this run reads."""
        self._db.execute("UPDATE job SET input_name = ? WHERE id = 1", (name,))

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
            if cur.rowcount + walks:
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

    def incoming_shared(self) -> tuple[int, int]:
        """(valid items of the input read into `incoming` that the job already has, valid items in it)."""
        self._db.execute("CREATE INDEX IF NOT EXISTS temp.incoming_key ON incoming(key)")
        total, shared = self._db.execute(
            "SELECT COUNT(DISTINCT key), COUNT(DISTINCT CASE WHEN key IN (SELECT key FROM items) THEN key END)"
            " FROM temp.incoming WHERE reason IS NULL").fetchone()
        return int(shared), int(total)

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

    # --- the job's counters (the media files' part of the job is MediaState's) ---

    def set_counters(self, requests_sent: int, credits_billed: int) -> None:
        """Store the job's API counters."""
        self._set_counters(requests_sent, credits_billed)

    def reserve(self, upto: int) -> None:
        """Record, before they are sent, that requests up to number `upto` of the job may be sent."""
        self._db.execute("UPDATE job SET reserved = MAX(reserved, ?) WHERE id = 1", (upto,))

    def release(self) -> None:
        """A run ended cleanly: the requests it reserved but never sent are not spent."""
        self._db.execute("UPDATE job SET reserved = requests_sent WHERE id = 1")
