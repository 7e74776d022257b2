"""`crawler ingest`: the scheduled job. Profiles (and, with --posts, posts) of a watch list into day files.

A run covers today (UTC): every watch-list user without a snapshot today, plus the posts walks earlier
runs cut short. Each profile is stored under the UTC day it was fetched (`--date` overrides that, marked
in `history days`), so a run may span midnight and no run ever resumes, blocks or fills another day.
The history store is the commit point: one writer task appends a group of rows to `DIR/profiles-DAY.csv`
/ `DIR/posts-DAY.csv`, fsyncs them, then records the snapshots, posts, walk watermarks, the files'
committed lengths and the run's spend in one transaction; a killed run's uncommitted tail is cut off
when the next run opens the file. Watch-list names are bound to user ids in the store, never re-resolved.
Every store call runs in the store's own thread (`StoreThread`), so a silent database never holds the loop.

The run's parts, each in its own module: `ingest_files` (the day files and their repair), `ingest_calls` (the
store's thread), `ingest_plan` (today's work and the claims), `ingest_walk` (a user's profile and the walk to the
watermark), `ingest_commit` (the group commit), `ingest_report` (counters and outcomes); the workers, the writer's
task and the stop are the engine's (`engine/pool.py`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

from crawler import testing
from crawler.api.client import Client
from crawler.api.pagesizes import PageSizes
from crawler.config import Secret, Settings
from crawler.engine.outcome import Outcome
from crawler.engine.pool import Engine, StopPolicy
from crawler.engine.stats import ProgressReporter
from crawler.engine.stop import install_signals as catch_signals
from crawler.engine.stop import remove_signals
from crawler.errors import EXIT_PRECEDENCE, CrawlerError, Interrupted, UsageError, disk_problems
from crawler.history.queries import parse_day
from crawler.history.store import HistoryStore
from crawler.jobs.commands import COMMANDS
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions
from crawler.options import EngineOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS
from crawler.runs.ingest_calls import StoreCalls
from crawler.runs.ingest_commit import IngestCommitter
from crawler.runs.ingest_files import PROFILES, DayFiles, drop_empty_out_dir, make_out_dir, out_dir_id, out_dir_lock
from crawler.runs.ingest_plan import DayPlan
from crawler.runs.ingest_report import IngestReport, Tally
from crawler.runs.ingest_walk import UserTask, UserWork
from crawler.stores.local import StateStore
from crawler.stores.users import UserDirectory

TEST_NOW_ENV = testing.NOW_ENV  # the test-only clock seam (crawler/testing.py)
WORKERS = 8


def utc_now() -> dt.datetime:
    """The current UTC time (or CRAWLER_TEST_NOW's)."""
    fixed = testing.fixed_now()
    if fixed:
        when = dt.datetime.fromisoformat(fixed)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return dt.datetime.now(dt.UTC)


def override_day(date: str | None, *, today: dt.date, force: bool) -> dt.date | None:
    """The day --date sets (None: the fetch day); a day after ``today`` (UTC, the run's clock) is most likely a typo
    and needs --force-date (a UsageError before anything is created or sent)."""
    if not date:
        return None
    day = parse_day(date)
    if day > today and not force:
        raise UsageError(f"--date {day.isoformat()} is after today ({today.isoformat()}, UTC): check the date, or"
                         " add --force-date to record under a future day")
    return day


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
    private: int = 0  # private users whose posts this run did not walk (no --include-private)

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
class WatchList:
    """The engine's item source: today's work over the watch list, in its order (`DayPlan.items`)."""

    plan: DayPlan
    watch: StateStore

    def items(self) -> AsyncGenerator[UserTask, None]:
        """The users to work today, a chunk of the watch list at a time."""
        return self.plan.items(self.watch)


class Ingest:
    """One ingest run. `await Ingest(...).run()`: the wiring of its parts (see the module's docstring)."""

    def __init__(self, input_path: str, out_dir: Path, settings: Settings, *, api_key: Secret | str | None,
                 date: str | None, with_posts: bool, restart: bool, retry_failed: bool | str, column: str | None,
                 by_id: bool, quiet: bool, clock: Callable[[], dt.datetime] | None, force_date: bool = False,
                 include_private: bool = False) -> None:
        self.input_path = input_path
        self.out_dir = out_dir
        self.settings = settings
        self._api_key = api_key
        self.clock = clock or utc_now
        self.started = self.clock()
        self.override = override_day(date, today=self.started.astimezone(dt.UTC).date(), force=force_date)
        self.with_posts = with_posts
        self.restart = restart
        self.column = column
        self.by_id = by_id
        self.quiet = quiet
        self.run_id = uuid.uuid4().hex
        self.watch_users = 0
        self.tally = Tally()
        self.calls = StoreCalls(history_url(settings), stall_limit=settings.retry_stall_limit)
        self.store: HistoryStore  # used only in the store's thread (see StoreCalls.call)
        self.client: Client
        self.users: UserDirectory
        self.sizes: PageSizes | None = None
        self.files: DayFiles  # opened with the store
        self.commits: IngestCommitter  # the single writer: day files, then the history store
        self.plan = DayPlan(self.calls, self.tally, run_id=self.run_id, with_posts=with_posts,
                            retry_failed=retry_failed, heartbeat_timeout=settings.jobs_heartbeat_timeout,
                            day_now=self.day_now, include_private=include_private)
        self.include_private = include_private
        self.work: UserWork  # made with the client
        self.stop = StopPolicy(quiet=quiet)  # the engine's: a first signal or a spent budget drains, else at once
        self.workers = 0  # workers the engine started

    def day_now(self) -> dt.date:
        """The day a profile or post fetched now belongs to: --date, else today in UTC."""
        return self.override or self.clock().astimezone(dt.UTC).date()

    # -- the run --

    def request_stop(self, error: CrawlerError) -> None:
        """End the run (`StopPolicy`): a spent budget lets busy workers finish the page in flight, anything else
        cancels them."""
        if isinstance(error, Interrupted):
            self.calls.signal(error)  # a store that is away now is not waited for
        self.stop.request_stop(error)

    def signalled(self, error: Interrupted) -> int:
        """A SIGINT/SIGTERM (`StopPolicy.signalled`: the first drains the requests under way, a second stops at
        once); store calls from now on get STOP_GRACE to answer. The number of answers the stop waits for."""
        self.calls.signal(error)
        return self.stop.signalled(error)

    async def run(self, watch: StateStore) -> IngestResult:
        """Work the watch list (already read into ``watch``) to the end of today's work or to a stop."""
        began = time.monotonic()
        opened = False
        try:
            self.store = await self.calls.open(connect_timeout=self.settings.connect_timeout)
            opened = True
            today = self.day_now()
            self.watch_users = watch.progress().pending
            await self._start(watch, today)
            try:
                async with self.client:
                    await self._work_all(watch)
            finally:
                self.users.close()
            return await self._finish(watch, today, began)
        except BaseException:
            if self.calls.lost is not None:  # whatever the abandoned call broke on the way out (a TaskGroup's group)
                raise self.calls.lost from None
            raise
        finally:
            await self.calls.close(opened=opened)

    async def _start(self, watch: StateStore, today: dt.date) -> None:
        """Open the day files, put the run on record, --restart, and make the client and its companions."""
        self.files = DayFiles(self.out_dir, self.store, out_dir_id(self.out_dir), raw=self.settings.output_raw,
                              bom=self.settings.output_bom)
        self.calls.files = self.files
        self.commits = IngestCommitter(self.calls, self.files, self.tally, spend=self._spend,
                                       put_run_day=self._put_run_day)
        await self.calls.call(self._open_day, today)
        if self.restart:
            await self.calls.call(self.files.restart_day, today, await self._watch_ids(watch))
        invalid = [(raw, detail) for raw, _, reason, detail in watch.failures() if reason == "invalid_input"]
        await self.calls.call(self._record_invalid, sorted(invalid), today)
        self.users = UserDirectory(Path(self.settings.data_dir) / "users.db", ttl_days=self.settings.id_ttl_days,
                                   clock=lambda: self.clock().timestamp())
        self.sizes = PageSizes(self.settings.data_dir)
        self.client = Client(self.settings, api_key=self._api_key, request_budget=self.settings.max_credits,
                             max_connections=max(MAX_AUTO_WORKERS, self.settings.parallelism or 0))
        self.stop.attach(self.client)
        self.work = UserWork(client=self.client, users=self.users, sizes=self.sizes, calls=self.calls,
                             submit=self.commits.submit, tally=self.tally, settings=self.settings,
                             with_posts=self.with_posts, clock=self.clock, override=self.override,
                             include_private=self.include_private)

    async def _finish(self, watch: StateStore, today: dt.date, began: float) -> IngestResult:
        """Every covered day's files and failures files, the outcomes, and the run's end on record."""
        days = sorted(self.tally.days | {today})
        files = await self.calls.call(self.files.close_days, days, with_posts=self.with_posts)
        report = IngestReport(self.calls, self.tally, self.settings, out_dir=self.out_dir, with_posts=self.with_posts,
                              by_date=self.override is not None)
        outcomes = await report.outcomes(watch, today, began, files, client=self.client, error=self.stop.error,
                                         parallelism=self.workers or self.settings.parallelism or WORKERS)
        code = min((o.exit_code for o in outcomes), key=EXIT_PRECEDENCE.index)
        await self.calls.call(self.store.release_claims, self.run_id)
        await self.calls.call(self.store.end_run, self.run_id, code, self.clock())
        return IngestResult(today, outcomes, tuple(days), by_date=self.override is not None,
                            failures_files=tuple(files), capped=self.tally.walks["cut"],
                            budget=self.settings.max_credits, private=self.tally.private)

    def _put_run_day(self, sent: int, billed: int, day: dt.date | None = None) -> None:
        """The run's record for ``day`` (the day it is on now), with what it spent since the last commit (in the
        store's thread and transaction)."""
        self.store.put_run_day(self.run_id, day or self.day_now(), by_date=self.override is not None,
                               started_at=self.started, requests_sent=sent, credits_billed=billed,
                               watch_users=self.watch_users)

    def _spend(self) -> tuple[int, int]:
        counters = self.client.counters
        return counters.requests_sent, counters.credits_billed

    def _open_day(self, today: dt.date) -> None:
        """The start of a run, in the store's thread: finish or drop an interrupted --restart, cut the day files
        back to their committed lengths, and put the run on record for today (even if it fetches nothing)."""
        self.files.finish_restarts()
        self.files.repair()
        with self.store.transaction():
            self._put_run_day(0, 0, today)

    async def _watch_ids(self, watch: StateStore) -> list[str]:
        """The user ids the watch list stands for: its `id:` entries and the names bound in the store."""
        ids: list[str] = []
        after = 0
        while chunk := watch.pending(after, 500):
            after = chunk[-1][0]
            keys = [key for _, key, *_ in chunk]
            bound = await self.calls.call(self.store.bound_ids, [k for k in keys if not k.startswith("id:")])
            ids += [k[3:] if k.startswith("id:") else bound[k] for k in keys if k.startswith("id:") or k in bound]
        return ids

    def _record_invalid(self, rows: list[tuple[str, str | None]], today: dt.date) -> None:
        """Invalid watch-list lines are today's failures (reason invalid_input). In the store's thread."""
        if rows:
            with self.store.transaction():
                for raw, detail in rows:
                    self.store.put_failure(today, raw, PROFILES, "", "invalid_input", detail or "")

    async def _work_all(self, watch: StateStore) -> None:
        """Today's work on the engine (the watch list, `_handle`, the writer, the progress line), the claims kept
        alive meanwhile."""
        reporter = ProgressReporter("ingest", lambda: self.tally.snapshot(self.client, self.watch_users,
                                                                            per_user=1 + self.with_posts),
                                    quiet=self.quiet)
        parallelism = self.settings.parallelism
        engine = Engine(source=WatchList(self.plan, watch), handler=self._handle, stop=self.stop,
                        options=EngineOptions(workers=parallelism, start=max(1, parallelism or WORKERS)),
                        client=self.client, committer=self.commits.writer, reporter=reporter)
        async with asyncio.TaskGroup() as tg:
            heartbeat = tg.create_task(self.plan.heartbeat())
            try:
                await engine.run()
            finally:
                heartbeat.cancel()
                self.workers = engine.tally.workers
        await self.commits.commit([])  # requests after the last page (failures, the budget stop) still count

    async def _handle(self, task: UserTask) -> None:
        """One user of the pool's: its work under the store's claim."""
        await self.plan.claimed(task, self.work.user)
        self.tally.done += 1


async def _read_watch(run: Ingest, watch: StateStore) -> None:
    """Read the watch list into ``watch``, de-duplicated on disk (a 1M watch list costs no memory); a stop (a
    signal) ends the reading."""
    job = JobOptions(command="profiles", input=run.input_path, output=str(run.out_dir / "watch.csv"),
                     column=run.column, by_id=run.by_id)
    entries, _ = input_items(job, COMMANDS["profiles"])
    batch: list[tuple[str, str, str | None, str | None]] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= 5000:
            watch.add_items(batch)
            batch.clear()
            await asyncio.sleep(0)
            if run.stop.error is not None:
                raise run.stop.error
    watch.add_items(batch)


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
    force_date: bool = False,
    include_private: bool = False,
) -> IngestResult:
    """One ingest run: today's watch-list users without a snapshot today, and the posts walks cut short."""
    run = Ingest(input_path, out_dir, settings, api_key=api_key, date=date, with_posts=with_posts, restart=restart,
                 retry_failed=retry_failed, column=column, by_id=by_id, quiet=quiet, clock=clock,
                 force_date=force_date, include_private=include_private)
    created = make_out_dir(out_dir)
    try:
        return await _ingest_in(run, out_dir, install_signals)
    except UsageError:
        if created:  # a usage error leaves nothing behind: the out-dir this run made goes if it stayed empty
            drop_empty_out_dir(out_dir)
        raise


async def _ingest_in(run: Ingest, out_dir: Path, install_signals: bool) -> IngestResult:
    installed: list[signal.Signals] = []

    def sent_any() -> bool:
        client: Client | None = getattr(run, "client", None)
        return client is not None and client.counters.requests_sent > 0

    # A full disk or an unwritable out-dir: one line, exit 2 before any request, 1 after (as the job commands).
    with disk_problems(out_dir, started=sent_any), out_dir_lock(out_dir, run.started) as holder:
        if holder is not None:
            return IngestResult(run.day_now(), [], held_by=holder)
        if install_signals:
            installed = catch_signals(run.signalled)
        try:
            with tempfile.TemporaryDirectory(prefix="crawler-ingest-") as tmp:
                watch = StateStore(Path(tmp) / "watch.db")
                try:
                    await _read_watch(run, watch)
                    return await run.run(watch)
                finally:
                    watch.close()
        finally:
            remove_signals(installed)


__all__ = ["TEST_NOW_ENV", "Ingest", "IngestResult", "UserTask", "history_url", "ingest", "utc_now"]
