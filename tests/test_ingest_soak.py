"""Thirty simulated nights of `ingest --posts`: faults, SIGKILLs, a skipped night, a budget stop, renames,
deleted posts, new posts daily and a watch-list edit; then every snapshot, post and day is checked against
the simulator's world, and the maintained per-user data against a recomputation from the snapshots."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from pathlib import Path

import pytest

from crawler.history.store import HistoryStore
from crawler.runs.ingest import TEST_NOW_ENV, ingest
from crawler.sim.data import VIDEO_ID_BASE, VIDEO_SLOTS, World, WorldConfig
from crawler.sim.server import FAULT_KINDS
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_cli import FAST_TOML, crawler, environ
from tests.test_history_ready import assert_ready_matches
from tests.test_ingest import day, night, posts_union, rows, store_url  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow  # a soak: thirty nights, each a run of its own

WORLD = WorldConfig(seed=77, users=4_000, missing_fraction=0.0, rename_probability=0.02, delete_probability=0.08)
NIGHTS = 30
# night -> kill point (killpoints.py; in ingest "written"/"fsynced" come only with rows): night 4 dies with rows
# in its day files it never committed, night 13 inside a store transaction and is run again the same night.
KILLED = {4: "fsynced:5", 13: "committing:9"}
SKIPPED = 8
BUDGET_NIGHT, BUDGET = 10, 25
EDIT_NIGHT = 15
FAULTS = frozenset(FAULT_KINDS - {"slow"})  # "slow" only adds read timeouts: the same failures, slower


def _watch(w: World) -> tuple[list[int], list[int]]:
    """52 users (4 with 300-600 posts, a few private) and 4 more the edit adds."""
    big, small, later = [], [], []
    for i in range(w.config.users):
        u = w.user(i)
        if u is None:
            continue
        if 300 < u.videos <= 600 and not u.private and len(big) < 4:
            big.append(i)
        elif 1 <= u.videos <= 80 and len(small) < 48:
            small.append(i)
        elif 1 <= u.videos <= 80 and not u.private and len(later) < 4:
            later.append(i)
        if len(big) == 4 and len(small) == 48 and len(later) == 4:
            break
    return big + small, later


async def test_thirty_nights_hold_every_snapshot_and_post_exactly_once(simulator: SimFactory, tmp_path: Path,
                                                                       store_url: str) -> None:  # noqa: F811
    """After 30 nights every snapshot has the world's counts of its day, every post the world shows is in the
    posts files exactly once, no night blocked another, and `history days`, growth and top match the world."""
    url = store_url
    out = tmp_path / "out"
    (tmp_path / "config.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD, faults=FAULTS) as sim:
        w = sim.world
        watch, later = _watch(w)
        truth: dict[tuple[str, str], int] = {}  # (user id, day) -> the world's followers that night
        exits: dict[int, int] = {}
        billed_on: dict[int, int] = {}
        names: dict[int, str] = {}
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        for d in range(NIGHTS):
            if d:
                sim.advance_day()
            if d == SKIPPED:
                continue
            if d == EDIT_NIGHT:
                watch = watch[2:] + later
            names = {i: names.get(i) or w.handle(i) for i in watch}  # a name stays as written when it was added
            (tmp_path / "watch.txt").write_text("\n".join(names[i] for i in watch) + "\n")
            for i in watch:
                u = w.user(i)
                assert u is not None
                truth[(u.user_id, day(d))] = u.followers
            clean = d >= NIGHTS - 3
            sim.config = dataclasses.replace(sim.config, fault_rate=0.0 if clean else 0.08)
            tonight = settings.replace(retry_attempts=5 if clean else 2,
                                       max_credits=BUDGET if d == BUDGET_NIGHT else None)
            billed = sim.stats.billed[KEY]
            if d in KILLED:
                env = environ(sim) | {TEST_NOW_ENV: night(d)().isoformat(), "CRAWLER_TEST_KILL_AT": KILLED[d]}
                code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "--posts", "-q", "--retries",
                                              "2", "--history-url", url, "--data-dir", "data"], env, tmp_path)
                assert code == -9, err
                if d == 4:
                    exits[d] = code
                    continue
            result = await ingest(str(tmp_path / "watch.txt"), out, tonight, api_key=KEY, with_posts=True,
                                  install_signals=False, clock=night(d))
            exits[d] = result.exit_code
            billed_on[d] = sim.stats.billed[KEY] - billed
        final = w.day
        shown = {p.video_id for i in watch if not w.is_private(i) for p in w.posts(i)}

    assert exits[BUDGET_NIGHT] == 4
    assert all(exits[d] == 0 for d in range(NIGHTS - 3, NIGHTS)), exits
    store = HistoryStore(url)
    try:
        snaps = {(r[0], r[1]): r for r in store.snapshots()}
        # every snapshot carries the world's counts of its own day; each day file holds exactly that day's users
        assert all(r[4] == truth[key] for key, r in snaps.items())
        for d in set(range(NIGHTS)) - {SKIPPED}:
            file_rows = rows(out / f"profiles-{day(d)}.csv")
            ids = [r["user_id"] for r in file_rows]
            assert len(ids) == len(set(ids)), d
            assert set(ids) == {u for u, sd in snaps if sd == day(d)}, d
            assert all(int(r["followers"]) == truth[(r["user_id"], day(d))] for r in file_rows)
        # no night was blocked: each one that ran recorded its own day; completed nights cover the list
        runs_on = {d.day: d for d in store.days()}
        for d in set(range(NIGHTS)) - {SKIPPED}:
            assert runs_on[day(d)].snapshotted > 0, d
        for d in range(NIGHTS - 3, NIGHTS):
            assert runs_on[day(d)].snapshotted == len(watch) and runs_on[day(d)].missing == 0
        assert runs_on[day(SKIPPED)].gap and not runs_on[day(SKIPPED)].runs
        budget = runs_on[day(BUDGET_NIGHT)]
        assert budget.runs == ("exit 4",) and budget.requests_sent == BUDGET
        assert budget.credits_billed == billed_on[BUDGET_NIGHT]
        assert "killed or still running" in runs_on[day(4)].runs
        assert sorted(runs_on[day(13)].runs) in (["exit 0", "killed or still running"],
                                                 ["exit 3", "killed or still running"])
        # every post the world shows is in the posts files exactly once, and in the file of the day it was stored
        union = posts_union(out)
        assert shown <= set(union)
        assert max(union.values()) == 1
        first = dict(store._rows("SELECT video_id, first_day FROM posts"))
        for path in out.glob("posts-????-??-??.csv"):
            assert all(store._day(first[r["video_id"]]) == path.name[6:16] for r in rows(path))
        deleted = [v for v in union if v not in shown and (int(v) - VIDEO_ID_BASE) // VIDEO_SLOTS in set(watch)]
        assert deleted, "a post stored earlier was deleted in the world"
        # renames: recorded with the day the profile first showed the new handle; growth follows the user
        renames = store.renames()
        assert renames
        for r in renames:
            i = int(r.user_id) - 6_800_000_000_000_000_000
            then = World(WORLD)
            then.advance(dt.date.fromisoformat(r.day).toordinal() - dt.date(2026, 1, 1).toordinal())
            assert then.handle(i) == r.new
        for r in renames[:3]:
            growth = store.growth(r.old)
            assert [(g.day, g.followers) for g in growth] == sorted(
                (sd, truth[(u, sd)]) for u, sd in snaps if u == r.user_id)
        top = store.top("followers-gained", days=6, limit=200)
        end = dt.date.fromisoformat(day(NIGHTS - 1))
        window = [(u, sd) for u, sd in snaps if dt.date.fromisoformat(sd) >= end - dt.timedelta(days=6)]
        want: dict[str, int] = {}
        for u in {u for u, _ in window}:
            days = sorted(sd for uu, sd in window if uu == u)
            if len(days) > 1:  # a single snapshot in the window is no gain
                want[u] = truth[(u, days[-1])] - truth[(u, days[0])]
        assert {t.user_id: t.gained for t in top} == want
        # the per-user data the overview and `top --days 1|7|30` read equals a recomputation from the snapshots
        assert_ready_matches(store)
        assert final == NIGHTS - 1
        assert Counter(exits.values())[4] == 1
    finally:
        store.close()
