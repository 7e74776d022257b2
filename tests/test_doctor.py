"""`crawler doctor` against the simulator (real HTTP, the CLI in a subprocess), and the simulator's switches it is
tested with: --drop-field, --add-field and --latency live."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from crawler.api.records import video_url
from crawler.sim.data import World, WorldConfig
from crawler.sim.endpoints import call_endpoint
from crawler.sim.render import CANONICAL, LIVE_LATENCY, live_latency, reshape
from crawler.sim.seeded import hash64
from crawler.sim.server import SimConfig, Simulator
from tests.conftest import SimFactory
from tests.test_cli import crawler, environ, error_line, setup_dir

WORLD = WorldConfig(seed=11, users=1_000)
FAMILIES = ("/userinfo-by-username", "/user-posts", "/user-followers", "/post-detail", "/post-comments")


def checked_user(w: World) -> tuple[str, str]:
    """A public user with posts and followers whose first post has comments: (handle, that post's id)."""
    for i in range(w.config.users):
        user = w.user(i)
        if user is None or user.private or user.videos < 2 or user.followers < 2:
            continue
        posts = call_endpoint("/user-posts", w, {"userid": user.user_id, "count": "10", "cursor": "0"}, CANONICAL)
        first = posts["videos"][0]["video_id"] if posts.get("videos") else None
        if first and call_endpoint("/post-comments", w, {"url": video_url(first)}, CANONICAL).get("comments"):
            return user.handle, first
    raise AssertionError("no user with posts, followers and comments in the world")


async def doctor(sim: Simulator, tmp_path: Path, *args: str, key: str | None = "sim-key"
                 ) -> tuple[int, dict[str, Any] | str, str, int]:
    """Run `crawler doctor ARGS --json`: (exit code, the parsed report or stdout, stderr, the credits it stated)."""
    setup_dir(tmp_path, [])
    code, out, err = await crawler(["doctor", *args, "--config", "fast.toml"], environ(sim, key=key), tmp_path)
    stated = re.search(r"doctor will spend at most (\d+) credits", err)
    report: dict[str, Any] | str = json.loads(out) if "--json" in args and out else out
    return code, report, err, int(stated.group(1)) if stated else -1


def by_endpoint(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["endpoint"]: e for e in report["endpoints"]}


@pytest.mark.slow
@pytest.mark.parametrize("quirks", [False, True])
async def test_doctor_reports_ok_for_every_endpoint(simulator: SimFactory, tmp_path: Path, quirks: bool) -> None:
    """Against the simulator (with its documented quirks too: stats placements, id variants, counts as strings)
    doctor reports every family ok, exits 0, states 5 credits and the simulator counts one request per family."""
    async with simulator(world=WORLD, quirks=quirks) as sim:
        handle, _ = checked_user(sim.world)
        code, report, err, stated = await doctor(sim, tmp_path, "--handle", handle, "--json")
        assert code == 0, err
        assert isinstance(report, dict) and report["schema_version"] == 1 and report["exit_code"] == 0
        assert [e["status"] for e in report["endpoints"]] == ["ok"] * 5, report
        assert all(e["latency_ms"] is not None and e["rate_headers"] == {} for e in report["endpoints"])
        assert stated == 5 and report["credits_stated"] == 5 and report["requests_sent"] == 5
        assert sim.stats.requests == 5 and all(sim.stats.by_endpoint[p] == 1 for p in FAMILIES), sim.stats.snapshot()
        assert "sim-key" not in err + json.dumps(report)


@pytest.mark.slow
async def test_doctor_names_a_dropped_required_field(simulator: SimFactory, tmp_path: Path) -> None:
    """With post-detail's `id` dropped, doctor names the endpoint and the field (required, the parser cannot read
    the post) in text and JSON and exits 1; the other endpoints stay ok."""
    async with simulator(world=WORLD, drop_fields=(("post-detail", "id"),)) as sim:
        handle, _ = checked_user(sim.world)
        code, out, err, _ = await doctor(sim, tmp_path, "--handle", handle)
        assert code == 1, err
        line = next(x for x in str(out).splitlines() if x.startswith("/post-detail/"))
        assert "unreadable" in line and "missing: id (required)" in line, out
        assert "changed shape" in str(out)
        code, report, _, _ = await doctor(sim, tmp_path, "--handle", handle, "--json")
        assert code == 1 and isinstance(report, dict)
        detail = by_endpoint(report)["/post-detail/"]
        assert detail["status"] == "unreadable" and detail["missing_required"] == ["id"], detail
        assert [e["status"] for e in report["endpoints"] if e["endpoint"] != "/post-detail/"] == ["ok"] * 4


@pytest.mark.slow
async def test_doctor_names_a_missing_user_id_and_a_missing_count(simulator: SimFactory, tmp_path: Path) -> None:
    """A profile without `user.id` (which the parser would read as an empty id) and without `followerCount` is
    "fields missing" naming both; the families that need the id are skipped, nothing more is sent; exit 1."""
    drop = (("userinfo-by-username", "id"), ("userinfo-by-username", "followerCount"))
    async with simulator(world=WORLD, drop_fields=drop) as sim:
        handle, _ = checked_user(sim.world)
        code, report, err, _ = await doctor(sim, tmp_path, "--handle", handle, "--json")
        assert code == 1, err
        assert isinstance(report, dict)
        profile = by_endpoint(report)["/userinfo-by-username/"]
        assert profile["status"] == "fields missing", profile
        assert profile["missing"] == ["user.id", "stats.followerCount"] and profile["missing_required"] == ["user.id"]
        assert [e["status"] for e in report["endpoints"][1:]] == ["skipped"] * 4
        assert sim.stats.requests == 1


@pytest.mark.slow
async def test_doctor_reports_new_fields_and_still_exits_0(simulator: SimFactory, tmp_path: Path) -> None:
    """A field no parser knows, in the posts answer and its items, is reported as new; nothing is lost: exit 0."""
    async with simulator(world=WORLD, add_fields=(("user-posts", "brand_new"),)) as sim:
        handle, _ = checked_user(sim.world)
        code, report, err, _ = await doctor(sim, tmp_path, "--handle", handle, "--json")
        assert code == 0, err
        assert isinstance(report, dict)
        posts = by_endpoint(report)["/user-posts/"]
        assert posts["status"] == "fields new" and posts["new"] == ["brand_new", "videos[].brand_new"], posts


@pytest.mark.slow
@pytest.mark.parametrize("trouble", ["5xx", "429"])
async def test_doctor_never_sends_more_than_it_stated(simulator: SimFactory, tmp_path: Path, trouble: str) -> None:
    """When every answer is a 5xx (retries, an outage's probes) or a 429, the simulator counts no more requests than
    the credits doctor printed; the families it could not pay for are "no answer" (exit 3); a 429's Retry-After is
    reported as a rate header seen."""
    config: dict[str, Any] = ({"fault_rate": 1.0, "faults": frozenset({"5xx"})} if trouble == "5xx"
                              else {"always_429": True, "retry_after": 0.0})
    async with simulator(world=WORLD, **config) as sim:
        handle, video = checked_user(sim.world)
        code, report, err, stated = await doctor(sim, tmp_path, "--handle", handle, "--video", video, "--json",
                                                 "--retries", "5")
        assert stated == 5, err
        assert sim.stats.requests <= stated and sim.stats.requests >= 3, sim.stats.snapshot()
        assert code == 3, err
        assert isinstance(report, dict) and report["requests_sent"] == sim.stats.requests
        assert {e["status"] for e in report["endpoints"]} <= {"no answer", "skipped"}, report
        if trouble == "429":  # the rate headers of the answers it met are reported
            assert report["endpoints"][0]["rate_headers"] == {"Retry-After": "0"}, report


@pytest.mark.slow
async def test_doctor_with_a_rejected_key_exits_1_with_the_key_line(simulator: SimFactory, tmp_path: Path) -> None:
    """A key the API rejects stops doctor at its first call: exit 1, the one line naming the key, no report."""
    async with simulator(world=WORLD) as sim:
        code, out, err, stated = await doctor(sim, tmp_path, "--handle", "anyone", key="not-a-key")
        assert code == 1 and stated == 5
        assert "rejected the key" in error_line(err) and "TIKLIVE_API_KEY" in error_line(err)
        assert "not-a-key" not in err + str(out)
        assert sim.stats.requests == 1


@pytest.mark.slow
async def test_doctor_usage_errors_send_nothing(simulator: SimFactory, tmp_path: Path) -> None:
    """A --video that is no video URL or id is exit 2 with one line, before any request."""
    async with simulator(world=WORLD) as sim:
        code, _, err, _ = await doctor(sim, tmp_path, "--video", "https://example.com/nothing")
        assert code == 2 and "--video" in error_line(err)
        assert sim.stats.requests == 0


# ----- the simulator's switches ----------------------------------------------------------------------------


def test_reshape_drops_a_field_from_the_body_wrappers_and_list_items() -> None:
    """--drop-field removes the field from the body, its user/stats objects and list items (and their user), never
    from other nested objects; --add-field adds it to the body and list items."""
    body = {"id": "1", "user": {"id": "2", "stats": {"id": 3}}, "author": {"id": "4"},
            "videos": [{"id": "5", "user": {"id": "6"}}]}
    assert reshape(body, ["id"], []) == {"user": {"stats": {}}, "author": {"id": "4"}, "videos": [{"user": {}}]}
    assert reshape({"videos": [{"a": 1}]}, [], ["x"]) == {"videos": [{"a": 1, "x": "sim-added"}], "x": "sim-added"}
    assert body["id"] == "1"  # the world's own objects are never changed


def test_sim_config_refuses_an_unknown_endpoint_for_a_field_switch() -> None:
    """--drop-field with an endpoint the API does not have is a usage error naming it."""
    with pytest.raises(ValueError, match="no-such-thing:id"):
        SimConfig(drop_fields=(("no-such-thing", "id"),))


def test_live_latency_is_seeded_and_shaped_like_the_live_api() -> None:
    """--latency live: 0.4-9 s, median about 1.5 s, a long tail; the same draw for the same request."""
    low, high = LIVE_LATENCY
    draws = [live_latency(hash64(1, n), low, high) for n in range(4000)]
    assert min(draws) >= 0.4 and max(draws) <= 9.0
    assert 1.35 <= statistics.median(draws) <= 1.65
    assert sum(d > 4.0 for d in draws) > 40 and sum(d < 0.6 for d in draws) > 40
    assert draws[:10] == [live_latency(hash64(1, n), low, high) for n in range(10)]


@pytest.mark.slow
async def test_doctor_all_needs_yes_and_then_checks_every_family(simulator: SimFactory, tmp_path: Path) -> None:
    """--all (15 families) is more than the handful: without --yes it is exit 2 before any request; with --yes it
    states 15 credits, every family is ok and the simulator counts one request on each of 15 endpoints."""
    async with simulator(world=WORLD) as sim:
        handle, _ = checked_user(sim.world)
        code, _, err, _ = await doctor(sim, tmp_path, "--handle", handle, "--all")
        assert code == 2 and "--yes" in error_line(err) and sim.stats.requests == 0
        code, report, err, stated = await doctor(sim, tmp_path, "--handle", handle, "--all", "--yes", "--json")
        assert isinstance(report, dict)
        assert code == 0 and stated == 15, (err, report)
        assert {e["status"] for e in report["endpoints"]} == {"ok"} and len(report["endpoints"]) == 15
        assert sim.stats.requests == 15 and len(sim.stats.by_endpoint) == 15, sim.stats.snapshot()


def test_sim_command_line_reads_the_field_and_latency_switches() -> None:
    """`crawler sim --drop-field E:F --add-field E:F --latency live` configure the simulator; a bad one is exit 2."""
    from crawler.sim.__main__ import _parser, config_from_args, main

    args = _parser().parse_args(["--drop-field", "post-detail:id", "--drop-field", "/user-posts/:title",
                                 "--add-field", "post-comments:shiny", "--latency", "live"])
    config = config_from_args(args)
    assert config.drop_fields == (("post-detail", "id"), ("user-posts", "title"))
    assert config.add_fields == (("post-comments", "shiny"),)
    assert config.latency == LIVE_LATENCY and config.latency_live
    plain = config_from_args(_parser().parse_args(["--latency", "0.1,0.2"]))
    assert plain.latency == (0.1, 0.2) and not plain.latency_live
    assert main(["--drop-field", "post-detail"]) == 2


@pytest.mark.slow
async def test_doctor_with_no_options_checks_the_default_handle_and_reports_ok(simulator: SimFactory,
                                                                                tmp_path: Path) -> None:
    """`crawler doctor` as a new user first types it: the default handle (@tiktok) exists in the simulator's world
    (its stand-in: the most followed public user), every family reads ok, exit 0, 5 requests."""
    async with simulator(world=WORLD) as sim:
        code, out, err, stated = await doctor(sim, tmp_path)
        assert code == 0, out + err
        assert stated == 5 and sim.stats.requests == 5
        assert "every answer reads as the parsers expect" in out + err
