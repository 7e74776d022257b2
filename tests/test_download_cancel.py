"""A stop that reaches a media transfer while its NAME.part is being opened in a worker thread: the descriptor the
thread opens is closed all the same, and the same job resumes the file to the simulator's bytes without asking the
API for its URL again.

In-process (no subprocess): the open is held inside the thread by a wrapper around `transfer._open_part`, the stop
is what a first Ctrl-C does (`Download.signalled`), and the test owns the loop's worker threads to know when the
thread that opened the file has finished. Expected bytes come from `crawler.sim.media.content`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crawler.errors import Interrupted
from crawler.runs import transfer
from crawler.runs.download import Download, DownloadOptions, run_download
from crawler.sim import media
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_download import WORLD, expected


def a_video_post(sim: Simulator) -> str:
    """The id of a post of a public user whose play URL is a video (not a photo post's sound)."""
    for handle in sim.world.sample_handles(50):
        index = sim.world.index_by_handle(handle)
        if index is None or sim.world.is_private(index):
            continue
        for post in sim.world.posts(index):
            if not media.photo_count(sim.media.seed, post.video_id):
                return post.video_id
    raise AssertionError("the world has no public video post among 50 users")


def descriptors_on(path: Path) -> int:
    """How many of this process's open descriptors point at `path` (removed or not)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        count += target == str(path) or target == f"{path} (deleted)"
    return count


async def test_a_stop_while_a_part_file_opens_leaks_no_descriptor_and_resumes(
        simulator: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first SIGINT while a worker thread opens NAME.part: the run stops, no descriptor on NAME.part stays open
    once the thread is done, and the same command completes the file byte for byte, billing nothing more."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=4)  # the loop's worker threads, to know when the opener's has finished
    loop.set_default_executor(pool)
    async with simulator(world=WORLD) as sim:
        vid = a_video_post(sim)
        (tmp_path / "ids.txt").write_text(vid + "\n")
        options = DownloadOptions(str(tmp_path / "ids.txt"), str(tmp_path / "media"), "video")
        settings = fast_settings(sim.url)
        inside, go = threading.Event(), threading.Event()
        real_open = transfer._open_part

        def held_open(part: Path, durable: int) -> tuple[int, int]:
            opened = real_open(part, durable)
            inside.set()  # NAME.part is open in this thread; its awaiting task has not resumed
            go.wait(10)  # bounded: the test sets it once the stop has ended the run
            return opened

        monkeypatch.setattr(transfer, "_open_part", held_open)
        try:
            first = Download(options, settings, api_key=KEY)
            run = asyncio.create_task(run_download(first, install_signals=False))
            assert await asyncio.to_thread(inside.wait, 30), "the transfer never opened its .part"
            first.signalled(Interrupted("stopped by SIGINT", 130))
            outcome = await asyncio.wait_for(run, timeout=30)
            go.set()
            pool.shutdown(wait=True)  # the opener's thread has returned (it needs no loop to close what it opened)
        finally:
            go.set()
        monkeypatch.setattr(transfer, "_open_part", real_open)
        assert outcome.exit_code == 130 and outcome.summary.status == "stopped"
        part = tmp_path / "media" / f"{vid}.part"
        assert part.exists() and part.stat().st_size == 0  # what a stop during the open leaves; the resume starts here
        assert descriptors_on(part) == 0
        billed = sim.stats.billed[KEY]
        assert billed == 1  # the one /post-detail/ call that found the URL

        loop.set_default_executor(ThreadPoolExecutor(max_workers=4))
        again = await asyncio.wait_for(run_download(Download(options, settings, api_key=KEY), install_signals=False),
                                       timeout=60)
        assert again.exit_code == 0 and again.summary.status == "completed"
        assert (tmp_path / "media" / f"{vid}.mp4").read_bytes() == expected(sim, "play", vid)
        assert not part.exists()
        assert sim.stats.billed[KEY] == billed  # the URL committed before the stop is not paid for again
