"""The crawl pipeline in-process against the simulator on loopback: exact rows for every command, with quirks
and faults on; concurrency, backpressure, auto parallelism, credits, resume and the data directory.

Expected rows come from the simulator's seeded World (crawler/sim/data.py), never from crawler.api.records.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crawler.config import Settings
from crawler.errors import Interrupted
from crawler.runs.local import COMMANDS, Crawl, JobOptions, Outcome, run_job
from crawler.sim.data import (
    CHALLENGE_ID_BASE,
    MUSIC_ID_BASE,
    VIDEO_ID_BASE,
    VIDEO_SLOTS,
    Post,
    World,
    WorldConfig,
)
from tests.conftest import KEY, SimFactory, fast_settings

FAULTS = frozenset({"5xx", "drop", "truncated", "malformed"})
FAULTY = {"quirks": True, "fault_rate": 0.25, "faults": FAULTS}
WORLD = WorldConfig(seed=11, users=1_000)
FORMULA = ("=", "+", "-", "@", "\t", "\r")


# --- expectations, computed from the World alone ---

def neutral(text: str | None) -> str:
    """The CSV cell CONTRACT.md promises for a text value: empty for None, a leading ' before formula-like text."""
    if text is None:
        return ""
    return "'" + text if text.startswith(FORMULA) else text


def flag(value: bool) -> str:
    """A boolean cell."""
    return "true" if value else "false"


def post_row(p: Post, source: str) -> dict[str, str]:
    """The columns a post row must carry."""
    return {"video_id": p.video_id, "source_handle": source, "create_time": str(p.create_time),
            "region": p.region, "title": neutral(p.title), "play_count": str(p.play_count),
            "digg_count": str(p.digg_count), "comment_count": str(p.comment_count),
            "share_count": str(p.share_count)}


def follow_row(w: World, index: int, source: str) -> dict[str, str]:
    """The columns a follower/following row must carry."""
    return {"user_id": w.user_id(index), "handle": w.handle(index), "source_handle": source}


def profile_row(w: World, index: int) -> dict[str, str]:
    """The columns a profile row must carry."""
    u = w.user(index)
    assert u is not None
    return {"user_id": u.user_id, "handle": u.handle, "nickname": neutral(u.nickname), "sec_uid": u.sec_uid,
            "verified": flag(u.verified), "private": flag(u.private), "followers": str(u.followers),
            "following": str(u.following), "videos": str(u.videos), "hearts": str(u.hearts)}


def public(w: World, i: int) -> bool:
    """An existing user whose lists can be read."""
    return not w.is_missing(i) and not w.is_private(i)


def pick(w: World, pred: Callable[[int], bool], n: int) -> list[int]:
    """The first n user indexes matching pred."""
    found: list[int] = []
    for i in range(w.config.users):
        if len(found) == n:
            break
        if pred(i):
            found.append(i)
    assert len(found) == n, "the test world has too few matching users"
    return found


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a CSV file."""
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_failures(out: Path) -> dict[str, str]:
    """input -> reason from OUT.failures.csv (empty when the file does not exist)."""
    path = out.with_name(out.stem + ".failures.csv")
    if not path.exists():
        return {}
    rows = read_csv(path)
    result = {r["input"]: r["reason"] for r in rows}
    assert len(result) == len(rows), "an input appears twice in the failures file"
    return result


def make_crawl(settings: Settings, command: str, source: str | list[str], out: Path, *,
               flowing: asyncio.Event | None = None, **job: Any) -> Crawl:
    """A job; `source` is the input's lines (written next to `out`) or a search keyword."""
    if isinstance(source, list):
        path = out.with_name(out.stem + ".input.txt")
        path.write_text("\n".join(source) + "\n", encoding="utf-8")
        source = str(path)
    return Crawl(JobOptions(command=command, input=source, output=str(out), **job), settings, api_key=KEY,
                 flowing=flowing)


async def crawl_once(settings: Settings, command: str, source: str | list[str], out: Path,
                     **job: Any) -> Outcome:
    """Run one job in-process to its end."""
    return await run_job(make_crawl(settings, command, source, out, **job), install_signals=False)


def post_ids(out: Path) -> list[str]:
    """The video_id column of a posts CSV."""
    return [r["video_id"] for r in read_csv(out)]


def world_post_ids(w: World, users: Iterable[int]) -> set[str]:
    """Every post id of these users."""
    return {p.video_id for i in users for p in w.posts(i)}


# --- one case per command: input lines, the rows and failures the World says it must produce ---

@dataclass
class Case:
    """A job's input and the exact result it must have."""

    source: str | list[str]
    key: str  # the key column
    by: str | None  # the column naming the input item, if the record has one
    rows: dict[tuple[str, str], dict[str, str]]  # (source, key) -> columns that must match
    failures: dict[str, str] = field(default_factory=dict)  # raw input line -> reason
    job: dict[str, Any] = field(default_factory=dict)


MISSING_HANDLE = "ghost_account_404"
INVALID_USERS = ["not a handle!", "x", "https://example.com/somebody", "id:abc"]


def _user_inputs(w: World, pred: Callable[[int], bool]) -> tuple[list[str], list[tuple[int, str]], int]:
    """Input lines in every form users paste, with duplicates and bad lines; (lines, [(index, source)], private)."""
    a, b, c, d, e = pick(w, lambda i: public(w, i) and pred(i), 5)
    private = pick(w, lambda i: not w.is_missing(i) and w.is_private(i), 1)[0]
    ha, hb, hc, hd = (w.handle(i) for i in (a, b, c, d))
    lines = [
        "@" + ha.upper(),
        f"https://www.tiktok.com/@{hb}?lang=en&is_from_webapp=1",
        f"   {hc.capitalize()}   ",
        hd,
        f"id:{w.user_id(e)}",
        ha,  # duplicates, in other forms
        f"https://www.tiktok.com/@{hb.upper()}",
        f"ID:{w.user_id(e)}",
        MISSING_HANDLE,
        w.handle(private),
        *INVALID_USERS,
    ]
    sources = [(a, ha), (b, hb), (c, hc), (d, hd), (e, w.user_id(e))]
    return lines, sources, private


def _invalid(lines: Iterable[str]) -> dict[str, str]:
    return {neutral(line.strip()): "invalid_input" for line in lines}


def case_profiles(w: World) -> Case:
    lines, sources, private = _user_inputs(w, lambda i: True)
    rows = {("", w.user_id(i)): profile_row(w, i) for i, _ in sources}
    rows[("", w.user_id(private))] = profile_row(w, private)  # private accounts are rows, private=true
    assert rows[("", w.user_id(private))]["private"] == "true"
    return Case(lines, "user_id", None, rows, {MISSING_HANDLE: "not_found", **_invalid(INVALID_USERS)})


def _user_list_case(pred: Callable[[World, int], bool],
                    expected: Callable[[World, int, str], dict[tuple[str, str], dict[str, str]]]
                    ) -> Callable[[World], Case]:
    def build(w: World) -> Case:
        lines, sources, private = _user_inputs(w, lambda i: pred(w, i))
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for index, source in sources:
            rows.update(expected(w, index, source))
        key = "video_id" if "video_id" in next(iter(rows.values())) else "user_id"
        failures = {MISSING_HANDLE: "not_found", w.handle(private): "private", **_invalid(INVALID_USERS)}
        return Case(lines, key, "source_handle", rows, failures)

    return build


def _posts_of(w: World, i: int, s: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(s, p.video_id): post_row(p, s) for p in w.posts(i)}


def _liked_of(w: World, i: int, s: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(s, p.video_id): post_row(p, s) for p in w.liked(i)}


def _followers_of(w: World, i: int, s: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(s, w.user_id(f.user_index)): follow_row(w, f.user_index, s) for f in w.followers(i)}


def _following_of(w: World, i: int, s: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(s, w.user_id(f.user_index)): follow_row(w, f.user_index, s) for f in w.following(i)}


def _u(w: World, i: int) -> Any:
    return w.user(i)


def _posts_with_comments(w: World, n: int, *, max_comments: int = 25) -> list[Post]:
    """n posts of public users with a few comments, some of them with replies."""
    found: list[Post] = []
    for i in range(w.config.users):
        if public(w, i):
            post = next((p for p in w.posts(i) if 1 <= p.comment_count <= max_comments), None)
            if post is not None:
                found.append(post)
        if len(found) == n:
            return found
    raise AssertionError("too few posts with comments in the test world")


def _post_inputs(w: World) -> tuple[list[str], list[Post], dict[str, str]]:
    """Twenty posts as bare ids and video URLs (with queries, spaces, duplicates), plus bad and missing ones."""
    posts = _posts_with_comments(w, 20)
    lines: list[str] = []
    for n, p in enumerate(posts):
        author = w.handle(p.author_index)
        lines.append((p.video_id, f"https://www.tiktok.com/@{author}/video/{p.video_id}?is_from_webapp=1&lang=en",
                      f"  {p.video_id}  ", f"https://www.tiktok.com/@Whoever/video/{p.video_id}")[n % 4])
    lines += [f"https://www.tiktok.com/@x/video/{posts[0].video_id}", posts[2].video_id]  # duplicates
    private = pick(w, lambda i: not w.is_missing(i) and w.is_private(i) and _u(w, i).videos > 0, 1)[0]
    private_post = next(w.posts(private)).video_id
    ghost = str(VIDEO_ID_BASE + posts[0].author_index * VIDEO_SLOTS + VIDEO_SLOTS - 1)  # no such post
    lines += [ghost, private_post, "https://www.tiktok.com/@someone", "12ab"]
    failures = {ghost: "not_found", private_post: "not_found",
                **_invalid(["https://www.tiktok.com/@someone", "12ab"])}
    return lines, posts, failures


def case_post_details(w: World) -> Case:
    lines, posts, failures = _post_inputs(w)
    rows = {(p.video_id, p.video_id): post_row(p, p.video_id) for p in posts}
    return Case(lines, "video_id", "source_handle", rows, failures)


def _comment_rows(w: World, posts: list[Post], *, replies: bool) -> dict[tuple[str, str], dict[str, str]]:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for p in posts:
        for c in w.comments(p.video_id):
            rows[(p.video_id, c.comment_id)] = {"comment_id": c.comment_id, "video_id": p.video_id,
                                                "text": neutral(c.text), "parent_comment_id": ""}
            if replies:
                for r in w.replies(p.video_id, c.comment_id):
                    rows[(p.video_id, r.comment_id)] = {"comment_id": r.comment_id, "video_id": p.video_id,
                                                        "text": neutral(r.text), "parent_comment_id": c.comment_id}
    return rows


def case_comments(w: World) -> Case:
    lines, posts, failures = _post_inputs(w)
    return Case(lines, "comment_id", "video_id", _comment_rows(w, posts, replies=False), failures)


def case_comments_with_replies(w: World) -> Case:
    lines, posts, failures = _post_inputs(w)
    rows = _comment_rows(w, posts, replies=True)
    assert any(r["parent_comment_id"] for r in rows.values()), "the case must include replies"
    return Case(lines, "comment_id", "video_id", rows, failures, {"with_replies": True})


def case_replies(w: World) -> Case:
    posts = _posts_with_comments(w, 6)
    pairs = [(p.video_id, c.comment_id) for p in posts for c in w.comments(p.video_id) if c.reply_total][:6]
    assert len(pairs) == 6
    ghost = (pairs[0][0], pairs[0][0] + "99999")  # a comment id the post does not have
    lines = ["video_id,comment_id,parent_comment_id"]
    lines += [f"{v},{c}," for v, c in pairs]
    lines += [f"{pairs[0][0]},{pairs[0][1]},", f"{ghost[0]},{ghost[1]},", "abc,123,"]
    rows = {}
    for v, c in pairs:
        for r in w.replies(v, c):
            rows[(v, r.comment_id)] = {"comment_id": r.comment_id, "video_id": v, "text": neutral(r.text),
                                       "parent_comment_id": c}
    failures = {f"{ghost[0]},{ghost[1]}": "not_found", "abc,123": "invalid_input"}
    return Case(lines, "comment_id", "video_id", rows, failures)


KEYWORD = "Dance"


def case_search_videos(w: World) -> Case:
    rows = {(KEYWORD, p.video_id): post_row(p, KEYWORD) for p in w.search_videos(KEYWORD)}
    assert rows
    return Case(KEYWORD, "video_id", "source_handle", rows, job={"page_size": 5})


def case_search_users(w: World) -> Case:
    rows = {}
    for i in w.search_users(KEYWORD):
        u = w.user(i)
        assert u is not None
        rows[(KEYWORD, u.user_id)] = {"user_id": u.user_id, "handle": u.handle, "source_keyword": KEYWORD,
                                      "nickname": neutral(u.nickname), "followers": str(u.followers),
                                      "videos": str(u.videos)}
    assert rows
    return Case(KEYWORD, "user_id", "source_keyword", rows, job={"page_size": 5})


def _challenge_row(ch: Any, source: str) -> dict[str, str]:
    return {"challenge_id": ch.challenge_id, "name": ch.name, "source": source, "description": ch.desc,
            "user_count": str(ch.user_count), "view_count": str(ch.view_count)}


def case_search_challenges(w: World) -> Case:
    rows = {(KEYWORD, ch.challenge_id): _challenge_row(ch, KEYWORD) for ch in w.search_challenges(KEYWORD)}
    assert rows
    return Case(KEYWORD, "challenge_id", "source", rows, job={"page_size": 2})


GHOST_MUSIC = str(MUSIC_ID_BASE + 10**9)
GHOST_CHALLENGE = str(CHALLENGE_ID_BASE + 10**8)


def _musics(w: World) -> list[str]:
    ids: list[str] = []
    for m in w.music_ids(200):
        if len(ids) < 3 and 1 <= len(w.music_posts(m)) <= 60:
            ids.append(m)
    assert len(ids) == 3
    return ids


def _music_lines(ids: list[str]) -> list[str]:
    return [f"  {m} " if n % 2 else m for n, m in enumerate(ids)] + [ids[0], GHOST_MUSIC, "abc"]


def case_music_posts(w: World) -> Case:
    ids = _musics(w)
    rows = {(m, p.video_id): post_row(p, m) for m in ids for p in w.music_posts(m)}
    return Case(_music_lines(ids), "video_id", "source_handle", rows,
                {GHOST_MUSIC: "not_found", "abc": "invalid_input"})


def case_music_info(w: World) -> Case:
    ids = w.music_ids(20)
    rows = {}
    for m in ids:
        music = w.music(m)
        assert music is not None
        rows[("", m)] = {"music_id": m, "title": neutral(music.title), "author": neutral(music.author),
                         "duration": str(music.duration), "original": flag(music.original),
                         "video_count": str(music.video_count)}
    return Case(_music_lines(ids), "music_id", None, rows, {GHOST_MUSIC: "not_found", "abc": "invalid_input"})


def _challenges(w: World) -> list[Any]:
    small: list[Any] = []
    for cid in w.challenge_ids(200):
        if len(small) < 3 and 1 <= len(w.challenge_posts(cid)) <= 60:
            small.append(w.challenge_by_id(cid))
    assert len(small) == 3
    return small


def _challenge_lines(chs: list[Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """Lines naming challenges by id, '#Name' and name; the sources the rows must carry; the failures."""
    a, b, c = chs
    lines = [a.challenge_id, "#" + b.name.upper(), c.name, f"#{b.name}", a.challenge_id, "nosuchtag",
             GHOST_CHALLENGE, "bad\tname"]
    # The failures file shows a control character escaped (issue 23, item 8): the tab is written as \x09.
    failures = {"nosuchtag": "not_found", GHOST_CHALLENGE: "not_found", "bad\\x09name": "invalid_input"}
    return lines, [a.challenge_id, b.name, c.name], failures


def case_challenge_posts(w: World) -> Case:
    chs = _challenges(w)
    lines, sources, failures = _challenge_lines(chs)
    rows = {(s, p.video_id): post_row(p, s) for ch, s in zip(chs, sources, strict=True)
            for p in w.challenge_posts(ch.challenge_id)}
    return Case(lines, "video_id", "source_handle", rows, failures)


def case_challenge_info(w: World) -> Case:
    chs = _challenges(w)
    lines, sources, failures = _challenge_lines(chs)
    rows = {(s, ch.challenge_id): _challenge_row(ch, s) for ch, s in zip(chs, sources, strict=True)}
    return Case(lines, "challenge_id", "source", rows, failures)


CASES: dict[str, Callable[[World], Case]] = {
    "profiles": case_profiles,
    "posts": _user_list_case(lambda w, i: 1 <= _u(w, i).videos <= 80, _posts_of),
    "liked": _user_list_case(lambda w, i: _u(w, i).digg_count <= 100 and any(True for _ in w.liked(i)), _liked_of),
    "followers": _user_list_case(lambda w, i: 1 <= _u(w, i).followers <= 150, _followers_of),
    "following": _user_list_case(lambda w, i: 1 <= _u(w, i).following <= 150, _following_of),
    "post-details": case_post_details,
    "comments": case_comments,
    "comments --with-replies": case_comments_with_replies,
    "replies": case_replies,
    "search-videos": case_search_videos,
    "search-users": case_search_users,
    "search-challenges": case_search_challenges,
    "music-posts": case_music_posts,
    "challenge-posts": case_challenge_posts,
    "music-info": case_music_info,
    "challenge-info": case_challenge_info,
}


POST_COLUMNS = ["video_id", "source_handle", "create_time", "region", "title", "play_count", "digg_count",
                "comment_count", "share_count"]
# CONTRACT.md's minimum columns; commands it does not name must at least carry their key column.
MIN_COLUMNS = {
    "profiles": ["user_id", "handle", "nickname", "sec_uid", "verified", "private", "followers", "following",
                 "videos", "hearts"],
    **dict.fromkeys(["posts", "liked", "post-details", "search-videos", "music-posts", "challenge-posts"],
                    POST_COLUMNS),
    "followers": ["user_id", "handle", "source_handle"],
    "following": ["user_id", "handle", "source_handle"],
    "comments": ["comment_id", "video_id", "text"],
    "replies": ["comment_id", "video_id", "text", "parent_comment_id"],
}


def test_every_command_has_a_case() -> None:
    """The exact-rows test below covers every command the crawler offers, comments with and without replies."""
    assert {name.split()[0] for name in CASES} == set(COMMANDS)
    assert "comments --with-replies" in CASES


@pytest.mark.parametrize("name", sorted(CASES))
async def test_each_command_writes_each_expected_row_exactly_once(simulator: SimFactory, tmp_path: Path,
                                                                  name: str) -> None:
    """With quirks and faults on and several workers, the CSV holds exactly the World's rows, once each."""
    command = name.split()[0]
    async with simulator(world=WORLD, **FAULTY) as sim:
        case = CASES[name](sim.world)
        settings = fast_settings(sim.url, retry_attempts=12, parallelism=4, data_dir=str(tmp_path / "data"))
        out = tmp_path / "out.csv"
        outcome = await crawl_once(settings, command, case.source, out, **case.job)
        assert sum(sim.stats.faults.values()) > 0, "the faults must have fired"
    assert outcome.error is None
    assert outcome.exit_code == (3 if case.failures else 0)
    assert out.exists() and not (tmp_path / "out.csv.part").exists()
    with out.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    assert set(MIN_COLUMNS.get(command, [case.key])) <= set(header)
    rows = read_csv(out)
    ids = [(r[case.by] if case.by else "", r[case.key]) for r in rows]
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert set(ids) == set(case.rows)
    for row, key in zip(rows, ids, strict=True):
        want = case.rows[key]
        assert {k: row[k] for k in want} == want
    assert read_failures(out) == case.failures
    assert outcome.summary.items_failed == len(case.failures)
    assert outcome.summary.rows_written == len(rows)


async def test_many_workers_duplicate_and_drop_nothing(simulator: SimFactory, tmp_path: Path) -> None:
    """200 handles through 16 workers with faults on: the rows are exactly the public users' posts, once each."""
    async with simulator(quirks=True, fault_rate=0.05, faults=FAULTS) as sim:
        w = sim.world
        # Existing users (private ones included) with up to three pages of posts each.
        handles = [h for h in w.sample_handles(400) if w.user(w.index_by_handle(h) or 0).videos <= 90][:200]  # type: ignore[union-attr]
        assert len(handles) == 200
        readable = [i for i in map(w.index_by_handle, handles) if i is not None and not w.is_private(i)]
        settings = fast_settings(sim.url, retry_attempts=12, parallelism=16, data_dir=str(tmp_path / "data"))
        out = tmp_path / "posts.csv"
        outcome = await crawl_once(settings, "posts", handles, out)
        assert sum(sim.stats.faults.values()) > 0
    expected = world_post_ids(w, readable)
    got = post_ids(out)
    assert len(got) == sum(_u(w, i).videos for i in readable) == len(expected)
    assert set(got) == expected
    assert outcome.summary.parallelism == 16
    assert outcome.summary.items_failed == len(handles) - len(readable)
    assert set(read_failures(out).values()) <= {"private"}


async def test_a_stalled_sink_holds_every_worker_at_one_page(simulator: SimFactory, tmp_path: Path) -> None:
    """With the sink stalled, the server sees one page request per worker and no more; the run then completes."""
    workers = 5
    async with simulator(world=WORLD) as sim, aiohttp.ClientSession(sim.url) as admin:
        w = sim.world
        users = pick(w, lambda i: public(w, i) and _u(w, i).videos > 30, 30)  # several pages each
        flowing = asyncio.Event()  # cleared: the sink is stalled from the start
        settings = fast_settings(sim.url, parallelism=workers, data_dir=str(tmp_path / "data"))
        out = tmp_path / "posts.csv"
        crawl = make_crawl(settings, "posts", [f"id:{w.user_id(i)}" for i in users], out, flowing=flowing)
        task = asyncio.create_task(run_job(crawl, install_signals=False))

        def stalled() -> bool:
            # The writer holds the first batch while it waits to flow; every other worker's batch is queued.
            writer = getattr(crawl, "writer", None)
            return writer is not None and writer.queued >= workers - 1

        for _ in range(500):
            if stalled() or task.done():
                break
            await asyncio.sleep(0.01)
        assert stalled(), "the workers never filled the stalled sink"
        # Each worker waits for its page to commit before asking for the next: one request per worker.
        assert sim.stats.requests == workers
        for _ in range(20):  # round trips to the server: time enough for any stray request to arrive
            async with admin.get("/__sim/stats") as resp:
                assert resp.status == 200
        assert sim.stats.requests == workers
        assert crawl.writer.queued == workers - 1
        assert not out.exists() and crawl.sink.rows_written == 0

        flowing.set()
        outcome = await asyncio.wait_for(task, timeout=30)
    assert outcome.exit_code == 0
    got = post_ids(out)
    assert len(got) == len(set(got))
    assert set(got) == world_post_ids(w, users)


async def test_auto_parallelism_chooses_more_workers_for_higher_latency(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """parallelism = "auto" at 100 requests per second keeps few workers at no latency and many at 0.3 s."""
    chosen: dict[float, int] = {}
    for latency in (0.0, 0.3):
        async with simulator(world=WORLD, latency=(latency, latency), rate_limit=100, rate_window=1.0,
                             burst_limit=100) as sim:
            ids = [f"id:{sim.world.user_id(i)}" for i in range(100) if not sim.world.is_missing(i)][:60]
            settings = fast_settings(sim.url, rate_enabled=True, rate_limit=100, rate_window=1.0,
                                     rate_max_per_second=100, parallelism=None,
                                     data_dir=str(tmp_path / f"data{latency}"))
            outcome = await crawl_once(settings, "profiles", ids, tmp_path / f"profiles{latency}.csv")
            assert outcome.exit_code == 0
            assert sim.stats.served_429 == 0
            chosen[latency] = outcome.summary.parallelism
    assert chosen[0.3] > chosen[0.0]
    assert chosen[0.3] >= 100 * 0.3  # enough requests in flight to keep 100/s busy at 0.3 s each


async def test_a_known_user_id_saves_the_userid_call(simulator: SimFactory, tmp_path: Path) -> None:
    """Ids learned by a profiles run (or by /userid/) are reused by later jobs sharing the data directory."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = pick(w, lambda i: public(w, i) and _u(w, i).videos <= 60, 20)
        handles = [w.handle(i) for i in users]
        settings = fast_settings(sim.url, parallelism=4, data_dir=str(tmp_path / "data"))
        first = await crawl_once(settings, "profiles", handles, tmp_path / "profiles.csv")
        assert first.exit_code == 0
        second = await crawl_once(settings, "posts", handles, tmp_path / "posts.csv")
        assert second.exit_code == 0
        assert sim.stats.by_endpoint["/userid"] == 0
        assert sim.stats.by_endpoint["/user-posts"] >= len(handles)
        assert set(post_ids(tmp_path / "posts.csv")) == world_post_ids(w, users)

        # Without the data directory each handle costs one /userid/ call; the ids it learns are kept.
        fresh = settings.replace(data_dir=str(tmp_path / "fresh"))
        await crawl_once(fresh, "posts", handles, tmp_path / "posts-fresh.csv")
        assert sim.stats.by_endpoint["/userid"] == len(handles)
        third = await crawl_once(fresh, "following", handles, tmp_path / "following.csv")
        assert third.exit_code == 0
        assert sim.stats.by_endpoint["/userid"] == len(handles)


def _budget_case(w: World) -> tuple[list[int], list[str]]:
    users = pick(w, lambda i: public(w, i) and 31 <= _u(w, i).videos <= 90, 12)  # 2-3 pages each
    return users, [w.handle(i) for i in users]


async def test_max_credits_caps_server_side_requests_and_a_larger_budget_completes(
        simulator: SimFactory, tmp_path: Path) -> None:
    """--max-credits N: the server receives at most N requests, exit 4; a larger budget resumes to exact rows."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users, handles = _budget_case(w)
        out = tmp_path / "posts.csv"
        settings = fast_settings(sim.url, parallelism=4, data_dir=str(tmp_path / "data"), max_credits=15)
        stopped = await crawl_once(settings, "posts", handles, out, page_size=30)
        assert stopped.exit_code == 4
        assert 0 < sim.stats.requests <= 15
        assert not out.exists() and (tmp_path / "posts.csv.part").exists()

        done = await crawl_once(settings.replace(max_credits=1_000), "posts", handles, out, page_size=30)
        assert done.exit_code == 0
        # Nothing paid twice: one /userid/ per user and each page once, as an uninterrupted crawl.
        assert sim.stats.requests == len(users) + sum(_pages(sum(1 for _ in w.posts(i)), 30) for i in users)
    got = post_ids(out)
    assert len(got) == len(set(got))
    assert set(got) == world_post_ids(w, users)


def _pages(n: int, size: int) -> int:
    """Pages of a list of n rows at `size` a page (the simulator's hasMore ends on the last row)."""
    return max(1, math.ceil(n / size))


async def test_a_budget_stop_lets_requests_in_flight_finish_and_commits_their_pages(
        simulator: SimFactory, tmp_path: Path) -> None:
    """At --max-credits, requests already sent are answered and counted: the simulator's billed count is the
    job's credits_billed, and the resumed job pays no page twice."""
    async with simulator(world=WORLD, latency=(0.02, 0.08)) as sim:
        w = sim.world
        users, handles = _budget_case(w)
        out = tmp_path / "posts.csv"
        settings = fast_settings(sim.url, parallelism=6, data_dir=str(tmp_path / "data"), max_credits=20)
        stopped = await crawl_once(settings, "posts", handles, out, page_size=30)
        assert stopped.exit_code == 4
        assert sim.stats.requests == 20 == stopped.summary.requests_sent
        assert stopped.summary.credits_billed == sim.stats.billed[KEY]
        done = await crawl_once(settings.replace(max_credits=1_000), "posts", handles, out, page_size=30)
        assert done.exit_code == 0 and done.summary.credits_billed == sim.stats.billed[KEY]
        assert sim.stats.requests == len(users) + sum(_pages(sum(1 for _ in w.posts(i)), 30) for i in users)
    got = post_ids(out)
    assert len(got) == len(set(got)) and set(got) == world_post_ids(w, users)


async def test_a_budget_stop_bills_exactly_when_answers_are_cut_after_their_headers(
        simulator: SimFactory, tmp_path: Path) -> None:
    """With 200s cut mid-body on, a --max-credits stop still reports exactly what the simulator billed."""
    async with simulator(world=WORLD, latency=(0.02, 0.08), faults=frozenset({"cut"}), fault_rate=0.3) as sim:
        _, handles = _budget_case(sim.world)
        settings = fast_settings(sim.url, parallelism=6, data_dir=str(tmp_path / "data"), max_credits=30,
                                 retry_attempts=8)
        stopped = await crawl_once(settings, "posts", handles, tmp_path / "posts.csv", page_size=30)
    assert stopped.exit_code == 4 and sim.stats.faults["cut"] > 0
    assert sim.stats.requests == 30 == stopped.summary.requests_sent
    assert stopped.summary.credits_billed == sim.stats.billed[KEY]


async def test_max_credits_is_one_budget_across_resumes(simulator: SimFactory, tmp_path: Path) -> None:
    """A job stopped by --max-credits N counts all N requests it sent, and a re-run with the same N sends none."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users, handles = _budget_case(w)
        # One worker: /userid/ and the pages of the first user, then the second user's /userid/ spends the
        # budget; the second user's first page is refused.
        budget = 1 + math.ceil(_u(w, users[0]).videos / 30) + 1
        out = tmp_path / "posts.csv"
        settings = fast_settings(sim.url, parallelism=1, data_dir=str(tmp_path / "data"), max_credits=budget)
        first = await crawl_once(settings, "posts", handles, out)
        assert first.exit_code == 4
        assert sim.stats.requests == budget
        assert first.summary.requests_sent == budget
        again = await crawl_once(settings, "posts", handles, out)
        assert again.exit_code == 4
        assert sim.stats.requests == budget


async def test_a_csv_column_is_read_as_input(simulator: SimFactory, tmp_path: Path) -> None:
    """A profiles CSV feeds posts through --column: by handle, or by numeric id with --by-id."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = pick(w, lambda i: public(w, i) and _u(w, i).videos <= 60, 8)
        settings = fast_settings(sim.url, parallelism=4, data_dir=str(tmp_path / "data"))
        profiles = tmp_path / "profiles.csv"
        await crawl_once(settings, "profiles", [w.handle(i) for i in users], profiles)
        by_handle = await crawl_once(settings, "posts", str(profiles), tmp_path / "a.csv", column="handle")
        by_id = await crawl_once(settings, "posts", str(profiles), tmp_path / "b.csv", column="user_id",
                                 by_id=True)
    assert by_handle.exit_code == by_id.exit_code == 0
    want = {(w.handle(i), p.video_id) for i in users for p in w.posts(i)}
    got = [(r["source_handle"], r["video_id"]) for r in read_csv(tmp_path / "a.csv")]
    assert len(got) == len(set(got)) and set(got) == want
    want = {(w.user_id(i), p.video_id) for i in users for p in w.posts(i)}
    got = [(r["source_handle"], r["video_id"]) for r in read_csv(tmp_path / "b.csv")]
    assert len(got) == len(set(got)) and set(got) == want


async def test_replies_reads_a_comments_csv(simulator: SimFactory, tmp_path: Path) -> None:
    """The CSV written by `comments` is a valid `replies` input: the rows are every reply of its comments."""
    async with simulator(world=WORLD, **FAULTY) as sim:
        w = sim.world
        posts = _posts_with_comments(w, 6)
        settings = fast_settings(sim.url, retry_attempts=12, parallelism=4, data_dir=str(tmp_path / "data"))
        comments = tmp_path / "comments.csv"
        await crawl_once(settings, "comments", [p.video_id for p in posts], comments)
        outcome = await crawl_once(settings, "replies", str(comments), tmp_path / "replies.csv")
    assert outcome.exit_code == 0
    want = {(c.comment_id, r.comment_id) for p in posts for c in w.comments(p.video_id)
            for r in w.replies(p.video_id, c.comment_id)}
    assert want
    got = [(r["parent_comment_id"], r["comment_id"]) for r in read_csv(tmp_path / "replies.csv")]
    assert len(got) == len(set(got)) and set(got) == want


async def test_max_items_stops_each_walk_as_soon_as_enough_rows_are_in(simulator: SimFactory,
                                                                       tmp_path: Path) -> None:
    """--max-items 5: the newest five posts of each user, fetched with one page request per user."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = pick(w, lambda i: public(w, i) and 40 <= _u(w, i).videos <= 200, 6)
        settings = fast_settings(sim.url, parallelism=3, data_dir=str(tmp_path / "data"))
        out = tmp_path / "posts.csv"
        outcome = await crawl_once(settings, "posts", [f"id:{w.user_id(i)}" for i in users], out, max_items=5)
        assert outcome.exit_code == 0
        assert sim.stats.by_endpoint["/user-posts"] == len(users)
    want = {p.video_id for i in users for p in list(w.posts(i))[:5]}
    got = post_ids(out)
    assert len(got) == len(set(got)) == 5 * len(users)
    assert set(got) == want


async def test_a_stop_requested_before_the_workers_start_sends_nothing(simulator: SimFactory,
                                                                     tmp_path: Path) -> None:
    """A SIGINT handled before any worker exists ends the run at once: exit 130, no request, the job resumable."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        users = pick(w, lambda i: public(w, i) and _u(w, i).videos <= 60, 5)
        settings = fast_settings(sim.url, parallelism=2, data_dir=str(tmp_path / "data"))
        crawl = make_crawl(settings, "posts", [w.handle(i) for i in users], tmp_path / "posts.csv")
        # What run_job's SIGINT handler does when the signal lands before the workers are created.
        crawl.request_stop(Interrupted("stopped by SIGINT", 130))
        outcome = await run_job(crawl, install_signals=False)
        assert outcome.exit_code == 130
        assert sim.stats.requests == 0


async def test_an_answer_without_a_user_object_fails_the_item_not_the_run(tmp_path: Path) -> None:
    """A 200 answer lacking the user object is retried once, then fails only its item as an unexpected shape
    while the API answers the other item (a run where nothing answers is an outage: test_outage.py)."""

    async def odd(request: web.Request) -> web.Response:
        if request.query.get("username") == "someone_else":
            return web.json_response({"user": {"id": "6800000000000000001", "uniqueId": "someone_else"},
                                      "stats": {"followerCount": 1}})
        return web.json_response({"status": "success", "processed_time": 0.01})

    app = web.Application()
    app.router.add_get("/{tail:.*}", odd)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        settings = fast_settings(f"http://127.0.0.1:{port}", retry_attempts=5, data_dir=str(tmp_path / "data"))
        out = tmp_path / "profiles.csv"
        outcome = await crawl_once(settings, "profiles", ["somebody", "someone_else"], out)
    finally:
        await runner.cleanup()
    assert outcome.exit_code == 3
    assert read_failures(out) == {"somebody": "unexpected_shape"}
    assert outcome.summary.run_requests == 3  # one retry of the unreadable answer, then the failure row
    assert [r["handle"] for r in read_csv(out)] == ["someone_else"]


# --- offset-paginated lists that grow between runs ---

def _offset_case(w: World, command: str) -> tuple[str | list[str], str, set[str]]:
    """(input, key column, every key of the list) of one long offset-paginated list of the world."""
    if command in ("comments", "replies"):
        for i in range(w.config.users):
            if not public(w, i):
                continue
            for p in w.posts(i):
                comments = list(w.comments(p.video_id))
                if command == "comments" and 30 <= len(comments) <= 80:
                    return [p.video_id], "comment_id", {c.comment_id for c in comments}
                for c in comments if command == "replies" else ():
                    replies = list(w.replies(p.video_id, c.comment_id))
                    if 30 <= len(replies) <= 80:
                        return (["video_id,comment_id", f"{p.video_id},{c.comment_id}"], "comment_id",
                                {r.comment_id for r in replies})
    if command == "search-videos":
        return KEYWORD, "video_id", {p.video_id for p in w.search_videos(KEYWORD)}
    if command == "search-users":
        return KEYWORD, "user_id", {_u(w, i).user_id for i in w.search_users(KEYWORD)}
    if command == "search-challenges":
        return KEYWORD, "challenge_id", {ch.challenge_id for ch in w.search_challenges(KEYWORD)}
    if command == "music-posts":
        m = next(m for m in w.music_ids(400) if 30 <= len(w.music_posts(m)) <= 80)
        return [m], "video_id", {p.video_id for p in w.music_posts(m)}
    if command == "challenge-posts":
        cid = next(c for c in w.challenge_ids(400) if 30 <= len(w.challenge_posts(c)) <= 80)
        return [cid], "video_id", {p.video_id for p in w.challenge_posts(cid)}
    raise AssertionError(command)


@pytest.mark.parametrize("command", ["comments", "replies", "search-videos", "search-users", "search-challenges",
                                     "music-posts", "challenge-posts"])
async def test_an_offset_list_that_grows_between_runs_gives_no_row_twice(simulator: SimFactory, tmp_path: Path,
                                                                         command: str) -> None:
    """Stopped by --max-credits mid-walk, resumed after 10 new entries arrived at the list's head (rows move to
    later offsets): every row of the list exactly once."""
    async with simulator(world=WORLD) as sim:
        source, key, want = _offset_case(sim.world, command)
        out = tmp_path / "out.csv"
        settings = fast_settings(sim.url, parallelism=1, data_dir=str(tmp_path / "data"), max_credits=3)
        stopped = await crawl_once(settings, command, source, out, page_size=5)
        assert stopped.exit_code == 4 and stopped.summary.rows_total == 15
        sim.world.list_shift = 10
        done = await crawl_once(settings.replace(max_credits=1_000), command, source, out, page_size=5)
        assert done.exit_code == 0
    got = [r[key] for r in read_csv(out)]
    assert len(got) == len(set(got)) and set(got) == want


async def test_a_reply_walk_stopped_by_its_page_cap_is_a_failure_row_for_its_comment(simulator: SimFactory,
                                                                                    tmp_path: Path) -> None:
    """`comments --with-replies --max-pages 1`: each reply walk has its own cap; a comment whose replies go on
    gets its own pagination_guard row (VIDEO_ID,COMMENT_ID), and its first reply page is kept."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        post = next(p for i in range(w.config.users) if public(w, i) for p in w.posts(i)
                    if sum(1 for _ in w.comments(p.video_id)) > 20
                    and any(c.reply_total > 20 for c in list(w.comments(p.video_id))[:20]))
        first = list(w.comments(post.video_id))[:20]
        out = tmp_path / "out.csv"
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        outcome = await crawl_once(settings, "comments", [post.video_id], out, with_replies=True, max_pages=1,
                                   page_size=20)
        assert outcome.exit_code == 3
        want_failures = {post.video_id: "pagination_guard"}
        want_failures.update({f"{post.video_id},{c.comment_id}": "pagination_guard" for c in first
                              if c.reply_total > 20})
        assert read_failures(out) == want_failures
        want = {c.comment_id for c in first}
        want |= {r.comment_id for c in first for r in list(w.replies(post.video_id, c.comment_id))[:20]}
        got = [r["comment_id"] for r in read_csv(out)]
        assert len(got) == len(set(got)) and set(got) == want


async def test_failed_reply_walks_are_counted_in_items_failed(simulator: SimFactory, tmp_path: Path) -> None:
    """`comments --with-replies --max-pages 1` on a post whose comments fit one page but some of whose replies do
    not: the post is done, and each capped reply walk (a failures file row) is counted in items_failed."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        post = next(p for i in range(w.config.users) if public(w, i) for p in w.posts(i)
                    if 0 < len(list(w.comments(p.video_id))) <= 20
                    and any(c.reply_total > 20 for c in w.comments(p.video_id)))
        capped = [c for c in w.comments(post.video_id) if c.reply_total > 20]
        out = tmp_path / "out.csv"
        outcome = await crawl_once(fast_settings(sim.url, data_dir=str(tmp_path / "data")), "comments",
                                   [post.video_id], out, with_replies=True, max_pages=1, page_size=20)
    assert outcome.exit_code == 3
    assert read_failures(out) == {f"{post.video_id},{c.comment_id}": "pagination_guard" for c in capped}
    s = outcome.summary
    assert (s.items_done, s.items_failed, s.items_pending, s.failures_file) == (1, len(capped), 0, str(
        out.with_name("out.failures.csv"))), s


# --- page sizes: the most each list gives, caps learned from the answers ---

def _follow_case(w: World) -> tuple[list[int], list[str], set[tuple[str, str]]]:
    """Ten public users with 300-1,500 followers, and every (source_handle, follower id) row they give."""
    users = pick(w, lambda i: public(w, i) and 300 <= _u(w, i).followers <= 1_500, 10)
    handles = [w.handle(i) for i in users]
    rows = {(w.handle(i), w.user_id(f.user_index)) for i in users for f in w.followers(i)}
    return users, handles, rows


def _follow_rows(out: Path) -> list[tuple[str, str]]:
    return [(r["source_handle"], r["user_id"]) for r in read_csv(out)]


def _learned(data: Path) -> dict[str, int]:
    path = data / "page-sizes.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.parametrize("cap", [200, 50])
async def test_followers_are_asked_200_a_page_and_a_smaller_cap_costs_at_most_one_request_more(
        simulator: SimFactory, tmp_path: Path, cap: int) -> None:
    """Followers at the simulator's cap of 200 cost at most ceil(n/200) + 1 requests a user; at a cap of 50, no
    more than 50 a page always cost plus one, the cap is learned and kept in the data directory; rows exact."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        w.page_caps = {"followers": cap}
        users, handles, want = _follow_case(w)
        n = [sum(1 for _ in w.followers(i)) for i in users]
        outcome = await crawl_once(fast_settings(sim.url, data_dir=str(tmp_path / "data")), "followers", handles,
                                   tmp_path / "out.csv")
        assert outcome.exit_code == 0
        got = _follow_rows(tmp_path / "out.csv")
        assert len(got) == len(set(got)) and set(got) == want
        asked = sim.stats.by_endpoint["/user-followers"]
        if cap == 200:
            assert asked <= sum(math.ceil(k / 200) + 1 for k in n) and asked < sum(math.ceil(k / 50) for k in n)
            assert _learned(tmp_path / "data") == {}
        else:
            assert asked <= sum(math.ceil(k / 50) for k in n) + 1
            assert _learned(tmp_path / "data") == {"followers": 50}


async def test_a_rejected_page_size_costs_one_request_per_data_directory(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """An API that refuses counts above its cap: one refused request, then the documented default (50), kept
    in the data directory, so a second job asks no oversized count; rows exact."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        w.page_caps, w.reject_oversized = {"followers": 100}, True
        users, handles, want = _follow_case(w)
        n = [sum(1 for _ in w.followers(i)) for i in users]
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), parallelism=1)
        for out in ("a.csv", "b.csv"):
            outcome = await crawl_once(settings, "followers", handles, tmp_path / out)
            assert outcome.exit_code == 0
            got = _follow_rows(tmp_path / out)
            assert len(got) == len(set(got)) and set(got) == want
        assert sim.stats.by_endpoint["/user-followers"] == 2 * sum(math.ceil(k / 50) for k in n) + 1
        assert _learned(tmp_path / "data") == {"followers": 50}


async def test_pages_of_80_to_100_percent_of_the_count_leave_the_page_size_alone(simulator: SimFactory,
                                                                               tmp_path: Path) -> None:
    """An API that gives 80-100% of the count asked (short pages that are no cap): nothing is learned, rows
    exact."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        w.partial_pages = True
        _, handles, want = _follow_case(w)
        outcome = await crawl_once(fast_settings(sim.url, data_dir=str(tmp_path / "data")), "followers", handles,
                                   tmp_path / "out.csv")
        assert outcome.exit_code == 0
        got = _follow_rows(tmp_path / "out.csv")
        assert len(got) == len(set(got)) and set(got) == want
        assert _learned(tmp_path / "data") == {}


async def test_retry_failed_redoes_failed_reply_walks_only(simulator: SimFactory, tmp_path: Path) -> None:
    """Reply walks that ran out of retries are failure rows VIDEO_ID,COMMENT_ID; --retry-failed walks them
    again (their posts' comments are not fetched twice) and the job ends with every row exactly once."""
    async with simulator(world=WORLD) as healthy:
        w = healthy.world
        posts = [p for p in _posts_with_comments(w, 12)
                 if any(c.reply_total for c in w.comments(p.video_id))][:6]
    want = {c.comment_id for p in posts for c in w.comments(p.video_id)}
    want |= {r.comment_id for p in posts for c in w.comments(p.video_id) for r in w.replies(p.video_id, c.comment_id)}
    out = tmp_path / "out.csv"
    async with simulator(world=WORLD, fault_rate=0.3, faults=frozenset({"5xx"})) as flaky:
        settings = fast_settings(flaky.url, data_dir=str(tmp_path / "data"), retry_attempts=1, parallelism=1)
        first = await crawl_once(settings, "comments", [p.video_id for p in posts], out, with_replies=True)
        assert first.exit_code == 3
        failed = read_failures(out)
        assert any("," in key for key in failed) and set(failed.values()) == {"retries_exhausted"}
    async with simulator(world=WORLD) as sim:
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        job = JobOptions(command="comments", input=str(out.with_name("out.input.txt")), output=str(out),
                         with_replies=True)
        again = await run_job(Crawl(job, settings, api_key=KEY, retry_failed=True), install_signals=False)
        assert again.exit_code == 0 and not read_failures(out)
        # One comment page (at most 25 comments) for each post that failed itself; none for the others.
        assert sim.stats.by_endpoint["/post-comments"] == sum(1 for key in failed if "," not in key)
    got = [r["comment_id"] for r in read_csv(out)]
    assert len(got) == len(set(got)) and set(got) == want
