"""The run: input -> state store -> a TaskGroup of workers walking paginators -> the CSV sink.

A job (command, input content, output path) is read into the state store once, de-duplicated there;
workers take pending items in input order, each page of rows goes to the sink and is committed before
the worker asks for the next page, so a kill at any moment costs at most one page per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import logging
import math
import os
import signal
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from crawler import endpoints as ep
from crawler import killpoints
from crawler.client import Client
from crawler.config import Secret, Settings
from crawler.errors import (
    CrawlerError,
    Interrupted,
    ItemFailed,
    JobLocked,
    RunStopped,
    UsageError,
)
from crawler.handles import (
    InvalidInput,
    decode_input,
    normalize_name,
    normalize_post,
    normalize_user,
    open_input,
    read_lines,
    undecodable,
)
from crawler.sinks import Batch, CsvSink, part_path, write_failures
from crawler.state import RETRIABLE, RETRIABLE_ALL, ItemUpdate, StateStore, UserDirectory
from crawler.stats import ProgressReporter, Snapshot, Summary

log = logging.getLogger("crawler.crawl")

MAX_AUTO_WORKERS = 64


@dataclass(frozen=True, slots=True)
class JobOptions:
    """Everything that defines a job's output (a change to any of these is a different job)."""

    command: str
    input: str  # a file, "-" for stdin, or the keyword of a search command
    output: str
    column: str | None = None
    by_id: bool = False
    with_replies: bool = False
    publish_time: int = 0
    sort_by: int = 0
    region: str | None = None
    max_items: int | None = None
    max_pages: int | None = None
    page_size: int | None = None


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One pending input item, with where its walk stopped last time."""

    seq: int
    key: str
    raw: str
    cursor: Any
    rows: int
    pages: int = 0

    @property
    def user_id(self) -> str | None:
        """The numeric id of an `id:` item."""
        return self.key[3:] if self.key.startswith("id:") else None

    @property
    def source(self) -> str:
        """What the rows' source column says: the handle, or the numeric id."""
        return self.user_id or self.key


@dataclass(frozen=True, slots=True)
class Step:
    """Rows a handler produced and how far they take the item."""

    rows: Sequence[ep.Record]
    cursor: Any = None  # the next cursor while the walk goes on
    last: bool = True
    guard: str | None = None  # a pagination guard ended the walk early
    capped: bool = False  # the --max-pages cap ended the walk while the list went on


Handler = Callable[["Crawl", WorkItem], AsyncGenerator[Step, None]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """How one command reads its input and turns an item into rows."""

    name: str
    input_kind: str  # users, posts, names, music, pairs, keyword
    record: type[ep.Record]
    endpoint: str
    handler: Handler
    list_kind: str | None = None  # the paginated list it walks, for estimate


# --- handlers ---

async def _profiles(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    # By handle when given one (same price): a handle that changed owner must show its new owner.
    uid = item.user_id
    profile = await crawl.client.user_info(user_id=uid) if uid else await crawl.client.user_info(item.key)
    crawl.learn(profile)
    yield Step([profile])


def _user_list(kind: str) -> Handler:
    async def handler(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
        uid = await crawl.resolve_user(item)
        async for step in crawl.walk(kind, {"userid": uid}, item):
            yield step

    return handler


async def _post_details(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    yield Step([await crawl.client.post_detail(item.key, source=item.key)])


async def _comments(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    async for step in crawl.walk("comments", {"url": ep.video_url(item.key)}, item):
        if not crawl.job.with_replies:
            yield step
            continue
        rows: list[ep.Record] = list(step.rows)
        for comment in step.rows:
            assert isinstance(comment, ep.Comment)
            if comment.reply_total:
                params = {"video_id": item.key, "comment_id": comment.comment_id}
                async with aclosing(crawl.client.pages("replies", params, source=item.key,
                                                       page_size=crawl.job.page_size)) as pages:
                    async for page in pages:
                        rows.extend(page.items)
        yield Step(rows, step.cursor, step.last, step.guard)


async def _replies(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    video_id, comment_id = item.key.split(":", 1)
    async for step in crawl.walk("replies", {"video_id": video_id, "comment_id": comment_id}, item):
        yield step


def _keyword_list(kind: str) -> Handler:
    async def handler(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
        params: dict[str, str | int] = {"keyword": item.key}
        if kind == "search_videos":
            params.update(publish_time=crawl.job.publish_time, sort_by=crawl.job.sort_by)
            if crawl.job.region:
                params["region"] = crawl.job.region
        async for step in crawl.walk(kind, params, item):
            yield step

    return handler


async def _music_posts(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    async for step in crawl.walk("music_posts", {"music_id": item.key}, item):
        yield step


async def _challenge_posts(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    cid = item.key if item.key.isdigit() else (await crawl.client.challenge_info(name=item.key)).challenge_id
    async for step in crawl.walk("challenge_posts", {"challenge_id": cid}, item):
        yield step


async def _music_info(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    yield Step([await crawl.client.music_info(item.key)])


async def _challenge_info(crawl: Crawl, item: WorkItem) -> AsyncGenerator[Step, None]:
    if item.key.isdigit():
        yield Step([await crawl.client.challenge_info(item.key)])
    else:
        yield Step([await crawl.client.challenge_info(name=item.key)])


COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in (
        CommandSpec("profiles", "users", ep.Profile, "/userinfo-by-username/", _profiles),
        CommandSpec("posts", "users", ep.Post, "/user-posts/", _user_list("posts"), "posts"),
        CommandSpec("liked", "users", ep.Post, "/user-liked/", _user_list("liked"), "liked"),
        CommandSpec("followers", "users", ep.Follow, "/user-followers/", _user_list("followers"), "followers"),
        CommandSpec("following", "users", ep.Follow, "/user-following/", _user_list("following"), "following"),
        CommandSpec("post-details", "posts", ep.Post, "/post-detail/", _post_details),
        CommandSpec("comments", "posts", ep.Comment, "/post-comments/", _comments, "comments"),
        CommandSpec("replies", "pairs", ep.Comment, "/post-comment-replies/", _replies, "replies"),
        CommandSpec("search-videos", "keyword", ep.Post, "/search-video/", _keyword_list("search_videos"),
                    "search_videos"),
        CommandSpec("search-users", "keyword", ep.UserHit, "/search-user/", _keyword_list("search_users"),
                    "search_users"),
        CommandSpec("search-challenges", "keyword", ep.Challenge, "/search-challenge/",
                    _keyword_list("search_challenges"), "search_challenges"),
        CommandSpec("music-posts", "music", ep.Post, "/music-posts/", _music_posts, "music_posts"),
        CommandSpec("challenge-posts", "names", ep.Post, "/challenge-posts/", _challenge_posts, "challenge_posts"),
        CommandSpec("music-info", "music", ep.Music, "/music-info/", _music_info),
        CommandSpec("challenge-info", "names", ep.Challenge, "/challenge-info-id/", _challenge_info),
    )
}


# --- input ---

class _Hashing(io.RawIOBase):
    """A binary stream that hashes what is read through it (the job's input identity)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n


def normalizer(kind: str, *, by_id: bool) -> Callable[[str], str]:
    """The line -> item key function of an input kind."""
    if kind == "users":
        return lambda line: normalize_user(line, by_id=by_id)
    if kind == "posts":
        return normalize_post
    if kind == "music":
        def music(line: str) -> str:
            key = normalize_post(line) if "/" in line else line.strip()
            if not key.isdigit():
                raise InvalidInput("not a numeric music id")
            return key
        return music
    return normalize_name


def input_items(job: JobOptions, spec: CommandSpec) -> tuple[Iterator[tuple[str, str, str | None, str | None]],
                                                           Callable[[], str]]:
    """(key, raw, reason, detail) for every input line, and a function giving the input's hash once read."""
    if spec.input_kind == "keyword":
        keyword = job.input.strip()
        if not keyword:
            raise UsageError(f"{job.command}: give a non-empty KEYWORD")
        digest = hashlib.sha256(keyword.encode()).hexdigest()
        return iter([(keyword, keyword, None, None)]), lambda: digest
    stream = _Hashing(open_input(job.input))
    buffered = io.BufferedReader(stream, 1 << 16)

    def generate() -> Iterator[tuple[str, str, str | None, str | None]]:
        try:
            if spec.input_kind == "pairs":
                yield from _pairs(buffered, job.input)
                return
            normalize = normalizer(spec.input_kind, by_id=job.by_id)
            for number, line in read_lines(buffered, job.column, hashtags=spec.input_kind == "names"):
                escaped = undecodable(line)
                if escaped is not None:  # keep the bytes visible (\xfc), never replaced by U+FFFD
                    yield (f"invalid:{number}", escaped.strip(), "invalid_input",
                           f"line {number}: bytes that are not text in the input's encoding (save it as UTF-8)")
                    continue
                try:
                    yield normalize(line), line.strip(), None, None
                except InvalidInput as exc:
                    yield f"invalid:{number}", line.strip(), "invalid_input", f"line {number}: {exc}"
        finally:
            if job.input != "-":
                buffered.close()

    return generate(), lambda: stream.sha.hexdigest()


def _pairs(stream: IO[bytes], name: str) -> Iterator[tuple[str, str, str | None, str | None]]:
    import csv

    reader = csv.DictReader(decode_input(stream))
    fields = reader.fieldnames or []
    if "video_id" not in fields or "comment_id" not in fields:
        raise UsageError(f"{name}: replies needs a CSV with video_id and comment_id columns (a comments CSV works)")
    for number, row in enumerate(reader, start=2):
        video, comment = (row.get("video_id") or "").strip(), (row.get("comment_id") or "").strip()
        raw = f"{video},{comment}"
        raw = undecodable(raw) or raw  # bytes that are not text stay visible, escaped
        if row.get("parent_comment_id") or (row.get("reply_total") or "").strip() == "0":
            continue  # a reply, or a comment without replies, in a comments CSV: nothing to fetch
        if video.isdigit() and comment.isdigit():
            yield f"{video}:{comment}", raw, None, None
        else:
            yield f"invalid:{number}", raw, "invalid_input", f"line {number}: video_id and comment_id must be numeric"


# --- paths ---

def state_path(out: Path) -> Path:
    """The job's state file, next to the output."""
    return out.with_name(out.name + ".state.db")


def failures_path(out: Path) -> Path:
    """OUT.failures.csv for OUT.csv."""
    stem = out.name[:-4] if out.name.endswith(".csv") else out.name
    return out.with_name(stem + ".failures.csv")


def lock_path(out: Path) -> Path:
    """The job's lock file, next to the output."""
    return out.with_name(out.name + ".lock")


def check_output(job: JobOptions, *, overwrite: bool = False) -> None:
    """Refuse an output that would destroy something: a path through a file, the input, a file not ours."""
    out = Path(job.output)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output {out}: {parent} is a file, not a directory; choose an output path"
                                 " in a directory")
            break
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory: give a file name such as {out / (job.command + '.csv')}")
    if not out.exists() or overwrite:
        return
    if _same_file(job.input, out):
        raise UsageError(f"--output {out} is the input file; it would be replaced by the results: write to"
                         " another file (or add --overwrite if you mean it)")
    if not state_path(out).exists():
        raise UsageError(f"--output {out} exists and was not written by crawler: choose another output, or add"
                         " --overwrite to replace it")


def _same_file(a: str, b: Path) -> bool:
    """True when both name one file (same device and inode); a keyword or stdin is no file."""
    try:
        return a != "-" and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """Hold the job's lock (dies with the process, so a killed run never blocks the next)."""
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot create files in {path.parent} for --output {out.name} ({exc.strerror}): choose"
                         " an output in a directory you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobLocked(f"another crawler process is running the job for {out}; wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


# --- the run ---

def _rank(error: CrawlerError) -> int:
    """CONTRACT.md's precedence when several stops apply: 2, 1, 130/143, 4."""
    code = error.code if isinstance(error, Interrupted) else error.exit_code
    return {2: 0, 1: 1, 130: 2, 143: 2, 4: 3}.get(code, 4)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended."""

    summary: Summary
    error: CrawlerError | None

    @property
    def exit_code(self) -> int:
        """CONTRACT.md's exit code."""
        if isinstance(self.error, Interrupted):
            return self.error.code
        if self.error is not None:
            return self.error.exit_code
        return 3 if self.summary.items_failed else 0


class Crawl:
    """One run of one job. Build it, then `await crawl.run()` (inside `job_lock`)."""

    def __init__(
        self,
        job: JobOptions,
        settings: Settings,
        *,
        api_key: Secret | str | None = None,
        restart: bool = False,
        retry_failed: bool | str = False,
        overwrite: bool = False,
        quiet: bool = True,
        durable: bool = True,
        progress_interval: float | None = None,
        flowing: asyncio.Event | None = None,
        spec: CommandSpec | None = None,
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
        self.overwrite = overwrite
        self.input_change: tuple[int, int] | None = None  # (items added, done items gone) of an edited input
        self.capped = 0  # walks this run ended at the --max-pages cap
        self._base_counters = (0, 0)  # the job's requests_sent and credits_billed when this run began
        self._quiet = quiet
        self._durable = durable
        self._progress_interval = progress_interval
        self._flowing = flowing  # a test/ops hook: clear it to stall the sink
        self._stop_error: CrawlerError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._workers = 0
        self._target = settings.parallelism or 4
        self.work: asyncio.Queue[WorkItem] = asyncio.Queue(maxsize=MAX_AUTO_WORKERS * 2)
        self.client: Client
        self.state: StateStore
        self.users: UserDirectory
        self.sink: CsvSink

    # -- helpers used by handlers --

    def learn(self, profile: ep.Profile) -> None:
        """Remember a profile's id and counts in the data directory."""
        self.users.learn(profile.handle, profile.user_id, videos=profile.videos, followers=profile.followers,
                         following=profile.following, private=profile.private)

    async def resolve_user(self, item: WorkItem) -> str:
        """The user id of an item: given, known from the data directory, or one `/userid/` call."""
        if item.user_id:
            return item.user_id
        known = self.users.user_id(item.key)
        if known:
            return known
        uid = await self.client.user_id(item.key)
        self.users.learn(item.key, uid)
        return uid

    async def walk(self, kind: str, params: dict[str, str | int], item: WorkItem) -> AsyncGenerator[Step, None]:
        """Walk a list from the item's committed cursor, one Step per page."""
        job = self.job
        remaining = None if job.max_items is None else max(job.max_items - item.rows, 0)
        cap = job.max_pages or self.settings.max_pages
        pages_left = None if cap is None else max(cap - item.pages, 0)
        if remaining == 0 or pages_left == 0:
            yield Step([])
            return
        pages = self.client.pages(kind, params, source=item.source, cursor=item.cursor,
                                  page_size=job.page_size or self.settings.page_size,
                                  max_pages=pages_left, max_items=remaining)
        async with aclosing(pages) as walk:
            async for page in walk:
                yield Step(page.items, page.next_cursor, page.last, page.stop, capped=page.capped)

    # -- the run --

    def request_stop(self, error: CrawlerError) -> None:
        """End the run: workers stop, what is complete gets committed, `error` decides the exit."""
        if self._stop_error is None or _rank(error) < _rank(self._stop_error):
            self._stop_error = error
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def run(self) -> Outcome:
        """Run (or resume) the job to completion or to a stop."""
        started = time.monotonic()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(state_path(self.out))
        try:
            try:
                record = await self._prepare()
            except RunStopped as exc:
                if exc is not self._stop_error or self.state.job() is None:
                    raise
                return self._outcome(started, "stopped", 0)  # a signal while the input was being read
            if record == "complete":
                return self._outcome(started, "already complete", 0, reason="nothing to do; --restart runs it again")
            # Opened only now: a usage error found while preparing leaves no data directory behind.
            self.users = UserDirectory(Path(self.settings.data_dir) / "users.db")
            job = self.state.job()
            assert job is not None
            budget = None
            if self.settings.max_credits is not None:
                budget = max(self.settings.max_credits - job.requests_sent, 0)
            self.client = Client(self.settings, api_key=self._api_key, request_budget=budget,
                                 max_connections=max(MAX_AUTO_WORKERS, self.settings.parallelism or 0))
            base_sent, base_billed = job.requests_sent, job.credits_billed
            self._base_counters = (base_sent, base_billed)

            def counters() -> tuple[int, int]:
                c = self.client.counters
                return base_sent + c.requests_sent, base_billed + c.credits_billed

            self.sink = CsvSink(self.out, self.spec.record.COLUMNS, state=self.state, counters=counters,
                                bom=self.settings.output_bom, raw=self.settings.output_raw, durable=self._durable)
            if self._flowing is not None:
                self.sink.flowing = self._flowing
            self.state.start_run()
            async with self.client:
                await self.sink.open(job.csv_length)
                try:
                    await self._run_workers()
                    await self.sink.checkpoint()  # requests sent after the last page still count
                finally:
                    self.sink.close()
            progress = self.state.progress()
            complete = self._stop_error is None and progress.pending == 0
            write_failures(failures_path(self.out), self.state.failures(), raw=self.settings.output_raw)
            if complete:
                self.sink.finalize()
                self.state.set_status("done")
            return self._outcome(started, "completed" if complete else "stopped", self.sink.rows_written)
        finally:
            self.state.close()
            users = getattr(self, "users", None)
            if users is not None:
                users.close()

    async def _prepare(self) -> str:
        """Create, resume or restart the job in the state store; 'complete' when nothing is left to do."""
        options = {k: v for k, v in asdict(self.job).items() if k not in ("input", "output")}
        existing = self.state.job()
        if existing is None and self._retry_failed and not self._restart:
            raise UsageError(f"--retry-failed: there is no job for {self.out} yet; run the command without"
                             " --retry-failed to start it")
        if existing is not None and existing.status == "ingesting":
            existing = None  # stopped while reading the input: nothing was spent, read it again from scratch
        if existing is not None and not self._restart:
            if existing.command != self.job.command or existing.options != options:
                changed = sorted(k for k in options if existing.options.get(k) != options[k])
                raise UsageError(
                    f"{self.out} belongs to a job with other options ({', '.join(changed) or 'command'} changed):"
                    " add --restart to start over, or write to another output"
                )
            # Read the input (once: it may be stdin) beside the job; an edited input continues the job.
            items, digest = input_items(self.job, self.spec)
            self.state.begin_incoming()
            await self._ingest(items, self.state.add_incoming)
            if existing.input_sha != digest() and self.spec.input_kind == "keyword":
                raise UsageError(f"{self.out} holds the results of another keyword: add --restart to start over,"
                                 " or write to another output")
            if existing.input_sha != digest():
                added, gone = self.state.merge_incoming()
                self.state.set_input_sha(digest())
                self.input_change = (added, gone)
                log.info("the input changed: %d items added, %d done items no longer in it", added, gone)
            if self._retry_failed:
                reasons = RETRIABLE_ALL if self._retry_failed == "all" else RETRIABLE
                n = self.state.retry_failed(reasons)
                log.info("retrying %d failed items", n)
            elif existing.status == "done" and self.out.exists() and self.input_change is None:
                return "complete"
            self.state.set_status("running")
            return "resume"
        # A fresh job (or --restart): forget everything, ingest the input in one pass.
        part_path(self.out).unlink(missing_ok=True)
        self.state.create_job(self.job.command, "", options, str(self.out))
        items, digest = input_items(self.job, self.spec)
        await self._ingest(items, self.state.add_items)
        self.state.set_input_sha(digest())
        self.state.set_status("running")
        return "new"

    async def _ingest(self, items: Iterator[tuple[str, str, str | None, str | None]],
                      store: Callable[[list[tuple[str, str, str | None, str | None]]], object]) -> None:
        """Store the input items in batches, letting Ctrl-C / SIGTERM in between."""
        batch: list[tuple[str, str, str | None, str | None]] = []
        for entry in items:
            batch.append(entry)
            if len(batch) >= 5000:
                store(batch)
                batch.clear()
                await self._yield_to_signals()
        store(batch)

    async def _yield_to_signals(self) -> None:
        await asyncio.sleep(0)
        if self._stop_error is not None:
            raise self._stop_error

    async def _run_workers(self) -> None:
        await asyncio.sleep(0)
        if self._stop_error is not None:  # a stop that came while opening the sink: start nothing
            return
        reporter = ProgressReporter(self.job.command, self._snapshot, quiet=self._quiet,
                                    interval=self._progress_interval)
        async with asyncio.TaskGroup() as outer:
            writer = outer.create_task(self.sink.run())
            progress = outer.create_task(reporter.run())
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self._tasks.append(tg.create_task(self._feed()))
                    for _ in range(self._target):
                        self._spawn()
            finally:
                self._tg = None
                progress.cancel()
                if not writer.done():
                    await self.sink.close_input()

    def _spawn(self) -> None:
        assert self._tg is not None
        if self._stop_error is not None:
            return
        self._workers += 1
        self._tasks.append(self._tg.create_task(self._worker()))

    def _grow(self) -> None:
        """parallelism = "auto": enough workers to keep the rate busy at the latency seen so far."""
        if self.settings.parallelism is not None or self._tg is None:
            return
        pace = self.client.pace
        rate = 1.0 / pace.interval if pace.enabled else math.inf
        latency = self.client.counters.latency
        if latency <= 0:
            return
        want = MAX_AUTO_WORKERS if math.isinf(rate) else math.ceil(rate * latency * 1.5) + 1
        self._target = max(self._target, min(MAX_AUTO_WORKERS, want))
        while self._workers < self._target:
            self._spawn()

    async def _feed(self) -> None:
        """Queue pending items in input order, wait until all are processed, then let the workers go."""
        after = 0
        while True:
            chunk = self.state.pending(after, 500)
            if not chunk:
                break
            for seq, key, raw, cursor, rows, pages in chunk:
                await self.work.put(WorkItem(seq, key, raw, cursor, rows, pages))
                after = seq
        await self.work.join()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def _worker(self) -> None:
        while True:
            item = await self.work.get()
            try:
                await self._process(item)
            except ItemFailed as exc:
                update = ItemUpdate(item.seq, "failed", reason=exc.reason, endpoint=exc.endpoint or self.spec.endpoint,
                                    detail=str(exc))
                await self.sink.submit(Batch([], update))
            except RunStopped as exc:
                self.request_stop(exc)
                return
            finally:
                self.work.task_done()
            self._grow()

    async def _process(self, item: WorkItem) -> None:
        async with aclosing(self.spec.handler(self, item)) as steps:
            async for step in steps:
                killpoints.reached("fetched")
                n = len(step.rows)
                if step.guard is not None or step.capped:
                    # A cap is a guard the user set: the rows so far are kept, the item says it is incomplete.
                    cap = self.job.max_pages or self.settings.max_pages
                    detail = step.guard or f"stopped at the --max-pages cap of {cap} pages; the list goes on"
                    self.capped += step.guard is None
                    update = ItemUpdate(item.seq, "failed", rows=n, pages=1, reason="pagination_guard",
                                        endpoint=self.spec.endpoint, detail=detail)
                elif step.last:
                    update = ItemUpdate(item.seq, "done", rows=n, pages=1)
                else:
                    update = ItemUpdate(item.seq, "pending", cursor=step.cursor, rows=n, pages=1)
                await self.sink.submit(Batch(step.rows, update))

    def _snapshot(self) -> Snapshot:
        p = self.state.progress()
        c = self.client.counters
        # The job's counters when this run began plus this run's (the committed ones lag behind the requests).
        sent, billed = self._base_counters
        return Snapshot(p.done + p.failed, p.total, self.sink.rows_written, sent + c.requests_sent,
                        billed + c.credits_billed, failed=p.failed, note=self.client.outage.status())

    def _outcome(self, started: float, status: str, rows: int, reason: str = "") -> Outcome:
        job = self.state.job()
        assert job is not None
        progress = self.state.progress()
        counters = getattr(self, "client", None)
        c = counters.counters if counters is not None else None
        error = self._stop_error
        fails = self.state.failure_counts()
        summary = Summary(
            command=self.job.command,
            status=status,
            items_total=progress.total,
            items_done=progress.done,
            items_failed=progress.failed,
            items_pending=progress.pending,
            rows_written=rows,
            rows_total=job.rows,
            requests_sent=job.requests_sent,
            credits_billed=job.credits_billed,
            run_requests=c.requests_sent if c else 0,
            rate_limited=c.rate_limited if c else 0,
            retries=c.retries if c else 0,
            elapsed=time.monotonic() - started,
            parallelism=self._workers,
            rate_used=(f"{counters.pace.effective_rate:.1f} per {counters.pace.window:g} s"
                       if counters is not None and counters.pace.enabled else "no limit"),
            rate_wait_seconds=counters.gate.wait_seconds if counters is not None else 0.0,
            failures=fails,
            output=str(self.out if status != "stopped" else part_path(self.out)),
            failures_file=str(failures_path(self.out)) if fails else "",
            reason=reason or (str(error) if error else ""),
            notes=tuple(self._notes()),
        )
        return Outcome(summary, error)

    def _notes(self) -> Iterator[str]:
        if self.input_change is not None:
            added, gone = self.input_change
            yield (f"the input was edited: {added:,} new items added, {gone:,} done items no longer in it"
                   " (their rows stay)")
        if self.capped:
            cap = self.job.max_pages or self.settings.max_pages
            yield (f"{self.capped:,} walks stopped at the --max-pages cap of {cap} while their lists went on"
                   " (pagination_guard rows in the failures file; their first pages are in the CSV)")


def _job_files(out: Path) -> list[Path]:
    """The files a run creates beside its output."""
    state = state_path(out)
    return [lock_path(out), state, state.with_name(state.name + "-wal"), state.with_name(state.name + "-shm"),
            part_path(out)]


async def run_job(crawl: Crawl, *, install_signals: bool = True) -> Outcome:
    """Run a crawl under its job lock, turning SIGINT/SIGTERM into a clean, resumable stop."""
    check_output(crawl.job, overwrite=crawl.overwrite)
    # What a usage error may remove: the files of a job that did not exist before (never an existing job's).
    ours = [] if state_path(crawl.out).exists() else [p for p in _job_files(crawl.out) if not p.exists()]
    if not ours and not lock_path(crawl.out).exists():
        ours = [lock_path(crawl.out)]
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install_signals:
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, crawl.request_stop, Interrupted(f"stopped by {sig.name}", code))
                installed.append(sig)
    try:
        with job_lock(crawl.out):
            return await crawl.run()
    except UsageError:
        for path in ours:  # a usage error leaves nothing behind that was not there before
            path.unlink(missing_ok=True)
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
