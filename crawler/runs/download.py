"""`crawler download`: media files of posts into DIR, resumably and exactly once.

Input (a posts/post-details CSV, or video URLs/ids that cost one `/post-detail/` credit each) -> the
job's state store (items + one `media` row per file) -> the engine's workers (`crawler.engine.pool`) -> each
file streamed in chunks to `NAME.part`, fsynced at checkpoints and continued with HTTP Range after a crash, then
fsynced, renamed and recorded done (`crawler.runs.transfer`). Media hosts are not the API: no key, no credits,
no API rate gate; their own parallelism and a polite per-host rate. A refused URL is renewed once through
`/post-detail/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client
from crawler.config import Secret, Settings
from crawler.engine.lease import LocalLease
from crawler.engine.pool import Engine, StopPolicy
from crawler.engine.stats import ProgressReporter, Snapshot
from crawler.engine.stop import install_signals as catch_signals
from crawler.engine.stop import remove_signals
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    CrawlerError,
    Interrupted,
    ItemFailed,
    MediaUnavailable,
    NotFound,
    QuotaSpent,
    UsageError,
    disk_problems,
    run_exit_code,
)
from crawler.jobs.media import SKIPS, VIDEO_KINDS, WHATS, What, file_name, http_url, read_input, skip_reason, urls_of
from crawler.jobs.prepare import job_lock
from crawler.options import EngineOptions
from crawler.runs.transfer import (
    CHECKPOINT,
    CHECKPOINT_SECONDS,
    CHUNK,
    MediaTransfer,
    NotAVideo,
    Refused,
    final_path,
    write_all,
)
from crawler.sinks.csv_sink import write_failures
from crawler.stores.local import StateStore
from crawler.stores.model import MediaFile

log = logging.getLogger("crawler.runs.download")

# Names the command line and tests know from here.
__all__ = ["CHECKPOINT", "CHECKPOINT_SECONDS", "CHUNK", "WHATS", "Download", "DownloadOptions", "DownloadOutcome",
           "DownloadSummary", "What", "file_name", "read_input", "run_download", "urls_of", "write_all"]


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """What defines a download job: the input, the directory, the kind of file."""

    input: str
    directory: str
    what: What = "hd"


@dataclass(frozen=True, slots=True)
class DownloadSummary:
    """The end-of-run account: this run's files and bytes, the job's totals, and the API credits."""

    status: str
    files_done: int  # the job, across runs
    files_run: int  # downloaded by this run
    bytes_run: int
    skipped: int  # complete already (by an earlier run, or on disk)
    refreshed: int  # posts whose URLs were renewed through /post-detail/ (the job)
    failed: int
    pending: int
    requests_sent: int
    credits_billed: int
    elapsed: float
    directory: str
    failures_file: str = ""
    failures: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    skips: tuple[tuple[str, int], ...] = ()  # posts the kind does not apply to, by reason (jobs.media.SKIPS)
    skipped_file: str = ""
    posts_done: int = 0  # the job's posts with every file (the input items; `failed` and `pending` count posts too)

    def skip_lines(self) -> list[str]:
        """One line per reason posts were skipped: "N photo posts skipped: not videos; use --what images ..."."""
        return [f"{n:,} {SKIPS.get(reason, reason)}" for reason, n in self.skips]

    def render(self) -> str:
        """A small aligned table for the terminal."""
        rate = self.bytes_run / self.elapsed / 1e6 if self.elapsed > 0 else 0.0
        lines = [
            ("job", "download: " + self.status + (f" ({self.reason})" if self.reason else "")),
            ("files", f"{self.files_run:,} this run, {self.files_done:,} in the job; {self.skipped:,} skipped,"
                      f" {self.failed:,} failed, {self.pending:,} pending"),
            ("bytes", f"{self.bytes_run:,} this run ({rate:,.1f} MB/s over {self.elapsed:,.1f} s)"),
            ("refreshed", f"{self.refreshed:,} posts (one /post-detail/ credit each)"),
            ("requests_sent", f"{self.requests_sent:,}"),
            ("credits_billed", f"{self.credits_billed:,}"),
            ("directory", self.directory),
        ]
        if self.failures:
            lines.append(("failures", ", ".join(f"{k}: {v:,}" for k, v in self.failures)))
        if self.failures_file:
            lines.append(("failures file", self.failures_file))
        lines += [("skipped", line) for line in self.skip_lines()]
        if self.skipped_file:
            lines.append(("skipped file", self.skipped_file))
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)


@dataclass(frozen=True, slots=True)
class DownloadOutcome:
    """How a download run ended."""

    summary: DownloadSummary
    error: CrawlerError | None

    @property
    def exit_code(self) -> int:
        """CONTRACT.md's exit code."""
        return run_exit_code(self.error, failed=bool(self.summary.failed))


class _Skipped(Exception):
    """The kind of file asked for does not apply to the post (`jobs.media.SKIPS`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _files_of(what: str, seq: int, video_id: str, post: ep.Post, *, refreshed: int) -> list[MediaFile]:
    """The files of this kind a `/post-detail/` answer gives a post (or `_Skipped`, or none: MediaUnavailable)."""
    fields = asdict(post)
    skip = skip_reason(what, fields)
    if skip is not None:
        raise _Skipped(*skip)
    found = [(n, u, s) for n, u, s in urls_of(what, fields) if http_url(u)]
    if not found:
        raise MediaUnavailable(f"{video_id}: the post has no {what} media")
    return [MediaFile(seq, n, file_name(video_id, what, n), u, s, refreshed=refreshed) for n, u, s in found]


# --- the run ---

def download_state_file(directory: Path, what: str) -> Path:
    """A download job's state store: inside DIR, one job per kind of file (`crawler status DIR` reads them)."""
    return directory / f".crawler-download-{what}.state.db"


def download_jobs(directory: Path) -> dict[str, Path]:
    """The download jobs in DIR: kind of file -> state store."""
    prefix, suffix = ".crawler-download-", ".state.db"
    return {p.name[len(prefix):-len(suffix)]: p for p in sorted(directory.glob(f"{prefix}*{suffix}"))}


class Download:
    """One run of one download job. Build it, then `await run_download(download)`."""

    def __init__(self, options: DownloadOptions, settings: Settings, *, api_key: Secret | str | None = None,
                 restart: bool = False, retry_failed: bool = False, quiet: bool = True,
                 write: Callable[[int, bytes | memoryview], None] | None = None,
                 progress_interval: float | None = None, auto: bool = False) -> None:
        self.options = options
        # --parallelism auto: workers for the /post-detail/ requests grow by the pacing rule; files in flight stay
        # at download.parallelism.
        self._auto = auto
        self.settings = settings
        self.dir = Path(options.directory)
        self._api_key = api_key
        self._restart = restart
        self._retry_failed = retry_failed
        self.quiet = quiet
        self._write = write  # how media bytes are written (default: this module's `write_all`)
        self._interval = progress_interval  # None: the progress line's own (engine.stats.ProgressReporter)
        self.stop = StopPolicy(quiet=quiet)
        self._spent: CrawlerError | None = None  # the credit budget or balance ran out
        self.client: Client  # set only with an API key: then a first signal drains its answers (StopPolicy)
        self.state: StateStore
        self.media: MediaTransfer
        self._base_counters = (0, 0)
        self._lease: LocalLease

    @property
    def files_run(self) -> int:
        """Files this run downloaded."""
        media: MediaTransfer | None = getattr(self, "media", None)
        return media.files if media is not None else 0

    @property
    def bytes_run(self) -> int:
        """Bytes this run received."""
        media: MediaTransfer | None = getattr(self, "media", None)
        return media.bytes if media is not None else 0

    @property
    def state_file(self) -> Path:
        """The job's state store, inside DIR (one job per kind of file)."""
        return download_state_file(self.dir, self.options.what)

    @property
    def failures_file(self) -> Path:
        """The failures CSV, inside DIR."""
        return self.dir / f"download-{self.options.what}.failures.csv"

    @property
    def skipped_file(self) -> Path:
        """The posts skipped (`jobs.media.SKIPS`: a photo post asked for as a video, ...), inside DIR."""
        return self.dir / f"download-{self.options.what}.skipped.csv"

    @property
    def _stop(self) -> CrawlerError | None:
        return self.stop.error

    def request_stop(self, error: CrawlerError) -> None:
        """End the run: workers stop, what is complete stays complete, `error` decides the exit.

        After a first signal (`StopPolicy.signalled`) a `/post-detail/` request under way is answered and its
        URLs committed (it is paid for); media transfers stop at once (they are free, and continue with Range).
        """
        self.stop.request_stop(error)

    def signalled(self, error: Interrupted) -> int:
        """A SIGINT/SIGTERM (see `StopPolicy`); the number of answers the stop waits for."""
        return self.stop.signalled(error)

    def _api(self) -> Client | None:
        return getattr(self, "client", None)

    def counters(self) -> tuple[int, int]:
        """The job's (requests_sent, credits_billed) including this run's."""
        api = self._api()
        c = api.counters if api is not None else None
        return (self._base_counters[0] + (c.requests_sent if c else 0),
                self._base_counters[1] + (c.credits_billed if c else 0))

    async def run(self) -> DownloadOutcome:
        """Run (or resume) the job to completion or to a stop."""
        started = time.monotonic()
        self.state = StateStore(self.state_file)
        self.media = MediaTransfer(self.state, self.dir, retry=self.settings.client_options().retry,
                                   per_host_rate=self.settings.download_per_host_rate,
                                   at_once=self.settings.download_parallelism,
                                   video=self.options.what in VIDEO_KINDS,
                                   write=self._write or write_all)  # looked up here: the seam tests replace
        try:
            status = await self._prepare()
            if status == "complete":
                return self._outcome(started, "already complete", "nothing to do; --restart runs it again")
            job = self.state.job()
            assert job is not None
            self._base_counters = (job.requests_sent, job.credits_billed)
            # As a crawl's: the n-th request of this run leaves once the state store counts it (a lease at a time),
            # so a kill forgets no request (the lease left unsent counts as spent).
            self._lease = lease = LocalLease(self.state, base=job.requests_sent, cap=self.settings.max_credits)
            if self._api_key is not None:
                self.client = Client(self.settings.client_options(), api_key=self._api_key, request_budget=lease.left,
                                     reserve=lease.take)
            self.state.start_run()
            async with contextlib.AsyncExitStack() as stack:
                if self._api_key is not None:
                    await stack.enter_async_context(self.client)
                self.media.session = await stack.enter_async_context(self._media_session())
                await self._engine().run()
            self.state.set_counters(*self.counters())
            await lease.settle(self.counters()[0])  # a clean end: what it reserved but never sent is not spent
            if self._spent is not None and self._stop is None:
                self.stop.error = self._spent  # the run is over: it decides the exit, nothing is left to stop
            progress = self.state.progress()
            complete = self._stop is None and progress.pending == 0
            write_failures(self.failures_file, self.state.failures(), raw=self.settings.output_raw)
            write_failures(self.skipped_file, self.state.skipped(), raw=self.settings.output_raw)
            if complete:
                self.state.set_status("done")
            return self._outcome(started, "completed" if complete else "stopped")
        finally:
            self.state.close()

    def _media_session(self) -> aiohttp.ClientSession:
        n = self.settings.download_parallelism
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout,
                                        sock_read=self.settings.read_timeout)
        connector = aiohttp.TCPConnector(limit=n, limit_per_host=n)
        # auto_decompress off: the bytes on disk are the bytes the host sent, so Range offsets line up.
        return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                     raise_for_status=False)

    async def _prepare(self) -> str:
        options = {"what": self.options.what}
        existing = self.state.job()
        if existing is not None and (self._restart or existing.options != options or existing.status == "ingesting"):
            existing = None
        if existing is None:
            self.state.create_job("download", "", options, str(self.dir))
        elif self._retry_failed:
            self.state.retry_failed()
        # Read the input on every run: an edited input adds its new items, known ones keep their state. Complete
        # is what the items say (none pending): a stop while reading may leave new items beside a "done" status.
        await self._ingest()
        if existing is not None and existing.status == "done" and self.state.complete():
            return "complete"
        self.state.set_status("running")
        return "resume" if existing is not None else "new"

    async def _ingest(self) -> None:
        """Store the input's items (and, from a CSV, their files) in batches, letting signals in between."""
        what = self.options.what
        entries = read_input(self.options.input, what)
        while True:
            batch = [e for _, e in zip(range(5000), entries, strict=False)]
            if not batch:
                return
            with self.state.begin():
                for key, raw, reason, detail, files in batch:
                    seq = self.state.add_item(key, raw, reason, detail, skipped=reason in SKIPS)
                    if seq is not None and files:
                        self.state.add_media(MediaFile(seq, n, file_name(key, what, n), url, size)
                                             for n, url, size in files)
            testing.reached("input_read")
            await asyncio.sleep(0)
            if self._stop is not None:
                raise self._stop

    def _engine(self) -> Engine[tuple[int, str]]:
        """The pool over this run's ports: pending posts, the transfers, the lease; no committer (each file is
        recorded in the state store as it completes). A soft stop lets only the /post-detail/ requests on the
        wire finish: media transfers are free and continue with Range next run."""
        n = self.settings.download_parallelism
        options = EngineOptions(workers=None if self._auto else n, start=n)
        reporter = ProgressReporter("download", self._snapshot, quiet=self.quiet, interval=self._interval)
        api = self._api()
        if api is not None:
            self.stop.attach(api)
        return Engine(source=self, handler=self._handle, stop=self.stop, options=options, client=api,
                      budget=self._lease, reporter=reporter, drain_items=False)

    async def items(self) -> AsyncIterator[tuple[int, str]]:
        """Pending posts in input order (the engine's item source)."""
        after = 0
        while True:
            # Once the credits are spent, only posts whose files are known go on: the others need a credit each.
            spent = self._spent is not None
            chunk = self.state.pending_media(after, 500) if spent else self.state.pending(after, 500)
            if not chunk:
                return
            for seq, key, *_ in chunk:
                yield seq, key
                after = seq

    async def _handle(self, entry: tuple[int, str]) -> None:
        seq, key = entry
        try:
            await self._item(seq, key)
        except ItemFailed as exc:
            self.state.fail_item(seq, exc.reason, exc.endpoint or "media", str(exc))
        except (BudgetExhausted, BalanceExhausted, QuotaSpent) as exc:
            # Out of credits: this post stays pending (exit 4), but posts that need none go on, and
            # renewals already in flight are not thrown away.
            if self._spent is None:
                self._spent = exc

    async def _item(self, seq: int, video_id: str) -> None:
        try:
            files = self.state.media(seq)
            if not files:
                files = await self._find_urls(seq, video_id)
            for f in files:
                if f.status == "done":
                    continue
                await self._file(seq, video_id, f)
        except _Skipped as skip:  # a /post-detail/ answer showed it: its credit is recorded with the skip
            self.state.skip_item(seq, skip.reason, str(skip), self.counters())
        except NotAVideo as exc:  # the CSV did not say it was a photo post; the host's answer did
            self.state.skip_item(seq, "not_a_video", str(exc))

    async def _post(self, video_id: str) -> ep.Post:
        api = self._api()
        if api is None:
            raise MediaUnavailable(f"{video_id}: no usable media URL, and no API key to renew it"
                                   " (set TIKLIVE_API_KEY; one /post-detail/ credit per post)")
        if self._spent is not None:  # out of credits: a call would only wait for a rate slot to be refused
            raise BudgetExhausted(str(self._spent))
        try:
            return await api.post_detail(video_id, source=video_id)
        except NotFound as exc:
            raise MediaUnavailable(f"{video_id}: {exc}") from None

    async def _find_urls(self, seq: int, video_id: str) -> list[MediaFile]:
        """One /post-detail/ call (one credit) for an item given by id or without a URL of this kind."""
        post = await self._post(video_id)
        files = _files_of(self.options.what, seq, video_id, post, refreshed=0)
        self.state.add_media(files, self.counters())
        return self.state.media(seq)

    async def _refresh(self, seq: int, video_id: str, f: MediaFile) -> MediaFile:
        """Renew an item's URLs once through /post-detail/; the same file with its new URL."""
        post = await self._post(video_id)
        fresh = {m.n: (m.url, m.expected) for m in _files_of(self.options.what, seq, video_id, post, refreshed=1)}
        self.state.refresh_media(seq, fresh, *self.counters())
        log.info("renewed the media URLs of %s (1 credit)", video_id)
        if f.n not in fresh:
            raise MediaUnavailable(f"{video_id}: file {f.n} is gone from the post")
        return next(m for m in self.state.media(seq) if m.n == f.n)

    async def _file(self, seq: int, video_id: str, f: MediaFile) -> None:
        final = final_path(self.dir, f)  # None until an answer gave the file its extension
        if final is not None and final.exists():
            size = final.stat().st_size
            if f.expected is not None and size != f.expected:
                raise MediaUnavailable(f"{final} exists with {size:,} bytes, not the {f.expected:,} announced;"
                                       " it was not written by this job: move it away, then run again")
            self.state.media_done(seq, f.n, size)  # complete (a rename whose commit a crash cut off)
            return
        try:
            await self._transfer(seq, f)
        except Refused as exc:
            if f.refreshed:
                raise MediaUnavailable(f"{video_id}: the media host refused {f.name} ({exc}) after a refresh") from None
            f = await self._refresh(seq, video_id, f)
            try:
                await self._transfer(seq, f)
            except Refused as again:
                raise MediaUnavailable(f"{video_id}: the media host refused {f.name} ({again}) even after"
                                       " a refresh") from None

    async def _transfer(self, seq: int, f: MediaFile) -> None:
        if self._stop is not None:  # a drain: the /post-detail/ answer that found this URL is committed; no more
            raise self._stop
        await self.media.transfer(seq, f)

    def _snapshot(self) -> Snapshot:
        p = self.state.progress()
        sent, billed = self.counters()
        return Snapshot(p.done + p.failed, p.total, self.files_run, sent, billed, failed=p.failed, unit="files",
                        note=f"{self.bytes_run / 1e6:,.1f} MB this run")

    def _outcome(self, started: float, status: str, reason: str = "") -> DownloadOutcome:
        files, _, refreshed = self.state.media_totals()
        p = self.state.progress()
        job = self.state.job()
        fails = self.state.failure_counts()
        skips = Counter(reason for _, _, reason, _ in self.state.skipped())
        summary = DownloadSummary(
            status=status, files_done=files, files_run=self.files_run, bytes_run=self.bytes_run,
            skipped=max(files - self.files_run, 0), refreshed=refreshed, failed=p.failed, pending=p.pending,
            requests_sent=job.requests_sent if job else 0, credits_billed=job.credits_billed if job else 0,
            elapsed=time.monotonic() - started, directory=str(self.dir),
            failures_file=str(self.failures_file) if fails else "", failures=tuple(sorted(fails.items())),
            reason=reason or (str(self._stop) if self._stop else ""), skips=tuple(sorted(skips.items())),
            skipped_file=str(self.skipped_file) if skips else "", posts_done=p.done,
        )
        return DownloadOutcome(summary, self._stop)


async def run_download(download: Download, *, install_signals: bool = True) -> DownloadOutcome:
    """Run a download under its job lock, turning SIGINT/SIGTERM into a clean, resumable stop."""
    if download.dir.exists() and not download.dir.is_dir():
        raise UsageError(f"-o {download.dir}: exists and is not a directory")
    download.dir.mkdir(parents=True, exist_ok=True)
    installed = catch_signals(download.stop.signalled) if install_signals else []
    try:
        def started() -> bool:
            return download.bytes_run > 0 or download.counters() != download._base_counters

        with (job_lock(download.dir / f".crawler-download-{download.options.what}"),
              disk_problems(download.dir, started=started)):
            return await download.run()
    finally:
        remove_signals(installed)
