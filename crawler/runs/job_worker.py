"""The worker session of a PostgreSQL job (`jobs.url`): `JobWorker` (its credit lease is `engine.lease.PgLease`).

A worker is the engine (engine/pool.py) over the job's ports: its items come from the job's queue
(`stores.pg_queue.QueueItemSource`), the same command handlers (commands.py) a local run uses walk them, and each
page is committed to PostgreSQL (stores/pg_jobs.py, fenced by the item's version) through one group-commit writer
(engine/writer.py). The starter and `crawler work` that run it: runs/distributed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client, Counters
from crawler.api.pagesizes import PageSizes
from crawler.config import Secret, Settings
from crawler.engine.lease import PgLease, lease_size
from crawler.engine.pool import Engine, StopPolicy
from crawler.engine.stats import ProgressReporter, Snapshot
from crawler.engine.writer import GroupWriter
from crawler.errors import (
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    ItemFailed,
    RunStopped,
    rank,
)
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.prepare import JobOptions, WorkItem
from crawler.jobs.walker import ItemWalker, step_update
from crawler.options import EngineOptions
from crawler.rate.pacing import MAX_AUTO_WORKERS
from crawler.sinks.csv_sink import Batch
from crawler.stores import pg_queue as itemqueue
from crawler.stores.model import ItemUpdate, LeaseLost, PageCommit, PgJob, Progress
from crawler.stores.pg_jobs import PgJobStore
from crawler.stores.postgres import StoreLost
from crawler.stores.users import UserDirectory

log = logging.getLogger("crawler.runs.distributed")

AUTO_START = 8  # items a worker takes at a time with parallelism = "auto" until a latency is measured


def host_name() -> str:
    """This host as workers are registered (a test may pose as another host)."""
    return testing.host_name()


def job_options(pg: PgJob) -> JobOptions:
    """The job's options as its starter gave them (input and output are the starter's own)."""
    return JobOptions(**{**pg.options, "command": pg.command, "input": "", "output": ""})


def job_store(settings: Settings, url: str) -> PgJobStore:
    """The job store at `url`, with this run's stall limit, heartbeat timeout and connect timeout."""
    return PgJobStore(url, stall_limit=settings.retry_stall_limit, heartbeat_timeout=settings.jobs_heartbeat_timeout,
                      connect_timeout=settings.connect_timeout)



class CommitFailed(RunStopped):
    """A worker's commit failed with an error no rule expects (a bug, a value the database refuses): the run stops,
    what was committed is kept, and the same command resumes."""

    @classmethod
    def of(cls, exc: Exception, where: str) -> CommitFailed:
        """The stop for `exc`, in one line; its traceback is logged for -v."""
        log.info("the commit to %s failed", where, exc_info=exc)
        return cls(f"the commit to {where} failed: {itemqueue.one_line(exc)} (what was committed is kept; the same"
                   " command resumes; -v shows the traceback; please report it)")


@dataclass(slots=True)
class SessionResult:
    """What one worker did on one job."""

    items: int = 0  # items this worker finished (done or failed)
    rows: int = 0
    lost: int = 0  # items taken over by another worker while this one held them
    requests_sent: int = 0
    credits_billed: int = 0
    rate_limited: int = 0
    retries: int = 0
    rate_wait_seconds: float = 0.0
    responses: dict[str, int] = field(default_factory=dict)  # this worker's requests by what they met
    shapes: str = ""  # the line naming the answers of an unexpected shape met and where their bodies are
    error: CrawlerError | None = None
    held: list[int] = field(default_factory=list)
    parallelism: int = 0  # the most items this worker took at a time (parallelism = "auto" grows it)


class _Committer:
    """The engine's committer over the worker's `GroupWriter`: the stop its error brings is the run's already
    (`_commit_group`), so the writer's task ends quietly."""

    def __init__(self, writer: GroupWriter[Batch]) -> None:
        self._writer = writer

    async def run(self) -> None:
        with contextlib.suppress(RunStopped):
            await self._writer.run()

    def close(self) -> None:
        self._writer.close()


class JobWorker(ItemWalker):
    """One worker process on one PostgreSQL job: the `CrawlContext` handlers see, and the engine's ports over the
    job's queue (`pg_queue.QueueItemSource`) and its store (the group commit, `PgLease`)."""

    def __init__(self, store: PgJobStore, pg: PgJob, settings: Settings, *, api_key: Secret, worker_id: str,
                 stop_when_idle: bool = True, earlier: Counters | None = None, quiet: bool = True) -> None:
        self.store = store
        self._earlier = earlier  # requests the starter sent for the job before its client (the region lookup)
        self.pg = pg
        self.jid = pg.id
        self.job = job_options(pg)
        self.spec: CommandSpec = COMMANDS[pg.command]
        self.settings = settings
        self._key = api_key
        self.worker_id = worker_id
        self.session = f"{worker_id}:{os.urandom(3).hex()}"  # this worker's counters on this job (crawler_sessions)
        self.parallelism = settings.parallelism or AUTO_START  # "auto": the engine grows it (`pacing.auto_workers`)
        self._keyed = self.spec.list_kind in ep.OFFSET_KINDS
        self._held: dict[int, int] = {}  # seq -> the item's version this worker holds
        self._walks: dict[int, list[tuple[str, ep.Cursor | None, int]]] = {}
        self.stop = StopPolicy()
        self._show = not quiet  # the progress line (`quiet`, the stop's, is only what a first signal says)
        self._seen = Progress(0, 0, 0)  # the job's items as the monitor last read them
        self._commits = GroupWriter(self._commit_group, capacity=2 * (settings.parallelism or MAX_AUTO_WORKERS))
        self.result = SessionResult(parallelism=self.parallelism)
        self._finished = asyncio.Event()  # an item of this worker ended: the job may be complete
        # The job's heartbeat timeout (its starter's), the same on every host: it decides when an item moves.
        self.heartbeat_timeout = pg.heartbeat_timeout or store.heartbeat_timeout
        self.source = itemqueue.QueueItemSource(store.url, self.jid, concurrency=self.parallelism,
                                                heartbeat_timeout=self.heartbeat_timeout, where=store.where,
                                                stall_limit=settings.retry_stall_limit, lost=self.request_stop)
        # A stop takes no more items; a hard one also refuses those pgqueuer hands out still (the engine ends the
        # items in hand).
        self.stop.listen(lambda soft: self.source.stop(refuse=not soft))
        self.client: Client
        self.users: UserDirectory
        self.page_sizes: PageSizes | None = None
        self.budget = PgLease(store, self.jid, self.session, size=lease_size(self.parallelism))

    @property
    def queues(self) -> list[itemqueue.ItemQueue]:
        """The consumers of the job's queue: one, and one more each time parallelism = "auto" grows."""
        return self.source.queues

    # -- CrawlContext (learn, resolve_user and walk come from ItemWalker) --

    def reply_walks(self, item: WorkItem) -> list[tuple[str, ep.Cursor | None, int]]:
        """The item's reply walks still to do, as read when the item was taken."""
        return self._walks.get(item.seq, [])

    # -- the session --

    @property
    def _stop_error(self) -> CrawlerError | None:
        return self.stop.error

    @property
    def quiet(self) -> bool:
        """False: a first signal says how many answers it waits for."""
        return self.stop.quiet

    @quiet.setter
    def quiet(self, value: bool) -> None:
        self.stop.quiet = value

    def request_stop(self, error: CrawlerError) -> None:
        """Stop taking items; a lost store or a second signal also ends the items in hand (a spent budget or a first
        signal does not: requests already under way are answered and committed, see `StopPolicy`)."""
        self.stop.request_stop(error)

    def signalled(self, error: Interrupted) -> int:
        """A SIGINT/SIGTERM (see `StopPolicy`); the number of answers the stop waits for."""
        return self.stop.signalled(error)

    async def run(self) -> SessionResult:
        """Work the job's items until none is left (or a stop); then hand back what this worker held."""
        self.users = UserDirectory(Path(self.settings.data_dir) / "users.db", ttl_days=self.settings.id_ttl_days)
        self.page_sizes = PageSizes(self.settings.data_dir)
        self.client = Client(self.settings, api_key=self._key, reserve=self.budget.take,
                             max_connections=max(MAX_AUTO_WORKERS, self.parallelism))
        try:
            await self._count_earlier()
            async with self.client:
                await self._work()
                if isinstance(self._stop_error, CommitFailed):
                    with contextlib.suppress(Exception):  # reported already; the requests' count is worth a try
                        await self._commit([])
                elif not isinstance(self._stop_error, StoreLost):
                    await self._commit([])  # requests sent after the last page still count
        except RunStopped as exc:  # StoreLost, or a stop while the store is away
            if self._stop_error is None or rank(exc) <= rank(self._stop_error):
                self.stop.error = exc
        finally:
            self.users.close()
        r = self._result()
        if not isinstance(self._stop_error, StoreLost):
            with contextlib.suppress(RunStopped):  # StoreLost, or a stop while the store is away
                # Only the requests sent stay spent: a credit is drawn before the request waits for its rate slot,
                # and a stop may end that wait.
                await self.budget.settle(r.requests_sent)
                await self.store.leave(self.worker_id)
                orphans = await self.store.orphans(self.jid, heartbeat_timeout=self.heartbeat_timeout)
                testing.reached("enqueuing")
                await self.store.outside(lambda: itemqueue.enqueue(self.store.url, self.jid, orphans))
        return r

    async def _work(self) -> None:
        """The engine over the job's queue, beside the consumers and the heartbeat."""
        options = EngineOptions(workers=self.settings.parallelism, start=self.parallelism)
        self.stop.attach(self.client)
        reporter = ProgressReporter(self.pg.command, self._snapshot, quiet=not self._show)
        engine = Engine(source=self.source, handler=self._item, stop=self.stop, options=options, client=self.client,
                        committer=_Committer(self._commits), budget=self.budget, reporter=reporter)
        async with asyncio.TaskGroup() as outer:
            monitor = outer.create_task(self._monitor())
            outer.create_task(self.source.run())
            try:
                await engine.run()
            finally:
                monitor.cancel()
                self.source.close()  # the consumers end; every item still held is released

    def _snapshot(self) -> Snapshot:
        p, c = self._seen, self.client.counters
        # The job's counters when this session began plus this session's.
        return Snapshot(p.done + p.failed, p.total, self.result.rows, self.pg.requests_sent + c.requests_sent,
                        self.pg.credits_billed + c.credits_billed, failed=p.failed, note=self.client.outage.status())

    def _result(self) -> SessionResult:
        c = self.client.counters
        r = self.result
        r.requests_sent, r.credits_billed, r.rate_limited, r.retries = (c.requests_sent, c.credits_billed,
                                                                       c.rate_limited, c.retries)
        r.rate_wait_seconds = self.client.gate.wait_seconds
        r.responses = dict(c.responses)
        r.shapes = self.client.unexpected.note()
        r.error = self._stop_error
        r.held = sorted(self._held)
        r.parallelism = max(r.parallelism, self.source.taking)
        return r

    async def _count_earlier(self) -> None:
        """The requests sent before this session's client are its first: in its counters and the job's budget."""
        if self._earlier is None:
            return
        self.client.counters.add(self._earlier)
        with contextlib.suppress(BudgetExhausted):  # spent either way; the next request stops the run
            for _ in range(self._earlier.requests_sent):
                await self.budget.take(0)

    async def _item(self, seq: int) -> None:
        """The engine's handler: take the item in the store (fenced by its version), walk it, commit its pages."""
        try:
            taken = await self.store.take(self.jid, seq, self.worker_id)
            if taken is None:
                return  # done meanwhile, or enqueued twice
            self._held[seq] = taken.version
            self._walks[seq] = taken.walks
            item = WorkItem(seq, taken.key, taken.raw, taken.cursor, taken.rows, taken.pages)
            try:
                await self._process(item)
            except ItemFailed as exc:
                update = ItemUpdate(seq, "failed", reason=exc.reason, endpoint=exc.endpoint or self.spec.endpoint,
                                    detail=str(exc))
                await self._submit(Batch([], update))
            self._held.pop(seq, None)
            self.result.items += 1
        except LeaseLost:
            self._held.pop(seq, None)
            self.result.lost += 1
            log.info("item %d of job %s was taken over by another worker: its late page is discarded", seq, self.jid)
        finally:
            self._walks.pop(seq, None)
            self._finished.set()

    async def _process(self, item: WorkItem) -> None:
        async with aclosing(self.spec.handler(self, item)) as steps:
            async for step in steps:
                update = step_update(step, item.seq, endpoint=self.spec.endpoint,
                                     max_pages=self.job.max_pages)
                await self._submit(Batch(step.rows, update, keyed=self._keyed, walks=step.walks))

    async def _submit(self, batch: Batch) -> None:
        await self._commits.submit(batch)

    async def _commit_group(self, batches: list[Batch]) -> list[Exception | None]:
        """One group commit for the writer: a page of an item another worker took over fails with LeaseLost."""
        try:
            testing.reached("job_commit")
            pages = await self._commit(batches)
        except Exception as exc:  # the store lost, a stop while it is away (PgJobStore.abandon), or any other
            if isinstance(exc, RunStopped):
                self.request_stop(exc)
                raise
            stop = CommitFailed.of(exc, self.store.where)
            self.request_stop(stop)
            raise stop from exc
        return [None if page.committed else LeaseLost() for page in pages]

    async def _commit(self, batches: Sequence[Batch]) -> list[PageCommit]:
        pages = []
        for b in batches:
            assert b.update is not None
            seq = b.update.seq
            rows = [(str(getattr(r, r.COLUMNS[0])), json.dumps(r.values(), ensure_ascii=False)) for r in b.rows]
            pages.append(PageCommit(seq, self._held.get(seq, -1), rows, b.update, b.walks))
        c = self.client.counters
        # This session's totals so far (taken before the commit: requests answered while it runs go into the next).
        await self.store.commit(self.jid, self.session, pages, c.requests_sent, c.credits_billed)
        for page in pages:
            if page.committed:
                if page.seq in self._held:
                    self._held[page.seq] = page.new_version
                self.result.rows += page.inserted
        return pages

    async def _monitor(self) -> None:
        """Heartbeat of this worker; stop taking items when none is left or the job stopped; every heartbeat
        timeout, put back on the queue the items a dead worker held whose queue entry is gone."""
        every = min(max(self.heartbeat_timeout / 4, 0.05), 1.0)  # another worker may end the job
        swept = time.monotonic()
        while True:
            try:
                await self.store.beat(self.worker_id, self.jid)
                pg = await self.store.job(self.jid)
                progress = self._seen = await self.store.progress(self.jid)
                if pg is None or pg.status != "running" or progress.pending == 0:
                    self.source.stop()
                    return
                if time.monotonic() - swept >= self.heartbeat_timeout:
                    swept = time.monotonic()
                    await itemqueue.enqueue(self.store.url, self.jid,
                                            [s for s in await self.store.orphans(
                                                self.jid, heartbeat_timeout=self.heartbeat_timeout)
                                             if s not in self._held])
            except RunStopped as exc:
                self.request_stop(exc)
                return
            except Exception as exc:  # the queue's own connection failing: the next beat tries again
                log.warning("job monitor: %s", itemqueue.one_line(exc))
            # Look again at the next heartbeat, or soon after one of our items ends (the last one ends the job).
            # (asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes as the event is set.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._finished.wait()
            self._finished.clear()
            await asyncio.sleep(0.05)  # at most ~20 looks a second however many items end

