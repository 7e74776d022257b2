"""The run: a TaskGroup of workers walking paginators, feeding the CSV sink, committed page by page.

Flow: `inputs` -> `job.prepare()` (the state store) -> `Crawl.run()` (workers, handlers from `commands`)
-> `sinks` -> `outcome`. Workers take pending items in input order; each page of rows goes to the sink
and is committed before the worker asks for the next page.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client, Counters
from crawler.api.pagesizes import PageSizes
from crawler.config import Secret, Settings
from crawler.engine.lease import LocalLease
from crawler.engine.outcome import Outcome, RunFacts, outcome
from crawler.engine.pool import Engine, StopPolicy, Tally
from crawler.engine.stats import ProgressReporter, Snapshot
from crawler.engine.stop import install_signals as catch_signals
from crawler.engine.stop import remove_signals
from crawler.engine.writer import GroupWriter
from crawler.errors import (
    CrawlerError,
    Interrupted,
    ItemFailed,
    RunStopped,
    UsageError,
    disk_problems,
)
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.estimate import requests_left, walk_size
from crawler.jobs.prepare import (
    JobOptions,
    Prepared,
    WorkItem,
    check_output,
    failures_path,
    job_files,
    job_lock,
    lock_path,
    prepare,
    state_path,
)
from crawler.jobs.walker import ItemWalker, step_update
from crawler.options import EngineOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS
from crawler.sinks.csv_sink import Batch, CsvSink, write_failures
from crawler.sinks.datafile import record_kinds, write_datafile
from crawler.stores.local import StateStore
from crawler.stores.model import ItemUpdate
from crawler.stores.users import UserDirectory


class Crawl(ItemWalker):
    """One run of one job. Build it, then `await crawl.run()` (inside `job_lock`)."""

    def __init__(
        self,
        job: JobOptions,
        settings: Settings,
        *,
        api_key: Secret | str | None = None,
        restart: bool = False,
        retry_failed: bool | str = False,
        continue_job: bool = False,
        overwrite: bool = False,
        quiet: bool = True,
        durable: bool = True,
        progress_interval: float | None = None,
        flowing: asyncio.Event | None = None,
        spec: CommandSpec | None = None,
        earlier: Counters | None = None,
    ) -> None:
        if spec is None and job.command not in COMMANDS:
            raise UsageError(f"unknown command {job.command!r}")
        self.job = job
        self.spec = spec or COMMANDS[job.command]
        self.settings = settings
        self.out = Path(job.output)
        self._api_key = api_key
        self._restart = restart
        self._retry_failed = retry_failed
        self._continue = continue_job  # another input file sharing under half the job's items goes on (--continue)
        self.overwrite = overwrite
        self.input_change: tuple[int, int] | None = None  # (items added, done items gone) of an edited input
        self.input_renamed: tuple[str, str] | None = None  # (the job's input, this one): another input file
        self.capped = 0  # walks this run ended at the --max-pages cap
        self._base_counters = (0, 0)  # the job's requests_sent and credits_billed when this run began
        self._expected_end = 0  # the job's requests_sent expected at the end of this run (the ETA's)
        self._earlier = earlier  # requests this command sent for the job before its client (the region lookup)
        self.quiet = quiet
        self._durable = durable
        self._progress_interval = progress_interval
        self._flowing = flowing  # a test/ops hook: clear it to stall the sink
        self.stop = StopPolicy(quiet=quiet)
        self._keyed = self.spec.list_kind in ep.OFFSET_KINDS  # rows checked against the seen keys
        self._tally = Tally()  # the engine's count (workers started)
        self.client: Client
        self.state: StateStore
        self.users: UserDirectory
        self.page_sizes: PageSizes | None = None
        self.sink: CsvSink
        self._lease: LocalLease
        self.writer: GroupWriter[Batch]

    # -- helpers used by handlers --

    def limits(self) -> tuple[int | None, int | None]:
        """(--max-pages, page size): the job's options, else the settings'."""
        return self.job.max_pages or self.settings.max_pages, self.job.page_size or self.settings.page_size

    def reply_walks(self, item: WorkItem) -> list[tuple[str, ep.Cursor | None, int]]:
        """The item's reply walks still to do: (comment_id, cursor, pages so far)."""
        return self.state.reply_walks(item.seq)

    # -- the run --

    @property
    def _stop_error(self) -> CrawlerError | None:
        return self.stop.error

    def request_stop(self, error: CrawlerError) -> None:
        """End the run: workers stop, what is complete gets committed, `error` decides the exit (`StopPolicy`:
        a spent --max-credits budget or a first signal lets the pages under way be committed)."""
        self.stop.request_stop(error)

    def signalled(self, error: Interrupted) -> int:
        """A SIGINT/SIGTERM (see `StopPolicy`); the number of answers the stop waits for."""
        return self.stop.signalled(error)

    async def run(self) -> Outcome:
        """Run (or resume) the job to completion or to a stop."""
        started = time.monotonic()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(state_path(self.out))
        try:
            try:
                prepared = await prepare(self.state, self.job, self.spec, restart=self._restart,
                                         retry_failed=self._retry_failed, pause=self._yield_to_signals,
                                         continue_job=self._continue)
            except RunStopped as exc:
                if exc is not self._stop_error or self.state.job() is None:
                    raise
                return self._outcome(started, "stopped", 0)  # a signal while the input was being read
            self.input_change, self.input_renamed = prepared.input_change, prepared.renamed
            if prepared.state is Prepared.COMPLETE:
                await self._write_datafile(if_missing=True)
                why = "no failure it retries" if prepared.nothing_to_retry else "nothing to do"
                return self._outcome(started, "already complete", 0, reason=f"{why}; --restart runs it again")
            # Opened only now: a usage error found while preparing leaves no data directory behind.
            data_dir = Path(self.settings.data_dir)
            with disk_problems(data_dir, started=self.sent_any):
                self.users = UserDirectory(data_dir / "users.db", ttl_days=self.settings.id_ttl_days)
            self.page_sizes = PageSizes(self.settings.data_dir)
            job = self.state.job()
            assert job is not None
            self._open(job.requests_sent, job.credits_billed)
            self.state.start_run()
            async with self.client:
                await self.sink.open(job.csv_length)
                try:
                    self._expected_end = self._counters_now()[0] + self._requests_left()
                    await self._engine().run()
                    await self.sink.checkpoint()  # requests sent after the last page still count
                    await self._lease.settle(self.client.counters.requests_sent)
                finally:
                    self.sink.close()
            progress = self.state.progress()
            complete = self._stop_error is None and progress.pending == 0
            write_failures(failures_path(self.out), self.state.failures(), raw=self.settings.output_raw)
            if complete:
                self.sink.finalize()
                self.state.set_status("done")
                await self._write_datafile()
            return self._outcome(started, "completed" if complete else "stopped", self.sink.rows_written)
        finally:
            self.state.close()
            users = getattr(self, "users", None)
            if users is not None:
                users.close()

    async def _write_datafile(self, *, if_missing: bool = False) -> None:
        """--format parquet|jsonl: OUT.parquet / OUT.jsonl from the complete OUT.csv (the job's journal). A finished
        job run again with --format gets the file it lacks, spending nothing."""
        await asyncio.to_thread(write_datafile, self.out, record_kinds(self.spec.record), self.settings.output_format,
                                guarded=not self.settings.output_raw, if_missing=if_missing)

    def _open(self, base_sent: int, base_billed: int) -> None:
        """The run's lease, client and sink, counting from the job's requests and credits so far."""
        # The n-th request of this run may leave once the state store says so: a kill then
        # forgets at most the lease, counted as spent (job() reports it in requests_sent).
        self._lease = LocalLease(self.state, base=base_sent, cap=self.settings.max_credits)
        self.client = Client(self.settings.client_options(), api_key=self._api_key, request_budget=self._lease.left,
                             reserve=self._lease.take,
                             max_connections=max(MAX_AUTO_WORKERS, self.settings.parallelism or 0))
        if self._earlier is not None:  # this run's first requests: in requests_sent and under the budget
            self.client.counters.add(self._earlier)
        self._base_counters = (base_sent, base_billed)

        def counters() -> tuple[int, int]:
            c = self.client.counters
            return base_sent + c.requests_sent, base_billed + c.credits_billed

        self.sink = CsvSink(self.out, self.spec.record.COLUMNS, state=self.state, counters=counters,
                            bom=self.settings.output_bom, raw=self.settings.output_raw, durable=self._durable)
        self.writer = GroupWriter(self.sink.commit, interval=self.sink.commit_interval, gate=self._flowing)

    def sent_any(self) -> bool:
        """Whether this run has sent a request (a full disk found before one is a usage error, exit 2)."""
        client: Client | None = getattr(self, "client", None)
        return client is not None and client.counters.requests_sent > 0

    async def _yield_to_signals(self) -> None:
        await asyncio.sleep(0)
        if self._stop_error is not None:
            raise self._stop_error

    def _engine(self) -> Engine[WorkItem]:
        """The pool over this run's ports: pending items in input order, the walks, the CSV sink, the lease."""
        parallelism = self.settings.parallelism
        options = EngineOptions(workers=parallelism, start=parallelism or 4)
        reporter = ProgressReporter(self.job.command, self._snapshot, quiet=self.quiet,
                                    interval=self._progress_interval)
        self.stop.attach(self.client)
        engine = Engine(source=self, handler=self._item, stop=self.stop, options=options, client=self.client,
                        committer=self.writer, budget=self._lease, reporter=reporter)
        self._tally = engine.tally
        return engine

    async def items(self) -> AsyncIterator[WorkItem]:
        """The pending items in input order (the engine's item source)."""
        after = 0
        while chunk := self.state.pending(after, 500):
            for seq, key, raw, cursor, rows, pages in chunk:
                yield WorkItem(seq, key, raw, cursor, rows, pages)
                after = seq

    async def _item(self, item: WorkItem) -> None:
        try:
            await self._process(item)
        except ItemFailed as exc:
            update = ItemUpdate(item.seq, "failed", reason=exc.reason, endpoint=exc.endpoint or self.spec.endpoint,
                                detail=str(exc))
            await self.writer.submit(Batch([], update))

    async def _process(self, item: WorkItem) -> None:
        async with aclosing(self.spec.handler(self, item)) as steps:
            async for step in steps:
                testing.reached("fetched")
                cap = self.job.max_pages or self.settings.max_pages
                update = step_update(step, item.seq, endpoint=self.spec.endpoint, max_pages=cap)
                # A cap is a guard the user set: the rows so far are kept, the item says it is incomplete.
                self.capped += step.counted and step.capped and step.guard is None
                await self.writer.submit(Batch(step.rows, update, keyed=self._keyed, walks=step.walks))

    def _counters_now(self) -> tuple[int, int]:
        """The job's counters when this run began plus this run's (the committed ones lag behind the requests)."""
        c = self.client.counters
        sent, billed = self._base_counters
        return sent + c.requests_sent, billed + c.credits_billed

    def _requests_left(self) -> int:
        """What the pending items still need (`jobs.estimate.requests_left`): the progress line's ETA counts down
        from it."""
        if self.spec.list_kind is None:  # one request an item: no need to read them
            return self.state.progress().pending
        limits = self.settings.job_limits()
        size = walk_size(self.spec.list_kind, limits, self.page_sizes)

        def pending() -> Iterator[tuple[str, int]]:
            after = 0
            while chunk := self.state.pending(after, 5000):
                after = chunk[-1][0]
                yield from ((key, pages) for _, key, _, _, _, pages in chunk)

        return requests_left(self.spec, pending(), self.users, size, limits)

    def _snapshot(self) -> Snapshot:
        p = self.state.progress()
        sent, billed = self._counters_now()
        return Snapshot(p.done + p.failed, p.total, self.sink.rows_written, sent, billed, failed=p.failed,
                        note=self.client.outage.status(), requests_left=max(0, self._expected_end - sent))

    def _outcome(self, started: float, status: str, rows: int, reason: str = "") -> Outcome:
        facts = RunFacts(started, self._tally.workers, self.job.max_pages or self.settings.max_pages,
                         self.input_change, self.capped, self.input_renamed)
        return outcome(self.job, self.state, getattr(self, "client", None), facts, status=status, rows=rows,
                       error=self._stop_error, reason=reason)


async def run_job(crawl: Crawl, *, install_signals: bool = True) -> Outcome:
    """Run a crawl under its job lock, turning SIGINT/SIGTERM into a clean, resumable stop."""
    check_output(crawl.job, overwrite=crawl.overwrite)
    # What a usage error may remove: the files of a job that did not exist before (never an existing job's).
    ours = [] if state_path(crawl.out).exists() else [p for p in job_files(crawl.out) if not p.exists()]
    if not ours and not lock_path(crawl.out).exists():
        ours = [lock_path(crawl.out)]
    installed = catch_signals(crawl.stop.signalled) if install_signals else []
    try:
        with job_lock(crawl.out), disk_problems(crawl.out.parent, started=crawl.sent_any):
            return await crawl.run()
    except UsageError:
        for path in ours:  # a usage error leaves nothing behind that was not there before
            with contextlib.suppress(OSError):  # (a read-only directory has nothing to remove)
                path.unlink(missing_ok=True)
        raise
    finally:
        remove_signals(installed)
