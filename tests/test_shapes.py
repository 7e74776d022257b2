"""Answers the crawler cannot read and the stops the API's words mean: an unexpected shape is an answer (retried
once, a failure row, kept on disk, ten in a row stop the run), a daily quota is its own stop, an HTML 403 is a
firewall in the way, not a rejected key.

Classification is checked on `interpret` alone; the runs go through real HTTP to the simulator (its
`unreadable`, `daily_quota` and `firewall` switches), the crawler as a subprocess where its exit line matters.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from crawler.api.classify import interpret, response_kind
from crawler.api.client import Client
from crawler.api.unexpected import SCRUBBED, ShapeWatch
from crawler.errors import (
    Blocked,
    KeyRejected,
    NotFound,
    OutageStalled,
    QuotaSpent,
    RateLimited,
    ShapeChanged,
    TransientError,
    UnexpectedShape,
    Unreachable,
    Unreadable,
)
from crawler.sim.data import World, WorldConfig
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_client import serve
from tests.test_job_advice import FAST_TOML, crawler, environ, last_line

WORLD = WorldConfig(seed=11, users=1_200)
QUOTA_TEXT = "Free Api Limit: 10000 request/ 1 day."


def body(obj: object) -> bytes:
    """A JSON body."""
    return json.dumps(obj).encode()


# --- interpret: what each answer means --------------------------------------------------------------------------

def test_a_nonzero_code_with_a_message_is_an_error_whatever_else_it_carries() -> None:
    """{"code": -1, "msg": ..., "data": [] or null} is an error body classified by its words, never a payload."""
    for data in ([], None, {}):
        result, billed = interpret(200, body({"code": -1, "msg": "Url parsing is failed! Please check url.",
                                              "data": data, "processed_time": 0.1}), None, "/post-detail/")
        assert isinstance(result, NotFound), (data, result)
        assert not billed
        result, _ = interpret(200, body({"code": -1, "msg": "something odd", "data": data}), None, "/x/")
        assert type(result) is TransientError and "something odd" in str(result)
    payload, billed = interpret(200, body({"code": 0, "msg": "success", "data": {"id": "1"}}), None, "/x/")
    assert payload == {"id": "1"} and billed


def test_the_daily_quota_is_its_own_stop_and_a_per_second_limit_stays_a_rate_limit() -> None:
    """The daily-quota text is QuotaSpent (exit 4, unbilled, no 'top up'); '1 request/second' is a rate limit."""
    for answer in ({"message": QUOTA_TEXT}, {"code": -1, "msg": QUOTA_TEXT, "data": []},
                   {"status": "error", "message": "Daily limit of 500 requests reached"}):
        result, billed = interpret(200, body(answer), None, "/x/")
        assert isinstance(result, QuotaSpent), answer
        assert result.exit_code == 4 and not billed
        assert "daily quota" in str(result) and "top up" not in str(result)
        assert response_kind(200, result) == "quota_spent"
    result, billed = interpret(200, body({"code": -1, "msg": "Free Api Limit: 1 request/second."}), None, "/x/")
    assert isinstance(result, RateLimited) and not billed


def test_a_403_page_is_a_firewall_and_a_403_of_the_apis_json_is_the_key() -> None:
    """401/403 with HTML, an empty or a non-JSON body is Blocked (an outage-like answer); with JSON, the key."""
    html = b"<!DOCTYPE html><html><title>Attention Required! | Cloudflare</title></html>"
    for status, raw in ((403, html), (401, b""), (403, b"Forbidden")):
        result, billed = interpret(status, raw, None, "/userid/")
        assert isinstance(result, Blocked) and isinstance(result, Unreachable), (status, raw)
        assert "firewall" in str(result) and "key" not in str(result) and not billed
        assert response_kind(status, result) == "blocked"
    assert "an HTML page" in str(interpret(403, html, None, "/userid/")[0])
    result, billed = interpret(403, body({"message": "Api-Key is not available"}), None, "/userid/")
    assert isinstance(result, KeyRejected) and "rejected the key" in str(result) and not billed


def test_json_that_is_not_an_object_is_an_unreadable_billed_answer() -> None:
    """A 200 JSON list is an answer of an unexpected shape (billed, its body kept), not a missing answer."""
    result, billed = interpret(200, b"[1, 2]", None, "/x/")
    assert isinstance(result, Unreadable) and result.body == b"[1, 2]" and billed
    assert response_kind(200, result) == "unexpected_shape"


def test_the_watch_keeps_a_bounded_number_of_scrubbed_bodies_and_stops_on_a_streak(tmp_path: Path) -> None:
    """Bodies are kept up to the bound per endpoint and day with the key's text scrubbed; a readable answer ends
    the endpoint's streak; the streak-th unreadable answer in a row is ShapeChanged naming the endpoint and folder."""
    day = datetime.date(2026, 12, 6)
    watch = ShapeWatch(str(tmp_path), secret=b"s3cret-key", streak=4, keep=3, today=lambda: day)
    for _ in range(3):
        watch.unreadable_answer("/post-detail/", b'{"echo": "s3cret-key"}')
    watch.readable("/post-detail/")
    watch.unreadable_answer("/userid/", b"{}")  # another endpoint's streak is its own
    for _ in range(3):
        watch.unreadable_answer("/post-detail/", b"{}")
    with pytest.raises(ShapeChanged, match=r"/post-detail/ changed shape \(4 in a row") as stop:
        watch.unreadable_answer("/post-detail/", b"{}")
    folder = tmp_path / "unexpected" / "post-detail" / "2026-12-06"
    assert str(folder) in str(stop.value)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["1.json", "2.json", "3.json"]
    assert all(b"s3cret" not in f.read_bytes() and SCRUBBED in f.read_bytes() for f in files)
    assert watch.unreadable == 8 and watch.kept == 4


# --- the client against the simulator -----------------------------------------------------------------------------

def public_posts(w: World, n: int) -> list[str]:
    """n ids of posts by public users (each answers /post-detail/)."""
    ids: list[str] = []
    for i in range(w.config.users):
        if not w.is_missing(i) and not w.is_private(i):
            ids.extend(p.video_id for p in w.posts(i))
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError(f"fewer than {n} public posts")


async def test_unreadable_answers_are_never_an_outage(simulator: SimFactory, tmp_path: Path) -> None:
    """Two items whose every answer is unreadable: each is tried twice and fails as an unexpected shape; the
    outage detector never pauses, and the bodies are kept under the data directory."""
    async with simulator(world=WORLD, unreadable=frozenset({"/post-detail"})) as sim:
        ids = public_posts(sim.world, 2)
        settings = fast_settings(sim.url, retry_attempts=5, data_dir=str(tmp_path / "data"))
        async with Client(settings, api_key=KEY) as client:
            for video_id in ids:
                with pytest.raises(UnexpectedShape, match="/post-detail/: unexpected answer") as failed:
                    await client.post_detail(video_id)
                assert failed.value.reason == "unexpected_shape" and failed.value.endpoint == "/post-detail/"
            assert client.outage.pauses == 0 and not client.outage.active
            assert client.counters.responses["unexpected_shape"] == 4
        assert sim.stats.billed[KEY] == 4 and sim.stats.requests == 4
    assert len(list((tmp_path / "data" / "unexpected" / "post-detail").glob("*/*.json"))) == 4


async def test_a_firewall_pauses_even_a_one_item_run_until_the_stall_limit(simulator: SimFactory) -> None:
    """An HTML 403 on every try of one request is an outage (a firewall in front of everything), not an item's
    failure: the client pauses and ends at the stall limit naming the firewall; nothing is billed."""
    async with simulator(world=WORLD, firewall=True) as sim:
        settings = fast_settings(sim.url, retry_attempts=3, retry_stall_limit=0.5)
        async with Client(settings, api_key=KEY) as client:
            with pytest.raises(OutageStalled, match="a proxy, firewall or CDN refused the request"):
                await client.get("/region-list/")
            assert client.outage.pauses == 1
        assert not sim.stats.billed and sim.stats.requests >= 3


async def test_a_detail_without_an_id_is_the_post_asked_for(tmp_path: Path) -> None:
    """/post-detail/ answers without `id` (seen in real bodies) are read as the post asked for."""

    async def no_id(request: web.Request) -> web.Response:
        return web.json_response({"title": "a post", "create_time": 1_700_000_000, "play_count": 5})

    async with serve(no_id) as url, Client(fast_settings(url, data_dir=str(tmp_path)), api_key=KEY) as client:
        post = await client.post_detail("7300000000000000001")
    assert post.video_id == "7300000000000000001" and post.title == "a post" and post.play_count == 5


# --- whole runs: the exit line, the credits, the resume ------------------------------------------------------------

def other(args: list[str], output: str) -> list[str]:
    """The same command writing another output (another job)."""
    return [output if a == "out.csv" else a for a in args]


def read_column(path: Path, column: str) -> list[str]:
    """One column of a CSV."""
    with path.open(newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f)]


@pytest.mark.slow
async def test_a_shape_change_stops_early_spends_two_credits_an_item_and_the_retry_fetches_all(
        simulator: SimFactory, tmp_path: Path) -> None:
    """1,000 post-details whose every answer is unreadable: exit 1 with the shape-change line within the first
    dozen items, at most 2 credits per item, the bodies kept without the key; after the fix, --retry-failed
    fetches every post once."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    args = ["post-details", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
            "--parallelism", "4", "--summary-json", "s.json"]
    async with simulator(world=WORLD, unreadable=frozenset({"/post-detail"}), record_arrivals=True) as sim:
        ids = public_posts(sim.world, 1_000)
        (tmp_path / "in.txt").write_text("\n".join(ids) + "\n")
        code, err = await crawler(args, environ(sim), tmp_path)
        line = last_line(err)
        assert code == 1, err
        assert "the API's answers to /post-detail/ changed shape (10 in a row unreadable)" in line, line
        assert "crawler doctor" in line and str(Path("d") / "unexpected" / "post-detail") in line
        per_item = Counter(parse_qs(urlsplit(t).query)["url"][0] for t in sim.stats.targets)
        assert len(per_item) <= 12 and max(per_item.values()) <= 2, per_item
        assert sim.stats.billed[KEY] == sum(per_item.values()) <= 2 * len(per_item)
        # The stop drains: the answers under way are read, so the run's billed count is the API's.
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["credits_billed"] == sim.stats.billed[KEY], summary
    kept = list((tmp_path / "d" / "unexpected" / "post-detail").glob("*/*.json"))
    assert 1 <= len(kept) <= 20
    assert all(json.loads(f.read_bytes()).keys() == {"result"} and KEY.encode() not in f.read_bytes() for f in kept)
    failures = tmp_path / "out.failures.csv"
    assert set(read_column(failures, "reason")) == {"unexpected_shape"}

    async with simulator(world=WORLD) as fixed:  # the fix: the API's answers are readable again
        code, err = await crawler([*args, "--retry-failed"], environ(fixed), tmp_path)
        assert code == 0, err
        assert fixed.stats.requests == 1_000
    got = read_column(tmp_path / "out.csv", "video_id")
    assert sorted(got) == sorted(ids)


@pytest.mark.slow
async def test_the_quota_a_firewall_and_a_rejected_key_each_end_with_their_own_line(
        simulator: SimFactory, tmp_path: Path) -> None:
    """The daily quota stops with exit 4 and its line (never 'top up'), and the same command goes on after the
    reset; an HTML 403 ends at the stall limit naming a firewall, never the key; 'Api-Key is not available'
    still says the key was rejected."""
    (tmp_path / "fast.toml").write_text(FAST_TOML.replace("stall_limit = 5", "stall_limit = 1"))
    async with simulator(world=WORLD, daily_quota=7) as sim:
        ids = public_posts(sim.world, 20)
        (tmp_path / "in.txt").write_text("\n".join(ids) + "\n")
        args = ["post-details", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "2"]
        code, err = await crawler(args, environ(sim), tmp_path)
        line = last_line(err)
        assert code == 4, err
        assert "the key's daily quota is spent" in line and "Free Api Limit: 7 request/ 1 day." in line
        assert "top up" not in line
        assert "resume with: crawler post-details" in line
        assert sim.stats.billed[KEY] == 7
    async with simulator(world=WORLD) as reset:  # the next UTC day
        code, err = await crawler(args, environ(reset), tmp_path)
        assert code == 0, err
        assert reset.stats.requests == 13
    assert sorted(read_column(tmp_path / "out.csv", "video_id")) == sorted(ids)

    async with simulator(world=WORLD, firewall=True) as sim:
        code, err = await crawler(other(args, "fw.csv"), environ(sim), tmp_path)
        line = last_line(err)
        assert code == 1, err
        assert "HTTP 403 with an HTML page: a proxy, firewall or CDN refused the request" in line, line
        assert "key" not in line.split("resume with")[0]
        assert not (tmp_path / "fw.failures.csv").exists()  # nothing was marked failed: the items stay pending
        assert sum(sim.stats.billed.values()) == 0

    async with simulator(world=WORLD) as sim:
        env = environ(sim)
        env["TIKLIVE_API_KEY"] = "not-a-key"
        code, err = await crawler(other(args, "key.csv"), env, tmp_path)
        assert code == 1 and "the API rejected the key ('Api-Key is not available')" in last_line(err), err


def test_the_readme_repeats_the_classification_table() -> None:
    """docs/jobs.md's table of the words each classification keys on is classify.RULES, row for row, with sources."""
    from crawler.api.classify import RULES

    readme = (Path(__file__).resolve().parent.parent / "docs" / "jobs.md").read_text(encoding="utf-8")
    for rule in RULES:
        row = f"| {rule.verdict} | {', '.join(f'`{w}`' for w in rule.words)} | {rule.source} |"
        assert row in readme, row


def test_the_simulator_switches_reach_its_config() -> None:
    """`crawler sim --unreadable --daily-quota --firewall` set the config the tests above use; an unknown endpoint
    is refused."""
    from crawler.sim.__main__ import _parser, config_from_args

    args = _parser().parse_args(["--unreadable", "/post-detail/,userid", "--daily-quota", "100", "--firewall"])
    config = config_from_args(args)
    assert config.unreadable == {"/post-detail", "/userid"} and config.daily_quota == 100 and config.firewall
    with pytest.raises(ValueError, match="unknown endpoints"):
        config_from_args(_parser().parse_args(["--unreadable", "/no-such/"]))
