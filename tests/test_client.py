"""The client against the simulator on loopback: pacing, error classes, 429 cooldown, guards, safety."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from crawler.api import records as ep
from crawler.api.classify import classify
from crawler.api.client import Client, check_base_url
from crawler.errors import (
    BalanceExhausted,
    BudgetExhausted,
    KeyRejected,
    NotFound,
    PrivateAccount,
    RateLimited,
    RateLimitStalled,
    RetriesExhausted,
    TransientError,
    UnexpectedShape,
    UsageError,
)
from crawler.sim.data import WorldConfig
from tests.conftest import KEY, SimFactory, fast_settings


def _first(world_pred: object, n: int = 2_000) -> int:
    pred = world_pred
    return next(i for i in range(n) if pred(i))  # type: ignore[operator]


async def test_pacing_keeps_the_rolling_window_from_the_first_second(simulator: SimFactory) -> None:
    """A burst of concurrent callers at 20 per 2 s draws no 429 and the server never sees more than 20 per window."""
    async with simulator(rate_limit=20, rate_window=2.0, burst_limit=50) as sim:
        settings = fast_settings(sim.url, rate_enabled=True, rate_limit=20, rate_window=2.0)
        async with Client(settings, api_key=KEY) as client:
            await asyncio.gather(*(client.get("/region-list/") for _ in range(45)))
        assert sim.stats.served_429 == 0
        assert sim.stats.max_in_window <= 20
        assert sim.stats.requests == 45
        assert client.counters.requests_sent == 45


async def test_pacing_respects_the_per_second_cap(simulator: SimFactory) -> None:
    """With a large window budget, max_per_second still bounds the starts in any second."""
    async with simulator(rate_limit=1000, rate_window=1.0, burst_limit=8) as sim:
        settings = fast_settings(sim.url, rate_enabled=True, rate_limit=1000, rate_window=1.0,
                                 rate_max_per_second=8)
        async with Client(settings, api_key=KEY) as client:
            await asyncio.gather(*(client.get("/region-list/") for _ in range(20)))
        assert sim.stats.served_429 == 0
        assert sim.stats.max_in_second <= 8


async def test_missing_and_unknown_keys_end_the_run(simulator: SimFactory) -> None:
    """Both key messages (HTTP 200 bodies) raise KeyRejected at once, without retries, unbilled."""
    async with simulator() as sim:
        async with Client(fast_settings(sim.url), api_key="not-a-key") as client:
            with pytest.raises(KeyRejected, match="rejected the key"):
                await client.get("/region-list/")
            assert client.counters.requests_sent == 1
            assert client.counters.credits_billed == 0
        async with Client(fast_settings(sim.url), api_key=" ") as client:
            with pytest.raises(KeyRejected):
                await client.get("/region-list/")


async def test_empty_balance_stops_and_keeps_billing_exact(simulator: SimFactory) -> None:
    """A key with 3 credits gets 3 answers, then BalanceExhausted; the client's billed count matches the server."""
    async with simulator(keys={"small": 3}) as sim, Client(fast_settings(sim.url), api_key="small") as client:
        for _ in range(3):
            await client.get("/region-list/")
        with pytest.raises(BalanceExhausted):
            await client.get("/region-list/")
        assert client.counters.credits_billed == sim.stats.billed["small"] == 3
        assert client.counters.requests_sent == 4


async def test_missing_user_and_private_account_are_item_failures(simulator: SimFactory) -> None:
    """Not-found and private answers raise per-item errors with no retry."""
    async with simulator() as sim:
        w = sim.world
        private = _first(lambda i: w.is_private(i) and not w.is_missing(i))
        async with Client(fast_settings(sim.url, retry_attempts=5), api_key=KEY) as client:
            with pytest.raises(NotFound) as nf:
                await client.user_id("nobody_here_zz")
            assert nf.value.endpoint == "/userid/"
            with pytest.raises(PrivateAccount):
                async for _ in client.user_posts(w.user_id(private)):
                    pass
            assert client.counters.requests_sent == 2
            assert client.counters.retries == 0


@pytest.mark.parametrize("fault", ["5xx", "drop", "truncated", "malformed", "slow"])
async def test_each_fault_is_retried_then_reported(simulator: SimFactory, fault: str) -> None:
    """Every fault kind is transient: retried up to retry.attempts, then RetriesExhausted names the endpoint."""
    async with simulator(fault_rate=1.0, faults=frozenset({fault}), slow_seconds=3.0) as sim:
        settings = fast_settings(sim.url, retry_attempts=3, read_timeout=0.3)
        async with Client(settings, api_key=KEY) as client:
            with pytest.raises(RetriesExhausted, match="/region-list/") as info:
                await client.get("/region-list/")
            assert info.value.endpoint == "/region-list/"
            assert client.counters.requests_sent == 3
            assert client.counters.retries == 2


async def test_faults_at_a_moderate_rate_are_absorbed(simulator: SimFactory) -> None:
    """With a quarter of requests faulty, a posts walk still returns exactly the world's posts."""
    world = WorldConfig(seed=3, users=500)
    async with simulator(world=world, fault_rate=0.25, faults=frozenset({"5xx", "drop", "truncated", "malformed"}),
                         quirks=True) as sim:
        w = sim.world
        user = _first(lambda i: not w.is_missing(i) and not w.is_private(i) and 40 < w.user(i).videos < 200, 500)
        async with Client(fast_settings(sim.url, retry_attempts=10), api_key=KEY) as client:
            got = [p.video_id async for p in client.user_posts(w.user_id(user))]
        assert got == [p.video_id for p in w.posts(user)]


async def test_unknown_error_body_is_transient_with_its_message(simulator: SimFactory) -> None:
    """A {"status":"error"} body without known words is retried and finally reported with its message."""
    async with simulator() as sim, Client(fast_settings(sim.url, retry_attempts=2), api_key=KEY) as client:
        with pytest.raises(RetriesExhausted, match="Missing parameter"):
            await client.get("/user-posts/", {})
        assert client.counters.requests_sent == 2
        assert client.counters.credits_billed == 2  # status:error answers are assumed billed


def test_classification_of_error_bodies() -> None:
    """Status first, then the body's words: key, balance, rate, private, not found, else transient."""

    def body(obj: object) -> bytes:
        return json.dumps(obj).encode()

    with pytest.raises(RateLimited):
        classify(429, b"", "2", "/x/")
    with pytest.raises(TransientError):
        classify(503, b"oops", None, "/x/")
    with pytest.raises(KeyRejected):
        classify(200, body({"message": "Please sign up to tikliveapi.com"}), None, "/x/")
    with pytest.raises(KeyRejected):
        classify(200, body({"message": "Api-Key is not available"}), None, "/x/")
    with pytest.raises(BalanceExhausted):
        classify(200, body({"message": "Insufficient balance, please purchase credits"}), None, "/x/")
    with pytest.raises(RateLimited):
        classify(200, body({"message": "Too many requests"}), None, "/x/")
    with pytest.raises(NotFound):
        classify(200, body({"status": "error", "message": "Not found post"}), None, "/x/")
    with pytest.raises(PrivateAccount):
        classify(200, body({"status": "error", "message": "This account is private"}), None, "/x/")
    with pytest.raises(TransientError, match="weird"):
        classify(200, body({"status": "error", "message": "something weird"}), None, "/x/")
    with pytest.raises(TransientError, match="malformed"):
        classify(200, b"<html>", None, "/x/")
    with pytest.raises(KeyRejected):  # the words decide, whatever the error body's shape
        classify(200, body({"status": "error", "message": "Api-Key is not available"}), None, "/x/")
    with pytest.raises(NotFound):  # tikwm's envelope and wording for an unresolvable post URL
        classify(200, body({"code": -1, "msg": "Url parsing is failed! Please check url."}), None, "/x/")
    with pytest.raises(RateLimited):
        classify(200, body({"code": -1, "msg": "Free Api Limit: 1 request/second."}), None, "/x/")
    payload, billed = classify(200, body({"code": 0, "msg": "success", "data": {"id": "1"}}), None, "/x/")
    assert payload == {"id": "1"} and billed
    payload, billed = classify(200, body({"videos": [], "hasMore": 0, "message": "ok"}), None, "/x/")
    assert billed and payload["videos"] == []


async def test_429_with_retry_after_pauses_every_worker_for_exactly_that_long(simulator: SimFactory) -> None:
    """After a burst of 429s carrying Retry-After, no request arrives before it expires, and all succeed."""
    async with simulator(rate_limit=5, rate_window=1.0, retry_after=0.4) as sim:
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            gate = client.gate
            starts: list[float] = []
            answered_429: list[float] = []
            acquire, report = gate.acquire, gate.report_429

            async def recording_acquire() -> float:
                starts.append(await acquire())
                return starts[-1]

            async def recording_report(started: float, retry_after: float | None) -> None:
                answered_429.append(gate.now())
                await report(started, retry_after)

            gate.acquire, gate.report_429 = recording_acquire, recording_report  # type: ignore[method-assign]
            await asyncio.gather(*(client.get("/region-list/") for _ in range(12)))
        assert sim.stats.served_429 > 0
        assert client.counters.rate_limited == sim.stats.served_429 == len(answered_429)
        # 12 requests at 5 per second with 0.4 s pauses need at least two cooldowns.
        assert gate.cooldowns >= 2
        assert gate.cooldowns < sim.stats.served_429  # a burst of 429s is one event
        # Honoured: no request starts within Retry-After of any 429 that was answered before it.
        for t in answered_429:
            assert not [s for s in starts if t < s < t + 0.4]


async def test_429_without_retry_after_backs_off_exponentially_as_one_event(simulator: SimFactory) -> None:
    """Without Retry-After the shared cooldown grows per event and a burst counts once."""
    async with simulator(rate_limit=4, rate_window=0.5) as sim:
        settings = fast_settings(sim.url, retry_base_delay=0.1, retry_max_delay=0.4)
        async with Client(settings, api_key=KEY) as client:
            await asyncio.gather(*(client.get("/region-list/") for _ in range(16)))
        assert sim.stats.served_429 > client.gate.cooldowns >= 1
        assert sim.stats.requests == 16 + sim.stats.served_429


async def test_permanent_429_ends_with_a_stall_error(simulator: SimFactory) -> None:
    """A server that always answers 429 ends the run after retry.stall_limit instead of hanging."""
    async with simulator(always_429=True, retry_after=0.05) as sim:
        settings = fast_settings(sim.url, retry_stall_limit=1.0)
        async with Client(settings, api_key=KEY) as client:
            with pytest.raises(RateLimitStalled, match="429"):
                await client.get("/region-list/")
        assert client.counters.credits_billed == 0
        assert 3 <= sim.stats.served_429 <= 1.0 / 0.05 + 2  # it retried, each time after the Retry-After


async def test_request_budget_caps_requests_in_flight_included(simulator: SimFactory) -> None:
    """With a budget of 5, twenty concurrent calls send exactly five requests."""
    async with simulator() as sim:
        async with Client(fast_settings(sim.url), api_key=KEY, request_budget=5) as client:
            results = await asyncio.gather(*(client.get("/region-list/") for _ in range(20)),
                                           return_exceptions=True)
        assert sum(isinstance(r, BudgetExhausted) for r in results) == 15
        assert sim.stats.requests == 5


async def test_pathological_lists_end_with_a_guard(simulator: SimFactory) -> None:
    """Endless hasMore and repeated cursors end the walk with a reason after the real rows, never looping."""
    world = WorldConfig(seed=5, users=400, pathological_fraction=0.5, private_fraction=0.0)
    async with simulator(world=world) as sim:
        w = sim.world
        ok = lambda i: not w.is_missing(i) and 0 < w.user(i).videos < 100
        endless = _first(lambda i: ok(i) and w.pathology(i) == "endless", 400)
        repeat = _first(lambda i: ok(i) and w.pathology(i) == "repeat", 400)
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            for index in (endless, repeat):
                pages = [p async for p in client.pages("posts", {"userid": w.user_id(index)}, page_size=30)]
                assert pages[-1].stop is not None and pages[-1].last
                rows = [r.video_id for p in pages for r in p.items]
                assert rows == [p.video_id for p in w.posts(index)]
                assert len(pages) <= w.user(index).videos // 30 + 2


async def test_page_cap_ends_the_walk_without_a_failure(simulator: SimFactory) -> None:
    """max_pages stops a long walk after that many pages, marked capped rather than guarded."""
    async with simulator() as sim:
        w = sim.world
        user = _first(lambda i: not w.is_missing(i) and not w.is_private(i) and w.user(i).videos > 100)
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            pages = [p async for p in client.pages("posts", {"userid": w.user_id(user)}, page_size=10, max_pages=3)]
        assert len(pages) == 3 and pages[-1].capped and pages[-1].stop is None


def test_plain_http_to_a_remote_host_is_refused_before_connecting() -> None:
    """http:// to anything but loopback raises UsageError in the constructor; https and loopback pass."""
    for url in ("http://api.tikliveapi.com", "http://10.1.2.3:8080", "ftp://127.0.0.1"):
        with pytest.raises(UsageError):
            Client(fast_settings(url), api_key=KEY)
    assert check_base_url("http://127.0.0.1:9/") == "http://127.0.0.1:9"
    assert check_base_url("http://[::1]:9") == "http://[::1]:9"
    assert check_base_url("https://api.tikliveapi.com") == "https://api.tikliveapi.com"
    assert check_base_url("http://example.org", allow_insecure_http=True) == "http://example.org"


async def test_client_is_opened_once(simulator: SimFactory) -> None:
    """Re-entering a closed client is refused."""
    async with simulator() as sim:
        client = Client(fast_settings(sim.url), api_key=KEY)
        async with client:
            await client.get("/region-list/")
        with pytest.raises(RuntimeError):
            async with client:
                pass


async def test_every_record_parses_from_the_simulator(simulator: SimFactory) -> None:
    """Single lookups and every list return records matching the world, with quirks on."""
    async with simulator(quirks=True) as sim:
        w = sim.world
        i = _first(lambda i: not w.is_missing(i) and not w.is_private(i) and w.user(i).videos > 3
                   and w.user(i).followers > 3 and w.user(i).following > 3)
        user = w.user(i)
        assert user is not None
        async with Client(fast_settings(sim.url), api_key=KEY) as client:
            assert await client.user_id(user.handle) == user.user_id
            for _ in range(6):  # quirks vary per request: stats in three places
                profile = await client.user_info(user.handle)
                assert (profile.user_id, profile.handle, profile.followers, profile.videos, profile.hearts) == (
                    user.user_id, user.handle, user.followers, user.videos, user.hearts)
            by_id = await client.user_info(user_id=user.user_id)
            assert by_id.handle == user.handle
            followers = [f.user_id async for f in client.user_followers(user.user_id)]
            assert followers == [w.user_id(f.user_index) for f in w.followers(i)]
            following = [f.user_id async for f in client.user_following(user.user_id)]
            assert following == [w.user_id(f.user_index) for f in w.following(i)]
            post = next(iter(w.posts(i)))
            detail = await client.post_detail(post.video_id)
            assert (detail.video_id, detail.title, detail.play_count) == (post.video_id, post.title or "",
                                                                          post.play_count)
            comments = [c.comment_id async for c in client.post_comments(post.video_id)]
            assert comments == [c.comment_id for c in w.comments(post.video_id)]
            regions = await client.regions()
            assert {r.code for r in regions} == set(w.regions())
            music_id = w.music_ids(1)[0]
            assert (await client.music_info(music_id)).music_id == music_id
            got = [p.video_id async for p in client.music_posts(music_id)]
            assert got == [p.video_id for p in w.music_posts(music_id)]
            cid = w.challenge_ids(1)[0]
            challenge = await client.challenge_info(cid)
            assert (await client.challenge_info(name=challenge.name)).challenge_id == cid
            hits = [u.user_id async for u in client.search_users("dance")]
            assert hits == [w.user_id(k) for k in w.search_users("dance")]
            videos = [p.video_id async for p in client.search_videos("dance")]
            assert videos == [p.video_id for p in w.search_videos("dance")]
            tags = [c.challenge_id async for c in client.search_challenges("dance")]
            assert tags == [c.challenge_id for c in w.search_challenges("dance")]


def test_billing_follows_the_contract() -> None:
    """Key, balance and rate answers are unbilled in any shape; status errors are billed, bare messages not."""
    from crawler.api.classify import interpret

    def billed(obj: object, status: int = 200) -> bool:
        return interpret(status, json.dumps(obj).encode(), None, "/x/")[1]

    assert not billed({"message": "Please sign up to tikliveapi.com"})
    assert not billed({"status": "error", "message": "Api-Key is not available"})
    assert not billed({"message": "Your credit balance is exhausted"})
    assert not billed({"message": "Too many requests"}) and not billed({}, 429) and not billed({}, 503)
    assert billed({"status": "error", "message": "Not found post"})
    assert not billed({"message": "Not found post"})
    assert billed({"videos": []})


def test_records_expose_stable_columns() -> None:
    """The CONTRACT.md minimum columns lead each record, in order."""
    assert ep.Profile.COLUMNS[:10] == ("user_id", "handle", "nickname", "sec_uid", "verified", "private",
                                       "followers", "following", "videos", "hearts")
    assert ep.Post.COLUMNS[:9] == ("video_id", "source_handle", "create_time", "region", "title", "play_count",
                                   "digg_count", "comment_count", "share_count")
    assert ep.Follow.COLUMNS[:3] == ("user_id", "handle", "source_handle")
    assert ep.Comment.COLUMNS[:4] == ("comment_id", "video_id", "text", "parent_comment_id")


# --- answers our simulator never gives, served by tiny apps on loopback (real HTTP, no mocks) ---

from collections.abc import AsyncIterator, Awaitable, Callable  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402

from aiohttp import web  # noqa: E402

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """Serve one handler for every path on a loopback port; yield its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_redirects_are_not_followed_so_the_key_stays_home() -> None:
    """A 302 to another host is an error: the key never reaches the other server and each try is counted."""
    elsewhere: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("X-Api-Key", ""))
        return web.json_response({"id": "1"})

    async with serve(other) as other_url:
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(other_url + request.path_qs)

        async with serve(redirect) as url, Client(fast_settings(url, retry_attempts=2), api_key=KEY) as client:
            with pytest.raises(RetriesExhausted, match="redirect"):
                await client.get("/userid/", {"username": "x"})
            assert client.counters.requests_sent == 2
    assert elsewhere == []


async def test_a_list_that_repeats_its_rows_with_new_cursors_is_stopped() -> None:
    """hasMore forever with the same rows under moving cursors ends after one repeated page, not never."""
    calls = 0

    async def same_page(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        cursor = int(request.query.get("cursor", "0")) + 1
        videos = [{"video_id": str(7_000_000_000_000_000_000 + k), "create_time": 1} for k in range(3)]
        return web.json_response({"videos": videos, "cursor": str(cursor), "hasMore": True})

    async with serve(same_page) as url, Client(fast_settings(url), api_key=KEY) as client:
        pages = [p async for p in client.pages("posts", {"userid": "1"})]
    assert calls == 2 and len(pages) == 2
    assert [len(p.items) for p in pages] == [3, 0] and pages[-1].stop and "repeats" in pages[-1].stop


async def test_a_list_answer_of_unknown_shape_fails_instead_of_looking_empty(tmp_path: Path) -> None:
    """An answer with no list and no pagination keys is retried once and reported as an unexpected shape, never
    taken as an empty list; so is a page none of whose items can be read."""
    calls = 0

    async def odd(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if request.query.get("userid") == "2":
            return web.json_response({"videos": [{"video": {"id": "7"}}, {"x": 1}], "hasMore": True, "cursor": 5})
        return web.json_response({"result": "ok", "items_v2": [1, 2]})

    async with serve(odd) as url, Client(fast_settings(url, retry_attempts=5, data_dir=str(tmp_path)),
                                         api_key=KEY) as client:
        with pytest.raises(UnexpectedShape, match="no 'videos' list"):
            _ = [p async for p in client.pages("posts", {"userid": "1"})]
        assert calls == 2
        with pytest.raises(UnexpectedShape, match="none of the 2 items"):
            _ = [p async for p in client.pages("posts", {"userid": "2"})]
        assert calls == 4 and client.outage.pauses == 0


async def test_envelope_and_missing_has_more_are_understood() -> None:
    """A {code, message, data} envelope is unwrapped and a list without hasMore ends on an empty page."""
    pages_served = 0

    async def enveloped(request: web.Request) -> web.Response:
        nonlocal pages_served
        cursor = int(request.query.get("cursor", "0"))
        videos = [] if cursor >= 2 else [{"id": str(7_000_000_000_000_000_000 + cursor), "title": None}]
        pages_served += 1
        return web.json_response({"code": 0, "message": "success", "data": {"videos": videos, "cursor": cursor + 1}})

    async with serve(enveloped) as url, Client(fast_settings(url), api_key=KEY) as client:
        got = [p.video_id async for p in client.user_posts("1")]
    assert got == ["7000000000000000000", "7000000000000000001"] and pages_served == 3


def test_limit_words_mean_the_credit_limit_unless_they_say_rate() -> None:
    """A 200 'limit' message is the credit limit (resumable); explicit rate words are a rate limit."""

    def body(text: str) -> bytes:
        return json.dumps({"message": text}).encode()

    with pytest.raises(BalanceExhausted):
        classify(200, body("Request limit reached for this account"), None, "/x/")
    with pytest.raises(RateLimited):
        classify(200, body("Rate limit exceeded, slow down"), None, "/x/")
    with pytest.raises(NotFound):  # per-item words on a status error never end the run
        classify(200, json.dumps({"status": "error", "message": "Video not found"}).encode(), None, "/x/")
    with pytest.raises(TransientError):
        classify(200, json.dumps({"status": "error", "message": "forbidden in your region"}).encode(), None, "/x/")


async def test_a_dropped_pooled_connection_is_never_resent_behind_the_gate(simulator: SimFactory) -> None:
    """Connections dropped with no answer on a reused pooled connection: every request the server saw went through
    the gate and is in requests_sent (aiohttp's own silent resend of an idempotent request stays off)."""
    async with simulator(faults=frozenset({"drop"}), fault_rate=0.3) as sim:
        settings = fast_settings(sim.url, retry_attempts=10)
        async with Client(settings, api_key=KEY, max_connections=1) as client:
            for n in range(60):
                await client.get("/region-list/", {"n": n})
        assert sim.stats.faults["drop"] > 0
        assert client.counters.requests_sent == sim.stats.requests
