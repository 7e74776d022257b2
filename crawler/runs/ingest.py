"""`crawler ingest`: the scheduled job. Profiles (and, with --posts, posts) of a watch list into day files.

A run covers today (UTC): every watch-list user without a snapshot today, plus the posts walks earlier
runs cut short. Each profile is stored under the UTC day it was fetched (`--date` overrides that, marked
in `history days`), so a run may span midnight and no run ever resumes, blocks or fills another day.
The history store is the commit point: one writer task appends a group of rows to `DIR/profiles-DAY.csv`
/ `DIR/posts-DAY.csv`, fsyncs them, then records the snapshots, posts, walk watermarks, the files'
committed lengths and the run's spend in one transaction; a killed run's uncommitted tail is cut off
when the next run opens the file. Watch-list names are bound to user ids in the store, never re-resolved.
Every store call runs in the store's own thread (`StoreThread`), so a silent database never holds the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import fcntl
import functools
import io
import logging
import math
import os
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client
from crawler.api.pagesizes import PageSizes
from crawler.config import Secret, Settings, masked
from crawler.engine.outcome import Outcome
from crawler.engine.stats import ProgressReporter, Snapshot, Summary
from crawler.engine.stop import GracefulStop
from crawler.engine.stop import install_signals as catch_signals
from crawler.errors import (
    EXIT_PRECEDENCE,
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    ItemFailed,
    RunStopped,
    UsageError,
    disk_problems,
    rank,
)
from crawler.files import fsync_dir
from crawler.history.store import HistoryStore, StoreThread, WalkState, connection_lost, parse_day, transient
from crawler.jobs.commands import COMMANDS
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS, auto_workers
from crawler.sinks.csv_sink import cell, drain, write_failures
from crawler.stores.local import RETRIABLE, RETRIABLE_ALL, StateStore, UserDirectory
from crawler.stores.pg_jobs import Outage, deadline

log = logging.getLogger(__name__)

# Test-only clock seam (like killpoints): an ISO time that "now" is, for tests that run ingest as a process.
TEST_NOW_ENV = "CRAWLER_TEST_NOW"
PROFILES, POSTS = "profiles", "posts"
WORKERS = 8
# After SIGINT/SIGTERM, how long a history-store call may take before the run stops waiting for it (a silent
# server): the run then ends as a kill would leave it, and the next run cuts the day files back to what committed.
STOP_GRACE = 5.0
T = TypeVar("T")


def utc_now() -> dt.datetime:
    """The current UTC time (or CRAWLER_TEST_NOW's)."""
    fixed = os.environ.get(TEST_NOW_ENV, "").strip()
    if fixed:
        when = dt.datetime.fromisoformat(fixed)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return dt.datetime.now(dt.UTC)


def history_url(settings: Settings) -> str:
    """The configured history store, or the SQLite file in the data directory."""
    return settings.history_url or str(Path(settings.data_dir) / "history.db")


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What a run did: the day it started on, each part's outcome, and every day it wrote to."""

    day: dt.date
    outcomes: list[Outcome]
    days: tuple[dt.date, ...] = ()
    held_by: str | None = None  # the running ingest that holds the out-dir (this run did nothing)
    by_date: bool = False
    failures_files: tuple[str, ...] = ()
    capped: int = 0  # walks this run stopped at --max-pages (they go on next run)
    budget: int | None = None  # the run's --max-credits

    @property
    def exit_code(self) -> int:
        """The most serious exit of the parts (0 when another ingest holds the out-dir)."""
        codes = [o.exit_code for o in self.outcomes]
        return min(codes, key=EXIT_PRECEDENCE.index) if codes else 0

    @property
    def error(self) -> CrawlerError | None:
        """The stop that ended the run, if any."""
        return next((o.error for o in self.outcomes if o.error is not None), None)


@dataclass(frozen=True, slots=True)
class UserTask:
    """One watch-list item to work on in this run."""

    key: str  # the watch-list item: a handle or id:NNN
    user_id: str | None  # bound in the history store (or given)
    profile: bool  # fetch the profile (no snapshot today yet)
    private: bool = False  # today's snapshot says private (no posts walk)


@dataclass(slots=True)
class _Commit:
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
    ack: asyncio.Future[None] | None = None


class _DayFile:
    """One day file opened for appending at its committed length."""

    def __init__(self, key: str, path: Path, fh: IO[bytes], length: int) -> None:
        self.key = key
        self.path = path
        self.fh = fh
        self.length = length


class Ingest(GracefulStop):
    """One ingest run. `await Ingest(...).run()`."""

    def __init__(self, input_path: str, out_dir: Path, settings: Settings, *, api_key: Secret | str | None,
                 date: str | None, with_posts: bool, restart: bool, retry_failed: bool | str, column: str | None,
                 by_id: bool, quiet: bool, clock: Callable[[], dt.datetime] | None) -> None:
        self.input_path = input_path
        self.out_dir = out_dir
        self.settings = settings
        self._api_key = api_key
        self.override = parse_day(date) if date else None
        self.with_posts = with_posts
        self.restart = restart
        self.retry_failed = retry_failed
        self.column = column
        self.by_id = by_id
        self.quiet = quiet
        self.clock = clock or utc_now
        self.run_id = uuid.uuid4().hex
        self.started = self.clock()
        self.watch_users = 0
        self.store: HistoryStore  # used only in self._thread (see _call)
        self._thread: StoreThread | None = None
        self._signalled: Interrupted | None = None  # SIGINT/SIGTERM: store calls get STOP_GRACE to answer
        self._stopping = asyncio.Event()  # set with _signalled
        self._lost: RunStopped | None = None  # a store call that did not answer in time: no more calls
        self._outage: Outage | None = None  # a PostgreSQL store's retries (the job store's)
        self.client: Client
        self.users: UserDirectory
        self.sizes: PageSizes | None = None
        self._files: dict[tuple[str, dt.date], _DayFile] = {}
        self._dir_id = ""  # the out-dir's id (DIR/.ingest-id), read when the run starts
        self._days: set[dt.date] = set()
        self._queue: asyncio.Queue[_Commit | None] = asyncio.Queue(maxsize=64)
        self._work: asyncio.Queue[UserTask] = asyncio.Queue(maxsize=WORKERS * 4)
        self._stop: CrawlerError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[Any]] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._workers = 0  # workers started; parallelism = "auto" grows them (`_grow`)
        self._committed = (0, 0)  # the client's counters at the last commit
        self.rows: Counter[str] = Counter()
        self.walks: Counter[str] = Counter()  # done, cut (--max-pages), failed
        self.fetched = 0
        self.queued = 0  # users given to the workers
        self.done = 0  # users the workers finished (fetched or failed)
        self.skipped = 0  # users with nothing to do today
        self._queued_users: set[str] = set()  # user ids queued this run
        self.failed = 0  # profiles or walks that failed in this run
        self.elsewhere = 0  # users left to another run on the same history store (it held their claim)

    # -- the day --

    def day_now(self) -> dt.date:
        """The day a profile or post fetched now belongs to: --date, else today in UTC."""
        return self.override or self.clock().astimezone(dt.UTC).date()

    def _retry(self, reason: str) -> bool:
        if not self.retry_failed:
            return False
        return reason in (RETRIABLE_ALL if self.retry_failed == "all" else RETRIABLE)

    # -- the run --

    def request_stop(self, error: CrawlerError) -> None:
        """End the run; a spent budget lets busy workers finish the page in flight, anything else cancels them."""
        if self._stop is None or rank(error) < rank(self._stop):
            self._stop = error
        if isinstance(error, Interrupted):
            self._signalled = self._signalled or error
            self._stopping.set()
            if self._outage is not None:  # a store that is away now is not waited for
                self._outage.abandon(self._signalled)
        soft = isinstance(error, BudgetExhausted) or (isinstance(error, Interrupted) and self._draining)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current and (not soft or task is self._feeder or task in self._idle):
                task.cancel()

    async def run(self, watch: StateStore) -> IngestResult:
        """Work the watch list (already read into ``watch``) to the end of today's work or to a stop."""
        began = time.monotonic()
        self._thread = StoreThread("history")
        opened = False
        try:
            # Opened in its thread: a SQLite connection stays in the thread that made it.
            self.store = await self._call(HistoryStore, history_url(self.settings),
                                          stall_limit=self.settings.retry_stall_limit,
                                          connect_timeout=self.settings.connect_timeout)
            opened = True
            if self.store.postgres:
                self._outage = Outage(f"history.url = {masked(history_url(self.settings))}",
                                      self.settings.retry_stall_limit)
            today = self.day_now()
            self.watch_users = watch.progress().pending
            self._dir_id = _out_dir_id(self.out_dir)
            await self._call(self._open_day, today)
            if self.restart:
                await self._call(self._restart_day, today, await self._watch_ids(watch))
            invalid = [(raw, detail) for raw, _, reason, detail in watch.failures() if reason == "invalid_input"]
            await self._call(self._record_invalid, sorted(invalid), today)
            self.users = UserDirectory(Path(self.settings.data_dir) / "users.db", ttl_days=self.settings.id_ttl_days,
                                       clock=lambda: self.clock().timestamp())
            self.sizes = PageSizes(self.settings.data_dir)
            self.client = Client(self.settings, api_key=self._api_key, request_budget=self.settings.max_credits,
                                 max_connections=max(MAX_AUTO_WORKERS, self.settings.parallelism or 0))
            try:
                async with self.client:
                    await self._work_all(watch)
            finally:
                self.users.close()
            days = sorted(self._days | {today})
            files = await self._call(self._close_days, days)
            outcomes = await self._outcomes(watch, today, began, files)
            code = min((o.exit_code for o in outcomes), key=EXIT_PRECEDENCE.index)
            await self._call(self.store.release_claims, self.run_id)
            await self._call(self.store.end_run, self.run_id, code, self.clock())
            return IngestResult(today, outcomes, tuple(days), by_date=self.override is not None,
                                failures_files=tuple(files), capped=self.walks["cut"],
                                budget=self.settings.max_credits)
        except BaseException:
            if self._lost is not None:  # whatever the abandoned call broke on the way out (a TaskGroup's group)
                raise self._lost from None
            raise
        finally:
            if self._lost is None:  # else the thread is stuck in a call: the files and the store go with the process
                for f in self._files.values():
                    with contextlib.suppress(OSError):
                        f.fh.close()
                if opened:
                    with contextlib.suppress(Exception):
                        await self._call_once(self.store.close)  # never retried: nothing is left to keep
            self._thread.close(wait=False)

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a history-store call in the store's thread and await it (`_call_once`). On PostgreSQL, a lost
        connection or a transaction rolled back for another's sake (a deadlock) is asked again, on a new connection
        if need be, as the job store does: with backoff until ``retry.stall_limit``, the stop at once after a signal.
        """
        if self._outage is None:  # SQLite, or the store being opened
            try:
                return await self._call_once(fn, *args, **kwargs)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                # What committed is kept; the next run cuts the day files back to it and goes on from there.
                self._lost = RunStopped(
                    f"history.url = {masked(history_url(self.settings))}: the connection was lost"
                    f" ({type(exc).__name__}: {_first_line(exc)}); what was committed is kept: run the same command"
                    " again once it answers")
                raise self._lost from None
        try:
            return await self._outage.retry(functools.partial(self._call_by_deadline, fn, *args, **kwargs), transient)
        except RunStopped as exc:  # the stall limit, or a signal during the outage: no more calls
            self._lost = self._lost or exc
            raise

    async def _call_by_deadline(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """One try of a PostgreSQL store's call: a server that accepts it but never answers has the connection
        ended after ``retry.stall_limit`` (the call then fails as on a lost connection)."""
        with deadline(self.settings.retry_stall_limit, self.store.shut_down):
            return await self._call_once(self._again, fn, *args, **kwargs)

    def _again(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn`` in the store's thread, made so that it can be made again: the store first connects again if its
        connection was lost, and the day files forget what ``fn`` appended if it fails (they are opened again at
        their committed lengths, so a retried commit writes its rows once)."""
        self.store.reopen()
        before = {k: f.length for k, f in self._files.items()}
        try:
            return fn(*args, **kwargs)
        except Exception:
            for k, f in list(self._files.items()):
                if before.get(k) != f.length:
                    with contextlib.suppress(OSError):
                        f.fh.close()
                    del self._files[k]
            raise

    async def _call_once(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a history-store call in the store's thread and await it: the loop stays free (requests go on, a
        signal is handled) whatever the database does.

        After SIGINT/SIGTERM a call gets STOP_GRACE seconds to answer; one that does not (a silent server) is
        given up, and so is the store: the run ends with the signal's exit, as a kill would leave it (the store's
        transaction is the commit point; the next run cuts the day files back to what committed).
        """
        if self._lost is not None:
            raise self._lost
        assert self._thread is not None
        call = asyncio.wrap_future(self._thread.submit(fn, *args, **kwargs))
        try:
            if not self._stopping.is_set():
                stopping = asyncio.ensure_future(self._stopping.wait())
                try:
                    await asyncio.wait((call, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
            if not call.done():
                await asyncio.wait((call,), timeout=STOP_GRACE)
        except BaseException:
            call.cancel()  # a call not begun yet is dropped; one under way finishes in its thread
            raise
        if not call.done():
            call.cancel()
            stop = self._signalled
            assert stop is not None
            self._lost = Interrupted(f"{stop}; the history store did not answer within {STOP_GRACE:g} s, so what it"
                                     " had not committed is fetched again", stop.code)
            log.warning("the history store did not answer within %g s of the stop: giving it up", STOP_GRACE)
            raise self._lost
        return call.result()

    def _open_day(self, today: dt.date) -> None:
        """The start of a run, in the store's thread: finish or drop an interrupted --restart, cut the day files
        back to their committed lengths, and put the run on record for today (even if it fetches nothing)."""
        self._finish_restarts()
        self._repair_files()
        with self.store.transaction():
            self.store.put_run_day(self.run_id, today, by_date=self.override is not None, started_at=self.started,
                                   requests_sent=0, credits_billed=0, watch_users=self.watch_users)

    def _close_days(self, days: list[dt.date]) -> list[str]:
        """Every day the run covered has its files, if only a header, and its failures files (store's thread)."""
        for day in days:
            self._file(PROFILES, day)
            if self.with_posts:
                self._file(POSTS, day)
        return self._write_failures(days)

    async def _watch_ids(self, watch: StateStore) -> list[str]:
        """The user ids the watch list stands for: its `id:` entries and the names bound in the store."""
        ids: list[str] = []
        after = 0
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            keys = [key for _, key, *_ in chunk]
            bound = await self._call(self.store.bound_ids, [k for k in keys if not k.startswith("id:")])
            ids += [k[3:] if k.startswith("id:") else bound[k] for k in keys if k.startswith("id:") or k in bound]
        return ids

    def _restart_day(self, today: dt.date, ids: list[str]) -> None:
        """`--restart`: today's snapshots of the watch list's users go, and so do their rows; the profiles file
        keeps the rows of users whose snapshots stay (one dropped from an edited list), so it still holds exactly
        the day's snapshots. In the store's thread.

        The kept rows go to `DIR/.restart-profiles-DAY.csv` first (fsynced); one transaction then drops the
        snapshots and records that file's length as the day file's; the rename follows. A kill before the
        transaction leaves a length that differs from the copy's (the copy is dropped), after it the same length
        (the rename is finished): `_finish_restarts` tells them apart at the next start.
        """
        name = f"{PROFILES}-{today.isoformat()}.csv"
        path, copy = self.out_dir / name, self.out_dir / f".restart-{name}"
        gone = set(ids)
        with copy.open("w", encoding="utf-8", newline="") as out:
            if self.settings.output_bom:
                out.write("\ufeff")
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(ep.Profile.COLUMNS)
            if path.exists() and self._committed_length(name):  # cut to its committed length by _repair_files
                with path.open(encoding="utf-8-sig", newline="") as text:
                    rows = csv.reader(text)
                    next(rows, None)  # the header
                    writer.writerows(r for r in rows if r and r[0] not in gone)
            out.flush()
            os.fsync(out.fileno())
        self.store.restart_day(today, {self._key(PROFILES, today): copy.stat().st_size}, ids)
        testing.reached("restarted")
        os.replace(copy, path)
        fsync_dir(self.out_dir)

    def _finish_restarts(self) -> None:
        """Finish (or drop) a `--restart` a kill interrupted (see `_restart_day`)."""
        for copy in sorted(self.out_dir.glob(f".restart-{PROFILES}-????-??-??.csv")):
            name = copy.name.removeprefix(".restart-")
            if self._committed_length(name) == copy.stat().st_size:
                os.replace(copy, self.out_dir / name)
                fsync_dir(self.out_dir)
            else:
                copy.unlink()

    def _repair_files(self) -> None:
        """Cut every day file back to its committed length: a killed run may have written rows it never committed
        (to a day no later run reopens)."""
        for path in sorted(self.out_dir.glob("*-????-??-??.csv")):
            if not path.name.startswith((f"{PROFILES}-", f"{POSTS}-")):
                continue
            length = self._committed_length(path.name)
            if length is not None and path.stat().st_size > length:
                with path.open("r+b") as fh:
                    fh.truncate(length)
                    os.fsync(fh.fileno())

    def _record_invalid(self, rows: list[tuple[str, str | None]], today: dt.date) -> None:
        """Invalid watch-list lines are today's failures (reason invalid_input). In the store's thread."""
        if rows:
            with self.store.transaction():
                for raw, detail in rows:
                    self.store.put_failure(today, raw, PROFILES, "", "invalid_input", detail or "")

    def _progress(self) -> Snapshot:
        c = self.client.counters
        return Snapshot(done=self.skipped + self.done, total=self.watch_users,
                        rows=self.rows[PROFILES] + self.rows[POSTS], requests=c.requests_sent,
                        credits=c.credits_billed, failed=self.failed, note=self.client.outage.status())

    async def _work_all(self, watch: StateStore) -> None:
        reporter = ProgressReporter("ingest", self._progress, quiet=self.quiet)
        async with asyncio.TaskGroup() as outer:
            writer = outer.create_task(self._writer())
            progress = outer.create_task(reporter.run())
            heartbeat = outer.create_task(self._heartbeat())
            try:
                async with asyncio.TaskGroup() as tg:
                    self._feeder = tg.create_task(self._feed(watch))
                    self._tasks.append(self._feeder)
                    self._tg = tg
                    self._spawn(max(1, self.settings.parallelism or WORKERS))
                    if self._stop is not None:  # a signal handled before these tasks existed (the ledger's
                        self.request_stop(self._stop)  # open awaits): without this the feeder waits forever
            finally:
                self._tg = None
                progress.cancel()
                heartbeat.cancel()
                if not writer.done():
                    await self._queue.put(None)  # the writer commits what is queued, then ends
        await self._commit([])  # requests after the last page (failures, the budget stop) still count

    def _lookup(self, keys: list[str], today: dt.date
                ) -> tuple[dict[str, str | None], dict[str, bool], dict[tuple[str, str], str]]:
        """A chunk of the watch list in the store (its thread): each key's user, today's snapshots, failures."""
        bound = self.store.bound_ids([k for k in keys if not k.startswith("id:")])
        ids = {k: k[3:] if k.startswith("id:") else bound.get(k) for k in keys}
        snaps = self.store.snapshotted([u for u in ids.values() if u], today)
        return ids, snaps, self.store.day_failures(today, keys)

    def _plan(self, key: str, uid: str | None, snaps: dict[str, bool], failed: dict[tuple[str, str], str]
              ) -> UserTask | None:
        """Today's work for a watch-list item from the store's view of it (`_lookup`); None: nothing to do."""
        if (key, PROFILES) in failed and not self._retry(failed[(key, PROFILES)]):
            return None  # fetched today already (it failed): --retry-failed tries it again
        has = uid is not None and uid in snaps
        private = uid is not None and snaps.get(uid, False)
        posts = self.with_posts and not ((key, POSTS) in failed and not self._retry(failed[(key, POSTS)]))
        if has and (not posts or private):  # snapshotted today; no posts to walk
            return None
        return UserTask(key, uid, profile=not has, private=private)

    async def _feed(self, watch: StateStore) -> None:
        """Queue today's work in watch-list order, a chunk at a time, then let the workers go."""
        after = 0
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            today = self.day_now()
            keys = [key for _, key, *_ in chunk]
            ids, snaps, failed = await self._call(self._lookup, keys, today)
            for key in keys:
                uid = ids[key]
                work = self._plan(key, uid, snaps, failed)
                if work is None:
                    self.skipped += 1
                    continue
                if uid is not None:
                    if uid in self._queued_users:  # one user under two names (`name` and `id:N`): once a run
                        self.skipped += 1
                        continue
                    self._queued_users.add(uid)
                self.queued += 1
                await self._work.put(work)
        await self._work.join()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while self._stop is None:
            self._idle.add(me)
            try:
                task = await self._work.get()
            finally:
                self._idle.discard(me)
            try:
                await self._claimed(task)
                self.done += 1
                self._grow()
            except RunStopped as exc:
                self.request_stop(exc)
                return
            finally:
                self._work.task_done()

    def _spawn(self, target: int) -> None:
        """Start workers until `target` run (none once stopping)."""
        while self._tg is not None and self._stop is None and self._workers < target:
            self._workers += 1
            self._tasks.append(self._tg.create_task(self._worker()))

    def _grow(self) -> None:
        """parallelism = "auto": workers enough to keep the rate busy at the latency seen so far (the one rule,
        `pacing.auto_workers`, every kind of run sizes its pool by)."""
        if self.settings.parallelism is None:
            self._spawn(auto_workers(self.client.pace, self.client.counters.latency, self._workers))

    # -- claims: several runs on one history store fetch each user once a day --

    @property
    def _claim_ttl(self) -> int:
        """Seconds a claim outlives a silent run (jobs.heartbeat_timeout, as a silent job worker's items)."""
        return max(1, math.ceil(self.settings.jobs_heartbeat_timeout))

    async def _heartbeat(self) -> None:
        """Keep this run's claims alive while it works: a run that dies stops renewing them, and they expire."""
        while True:
            await asyncio.sleep(self._claim_ttl / 3)
            try:
                await self._call(self.store.renew_claims, self.run_id, self._claim_ttl)
            except RunStopped:
                return  # the store is given up: the run is ending, and says why
            except Exception as exc:  # a lapsed claim costs at most a fetch another run repeats: the run goes on
                log.warning("this run's claims on the history store were not renewed: %s", _first_line(exc))

    async def _claimed(self, task: UserTask) -> None:
        """`_user` under the store's claim of the user for today: skipped while another run's claim is alive, or
        if the store shows the user's day done once claimed (another run committed it); released when done."""
        day = self.day_now()
        subject = f"user:{task.user_id}" if task.user_id else f"name:{task.key}"
        claimed, mine = await self._call(self._claim, task, day, subject)
        self.elsewhere += not claimed
        if mine is None:
            return
        await self._user(mine)
        await self._call(self.store.release_claim, day, subject, self.run_id)

    def _claim(self, task: UserTask, day: dt.date, subject: str) -> tuple[bool, UserTask | None]:
        """Claim the user's day (the store's thread): whether it was free, and the work the store shows left once
        claimed (None: none)."""
        with self.store.transaction():
            if not self.store.claim(day, subject, self.run_id, self._claim_ttl):
                return False, None  # another run is on it
            ids, snaps, failed = self._lookup([task.key], day)
            mine = self._plan(task.key, ids[task.key] or task.user_id, snaps, failed)
            if mine is None:
                self.store.release_claim(day, subject, self.run_id)
            return True, mine

    async def _submit(self, commit: _Commit) -> None:
        self.failed += commit.failure is not None and commit.failure[1] != "pagination_guard"
        commit.ack = asyncio.get_running_loop().create_future()
        await self._queue.put(commit)
        await commit.ack

    async def _user(self, task: UserTask) -> None:
        """One watch-list user: the profile (unless snapshotted today), then the posts walk."""
        uid, private, source = task.user_id, task.private, task.key
        if task.profile:
            endpoint = "/userinfo-by-id/" if uid else "/userinfo-by-username/"
            try:
                profile = await (self.client.user_info(user_id=uid) if uid else self.client.user_info(task.key))
            except ItemFailed as exc:
                await self._submit(_Commit(self.day_now(), task.key, PROFILES, user_id=uid or "",
                                           failure=(exc.endpoint or endpoint, exc.reason, str(exc))))
                return
            testing.reached("fetched")
            now = self.clock()  # read once: the snapshot's day is its fetch time's UTC day, even at midnight
            day = self.override or now.astimezone(dt.UTC).date()
            await self._submit(_Commit(day, task.key, PROFILES, profile=profile, fetched_at=now,
                                       bind=uid is None, user_id=profile.user_id))
            counts = dict(videos=profile.videos, followers=profile.followers, following=profile.following,
                          private=profile.private)
            if uid is None:  # fetched by handle: the shared cache may learn this handle's id
                self.users.learn(task.key, profile.user_id, **counts)  # type: ignore[arg-type]
            else:
                self.users.update_counts(profile.user_id, **counts)  # type: ignore[arg-type]
            uid, private, source = profile.user_id, profile.private, profile.handle
        elif uid is not None:
            handle = await self._call(self.store.handle_of, uid)
            source = handle or task.key
        if self.with_posts and uid is not None and not private:
            await self._walk(task.key, uid, source)

    async def _walk(self, key: str, uid: str, source: str) -> None:
        """Continue a walk cut short, then walk from the newest post down to the watermark.

        A walk is complete when it reaches a post at or below the watermark, the end of the list or the
        --max-items horizon; only then does the watermark move (to the newest post the walk started from).
        --max-pages bounds the pages of one day per user; a cut walk keeps its cursor for the next run.
        """
        cap = self.settings.max_pages
        while True:
            day = self.day_now()
            st = await self._call(self.store.walk_state, uid)
            spent = st.day_pages if st.day == day.isoformat() else 0
            head = st.cursor is None
            if head and st.walked == day.isoformat():
                return  # walked today already
            if cap is not None and spent >= cap:
                self.walks["cut"] += 1
                return
            cursor, stop_at, top, rows = (None, st.through, None, 0) if head else (st.cursor, st.stop_at, st.top,
                                                                                  st.rows)
            horizon = self.settings.max_items
            pages = self.client.pages("posts", {"userid": uid}, source=source, cursor=cursor,
                                      page_size=self.settings.page_size, sizes=self.sizes,
                                      max_pages=None if cap is None else cap - spent,
                                      max_items=None if horizon is None else max(horizon - rows, 1))
            complete = False
            first = True
            try:
                async with aclosing(pages) as walk:
                    async for page in walk:
                        testing.reached("fetched")
                        day = self.day_now()
                        posts = [p for p in page.items if isinstance(p, ep.Post)]
                        if top is None:  # the head of a fresh walk: the watermark once it is complete
                            times = [p.create_time for p in posts if not p.pinned and p.create_time is not None]
                            top = max(times) if times else stop_at
                        reached = stop_at is not None and any(
                            not p.pinned and (p.create_time or 0) <= stop_at for p in posts)
                        fresh = [p for p in posts if stop_at is None or p.pinned or (p.create_time or 0) > stop_at]
                        rows += len(fresh)
                        spent += 1
                        # A continued walk whose first page trips the guard again (an empty page claiming more,
                        # the cursor sent back) has reached the end of the list, as the reference reads those
                        # answers: finish it rather than ask the same dead page every night.
                        dead_end = page.stop is not None and not head and first
                        first = False
                        complete = reached or dead_end or (page.last and page.stop is None and not page.capped)
                        failure = None
                        if complete:
                            state = WalkState(top if top is not None else st.through, None, None, None, 0,
                                              day.isoformat(), spent, day.isoformat() if head else st.walked)
                        else:
                            nxt = page.next_cursor if page.next_cursor is not None else page.cursor
                            if page.stop is not None:
                                nxt = page.cursor  # the guard's page is asked again next run
                                failure = ("/user-posts/", "pagination_guard",
                                           f"{page.stop}; the walk goes on in the next run")
                            state = WalkState(st.through, nxt, stop_at, top, rows, day.isoformat(), spent, st.walked)
                        await self._submit(_Commit(day, key, POSTS, user_id=uid, posts=fresh, walk=state,
                                                   failure=failure))
                        if page.capped and not complete:
                            self.walks["cut"] += 1
                        if complete or page.last:
                            break
            except ItemFailed as exc:
                self.walks["failed"] += 1
                await self._submit(_Commit(self.day_now(), key, POSTS, user_id=uid,
                                           failure=(exc.endpoint or "/user-posts/", exc.reason, str(exc))))
                return
            if not complete:
                return
            if head:
                self.walks["done"] += 1
                return
            # a walk from an earlier run is complete: today's head walk follows

    # -- the single writer: day files, then one transaction in the history store --

    async def _writer(self) -> None:
        while True:
            first = await self._queue.get()
            group = [] if first is None else [first]
            end = first is None or drain(self._queue, group)
            if group:
                try:
                    await self._commit(group)
                except BaseException as exc:
                    for c in group:
                        if c.ack is not None and not c.ack.done():
                            c.ack.set_exception(exc if isinstance(exc, Exception) else RuntimeError("stopped"))
                    raise
                for c in group:
                    if c.ack is not None and not c.ack.done():
                        c.ack.set_result(None)
            if end:
                return

    def _key(self, kind: str, day: dt.date) -> str:
        return self._name_key(f"{kind}-{day.isoformat()}.csv")

    def _name_key(self, name: str) -> str:
        # The out-dir's own id, not its path: stores are shared, and two hosts may both write to /data/out.
        return f"{self._dir_id}/{name}"

    def _committed_length(self, name: str) -> int | None:
        """A day file's committed length; a length an earlier version recorded under the file's path moves to
        the out-dir's id the first time it is read."""
        length = self.store.file_length(self._name_key(name))
        if length is None:
            length = self.store.file_length(str((self.out_dir / name).resolve()))
            if length is not None:
                with self.store.transaction():
                    self.store.put_file_length(self._name_key(name), length)
        return length

    def _file(self, kind: str, day: dt.date) -> _DayFile:
        """The day file, opened once per run at its committed length (a kill's uncommitted tail is cut off)."""
        got = self._files.get((kind, day))
        if got is not None:
            return got
        # The name is built from a date only: no input text ever reaches a path.
        path = self.out_dir / f"{kind}-{day.isoformat()}.csv"
        key = self._key(kind, day)
        length = self._committed_length(path.name)
        size = path.stat().st_size if path.exists() else None
        if length is not None and (size or 0) < length:
            # Shorter than what was committed (deleted, rotated, restored from an old copy): never pad it with
            # zero bytes; the day's file starts again with this run's rows.
            log.warning("%s is shorter than the %d bytes committed to it: starting it again", path.name, length)
            length = 0
            with self.store.transaction():
                self.store.put_file_length(key, 0)
        if length is None:
            # A file ingest never recorded: one an earlier version wrote whole (kept), or none yet.
            length = path.stat().st_size if path.exists() else 0
            with self.store.transaction():
                self.store.put_file_length(key, length)
        fh = path.open("r+b" if path.exists() else "w+b")
        fh.truncate(length)
        fh.seek(length)
        f = self._files[(kind, day)] = _DayFile(key, path, fh, length)
        if length == 0:
            record = ep.Profile if kind == PROFILES else ep.Post
            self._append(f, [record.COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())
            fsync_dir(self.out_dir)
            with self.store.transaction():
                self.store.put_file_length(key, f.length)
        return f

    def _append(self, f: _DayFile, rows: list[Any]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        raw = self.settings.output_raw
        for row in rows:
            writer.writerow([cell(v, raw=raw) for v in row])
        data = ((b"\xef\xbb\xbf" if self.settings.output_bom and f.length == 0 else b"")
                + buf.getvalue().encode("utf-8"))
        f.fh.write(data)
        f.length += len(data)

    async def _commit(self, group: list[_Commit]) -> None:
        """Write the group's new rows, fsync them, then record everything in one store transaction: all of it in
        the store's thread, in that order (the transaction is the commit point)."""
        counters = self.client.counters
        totals = (counters.requests_sent, counters.credits_billed)
        sent, billed = totals[0] - self._committed[0], totals[1] - self._committed[1]
        group.sort(key=lambda c: c.key)  # rows in key order (stable: a user's pages keep theirs): no deadlock
        days, rows, fetched = await self._call(self._commit_now, group, sent, billed)
        self._days |= days
        self.rows.update(rows)
        self.fetched += fetched
        self._committed = totals

    def _commit_now(self, group: list[_Commit], sent: int, billed: int) -> tuple[set[dt.date], Counter[str], int]:
        """`_commit` in the store's thread; the days, rows per part and profiles it committed."""
        touched: dict[int, _DayFile] = {}
        seen_posts: set[str] = set()
        seen_users: set[tuple[str, dt.date]] = set()
        for c in group:
            if c.profile is not None:
                uid = c.profile.user_id
                if (uid, c.day) in seen_users or self.store.snapshotted([uid], c.day):
                    c.profile = None  # at most one snapshot per user and day: this one came second
                    continue  # (its name is still bound below, so it is not fetched again)
                seen_users.add((uid, c.day))
                f = self._file(PROFILES, c.day)
                self._append(f, [[getattr(c.profile, k) for k in ep.Profile.COLUMNS]])
                touched[id(f)] = f
                c.written = 1
            elif c.posts:
                known = self.store.known_posts([p.video_id for p in c.posts]) | seen_posts
                c.posts = [p for p in c.posts if p.video_id not in known]
                seen_posts.update(p.video_id for p in c.posts)
                if c.posts:
                    f = self._file(POSTS, c.day)
                    self._append(f, [[getattr(p, k) for k in ep.Post.COLUMNS] for p in c.posts])
                    touched[id(f)] = f
                    c.written = len(c.posts)
        for f in touched.values():
            f.fh.flush()
        testing.reached("written")
        _fsync([f.fh for f in touched.values()])
        testing.reached("fsynced")
        days: set[dt.date] = set()
        rows: Counter[str] = Counter()
        fetched = 0
        if not group and not sent and not billed:
            return days, rows, fetched
        store = self.store
        with store.transaction():
            for c in group:
                days.add(c.day)
                if c.profile is not None:
                    p = c.profile
                    old = store.handle_of(p.user_id, until=c.day)  # a backfill never renames back from a later name
                    if old is not None and old != p.handle:
                        store.record_rename(p.user_id, old, p.handle, c.day)
                    if c.bind:
                        store.bind(c.key, p.user_id, c.day)
                    store.put_snapshot(c.day, p, fetched_at=c.fetched_at)
                    store.clear_failure(c.day, c.key, PROFILES)
                    fetched += 1
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
                rows[c.part] += c.written
            for f in touched.values():
                store.put_file_length(f.key, f.length)
            testing.reached("committing")
            store.put_run_day(self.run_id, self.day_now(), by_date=self.override is not None,
                              started_at=self.started, requests_sent=sent, credits_billed=billed,
                              watch_users=self.watch_users)
        return days, rows, fetched

    # -- the end --

    def _snapped(self, keys: list[str], covered: list[dt.date]) -> tuple[dict[str, str | None], set[str]]:
        """A chunk of the watch list in the store (its thread): each key's user, and the users snapshotted on any
        covered day."""
        bound = self.store.bound_ids([k for k in keys if not k.startswith("id:")])
        ids = {k: k[3:] if k.startswith("id:") else bound.get(k) for k in keys}
        snapped: set[str] = set()
        for d in covered:
            snapped.update(self.store.snapshotted([u for u in ids.values() if u], d))
        return ids, snapped

    def _write_failures(self, days: list[dt.date]) -> list[str]:
        files = []
        for day in days:
            for part in (PROFILES, POSTS):
                path = self.out_dir / f"{part}-{day.isoformat()}.failures.csv"
                if write_failures(path, self.store.failures(day, part), raw=self.settings.output_raw):
                    files.append(str(path))
        return files

    async def _outcomes(self, watch: StateStore, today: dt.date, began: float, files: list[str]) -> list[Outcome]:
        """One outcome per part, from the store (what the run's days hold) and the client (what this run spent).

        A run that spans midnight covers both days: a user snapshotted on either is done, and a failure on
        either counts (the exit code and the summary would otherwise forget what failed before midnight).
        """
        covered = sorted(self._days | {today})
        today = covered[-1]
        total = done = 0
        after = 0
        done_keys: set[str] = set()
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            keys = [key for _, key, *_ in chunk]
            ids, snapped = await self._call(self._snapped, keys, covered)
            total += len(keys)
            done += len(snapped)
            done_keys.update(k for k, u in ids.items() if u in snapped)
        invalid = watch.progress().failed
        fails: dict[str, Counter[str]] = {PROFILES: Counter(), POSTS: Counter()}
        stored = await self._call(lambda: {part: [self.store.failures(d, part) for d in covered]
                                           for part in (PROFILES, POSTS)})
        for part in (PROFILES, POSTS):
            latest: dict[str, str] = {}  # input -> reason on the latest covered day it failed
            for day_failures in stored[part]:
                latest.update((key, reason) for key, _, reason, _ in day_failures)
            for key, reason in latest.items():
                if part == POSTS or key not in done_keys or len(covered) == 1:
                    fails[part][reason] += 1
        c = self.client.counters
        error = self._stop
        status = "stopped" if error is not None else "completed" if self.queued else "already complete"
        elapsed = time.monotonic() - began
        rate = (f"{self.client.pace.effective_rate:.1f} per {self.client.pace.window:g} s"
                if self.client.pace.enabled else "no limit")

        def part_counts(paths: tuple[str, ...]) -> tuple[int, int]:
            return (sum(c.by_endpoint[p] for p in paths), sum(c.billed_by_endpoint[p] for p in paths))

        p_sent, p_billed = part_counts(("/userinfo-by-id/", "/userinfo-by-username/", "/userid/"))
        w_sent, w_billed = part_counts(("/user-posts/",))
        failed_profiles = sum(fails[PROFILES].values())
        profiles = Summary(
            command="ingest-profiles", status=status, items_total=total + invalid, items_done=done,
            items_failed=failed_profiles, items_pending=max(total + invalid - done - failed_profiles, 0),
            rows_written=self.rows[PROFILES], rows_total=done, requests_sent=p_sent, credits_billed=p_billed,
            run_requests=p_sent, run_credits_billed=p_billed, rate_limited=c.rate_limited, retries=c.retries,
            elapsed=elapsed, responses=dict(c.responses),  # one client for both parts: its answers are told here
            parallelism=self._workers or self.settings.parallelism or WORKERS, rate_used=rate,
            rate_wait_seconds=self.client.gate.wait_seconds, failures=dict(fails[PROFILES]),
            output=str(self.out_dir / f"{PROFILES}-{today.isoformat()}.csv"),
            failures_file=next((f for f in files if Path(f).name.startswith(f"{PROFILES}-{today}")), ""),
            reason=str(error) if error else "",
            notes=((f"day {today.isoformat()} set by --date (a backfill)",) if self.override else ())
            + ((f"{self.elsewhere:,} users were being fetched by another run on this history store",)
               if self.elsewhere else ()))
        outcomes = [Outcome(profiles, error)]
        if self.with_posts:
            notes = []
            if self.walks["cut"]:
                notes.append(f"{self.walks['cut']:,} walks stopped at --max-pages {self.settings.max_pages} for"
                             " today; they go on in the next run")
            posts = Summary(
                command="ingest-posts", status=status, items_total=sum(self.walks.values()),
                items_done=self.walks["done"], items_failed=sum(fails[POSTS].values()),
                items_pending=self.walks["cut"], rows_written=self.rows[POSTS], rows_total=self.rows[POSTS],
                requests_sent=w_sent, credits_billed=w_billed, run_requests=w_sent, run_credits_billed=w_billed,
                rate_limited=0, retries=0,
                elapsed=elapsed, parallelism=self._workers or self.settings.parallelism or WORKERS, rate_used=rate,
                failures=dict(fails[POSTS]), output=str(self.out_dir / f"{POSTS}-{today.isoformat()}.csv"),
                failures_file=next((f for f in files if Path(f).name.startswith(f"{POSTS}-{today}")), ""),
                reason=str(error) if error else "", notes=tuple(notes))
            outcomes.append(Outcome(posts, error))
        return outcomes


def _fsync(files: list[IO[bytes]]) -> None:
    """fsync each file (in the store's thread, before the transaction that commits their lengths)."""
    for fh in files:
        os.fsync(fh.fileno())


def _out_dir_id(out_dir: Path) -> str:
    """The out-dir's identity in the history store (``DIR/.ingest-id``, made on first use): committed lengths of
    day files are keyed by it, so out-dirs at one path on several hosts sharing a store never cut each other's."""
    path = out_dir / ".ingest-id"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="ascii").strip()
        if text:
            return text
    new = uuid.uuid4().hex
    tmp = out_dir / f".ingest-id.{os.getpid()}.tmp"
    with tmp.open("w", encoding="ascii") as fh:
        fh.write(new + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(out_dir)
    return new


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return masked(text.splitlines()[0]) if text else "no message"


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({exc.strerror}); choose a directory you can"
                         " write to") from None
    if not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a directory")


@contextlib.contextmanager
def _out_dir_lock(out_dir: Path, started: dt.datetime) -> Any:
    """Hold DIR's ingest lock (it dies with the process); yield None, or who holds it."""
    path = out_dir / ".ingest.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            yield holder
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {started.isoformat(timespec='seconds')}\n".encode(), 0)
        yield None
    finally:
        os.close(fd)


async def ingest(
    input_path: str,
    out_dir: Path,
    settings: Settings,
    *,
    api_key: Secret | str | None = None,
    date: str | None = None,
    with_posts: bool = False,
    restart: bool = False,
    retry_failed: bool | str = False,
    column: str | None = None,
    by_id: bool = False,
    quiet: bool = True,
    install_signals: bool = True,
    clock: Callable[[], dt.datetime] | None = None,
) -> IngestResult:
    """One ingest run: today's watch-list users without a snapshot today, and the posts walks cut short."""
    run = Ingest(input_path, out_dir, settings, api_key=api_key, date=date, with_posts=with_posts, restart=restart,
                 retry_failed=retry_failed, column=column, by_id=by_id, quiet=quiet, clock=clock)
    _make_out_dir(out_dir)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def sent_any() -> bool:
        client: Client | None = getattr(run, "client", None)
        return client is not None and client.counters.requests_sent > 0

    # A full disk or an unwritable out-dir: one line, exit 2 before any request, 1 after (as the job commands).
    with disk_problems(out_dir, started=sent_any), _out_dir_lock(out_dir, run.started) as holder:
        if holder is not None:
            return IngestResult(run.day_now(), [], held_by=holder)
        if install_signals:
            installed = catch_signals(run.signalled)
        try:
            with tempfile.TemporaryDirectory(prefix="crawler-ingest-") as tmp:
                watch = StateStore(Path(tmp) / "watch.db")
                try:
                    job = JobOptions(command="profiles", input=input_path, output=str(out_dir / "watch.csv"),
                                     column=column, by_id=by_id)
                    entries, _ = input_items(job, COMMANDS["profiles"])
                    batch: list[tuple[str, str, str | None, str | None]] = []
                    for entry in entries:  # de-duplicated on disk: a 1M watch list costs no memory
                        batch.append(entry)
                        if len(batch) >= 5000:
                            watch.add_items(batch)
                            batch.clear()
                            await asyncio.sleep(0)
                            if run._stop is not None:
                                raise run._stop
                    watch.add_items(batch)
                    return await run.run(watch)
                finally:
                    watch.close()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


__all__ = ["TEST_NOW_ENV", "Ingest", "IngestResult", "UserTask", "history_url", "ingest", "utc_now"]
