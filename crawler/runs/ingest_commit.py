"""Ingest's group commit: the single writer (`GroupWriter`) hands a group of `Commit`s to `IngestCommitter`, which
appends their new rows to the day files, fsyncs them, then records the snapshots, posts, walk watermarks, failures,
the files' committed lengths and the run's spend in one history-store transaction (the commit point), all in the
store's thread, in that order."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from crawler import testing
from crawler.api import records as ep
from crawler.engine.writer import GroupWriter
from crawler.files import AppendOnlyFile
from crawler.history.store import WalkState
from crawler.runs.ingest_calls import StoreCalls
from crawler.runs.ingest_files import POSTS, PROFILES, DayFiles
from crawler.runs.ingest_report import Tally


@dataclass(slots=True)
class Commit:
    """What one worker hands the writer: rows for a day file and the store changes that go with them."""

    day: dt.date
    key: str
    part: str  # PROFILES or POSTS
    profile: ep.Profile | None = None
    fetched_at: dt.datetime | None = None
    bind: bool = False
    user_id: str = ""
    posts: list[ep.Post] = field(default_factory=list)
    walk: WalkState | None = None
    failure: tuple[str, str, str] | None = None  # (endpoint, reason, detail)
    written: int = 0


class IngestCommitter:
    """The committer of one run's `GroupWriter`: day files, then one transaction in the history store.

    ``spend`` reads the client's (requests sent, credits billed) so far; ``put_run_day(sent, billed)`` records the
    run's day and what it spent since the last commit (in the store's thread, inside the transaction).
    """

    def __init__(self, calls: StoreCalls, files: DayFiles, tally: Tally, *, spend: Callable[[], tuple[int, int]],
                 put_run_day: Callable[[int, int], None]) -> None:
        self.calls = calls
        self.files = files
        self.tally = tally
        self.spend = spend
        self.put_run_day = put_run_day
        self.writer: GroupWriter[Commit] = GroupWriter(self.commit)  # the single writer of the run
        self._committed = (0, 0)  # the client's counters at the last commit

    async def submit(self, commit: Commit) -> None:
        """Hand a commit to the writer and wait until it is committed."""
        self.tally.failed += commit.failure is not None and commit.failure[1] != "pagination_guard"
        await self.writer.submit(commit)

    async def commit(self, group: list[Commit]) -> None:
        """Write the group's new rows, fsync them, then record everything in one store transaction: all of it in
        the store's thread, in that order (the transaction is the commit point)."""
        totals = self.spend()
        sent, billed = totals[0] - self._committed[0], totals[1] - self._committed[1]
        group.sort(key=lambda c: c.key)  # rows in key order (stable: a user's pages keep theirs): no deadlock
        days, rows, fetched = await self.calls.call(self._commit_now, group, sent, billed)
        self.tally.days |= days
        self.tally.rows.update(rows)
        self.tally.fetched += fetched
        self._committed = totals

    def _commit_now(self, group: list[Commit], sent: int, billed: int) -> tuple[set[dt.date], Counter[str], int]:
        """`commit` in the store's thread; the days, rows per part and profiles it committed."""
        touched = self._write(group)
        days: set[dt.date] = set()
        rows: Counter[str] = Counter()
        fetched = 0
        if not group and not sent and not billed:
            return days, rows, fetched
        store = self.calls.store
        with store.transaction():
            for c in group:
                days.add(c.day)
                fetched += self._record(c)
                rows[c.part] += c.written
            for key, f in touched.items():
                store.put_file_length(key, f.length)
            testing.reached("committing")
            self.put_run_day(sent, billed)
        return days, rows, fetched

    def _write(self, group: list[Commit]) -> dict[str, AppendOnlyFile]:
        """Append the group's new rows to the day files and fsync them; the files touched, by their key in the
        store. A second snapshot of a user on a day, and posts already stored, are dropped from the group."""
        store, files = self.calls.store, self.files
        touched: dict[str, AppendOnlyFile] = {}  # by the file's key in the store
        seen_posts: set[str] = set()
        seen_users: set[tuple[str, dt.date]] = set()
        for c in group:
            if c.profile is not None:
                uid = c.profile.user_id
                if (uid, c.day) in seen_users or store.snapshotted([uid], c.day):
                    c.profile = None  # at most one snapshot per user and day: this one came second
                    continue  # (its name is still bound below, so it is not fetched again)
                seen_users.add((uid, c.day))
                f = touched[files.key(PROFILES, c.day)] = files.file(PROFILES, c.day)
                files.append(f, [files.profile_row(c.profile, c.day, c.fetched_at)])
                c.written = 1
            elif c.posts:
                known = store.known_posts([p.video_id for p in c.posts]) | seen_posts
                c.posts = [p for p in c.posts if p.video_id not in known]
                seen_posts.update(p.video_id for p in c.posts)
                if c.posts:
                    f = touched[files.key(POSTS, c.day)] = files.file(POSTS, c.day)
                    files.append(f, [[getattr(p, k) for k in ep.Post.COLUMNS] for p in c.posts])
                    c.written = len(c.posts)
        for f in touched.values():
            f.flush()
        testing.reached("written")
        for f in touched.values():  # before the transaction that commits their lengths
            f.fsync()
        testing.reached("fsynced")
        return touched

    def _record(self, c: Commit) -> int:
        """One commit's store changes (inside the group's transaction); 1 if it stored a profile's snapshot."""
        store = self.calls.store
        fetched = 0
        if c.profile is not None:
            p = c.profile
            old = store.handle_of(p.user_id, until=c.day)  # a backfill never renames back from a later name
            if old is not None and old != p.handle:
                store.record_rename(p.user_id, old, p.handle, c.day)
            if c.bind:
                store.bind(c.key, p.user_id, c.day)
            store.put_snapshot(c.day, p, fetched_at=c.fetched_at)
            store.clear_failure(c.day, c.key, PROFILES)
            fetched = 1
        elif c.bind and c.user_id:  # a second name of a user snapshotted today: bind it all the same
            store.bind(c.key, c.user_id, c.day)
        if c.part == POSTS and c.user_id:
            store.put_posts(c.day, c.user_id, c.posts)
            if c.walk is not None:
                store.put_walk(c.user_id, c.walk)
            if c.failure is None and c.walk is not None:  # the walk moved on: no longer failed today
                store.clear_failure(c.day, c.key, POSTS)
        if c.failure is not None:
            store.put_failure(c.day, c.key, c.part, *c.failure)
        return fetched
