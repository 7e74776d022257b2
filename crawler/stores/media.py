"""The media files of a download job (`crawler download`): the part of the local job store's file that records each
file's URL, its fsynced length and whether it is done. `StateStore` (local.py) is a `MediaState`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable

from crawler import sqlite, testing
from crawler.stores.model import MediaFile


def migrate_media(db: sqlite3.Connection) -> None:
    """Add the `ext` column to a media table of an older version: its rows keep the whole names they have ("")."""
    if "ext" not in {row[1] for row in db.execute("PRAGMA table_info(media)")}:
        db.execute("ALTER TABLE media ADD COLUMN ext TEXT DEFAULT ''")


class MediaState:
    """A download job's media files and items, on the job's SQLite connection (``_db``, opened by `StateStore`).

    An item skipped (a photo post asked for as a video, say) is done with a reason and no files."""

    _db: sqlite3.Connection

    def add_item(self, key: str, raw: str, reason: str | None = None, detail: str | None = None, *,
                 skipped: bool = False) -> int | None:
        """Insert one item unless its key is known (failed with a reason, or done if ``skipped``); its seq when new,
        else None."""
        status = "done" if skipped else "failed" if reason else "pending"
        cur = self._db.execute(
            "INSERT OR IGNORE INTO items (key, raw, status, reason, detail) VALUES (?, ?, ?, ?, ?)",
            (key, raw, status, reason, detail))
        return cur.lastrowid if cur.rowcount else None

    def skip_item(self, seq: int, reason: str, detail: str, counters: tuple[int, int] | None = None) -> None:
        """The kind of file asked for does not apply to this post: it is done, with ``reason`` (and the
        (requests_sent, credits_billed) of the `/post-detail/` call that showed it, if one did)."""
        with self._tx():
            self._db.execute("UPDATE items SET status = 'done', reason = ?, endpoint = 'media', detail = ?"
                             " WHERE seq = ?", (reason, detail, seq))
            if counters is not None:
                self._set_counters(*counters)

    def skipped(self) -> list[tuple[str, str, str, str]]:
        """(input, endpoint, reason, detail) of every skipped item, in input order."""
        return [(raw, endpoint or "", reason, detail or "") for raw, endpoint, reason, detail in self._db.execute(
            "SELECT raw, endpoint, reason, detail FROM items WHERE status = 'done' AND reason IS NOT NULL"
            " ORDER BY seq")]

    def begin(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction for a batch of `add_item` / `add_media` calls."""
        return self._tx()

    def media(self, seq: int) -> list[MediaFile]:
        """The media files of one item, by image number."""
        return [MediaFile(*row) for row in self._db.execute(
            "SELECT seq, n, name, url, expected, etag, durable, status, refreshed, ext FROM media WHERE seq = ?"
            " ORDER BY n",
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
                    "INSERT OR IGNORE INTO media (seq, n, name, url, expected, refreshed, ext)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (f.seq, f.n, f.name, f.url, f.expected, f.refreshed, f.ext))
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

    def media_named(self, seq: int, n: int, ext: str) -> None:
        """Record the extension the answer gave a file, before any of its bytes is written."""
        with self._tx():
            self._db.execute("UPDATE media SET ext = ? WHERE seq = ? AND n = ?", (ext, seq, n))

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

    # Shared with StateStore: the job row's counters, and its write transactions.

    def _set_counters(self, requests_sent: int, credits_billed: int) -> None:
        self._db.execute("UPDATE job SET requests_sent = ?, credits_billed = ?, updated = ? WHERE id = 1",
                         (requests_sent, credits_billed, time.time()))

    def media_totals(self) -> tuple[int, int, int]:
        """(files done, their bytes, items whose URLs were refreshed)."""
        files, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(durable), 0) FROM media WHERE status = 'done'").fetchone()
        refreshed = self._db.execute("SELECT COUNT(DISTINCT seq) FROM media WHERE refreshed = 1").fetchone()[0]
        return int(files), int(size), int(refreshed)

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite.immediate(self._db)
