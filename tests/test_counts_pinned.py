"""Exact profile counts (`statsV2` over the display-rounded `stats`, `userInfo`-wrapped profiles) and pinned posts
heading a profile's list, flagged or not (api-reference §5.1). Expected values come from the simulator's world."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from crawler.api.client import Client
from crawler.api.parse import parse_profile, parse_user_hit
from crawler.api.pinned import mark_pinned, unsure
from crawler.api.records import Post
from crawler.sim.data import World, WorldConfig
from crawler.sim.render import display_count
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_ingest import posts_union, rows, run, write_watch

# --- pinned posts on hand-made pages ---

def _post(n: int, t: int, top: bool = False) -> Post:
    return Post(video_id=str(7_000_000_000_000_000_000 + n), source_handle="a", create_time=t, region="", title="",
                play_count=0, digg_count=0, comment_count=0, share_count=0, collect_count=0, author_id="",
                author_handle="", music_id="", pinned=top)


def _marked(times: list[int], flagged: frozenset[int] = frozenset()) -> list[bool]:
    return [p.pinned for p in mark_pinned([_post(k, t, k in flagged) for k, t in enumerate(times)])]


def test_unflagged_pinned_posts_are_told_by_their_place_in_the_order() -> None:
    """Leading posts older than a later post on the page are pinned (up to three); the newest-first rest is not."""
    assert _marked([100, 900, 800, 700]) == [True, False, False, False]
    assert _marked([100, 50, 300, 900, 800]) == [True, True, True, False, False]
    assert _marked([900, 800, 700, 600]) == [False] * 4


def test_a_pinned_post_newest_anyway_stays_unmarked_and_flags_are_kept() -> None:
    """A pinned post newer than all after it is left as it is (harmless); `is_top` flags are kept anywhere."""
    assert _marked([950, 100, 900, 800]) == [False, True, False, False]
    assert _marked([950, 100, 900, 800], frozenset({0})) == [True, True, False, False]
    assert _marked([900, 800, 700, 600, 650]) == [False] * 5  # out of order beyond three: not a pinned post
    assert _marked([900, 800, 700, 600], frozenset({3})) == [False, False, False, True]


def test_a_first_page_too_short_to_tell_is_unsure() -> None:
    """A first page of at most three posts with more to come may be all pinned; a longer or last one is not."""
    posts = [_post(0, 100), _post(1, 900)]
    assert unsure(posts, more=True)
    assert not unsure(posts, more=False)
    assert not unsure([_post(k, 900 - k) for k in range(4)], more=True)
    assert not unsure([_post(0, 100, True), _post(1, 50, True)], more=True)  # all flagged: nothing to tell


# --- counts on hand-made bodies ---

def test_statsv2_wins_per_count_and_a_bad_string_falls_back() -> None:
    """`statsV2` (strings) is preferred per count; a missing or non-numeric one falls back to `stats`."""
    user = {"id": "1", "uniqueId": "a"}
    body = {"user": user, "stats": {"followerCount": 427700, "heartCount": 1400000, "videoCount": 12},
            "statsV2": {"followerCount": "427682", "heart": "1412345", "videoCount": "1.2K"}}
    p = parse_profile(body)
    assert (p.followers, p.hearts, p.videos) == (427682, 1412345, 12)
    nested = parse_profile({"user": user | {"stats": {"followerCount": 207900},
                                            "statsV2": {"followerCount": "207912"}}})
    assert nested.followers == 207912
    wrapped = parse_profile({"userInfo": {"user": user, "stats": {"followerCount": 207900, "followingCount": 3}}})
    assert (wrapped.followers, wrapped.following) == (207900, 3)
    hit = parse_user_hit({"user": user, "stats": {"followerCount": 1400000}, "statsV2": {"followerCount": "1412345"}},
                         "kw")
    assert hit.followers == 1412345


# --- counts over HTTP ---

COUNTS_WORLD = WorldConfig(seed=41, users=3_000, missing_fraction=0.0)


def _large(w: World) -> list[int]:
    """Users whose `stats` the API rounds (followers >= 10,000): both wrapped and unwrapped profiles."""
    found = [i for i in range(w.config.users) if (u := w.user(i)) is not None and u.followers >= 10_000]
    assert any(w.profile_wrapped(i) for i in found) and any(not w.profile_wrapped(i) for i in found)
    assert any(display_count(w.user(i).followers) != w.user(i).followers for i in found)  # type: ignore[union-attr]
    return found


@pytest.mark.parametrize("quirks", [False, True])
async def test_profiles_give_the_exact_counts_of_statsv2(simulator: SimFactory, quirks: bool) -> None:
    """Large accounts' profiles, wrapped in `userInfo` or not, every stats placement: the world's exact counts."""
    async with simulator(world=COUNTS_WORLD, quirks=quirks) as sim:
        w = sim.world
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            for i in _large(w) + [i for i in range(40) if w.profile_wrapped(i)]:
                u = w.user(i)
                assert u is not None
                p = await client.user_info(u.handle)
                assert (p.followers, p.following, p.hearts, p.videos, p.likes) == (
                    u.followers, u.following, u.hearts, u.videos, u.digg_count), (i, w.profile_wrapped(i))


async def test_rounded_only_profiles_give_the_rounded_counts(simulator: SimFactory) -> None:
    """With `rounded_only` (no statsV2) a profile gives the display-rounded counts, wrapped profiles too."""
    async with simulator(world=COUNTS_WORLD, rounded_only=True) as sim:
        w = sim.world
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            for i in _large(w):
                u = w.user(i)
                assert u is not None
                p = await client.user_info(user_id=u.user_id)
                assert (p.followers, p.hearts) == (display_count(u.followers), display_count(u.hearts)), i


# --- pinned posts over five nights of ingest ---

PINNED_WORLD = WorldConfig(seed=41, users=3_000, missing_fraction=0.0, private_fraction=0.0, pinned_fraction=1.0)


def _pinned_watch(w: World) -> list[int]:
    """Three users per `is_top` style (1, 0, absent) with pinned posts, 10-80 posts and new posts within 4 nights;
    in each style first one with 3 pinned posts and 2 new ones in a night (beyond a page of 4 behind 3 pinned)."""
    probe = World(w.config)
    videos: dict[int, list[int]] = {}
    for d in range(5):
        probe.day = d
        for i in range(w.config.users):
            u = probe.user(i)
            videos.setdefault(i, []).append(0 if u is None else u.videos)
    picked: dict[int | None, list[int]] = {1: [], 0: [], None: []}
    for wants_burst in (True, False):
        for i in range(w.config.users):
            n, pins = videos[i], w.pinned(i)
            burst = len(pins) == 3 and max(b - a for a, b in itertools.pairwise(n)) >= 2
            if not pins or not 10 <= n[0] <= 80 or n[4] - n[0] < 2 or (wants_burst and not burst):
                continue
            group = picked[w.pin_flag(i)]
            if len(group) < (1 if wants_burst else 3) and i not in group:
                group.append(i)
    watch = [i for group in picked.values() for i in group]
    assert len(watch) == 9, picked
    return watch


@pytest.mark.parametrize("page_size", [None, 4, 3])
async def test_ingest_with_pinned_posts_stores_every_post_once_across_five_nights(
        simulator: SimFactory, tmp_path: Path, page_size: int | None) -> None:
    """Users whose list starts with 1-3 old pinned posts, flagged or not, new posts between nights: after each of
    five nights the day files hold exactly the world's posts, each once. Page size 4: three pinned posts and one
    other on the first page, new posts behind it; page size 3: a first page of pinned posts only."""
    async with simulator(world=PINNED_WORLD) as sim:
        w = sim.world
        watch = _pinned_watch(w)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"),
                                 page_size=page_size)
        detectable: set[str] = set()  # pinned posts older than a newer post of their user's on night 0
        for i in watch:
            posts = list(w.posts(i))[:35]  # the first page
            detectable |= {p.video_id for k, p in enumerate(posts[:len(w.pinned(i))])
                           if p.create_time < max(q.create_time for q in posts[k + 1:])}
        for d in range(5):
            if d:
                sim.advance_day()
            result = await run(tmp_path, settings, d)
            assert result.exit_code == 0, result.outcomes
            got = posts_union(tmp_path / "out")
            want = {p.video_id for i in watch for p in w.posts(i)}
            assert set(got) == want, (d, len(want - set(got)), len(set(got) - want))
            assert max(got.values()) == 1
        if page_size is None:  # a first page long enough to tell: every out-of-order pinned post is marked
            pinned = {r["video_id"] for p in sorted((tmp_path / "out").glob("posts-*.csv"))
                      if not p.name.endswith(".failures.csv") for r in rows(p) if r["pinned"] == "true"}
            flagged = {p.video_id for i in watch if w.pin_flag(i) == 1 for p in list(w.posts(i))[:len(w.pinned(i))]}
            assert pinned == detectable | flagged


def test_the_world_lists_pinned_posts_first_and_keeps_its_set_of_posts() -> None:
    """Pinning moves posts to the head of the list, nothing else: the same posts as with no pinning."""
    pinned, plain = World(PINNED_WORLD), World(dataclasses.replace(PINNED_WORLD, pinned_fraction=0.0))
    for world in (pinned, plain):
        world.advance(3)
    users = [i for i in range(300) if pinned.pinned(i)]
    assert users
    for i in users:
        listed = [p.video_id for p in pinned.posts(i)]
        assert sorted(listed) == sorted(p.video_id for p in plain.posts(i))
        assert listed[len(pinned.pinned(i)):] == [p.video_id for p in plain.posts(i) if p.video_id not in
                                                   listed[:len(pinned.pinned(i))]]
