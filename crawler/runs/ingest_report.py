"""What an ingest run did: its counters (`Tally`), the progress line, and one outcome per part at the end.

A run that spans midnight covers both days: a user snapshotted on either is done, and a failure on either counts
(the exit code and the summary would otherwise forget what failed before midnight).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from crawler.api.client import Client
from crawler.config import Settings
from crawler.engine.outcome import Outcome
from crawler.engine.stats import Snapshot, Summary
from crawler.errors import CrawlerError
from crawler.runs.ingest_calls import StoreCalls
from crawler.runs.ingest_files import POSTS, PROFILES
from crawler.stores.local import StateStore

PROFILE_PATHS = ("/userinfo-by-id/", "/userinfo-by-username/", "/userid/")
POST_PATHS = ("/user-posts/",)


@dataclass(slots=True)
class Tally:
    """The counters of one run."""

    rows: Counter[str] = field(default_factory=Counter)  # rows committed, per part
    walks: Counter[str] = field(default_factory=Counter)  # done, cut (--max-pages), failed
    fetched: int = 0
    queued: int = 0  # users given to the workers
    done: int = 0  # users the workers finished (fetched or failed)
    skipped: int = 0  # users with nothing to do today
    failed: int = 0  # profiles or walks that failed in this run
    elsewhere: int = 0  # users left to another run on the same history store (it held their claim)
    private: int = 0  # private users whose posts were not walked (without --include-private)
    days: set[dt.date] = field(default_factory=set)  # the days the run committed to
    queued_users: set[str] = field(default_factory=set)  # user ids queued this run

    def snapshot(self, client: Client, total: int, *, per_user: int = 1) -> Snapshot:
        """The progress line's numbers; its ETA counts `per_user` requests for each user left (a profile, and
        with --posts a page at least), so a long walk does not push it out."""
        c = client.counters
        done = self.skipped + self.done
        return Snapshot(done=done, total=total, rows=self.rows[PROFILES] + self.rows[POSTS],
                        requests=c.requests_sent, credits=c.credits_billed, failed=self.failed,
                        note=client.outage.status(), requests_left=max(0, total - done) * per_user)


@dataclass(frozen=True, slots=True)
class _Ending:
    """What the summaries of both parts share."""

    today: dt.date
    status: str
    error: CrawlerError | None
    elapsed: float
    rate: float | None  # requests per `window` (None: no limit)
    window: float | None
    parallelism: int
    files: list[str]

    def failures_file(self, part: str) -> str:
        return next((f for f in self.files if Path(f).name.startswith(f"{part}-{self.today}")), "")


class IngestReport:
    """The end of a run: one `Outcome` per part, from the store (what the run's days hold) and the client (what
    this run spent)."""

    def __init__(self, calls: StoreCalls, tally: Tally, settings: Settings, *, out_dir: Path, with_posts: bool,
                 by_date: bool) -> None:
        self.calls = calls
        self.tally = tally
        self.settings = settings
        self.out_dir = out_dir
        self.with_posts = with_posts
        self.by_date = by_date

    async def outcomes(self, watch: StateStore, today: dt.date, began: float, files: list[str], *, client: Client,
                       error: CrawlerError | None, parallelism: int) -> list[Outcome]:
        """One outcome per part (profiles, then posts with --posts)."""
        covered = sorted(self.tally.days | {today})
        total, done, done_keys = await self._done(watch, covered)
        invalid = watch.progress().failed
        fails = await self._failures(covered, done_keys)
        pace = client.pace
        end = _Ending(
            today=covered[-1], error=error,
            status="stopped" if error is not None else "completed" if self.tally.queued else "already complete",
            elapsed=time.monotonic() - began, files=files, parallelism=parallelism,
            rate=pace.effective_rate if pace.enabled else None, window=pace.window if pace.enabled else None)
        outcomes = [Outcome(self._profiles(end, client, total + invalid, done, fails[PROFILES]), error)]
        if self.with_posts:
            outcomes.append(Outcome(self._posts(end, client, fails[POSTS]), error))
        return outcomes

    async def _done(self, watch: StateStore, covered: list[dt.date]) -> tuple[int, int, set[str]]:
        """The watch list's users, those snapshotted on a covered day, and their watch-list keys."""
        total = done = 0
        after = 0
        done_keys: set[str] = set()
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            keys = [key for _, key, *_ in chunk]
            ids, snapped = await self.calls.call(self._snapped, keys, covered)
            total += len(keys)
            done += len(snapped)
            done_keys.update(k for k, u in ids.items() if u in snapped)
        return total, done, done_keys

    def _snapped(self, keys: list[str], covered: list[dt.date]) -> tuple[dict[str, str | None], set[str]]:
        """A chunk of the watch list in the store (its thread): each key's user, and the users snapshotted on any
        covered day."""
        store = self.calls.store
        bound = store.bound_ids([k for k in keys if not k.startswith("id:")])
        ids = {k: k[3:] if k.startswith("id:") else bound.get(k) for k in keys}
        snapped: set[str] = set()
        for d in covered:
            snapped.update(store.snapshotted([u for u in ids.values() if u], d))
        return ids, snapped

    async def _failures(self, covered: list[dt.date], done_keys: set[str]) -> dict[str, Counter[str]]:
        """Failures per part and reason: each input's latest on a covered day (a profile fetched on another covered
        day is not failed)."""
        store = self.calls.store
        fails: dict[str, Counter[str]] = {PROFILES: Counter(), POSTS: Counter()}
        stored = await self.calls.call(lambda: {part: [store.failures(d, part) for d in covered]
                                                for part in (PROFILES, POSTS)})
        for part in (PROFILES, POSTS):
            latest: dict[str, str] = {}  # input -> reason on the latest covered day it failed
            for day_failures in stored[part]:
                latest.update((key, reason) for key, _, reason, _ in day_failures)
            for key, reason in latest.items():
                if part == POSTS or key not in done_keys or len(covered) == 1:
                    fails[part][reason] += 1
        return fails

    def _profiles(self, end: _Ending, client: Client, total: int, done: int, fails: Counter[str]) -> Summary:
        part = _Part.of(client, PROFILE_PATHS)
        failed = sum(fails.values())
        notes = ((f"day {end.today.isoformat()} set by --date (a backfill)",) if self.by_date else ()) + (
            (f"{self.tally.elsewhere:,} users were being fetched by another run on this history store",)
            if self.tally.elsewhere else ()) + ((client.unexpected.note(),) if client.unexpected.note() else ())
        return Summary(
            command="ingest-profiles", status=end.status, items_total=total, items_done=done,
            items_failed=failed, items_pending=max(total - done - failed, 0),
            rows_written=self.tally.rows[PROFILES], rows_total=done, requests_sent=part.sent,
            credits_billed=part.billed, run_requests=part.sent, run_credits_billed=part.billed,
            rate_limited=part.responses.get("rate_limited", 0), retries=part.retries, elapsed=end.elapsed,
            responses=part.responses, parallelism=end.parallelism, rate_used=end.rate, rate_window_seconds=end.window,
            rate_wait_seconds=part.rate_wait_seconds, failures=dict(fails),
            output=str(self.out_dir / f"{PROFILES}-{end.today.isoformat()}.csv"),
            failures_file=end.failures_file(PROFILES),
            reason=str(end.error) if end.error else "", notes=notes)

    def _posts(self, end: _Ending, client: Client, fails: Counter[str]) -> Summary:
        walks, rows = self.tally.walks, self.tally.rows[POSTS]
        part = _Part.of(client, POST_PATHS)
        notes = []
        if walks["cut"]:
            notes.append(f"{walks['cut']:,} walks stopped at --max-pages {self.settings.max_pages} for"
                         " today; they go on in the next run")
        if self.tally.private:
            notes.append(f"{self.tally.private:,} private users: posts not walked (their lists answer an error);"
                         " --include-private walks them anyway")
        return Summary(
            command="ingest-posts", status=end.status, items_total=sum(walks.values()),
            items_done=walks["done"], items_failed=sum(fails.values()),
            items_pending=walks["cut"], rows_written=rows, rows_total=rows,
            requests_sent=part.sent, credits_billed=part.billed, run_requests=part.sent, run_credits_billed=part.billed,
            rate_limited=part.responses.get("rate_limited", 0), retries=part.retries, responses=part.responses,
            elapsed=end.elapsed, parallelism=end.parallelism, rate_used=end.rate, rate_window_seconds=end.window,
            rate_wait_seconds=part.rate_wait_seconds,
            failures=dict(fails), output=str(self.out_dir / f"{POSTS}-{end.today.isoformat()}.csv"),
            failures_file=end.failures_file(POSTS),
            reason=str(end.error) if end.error else "", notes=tuple(notes))


@dataclass(frozen=True, slots=True)
class _Part:
    """What one part's endpoints spent and met (the client is shared by both parts)."""

    sent: int
    billed: int
    retries: int
    rate_wait_seconds: float
    responses: dict[str, int]

    @classmethod
    def of(cls, client: Client, paths: tuple[str, ...]) -> _Part:
        c = client.counters
        responses: Counter[str] = Counter()
        for p in paths:
            responses.update(c.responses_by_endpoint.get(p, {}))
        return cls(sent=sum(c.by_endpoint[p] for p in paths), billed=sum(c.billed_by_endpoint[p] for p in paths),
                   retries=sum(c.retries_by_endpoint[p] for p in paths),
                   rate_wait_seconds=sum(c.rate_wait_by_endpoint.get(p, 0.0) for p in paths),
                   responses={k: n for k, n in sorted(responses.items()) if n})
