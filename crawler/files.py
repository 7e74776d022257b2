"""Durable file helpers, the one home of each: the atomic write, the append-only file with a committed length,
the lock file, the open off the event loop that a cancellation cannot leak. Every file this tool writes aside and
renames into place goes through here."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

T = TypeVar("T")


def replace_durably(tmp: Path, target: Path) -> None:
    """Rename the complete file ``tmp`` over ``target``: a power cut leaves the old file or the whole new one.

    ``tmp``'s bytes are fsynced, then renamed, then the rename is fsynced (its directory). Every file this
    tool writes aside and renames into place goes through here (tests/test_disk.py checks it).
    """
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Write ``path`` whole or not at all, through a writer that takes a path (a Parquet writer): the block writes
    the temporary file it is given (``NAME.PID.tmp`` beside ``path``), which is fsynced and renamed over ``path``
    when the block ends (`replace_durably`). An exception leaves ``path`` as it was and no temporary file behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, *, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Write ``path`` whole or not at all: text goes to a temporary file (`atomic_path`), newlines untranslated."""
    with atomic_path(path) as tmp, tmp.open("w", encoding=encoding, newline="") as fh:
        yield fh


def copy_durably(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name: ``target`` appears whole, fsynced, or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    replace_durably(tmp, target)


async def open_in_thread(opener: Callable[[], T], close: Callable[[T], object]) -> T:
    """Run ``opener`` (it opens a file) in a worker thread, so the event loop never waits on the disk, and return
    what it opened. Every open of a file off the loop goes through here.

    A cancellation (a stop) of the awaiting task cannot leak what the thread opens: the thread, which finishes its
    open anyway, hands the result over under a lock; if the task was cancelled first, the thread calls ``close`` on
    it itself, and if the task is cancelled after the hand-over (the await not yet resumed), the task does. Either
    way exactly once, without waiting for the thread and without needing the loop (it may be closing)."""
    lock = threading.Lock()
    handed: list[T] = []  # what the thread opened, until the task returns it or closes it
    abandoned = False

    def run() -> T:
        opened = opener()
        with lock:
            if not abandoned:
                handed.append(opened)
                return opened
        close(opened)  # nobody awaits it any more
        return opened

    try:
        return await asyncio.to_thread(run)
    except BaseException:
        with lock:
            abandoned = True
            left = handed[:]
            handed.clear()
        for opened in left:
            close(opened)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShortFile(Exception):
    """A file is shorter than the length committed to it (deleted, rotated, restored from an old copy)."""

    def __init__(self, path: Path, size: int | None, committed: int) -> None:
        super().__init__(f"{path} is {'missing' if size is None else f'{size:,} bytes'}; {committed:,} were committed")
        self.path = path
        self.size = size  # None: the file does not exist
        self.committed = committed


class AppendOnlyFile:
    """A file that only grows and is committed by its length: bytes past the committed length are a crash's
    uncommitted tail, cut off when the file is opened again.

    The owner appends, then `fsync`s, then records `length` in its own transaction (the commit point). A file
    shorter than its committed length is never padded with zero bytes: `open` raises `ShortFile` and the owner
    decides (the CSV job refuses to go on, an ingest day file starts again).
    """

    def __init__(self, path: Path, fh: BinaryIO, length: int) -> None:
        self.path = path
        self.fh = fh
        self.length = length  # bytes appended so far, committed or not

    @classmethod
    def open(cls, path: Path, committed: int, *, durable: bool = True) -> AppendOnlyFile:
        """Open ``path`` for appending at ``committed`` bytes, cut back to it; made if missing (``committed`` 0).

        A new or emptied file's name is fsynced (``durable``): it survives a power cut before its first commit.
        """
        size = path.stat().st_size if path.exists() else None
        if (size or 0) < committed:
            raise ShortFile(path, size, committed)
        fh = path.open("r+b" if size is not None else "w+b")
        try:
            fh.truncate(committed)
            fh.seek(committed)
            if committed == 0 and durable:
                fsync_dir(path.parent)
        except BaseException:
            fh.close()
            raise
        return cls(path, fh, committed)

    def append(self, data: bytes) -> None:
        """Append ``data`` (buffered: durable after `fsync`)."""
        self.fh.write(data)
        self.length += len(data)

    def flush(self) -> None:
        """Hand what was appended to the operating system."""
        self.fh.flush()

    def fsync(self) -> None:
        """Make what was appended durable (before its length is committed)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        """Close the file (idempotent)."""
        with contextlib.suppress(OSError):
            self.fh.close()


def cut_back(path: Path, committed: int) -> None:
    """Cut ``path`` back to its ``committed`` length, durably, if it is longer (a killed writer's uncommitted
    tail); a shorter or missing file is left as it is (`AppendOnlyFile.open` tells its owner)."""
    if path.exists() and path.stat().st_size > committed:
        with path.open("r+b") as fh:
            fh.truncate(committed)
            os.fsync(fh.fileno())


@contextlib.contextmanager
def lock_file(path: Path, *, wait: bool = False, shared: bool = False) -> Iterator[int | None]:
    """Hold an exclusive lock on ``path`` (made if missing) inside the block. The lock dies with the process, so
    a killed holder never blocks the next. Yields the lock file's descriptor (the holder may write who it is),
    or None when another process holds the lock and ``wait`` is False. ``shared``: a lock any number of
    holders share, which keeps out an exclusive one (the users of a file, against the one that removes it).

    A lock taken on a file someone removed (or replaced) meanwhile is no lock: it is taken again on the file
    at ``path`` now, so whoever removes a lock file does it holding the lock and nobody holds the old one."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            if held and not _same_file(fd, path):
                continue
            yield fd if held else None
            return
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)
