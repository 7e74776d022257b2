"""PostgreSQL jobs (`jobs.url`): the starter, `crawler work`, `crawler jobs` and `crawler export`.

Flow: the starter reads the input into the job store (pgjobs.py) and enqueues the items not done
(itemqueue.py); every worker, the starter included, takes items from the queue and runs the same command
handlers (commands.py) a local run does; each page is committed to PostgreSQL by one writer task per worker;
when no item is left the starter writes OUT.csv from the database with the local sink's cell rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client, Counters
from crawler.api.pagesizes import PageSizes
from crawler.config import Secret, Settings, masked
from crawler.engine.outcome import Outcome
from crawler.engine.stats import Summary
from crawler.engine.stop import GracefulStop, install_signals, remove_signals
from crawler.errors import (
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    ItemFailed,
    RunStopped,
    UsageError,
    rank,
)
from crawler.files import fsync_dir
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions, WorkItem, check_output_path, failures_path
from crawler.jobs.walker import ItemWalker, step_update
from crawler.rate.ledger import ledger_name
from crawler.rate.pacing import MAX_AUTO_WORKERS, auto_workers
from crawler.retry import Stall, pause, retry_until_stall
from crawler.sinks.csv_sink import Batch, cell, drain, write_failures
from crawler.stores import pg_queue as itemqueue
from crawler.stores.local import RETRIABLE, RETRIABLE_ALL, ItemUpdate, UserDirectory
from crawler.stores.pg_jobs import LeaseLost, PageCommit, PgJob, PgJobStore, StoreLost, WorkerInfo, job_id

log = logging.getLogger("crawler.runs.distributed")

LEASE_MAX = 16  # requests granted to a worker at a time (a kill may leave them unsent: counted as spent)
AUTO_START = 8  # items a worker takes at a time with parallelism = "auto" until a latency is measured


def host_name() -> str:
    """This host as workers are registered (a test may pose as another host)."""
    return os.environ.get("CRAWLER_TEST_HOSTNAME") or socket.gethostname()


def job_options(pg: PgJob) -> JobOptions:
    """The job's options as its starter gave them (input and output are the starter's own)."""
    return JobOptions(**{**pg.options, "command": pg.command, "input": "", "output": ""})


class Budget:
    """The job's --max-credits budget, drawn from PostgreSQL a lease at a time before requests leave."""

    def __init__(self, store: PgJobStore, jid: str, session: str, lease: int) -> None:
        self.store = store
        self.jid = jid
        self.session = session
        self.lease = lease
        self.granted = 0
        self.used = 0
        self._lock = asyncio.Lock()

    async def reserve(self, _n: int) -> None:
        """Called by the client before each request; BudgetExhausted when the job's budget is spent."""
        async with self._lock:
            if self.used >= self.granted:
                await testing.held("grant")
                got = await self.store.grant(self.jid, self.session, self.granted, self.lease)
                if got == 0:
                    await self.store.set_status(self.jid, "budget", when="running")
                    raise BudgetExhausted("the job's --max-credits budget is spent")
                self.granted += got
            self.used += 1


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
class _Pending:
    batch: Batch
    ack: asyncio.Future[None]


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
    error: CrawlerError | None = None
    held: list[int] = field(default_factory=list)
    parallelism: int = 0  # the most items this worker took at a time (parallelism = "auto" grows it)


class JobWorker(ItemWalker, GracefulStop):
    """One worker process on one PostgreSQL job: the `CrawlContext` handlers see, over the queue and the store."""

    def __init__(self, store: PgJobStore, pg: PgJob, settings: Settings, *, api_key: Secret, worker_id: str,
                 stop_when_idle: bool = True, earlier: Counters | None = None) -> None:
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
        self.parallelism = settings.parallelism or AUTO_START  # "auto": grows with the latency (`_grow`)
        self._keyed = self.spec.list_kind in ep.OFFSET_KINDS
        self._held: dict[int, int] = {}  # seq -> the item's version this worker holds
        self._walks: dict[int, list[tuple[str, ep.Cursor | None, int]]] = {}
        self._stop_error: CrawlerError | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._commits: asyncio.Queue[_Pending | None] = asyncio.Queue(
            maxsize=2 * (settings.parallelism or MAX_AUTO_WORKERS))
        self.result = SessionResult(parallelism=self.parallelism)
        self._finished = asyncio.Event()  # an item of this worker ended: the job may be complete
        # The job's heartbeat timeout (its starter's), the same on every host: it decides when an item moves.
        self.heartbeat_timeout = pg.heartbeat_timeout or store.heartbeat_timeout
        # One consumer of the job's queue, and one more each time parallelism = "auto" grows (`_grow`): their caps
        # add up to the items this worker takes at a time.
        self.queues = [self._queue(self.parallelism)]
        self._queues_stopped = False
        self.client: Client
        self.users: UserDirectory
        self.page_sizes: PageSizes | None = None
        self.budget = Budget(store, self.jid, self.session, max(1, min(self.parallelism, LEASE_MAX)))

    def _queue(self, concurrency: int) -> itemqueue.ItemQueue:
        return itemqueue.ItemQueue(self.store.url, self.jid, concurrency=concurrency,
                                   heartbeat_timeout=self.heartbeat_timeout, poll=min(1.0, self.heartbeat_timeout / 4))

    def _stop_queues(self) -> None:
        """Every consumer takes no more items (those in hand go on)."""
        self._queues_stopped = True
        for queue in self.queues:
            queue.stop()

    # -- CrawlContext (learn, resolve_user and walk come from ItemWalker) --

    def reply_walks(self, item: WorkItem) -> list[tuple[str, ep.Cursor | None, int]]:
        """The item's reply walks still to do, as read when the item was taken."""
        return self._walks.get(item.seq, [])

    # -- the session --

    def request_stop(self, error: CrawlerError) -> None:
        """Stop taking items; a lost store or a second signal also cancels the items in hand (a spent budget or a
        first signal does not: requests already under way are answered and committed, see `GracefulStop`)."""
        if self._stop_error is None or rank(error) < rank(self._stop_error):
            self._stop_error = error
        self._stop_queues()
        if not (isinstance(error, BudgetExhausted) or (isinstance(error, Interrupted) and self._draining)):
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def run(self) -> SessionResult:
        """Work the job's items until none is left (or a stop); then hand back what this worker held."""
        self.users = UserDirectory(Path(self.settings.data_dir) / "users.db", ttl_days=self.settings.id_ttl_days)
        self.page_sizes = PageSizes(self.settings.data_dir)
        self.client = Client(self.settings, api_key=self._key, reserve=self.budget.reserve,
                             max_connections=max(MAX_AUTO_WORKERS, self.parallelism))
        try:
            await self._count_earlier()
            async with self.client:
                async with asyncio.TaskGroup() as outer:
                    writer = outer.create_task(self._writer())
                    monitor = outer.create_task(self._monitor())
                    try:
                        async with asyncio.TaskGroup() as tg:
                            self._tg = tg
                            await self._take_items(self.queues[0])
                    finally:
                        self._tg = None
                        monitor.cancel()
                        await self._commits.put(None)
                        await writer
                if isinstance(self._stop_error, CommitFailed):
                    with contextlib.suppress(Exception):  # reported already; the requests' count is worth a try
                        await self._commit([])
                elif not isinstance(self._stop_error, StoreLost):
                    await self._commit([])  # requests sent after the last page still count
        except RunStopped as exc:  # StoreLost, or a stop while the store is away
            if self._stop_error is None or rank(exc) <= rank(self._stop_error):
                self._stop_error = exc
        finally:
            self.users.close()
        c = self.client.counters
        r = self.result
        r.requests_sent, r.credits_billed, r.rate_limited, r.retries = (c.requests_sent, c.credits_billed,
                                                                       c.rate_limited, c.retries)
        r.rate_wait_seconds = self.client.gate.wait_seconds
        r.responses = dict(c.responses)
        r.error = self._stop_error
        r.held = sorted(self._held)
        if not isinstance(self._stop_error, StoreLost):
            with contextlib.suppress(RunStopped):  # StoreLost, or a stop while the store is away
                # Only the requests sent stay spent: a credit is drawn before the request waits for its rate slot,
                # and a stop may end that wait.
                await self.store.give_back(self.jid, self.session, r.requests_sent)
                await self.store.leave(self.worker_id)
                orphans = await self.store.orphans(self.jid, heartbeat_timeout=self.heartbeat_timeout)
                testing.reached("enqueuing")
                await self.store.outside(lambda: itemqueue.enqueue(self.store.url, self.jid, orphans))
        return r

    async def _count_earlier(self) -> None:
        """The requests sent before this session's client are its first: in its counters and the job's budget."""
        if self._earlier is None:
            return
        self.client.counters.add(self._earlier)
        with contextlib.suppress(BudgetExhausted):  # spent either way; the next request stops the run
            for _ in range(self._earlier.requests_sent):
                await self.budget.reserve(0)

    async def _take_items(self, queue: itemqueue.ItemQueue) -> None:
        """Run a queue consumer; a lost connection is retried until retry.stall_limit (then StoreLost)."""
        stall = Stall(self.settings.retry_stall_limit)

        async def consume() -> None:
            queue.ran = False
            try:
                if self._stop_error is None:
                    await queue.run(self._on_item)
            finally:
                if queue.ran:  # it ran again since the last failure: a new outage, with its own stall limit
                    stall.answered()

        try:
            await retry_until_stall(
                consume, retriable=lambda _: self._stop_error is None, stall=stall,
                on_retry=lambda exc, *_: log.warning("the job queue (%s) failed: %s; retrying", self.store.where,
                                                     itemqueue.one_line(exc)),
                lost=lambda: StoreLost(f"{self.store.where} has not answered for {stall.limit:g} s (retry.stall_limit);"
                                       " what was committed is kept: start PostgreSQL and run the same command again"))
        except StoreLost as exc:
            self.request_stop(exc)
        except Exception:
            if self._stop_error is None:
                raise

    async def _on_item(self, seq: int) -> None:
        """The queue's handler: work the item in a task of ours (a stop cancels ours, never the library's)."""
        if self._stop_error is not None or self._tg is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._tg.create_task(self._item(seq, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task a stop cancels before its first step never runs `_item`'s finally: release the queue anyway.
        task.add_done_callback(lambda _: None if done.done() else done.set_result(None))
        await asyncio.shield(done)

    async def _item(self, seq: int, done: asyncio.Future[None]) -> None:
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
            self._grow()
        except LeaseLost:
            self._held.pop(seq, None)
            self.result.lost += 1
            log.info("item %d of job %s was taken over by another worker: its late page is discarded", seq, self.jid)
        except RunStopped as exc:
            self.request_stop(exc)
        finally:
            self._walks.pop(seq, None)
            self._finished.set()
            if not done.done():
                done.set_result(None)

    def _grow(self) -> None:
        """parallelism = "auto": take items enough to keep the rate busy at the latency seen so far (the rule every
        kind of run sizes its pool by). pgqueuer fixes a consumer's cap when it starts, so the difference is taken by
        one more consumer, started at once: the items in hand go on, none waits for them to end."""
        if self.settings.parallelism is not None or self._stop_error is not None or self._queues_stopped:
            return
        target = auto_workers(self.client.pace, self.client.counters.latency, self.parallelism)
        if target - self.parallelism < 2 or self._tg is None:  # a consumer takes at least 2 at a time
            return
        log.debug("parallelism auto: %d -> %d items at a time (latency %.3f s)", self.parallelism, target,
                  self.client.counters.latency)
        queue = self._queue(target - self.parallelism)
        self.queues.append(queue)
        self.parallelism = self.result.parallelism = target
        self.budget.lease = max(1, min(target, LEASE_MAX))
        self._tg.create_task(self._take_items(queue))

    async def _process(self, item: WorkItem) -> None:
        async with aclosing(self.spec.handler(self, item)) as steps:
            async for step in steps:
                update = step_update(step, item.seq, endpoint=self.spec.endpoint,
                                     max_pages=self.job.max_pages)
                await self._submit(Batch(step.rows, update, keyed=self._keyed, walks=step.walks))

    async def _submit(self, batch: Batch) -> None:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._commits.put(_Pending(batch, ack))
        await ack

    async def _writer(self) -> None:
        """The worker's single committer: every page waiting goes into one transaction (group commit). On any error
        it fails every waiting commit and stops the run (Ingest._writer's rule): no item waits for ever on a commit
        that will not come. After an error no rule knows (a bug, a value the database refuses) none is tried again."""
        failed: CommitFailed | None = None
        while True:
            first = await self._commits.get()
            group = [] if first is None else [first]
            end = first is None or drain(self._commits, group)
            if group:
                try:
                    if failed is not None:
                        raise failed
                    testing.reached("job_commit")
                    pages = await self._commit([p.batch for p in group])
                except Exception as exc:  # the store lost, a stop while it is away (PgJobStore.abandon), or any other
                    stop = exc if isinstance(exc, RunStopped) else CommitFailed.of(exc, self.store.where)
                    failed = stop if isinstance(stop, CommitFailed) else failed
                    self.request_stop(stop)
                    for p in group:
                        if not p.ack.done():
                            p.ack.set_exception(stop)
                else:
                    for p, page in zip(group, pages, strict=True):
                        if p.ack.done():
                            continue
                        if page.committed:
                            p.ack.set_result(None)
                        else:
                            p.ack.set_exception(LeaseLost())
            if end:
                return

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
                progress = await self.store.progress(self.jid)
                if pg is None or pg.status != "running" or progress.pending == 0:
                    self._stop_queues()
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), every)
            self._finished.clear()
            await asyncio.sleep(0.05)  # at most ~20 looks a second however many items end


# --- the starter, `work`, `jobs`, `export` ---


def _store(settings: Settings, url: str) -> PgJobStore:
    return PgJobStore(url, stall_limit=settings.retry_stall_limit, heartbeat_timeout=settings.jobs_heartbeat_timeout,
                      connect_timeout=settings.connect_timeout)


def _spool(job: JobOptions, spec: CommandSpec) -> tuple[Path, str]:
    """The input read once into a temporary file (stdin can be read only once); its path and hash."""
    entries, digest = input_items(job, spec)
    fd, name = tempfile.mkstemp(prefix="crawler-input-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(json.dumps(entry) + "\n")
    return Path(name), digest()


class _Spooled:
    """The spooled input's entries, read from the start each time it is iterated: a job's creation retried after
    a lost connection reads every entry again (a generator would give the retry only those after the cut)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[tuple[str, str, str | None, str | None]]:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                key, raw, reason, detail = json.loads(line)
                yield key, raw, reason, detail


async def _register(store: PgJobStore, settings: Settings, key: Secret, jid: str | None) -> str:
    """Register this worker; a key worked from another host through another (or a non-Redis) ledger is exit 2."""
    from crawler.api.client import check_base_url

    base = check_base_url(settings.base_url, allow_insecure_http=settings.allow_insecure_http)
    me = WorkerInfo(f"{host_name()}:{os.getpid()}:{os.urandom(3).hex()}", host_name(), os.getpid(),
                    ledger_name(key.reveal(), base), masked(settings.rate_shared), jid, True)
    others = await store.register(me)
    clash = [w for w in others if not (w.ledger == me.ledger and me.ledger.startswith(("redis://", "rediss://")))]
    if clash and settings.rate_enabled:
        await store.leave(me.id)
        w = clash[0]
        raise UsageError(
            f"rate.shared = {me.ledger!r}: this key is already worked from host {w.host} (pid {w.pid}) through"
            f" rate.shared = {w.ledger!r}; workers of one key on several hosts must share one Redis ledger: set"
            " rate.shared = \"redis://HOST:PORT/DB\" on every worker")
    return me.id


def _stop_session(worker: JobWorker, error: CrawlerError, quiet: bool) -> None:
    """A stop for the session running: a signal lets its requests under way be answered and committed first."""
    if isinstance(error, Interrupted):
        worker.quiet = quiet
        worker.signalled(error)
    else:
        worker.request_stop(error)


async def _work_session(store: PgJobStore, pg: PgJob, settings: Settings, key: Secret, worker_id: str,
                        stopper: list[JobWorker | None], stopped: list[CrawlerError], *,
                        earlier: Counters | None = None) -> SessionResult:
    worker = JobWorker(store, pg, settings, api_key=key, worker_id=worker_id, earlier=earlier)
    stopper[0] = worker
    if stopped:
        worker.request_stop(stopped[0])
    try:
        return await worker.run()
    finally:
        stopper[0] = None


async def start_job(job: JobOptions, settings: Settings, *, api_key: Secret, url: str, restart: bool = False,
                    retry_failed: bool | str = False, overwrite: bool = False, quiet: bool = False,
                    earlier: Counters | None = None) -> Outcome:
    """`crawler COMMAND INPUT -o OUT.csv --jobs-url URL`: create or resume the job, work it, export it; `earlier`:
    the requests this command sent for it before (the region lookup), counted as the starter's first."""
    started = time.monotonic()
    spec = COMMANDS[job.command]
    out = Path(job.output)
    # Never the input file (nor a path through a file), new job, --restart or resumed alike.
    check_output_path(job, overwrite=overwrite)
    async with _store(settings, url) as store:
        await store.outside(lambda: itemqueue.install(url))
        jid = await _create(store, job, settings, restart=restart, overwrite=overwrite)
        testing.reached("job_printed")
        retry = RETRIABLE_ALL if retry_failed == "all" else RETRIABLE if retry_failed else ()
        pg = await store.job(jid)
        assert pg is not None
        progress = await store.progress(jid)
        if (pg.status == "done" and progress.pending == 0 and await asyncio.to_thread(out.exists) and not restart
                and not retry):
            # Before resume(): the job keeps the output.bom/output.raw its OUT.csv was written with (export's).
            return _summary(job, store, pg, progress, await store.failure_counts(jid), None, started,
                            status="already complete", result=SessionResult(), settings=settings,
                            reason="nothing to do; --restart runs it again")
        await store.resume(jid, settings.max_credits, retry=retry, bom=settings.output_bom, raw=settings.output_raw)
        pg = await store.job(jid)
        assert pg is not None
        orphans = await store.orphans(jid, heartbeat_timeout=pg.heartbeat_timeout)
        testing.reached("enqueuing")
        await store.outside(lambda: itemqueue.enqueue(url, jid, orphans))
        worker_id = await _register(store, settings, api_key, jid)
        stopper: list[JobWorker | None] = [None]
        stopped: list[CrawlerError] = []
        wake = asyncio.Event()  # set by a signal: also ends the wait for other workers
        exporting: list[asyncio.Task[Any]] = []  # and the export, cancelled

        def stop(error: CrawlerError) -> None:
            stopped[:] = [error]
            if isinstance(error, RunStopped):
                store.abandon(error)  # a store away no longer holds the stop for retry.stall_limit
            wake.set()
            for task in exporting:
                task.cancel()
            if stopper[0] is not None:
                _stop_session(stopper[0], error, quiet)

        installed = install_signals(stop)
        try:
            result = await _work_session(store, pg, settings, api_key, worker_id, stopper, stopped, earlier=earlier)
            error = result.error
            # Other workers may still hold items: wait for them (a dead one's items come back to the queue).
            while error is None:
                progress = await store.progress(jid)
                pg = await store.job(jid)
                assert pg is not None
                if progress.pending == 0:
                    break
                if pg.status == "budget":
                    if await store.held_by_live(jid, pg.heartbeat_timeout) == 0:
                        error = BudgetExhausted("the job's --max-credits budget is spent")
                        break
                    await pause(0.2, wake)
                    if stopped:
                        error = stopped[0]
                    continue
                # Items came back (a worker died or stopped): work them too.
                more = await _work_session(store, pg, settings, api_key, worker_id, stopper, stopped)
                _merge(result, more)
                error = more.error
                if stopped and error is None:
                    error = stopped[0]
            progress = await store.progress(jid)
            pg = await store.job(jid)
            assert pg is not None
            complete = error is None and progress.pending == 0
            if complete:
                await store.set_status(jid, "done")
                # A signal stops the export too (its temporary file removed); run again, the job exports.
                if stopped or not await _stoppable(export(store, jid, out, spec, bom=settings.output_bom,
                                                          raw=settings.output_raw), exporting):
                    error, complete = stopped[0], False
            write_failures(failures_path(out), await store.failures(jid), raw=settings.output_raw)
            return _summary(job, store, pg, progress, await store.failure_counts(jid), error, started,
                            status="completed" if complete else "stopped",
                            result=result, settings=settings)
        finally:
            remove_signals(installed)


async def _create(store: PgJobStore, job: JobOptions, settings: Settings, *, restart: bool, overwrite: bool) -> str:
    """Create the starter's job (or find it), print its id; the job of an edited input continues the one of this
    output on this host, which is closed."""
    out = Path(job.output)
    options = {k: v for k, v in asdict(job).items() if k not in ("input", "output", "command")}
    spool, digest = _spool(job, COMMANDS[job.command])
    try:
        jid = job_id(job.command, options, digest)
        if restart:
            await store.delete_job(jid)
        where = f"{host_name()}:{await asyncio.to_thread(out.resolve)}"
        created = await store.create_job(jid, job.command, options, _Spooled(spool), output=where, inherit=not restart,
                                         heartbeat_timeout=settings.jobs_heartbeat_timeout, bom=settings.output_bom,
                                         raw=settings.output_raw)
    finally:
        spool.unlink(missing_ok=True)
    # A new job never replaces a file it did not write (the input, someone's CSV) unless told to.
    if created and created.supersedes is None and not (overwrite or restart) and await asyncio.to_thread(out.exists):
        await store.delete_job(jid)
        raise UsageError(f"--output {out} exists and is not this job's output: choose another output, or add"
                         " --overwrite to replace it")
    # Printed once the job exists (and stays): `crawler work --job ID` started on seeing it finds it.
    print(f"crawler: job {jid} ({masked(store.url)})", file=sys.stderr)
    if created and created.supersedes and not restart:
        print(f"crawler: the input changed: this job continues job {created.supersedes} ({created.added:,} items"
              f" added, {created.gone:,} done items no longer in it)", file=sys.stderr)
    return jid


def _merge(a: SessionResult, b: SessionResult) -> None:
    a.items += b.items
    a.rows += b.rows
    a.lost += b.lost
    a.requests_sent += b.requests_sent
    a.credits_billed += b.credits_billed
    a.rate_limited += b.rate_limited
    a.retries += b.retries
    a.rate_wait_seconds += b.rate_wait_seconds
    a.parallelism = max(a.parallelism, b.parallelism)
    for kind, n in b.responses.items():
        a.responses[kind] = a.responses.get(kind, 0) + n


def _summary(job: JobOptions, store: PgJobStore, pg: PgJob, progress: Any, fails: dict[str, int],
             error: CrawlerError | None, started: float, *, status: str, result: SessionResult, settings: Settings,
             reason: str = "") -> Outcome:
    out = Path(job.output)
    failures_file = failures_path(out)
    summary = Summary(
        command=job.command, status=status, items_total=progress.total, items_done=progress.done,
        items_failed=sum(fails.values()),  # failed items and failed reply walks: the failures file's rows
        items_pending=progress.pending, rows_written=result.rows, rows_total=pg.rows,
        requests_sent=pg.requests_sent, credits_billed=pg.credits_billed, run_requests=result.requests_sent,
        rate_limited=result.rate_limited, retries=result.retries, elapsed=time.monotonic() - started,
        parallelism=result.parallelism or settings.parallelism or AUTO_START,
        rate_used=f"{settings.rate_limit} per {settings.rate_window:g} s" if settings.rate_enabled else "no limit",
        rate_wait_seconds=result.rate_wait_seconds, failures=fails, run_credits_billed=result.credits_billed,
        responses=dict(result.responses),
        output=str(out) if status != "stopped" else f"job {pg.id} in {store.where}",
        failures_file=str(failures_file) if fails else "",
        reason=reason or (str(error) if error else ""),
        notes=(f"job {pg.id}: {result.items:,} items worked here, {result.lost} taken over by other workers",),
    )
    return Outcome(summary, error)


async def export(store: PgJobStore, jid: str, out: Path, spec: CommandSpec, *, bom: bool, raw: bool) -> int:
    """Write the job's rows to `out` (temporary file, fsync, rename) with the local sink's cell rules."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".export.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            if bom:
                fh.write("\ufeff")
            writer = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
            writer.writerow(spec.record.COLUMNS)
            async for values in store.rows(jid):
                writer.writerow([cell(v, raw=raw) for v in values])
                n += 1
                testing.reached("exporting")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return n


async def work(settings: Settings, *, api_key: Secret, url: str, job: str | None, until_idle: bool,
               quiet: bool = False) -> int:
    """`crawler work`: join open jobs (or one) as a worker; with `until_idle`, exit when none has items left."""
    async with _store(settings, url) as store:
        await store.outside(lambda: itemqueue.install(url))
        if job is not None and await store.job(job) is None:
            raise UsageError(f"--job {job}: no such job in {store.where} (see crawler jobs --jobs-url URL)")
        worker_id = await _register(store, settings, api_key, None)
        stopper: list[JobWorker | None] = [None]
        stopped: list[CrawlerError] = []
        wake = asyncio.Event()

        def stop(error: CrawlerError) -> None:
            stopped[:] = [error]
            wake.set()
            if isinstance(error, RunStopped):
                store.abandon(error)  # a store away no longer holds the stop for retry.stall_limit
            if stopper[0] is not None:
                _stop_session(stopper[0], error, quiet)

        installed = install_signals(stop)
        worst: CrawlerError | None = None
        worked: set[str] = set()  # jobs this worker took part in: one stopped for its budget makes the exit 4
        try:
            while not stopped:
                jobs = [j for j in await store.open_jobs() if job is None or j.id.startswith(job)]
                todo = [j for j in jobs if (await store.progress(j.id)).pending]
                if not todo:
                    if until_idle:
                        named = await store.job(job) if job is not None else None
                        if named is not None:
                            worked.add(named.id)
                        break
                    await store.beat(worker_id, None)
                    await pause(min(5.0, store.heartbeat_timeout / 2), wake)
                    continue
                for pg in todo:
                    worked.add(pg.id)
                    result = await _work_session(store, pg, settings, api_key, worker_id, stopper, stopped)
                    if not quiet:
                        print(f"crawler: job {pg.id}: {result.items:,} items worked here, {result.rows:,} rows,"
                              f" {result.requests_sent:,} requests, {result.lost} taken over by other workers",
                              file=sys.stderr)
                    err = result.error
                    if isinstance(err, BudgetExhausted):
                        continue  # that job is stopped; others may go on
                    if err is not None:
                        worst = err
                        break
                    if stopped:
                        break
                if worst is not None:
                    break
        finally:
            remove_signals(installed)
            with contextlib.suppress(RunStopped):
                await store.leave(worker_id)
        error = worst or (stopped[0] if stopped else None)
        if error is not None:
            print(f"crawler: {error}", file=sys.stderr)
            return error.exit_code if not isinstance(error, Interrupted) else error.code
        if not until_idle:
            return 0
        # Idle because jobs with items left may not spend more (unless a starter has raised the cap since): 4.
        held = [now for jid in sorted(worked) if (now := await store.job(jid)) is not None and now.status == "budget"
                and (await store.progress(jid)).pending > 0]
        if held:
            for pg in held:
                cap = f" ({pg.max_credits:,})" if pg.max_credits is not None else ""
                print(f"crawler: job {pg.id}: its --max-credits budget{cap} is spent with items pending; run its"
                      " starter's command again with a higher --max-credits, then workers go on", file=sys.stderr)
            return BudgetExhausted.exit_code
        return 0


async def _stoppable(work: Coroutine[Any, Any, object], running: list[asyncio.Task[Any]]) -> bool:
    """Run `work` as a task in `running`, which a stop cancels (at its next await): True if it ran to its end."""
    task = asyncio.ensure_future(work)
    running.append(task)
    try:
        await asyncio.wait((task,))
    finally:
        running.remove(task)
        if not task.done():  # we were cancelled ourselves
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()  # its error, if it failed
    return True


async def jobs_report(settings: Settings, *, url: str, as_json: bool = False) -> str:
    """`crawler jobs`: every job with its id, progress, failures, both credit counters and workers."""
    async with _store(settings, url) as store:
        found: list[dict[str, Any]] = []
        for pg in await store.jobs():
            p = await store.progress(pg.id)
            found.append({
                "id": pg.id, "command": pg.command, "status": pg.status, "items": p.total, "done": p.done,
                "failed": p.failed, "pending": p.pending, "failures": await store.failure_counts(pg.id),
                "rows": pg.rows, "requests_sent": pg.requests_sent, "credits_billed": pg.credits_billed,
                "max_credits": pg.max_credits,
                "workers": [{"host": w.host, "pid": w.pid, "key_hash": w.key_hash, "ledger": w.ledger, "live": w.live}
                            for w in await store.workers(pg.id, pg.heartbeat_timeout)],
            })
    if as_json:
        return json.dumps(found, indent=2)
    lines = []
    for j in found:
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(j["failures"].items())) or "none"
        lines.append(f"{j['id']}  {j['command']:<14} {j['status']:<8} {j['done']:,} done, {j['failed']:,} failed,"
                     f" {j['pending']:,} pending of {j['items']:,}; rows {j['rows']:,};"
                     f" requests_sent {j['requests_sent']:,}; credits_billed {j['credits_billed']:,}")
        lines.append(f"    failures: {fails}")
        for w in j["workers"]:
            lines.append(f"    worker {w['host']} pid {w['pid']} key {w['key_hash'][:8]} ledger {w['ledger']}"
                         f"{' (live)' if w['live'] else ''}")
    return "\n".join(lines) if lines else "no jobs"


async def export_job(settings: Settings, *, url: str, jid: str, out: Path, bom: bool | None = None,
                     raw: bool | None = None) -> int:
    """`crawler export JOB -o OUT.csv`: a finished job's output again, byte for byte (the output.bom/output.raw
    its starter wrote with, unless `bom`/`raw` are given: the --bom/--raw flags)."""
    async with _store(settings, url) as store:
        pg = await store.job(jid)
        if pg is None:
            raise UsageError(f"export: no job {jid} in {store.where} (see crawler jobs --jobs-url URL)")
        progress = await store.progress(pg.id)
        if progress.pending:
            raise UsageError(f"export: job {pg.id} is not finished ({progress.pending:,} items pending): run"
                             " `crawler work --jobs-url URL` or its starting command to finish it")
        spec = COMMANDS[pg.command]
        bom = pg.bom if bom is None else bom
        raw = pg.raw if raw is None else raw
        n = await export(store, pg.id, out, spec, bom=bom, raw=raw)
        write_failures(failures_path(out), await store.failures(pg.id), raw=raw)
        return n
