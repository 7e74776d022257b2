"""Scheduled ingest: UTC fetch days, day files, posts watermarks, per-run budgets, exit lines, names bound to users.

History-store tests run on SQLite and on the PostgreSQL server (never skipped). Expected values come from the
simulator's world.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import fcntl
import os
import shlex
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crawler.config import Settings
from crawler.history.store import HistoryStore
from crawler.runs.ingest import TEST_NOW_ENV, IngestResult, ingest
from crawler.sim.data import World, WorldConfig
from tests.conftest import KEY, SimFactory, fast_settings
from tests.pg import private_schema, schema_url
from tests.test_cli import FAST_TOML, crawler, environ, public_users

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY0 = dt.date(2026, 1, 1)
WORLD = WorldConfig(seed=41, users=3_000, missing_fraction=0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh history store URL: a SQLite file, or a private schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "history.db")
        return
    with private_schema() as schema:
        yield schema_url(schema)


def night(d: int, hour: int = 3) -> Callable[[], dt.datetime]:
    """A clock standing at `hour` UTC of night `d` (day 0 = 2026-01-01)."""
    when = dt.datetime(2026, 1, 1, hour, tzinfo=dt.UTC) + dt.timedelta(days=d)
    return lambda: when


def day(d: int) -> str:
    return (DAY0 + dt.timedelta(days=d)).isoformat()


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def posts_union(out: Path) -> Counter[str]:
    """How many times each video id appears across every posts-*.csv."""
    seen: Counter[str] = Counter()
    for path in sorted(out.glob("posts-*.csv")):
        if not path.name.endswith(".failures.csv"):
            seen.update(r["video_id"] for r in rows(path))
    return seen


def write_watch(path: Path, names: list[str]) -> None:
    path.write_text("\n".join(names) + "\n")


async def run(tmp: Path, settings: Settings, d: int, **options: object) -> IngestResult:
    options.setdefault("with_posts", True)
    return await ingest(str(tmp / "watch.txt"), tmp / "out", settings, api_key=KEY, install_signals=False,
                        clock=night(d), **options)  # type: ignore[arg-type]


def snapshots(url: str) -> dict[tuple[str, str], int | None]:
    """(user id, day) -> followers of every snapshot in the store."""
    store = HistoryStore(url)
    try:
        return {(r[0], r[1]): r[4] for r in store.snapshots()}
    finally:
        store.close()


# --- item 1: a walk cut short continues; the watermark moves only when a walk is complete ---

async def test_a_walk_cut_by_failures_on_the_first_night_is_finished_the_next(simulator: SimFactory, tmp_path: Path,
                                                                              store_url: str) -> None:
    """Posts walks that fail mid-list on night one are continued on night two: every post lands exactly once."""
    async with simulator(world=WORLD, fault_rate=0.35, faults=frozenset({"5xx"})) as sim:
        w = sim.world
        watch = public_users(w, 8, min_videos=150, max_videos=400)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url, retry_attempts=2)
        first = await run(tmp_path, settings, 0)
        assert first.exit_code == 3
        failed = rows(tmp_path / "out" / f"posts-{day(0)}.failures.csv")
        assert any(f["reason"] == "retries_exhausted" for f in failed)
        got = posts_union(tmp_path / "out")
        cut = [i for i in watch if 0 < len({p.video_id for p in w.posts(i)} & set(got)) < w.user(i).videos]  # type: ignore[union-attr]
        assert cut, "a walk should have failed after its first page"
        sim.config = dataclasses.replace(sim.config, fault_rate=0.0)
        sim.advance_day()
        second = await run(tmp_path, settings, 1)
        assert second.exit_code == 0, second.outcomes
        got = posts_union(tmp_path / "out")
        for i in watch:
            assert {p.video_id for p in w.posts(i)} <= set(got), i
        assert max(got.values()) == 1


# --- item 2: --max-credits caps the whole run ---

async def test_max_credits_caps_profiles_and_posts_together(simulator: SimFactory, tmp_path: Path,
                                                            store_url: str) -> None:
    """A run with --max-credits 15 sends exactly 15 requests in all, and `history days` bills the day for them."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 10, min_videos=40, max_videos=100)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url, max_credits=15)
        result = await run(tmp_path, settings, 0)
        assert result.exit_code == 4
        assert sim.stats.requests == 15
        assert sum(o.summary.requests_sent for o in result.outcomes) == 15
        assert sim.stats.by_endpoint["/user-posts"] > 0  # the budget is shared, not spent by profiles alone
        billed = sim.stats.billed[KEY]
    store = HistoryStore(store_url)
    try:
        (d0,) = store.days()
        assert (d0.day, d0.credits_billed, d0.requests_sent, d0.runs) == (day(0), billed, 15, ("exit 4",))
    finally:
        store.close()


# --- item 3: no run blocks a later one ---

async def test_a_budget_stop_an_edited_list_and_a_missed_night_never_block_later_nights(
        simulator: SimFactory, tmp_path: Path, store_url: str) -> None:
    """Budget-stopped nights, an edited watch list and a skipped night: every night records its own day only."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 12, max_videos=30)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch[:10]])
        capped = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url, max_credits=6)
        assert (await run(tmp_path, capped, 0, with_posts=False)).exit_code == 4
        # config.toml's budget stays: the next night still gets its own day and its own budget
        assert (await run(tmp_path, capped, 1, with_posts=False)).exit_code == 4
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch[2:12]])  # edited after a stopped night
        free = capped.replace(max_credits=None)
        sim.advance_day()
        assert (await run(tmp_path, free, 2)).exit_code == 0
        sim.advance_day(2)  # night 3 is missed (a reboot): night 4 covers its own day
        assert (await run(tmp_path, free, 4)).exit_code == 0
    got = snapshots(store_url)
    by_day = Counter(d for _, d in got)
    assert by_day == {day(0): 6, day(1): 6, day(2): 10, day(4): 10}
    ids = {w.user_id(i) for i in watch[2:12]}
    assert {u for u, d in got if d == day(4)} == ids
    store = HistoryStore(store_url)
    try:
        days = {d.day: d for d in store.days()}
        assert [d for d, r in days.items() if r.gap] == [day(3)]
        assert days[day(0)].runs == ("exit 4",) and days[day(2)].runs == ("exit 0",)
        assert days[day(2)].missing == 0
    finally:
        store.close()


async def test_each_user_once_per_utc_day_across_runs_midnight_and_restart(simulator: SimFactory, tmp_path: Path,
                                                                           store_url: str) -> None:
    """A run spanning midnight writes both days' files; a later run adds only new users; --restart replaces."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 9, max_videos=20)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch[:6]])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url, parallelism=1)
        calls = 0

        def clock() -> dt.datetime:  # the run's clock passes midnight after a few profiles
            nonlocal calls
            calls += 1
            base = dt.datetime(2026, 1, 1, 23, 59, 59, tzinfo=dt.UTC)
            return base if calls < 12 else base + dt.timedelta(seconds=2)

        result = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY,
                              install_signals=False, clock=clock, with_posts=False)
        assert result.exit_code == 0 and [d.isoformat() for d in result.days] == [day(0), day(1)]
        p0, p1 = (rows(tmp_path / "out" / f"profiles-{day(d)}.csv") for d in (0, 1))
        assert p0 and p1 and len(p0) + len(p1) == 6
        assert {r["user_id"] for r in p0}.isdisjoint(r["user_id"] for r in p1)
        # later on day 1: the same list fetches only those without a day-1 snapshot; an edit adds its new users
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        before = sim.stats.requests
        await run(tmp_path, settings, 1, with_posts=False)
        assert sim.stats.requests - before == 6 - len(p1) + 3
        p1 = rows(tmp_path / "out" / f"profiles-{day(1)}.csv")
        assert sorted(r["user_id"] for r in p1) == sorted(w.user_id(i) for i in watch)
        again = await run(tmp_path, settings, 1, with_posts=False)
        assert again.outcomes[0].summary.status == "already complete"
        sim.advance_day()
        await run(tmp_path, settings, 1, with_posts=False, restart=True)
        p1 = rows(tmp_path / "out" / f"profiles-{day(1)}.csv")
        assert sorted(r["user_id"] for r in p1) == sorted(w.user_id(i) for i in watch)
        assert {r["user_id"]: int(r["followers"]) for r in p1} == {w.user_id(i): w.user(i).followers  # type: ignore[union-attr]
                                                                   for i in watch}
    got = snapshots(store_url)
    assert Counter(d for _, d in got) == {day(0): len(p0), day(1): 9}


# --- item 4: every exit line's advice, run as printed ---

def _printed_command(line: str) -> list[str]:
    """The `crawler ...` command an exit line ends with, as argv for `python -m crawler`."""
    assert ": crawler " in line, line
    return shlex.split(line.split(": crawler ", 1)[1])


@pytest.mark.slow
async def test_each_exit_line_prints_a_command_that_makes_progress(simulator: SimFactory, tmp_path: Path,
                                                                   store_url: str) -> None:
    """Budget stops, failed users, an empty balance and a held out-dir: each printed command moves on."""
    async with simulator(world=WORLD, keys={KEY: None, "small": 4}) as sim:
        w = sim.world
        watch = public_users(w, 8, min_videos=20, max_videos=60)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        url = store_url
        base = ["ingest", "watch.txt", "--out-dir", "out", "--posts", "-q", "--history-url", url]

        def stored() -> tuple[int, int]:
            return len(snapshots(url)), sum(posts_union(tmp_path / "out").values())

        # 1. --max-credits: exit 4, and the printed command goes on (each run has its own budget) until done
        code, _, err = await crawler([*base, "--max-credits", "7"], env, tmp_path)
        progress = [stored()]
        for _ in range(30):
            if code == 0:
                break
            assert code == 4, err
            line = err.strip().splitlines()[-1]
            assert "each run has its own budget" in line
            code, _, err = await crawler(_printed_command(line), env, tmp_path)
            progress.append(stored())
            assert progress[-1] > progress[-2], "the printed command must make progress"
        assert code == 0
        assert progress[-1] == (8, sum(w.user(i).videos for i in watch))  # type: ignore[union-attr]
        # 2. --max-credits 0 cannot make progress: the line says so instead of a command
        code, _, err = await crawler([*base, "--max-credits", "0"], env | {TEST_NOW_ENV: "2026-01-02T03:00:00"},
                                     tmp_path)
        assert code == 4 and "raise it" in err.strip().splitlines()[-1] and ": crawler " not in err
        # 3. failed users: exit 3 names --retry-failed, which fetches them
        sim.config = dataclasses.replace(sim.config, fault_rate=0.5, faults=frozenset({"5xx"}))
        env3 = env | {TEST_NOW_ENV: "2026-01-03T03:00:00"}
        code, _, err = await crawler([*base, "--retries", "1"], env3, tmp_path)
        assert code == 3, err
        line = err.strip().splitlines()[-1]
        assert "--retry-failed" in line and "retries_exhausted" in line
        sim.config = dataclasses.replace(sim.config, fault_rate=0.0)
        before = Counter(d for _, d in snapshots(url))[day(2)]
        code, _, err = await crawler(_printed_command(line), env3, tmp_path)
        assert code == 0, err
        assert Counter(d for _, d in snapshots(url))[day(2)] == 8 > before
        assert not (tmp_path / "out" / f"profiles-{day(2)}.failures.csv").exists()
        # 4. an empty balance: exit 4 says top up; after a top-up the printed command goes on
        env4 = environ(sim, key="small") | {TEST_NOW_ENV: "2026-01-04T03:00:00"}
        code, _, err = await crawler(base, env4, tmp_path)
        line = err.strip().splitlines()[-1]
        assert code == 4 and "top up" in line
        sim.topup("small", 1000)
        code, _, err = await crawler(_printed_command(line), env4, tmp_path)
        assert code == 0 and Counter(d for _, d in snapshots(url))[day(3)] == 8
        # 5. a run that finds the out-dir held by a running ingest exits 0 with one line naming it
        fd = os.open(tmp_path / "out" / ".ingest.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, b"pid 4242, started 2026-01-05T01:00:00+00:00\n", 0)
            code, _, err = await crawler(base, env | {TEST_NOW_ENV: "2026-01-05T03:00:00"}, tmp_path)
        finally:
            os.close(fd)
        assert code == 0 and err.strip().splitlines() == [
            "crawler: the out-dir is held by a running ingest (pid 4242, started 2026-01-05T01:00:00+00:00); it"
            " covers today's users, so this run has nothing to do"]
        code, out, err = await crawler(["history", "days", "--history-url", url], env, tmp_path)
        assert code == 0, err
        lines = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert list(lines) == [day(0), day(1), day(2), day(3)]
        assert lines[day(0)].split()[1] == "8" and lines[day(0)].endswith("exit 4, exit 0")
        assert lines[day(1)].endswith("exit 4") and lines[day(2)].endswith("exit 3, exit 0")


# --- item 7: names are bound to users in the history store; the shared cache expires ---

async def test_watch_names_stay_bound_in_the_store_and_the_shared_cache_expires(simulator: SimFactory,
                                                                               tmp_path: Path,
                                                                               store_url: str) -> None:
    """Ingest follows a renamed user by id without refreshing the shared cache; an expired entry is resolved again."""
    world = dataclasses.replace(WORLD, rename_probability=0.3)
    async with simulator(world=world) as sim:
        w = sim.world
        later = World(world)
        later.advance(3)
        i = next(i for i in public_users(w, 50, max_videos=20) if later.renames(i) == 1)
        name = w.handle(i)
        write_watch(tmp_path / "watch.txt", [name])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url)
        await run(tmp_path, settings, 0, with_posts=False)  # by handle: the cache learns name -> id (night 0)
        sim.advance_day(3)
        assert w.handle(i) != name and w.index_by_handle(name) is None
        before = Counter(sim.stats.by_endpoint)
        result = await run(tmp_path, settings, 10, with_posts=True)  # ten days later: followed by id, not by name
        assert result.exit_code == 0
        spent = Counter(sim.stats.by_endpoint) - before
        assert spent["/userinfo-by-id"] == 1 and not spent["/userinfo-by-username"] and not spent["/userid"]
        from crawler.jobs.estimate import estimate
        from crawler.stores.users import UserDirectory

        # the entry learned on night 0 is trusted for 7 days; the by-id fetch on night 10 did not confirm it again
        for d, want in ((5, w.user_id(i)), (10, None)):
            cache = UserDirectory(tmp_path / "data" / "users.db", ttl_days=7, clock=lambda d=d: night(d)().timestamp())
            try:
                assert cache.user_id(name) == want, d
            finally:
                cache.close()
        est = estimate("posts", str(tmp_path / "watch.txt"), settings.job_limits(),
                       settings.replace(id_ttl_days=7).data_options())
        assert (est.lookups, est.known_ids) == (1, 0)
        fresh = estimate("posts", str(tmp_path / "watch.txt"), settings.job_limits(),
                       settings.replace(id_ttl_days=100_000).data_options())
        assert (fresh.lookups, fresh.known_ids) == (0, 1)
    store = HistoryStore(store_url)
    try:
        (rename,) = store.renames(w.user_id(i))
        assert (rename.old, rename.new, rename.day) == (name, w.handle(i), day(10))
        assert store.resolve(name)[0] == store.resolve(w.handle(i))[0] == w.user_id(i)
        assert [d.renames for d in store.days() if d.renames] == [(rename,)]
    finally:
        store.close()


@pytest.mark.slow
async def test_posts_by_name_after_the_ttl_resolves_the_name_again(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler posts NAME` after the id TTL asks /userid/ again: a renamed user's posts are not NAME's."""
    world = dataclasses.replace(WORLD, rename_probability=0.3)
    async with simulator(world=world) as sim:
        w = sim.world
        later = World(world)
        later.advance(3)
        i = next(i for i in public_users(w, 50, max_videos=20) if later.renames(i) == 1)
        name = w.handle(i)
        write_watch(tmp_path / "watch.txt", [name])
        (tmp_path / "config.toml").write_text(FAST_TOML + "[crawl]\nid_ttl_days = 7\n")
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "-q"], env, tmp_path)
        assert code == 0, err
        sim.advance_day(3)
        # ingest runs for ten days by id (the clock is CRAWLER_TEST_NOW); then a job asks for the name today
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "-q"],
                                     env | {TEST_NOW_ENV: "2026-01-11T03:00:00"}, tmp_path)
        assert code == 0, err
        code, out, err = await crawler(["history", "growth", name], env, tmp_path)
        assert code == 0, err
        assert out.splitlines()[-1].endswith(f"renamed @{name} -> @{w.handle(i)}") and day(10) in out.splitlines()[-1]
        (tmp_path / "name.txt").write_text(name + "\n")
        code, _, err = await crawler(["posts", "name.txt", "-o", "p.csv", "-q"], environ(sim), tmp_path)
        assert code == 3, err  # the name is nobody's now: not found, never the old owner's posts
        assert rows(tmp_path / "p.failures.csv")[0]["reason"] == "not_found"
        assert not rows(tmp_path / "p.csv")


async def test_v1_store_is_migrated_and_its_names_stay_bound(tmp_path: Path, store_url: str) -> None:
    """A version-1 store gains the v2 tables; names v1 resolved are bound to their users."""
    store = HistoryStore(store_url)
    try:
        store._exec("DELETE FROM schema_version WHERE version >= 2")
        for table in ("renames", "watch_names", "walks", "ingest_failures", "ingest_runs", "ingest_files", "claims"):
            store._exec(f"DROP TABLE {table}")
        store.bulk_users([("6800000000000000001", "alice", "2026-01-01", "2026-01-05")])
    finally:
        store.close()
    store = HistoryStore(store_url)
    try:
        assert store.bound_ids(["alice", "bob"]) == {"alice": "6800000000000000001"}
        assert store.renames() == [] and store.walk_state("6800000000000000001").through is None
    finally:
        store.close()



async def test_max_pages_bounds_a_day_per_user_and_max_items_is_the_horizon(simulator: SimFactory, tmp_path: Path,
                                                                            store_url: str) -> None:
    """--max-pages 2: two pages per user and day (a re-run the same day adds none), later days go on to the end;
    --max-items 40: the newest 40 make a user complete, and later days walk only what is new."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        big = public_users(w, 2, min_videos=200, max_videos=400)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in big])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url, max_pages=2)
        first = await run(tmp_path, settings, 0)
        assert first.exit_code == 0 and first.capped == 2
        assert sim.stats.by_endpoint["/user-posts"] == 4
        await run(tmp_path, settings, 0)  # the same day again: the day's pages are spent
        assert sim.stats.by_endpoint["/user-posts"] == 4
        d = 0
        while not {p.video_id for i in big for p in w.posts(i)} <= set(posts_union(tmp_path / "out")):
            d += 1
            assert d < 20, "the walks must reach the end of the lists"
            sim.advance_day()
            await run(tmp_path, settings, d)
        assert max(posts_union(tmp_path / "out").values()) == 1
        # the horizon: a fresh out-dir and store would be another watch list; here a new user joins
        small = public_users(w, 40, min_videos=100, max_videos=150)[-1]
        write_watch(tmp_path / "watch.txt", [w.handle(small)])
        horizon = settings.replace(max_pages=None, max_items=40)
        sim.advance_day()
        await run(tmp_path, horizon, d + 1)
        newest = list(w.posts(small))[:40]
        got = posts_union(tmp_path / "out")
        mine = {p.video_id for p in w.posts(small)}
        assert {v for v in got if v in mine} == {p.video_id for p in newest}
        mark = max(p.create_time for p in newest)
        before = sim.stats.by_endpoint["/user-posts"]
        while not any(p.create_time > mark for p in w.posts(small)):  # a day with a new post
            sim.advance_day()
        await run(tmp_path, horizon, d + 2)
        assert sim.stats.by_endpoint["/user-posts"] - before == 1  # only the new posts' page, not the old ones
        fresh = {p.video_id for p in w.posts(small) if p.create_time > mark}
        got = posts_union(tmp_path / "out")
        assert {v for v in got if v in {p.video_id for p in w.posts(small)}} == {p.video_id for p in newest} | fresh


async def test_auto_parallelism_grows_ingest_workers_with_the_latency(simulator: SimFactory, tmp_path: Path) -> None:
    """parallelism = "auto" in ingest at 100 requests per second: few workers at no latency, enough at 0.3 s to keep
    100/s busy (more than the 8 it starts with, counted at the simulator), every user snapshotted once, no 429."""
    chosen: dict[float, int] = {}
    in_flight: dict[float, int] = {}
    for latency in (0.0, 0.3):
        async with simulator(world=WORLD, latency=(latency, latency), rate_limit=100, rate_window=1.0,
                             burst_limit=100) as sim:
            w = sim.world
            watch = public_users(w, 150, max_videos=30)
            write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
            settings = fast_settings(sim.url, rate_enabled=True, rate_limit=100, rate_window=1.0,
                                     rate_max_per_second=100, parallelism=None,
                                     data_dir=str(tmp_path / f"data{latency}"),
                                     history_url=str(tmp_path / f"history{latency}.db"))
            result = await ingest(str(tmp_path / "watch.txt"), tmp_path / f"out{latency}", settings, api_key=KEY,
                                  install_signals=False, clock=night(0), with_posts=False)
            assert result.exit_code == 0
            assert sim.stats.served_429 == 0
            profiles = sim.stats.by_endpoint["/userinfo-by-username"] + sim.stats.by_endpoint["/userinfo-by-id"]
            assert profiles == len(watch)  # each user once
            chosen[latency] = result.outcomes[0].summary.parallelism
            in_flight[latency] = sim.stats.max_in_flight
    assert chosen[0.3] > chosen[0.0]
    assert chosen[0.3] >= 100 * 0.3  # enough requests in flight to keep 100/s busy at 0.3 s each
    assert in_flight[0.3] > 8, in_flight  # the simulator saw more at once than the fixed pool of 8 could send
