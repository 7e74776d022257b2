"""The durable file helpers (`crawler.files`): the append-only file cut back to its committed length and never
padded, the atomic write, the lock file, the open in a worker thread that a cancellation cannot leak."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from crawler.files import AppendOnlyFile, ShortFile, atomic_write, cut_back, lock_file, open_in_thread


def test_an_append_only_file_is_cut_back_to_its_committed_length(tmp_path: Path) -> None:
    """Bytes past the committed length (a crash's uncommitted tail) are gone when the file opens again, and the next
    append follows the committed bytes."""
    path = tmp_path / "rows.csv"
    f = AppendOnlyFile.open(path, 0)
    f.append(b"header\n")
    f.fsync()
    committed = f.length
    f.append(b"uncommitted row\n")
    f.close()
    assert path.stat().st_size > committed
    f = AppendOnlyFile.open(path, committed)
    assert f.length == committed
    f.append(b"row\n")
    f.close()
    assert path.read_bytes() == b"header\nrow\n"


@pytest.mark.parametrize("missing", [False, True])
def test_a_file_shorter_than_committed_is_never_padded(tmp_path: Path, missing: bool) -> None:
    """A file shorter than its committed length (or gone) raises ShortFile and is left as it was: no zero bytes."""
    path = tmp_path / "rows.csv"
    if not missing:
        path.write_bytes(b"head")
    with pytest.raises(ShortFile) as info:
        AppendOnlyFile.open(path, 100)
    assert info.value.committed == 100 and info.value.size == (None if missing else 4)
    assert not path.exists() if missing else path.read_bytes() == b"head"


def test_cut_back_cuts_only_a_longer_file(tmp_path: Path) -> None:
    """cut_back removes a tail past the committed length and leaves a shorter file (or none) alone."""
    path = tmp_path / "day.csv"
    path.write_bytes(b"0123456789")
    cut_back(path, 4)
    assert path.read_bytes() == b"0123"
    cut_back(path, 8)
    assert path.read_bytes() == b"0123"
    cut_back(tmp_path / "none.csv", 3)
    assert not (tmp_path / "none.csv").exists()


def test_an_atomic_write_is_whole_or_not_at_all(tmp_path: Path) -> None:
    """The new text replaces the file only when the block ends; an error inside keeps the old file; neither leaves a
    temporary file behind."""
    path = tmp_path / "out.json"
    path.write_text("old\n")
    with pytest.raises(ZeroDivisionError), atomic_write(path) as fh:
        fh.write("half")
        1 / 0  # noqa: B018
    assert path.read_text() == "old\n"
    with atomic_write(path) as fh:
        fh.write("new\r\n")
        assert path.read_text() == "old\n"
    assert path.read_bytes() == b"new\r\n"  # newlines untranslated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_lock_file_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    """While one process holds the lock another is told (None) without waiting; once released it gets it."""
    path = tmp_path / "job.lock"
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from crawler.files import lock_file\n"
             "with lock_file(Path(sys.argv[1])) as fd: print('held' if fd is not None else 'busy')", str(path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    with lock_file(path) as fd:
        assert fd is not None
        assert subprocess.run(probe, capture_output=True, text=True, env=env, timeout=30).stdout == "busy\n"
    assert subprocess.run(probe, capture_output=True, text=True, env=env, timeout=30).stdout == "held\n"


@pytest.mark.parametrize("window", ["while the thread opens", "after the thread handed it over"])
async def test_a_cancelled_open_in_a_thread_closes_the_file_exactly_once(tmp_path: Path, window: str) -> None:
    """A task cancelled while its worker thread opens a file, or after the thread handed the file over but before
    the await resumed, ends cancelled, and the file is closed exactly once (by the thread, or by the task)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=2)  # this test's own threads, to know when the opener's has finished
    loop.set_default_executor(pool)
    inside, go = threading.Event(), threading.Event()
    opened: list[BinaryIO] = []
    closed: list[BinaryIO] = []

    def opener() -> BinaryIO:
        fh = (tmp_path / "x.part").open("wb")
        opened.append(fh)
        inside.set()
        go.wait(10)  # bounded: the test sets it
        return fh

    def close(fh: BinaryIO) -> None:
        closed.append(fh)
        fh.close()

    task = asyncio.create_task(open_in_thread(opener, close))
    assert await asyncio.to_thread(inside.wait, 10)
    if window == "while the thread opens":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    go.set()
    # Blocks the loop until the opener's thread has returned: the loop processes none of its result meanwhile.
    pool.shutdown(wait=True)
    if window == "after the thread handed it over":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(opened) == 1 and closed == opened and opened[0].closed
