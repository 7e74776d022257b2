"""`crawler estimate` against what the simulator bills: job commands, replies from a comments CSV, tonight's ingest
and a download of expired URLs, each within 10% and with its time at the key's rate; the ETA counts requests.

Expected credits are the simulator's billed counts (`sim.stats.billed`), never the crawler's own.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import re
from pathlib import Path

import pytest

from crawler.engine.stats import ProgressReporter, Snapshot
from crawler.jobs.commands import COMMANDS
from crawler.jobs.estimate import requests_left
from crawler.options import JobLimits
from crawler.runs.ingest import TEST_NOW_ENV
from crawler.sim.data import WorldConfig
from crawler.sim.media import MediaConfig
from crawler.sim.server import Simulator
from crawler.stores.users import UserDirectory
from tests.conftest import SimFactory
from tests.test_cli import FAST_TOML, crawler, environ, public_users

WORLD = WorldConfig(seed=11, users=1_000)
RATE = ["--rate", "200", "--window", "60"]  # the key's pace the time line is stated at


def setup(tmp: Path, lines: list[str]) -> None:
    (tmp / "fast.toml").write_text(FAST_TOML)
    (tmp / "in.txt").write_text("\n".join(lines) + "\n")


def predicted(out: str) -> int:
    """The expected credits an estimate printed (the low end of a range)."""
    m = re.search(r"expected credits_billed: (?:at least )?([\d,]+)", out)
    assert m, out
    return int(m.group(1).replace(",", ""))


def minutes(out: str) -> str:
    """The time line an estimate printed."""
    m = re.search(r"^time: .*$", out, re.M)
    assert m, out
    return m.group(0)


def billed(sim: Simulator) -> int:
    return sum(sim.stats.billed.values())


def near(estimate: int, actual: int) -> bool:
    print("estimated", estimate, "billed", actual)
    return abs(estimate - actual) <= 0.1 * actual


async def run_and_bill(sim: Simulator, args: list[str], tmp: Path, *, codes: tuple[int, ...] = (0,),
                       env: dict[str, str] | None = None) -> int:
    """Run a crawler command; the credits the simulator billed for it."""
    before = billed(sim)
    code, _, err = await crawler(args, env or environ(sim), tmp)
    assert code in codes, err
    return billed(sim) - before


async def estimated(sim: Simulator, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> str:
    """`crawler estimate ARGS` at the default pace, 200 per 60 s (the runs go unpaced, with fast.toml)."""
    code, out, err = await crawler(["estimate", *args, *RATE], env or environ(sim), tmp)
    assert code == 0, err
    return out


@pytest.mark.slow
async def test_profiles_posts_and_followers_estimates_are_within_ten_percent_and_timed(
        simulator: SimFactory, tmp_path: Path) -> None:
    """After a profiles run, `estimate` of profiles, posts and followers is within 10% of what each job bills and
    states its time at the key's rate (2,000 profiles: ≈ 10 min at 200 per 60 s)."""
    async with simulator(world=WORLD) as sim:
        # Follower counts the 1,000-user world can hold (its lists stop at its size, as TikTok's stop near 5,000).
        users = [i for i in public_users(sim.world, 60, max_videos=200)
                 if sim.world.user(i).followers < 600][:25]  # type: ignore[union-attr]
        setup(tmp_path, [sim.world.handle(i) for i in users])
        common = ["--config", "fast.toml", "--data-dir", "d"]
        out = await estimated(sim, ["profiles", "in.txt", "--data-dir", "d"], tmp_path)
        assert minutes(out) == "time: ≈ 8 s at 200 per 60 s", out
        spent = await run_and_bill(sim, ["profiles", "in.txt", "-o", "p.csv", "-q", *common], tmp_path)
        assert near(predicted(out), spent), (out, spent)
        for command in ("posts", "followers"):
            out = await estimated(sim, [command, "in.txt", "--data-dir", "d"], tmp_path)
            spent = await run_and_bill(sim, [command, "in.txt", "-o", f"{command}.csv", "-q", *common], tmp_path)
            assert near(predicted(out), spent), (command, out, spent)
            assert minutes(out).startswith("time: ≈ ") and "at 200 per 60 s" in out
        (tmp_path / "many.txt").write_text("".join(f"user{i}\n" for i in range(2000)))
        out = await estimated(sim, ["profiles", "many.txt", "--data-dir", "d"], tmp_path)
        assert minutes(out) == "time: ≈ 10 min at 200 per 60 s", out


@pytest.mark.slow
async def test_replies_from_a_comments_csv_are_estimated_by_reply_total(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """`estimate replies comments.csv` and `estimate comments comments.csv --with-replies` price each comment's walk
    by its reply_total, within 10% of what the jobs bill; on bare ids the replies are stated unknown, as a range."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        user = public_users(w, 1, min_videos=8, max_videos=40)[0]
        posts = [p.video_id for p in w.posts(user)][:6]
        setup(tmp_path, posts)
        common = ["--config", "fast.toml", "--data-dir", "d"]
        out = await estimated(sim, ["comments", "in.txt", "--with-replies", "--data-dir", "d"], tmp_path)
        assert "replies (--with-replies)     unknown: 0 to about" in out, out
        assert re.search(r"^time: at least .* to .* at 200 per 60 s$", out, re.M) or " to " in minutes(out), out
        # A posts CSV tells each post's comment_count: the comments job is priced exactly from it.
        await run_and_bill(sim, ["post-details", "in.txt", "-o", "posts.csv", "-q", *common], tmp_path)
        out = await estimated(sim, ["comments", "posts.csv", "--column", "video_id", "--data-dir", "d"], tmp_path)
        spent = await run_and_bill(sim, ["comments", "in.txt", "-o", "comments.csv", "-q", *common], tmp_path)
        assert near(predicted(out), spent) and "at least" not in out, (out, spent)
        with (tmp_path / "comments.csv").open(encoding="utf-8", newline="") as fh:
            replies = sum(int(r["reply_total"] or 0) for r in csv.DictReader(fh))
        assert replies > 100  # enough replies that pages, not comments, make the cost
        # Small pages: the cost follows each comment's reply_total, not the number of comments.
        out = await estimated(sim, ["replies", "comments.csv", "--data-dir", "d", "--page-size", "10"], tmp_path)
        spent = await run_and_bill(sim, ["replies", "comments.csv", "-o", "replies.csv", "-q", "--page-size", "10",
                                         *common], tmp_path)
        assert near(predicted(out), spent), (out, spent)
        assert "at least" not in out
        # The comments job with its replies, priced from the same comments CSV (its video_id column).
        out = await estimated(sim, ["comments", "comments.csv", "--column", "video_id", "--with-replies",
                                    "--data-dir", "d", "--page-size", "10"], tmp_path)
        spent = await run_and_bill(sim, ["comments", "in.txt", "--with-replies", "-o", "threads.csv", "-q",
                                         "--page-size", "10", *common], tmp_path)
        assert near(predicted(out), spent), (out, spent)
        assert "reply pages (reply_total)" in out and "unknown" not in out, out


@pytest.mark.slow
async def test_ingest_with_posts_on_a_second_night_is_estimated_within_ten_percent(simulator: SimFactory,
                                                                                   tmp_path: Path) -> None:
    """`estimate ingest --posts` the second night (profiles + the walks down to the watermark) is within 10% of
    what that night's ingest bills; the first night, from the data directory's counts, too."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 30, min_videos=1, max_videos=120)
        setup(tmp_path, [w.handle(i) for i in watch])
        common = ["--history-url", "history.db", "--data-dir", "d"]
        run = ["ingest", "in.txt", "--out-dir", "out", "--posts", "-q", "--config", "fast.toml", *common]
        night1 = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        await run_and_bill(sim, ["profiles", "in.txt", "-o", "p.csv", "-q", "--config", "fast.toml", "--data-dir", "d"],
                           tmp_path)
        out = await estimated(sim, ["ingest", "in.txt", "--posts", *common], tmp_path, night1)
        spent = await run_and_bill(sim, run, tmp_path, env=night1)
        assert near(predicted(out), spent), (out, spent)
        sim.advance_day()
        night2 = environ(sim) | {TEST_NOW_ENV: "2026-01-02T03:00:00"}
        out = await estimated(sim, ["ingest", "in.txt", "--posts", *common], tmp_path, night2)
        assert "posts pages down to the watermark" in out and "at 200 per 60 s" in out, out
        spent = await run_and_bill(sim, run, tmp_path, env=night2)
        assert near(predicted(out), spent), (out, spent)
        out = await estimated(sim, ["ingest", "in.txt", "--posts", *common], tmp_path, night2)
        assert predicted(out) == 0, out  # everything done tonight


@pytest.mark.slow
async def test_ingest_cut_by_max_pages_is_estimated_as_ingest_cuts_it(simulator: SimFactory, tmp_path: Path) -> None:
    """`estimate ingest --posts --max-pages 1` the first night prices each first walk at one page, as the ingest
    with the same flag walks it: within 10% of what it bills (users with several pages of posts each)."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 12, min_videos=80, max_videos=200)
        setup(tmp_path, [w.handle(i) for i in watch])
        common = ["--history-url", "history.db", "--data-dir", "d", "--max-pages", "1"]
        night = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        await run_and_bill(sim, ["profiles", "in.txt", "-o", "p.csv", "-q", "--config", "fast.toml", "--data-dir", "d"],
                           tmp_path)
        out = await estimated(sim, ["ingest", "in.txt", "--posts", *common], tmp_path, night)
        spent = await run_and_bill(sim, ["ingest", "in.txt", "--out-dir", "out", "--posts", "-q", "--config",
                                         "fast.toml", *common], tmp_path, env=night)
        assert spent <= 3 * len(watch)  # a profile and one page each (the cap holds)
        assert near(predicted(out), spent), (out, spent)


@pytest.mark.slow
async def test_download_of_expired_urls_is_estimated_as_one_renewal_a_post(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """A posts CSV whose media URLs expired: `estimate download` counts one /post-detail/ renewal per video post
    (photo posts skipped), within 10% of what the download bills; fresh URLs cost nothing."""
    async with simulator(world=WORLD, media=MediaConfig(ttl=3600)) as sim:
        users = public_users(sim.world, 3, min_videos=5, max_videos=15)
        setup(tmp_path, [sim.world.handle(i) for i in users])
        common = ["--config", "fast.toml", "--data-dir", "d"]
        await run_and_bill(sim, ["posts", "in.txt", "-o", "fresh.csv", "-q", *common], tmp_path)
        out = await estimated(sim, ["download", "fresh.csv", "--what", "video"], tmp_path)
        assert predicted(out) == 0, out
        sim.media.config = dataclasses.replace(sim.media.config, ttl=-60)  # URLs signed now are already stale
        await run_and_bill(sim, ["posts", "in.txt", "-o", "posts.csv", "-q", *common], tmp_path)
        sim.media.config = dataclasses.replace(sim.media.config, ttl=3600)  # renewals get URLs that work
        out = await estimated(sim, ["download", "posts.csv", "--what", "video"], tmp_path)
        spent = await run_and_bill(sim, ["download", "posts.csv", "-o", "media", "--what", "video", "-q", "--config",
                                         "fast.toml"], tmp_path)
        assert spent > 0 and near(predicted(out), spent), (out, spent)
        assert "at 200 per 60 s" in out


def test_the_eta_counts_requests_so_it_does_not_grow_while_items_stand_still() -> None:
    """A long walk: 5 of 8 items done, then only pages move; the ETA (from the requests left, 300 pages estimated)
    falls as the requests go on instead of growing with the time the items stand still."""
    now = [0.0]
    state = {"done": 0, "requests": 0}

    def snap() -> Snapshot:
        return Snapshot(done=state["done"], total=8, rows=0, requests=state["requests"], credits=state["requests"],
                        requests_left=320 - state["requests"])

    reporter = ProgressReporter("followers", snap, clock=lambda: now[0], quiet=True)
    reporter.line()  # the first snapshot: rates count from here
    etas = []
    for second in range(1, 100):
        now[0] = float(second)
        state["requests"] = 3 * second
        state["done"] = min(5, second)  # five quick items, then one long walk
        m = re.search(r"ETA (\d+):(\d\d):(\d\d)", reporter.line())
        assert m
        h, mi, s = (int(g) for g in m.groups())
        etas.append(h * 3600 + mi * 60 + s)
    assert all(b <= a for a, b in itertools.pairwise(etas)), etas
    assert etas[-1] < 10  # 23 requests left at 3 a second


def test_a_runs_requests_left_are_its_pending_walks_pages_left(tmp_path: Path) -> None:
    """The local crawl's ETA counts from `requests_left`: each pending walk's pages from the known counts less the
    pages it already walked, one at least for a walk of unknown length, a /userid/ lookup for an unknown handle."""
    users = UserDirectory(tmp_path / "users.db")
    try:
        users.learn("big", "1", videos=0, followers=1000, following=0, private=False)
        users.learn("small", "2", videos=0, followers=10, following=0, private=False)
        limits = JobLimits(max_pages=None, page_size=None, max_items=None, max_credits=None)
        pending = [("big", 2), ("small", 0), ("stranger", 0)]
        # big: 5 pages of 200, 2 walked; small: 1 page; stranger: a lookup and a page at least
        assert requests_left(COMMANDS["followers"], pending, users, 200, limits) == 3 + 1 + 2
        assert requests_left(COMMANDS["profiles"], pending, users, 0, limits) == 3
    finally:
        users.close()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize(("args", "said"), [
    (["estimate", "posts", "missing.txt"], "input file missing.txt does not exist"),
    (["estimate", "profiles", "in.csv", "--column", "nope"], "--column nope: no such column"),
    (["estimate", "replies", "in.csv"], "replies needs a CSV with video_id and comment_id columns"),
    (["estimate", "posts", "in.csv", "--max-items", "-3"], "--max-items: invalid value '-3'"),
    (["estimate", "ingest", "missing.txt"], "input file missing.txt does not exist"),
    (["estimate", "ingest", "in.csv", "--column", "nope"], "--column nope: no such column"),
    (["estimate", "download", "missing.txt"], "missing.txt"),
    (["status", "missing.csv"], "no job state for missing.csv"),
])
@pytest.mark.parametrize("data_dir", [None, "fresh/d"])
async def test_a_usage_error_leaves_no_data_directory_or_file_behind(tmp_path: Path, args: list[str], said: str,
                                                                      data_dir: str | None) -> None:
    """A read-only command ending in a usage error (a missing input, a bad column or flag value) is exit 2 with one
    line and creates nothing: no data directory (the default `.crawler` or `--data-dir`), no file."""
    (tmp_path / "in.csv").write_text("handle,video_id\nalice,7100000000000000001\n")
    before = _tree(tmp_path)
    more = ["--data-dir", data_dir] if data_dir and args[0] == "estimate" else []
    code, out, err = await crawler([*args, *more], environ(None), tmp_path)
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("crawler: ") and said in err, err
    assert _tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("job", ["posts", "ingest"])
async def test_an_estimate_writes_nothing(tmp_path: Path, job: str) -> None:
    """`estimate` only reads: on a fresh directory it prices the input and leaves no data directory behind."""
    (tmp_path / "in.txt").write_text("alice\nbob\n")
    code, out, err = await crawler(["estimate", job, "in.txt", "--data-dir", "fresh/d"], environ(None), tmp_path)
    assert code == 0 and "expected credits_billed: " in out, err
    assert _tree(tmp_path) == {"in.txt"}
