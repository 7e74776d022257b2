"""Ingest's out-dir: the day files (`DIR/profiles-DAY.csv`, `DIR/posts-DAY.csv`), their committed lengths in the
history store and their repair, `--restart`'s rewrite of a day, the failures files, the out-dir's id and lock.

Every method of `DayFiles` runs in the history store's thread (`StoreCalls`): it reads and writes the store.
A day file is opened once per run at its committed length (a kill's uncommitted tail is cut off); its length is
committed in the same transaction as the rows' snapshots (`IngestCommitter`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crawler import testing
from crawler.api import records as ep
from crawler.errors import UsageError
from crawler.files import AppendOnlyFile, ShortFile, atomic_write, cut_back, lock_file, replace_durably
from crawler.history.store import HistoryStore
from crawler.sinks.csv_sink import cell, write_failures

log = logging.getLogger("crawler.runs.ingest_files")

PROFILES, POSTS = "profiles", "posts"
# A profiles day file's columns: the profile's, then the snapshot's UTC day and fetch time (ISO-8601, UTC). At the
# end, so readers of the older files (without them) keep working; a file begun without them keeps its header.
PROFILE_DAY_COLUMNS = (*ep.Profile.COLUMNS, "day", "fetched_at")


class DayFiles:
    """The day files of one out-dir, opened at their committed lengths; in the history store's thread."""

    def __init__(self, out_dir: Path, store: HistoryStore, dir_id: str, *, raw: bool, bom: bool) -> None:
        self.out_dir = out_dir
        self.store = store
        self.dir_id = dir_id  # the out-dir's id (DIR/.ingest-id), read when the run starts
        self.raw = raw
        self.bom = bom
        self._files: dict[tuple[str, dt.date], AppendOnlyFile] = {}
        self._old_header: set[dt.date] = set()  # profiles files an earlier version began (no day, fetched_at)

    def key(self, kind: str, day: dt.date) -> str:
        return self.name_key(f"{kind}-{day.isoformat()}.csv")

    def name_key(self, name: str) -> str:
        # The out-dir's own id, not its path: stores are shared, and two hosts may both write to /data/out.
        return f"{self.dir_id}/{name}"

    def committed_length(self, name: str) -> int | None:
        """A day file's committed length; a length an earlier version recorded under the file's path moves to
        the out-dir's id the first time it is read."""
        length = self.store.file_length(self.name_key(name))
        if length is None:
            length = self.store.file_length(str((self.out_dir / name).resolve()))
            if length is not None:
                with self.store.transaction():
                    self.store.put_file_length(self.name_key(name), length)
        return length

    def file(self, kind: str, day: dt.date) -> AppendOnlyFile:
        """The day file, opened once per run at its committed length (a kill's uncommitted tail is cut off)."""
        got = self._files.get((kind, day))
        if got is not None:
            return got
        # The name is built from a date only: no input text ever reaches a path.
        path = self.out_dir / f"{kind}-{day.isoformat()}.csv"
        key = self.key(kind, day)
        length = self.committed_length(path.name)
        if length is None:
            # A file ingest never recorded: one an earlier version wrote whole (kept), or none yet.
            length = path.stat().st_size if path.exists() else 0
            with self.store.transaction():
                self.store.put_file_length(key, length)
        try:
            f = AppendOnlyFile.open(path, length)
        except ShortFile:
            # Shorter than what was committed (deleted, rotated, restored from an old copy): never pad it with
            # zero bytes; the day's file starts again with this run's rows.
            log.warning("%s is shorter than the %d bytes committed to it: starting it again", path.name, length)
            with self.store.transaction():
                self.store.put_file_length(key, 0)
            f = AppendOnlyFile.open(path, 0)
        self._files[(kind, day)] = f
        if kind == PROFILES and f.length and _header(path) == ep.Profile.COLUMNS:
            self._old_header.add(day)
        elif kind == PROFILES:
            self._old_header.discard(day)
        if f.length == 0:
            self.append(f, [PROFILE_DAY_COLUMNS if kind == PROFILES else ep.Post.COLUMNS])
            f.fsync()
            with self.store.transaction():
                self.store.put_file_length(key, f.length)
        return f

    def profile_row(self, profile: ep.Profile, day: dt.date, fetched_at: dt.datetime | None) -> list[Any]:
        """A profiles day file's row: the profile, its day and fetch time (the columns its file was begun with)."""
        row: list[Any] = list(profile.values())
        if day not in self._old_header:
            row += [day.isoformat(), "" if fetched_at is None else fetched_at.astimezone(dt.UTC).isoformat()]
        return row

    def append(self, f: AppendOnlyFile, rows: list[Any]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for row in rows:
            writer.writerow([cell(v, raw=self.raw) for v in row])
        f.append((b"\xef\xbb\xbf" if self.bom and f.length == 0 else b"") + buf.getvalue().encode("utf-8"))

    def lengths(self) -> dict[tuple[str, dt.date], int]:
        """The open files' lengths now (what `forget_changed` compares with)."""
        return {k: f.length for k, f in self._files.items()}

    def forget_changed(self, before: dict[tuple[str, dt.date], int]) -> None:
        """A failed call appended to some files: forget them, so they are opened again at their committed lengths."""
        for k, f in list(self._files.items()):
            if before.get(k) != f.length:
                with contextlib.suppress(OSError):
                    f.fh.close()
                del self._files[k]

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def repair(self) -> None:
        """Cut every day file back to its committed length: a killed run may have written rows it never committed
        (to a day no later run reopens)."""
        for path in sorted(self.out_dir.glob("*-????-??-??.csv")):
            if not path.name.startswith((f"{PROFILES}-", f"{POSTS}-")):
                continue
            length = self.committed_length(path.name)
            if length is not None:
                cut_back(path, length)

    def restart_day(self, today: dt.date, ids: list[str]) -> None:
        """`--restart`: today's snapshots of the watch list's users go, and so do their rows; the profiles file
        keeps the rows of users whose snapshots stay (one dropped from an edited list), so it still holds exactly
        the day's snapshots.

        The kept rows go to `DIR/.restart-profiles-DAY.csv` first (fsynced); one transaction then drops the
        snapshots and records that file's length as the day file's; the rename follows. A kill before the
        transaction leaves a length that differs from the copy's (the copy is dropped), after it the same length
        (the rename is finished): `finish_restarts` tells them apart at the next start.
        """
        name = f"{PROFILES}-{today.isoformat()}.csv"
        path, copy = self.out_dir / name, self.out_dir / f".restart-{name}"
        gone = set(ids)
        kept = bool(path.exists() and self.committed_length(name))  # cut to its committed length by `repair`
        with copy.open("w", encoding="utf-8", newline="") as out:
            if self.bom:
                out.write("\ufeff")
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(_header(path) if kept else PROFILE_DAY_COLUMNS)  # the kept rows' columns
            if kept:
                with path.open(encoding="utf-8-sig", newline="") as text:
                    rows = csv.reader(text)
                    next(rows, None)  # the header
                    writer.writerows(r for r in rows if r and r[0] not in gone)
            out.flush()
            os.fsync(out.fileno())
        self.store.restart_day(today, {self.key(PROFILES, today): copy.stat().st_size}, ids)
        testing.reached("restarted")
        replace_durably(copy, path)

    def finish_restarts(self) -> None:
        """Finish (or drop) a `--restart` a kill interrupted (see `restart_day`)."""
        for copy in sorted(self.out_dir.glob(f".restart-{PROFILES}-????-??-??.csv")):
            name = copy.name.removeprefix(".restart-")
            if self.committed_length(name) == copy.stat().st_size:
                replace_durably(copy, self.out_dir / name)
            else:
                copy.unlink()

    def close_days(self, days: list[dt.date], *, with_posts: bool) -> list[str]:
        """Every day the run covered has its files, if only a header, and its failures files; their paths."""
        for day in days:
            self.file(PROFILES, day)
            if with_posts:
                self.file(POSTS, day)
        files = []
        for day in days:
            for part in (PROFILES, POSTS):
                path = self.out_dir / f"{part}-{day.isoformat()}.failures.csv"
                if write_failures(path, self.store.failures(day, part), raw=self.raw):
                    files.append(str(path))
        return files


def _header(path: Path) -> tuple[str, ...]:
    """A day file's column names (its first line)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return tuple(next(csv.reader(fh), ()))


def out_dir_id(out_dir: Path) -> str:
    """The out-dir's identity in the history store (``DIR/.ingest-id``, made on first use): committed lengths of
    day files are keyed by it, so out-dirs at one path on several hosts sharing a store never cut each other's."""
    path = out_dir / ".ingest-id"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="ascii").strip()
        if text:
            return text
    new = uuid.uuid4().hex
    with atomic_write(path, encoding="ascii") as fh:
        fh.write(new + "\n")
    return new


def make_out_dir(out_dir: Path) -> bool:
    """Make DIR if missing; whether this call made it."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({exc.strerror}); choose a directory you can"
                         " write to") from None
    if not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a directory")
    return created


def drop_empty_out_dir(out_dir: Path) -> None:
    """Remove DIR if it is empty (after a usage error, the out-dir the run made leaves nothing behind)."""
    with contextlib.suppress(OSError):
        out_dir.rmdir()


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, started: dt.datetime) -> Iterator[str | None]:
    """Hold DIR's ingest lock (it dies with the process); yield None, or who holds it."""
    path = out_dir / ".ingest.lock"
    with lock_file(path) as fd:
        if fd is None:
            yield path.read_bytes()[:200].decode("utf-8", "replace").strip() or "another process"
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {started.isoformat(timespec='seconds')}\n".encode(), 0)
        try:
            yield None
        except UsageError:  # a usage error leaves no lock behind (removed while held: `lock_file` allows it)
            path.unlink(missing_ok=True)
            raise
