"""Tests of the TikLiveAPI simulator over real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crawler.sim.data import User, World, WorldConfig
from crawler.sim.server import MSG_BAD_KEY, MSG_BALANCE, MSG_NO_KEY, MSG_RATE, SimConfig, Simulator

KEY = "sim-key"
SMALL = WorldConfig(users=2000)


def cfg(world: WorldConfig = SMALL, **kw: Any) -> SimConfig:
    """A SimConfig whose rate limits stay out of the way of tests that are not about them."""
    return SimConfig(world=world, **({"rate_limit": 100_000, "burst_limit": 100_000} | kw))


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def serve(config: SimConfig | None = None, clock: FakeClock | None = None
                ) -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    async with (Simulator(config or cfg(), clock=clock) as sim,
                aiohttp.ClientSession(sim.url) as http):
        yield sim, http


async def get(http: aiohttp.ClientSession, path: str, key: str | None = KEY, **params: Any
              ) -> tuple[int, Any]:
    headers = {"X-Api-Key": key} if key is not None else {}
    async with http.get(path, params={k: str(v) for k, v in params.items()}, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def exact_counts(info: dict[str, Any]) -> dict[str, int]:
    """A user-info body's exact counts: its `statsV2` (strings) at the top level, in `user` or in `userInfo`."""
    wrapped = info.get("userInfo", {})
    v2 = info.get("statsV2") or info.get("user", {}).get("statsV2") or wrapped.get("statsV2")
    return {k: int(v) for k, v in v2.items()}


def find_user(world: World, pred: Callable[[User], bool], *, normal: bool = True) -> User:
    for i in range(world.config.users):
        u = world.user(i)
        if u is not None and not u.private and (not normal or not world.is_pathological(i)) and pred(u):
            return u
    raise AssertionError("no user in the test world matches")


async def test_missing_key_is_told_to_sign_up() -> None:
    """A request without X-Api-Key gets the sign-up message with HTTP 200 and is not billed."""
    async with serve() as (sim, http):
        assert await get(http, "/region-list/", key=None) == (200, {"message": MSG_NO_KEY})
        assert sim.stats.billed[KEY] == 0


async def test_unknown_key_is_rejected() -> None:
    """An unknown key gets the 'not available' message with HTTP 200 and is not billed."""
    async with serve() as (sim, http):
        assert await get(http, "/region-list/", key="nope") == (200, {"message": MSG_BAD_KEY})
        assert sum(sim.stats.billed.values()) == 0


@pytest.mark.parametrize("retry_after", [None, 0.5])
async def test_rate_window_answers_429_beyond_the_limit(retry_after: float | None) -> None:
    """With 5 per 1 s, 8 rapid requests give 5 answers and 3 x 429, Retry-After only when configured."""
    clock = FakeClock()
    config = SimConfig(world=SMALL, rate_limit=5, rate_window=1.0, retry_after=retry_after)
    async with serve(config, clock) as (sim, http):
        statuses, headers = [], []
        for _ in range(8):
            async with http.get("/region-list/", headers={"X-Api-Key": KEY}) as resp:
                statuses.append(resp.status)
                headers.append(resp.headers.get("Retry-After"))
                if resp.status == 429:
                    assert await resp.json() == {"message": MSG_RATE}
        assert statuses == [200] * 5 + [429] * 3
        assert headers[5:] == [None if retry_after is None else "0.5"] * 3
        assert (sim.stats.served_429, sim.stats.max_in_window, sim.stats.billed[KEY]) == (3, 8, 5)
        clock.now += 1.0  # the window rolls: the first five have left it
        assert (await get(http, "/region-list/"))[0] == 200


async def test_burst_limit_answers_429_within_one_second() -> None:
    """More than burst_limit arrivals within one second are refused even under the window limit."""
    clock = FakeClock()
    async with serve(SimConfig(world=SMALL, burst_limit=3), clock) as (sim, http):
        statuses = [(await get(http, "/region-list/"))[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        assert sim.stats.max_in_second == 5
        clock.now += 1.0
        assert (await get(http, "/region-list/"))[0] == 200


async def test_always_429_refuses_everything() -> None:
    """always_429 answers every API request with 429 and bills nothing."""
    async with serve(SimConfig(world=SMALL, always_429=True)) as (sim, http):
        assert [(await get(http, "/region-list/"))[0] for _ in range(3)] == [429] * 3
        assert sim.stats.billed[KEY] == 0


async def test_balance_exhaustion_topup_and_billing_rule() -> None:
    """Successes and status-error answers are billed; key errors and the exhausted-balance message are not."""
    async with serve(cfg(keys={"k": 3})) as (sim, http):
        assert (await get(http, "/region-list/", key="k"))[0] == 200
        assert (await get(http, "/userid/", key="k", username="nobody_here"))[1]["status"] == "error"
        assert (await get(http, "/userid/", key="k"))[1] == {"status": "error",
                                                              "message": "Missing parameter: username"}
        assert sim.balance("k") == 0
        assert await get(http, "/region-list/", key="k") == (200, {"message": MSG_BALANCE})
        await get(http, "/region-list/", key=None)
        await get(http, "/region-list/", key="other")
        assert (sim.stats.billed["k"], sim.balance("k")) == (3, 0)
        async with http.post("/__sim/topup", params={"key": "k", "credits": "2"}) as resp:
            assert (await resp.json())["balance"] == 2
        assert (await get(http, "/region-list/", key="k"))[1]["US"] == "United States"
        assert (sim.stats.billed["k"], sim.balance("k")) == (4, 1)


@pytest.mark.parametrize("kind", ["5xx", "drop", "truncated", "malformed", "slow"])
async def test_each_fault_kind_appears_and_bills_per_contract(kind: str) -> None:
    """At fault_rate 1 a single fault kind shows; only the 200-status faults are billed."""
    config = cfg(keys={"k": 10}, fault_rate=1.0, faults=frozenset({kind}),
                       slow_seconds=0.01)
    async with serve(config) as (sim, http):
        if kind == "drop":
            with pytest.raises(aiohttp.ClientConnectionError):
                await get(http, "/region-list/", key="k")
        else:
            status, body = await get(http, "/region-list/", key="k")
            expected = {"5xx": {500, 502, 503}, "slow": {504}, "truncated": {200}, "malformed": {200}}
            assert status in expected[kind]
            assert isinstance(body, str)  # not JSON
            if kind == "malformed":
                assert body.startswith("<!DOCTYPE html>")
        # aiohttp (3.11+) silently resends a GET once after a disconnect, so a drop may be seen twice.
        assert sim.stats.faults == {kind: sim.stats.by_endpoint["/region-list"]}
        billed = 1 if kind in ("truncated", "malformed") else 0
        assert (sim.stats.billed["k"], sim.balance("k")) == (billed, 10 - billed)


async def test_fault_draws_are_deterministic_whatever_the_order() -> None:
    """Fault decisions depend on the request and how often it was seen, not on concurrency order."""
    config = cfg(fault_rate=0.5, faults=frozenset({"5xx"}), seed=7)
    requests = [("/userid/", {"username": h}) for h in World(SMALL).sample_handles(10)] * 3
    async with serve(config) as (_, http):
        together = await asyncio.gather(*(get(http, p, **q) for p, q in requests))
    async with serve(config) as (_, http):
        one_by_one = [await get(http, p, **q) for p, q in requests]
    assert [s for s, _ in together] == [s for s, _ in one_by_one]
    assert {s for s, _ in together} >= {200} and len({s for s, _ in together}) > 1
    # A retry of the same request draws afresh: some request both failed and succeeded.
    outcomes: dict[str, set[int]] = {}
    for (_, q), (status, _) in zip(requests, one_by_one, strict=True):
        outcomes.setdefault(q["username"], set()).add(status == 200)
    assert any(len(v) == 2 for v in outcomes.values())


async def test_same_seed_gives_the_same_body() -> None:
    """Two simulators with one seed answer one request with identical bytes, quirks included."""
    config = cfg(quirks=True, seed=3)
    user = find_user(World(SMALL), lambda u: u.videos > 3)
    bodies = []
    for _ in range(2):
        async with serve(config) as (_, http):
            bodies.append([await get(http, "/user-posts/", userid=user.user_id, count=3),
                           await get(http, "/userinfo-by-id/", userid=user.user_id)])
    # Media URLs name each instance's own media port and are signed at request time: compare the rest.
    same = [re.sub(r"http://127\.0\.0\.1:\d+(/m/[^?\"]+)\?e=\d+&s=[0-9a-f]+", r"MEDIA\1", json.dumps(b))
            for b in bodies]
    assert "MEDIA/m/play/" in same[0]
    assert same[0] == same[1]


async def test_posts_walk_reproduces_world_posts() -> None:
    """Walking /user-posts/ by cursor yields exactly World.posts, newest first, then hasMore false."""
    async with serve() as (sim, http):
        user = find_user(sim.world, lambda u: 70 < u.videos < 400)
        ids, cursor, pages = [], "0", 0
        while True:
            status, body = await get(http, "/user-posts/", userid=user.user_id, count=30, cursor=cursor)
            assert status == 200 and isinstance(body["cursor"], str)
            ids += [v["video_id"] for v in body["videos"]]
            cursor, pages = body["cursor"], pages + 1
            if not body["hasMore"]:
                break
        assert ids == [p.video_id for p in sim.world.posts(user.index)]
        assert len(set(ids)) == len(ids) == user.videos and pages == -(-user.videos // 30)


async def test_page_size_is_clamped_to_the_cap() -> None:
    """A count above the cap returns the cap (35 posts, 200 followers)."""
    async with serve() as (sim, http):
        user = find_user(sim.world, lambda u: u.videos > 40 and u.followers > 250)
        assert len((await get(http, "/user-posts/", userid=user.user_id, count=100))[1]["videos"]) == 35
        body = (await get(http, "/user-followers/", userid=user.user_id, count=999))[1]
        assert len(body["followers"]) == 200


async def test_followers_walk_reproduces_world_and_ends_near_the_cap() -> None:
    """Walking /user-followers/ by time yields exactly World.followers and stops near follow_cap."""
    config = cfg(WorldConfig(users=2000, follow_cap=300))
    async with serve(config) as (sim, http):
        for user in (find_user(sim.world, lambda u: 60 < u.followers < 250),
                     find_user(sim.world, lambda u: u.followers > 1000)):
            ids, t = [], 0
            while True:
                body = (await get(http, "/user-followers/", userid=user.user_id, count=50, time=t))[1]
                assert body["total"] == user.followers
                ids += [f["id"] for f in body["followers"]]
                t = body["time"]
                if not body["hasMore"]:
                    break
            expected = [sim.world.user_id(f.user_index) for f in sim.world.followers(user.index)]
            assert ids == expected and len(set(ids)) == len(ids) <= 300


async def test_following_and_liked_walks_reproduce_world() -> None:
    """/user-following/ and /user-liked/ walks yield exactly World.following and World.liked."""
    async with serve() as (sim, http):
        user = find_user(sim.world, lambda u: 60 < u.following < 400 and 10 < u.digg_count < 200)
        ids, t, more = [], 0, True
        while more:
            body = (await get(http, "/user-following/", userid=user.user_id, count=50, time=t))[1]
            ids += [f["id"] for f in body["followings"]]
            t, more = body["time"], body["hasMore"]
        assert ids == [sim.world.user_id(f.user_index) for f in sim.world.following(user.index)]
        vids, cursor, more = [], "0", True
        while more:
            body = (await get(http, "/user-liked/", userid=user.user_id, count=7, cursor=cursor))[1]
            vids += [v["video_id"] for v in body["videos"]]
            cursor, more = body["cursor"], body["hasMore"]
        assert vids == [p.video_id for p in sim.world.liked(user.index)] and len(set(vids)) == len(vids)


async def test_comment_and_reply_walks_reproduce_world() -> None:
    """Walking comments and replies by offset yields exactly World.comments / World.replies."""
    async with serve() as (sim, http):
        post = next(p for i in range(500) for p in sim.world.posts(i)
                    if 60 < p.comment_count < 300 and not sim.world.is_private(p.author_index))
        url = f"https://www.tiktok.com/@x/video/{post.video_id}?lang=en"
        ids, cursor, more = [], 0, True
        while more:
            body = (await get(http, "/post-comments/", url=url, count=50, cursor=cursor))[1]
            assert body["total"] == post.comment_count
            ids += [c["id"] for c in body["comments"]]
            cursor, more = body["cursor"], body["hasMore"]
        comments = list(sim.world.comments(post.video_id))
        assert ids == [c.comment_id for c in comments] and len(set(ids)) == post.comment_count
        top = max(comments, key=lambda c: c.reply_total)
        replies, cursor, more = [], 0, True
        while more:
            body = (await get(http, "/post-comment-replies/", video_id=post.video_id,
                              comment_id=top.comment_id, count=4, cursor=cursor))[1]
            replies += [(c["id"], "reply_total" in c) for c in body["comments"]]
            cursor, more = body["cursor"], body["hasMore"]
        expected = list(sim.world.replies(post.video_id, top.comment_id))
        assert replies == [(r.comment_id, False) for r in expected] and len(expected) == top.reply_total
        assert all(r.parent_comment_id == top.comment_id for r in expected)


async def test_pathological_users_never_end_their_walks() -> None:
    """'endless' users send empty pages with hasMore true; 'repeat' users echo the sent cursor."""
    config = cfg(WorldConfig(users=2000, pathological_fraction=1.0))
    async with serve(config) as (sim, http):
        world = sim.world
        endless = find_user(world, lambda u: world.pathology(u.index) == "endless" and 5 < u.videos < 30,
                            normal=False)
        repeat = find_user(world, lambda u: world.pathology(u.index) == "repeat" and 5 < u.videos < 30,
                           normal=False)
        pages = []
        cursor = "0"
        for _ in range(3):
            body = (await get(http, "/user-posts/", userid=endless.user_id, count=35, cursor=cursor))[1]
            pages.append(([v["video_id"] for v in body["videos"]], body["cursor"], body["hasMore"]))
            cursor = body["cursor"]
        assert pages[0][0] == [p.video_id for p in world.posts(endless.index)] and pages[0][2] is True
        assert pages[1][0] == pages[2][0] == [] and pages[1][2] is pages[2][2] is True
        assert len({pages[0][1], pages[1][1], pages[2][1]}) == 3  # the cursor keeps moving
        for _ in range(2):
            body = (await get(http, "/user-posts/", userid=repeat.user_id, count=35, cursor="0"))[1]
            assert [v["video_id"] for v in body["videos"]] == [p.video_id for p in world.posts(repeat.index)]
            assert (body["cursor"], body["hasMore"]) == ("0", True)  # the cursor it was sent
        for user in (endless, repeat):
            body = (await get(http, "/user-followers/", userid=user.user_id, count=200, time=0))[1]
            assert body["hasMore"] is True and user.followers < 200


async def test_not_found_private_and_missing_parameter_bodies() -> None:
    """Deleted users and posts, private accounts and missing parameters answer 200 status-error bodies."""
    async with serve() as (sim, http):
        world = sim.world
        gone = next(i for i in range(2000) if world.is_missing(i))
        private = next(world.user(i) for i in range(2000) if world.user(i) and world.is_private(i))
        assert private is not None
        err = {"status": "error", "message": "Not found user"}
        assert (await get(http, "/userinfo-by-id/", userid=world.user_id(gone)))[1] == err
        assert (await get(http, "/userid/", username=world.handle(gone)))[1] == err
        assert (await get(http, "/post-detail/", url="https://www.tiktok.com/@a/video/7000000000000099999"))[
            1] == {"status": "error", "message": "Not found post"}
        for path in ("/user-posts/", "/user-followers/", "/user-following/", "/user-liked/"):
            assert (await get(http, path, userid=private.user_id))[1] == {
                "status": "error", "message": "This account is private"}
        info = (await get(http, "/userinfo-by-username/", username="@" + private.handle.upper()))[1]
        assert info.get("userInfo", info)["user"]["privateAccount"] is True
        assert exact_counts(info)["followerCount"] == private.followers
        assert (await get(http, "/user-posts/"))[1] == {"status": "error", "message": "Missing parameter: userid"}


async def test_post_detail_accepts_urls_and_bare_ids() -> None:
    """/post-detail/ finds a post from a full video URL or bare digits, with `id` and an opaque aweme_id."""
    async with serve() as (sim, http):
        user = find_user(sim.world, lambda u: u.videos > 0)
        post = next(sim.world.posts(user.index))
        for url in (f"https://www.tiktok.com/@placeholder/video/{post.video_id}", post.video_id):
            body = (await get(http, "/post-detail/", url=url))[1]
            assert body["id"] == post.video_id and not body["aweme_id"].isdigit()
            assert body["title"] == post.title and body["author"]["unique_id"] == user.handle


async def test_advance_day_grows_counts_and_renames() -> None:
    """After advancing a day counts do not shrink, some grow, and renamed users lose their old handle."""
    config = cfg(WorldConfig(users=2000, rename_probability=1.0))
    async with serve(config) as (sim, http):
        handles = sim.world.sample_handles(20)
        indexes = [sim.world.index_by_handle(h) for h in handles]
        before = [exact_counts((await get(http, "/userinfo-by-username/", username=h))[1]) for h in handles]
        async with http.post("/__sim/advance", params={"days": "2"}) as resp:
            assert (await resp.json())["day"] == 2
        assert (await get(http, "/userid/", username=handles[0]))[1]["message"] == "Not found user"
        after = []
        for h, index in zip(handles, indexes, strict=True):
            assert index is not None
            new = sim.world.handle(index)
            assert new != h and (await get(http, "/userid/", username=new))[1] == {"id": sim.world.user_id(index)}
            after.append(exact_counts((await get(http, "/userinfo-by-username/", username=new))[1]))
        for key in ("followerCount", "videoCount", "heartCount"):
            assert all(a[key] >= b[key] for a, b in zip(after, before, strict=True))
        assert sum(a["followerCount"] for a in after) > sum(b["followerCount"] for b in before)
        assert sum(a["videoCount"] for a in after) > sum(b["videoCount"] for b in before)


async def test_canonical_shapes_without_quirks() -> None:
    """Without quirks: top-level stats (and exact statsV2), bool hasMore, int counts, string ms cursor, video_id
    present."""
    async with serve() as (sim, http):
        user = find_user(sim.world, lambda u: u.videos > 12 and not sim.world.profile_wrapped(u.index))
        info = (await get(http, "/userinfo-by-id/", userid=user.user_id))[1]
        assert set(info) == {"user", "stats", "statsV2"} and info["user"]["uniqueId"] == user.handle
        body = (await get(http, "/user-posts/", userid=user.user_id, count=10))[1]
        assert body["hasMore"] is True and body["cursor"] == str(body["videos"][-1]["create_time"] * 1000)
        for v in body["videos"]:
            assert v["video_id"].isdigit() and not v["aweme_id"].isdigit() and type(v["play_count"]) is int
            assert type(v["music_info"]["duration"]) is int


async def test_quirks_produce_every_variant() -> None:
    """Quirk mode shows each documented shape variant at least once over many requests."""
    seen: set[str] = set()
    async with serve(cfg(quirks=True)) as (sim, http):
        user = find_user(sim.world, lambda u: u.videos > 40 and u.followers > 60
                         and not sim.world.profile_wrapped(u.index))
        for i in range(30):
            info = (await get(http, "/userinfo-by-id/", userid=user.user_id, n=i))[1]
            seen.add("stats:top" if "stats" in info else "stats:nested" if "stats" in info["user"]
                     else "stats:flat")
            body = (await get(http, "/user-posts/", userid=user.user_id, count=5, n=i))[1]
            seen.add(f"hasMore:{type(body['hasMore']).__name__}")
            seen.add(f"cursor:{type(body['cursor']).__name__}")
            for v in body["videos"]:
                seen.add("item:video_id" if "video_id" in v else "item:id" if "id" in v
                         else "item:aweme_id" if v["aweme_id"].isdigit() else "item:broken")
                seen.add(f"count:{type(v['play_count']).__name__}")
                seen.add(f"duration:{type(v['music_info']['duration']).__name__}")
            fol = (await get(http, "/user-followers/", userid=user.user_id, count=5, n=i))[1]
            seen.add("total:present" if "total" in fol else "total:absent")
            found = (await get(http, "/search-user/", keyword="mango", n=i))[1]
            seen.update("search:" + next(iter(item)) for item in found["user_list"][:1])
    assert seen >= {"stats:top", "stats:nested", "stats:flat", "hasMore:bool", "hasMore:int", "cursor:str",
                    "cursor:int", "item:video_id", "item:id", "item:aweme_id", "count:int", "count:str",
                    "duration:int", "duration:str", "total:present", "total:absent", "search:user",
                    "search:user_info"}
    assert "item:broken" not in seen


async def test_titles_include_null_and_csv_hazards() -> None:
    """Some titles are JSON null and some start with formula characters or hold commas and newlines."""
    world = World(SMALL)
    titles = [p.title for i in range(100) for p in world.posts(i)]
    assert None in titles
    texts = [t for t in titles if t]
    assert any(t[0] in "=+-@" for t in texts) and any("\n" in t and "," in t for t in texts)
    assert any(not t.isascii() for t in texts)


async def test_admin_paths_are_not_counted_and_slashes_are_optional() -> None:
    """Admin calls are not API requests; API paths answer with or without a trailing slash."""
    async with serve() as (sim, http):
        assert (await get(http, "/region-list"))[0] == (await get(http, "/region-list/"))[0] == 200
        async with http.get("/__sim/stats") as resp:
            stats = await resp.json()
        assert stats["requests"] == 2 and stats["by_endpoint"] == {"/region-list": 2}
        async with http.post("/region-list/", headers={"X-Api-Key": KEY}) as resp:
            assert resp.status == 405
        assert sim.stats.billed[KEY] == 2


@pytest.mark.slow
def test_cli_prints_its_url_and_stops_on_sigterm() -> None:
    """`python -m crawler.sim --port 0` prints one listening line, serves, and exits 0 on SIGTERM."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "crawler.sim", "--port", "0", "--users", "500"],
                            cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # a bound: a silent simulator fails the test
        assert ready, "the simulator printed nothing within 30 s"
        line = proc.stdout.readline()
        m = re.fullmatch(r"Simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert m, line

        async def ask() -> Any:
            async with aiohttp.ClientSession() as http, http.get(m.group(1) + "/region-list/") as resp:
                return await resp.json()

        assert asyncio.run(ask()) == {"message": MSG_NO_KEY}
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
