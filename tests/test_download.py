"""`crawler download` against the simulator's media host: exact bytes, no API spend, resume after SIGKILL,
expired URLs renewed once, hostile input kept inside DIR, a full disk stops cleanly.

Expected bytes come from `crawler.sim.media.content` (the simulator's world), never from the crawler.
The crawler runs as a real subprocess (killed by pid in a `finally`), except the disk-full test, which
runs the CLI in a thread to put a failing writer behind the download's write seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import os
import random
import re
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from crawler.cli import main
from crawler.runs import download
from crawler.sim import media
from crawler.sim.data import WorldConfig
from crawler.sim.media import MediaConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory, answer_at_once

WORLD = WorldConfig(seed=21, users=3_000)
FAST = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\n[download]\nper_host_rate = 1000\n"


def _env(sim: Simulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
    env.update(TIKLIVE_API_KEY=KEY, TIKLIVE_BASE_URL=sim.url)
    return env


async def crawler(args: list[str], sim: Simulator, cwd: Path, *, limit: float = 120) -> tuple[int, str]:
    """Run `python -m crawler ARGS` to its end (killed by pid if it outlives `limit` seconds); (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=_env(sim),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=limit)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def posts_csv(sim: Simulator, tmp: Path, n: int, *, name: str = "posts.csv") -> list[dict[str, str]]:
    """A posts CSV of exactly n rows, written by `crawler posts` (then cut to n rows); its rows."""
    (tmp / "fast.toml").write_text(FAST)
    handles = []
    total = 0
    for h in sim.world.sample_handles(300):
        i = sim.world.index_by_handle(h)
        u = None if i is None else sim.world.user(i)
        if u is not None and not u.private and 0 < u.videos <= 60:
            handles.append(h)
            total += u.videos
        if total >= n:
            break
    (tmp / "handles.txt").write_text("\n".join(handles) + "\n")
    code, err = await crawler(["posts", "handles.txt", "-o", "all-posts.csv", "--config", "fast.toml", "-q"], sim, tmp)
    assert code == 0, err
    with (tmp / "all-posts.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)[:n]
    assert len(rows) == n
    with (tmp / name).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def expected(sim: Simulator, kind: str, video_id: str) -> bytes:
    """The file the media host holds for a post (from the simulator's seeded world)."""
    return media.content(sim.media.seed, kind, video_id)


def videos(sim: Simulator, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows of video posts (not photo posts: those have images, and their play URL is their sound)."""
    return [r for r in rows if not media.photo_count(sim.media.seed, r["video_id"])]


def photo_posts(sim: Simulator, rows: list[dict[str, str]]) -> dict[str, int]:
    """video_id -> number of images, of the photo posts among the rows."""
    counts = {r["video_id"]: media.photo_count(sim.media.seed, r["video_id"]) for r in rows}
    return {vid: n for vid, n in counts.items() if n}


def cover(sim: Simulator, video_id: str) -> tuple[str, bytes]:
    """(file name, bytes) of a post's cover as `download --what cover` saves it: a photo post's is its first image."""
    seed = sim.media.seed
    kind = "image" if media.photo_count(seed, video_id) else "cover"
    return f"{video_id}.cover.{media.fmt(seed, kind, video_id)}", media.content(seed, kind, video_id, 0)


def files_under(root: Path) -> set[Path]:
    """Every file below root."""
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
async def test_posts_csv_has_media_columns_matching_the_world(simulator: SimFactory, tmp_path: Path) -> None:
    """Posts rows carry play/wmplay/cover/size/music_url from the list items, post-details add hdplay and hd_size."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 24)
        seed = sim.media.seed
        photos = photo_posts(sim, rows)
        assert photos and len(photos) < len(rows), "the sample must hold photo and video posts"
        for r in videos(sim, rows):
            vid = r["video_id"]
            assert r["play"].startswith(f"{sim.media_url}/m/play/{vid}.mp4?")
            assert r["wmplay"].startswith(f"{sim.media_url}/m/wmplay/{vid}.mp4?")
            assert r["cover"].startswith(f"{sim.media_url}/m/cover/{vid}{media.url_suffix(seed, 'cover', vid)}?")
            assert r["size"] == str(media.size(seed, "play", vid))
            assert r["hdplay"] == "" and r["hd_size"] == ""  # list items carry no hdplay (§3.1)
            assert r["duration"] and r["music_url"] and not r["images"]
        for r in rows:  # photo posts as real ones look (§5.1): play/wmplay at the sound, no duration, no size
            if r["video_id"] in photos:
                assert r["play"] == r["wmplay"] == r["music_url"] and "/m/music/" in r["play"]
                assert r["duration"] == r["size"] == "0"
                assert len(r["images"].split()) == photos[r["video_id"]] and r["cover"] == r["images"].split()[0]
        rows = videos(sim, rows)
        (tmp_path / "ids.txt").write_text("\n".join(r["video_id"] for r in rows[:3]) + "\n")
        code, err = await crawler(["post-details", "ids.txt", "-o", "details.csv", "--config", "fast.toml", "-q"],
                                  sim, tmp_path)
        assert code == 0, err
        with (tmp_path / "details.csv").open(newline="", encoding="utf-8") as fh:
            details = list(csv.DictReader(fh))
        assert [d["video_id"] for d in details] == [r["video_id"] for r in rows[:3]]
        for d in details:
            assert d["hdplay"].startswith(f"{sim.media_url}/m/hdplay/{d['video_id']}.mp4?")
            assert d["hd_size"] == str(media.size(seed, "hdplay", d["video_id"]))


@pytest.mark.slow
async def test_two_hundred_posts_with_faults_are_byte_identical_and_cost_nothing(simulator: SimFactory,
                                                                                 tmp_path: Path) -> None:
    """200 posts from a CSV with cut bodies, 5xx and slow transfers: every file exact, exit 0, no API request."""
    faults = MediaConfig(fault_rate=0.2, slow_seconds=0.3)
    async with simulator(world=WORLD, media=faults) as sim:
        rows = await posts_csv(sim, tmp_path, 200)
        api_before = sim.stats.requests
        code, err = await crawler(["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml",
                                   "--retries", "30", "-q"], sim, tmp_path, limit=300)
        assert code == 0, err
        assert sim.stats.requests == api_before  # the simulator saw no API request
        assert sim.media.stats.with_api_key == 0  # and the key never went to the media host
        assert sum(sim.media.stats.faults.values()) >= 20 and sim.media.stats.faults["cut"] > 0
        assert sim.media.stats.by_status[206] > 0  # cut bodies were continued with Range
        out = tmp_path / "media"
        skipped = len(photo_posts(sim, rows))
        assert skipped and f"{skipped:,} photo posts skipped: not videos" in err
        assert {p.relative_to(out).as_posix() for p in files_under(out) if not p.name.startswith(".")} == {
            f"{r['video_id']}.mp4" for r in videos(sim, rows)} | {"download-video.skipped.csv"}
        for r in videos(sim, rows):
            assert (out / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"]), r["video_id"]


@pytest.mark.slow
async def test_five_sigkills_resume_without_rewriting_complete_files(simulator: SimFactory, tmp_path: Path) -> None:
    """Killed five times at random moments: same files, none rewritten once complete, bytes served bounded."""
    workers = 4
    throttle = MediaConfig(bytes_per_second=1_000_000)
    async with simulator(world=WORLD, media=throttle) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 40))
        seed = sim.media.seed
        sizes = {r["video_id"]: media.size(seed, "play", r["video_id"]) for r in rows}
        total = sum(sizes.values())
        (tmp_path / "fast.toml").write_text(FAST + f"parallelism = {workers}\n")
        args = [sys.executable, "-m", "crawler", "download", "posts.csv", "-o", "media", "--what", "video",
                "--config", "fast.toml", "-q"]
        out = tmp_path / "media"
        seen: dict[Path, tuple[int, int]] = {}  # complete file -> (inode, mtime_ns) when first seen after a kill
        rng = random.Random(14)
        kills = 0
        for mark in [rng.uniform(0.08, 0.25) * total for _ in range(5)]:
            proc = await asyncio.create_subprocess_exec(*args, cwd=tmp_path, env=_env(sim),
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            try:
                start = sim.media.stats.bytes_sent
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                # A moment inside the transfer: once the host has sent `mark` bytes more in this run.
                while sim.media.stats.bytes_sent - start < mark and proc.returncode is None:
                    assert loop.time() < deadline, "the download made no progress"
                    await asyncio.sleep(0.01)
            finally:
                if proc.returncode is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                await asyncio.wait_for(proc.wait(), timeout=30)
            for p in out.glob("*.mp4"):
                st = p.stat()
                seen.setdefault(p, (st.st_ino, st.st_mtime_ns))
        assert kills == 5
        assert seen, "some files were complete before a kill"
        code, err = await crawler(args[3:], sim, tmp_path)
        assert code == 0, err
        for r in rows:
            assert (out / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"])
        for p, (ino, mtime) in seen.items():
            st = p.stat()
            assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{p.name} was rewritten after it was complete"
        # At most one partial file per worker per kill is fetched twice; the rest continued with Range.
        assert sim.media.stats.bytes_sent <= total + kills * workers * max(sizes.values())
        assert sim.media.stats.by_status[206] > 0
        assert not list(out.glob("*.part"))


@pytest.mark.slow
async def test_expired_urls_are_renewed_once_each(simulator: SimFactory, tmp_path: Path) -> None:
    """URLs that expired before the run: one /post-detail/ credit per post, files exact, a re-run spends nothing."""
    async with simulator(world=WORLD, media=MediaConfig(ttl=3600)) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 15))  # photo posts are skipped without a credit
        sim.media.shift(2 * 3600)  # every URL in the CSV is now stale
        billed, details = sim.stats.billed[KEY], sim.stats.by_endpoint["/post-detail"]
        # A budget below the need stops resumably (exit 4) and is honoured across the resume.
        code, err = await crawler(["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml",
                                   "-q", "--max-credits", "6"], sim, tmp_path)
        assert code == 4, err
        assert sim.stats.by_endpoint["/post-detail"] - details == 6
        # The printed command raises the cap (the same command would stop again at once): it makes progress.
        printed = shlex.split(err.strip().splitlines()[-1].split("raise the cap: ", 1)[1])
        assert printed[0] == "crawler" and "--max-credits" in printed, err
        code, err = await crawler(printed[1:], sim, tmp_path)
        assert code in (0, 4), err
        assert sim.stats.by_endpoint["/post-detail"] - details > 6
        code, err = await crawler(["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml",
                                   "-q"], sim, tmp_path)
        assert code == 0, err
        assert sim.stats.billed[KEY] - billed == len(rows)
        assert sim.stats.by_endpoint["/post-detail"] - details == len(rows)
        for r in rows:
            assert (tmp_path / "media" / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"])
        requests = sim.stats.requests
        code, err = await crawler(["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml"],
                                  sim, tmp_path)
        assert code == 0, err
        assert "already complete" in err and sim.stats.requests == requests


@pytest.mark.slow
async def test_video_ids_cost_one_detail_each_and_fetch_hd(simulator: SimFactory, tmp_path: Path) -> None:
    """Ids and URLs as input: one /post-detail/ credit per post, the hd file, bad lines are invalid_input."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 5)
        ids = [r["video_id"] for r in rows]
        lines = [ids[0], f"https://www.tiktok.com/@x/video/{ids[1]}?lang=en", *ids[2:], ids[0], "not-a-video"]
        (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
        billed = sim.stats.billed[KEY]
        code, err = await crawler(["download", "ids.txt", "-o", "hd", "--config", "fast.toml", "-q"], sim, tmp_path)
        assert code == 3, err
        assert sim.stats.billed[KEY] - billed == len(ids)
        for vid in ids:
            if vid not in photo_posts(sim, rows):
                assert (tmp_path / "hd" / f"{vid}.hd.mp4").read_bytes() == expected(sim, "hdplay", vid)
        with (tmp_path / "hd" / "download-hd.failures.csv").open(newline="", encoding="utf-8") as fh:
            assert [(f["input"], f["reason"]) for f in csv.DictReader(fh)] == [("not-a-video", "invalid_input")]


@pytest.mark.slow
async def test_photo_posts_images_land_in_a_folder_per_post(simulator: SimFactory, tmp_path: Path) -> None:
    """--what images: DIR/<video_id>/<n>.<ext> for every image of a photo post; other posts are skipped, not failed."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 60)
        photos = photo_posts(sim, rows)
        assert photos, "the sample must hold photo posts"
        ext = {vid: "." + media.fmt(sim.media.seed, "image", vid) for vid in photos}
        code, err = await crawler(["download", "posts.csv", "-o", "img", "--what", "images", "--config", "fast.toml",
                                   "-q"], sim, tmp_path)
        assert code == 0, err
        out = tmp_path / "img"
        want = {f"{vid}/{n}{ext[vid]}" for vid, count in photos.items() for n in range(count)}
        assert {p.relative_to(out).as_posix() for p in files_under(out) if not p.name.startswith(".")} == want
        for vid, count in photos.items():
            for n in range(count):
                assert (out / vid / f"{n}{ext[vid]}").read_bytes() == media.content(sim.media.seed, "image", vid, n)


@pytest.mark.slow
async def test_hostile_csv_writes_nothing_outside_dir(simulator: SimFactory, tmp_path: Path) -> None:
    """Path traversal, absolute paths, NUL bytes and non-http URLs become invalid_input rows; nothing leaves DIR."""
    async with simulator(world=WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 6))
        good = rows[0]
        url = good["play"]  # a real, valid URL: a traversal would really write if names were not checked
        hostile = ["../../etc/x", str(tmp_path / "abs"), "../escape", "123\x00456", "٣٣٣",
                   "7000000000000000001/../../y", ".."]
        work = tmp_path / "work"
        work.mkdir()
        with (work / "hostile.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["video_id", "source_handle", "play", "size"])
            w.writerow([good["video_id"], "a", url, good["size"]])
            for h in hostile:
                w.writerow([h, "a", url, good["size"]])
            w.writerow([rows[1]["video_id"], "a", "file:///etc/passwd", ""])
            w.writerow([rows[2]["video_id"], "a", "http://127.0.0.1:1/x\x00y", ""])
        (work / "fast.toml").write_text(FAST)
        before = files_under(tmp_path)
        code, err = await crawler(["download", "hostile.csv", "-o", "out/dir", "--what", "video", "--config",
                                   "fast.toml", "-q"], sim, work)
        assert code == 3, err
        out = work / "out" / "dir"
        new = files_under(tmp_path) - before
        assert new and all(out in p.parents for p in new), sorted(map(str, new))
        assert (out / f"{good['video_id']}.mp4").read_bytes() == expected(sim, "play", good["video_id"])
        with (out / "download-video.failures.csv").open(newline="", encoding="utf-8") as fh:
            failures = list(csv.DictReader(fh))
        assert len(failures) == len(hostile) + 2
        assert {f["reason"] for f in failures} == {"invalid_input"}


@pytest.mark.slow
async def test_disk_full_stops_with_one_line_and_renames_nothing_incomplete(
        simulator: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC from the write seam: exit 1, one line, every renamed file complete, the partial one kept as .part."""
    async with simulator(world=WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 30))
        capsys.readouterr()
        budget = sum(media.size(sim.media.seed, "play", r["video_id"]) for r in rows) // 2
        written = 0
        real_write = download.write_all

        def full_disk(fd: int, data: bytes | memoryview) -> None:
            nonlocal written
            if written + len(data) > budget:
                room = budget - written
                if room > 0:  # a short write first, as a real filling disk does
                    os.write(fd, bytes(data[:room]))
                    written = budget
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(fd, data)
            written += len(data)

        monkeypatch.setattr(download, "write_all", full_disk)
        monkeypatch.setenv("TIKLIVE_API_KEY", KEY)
        monkeypatch.setenv("TIKLIVE_BASE_URL", sim.url)
        monkeypatch.chdir(tmp_path)
        args = ["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml", "-q"]
        code = await asyncio.wait_for(asyncio.to_thread(main, args), timeout=120)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert len(err) == 1 and "disk" in err[0] and "full" in err[0], err
        out = tmp_path / "media"
        done = [r for r in rows if (out / f"{r['video_id']}.mp4").exists()]
        assert 0 < len(done) < len(rows)
        for r in done:  # nothing incomplete was renamed into place
            assert (out / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"])
        assert list(out.glob("*.part"))

        monkeypatch.setattr(download, "write_all", real_write)  # space freed: the same command resumes
        code = await asyncio.wait_for(asyncio.to_thread(main, args), timeout=120)
        assert code == 0, capsys.readouterr().err
        for r in rows:
            assert (out / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"])


@pytest.mark.slow
async def test_media_host_sees_bounded_parallelism_and_an_even_per_host_rate(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """Counted at the media host: never more than download.parallelism at once, nor per_host_rate (+1) a second."""
    async with simulator(world=WORLD) as sim:
        await posts_csv(sim, tmp_path, 30)
        (tmp_path / "polite.toml").write_text(FAST.replace("per_host_rate = 1000", "per_host_rate = 8")
                                              + "parallelism = 3\n")
        code, err = await crawler(["download", "posts.csv", "-o", "covers", "--what", "cover", "--config",
                                   "polite.toml", "-q"], sim, tmp_path)
        assert code == 0, err
        times = sorted(sim.media.stats.arrivals)
        assert len(times) == 30
        most = max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))
        assert most <= 8 + 1
        assert sim.media.stats.max_in_flight <= 3


@pytest.mark.slow
async def test_parallelism_auto_grows_the_detail_requests_not_the_files_in_flight(simulator: SimFactory,
                                                                                  tmp_path: Path) -> None:
    """--parallelism auto on ids: more /post-detail/ requests at once than download.parallelism once a latency is
    measured (the pacing rule, unlimited here), never more than download.parallelism files at the media host."""
    async with simulator(world=WORLD, latency=(0.2, 0.2)) as sim:
        rows = await posts_csv(sim, tmp_path, 24)
        (tmp_path / "ids.txt").write_text("\n".join(r["video_id"] for r in rows) + "\n")
        (tmp_path / "auto.toml").write_text(FAST + "parallelism = 2\n")
        sim.stats.max_in_flight = 0
        code, err = await crawler(["download", "ids.txt", "-o", "covers", "--what", "cover", "--config", "auto.toml",
                                   "--parallelism", "auto", "-q"], sim, tmp_path)
        assert code == 0, err
        assert sim.stats.max_in_flight > 2  # the workers asking /post-detail/ grew
        assert sim.media.stats.max_in_flight <= 2
        for r in rows:
            name, data = cover(sim, r["video_id"])
            assert (tmp_path / "covers" / name).read_bytes() == data


@pytest.mark.slow
async def test_media_gone_for_good_fails_after_one_refresh(simulator: SimFactory, tmp_path: Path) -> None:
    """A file refused even with a renewed URL: one /post-detail/ credit, then a media_unavailable failure row."""
    async with simulator(world=WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 12))
        gone = [rows[2]["video_id"], rows[7]["video_id"]]
        for vid in gone:
            sim.media.revoke(vid)
        billed = sim.stats.billed[KEY]
        code, err = await crawler(["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml",
                                   "-q"], sim, tmp_path)
        assert code == 3, err
        assert sim.stats.billed[KEY] - billed == len(gone)
        with (tmp_path / "media" / "download-video.failures.csv").open(newline="", encoding="utf-8") as fh:
            failures = sorted((f["input"], f["reason"]) for f in csv.DictReader(fh))
        assert failures == sorted((vid, "media_unavailable") for vid in gone)
        for r in rows:
            path = tmp_path / "media" / f"{r['video_id']}.mp4"
            if r["video_id"] in gone:
                assert not path.exists()
            else:
                assert path.read_bytes() == expected(sim, "play", r["video_id"])


@pytest.mark.slow
async def test_sigterm_stops_cleanly_and_the_same_command_resumes(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM mid-transfer: exit 143 with a resume line, partial files kept as .part, the re-run completes them."""
    async with simulator(world=WORLD, media=MediaConfig(bytes_per_second=500_000)) as sim:
        rows = await posts_csv(sim, tmp_path, 12)
        args = ["download", "posts.csv", "-o", "media", "--what", "video", "--config", "fast.toml", "-q"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while sim.media.stats.bytes_sent < 1_000_000:
                assert loop.time() < deadline and proc.returncode is None, "the download made no progress"
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            err = (await asyncio.wait_for(proc.stderr.read(), timeout=30)).decode()
            code = await asyncio.wait_for(proc.wait(), timeout=30)
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        assert code == 143, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "SIGTERM" in lines[0] and "resume with: crawler download posts.csv" in lines[0]
        assert list((tmp_path / "media").glob("*.part"))
        code, err = await crawler(args, sim, tmp_path)
        assert code == 0, err
        for r in videos(sim, rows):
            assert (tmp_path / "media" / f"{r['video_id']}.mp4").read_bytes() == expected(sim, "play", r["video_id"])


async def test_media_host_serves_ranges_and_refuses_stale_or_forged_urls(simulator: SimFactory) -> None:
    """The simulator's media host: exact bytes, Range/If-Range, 416 past the end, 403 expired or forged, 410 gone."""
    import aiohttp

    async with simulator(world=WORLD, media=MediaConfig(ttl=60)) as sim, aiohttp.ClientSession() as http:
        vid = "7000000000000100003"
        seed = sim.media.seed
        url = sim.media.url("play", vid)
        whole = media.content(seed, "play", vid)
        assert len(whole) == media.size(seed, "play", vid) >= 50_000
        async with http.get(url) as resp:
            assert resp.status == 200 and await resp.read() == whole
            tag = resp.headers["ETag"]
        async with http.get(url, headers={"Range": "bytes=1000-"}) as resp:
            assert resp.status == 206 and await resp.read() == whole[1000:]
            assert resp.headers["Content-Range"] == f"bytes 1000-{len(whole) - 1}/{len(whole)}"
        async with http.get(url, headers={"Range": "bytes=10-19", "If-Range": tag}) as resp:
            assert resp.status == 206 and await resp.read() == whole[10:20]
        async with http.get(url, headers={"Range": "bytes=10-", "If-Range": '"stale"'}) as resp:
            assert resp.status == 200 and await resp.read() == whole  # validator changed: the whole file
        async with http.get(url, headers={"Range": f"bytes={len(whole)}-"}) as resp:
            assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(whole)}"
        async with http.get(url.replace("/play/", "/hdplay/")) as resp:
            assert resp.status == 403  # the signature covers the path
        sim.media.shift(61)
        async with http.get(url) as resp:
            assert resp.status == 403  # expired
        sim.media.revoke(vid)
        async with http.get(sim.media.url("play", vid)) as resp:
            assert resp.status == 410
        assert sim.stats.requests == 0  # the media host is not the API


@pytest.mark.slow
async def test_max_credits_spans_a_sigkill_when_the_posts_fail(simulator: SimFactory, tmp_path: Path) -> None:
    """--max-credits 30 on ids of posts that do not exist (each one /post-detail/ request, then a failure), the
    download SIGKILLed after 10 requests and run again: the simulator sees at most 30 requests in all, and the
    second run stops resumable (exit 4) once the rest of the budget is spent."""
    async with simulator(world=WORLD, latency=(0.02, 0.04)) as sim:
        (tmp_path / "fast.toml").write_text(FAST)
        (tmp_path / "ids.txt").write_text("".join(f"79990000000000{n:05d}\n" for n in range(60)))
        args = ["download", "ids.txt", "-o", "gone", "--config", "fast.toml", "--parallelism", "2",
                "--max-credits", "30", "-q"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while sim.stats.requests < 10:
                assert loop.time() < deadline and proc.returncode is None, "the download sent nothing"
                await asyncio.sleep(0.005)
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        first = sim.stats.requests
        code, err = await crawler(args, sim, tmp_path)
        total = sim.stats.requests
    assert 10 <= first < 30
    assert code == 4, err
    assert total <= 30, (first, total)


def test_the_readme_states_the_chunk_and_checkpoint_download_uses() -> None:
    """docs/media.md gives the read chunk and the fsync checkpoint that crawler/runs/download.py uses."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "media.md").read_text()
    unit = {"KiB": 1024, "MiB": 1024 * 1024}
    chunk = re.search(r"streamed in (\d+) (KiB|MiB) chunks", text)
    every = re.search(r"fsynced every (\d+) (KiB|MiB) or second", text)
    assert chunk and every, "docs/media.md"
    assert int(chunk[1]) * unit[chunk[2]] == download.CHUNK
    assert int(every[1]) * unit[every[2]] == download.CHECKPOINT
    assert download.CHECKPOINT_SECONDS == 1.0


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP from a stop point): state T in /proc."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    return False


async def _until(predicate: Callable[[], bool], what: str, *, bound: float = 60) -> None:
    """Poll a condition until it holds, at most `bound` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not predicate():
        assert loop.time() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_a_spent_budget_ends_a_long_download_promptly(simulator: SimFactory, tmp_path: Path) -> None:
    """--max-credits 5 over 100,000 ids at the key's default pace: exactly 5 /post-detail/ requests, then the process
    ends by itself within seconds with exit 4 and one line."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "paced.toml").write_text("[retry]\nbase_delay = 0\nmax_delay = 0\n")  # rate.enabled: default
        (tmp_path / "ids.txt").write_text("".join(f"7999000000000{n:06d}\n" for n in range(100_000)))
        args = ["download", "ids.txt", "-o", "gone", "--config", "paced.toml", "--max-credits", "5", "-q"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            await _until(lambda: sim.stats.requests >= 5 or proc.returncode is not None, "five requests", bound=120)
            try:
                _, raw = await asyncio.wait_for(proc.communicate(), timeout=60)
            except TimeoutError:
                pytest.fail(f"the download still ran 60 s after its fifth request ({sim.stats.requests} requests)")
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        code, err = proc.returncode, raw.decode()
    assert code == 4, err
    assert sim.stats.requests == sim.stats.by_endpoint["/post-detail"] == 5
    assert len(err.strip().splitlines()) == 1 and "--max-credits" in err, err


@pytest.mark.slow
async def test_a_sigint_while_reading_an_edited_input_leaves_its_new_items_to_fetch(simulator: SimFactory,
                                                                                     tmp_path: Path) -> None:
    """A completed download, its input edited, SIGINT while the edited input is read: the same command then
    fetches exactly the new posts (one /post-detail/ each, server-side count) and their files."""
    async with simulator(world=WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 12))[:8]
        ids = [r["video_id"] for r in rows]
        old, new = ids[:3], ids[3:]
        (tmp_path / "ids.txt").write_text("\n".join(old) + "\n")
        args = ["download", "ids.txt", "-o", "hd", "--config", "fast.toml", "-q"]
        code, err = await crawler(args, sim, tmp_path)
        assert code == 0, err
        # Several batches of input lines (5,000 each), the new posts in the first: the stop comes a batch or two on.
        (tmp_path / "ids.txt").write_text("\n".join(old + new + [old[0]] * 30_000) + "\n")
        env = _env(sim) | {"CRAWLER_TEST_STOP_AT": "input_read:1"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await _until(lambda: _stopped(proc.pid) or proc.returncode is not None, "the first batch of input read")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        _, raw = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 130, raw.decode()
        details = sim.stats.by_endpoint["/post-detail"]
        code, err = await crawler(args, sim, tmp_path)
        assert code == 0, err
        assert sim.stats.by_endpoint["/post-detail"] - details == len(new)
        for vid in ids:
            assert (tmp_path / "hd" / f"{vid}.hd.mp4").read_bytes() == expected(sim, "hdplay", vid)


@pytest.mark.slow
async def test_a_first_signal_lets_the_detail_answers_in_flight_be_kept(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM while four slow /post-detail/ requests are out: they are paid for, so their answers are committed
    before exit 143 and nothing more is sent; the job's counters equal the simulator's, and the resume fetches
    every other post once (no post is asked for twice across the two runs)."""
    async with simulator(world=WORLD, latency=(1.0, 1.0)) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 16))[:12]
        ids = [r["video_id"] for r in rows]
        (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
        args = ["download", "ids.txt", "-o", "hd", "--config", "fast.toml", "--parallelism", "4"]
        details, billed = sim.stats.by_endpoint["/post-detail"], sim.stats.billed[KEY]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        await _until(lambda: sim.stats.by_endpoint["/post-detail"] - details >= 6 or proc.returncode is not None,
                     "a second round of requests out")
        before = sim.stats.by_endpoint["/post-detail"] - details
        proc.send_signal(signal.SIGTERM)
        _, raw = await asyncio.wait_for(proc.communicate(), timeout=30)
        err = raw.decode()
        sent = sim.stats.by_endpoint["/post-detail"] - details
        assert proc.returncode == 143, err
        waited = re.search(r"waiting for the (\d+) requests already sent", err)
        assert waited, err
        assert sent - before <= int(waited.group(1)) and sent < len(ids)  # only what was under way at the signal
        assert _summary(err, "requests_sent") == sent
        assert _summary(err, "credits_billed") == sim.stats.billed[KEY] - billed == sent  # each answer came
        answer_at_once(sim)
        code, err = await crawler(args + ["-q"], sim, tmp_path)
        assert code == 0, err
        assert sim.stats.by_endpoint["/post-detail"] - details == len(ids)  # none was lost, none asked again
        for vid in ids:
            assert (tmp_path / "hd" / f"{vid}.hd.mp4").read_bytes() == expected(sim, "hdplay", vid)


@pytest.mark.slow
async def test_a_second_signal_stops_the_download_at_once(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM while four slow /post-detail/ requests are out, then SIGTERM again once the download says it waits
    for them: exit 143 without their answers, and the same command then completes every file."""
    async with simulator(world=WORLD, latency=(5.0, 5.0)) as sim:
        rows = videos(sim, await posts_csv(sim, tmp_path, 10))[:6]
        ids = [r["video_id"] for r in rows]
        (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
        args = ["download", "ids.txt", "-o", "hd", "--config", "fast.toml", "--parallelism", "4"]
        details = sim.stats.by_endpoint["/post-detail"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        await _until(lambda: sim.stats.by_endpoint["/post-detail"] - details >= 4 or proc.returncode is not None,
                     "four requests out")
        proc.send_signal(signal.SIGTERM)
        said = b""
        while b"requests already sent" not in said:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
            assert line, "the download ended without saying it waits for the requests in flight"
            said += line
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), timeout=4)  # the answers would take 5 s
        code = await asyncio.wait_for(proc.wait(), timeout=30)
        err = (said + rest).decode()
        assert code == 143, err
        assert _summary(err, "files") == 0 and not list((tmp_path / "hd").glob("*.mp4"))
        answer_at_once(sim)
        code, err = await crawler(args + ["-q"], sim, tmp_path)
        assert code == 0, err
        for vid in ids:
            assert (tmp_path / "hd" / f"{vid}.hd.mp4").read_bytes() == expected(sim, "hdplay", vid)


def _summary(err: str, name: str) -> int:
    """A job counter from the end-of-run summary table."""
    match = re.search(rf"{name}\s+([\d,]+)", err)
    assert match, err
    return int(match.group(1).replace(",", ""))
