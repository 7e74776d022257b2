"""`crawler download` meeting media as real CDNs serve it (api-reference §5.1): photo posts whose play URL is their
sound, WebP/JPEG covers and images, sound URLs without an extension, wmplay == play, 429/503 with Retry-After.

Expected names and bytes come from the simulator's world (`crawler.sim.media`), and every written file's magic bytes
are checked against its extension by this file's own table, not by the crawler's.
"""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from crawler.jobs.media import CONTENT_TYPES, UNKNOWN_EXT, extension, file_name, known_extension
from crawler.runs.transfer import final_path
from crawler.sim import media
from crawler.sim.media import MediaConfig
from crawler.sim.server import Simulator
from crawler.stores.local import StateStore
from crawler.stores.model import MediaFile
from tests.conftest import KEY, SimFactory
from tests.test_download import FAST, WORLD, cover, crawler, files_under, photo_posts, posts_csv, videos


def magic_says(data: bytes) -> str:
    """The format a file's first bytes prove (independently of the crawler's `sniff`)."""
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpeg"
    if data[:3] == b"ID3" or (data[:1] == b"\xff" and data[1] & 0xE0 == 0xE0):
        return ".mp3"
    return "?"


def written(out: Path) -> dict[str, Path]:
    """The media files under DIR by relative name (state stores and the failures/skipped lists left out)."""
    return {p.relative_to(out).as_posix(): p for p in files_under(out)
            if not p.name.startswith(".") and p.suffix != ".csv"}


def listed(path: Path) -> list[tuple[str, str]]:
    """(input, reason) rows of a failures or skipped file."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["input"], r["reason"]) for r in csv.DictReader(fh)]


async def download(sim: Simulator, tmp: Path, what: str, *extra: str, config: str = "fast.toml",
                   source: str = "posts.csv") -> tuple[int, str]:
    return await crawler(["download", source, "-o", "media", "--what", what, "--config", config, *extra], sim, tmp)


@pytest.mark.slow
async def test_every_file_is_named_by_what_its_bytes_are(simulator: SimFactory, tmp_path: Path) -> None:
    """Videos, hd, covers, sounds and images of photo and video posts into one DIR: every file's extension is what
    its magic bytes say (no mp3 named .mp4), hd and video never share a name, photo posts are skipped as videos
    with one line and a list, exit 0."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 48)
        seed = sim.media.seed
        photos, plain = photo_posts(sim, rows), videos(sim, rows)
        assert photos and plain, "the sample must hold photo and video posts"
        assert any(media.url_suffix(seed, "music", r["music_id"]) == "" for r in rows), "a sound URL without extension"
        assert {media.fmt(seed, "cover", r["video_id"]) for r in rows} == {"webp", "jpeg"}
        for what in ("video", "hd"):
            code, err = await download(sim, tmp_path, what)
            assert code == 0, err
            assert f"crawler: {len(photos):,} photo posts skipped: not videos; use --what images or --what music" in err
            assert sorted(listed(tmp_path / "media" / f"download-{what}.skipped.csv")) == sorted(
                (vid, "not_a_video") for vid in photos)
        for what in ("cover", "music", "images"):
            code, err = await download(sim, tmp_path, what, "-q")
            assert code == 0, err
        out = tmp_path / "media"
        files = written(out)
        want = {f"{r['video_id']}.mp4" for r in plain} | {f"{r['video_id']}.hd.mp4" for r in plain}
        want |= {f"{vid}/{n}.{media.fmt(seed, 'image', vid)}" for vid, count in photos.items() for n in range(count)}
        want |= {f"{r['video_id']}.cover.{media.fmt(seed, 'cover', r['video_id'])}" for r in rows}
        want |= {f"{r['video_id']}.music.mp3" for r in rows}
        assert set(files) == want
        for name, path in files.items():
            assert magic_says(path.read_bytes()[:16]) == path.suffix, name
        for r in plain:  # the posts CSV has no hdplay: hd falls back to the video, under its own name
            vid = r["video_id"]
            assert (out / f"{vid}.mp4").read_bytes() == (out / f"{vid}.hd.mp4").read_bytes() == media.content(
                seed, "play", vid)
        for vid, count in photos.items():
            for n in range(count):
                assert files[f"{vid}/{n}.{media.fmt(seed, 'image', vid)}"].read_bytes() == media.content(
                    seed, "image", vid, n)
        assert not list(out.rglob("*.part"))


@pytest.mark.slow
async def test_a_photo_post_the_csv_does_not_flag_is_skipped_by_its_answer(simulator: SimFactory,
                                                                          tmp_path: Path) -> None:
    """A CSV without an `images` column: the host's answer (audio/mpeg) shows the photo post's play is a sound, so
    --what video skips it as not_a_video (exit 0, no file, no .part) and saves the video posts."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 36)
        photos, plain = photo_posts(sim, rows), videos(sim, rows)
        assert photos and plain
        with (tmp_path / "bare.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["video_id", "play"])
            w.writerows([r["video_id"], r["play"]] for r in rows)
        code, err = await download(sim, tmp_path, "video", source="bare.csv")
        assert code == 0, err
        assert f"{len(photos):,} photo posts skipped" in err
        out = tmp_path / "media"
        assert set(written(out)) == {f"{r['video_id']}.mp4" for r in plain}
        assert sorted(listed(out / "download-video.skipped.csv")) == sorted((vid, "not_a_video") for vid in photos)
        assert not list(out.rglob("*.part"))


@pytest.mark.slow
async def test_ids_of_photo_posts_are_skipped_after_their_one_detail_call(simulator: SimFactory,
                                                                         tmp_path: Path) -> None:
    """Ids as input, --what hd: one /post-detail/ credit per post; the answer's `images` marks photo posts, which
    are skipped as not_a_video without a media request; video posts get <id>.hd.mp4 with the hd bytes."""
    async with simulator(world=WORLD) as sim:
        rows = await posts_csv(sim, tmp_path, 36)
        photos, plain = photo_posts(sim, rows), videos(sim, rows)
        shown = list(photos)[:3]
        ids = [*shown, *[r["video_id"] for r in plain[:3]]]
        (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
        billed, media_requests = sim.stats.billed[KEY], sim.media.stats.requests
        code, err = await download(sim, tmp_path, "hd", "-q", source="ids.txt")
        assert code == 0, err
        assert sim.stats.billed[KEY] - billed == len(ids)
        assert sim.media.stats.requests - media_requests == 3
        out = tmp_path / "media"
        assert set(written(out)) == {f"{r['video_id']}.hd.mp4" for r in plain[:3]}
        for r in plain[:3]:
            assert (out / f"{r['video_id']}.hd.mp4").read_bytes() == media.content(sim.media.seed, "hdplay",
                                                                                   r["video_id"])
        assert sorted(listed(out / "download-hd.skipped.csv")) == sorted((vid, "not_a_video") for vid in shown)
        code, err = await download(sim, tmp_path, "hd", source="ids.txt")
        assert code == 0 and "already complete" in err, err
        assert sim.stats.billed[KEY] - billed == len(ids)


@pytest.mark.slow
async def test_a_generic_content_type_is_named_by_magic_bytes(simulator: SimFactory, tmp_path: Path) -> None:
    """Every file served as application/octet-stream: covers and sounds are still named .webp/.jpeg/.mp3 by their
    first bytes, never by their URL."""
    async with simulator(world=WORLD, media=MediaConfig(generic_type=True)) as sim:
        rows = await posts_csv(sim, tmp_path, 24)
        seed = sim.media.seed
        for what in ("cover", "music"):
            code, err = await download(sim, tmp_path, what, "-q")
            assert code == 0, err
        files = written(tmp_path / "media")
        assert set(files) == {f"{r['video_id']}.cover.{media.fmt(seed, 'cover', r['video_id'])}" for r in rows} | {
            f"{r['video_id']}.music.mp3" for r in rows}
        for name, path in files.items():
            assert magic_says(path.read_bytes()[:16]) == path.suffix, name


@pytest.mark.slow
async def test_watermarked_is_skipped_when_wmplay_equals_play(simulator: SimFactory, tmp_path: Path) -> None:
    """2026 bodies (wmplay == play): --what watermarked saves nothing twice, says so in one line, asks the host for
    nothing; with distinct URLs it saves <id>.wm.mp4."""
    async with simulator(world=WORLD, media=MediaConfig(wm_same=True)) as sim:
        rows = await posts_csv(sim, tmp_path, 24)
        plain = videos(sim, rows)
        assert all(r["wmplay"] == r["play"] for r in rows)  # (the CSV carries no wm_size)
        code, err = await download(sim, tmp_path, "watermarked")
        assert code == 0, err
        assert (f"crawler: {len(plain):,} posts skipped: no separate watermarked file (wmplay == play);"
                " use --what video") in err
        assert written(tmp_path / "media") == {} and sim.media.stats.requests == 0
        reasons = dict(listed(tmp_path / "media" / "download-watermarked.skipped.csv"))
        assert reasons == {r["video_id"]: "not_a_video" if r not in plain else "not_watermarked" for r in rows}
    distinct = tmp_path / "distinct"
    distinct.mkdir()
    async with simulator(world=WORLD) as sim:
        rows = videos(sim, await posts_csv(sim, distinct, 12))
        code, err = await download(sim, distinct, "watermarked", "-q")
        assert code == 0, err
        files = written(distinct / "media")
        assert set(files) == {f"{r['video_id']}.wm.mp4" for r in rows}
        for r in rows:
            assert files[f"{r['video_id']}.wm.mp4"].read_bytes() == media.content(sim.media.seed, "wmplay",
                                                                                  r["video_id"])


@pytest.mark.slow
async def test_a_media_429_or_503_with_retry_after_is_waited_exactly(simulator: SimFactory, tmp_path: Path) -> None:
    """Throttled answers (429/503, Retry-After: 1.5) with retry waits otherwise off: at the media host, the next
    request for the same file arrives no sooner than 1.5 s after each one, and not much later; every file exact.
    A throttle spends no try (as the API's 429s): with --retries 1 every file still completes."""
    throttle = MediaConfig(fault_rate=0.3, faults=frozenset({"throttle"}), retry_after=1.5)
    async with simulator(world=WORLD, media=throttle) as sim:
        rows = await posts_csv(sim, tmp_path, 20)
        code, err = await download(sim, tmp_path, "cover", "-q", "--retries", "1")
        assert code == 0, err
        log = sim.media.stats.log
        throttled = [(t, path) for t, path, status in log if status in (429, 503)]
        assert throttled and {s for _, _, s in log if s in (429, 503)} == {429, 503}
        for at, path in throttled:
            after = min(t for t, p, _ in log if p == path and t > at)
            assert 1.5 <= after - at < 1.5 + 1.0, (path, after - at)
        files = written(tmp_path / "media")
        for r in rows:
            name, data = cover(sim, r["video_id"])
            assert files[name].read_bytes() == data


@pytest.mark.slow
async def test_a_retry_after_past_the_stall_limit_stops_the_run_resumably(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """A media host asking to wait 600 s with retry.stall_limit 5: the run stops at once with one line naming the
    host's Retry-After and the limit (exit 1), nothing half-written is published; once the host answers, the same
    command completes every file."""
    throttle = MediaConfig(fault_rate=1.0, faults=frozenset({"throttle"}), retry_after=600)
    async with simulator(world=WORLD, media=throttle) as sim:
        rows = await posts_csv(sim, tmp_path, 10)
        (tmp_path / "stall.toml").write_text(FAST.replace("[retry]\n", "[retry]\nstall_limit = 5\n"))
        code, err = await download(sim, tmp_path, "cover", "-q", config="stall.toml")
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Retry-After" in lines[0] and "retry.stall_limit (5 s)" in lines[0], err
        assert not [name for name in written(tmp_path / "media") if not name.endswith(".part")]
        sim.media.config = MediaConfig()
        code, err = await download(sim, tmp_path, "cover", "-q", config="stall.toml")
        assert code == 0, err
        assert len(written(tmp_path / "media")) == len(rows) and not list((tmp_path / "media").glob("*.part"))


@pytest.mark.parametrize(("content_type", "head", "ext"), [
    ("video/mp4", b"\x00\x00\x00\x20ftypisom", ".mp4"),
    ("image/jpeg", b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".jpeg"),  # a specific type names the file
    ("audio/mp4", b"", ".m4a"),
    ("image/webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".webp"),
    ("image/jpeg; charset=binary", b"\xff\xd8\xff\xe0", ".jpeg"),
    ("Audio/MPEG", b"ID3\x04", ".mp3"),
    ("audio/mp4", b"\x00\x00\x00\x20ftypM4A ", ".m4a"),
    ("application/octet-stream", b"ID3\x04\x00", ".mp3"),
    ("application/octet-stream", b"\x00\x00\x00\x20ftypisom", ".mp4"),
    ("", b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".webp"),
    (None, b"\xff\xfb\x90\x64", ".mp3"),
    ("application/octet-stream", b"no magic here", UNKNOWN_EXT),
    ("text/html", b"<html><body>", None),
    ("video/../../../etc/passwd", b"<html>", None),
    ("video/mp4/../x", b"\xff\xd8\xff\xe0", ".jpeg"),
])
def test_the_extension_comes_from_the_content_type_or_magic_bytes(content_type: str | None, head: bytes,
                                                                   ext: str | None) -> None:
    """A specific Content-Type names the file; a missing or generic one leaves it to the magic bytes; a hostile
    type never reaches a name (only the fixed table's extensions do)."""
    got = extension(content_type, head)
    assert got == ext
    assert got is None or known_extension(got)


def test_names_never_share_between_kinds_and_hold_only_digits_and_fixed_extensions() -> None:
    """hd and video, and every other kind, have distinct stems; every extension the table gives is a dot and a
    few lowercase letters or digits."""
    stems = {file_name("7000000000000000001", what) for what in ("video", "hd", "watermarked", "cover", "music")}
    assert len(stems) == 5 and file_name("7000000000000000001", "images", 3) == "7000000000000000001/3"
    for ext in [*CONTENT_TYPES.values(), UNKNOWN_EXT]:
        assert ext[0] == "." and ext[1:].isascii() and ext[1:].isalnum() and ext[1:].islower()


def test_files_named_whole_by_an_older_version_keep_their_names(tmp_path: Path) -> None:
    """A state file from before extensions came from the answer (no `ext` column): its files keep the names they
    have (a done `.jpg` cover stays done under that name), new files wait for their answer to be named."""
    path = tmp_path / "old.state.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE media (seq INTEGER NOT NULL, n INTEGER NOT NULL, name TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
            expected INTEGER, etag TEXT, durable INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending',
            refreshed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (seq, n));
        INSERT INTO media (seq, n, name, url, expected, durable, status) VALUES (1, 0, '7.jpg', 'http://h/7', 5, 5,
            'done');
    """)
    db.commit()
    db.close()
    state = StateStore(path)
    try:
        [old] = state.media(1)
        assert old.ext == "" and final_path(tmp_path, old) == tmp_path / "7.jpg" and old.status == "done"
        state.add_media([MediaFile(2, 0, file_name("8", "cover"), "http://h/8")])
        [new] = state.media(2)
        assert new.ext is None and final_path(tmp_path, new) is None
        state.media_named(2, 0, ".webp")
        assert final_path(tmp_path, state.media(2)[0]) == tmp_path / "8.cover.webp"
    finally:
        state.close()
