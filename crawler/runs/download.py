"""`crawler download`: media files of posts into DIR, resumably and exactly once.

Input (a posts/post-details CSV, or video URLs/ids that cost one `/post-detail/` credit each) -> the
job's state store (items + one `media` row per file) -> a TaskGroup of workers -> each file streamed
in chunks to `NAME.part`, fsynced at checkpoints and continued with HTTP Range after a crash, then
fsynced, renamed and recorded done. Media hosts are not the API: no key, no credits, no API rate gate;
their own parallelism and a polite per-host rate. A refused URL is renewed once through `/post-detail/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlsplit

import aiohttp
from aiolimiter import AsyncLimiter

from crawler import testing
from crawler.api import records as ep
from crawler.api.client import Client
from crawler.config import Secret, Settings
from crawler.engine.stop import GracefulStop
from crawler.engine.stop import install_signals as catch_signals
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    CrawlerError,
    DiskFull,
    Interrupted,
    ItemFailed,
    MediaUnavailable,
    NotFound,
    RunStopped,
    TransientError,
    UsageError,
    disk_error,
    disk_problems,
    rank,
    run_exit_code,
)
from crawler.jobs.handles import InvalidInput, normalize_post, open_input
from crawler.jobs.prepare import job_lock
from crawler.retry import retry_async
from crawler.runs.local import LEASE_MAX
from crawler.sinks.csv_sink import write_failures
from crawler.stores.local import MediaFile, StateStore

log = logging.getLogger("crawler.runs.download")

What = Literal["video", "hd", "watermarked", "cover", "music", "images"]
WHATS: tuple[What, ...] = ("video", "hd", "watermarked", "cover", "music", "images")
# The fixed extension of each kind; file names are <digits><EXT> (images: <digits>/<n>.jpg).
EXT: dict[str, str] = {"video": ".mp4", "hd": ".mp4", "watermarked": ".wm.mp4", "cover": ".jpg", "music": ".mp3",
                       "images": ".jpg"}
URL_COLUMNS = ("play", "hdplay", "wmplay", "cover", "music_url", "images")
CHUNK = 256 * 1024  # read size: memory per worker stays at a few chunks, whatever the file size
CHECKPOINT = 4 * 1024 * 1024  # bytes between fsync + recorded length of a .part (or CHECKPOINT_SECONDS)
CHECKPOINT_SECONDS = 1.0
MAX_ID = 25  # digits; TikTok ids are 19


class _Refused(Exception):
    """The media host refused the URL (403/404/410): expired, revoked or gone."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _Transient(TransientError):
    """A media transfer worth retrying from where it stopped: 5xx, a cut body, a timeout."""


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of `data` to `fd` (the seam tests replace to simulate a full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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


# --- names and URLs: only digits and fixed extensions ever reach the file system ---

def valid_id(value: str) -> bool:
    """True for an ASCII decimal id of sane length (nothing else may become a file name)."""
    return 0 < len(value) <= MAX_ID and value.isascii() and value.isdigit()


def file_name(video_id: str, what: str, n: int = 0) -> str:
    """The path of one file under DIR: `<id><ext>`, or `<id>/<n>.jpg` for the images of a photo post."""
    if not valid_id(video_id):
        raise ValueError(f"not a numeric id: {video_id!r}")
    return f"{video_id}/{int(n)}.jpg" if what == "images" else f"{video_id}{EXT[what]}"


def _http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(
        c.isspace() or not c.isprintable() for c in value)


def _size(value: str | int | None) -> int | None:
    if isinstance(value, int):
        return value if value > 0 else None
    text = (value or "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def urls_of(what: str, row: Mapping[str, str | int | None]) -> list[tuple[int, str, int | None]]:
    """(n, url, announced length) of the files a post has of this kind; `hd` falls back to `video`."""
    def text(key: str) -> str:
        value = row.get(key)
        return "" if value is None else str(value).strip()

    if what == "images":
        return [(k, u, None) for k, u in enumerate(text("images").split())]
    if what == "hd" and text("hdplay"):
        return [(0, text("hdplay"), _size(row.get("hd_size")))]
    column, length = {"video": ("play", "size"), "hd": ("play", "size"), "watermarked": ("wmplay", ""),
                      "cover": ("cover", ""), "music": ("music_url", "")}[what]
    url = text(column)
    return [(0, url, _size(row.get(length)) if length else None)] if url else []


def _printable(text: str) -> str:
    """An input value as it may appear in a message or the failures file (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:200]


# --- input ---

Entry = tuple[str, str, str | None, str | None, list[tuple[int, str, int | None]] | None]


def read_input(path: str, what: str) -> Iterator[Entry]:
    """(key, raw, reason, detail, files) per input item; files is None when `/post-detail/` must find them.

    A CSV whose header has `video_id` and a media column is read by column; anything else is one video
    URL or id per line. Hostile values (paths, NUL bytes, non-http URLs) become `invalid_input` entries.
    """
    stream = open_input(path)
    try:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
        first = text.readline()
        header = next(csv.reader([first]), []) if first.strip() else []
        names = [h.strip() for h in header]
        if "video_id" in names:  # a CSV; rows without a URL of the kind asked cost one /post-detail/ call
            yield from _csv_entries(first, text, what)
        else:
            lines = [first] if first else []
            for number, line in enumerate(_chain(lines, text), start=1):
                raw = line.rstrip("\r\n")
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
                try:
                    key = normalize_post(raw)
                except InvalidInput as exc:
                    yield f"invalid:{number}", _printable(raw.strip()), "invalid_input", f"line {number}: {exc}", None
                    continue
                if not valid_id(key):
                    yield f"invalid:{number}", _printable(raw.strip()), "invalid_input", \
                        f"line {number}: not a numeric video id", None
                    continue
                yield key, key, None, None, None
    finally:
        if path != "-":
            stream.close()


def _chain(first: list[str], rest: IO[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _csv_entries(first: str, text: IO[str], what: str) -> Iterator[Entry]:
    reader = csv.DictReader(_chain([first], text))
    for row in reader:
        number = reader.line_num
        video_id = (row.get("video_id") or "").strip()
        if not valid_id(video_id):
            yield (f"invalid:{number}", _printable(video_id), "invalid_input",
                   f"line {number}: video_id must be a numeric id", None)
            continue
        files = urls_of(what, {k: v for k, v in row.items() if isinstance(k, str)})
        bad = [u for _, u, _ in files if not _http_url(u)]
        if bad:
            yield (f"invalid:{number}", video_id, "invalid_input",
                   f"line {number}: not an http(s) URL: {_printable(bad[0])}", None)
            continue
        if what == "images" and not files:
            continue  # not a photo post: nothing to download, nothing failed
        yield video_id, video_id, None, None, files or None


# --- the run ---

class Download(GracefulStop):
    """One run of one download job. Build it, then `await run_download(download)`."""

    def __init__(self, options: DownloadOptions, settings: Settings, *, api_key: Secret | str | None = None,
                 restart: bool = False, retry_failed: bool = False, quiet: bool = True,
                 write: Callable[[int, bytes | memoryview], None] | None = None,
                 progress_interval: float | None = None) -> None:
        self.options = options
        self.settings = settings
        self.dir = Path(options.directory)
        self._api_key = api_key
        self._restart = restart
        self._retry_failed = retry_failed
        self.quiet = quiet
        self._write = write or write_all
        # A live line every 2 s on a terminal, a log line every 30 s otherwise (as the crawl commands do).
        self._interval = progress_interval or (2.0 if sys.stderr.isatty() else 30.0)
        self._stop: CrawlerError | None = None
        self._spent: CrawlerError | None = None  # the credit budget or balance ran out
        self._tasks: list[asyncio.Task[None]] = []
        self._limiters: dict[str, AsyncLimiter] = {}
        self.files_run = 0
        self.bytes_run = 0
        self.client: Client  # set only with an API key: then a first signal drains its answers (GracefulStop)
        self.state: StateStore
        self._session: aiohttp.ClientSession
        self._base_counters = (0, 0)
        self._queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue(maxsize=2 * settings.download_parallelism)

    @property
    def state_file(self) -> Path:
        """The job's state store, inside DIR (one job per kind of file)."""
        return self.dir / f".crawler-download-{self.options.what}.state.db"

    @property
    def failures_file(self) -> Path:
        """The failures CSV, inside DIR."""
        return self.dir / f"download-{self.options.what}.failures.csv"

    def request_stop(self, error: CrawlerError) -> None:
        """End the run: workers stop, what is complete stays complete, `error` decides the exit.

        After a first signal (`GracefulStop.signalled`) a `/post-detail/` request under way is answered and its
        URLs committed (it is paid for); media transfers stop at once (they are free, and continue with Range).
        """
        if self._stop is None or rank(error) < rank(self._stop):
            self._stop = error
        current = asyncio.current_task()
        api = self._api()
        paid = api.hook.on_wire if api is not None and isinstance(error, Interrupted) and self._draining else set()
        for task in self._tasks:
            if task is not current and task not in paid:
                task.cancel()

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
        try:
            status = await self._prepare()
            if status == "complete":
                return self._outcome(started, "already complete", "nothing to do; --restart runs it again")
            job = self.state.job()
            assert job is not None
            self._base_counters = (job.requests_sent, job.credits_billed)
            budget = None
            if self.settings.max_credits is not None:
                budget = max(self.settings.max_credits - job.requests_sent, 0)
            base_sent = reserved = job.requests_sent

            def reserve(n: int) -> None:
                # As a crawl's: the n-th request of this run leaves once the state store counts it (a lease at a
                # time), so a kill forgets no request (the lease left unsent counts as spent).
                nonlocal reserved
                if base_sent + n > reserved:
                    reserved = base_sent + n - 1 + max(1, min(self.settings.download_parallelism, LEASE_MAX))
                    if self.settings.max_credits is not None:
                        reserved = min(reserved, self.settings.max_credits)
                    self.state.reserve(reserved)

            if self._api_key is not None:
                self.client = Client(self.settings, api_key=self._api_key, request_budget=budget, reserve=reserve)
            self.state.start_run()
            async with contextlib.AsyncExitStack() as stack:
                if self._api_key is not None:
                    await stack.enter_async_context(self.client)
                self._session = await stack.enter_async_context(self._media_session())
                await self._run_workers()
            self.state.set_counters(*self.counters())
            self.state.release()  # the run ended cleanly: what it reserved but never sent is not spent
            if self._spent is not None and self._stop is None:
                self._stop = self._spent
            progress = self.state.progress()
            complete = self._stop is None and progress.pending == 0
            write_failures(self.failures_file, self.state.failures(), raw=self.settings.output_raw)
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
                    seq = self.state.add_item(key, raw, reason, detail)
                    if seq is not None and files:
                        self.state.add_media(MediaFile(seq, n, file_name(key, what, n), url, size)
                                             for n, url, size in files)
            testing.reached("input_read")
            await asyncio.sleep(0)
            if self._stop is not None:
                raise self._stop

    async def _run_workers(self) -> None:
        await asyncio.sleep(0)
        if self._stop is not None:
            return
        async with asyncio.TaskGroup() as outer:
            progress = outer.create_task(self._progress())
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tasks.append(tg.create_task(self._feed()))
                    for _ in range(self.settings.download_parallelism):
                        self._tasks.append(tg.create_task(self._worker()))
            finally:
                progress.cancel()

    async def _feed(self) -> None:
        after = 0
        while True:
            # Once the credits are spent, only posts whose files are known go on: the others need a credit each.
            spent = self._spent is not None
            chunk = self.state.pending_media(after, 500) if spent else self.state.pending(after, 500)
            if not chunk:
                break
            for seq, key, *_ in chunk:
                await self._queue.put((seq, key))
                after = seq
        await self._queue.join()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _worker(self) -> None:
        while self._stop is None:
            seq, key = await self._queue.get()
            try:
                await self._item(seq, key)
            except ItemFailed as exc:
                self.state.fail_item(seq, exc.reason, exc.endpoint or "media", str(exc))
            except (BudgetExhausted, BalanceExhausted) as exc:
                # Out of credits: this post stays pending (exit 4), but posts that need none go on, and
                # renewals already in flight are not thrown away.
                if self._spent is None:
                    self._spent = exc
            except RunStopped as exc:
                self.request_stop(exc)
                return
            finally:
                self._queue.task_done()

    async def _item(self, seq: int, video_id: str) -> None:
        files = self.state.media(seq)
        if not files:
            files = await self._find_urls(seq, video_id)
        for f in files:
            if f.status == "done":
                continue
            await self._file(seq, video_id, f)

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

    def _files_of(self, seq: int, video_id: str, post: ep.Post, *, refreshed: int) -> list[MediaFile]:
        what = self.options.what
        found = [(n, u, s) for n, u, s in urls_of(what, asdict(post)) if _http_url(u)]
        if not found:
            raise MediaUnavailable(f"{video_id}: the post has no {what} media")
        return [MediaFile(seq, n, file_name(video_id, what, n), u, s, refreshed=refreshed) for n, u, s in found]

    async def _find_urls(self, seq: int, video_id: str) -> list[MediaFile]:
        """One /post-detail/ call (one credit) for an item given by id or without a URL of this kind."""
        post = await self._post(video_id)
        files = self._files_of(seq, video_id, post, refreshed=0)
        self.state.add_media(files, self.counters())
        return self.state.media(seq)

    async def _refresh(self, seq: int, video_id: str, f: MediaFile) -> MediaFile:
        """Renew an item's URLs once through /post-detail/; the same file with its new URL."""
        post = await self._post(video_id)
        fresh = {m.n: (m.url, m.expected) for m in self._files_of(seq, video_id, post, refreshed=1)}
        self.state.refresh_media(seq, fresh, *self.counters())
        log.info("renewed the media URLs of %s (1 credit)", video_id)
        if f.n not in fresh:
            raise MediaUnavailable(f"{video_id}: file {f.n} is gone from the post")
        return next(m for m in self.state.media(seq) if m.n == f.n)

    async def _file(self, seq: int, video_id: str, f: MediaFile) -> None:
        final = self.dir / f.name
        if final.exists():
            size = final.stat().st_size
            if f.expected is not None and size != f.expected:
                raise MediaUnavailable(f"{final} exists with {size:,} bytes, not the {f.expected:,} announced;"
                                       " it was not written by this job: move it away, then run again")
            self.state.media_done(seq, f.n, size)  # complete (a rename whose commit a crash cut off)
            return
        try:
            await self._transfer(seq, f, final)
        except _Refused as exc:
            if f.refreshed:
                raise MediaUnavailable(f"{video_id}: the media host refused {f.name} ({exc}) after a refresh") from None
            f = await self._refresh(seq, video_id, f)
            try:
                await self._transfer(seq, f, final)
            except _Refused as again:
                raise MediaUnavailable(f"{video_id}: the media host refused {f.name} ({again}) even after"
                                       " a refresh") from None

    async def _transfer(self, seq: int, f: MediaFile, final: Path) -> None:
        """Stream one file into NAME.part (continuing at its durable length), then rename it into place."""
        if self._stop is not None:  # a drain: the /post-detail/ answer that found this URL is committed; no more
            raise self._stop
        part = final.with_name(final.name + ".part")
        # File-system calls that may wait on the disk run in a thread, so other transfers keep flowing.
        fd, offset = await asyncio.to_thread(_open_part, part, f.durable)
        try:
            pos = _Position(offset, f.expected, f.etag, offset, time.monotonic())

            async def attempt() -> None:
                await self._attempt(seq, f, fd, pos)

            def on_retry(exc: BaseException, tries: int, wait: float) -> None:
                log.info("retrying %s after %s (try %d, at byte %d, waiting %.2f s)", f.name, exc, tries,
                         pos.offset, wait)

            try:
                await retry_async(attempt, retry_on=_Transient, attempts=self.settings.retry_attempts,
                                  base_delay=self.settings.retry_base_delay, max_delay=self.settings.retry_max_delay,
                                  on_retry=on_retry)
            except _Transient as exc:
                self._checkpoint(seq, f, fd, pos)
                failed = ItemFailed(f"{f.name}: {exc} (gave up after {self.settings.retry_attempts} tries;"
                                    " the partial file is kept and resumed next run)")
                failed.endpoint = "media"
                raise failed from None
            except asyncio.CancelledError:
                self._checkpoint(seq, f, fd, pos)
                raise
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        testing.reached("media_fsynced")
        await asyncio.to_thread(_publish, part, final)
        testing.reached("media_renamed")
        self.state.media_done(seq, f.n, pos.offset)
        self.files_run += 1

    def _checkpoint(self, seq: int, f: MediaFile, fd: int, pos: _Position) -> None:
        with contextlib.suppress(OSError):
            os.fsync(fd)
            self.state.media_progress(seq, f.n, durable=pos.offset, expected=pos.expected, etag=pos.etag)

    async def _attempt(self, seq: int, f: MediaFile, fd: int, pos: _Position) -> None:
        host = urlsplit(f.url).netloc
        limiter = self._limiters.get(host)
        if limiter is None:
            # Even pacing, no burst: at most per_host_rate requests start in any second (+1 at its edge).
            limiter = self._limiters[host] = AsyncLimiter(1, 1.0 / self.settings.download_per_host_rate)
        headers = {}
        if pos.offset > 0:
            headers["Range"] = f"bytes={pos.offset}-"
            if pos.etag:
                headers["If-Range"] = pos.etag
        await limiter.acquire()
        try:
            async with self._session.get(f.url, headers=headers) as resp:
                status = resp.status
                if status in (401, 403, 404, 410):
                    raise _Refused(status)
                if status == 416 and pos.expected is not None and pos.offset == pos.expected:
                    return  # everything is here already
                if status == 416 or (status == 200 and pos.offset > 0):
                    self._restart_file(fd, pos)  # the host cannot continue: start the file again
                    if status == 416:
                        raise _Transient(f"{f.name}: HTTP 416 at byte {pos.offset}")
                elif status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != pos.offset:
                        self._restart_file(fd, pos)
                        raise _Transient(f"{f.name}: the host resumed at byte {start}, not {pos.offset}")
                    if total is not None:
                        pos.expected = total
                elif status != 200:
                    raise _Transient(f"{f.name}: HTTP {status}")
                if status == 200:
                    length = resp.content_length
                    if length is not None:
                        pos.expected = length
                tag = resp.headers.get("ETag")
                pos.etag = tag if tag and not tag.startswith("W/") else None
                async for chunk in resp.content.iter_chunked(CHUNK):
                    try:
                        self._write(fd, chunk)
                    except OSError as exc:
                        raise _disk_error(exc, self.dir) from None
                    pos.offset += len(chunk)
                    self.bytes_run += len(chunk)
                    now = time.monotonic()
                    if pos.offset - pos.synced >= CHECKPOINT or now - pos.synced_at >= CHECKPOINT_SECONDS:
                        await asyncio.to_thread(os.fsync, fd)
                        self.state.media_progress(seq, f.n, durable=pos.offset, expected=pos.expected,
                                                  etag=pos.etag)
                        pos.synced, pos.synced_at = pos.offset, now
                        testing.reached("media_checkpoint")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise _Transient(f"{f.name}: {type(exc).__name__} at byte {pos.offset}") from None
        if pos.expected is not None and pos.offset != pos.expected:
            raise _Transient(f"{f.name}: the body ended at byte {pos.offset} of {pos.expected}")

    def _restart_file(self, fd: int, pos: _Position) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        pos.offset = pos.synced = 0
        pos.etag = None

    async def _progress(self) -> None:
        if self.quiet:
            return
        last_bytes, last_files, last_time = 0, 0, time.monotonic()
        while True:
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            span = max(now - last_time, 1e-9)
            rate, files = (self.bytes_run - last_bytes) / span / 1e6, (self.files_run - last_files) / span
            last_bytes, last_files, last_time = self.bytes_run, self.files_run, now
            p = self.state.progress()
            print(f"download: {p.done + p.failed:,}/{p.total:,} posts, {self.files_run:,} files this run"
                  f" ({files:,.1f}/s), {self.bytes_run / 1e6:,.1f} MB ({rate:,.1f} MB/s), {p.failed:,} failed",
                  file=sys.stderr, flush=True)

    def _outcome(self, started: float, status: str, reason: str = "") -> DownloadOutcome:
        files, _, refreshed = self.state.media_totals()
        p = self.state.progress()
        job = self.state.job()
        fails = self.state.failure_counts()
        summary = DownloadSummary(
            status=status, files_done=files, files_run=self.files_run, bytes_run=self.bytes_run,
            skipped=max(files - self.files_run, 0), refreshed=refreshed, failed=p.failed, pending=p.pending,
            requests_sent=job.requests_sent if job else 0, credits_billed=job.credits_billed if job else 0,
            elapsed=time.monotonic() - started, directory=str(self.dir),
            failures_file=str(self.failures_file) if fails else "", failures=tuple(sorted(fails.items())),
            reason=reason or (str(self._stop) if self._stop else ""),
        )
        return DownloadOutcome(summary, self._stop)


@dataclass(slots=True)
class _Position:
    offset: int
    expected: int | None
    etag: str | None
    synced: int
    synced_at: float


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a `Content-Range: bytes A-B/T` header."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _disk_error(exc: OSError, directory: Path) -> CrawlerError:
    return disk_error(exc, directory) or DiskFull(f"cannot write into {directory}: {exc.strerror or exc}")


def _open_part(part: Path, durable: int) -> tuple[int, int]:
    """Open NAME.part cut back to its fsynced length (bytes after it may not have survived a power cut)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        offset = min(os.fstat(fd).st_size, durable)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd, offset


def _publish(part: Path, final: Path) -> None:
    """Rename a complete, fsynced NAME.part into place and make the rename durable."""
    os.replace(part, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def run_download(download: Download, *, install_signals: bool = True) -> DownloadOutcome:
    """Run a download under its job lock, turning SIGINT/SIGTERM into a clean, resumable stop."""
    if download.dir.exists() and not download.dir.is_dir():
        raise UsageError(f"-o {download.dir}: exists and is not a directory")
    download.dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install_signals:
        installed = catch_signals(download.signalled)
    try:
        def started() -> bool:
            return download.bytes_run > 0 or download.counters() != download._base_counters

        with (job_lock(download.dir / f".crawler-download-{download.options.what}"),
              disk_problems(download.dir, started=started)):
            return await download.run()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
