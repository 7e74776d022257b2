"""One media file of a download: streamed into NAME.part, fsynced at checkpoints, continued with HTTP Range.

Media hosts are not the API: no key, no credits, no API rate gate; a polite per-host rate, retries from where the
transfer stopped, and on completion an fsync, a rename into place and the file recorded done in the state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiolimiter import AsyncLimiter

from crawler import testing
from crawler.errors import CrawlerError, DiskFull, ItemFailed, TransientError, disk_error
from crawler.files import replace_durably
from crawler.options import Retries
from crawler.retry import retry_async
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


class _Transient(TransientError):
    """A media transfer worth retrying from where it stopped: 5xx, a cut body, a timeout."""


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of `data` to `fd` (the seam tests replace to simulate a full disk)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class MediaTransfer:
    """The transfers of one run into ``directory``; ``session`` is set once the run opens it."""

    session: aiohttp.ClientSession

    def __init__(self, state: StateStore, directory: Path, *, retry: Retries, per_host_rate: float, at_once: int,
                 write: Callable[[int, bytes | memoryview], None] | None = None) -> None:
        self._state = state
        self._dir = directory
        self._retry = retry
        self._per_host_rate = per_host_rate
        self._write = write or write_all
        self._limiters: dict[str, AsyncLimiter] = {}
        # Files in flight (download.parallelism), however many workers an "auto" pool has for the API's requests.
        self._slots = asyncio.Semaphore(at_once)
        self.files = 0  # files completed by this run
        self.bytes = 0  # bytes received by this run

    async def transfer(self, seq: int, f: MediaFile, final: Path) -> None:
        """Stream one file into NAME.part (continuing at its durable length), then rename it into place."""
        async with self._slots:
            await self._transfer(seq, f, final)

    async def _transfer(self, seq: int, f: MediaFile, final: Path) -> None:
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
                await retry_async(attempt, retry_on=_Transient, attempts=self._retry.attempts,
                                  base_delay=self._retry.base_delay, max_delay=self._retry.max_delay,
                                  on_retry=on_retry)
            except _Transient as exc:
                self._checkpoint(seq, f, fd, pos)
                failed = ItemFailed(f"{f.name}: {exc} (gave up after {self._retry.attempts} tries;"
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
        self._state.media_done(seq, f.n, pos.offset)
        self.files += 1

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
                status = resp.status
                if status in (401, 403, 404, 410):
                    raise Refused(status)
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
                        raise _disk_error(exc, self._dir) from None
                    pos.offset += len(chunk)
                    self.bytes += len(chunk)
                    now = time.monotonic()
                    if pos.offset - pos.synced >= CHECKPOINT or now - pos.synced_at >= CHECKPOINT_SECONDS:
                        await asyncio.to_thread(os.fsync, fd)
                        self._state.media_progress(seq, f.n, durable=pos.offset, expected=pos.expected,
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
    replace_durably(part, final)


