"""PostgreSQL jobs (`jobs.url`): the starter and `crawler work`.

Flow: the starter reads the input into the job store (stores/pg_jobs.py) and enqueues the items not done
(stores/pg_queue.py); every worker, the starter included, works the job's items in a session (runs/job_worker.py)
that runs the same command handlers (commands.py) a local run does; when no item is left the starter writes OUT.csv
from the database with the local sink's cell rules (runs/job_export.py, also `crawler jobs` and `crawler export`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crawler import testing
from crawler.api.client import Counters
from crawler.config import Secret, Settings, masked
from crawler.engine.outcome import Outcome
from crawler.engine.stats import Summary
from crawler.engine.stop import install_signals, remove_signals
from crawler.errors import (
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    RunStopped,
    UsageError,
)
from crawler.jobs.commands import COMMANDS, CommandSpec
from crawler.jobs.inputs import input_items
from crawler.jobs.prepare import JobOptions, another_input, check_output_path, failures_path, input_name
from crawler.rate.ledger import ledger_name
from crawler.rate.pacing import Pace
from crawler.retry import pause
from crawler.runs.job_export import export
from crawler.runs.job_worker import AUTO_START, JobWorker, SessionResult, host_name, job_store
from crawler.sinks.csv_sink import write_failures
from crawler.sinks.datafile import record_kinds, write_datafile
from crawler.stores import pg_queue as itemqueue
from crawler.stores.model import RETRIABLE, RETRIABLE_ALL, PgJob, WorkerInfo, job_id
from crawler.stores.pg_jobs import PgJobStore


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
        await store.retire(me.id)
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
                        earlier: Counters | None = None, quiet: bool = True) -> SessionResult:
    worker = JobWorker(store, pg, settings, api_key=key, worker_id=worker_id, earlier=earlier, quiet=quiet)
    stopper[0] = worker
    if stopped:
        worker.request_stop(stopped[0])
    try:
        return await worker.run()
    finally:
        stopper[0] = None


async def start_job(job: JobOptions, settings: Settings, *, api_key: Secret, url: str, restart: bool = False,
                    retry_failed: bool | str = False, overwrite: bool = False, quiet: bool = False,
                    earlier: Counters | None = None, continue_job: bool = False) -> Outcome:
    """`crawler COMMAND INPUT -o OUT.csv --jobs-url URL`: create or resume the job, work it, export it; `earlier`:
    the requests this command sent for it before (the region lookup), counted as the starter's first;
    `continue_job` (--continue): another input sharing under half its items with the job of OUT.csv goes on."""
    started = time.monotonic()
    spec = COMMANDS[job.command]
    out = Path(job.output)
    # Never the input file (nor a path through a file), new job, --restart or resumed alike.
    check_output_path(job, overwrite=overwrite)
    async with job_store(settings, url) as store:
        ready = await _ready(store, job, settings, url=url, restart=restart, retry_failed=retry_failed,
                             overwrite=overwrite, started=started, continue_job=continue_job)
        if isinstance(ready, Outcome):
            return ready
        jid = ready.id
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
            result = await _work_session(store, ready, settings, api_key, worker_id, stopper, stopped, earlier=earlier,
                                         quiet=quiet)
            error = result.error
            if error is None:
                error = await _until_done(store, jid, settings, api_key, worker_id, stopper, stopped, wake, result)
            progress = await store.progress(jid)
            pg = await store.job(jid)
            assert pg is not None
            complete = error is None and progress.pending == 0
            if complete:
                await store.set_status(jid, "done")
                await store.housekeep()  # this job's sessions of workers that left, folded into it
                # A signal stops the export too (its temporary file removed); run again, the job exports.
                if stopped or not await _stoppable(export(store, jid, out, spec, bom=settings.output_bom,
                                                          raw=settings.output_raw, fmt=settings.output_format),
                                                   exporting):
                    error, complete = stopped[0], False
            write_failures(failures_path(out), await store.failures(jid), raw=settings.output_raw)
            return _summary(job, store, pg, progress, await store.failure_counts(jid), error, started,
                            status="completed" if complete else "stopped",
                            result=result, settings=settings)
        finally:
            remove_signals(installed)
            with contextlib.suppress(RunStopped):  # a stop while the store is away: the row goes a week later
                await store.retire(worker_id)


async def _ready(store: PgJobStore, job: JobOptions, settings: Settings, *, url: str, restart: bool,
                 retry_failed: bool | str, overwrite: bool, started: float, continue_job: bool) -> PgJob | Outcome:
    """Create or resume the starter's job and enqueue its items not done: the job, or the outcome of a job already
    complete with its output there (nothing to do)."""
    out = Path(job.output)
    await store.outside(lambda: itemqueue.install(url))
    jid = await _create(store, job, settings, restart=restart, overwrite=overwrite, continue_job=continue_job)
    testing.reached("job_printed")
    retry = RETRIABLE_ALL if retry_failed == "all" else RETRIABLE if retry_failed else ()
    pg = await store.job(jid)
    assert pg is not None
    progress = await store.progress(jid)
    fails = await store.failure_counts(jid)
    if (pg.status == "done" and progress.pending == 0 and await asyncio.to_thread(out.exists) and not restart
            and not any(fails.get(reason) for reason in retry)):
        # Before resume(): the job keeps the output.bom/output.raw its OUT.csv was written with (export's).
        await asyncio.to_thread(write_datafile, out, record_kinds(COMMANDS[job.command].record),
                                settings.output_format, guarded=not pg.raw, if_missing=True)
        return _summary(job, store, pg, progress, fails, None, started,
                        status="already complete", result=SessionResult(), settings=settings,
                        reason=f"{'no failure it retries' if retry else 'nothing to do'}; --restart runs it again")
    await store.resume(jid, settings.max_credits, retry=retry, bom=settings.output_bom, raw=settings.output_raw)
    pg = await store.job(jid)
    assert pg is not None
    orphans = await store.orphans(jid, heartbeat_timeout=pg.heartbeat_timeout)
    testing.reached("enqueuing")
    await store.outside(lambda: itemqueue.enqueue(url, jid, orphans))
    return pg


async def _until_done(store: PgJobStore, jid: str, settings: Settings, api_key: Secret, worker_id: str,
                      stopper: list[JobWorker | None], stopped: list[CrawlerError], wake: asyncio.Event,
                      result: SessionResult) -> CrawlerError | None:
    """After the starter's session: other workers may still hold items; wait for them (a dead one's items come back
    to the queue, and are worked here too, into `result`). The error that ends the job's run, if any."""
    error: CrawlerError | None = None
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
    return error


async def _create(store: PgJobStore, job: JobOptions, settings: Settings, *, restart: bool, overwrite: bool,
                  continue_job: bool) -> str:
    """Create the starter's job (or find it), print its id; the job of an edited input continues the one of this
    output on this host, which is closed, unless it is another input sharing under half its items with that job
    (exit 2, as for a local job: `another_input`)."""
    out = Path(job.output)
    options = {k: v for k, v in asdict(job).items() if k not in ("input", "output", "command")}
    spec = COMMANDS[job.command]
    name = input_name(job, spec)

    def check(before: str, counts: tuple[int, int]) -> None:
        another_input(out, before, name, edited=True, continue_job=continue_job, shared=lambda: counts)

    spool, digest = _spool(job, spec)
    try:
        jid = job_id(job.command, options, digest)
        if restart:
            await store.delete_job(jid)
        where = f"{host_name()}:{await asyncio.to_thread(out.resolve)}"
        created = await store.create_job(jid, job.command, options, _Spooled(spool), output=where, inherit=not restart,
                                         heartbeat_timeout=settings.jobs_heartbeat_timeout, bom=settings.output_bom,
                                         raw=settings.output_raw, input_name=name, check=check)
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


def _lost(lost: int) -> str:
    """The items this process held and lost: another worker took them over when this one's heartbeat lapsed."""
    if not lost:
        return ""
    return f"; {lost:,} item{'' if lost == 1 else 's'} it held went to other workers (its heartbeat lapsed)"


def _summary(job: JobOptions, store: PgJobStore, pg: PgJob, progress: Any, fails: dict[str, int],
             error: CrawlerError | None, started: float, *, status: str, result: SessionResult, settings: Settings,
             reason: str = "") -> Outcome:
    out = Path(job.output)
    failures_file = failures_path(out)
    pace = Pace.of(settings.rate_options())  # the pace every session of this process used
    summary = Summary(
        command=job.command, status=status, items_total=progress.total, items_done=progress.done,
        items_failed=sum(fails.values()),  # failed items and failed reply walks: the failures file's rows
        items_pending=progress.pending, rows_written=result.rows, rows_total=pg.rows,
        requests_sent=pg.requests_sent, credits_billed=pg.credits_billed, run_requests=result.requests_sent,
        rate_limited=result.rate_limited, retries=result.retries, elapsed=time.monotonic() - started,
        parallelism=result.parallelism or settings.parallelism or AUTO_START,
        rate_used=pace.effective_rate if pace.enabled else None,  # the rate used, as a local run reports it
        rate_window_seconds=pace.window if pace.enabled else None,
        rate_wait_seconds=result.rate_wait_seconds, failures=fails, run_credits_billed=result.credits_billed,
        responses=dict(result.responses),
        output=str(out) if status != "stopped" else f"job {pg.id} in {store.where}",
        failures_file=str(failures_file) if fails else "",
        reason=reason or (str(error) if error else ""),
        notes=(f"job {pg.id}: {result.items:,} items worked here{_lost(result.lost)}",
               *((result.shapes,) if result.shapes else ())),
    )
    return Outcome(summary, error)


async def work(settings: Settings, *, api_key: Secret, url: str, job: str | None, until_idle: bool,
               quiet: bool = False, tally: SessionResult | None = None) -> int:
    """`crawler work`: join open jobs (or one) as a worker; with `until_idle`, exit when none has items left. What
    this worker did on every job is added up in ``tally`` (for the metrics file and the summary JSON)."""
    async with job_store(settings, url) as store:
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
                worst = await _work_each(store, todo, settings, api_key, worker_id, stopper, stopped, worked=worked,
                                         quiet=quiet, tally=tally)
                if worst is not None:
                    break
        finally:
            remove_signals(installed)
            with contextlib.suppress(RunStopped):  # a stop while the store is away: the row goes a week later
                await store.retire(worker_id)
        return await _work_exit(store, worst or (stopped[0] if stopped else None), until_idle=until_idle,
                                worked=worked)


async def _work_each(store: PgJobStore, todo: list[PgJob], settings: Settings, api_key: Secret, worker_id: str,
                     stopper: list[JobWorker | None], stopped: list[CrawlerError], *, worked: set[str],
                     quiet: bool, tally: SessionResult | None) -> CrawlerError | None:
    """A session on each job with items left, in turn (each added to `worked`): the first error that ends `crawler
    work` (a job stopped for its budget does not: others may go on); None after a stop, or when all are worked."""
    for pg in todo:
        worked.add(pg.id)
        result = await _work_session(store, pg, settings, api_key, worker_id, stopper, stopped, quiet=quiet)
        if tally is not None:
            _merge(tally, result)
        if not quiet:
            print(f"crawler: job {pg.id}: {result.items:,} items worked here, {result.rows:,} rows,"
                  f" {result.requests_sent:,} requests{_lost(result.lost)}",
                  file=sys.stderr)
        err = result.error
        if isinstance(err, BudgetExhausted):
            continue  # that job is stopped; others may go on
        if err is not None:
            return err
        if stopped:
            break
    return None


async def _work_exit(store: PgJobStore, error: CrawlerError | None, *, until_idle: bool, worked: set[str]) -> int:
    """`crawler work`'s exit code: its error's; with `until_idle`, 4 if a job it worked stopped for its budget with
    items pending (told how to go on), else 0."""
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

