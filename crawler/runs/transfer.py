"""One media file of a download: streamed into NAME.part, fsynced at checkpoints, continued with HTTP Range.

Media hosts are not the API: no key, no credits, no API rate gate; a polite per-host rate, retries from where the
transfer stopped (a 429/503 with Retry-After waited exactly, within retry.stall_limit), and on completion an fsync,
a rename into place and the file recorded done in the state store. The file's extension comes from the first
answer's Content-Type or magic bytes and is recorded before any byte is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiolimiter import AsyncLimiter

from crawler import testing
from crawler.api.classify import parse_retry_after
from crawler.errors import (
    CrawlerError,
    DiskFull,
    ItemFailed,
    MediaUnavailable,
    RateLimitStalled,
    TransientError,
    disk_error,
)
from crawler.files import open_in_thread, replace_durably
from crawler.jobs.media import SNIFF_BYTES, VIDEO_EXTS, extension, known_extension
from crawler.options import Retries
from crawler.retry import Stall, retry_after_words, retry_async
from crawler.stores.local import StateStore
from crawler.stores.model import MediaFile

log = logging.getLogger("crawler.runs.download")
CHUNK = 256 * 1024  # read size: memory per worker stays at a few chunks, whatever the file size
CHECKPOINT = 4 * 1024 * 1024  # bytes between fsync + recorded length of a .part (or CHECKPOINT_SECONDS)
CHECKPOINT_SECONDS = 1.0


class Refused(Exception):
    """The media host refused the URL (403/404/410): expired, revoked or gone."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class NotAVideo(Exception):
    """A video kind was asked for and the host sent something else (a photo post's sound, an image)."""


class _Transient(TransientError):
    """A media transfer worth retrying from where it stopped: 5xx, a cut body, a timeout."""


class _Throttled(TransientError):
    """A 429/503 with Retry-After: the request is sent again after exactly ``retry_after`` seconds. Like the API's
    429s it spends no try (`retry.attempts`); `retry.stall_limit` bounds a streak of them (`_throttled`)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of `data` to `fd` (the seam tests replace to simulate a full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def final_path(directory: Path, f: MediaFile) -> Path | None:
    """Where a file lands: its name and the extension its answer gave; None until an answer gave one."""
    if f.ext is None or not (f.ext == "" or known_extension(f.ext)):
        return None
    return directory / (f.name + f.ext)


class MediaTransfer:
    """The transfers of one run into ``directory``; ``session`` is set once the run opens it. ``video``: the kind
    asked for is a video (an answer of another type is `NotAVideo`)."""

    session: aiohttp.ClientSession

    def __init__(self, state: StateStore, directory: Path, *, retry: Retries, per_host_rate: float, at_once: int,
                 video: bool = False, write: Callable[[int, bytes | memoryview], None] | None = None) -> None:
        self._state = state
        self._dir = directory
        self._retry = retry
        self._per_host_rate = per_host_rate
        self._video = video
        self._write = write or write_all
        self._limiters: dict[str, AsyncLimiter] = {}
        # Files in flight (download.parallelism), however many workers an "auto" pool has for the API's requests.
        self._slots = asyncio.Semaphore(at_once)
        self.files = 0  # files completed by this run
        self.bytes = 0  # bytes received by this run

    async def transfer(self, seq: int, f: MediaFile) -> None:
        """Stream one file into NAME.part (continuing at its durable length), then rename it into place."""
        async with self._slots:
            await self._transfer(seq, f)

    async def _transfer(self, seq: int, f: MediaFile) -> None:
        part = self._dir / (f.name + ".part")
        # File-system calls that may wait on the disk run in a thread, so other transfers keep flowing. A stop during
        # the open closes the descriptor all the same; the empty .part it may leave resumes from byte 0.
        fd, offset = await open_in_thread(lambda: _open_part(part, f.durable), _close_part)
        pos = _Position(offset, f.expected, f.etag, offset, time.monotonic(), f.ext, Stall(self._retry.stall_limit))
        try:
            await self._tries(seq, f, fd, pos)
            if pos.present is None:
                await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            if pos.offset == 0:  # nothing of it was written: no empty .part stays behind
                with contextlib.suppress(OSError):
                    part.unlink()
            else:
                self._checkpoint(seq, f, fd, pos)  # a refusal, a stop, a cancellation: what is fsynced is kept
            raise
        finally:
            os.close(fd)
        final = final_path(self._dir, replace(f, ext=pos.ext))
        assert final is not None  # every answer that gave bytes gave an extension
        if pos.present is not None:  # complete already, from before this job's state knew its name
            await asyncio.to_thread(_discard, part)
            self._state.media_done(seq, f.n, pos.present)
            return
        testing.reached("media_fsynced")
        await asyncio.to_thread(_publish, part, final)
        testing.reached("media_renamed")
        self._state.media_done(seq, f.n, pos.offset)
        self.files += 1

    async def _tries(self, seq: int, f: MediaFile, fd: int, pos: _Position) -> None:
        async def attempt() -> None:
            while True:
                try:
                    return await self._attempt(seq, f, fd, pos)
                except _Throttled as exc:
                    log.info("%s; waiting as asked", exc)
                    await asyncio.sleep(exc.retry_after)

        def on_retry(exc: BaseException, tries: int, wait: float) -> None:
            log.info("retrying %s after %s (try %d, at byte %d, waiting %.2f s)", f.name, exc, tries,
                     pos.offset, wait)

        try:
            await retry_async(attempt, retry_on=_Transient, attempts=self._retry.attempts,
                              base_delay=self._retry.base_delay, max_delay=self._retry.max_delay,
                              on_retry=on_retry)
        except _Transient as exc:
            failed = ItemFailed(f"{f.name}: {exc} (gave up after {self._retry.attempts} tries;"
                                " the partial file is kept and resumed next run)")
            failed.endpoint = "media"
            raise failed from None

    def _checkpoint(self, seq: int, f: MediaFile, fd: int, pos: _Position) -> None:
        with contextlib.suppress(OSError):
            os.fsync(fd)
            self._state.media_progress(seq, f.n, durable=pos.offset, expected=pos.expected, etag=pos.etag)

    async def _attempt(self, seq: int, f: MediaFile, fd: int, pos: _Position) -> None:
        host = urlsplit(f.url).netloc
        limiter = self._limiters.get(host)
        if limiter is None:
            # Even pacing, no burst: at most per_host_rate requests start in any second (+1 at its edge).
            limiter = self._limiters[host] = AsyncLimiter(1, 1.0 / self._per_host_rate)
        headers = {}
        if pos.offset > 0:
            headers["Range"] = f"bytes={pos.offset}-"
            if pos.etag:
                headers["If-Range"] = pos.etag
        await limiter.acquire()
        try:
            async with self.session.get(f.url, headers=headers) as resp:
                if not self._answer(f, fd, pos, resp, host):
                    return
                tag = resp.headers.get("ETag")
                pos.etag = tag if tag and not tag.startswith("W/") else None
                await self._receive(seq, f, fd, pos, resp)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise _Transient(f"{f.name}: {type(exc).__name__} at byte {pos.offset}") from None
        if pos.present is None and pos.expected is not None and pos.offset != pos.expected:
            raise _Transient(f"{f.name}: the body ended at byte {pos.offset} of {pos.expected}")

    def _answer(self, f: MediaFile, fd: int, pos: _Position, resp: aiohttp.ClientResponse, host: str) -> bool:
        """Read an answer's status and headers: True when its body is to be received."""
        status = resp.status
        if status in (401, 403, 404, 410):
            raise Refused(status)
        if status in (429, 503):
            self._throttled(f, pos, host, status, resp.headers.get("Retry-After"))
        if status == 416 and pos.expected is not None and pos.offset == pos.expected:
            return False  # everything is here already
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
        pos.stall.answered()
        if status == 200 and resp.content_length is not None:
            pos.expected = resp.content_length
        return True

    def _throttled(self, f: MediaFile, pos: _Position, host: str, status: int, header: str | None) -> None:
        """A 429/503: with Retry-After, the next try waits exactly that long, while the streak of such waits stays
        within retry.stall_limit; past it the run stops (every file on the host would meet the same answer)."""
        wait = parse_retry_after(header)
        if wait is None:
            raise _Transient(f"{f.name}: HTTP {status}")
        pos.stall.failed()
        if wait > pos.stall.left():
            raise RateLimitStalled(
                f"the media host {host} answered HTTP {status} asking to wait {retry_after_words(wait)}, past"
                f" retry.stall_limit ({pos.stall.limit:g} s); complete files are kept and partial ones resume:"
                " run the same command later")
        raise _Throttled(f"{f.name}: HTTP {status}, Retry-After {wait:g} s", wait)

    async def _receive(self, seq: int, f: MediaFile, fd: int, pos: _Position, resp: aiohttp.ClientResponse) -> None:
        """Write an answer's body from `pos.offset` on; a body from byte 0 first names the file (`_name`)."""
        head = b"" if pos.offset == 0 and pos.ext != "" else None  # bytes held until the file is named
        async for data in resp.content.iter_chunked(CHUNK):
            if head is not None:
                head += data
                if len(head) < SNIFF_BYTES:
                    continue
                data, head = head, None
                if not self._name(seq, f, pos, resp, data):
                    return
            await self._write_chunk(seq, f, fd, pos, data)
        if head is not None and self._name(seq, f, pos, resp, head) and head:  # a body shorter than SNIFF_BYTES
            await self._write_chunk(seq, f, fd, pos, head)

    def _name(self, seq: int, f: MediaFile, pos: _Position, resp: aiohttp.ClientResponse, head: bytes) -> bool:
        """Give the file its extension from the answer (`jobs.media.extension`), recorded before any byte is written
        so a resume publishes to the same name; False when a file of that name is complete already (from before
        this job's state knew it): it is not fetched again."""
        given = resp.headers.get("Content-Type", "")
        ext = extension(given, head[:SNIFF_BYTES])
        shown = "".join(c for c in given[:60] if c.isascii() and c.isprintable()) or "no Content-Type"
        if ext is None:
            raise MediaUnavailable(f"{f.name}: the media host answered {shown}, not a media file")
        if self._video and ext not in VIDEO_EXTS:
            raise NotAVideo(f"the media host sent {ext[1:]} ({shown}), not a video: a photo post's sound?")
        if ext != pos.ext:
            self._state.media_named(seq, f.n, ext)
            pos.ext = ext
        final = self._dir / (f.name + ext)
        if not final.exists():
            return True
        size = final.stat().st_size
        if pos.expected is not None and size != pos.expected:
            raise MediaUnavailable(f"{final} exists with {size:,} bytes, not the {pos.expected:,} announced; it was"
                                   " not written by this job: move it away, then run again")
        pos.present = size
        return False

    async def _write_chunk(self, seq: int, f: MediaFile, fd: int, pos: _Position, data: bytes) -> None:
        try:
            self._write(fd, data)
        except OSError as exc:
            raise _disk_error(exc, self._dir) from None
        pos.offset += len(data)
        self.bytes += len(data)
        now = time.monotonic()
        if pos.offset - pos.synced >= CHECKPOINT or now - pos.synced_at >= CHECKPOINT_SECONDS:
            await asyncio.to_thread(os.fsync, fd)
            self._state.media_progress(seq, f.n, durable=pos.offset, expected=pos.expected, etag=pos.etag)
            pos.synced, pos.synced_at = pos.offset, now
            testing.reached("media_checkpoint")

    def _restart_file(self, fd: int, pos: _Position) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        pos.offset = pos.synced = 0
        pos.etag = None


@dataclass(slots=True)
class _Position:
    offset: int
    expected: int | None
    etag: str | None
    synced: int
    synced_at: float
    ext: str | None  # the file's extension, once an answer gave it ("" for a name an older version chose whole)
    stall: Stall  # the streak of Retry-After waits, against retry.stall_limit
    present: int | None = None  # the length of a complete file found at the final name


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


def _close_part(opened: tuple[int, int]) -> None:
    """Close what `_open_part` returned (its awaiting task was cancelled)."""
    os.close(opened[0])


def _discard(part: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        part.unlink()


def _publish(part: Path, final: Path) -> None:
    """Rename a complete, fsynced NAME.part into place and make the rename durable."""
    replace_durably(part, final)


