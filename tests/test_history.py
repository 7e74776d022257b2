"""The daily ingest and the history queries, on SQLite and on the PostgreSQL server (never skipped)."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from crawler.history.export import export_csv
from crawler.history.plot import plot_growth
from crawler.history.store import HistoryStore
from crawler.runs.ingest import ingest
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory, fast_settings
from tests.pg import private_schema, schema_url

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAY0 = dt.date(2026, 1, 1)
WORLD = WorldConfig(seed=21, users=3_000, rename_probability=0.15, private_fraction=0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh history store URL: a SQLite file, or a private schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "history.db")
        return
    with private_schema() as schema:
        yield schema_url(schema)


def _watch_list(world: World, n: int) -> list[int]:
    """User indexes with small post counts: some private, several renamed during the week."""
    picked: list[int] = []
    renamed = 0
    for i in range(world.config.users):
        u = world.user(i)
        if u is None or u.videos > 60:
            continue
        future = World(world.config)
        future.advance(6)
        changes = future.renames(i) > world.renames(i)
        if changes and renamed < 3:
            renamed += 1
            picked.append(i)
        elif not changes and len(picked) - renamed < n - 3:
            picked.append(i)
        if len(picked) == n:
            break
    return picked


async def _week(sim: Simulator, tmp: Path, url: str, days: int = 7) -> tuple[list[int], dict[tuple[str, str], int]]:
    """Ingest `days` simulated days; return the watch list and the world's followers per (user id, day)."""
    w = sim.world
    watch = _watch_list(w, 12)
    (tmp / "watch.txt").write_text("\n".join(w.handle(i) for i in watch) + "\n")
    settings = fast_settings(sim.url, data_dir=str(tmp / "data"), history_url=url)
    truth: dict[tuple[str, str], int] = {}
    for d in range(days):
        day = (DAY0 + dt.timedelta(days=d)).isoformat()
        result = await ingest(str(tmp / "watch.txt"), tmp / "out", settings, api_key=KEY, date=day,
                              with_posts=True, install_signals=False)
        assert result.exit_code in (0, 3), result.outcomes
        for i in watch:
            u = w.user(i)
            assert u is not None
            truth[(u.user_id, day)] = u.followers
        sim.advance_day()
    return watch, truth


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


async def test_a_week_of_days_answers_growth_top_as_of_and_export(simulator: SimFactory, tmp_path: Path,
                                                                  history_url: str) -> None:
    """Seven ingested days give exactly the world's followers per day in growth, top, as-of and export."""
    async with simulator(world=WORLD) as sim:
        watch, truth = await _week(sim, tmp_path, history_url)
        w = sim.world
    store = HistoryStore(history_url)
    try:
        days = sorted({d for _, d in truth})
        for i in watch:
            uid = w.user_id(i)
            first_handle = World(WORLD).handle(i)
            rows = store.growth(first_handle)
            assert [(r.day, r.followers) for r in rows] == [(d, truth[(uid, d)]) for d in days]
            deltas = [truth[(uid, b)] - truth[(uid, a)] for a, b in itertools.pairwise(days)]
            assert [r.delta for r in rows[1:]] == deltas
            assert store.count(uid) == len(days)
        top = store.top("followers-gained", days=6, limit=100)
        want = sorted(((truth[(w.user_id(i), days[-1])] - truth[(w.user_id(i), days[0])], w.user_id(i))
                       for i in watch), key=lambda t: -t[0])
        assert sorted((t.gained, t.user_id) for t in top) == sorted(want)
        assert [t.gained for t in top] == sorted((g for g, _ in want), reverse=True)
        mid = dt.date.fromisoformat(days[3])
        assert {(r[0], r[4]) for r in store.as_of(mid)} == {(w.user_id(i), truth[(w.user_id(i), days[3])])
                                                             for i in watch}
        export = tmp_path / "all.csv"
        assert export_csv(store, export) == len(truth)
        assert {(r["user_id"], r["day"]): int(r["followers"]) for r in _rows(export)} == truth
    finally:
        store.close()


async def test_posts_are_fetched_incrementally_and_renames_keep_one_history(simulator: SimFactory,
                                                                           tmp_path: Path) -> None:
    """Each day's posts CSV holds only posts new that day; a renamed account is one user under both handles."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        before: dict[int, set[str]] = {}
        watch: list[int] = []
        url = str(tmp_path / "h.db")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        for d in range(4):
            if d == 0:
                watch = _watch_list(w, 10)
                (tmp_path / "watch.txt").write_text("\n".join(w.handle(i) for i in watch) + "\n")
            day = (DAY0 + dt.timedelta(days=d)).isoformat()
            by_day_requests = sim.stats.by_endpoint["/user-posts"]
            await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY, date=day,
                         with_posts=True, install_signals=False)
            now = {i: {p.video_id for p in w.posts(i)} for i in watch if not w.is_private(i)}
            got = {r["video_id"] for r in _rows(tmp_path / "out" / f"posts-{day}.csv")}
            want = set().union(*(now[i] - before.get(i, set()) for i in now))
            assert got == want
            if d > 0:  # a day with few new posts costs about one page per public user, not the whole list
                assert sim.stats.by_endpoint["/user-posts"] - by_day_requests <= len(now) + len(want) // 30 + 1
            before = now
            if d < 3:
                sim.advance_day()
        renamed = [i for i in watch if w.renames(i) > 0]
        assert renamed, "the watch list should contain a renamed account"
    store = HistoryStore(url)
    try:
        for i in renamed:
            old = World(WORLD).handle(i)
            assert store.resolve(old) == store.resolve(w.handle(i)) == (w.user_id(i), w.handle(i))
            assert store.count(w.user_id(i)) == 4
    finally:
        store.close()


async def test_same_day_rerun_keeps_one_snapshot_and_spends_nothing(simulator: SimFactory, tmp_path: Path,
                                                                   history_url: str) -> None:
    """Re-running a finished day spends nothing; --restart replaces that day's snapshots, never adds."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = _watch_list(w, 6)
        (tmp_path / "watch.txt").write_text("\n".join(w.handle(i) for i in watch) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=history_url)
        run = dict(api_key=KEY, date="2026-02-01", install_signals=False)
        await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, **run)  # type: ignore[arg-type]
        spent = sim.stats.requests
        again = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, **run)  # type: ignore[arg-type]
        assert sim.stats.requests == spent
        assert again.outcomes[0].summary.status == "already complete"
        sim.advance_day()  # counts change: the restarted day must replace, not add
        await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, restart=True, **run)  # type: ignore[arg-type]
    store = HistoryStore(history_url)
    try:
        assert store.count() == len(watch)
        i = watch[0]
        assert store.growth(w.handle(i))[-1].followers == w.user(i).followers  # type: ignore[union-attr]
    finally:
        store.close()


async def test_hostile_handles_never_write_outside_the_output_directory(simulator: SimFactory,
                                                                        tmp_path: Path) -> None:
    """Path-like, absolute, very long and non-ASCII handles are invalid input; only DIR gets files."""
    async with simulator(world=WORLD) as sim:
        hostile = ["../x", "../../etc/passwd", "/tmp/abs", "a" * 300, "ñandú", "..", "x/../../y", "C:\\evil",
                   sim.world.handle(0)]
        work = tmp_path / "work"
        work.mkdir()
        (work / "watch.txt").write_text("\n".join(hostile) + "\n")
        settings = fast_settings(sim.url, data_dir=str(work / "data"), history_url=str(work / "data" / "h.db"))
        result = await ingest(str(work / "watch.txt"), work / "out", settings, api_key=KEY, date="2026-03-01",
                              with_posts=True, install_signals=False)
        assert result.exit_code == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["data", "out", "watch.txt"]
    names = sorted(p.name for p in (work / "out").iterdir() if p.name not in (".ingest.lock", ".ingest-id"))
    assert all(n.startswith(("profiles-2026-03-01.", "posts-2026-03-01.")) for n in names), names
    failures = _rows(work / "out" / "profiles-2026-03-01.failures.csv")
    assert sum(r["reason"] == "invalid_input" for r in failures) == len(hostile) - 1


def _series_pixels(png: Path) -> dict[str, int]:
    """How many pixels of each of the first four matplotlib series colours the PNG holds."""
    import numpy as np
    from PIL import Image

    colours = {"C0": (31, 119, 180), "C1": (255, 127, 14), "C2": (44, 160, 44), "C3": (214, 39, 40)}
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    return {name: int((np.abs(pixels - np.array(rgb)).sum(axis=2) < 30).sum()) for name, rgb in colours.items()}


async def test_plot_draws_one_series_per_requested_handle(simulator: SimFactory, tmp_path: Path) -> None:
    """The PNG decodes and holds a visible curve in a distinct colour for each handle, and no extra one."""
    async with simulator(world=WORLD) as sim:
        watch, _ = await _week(sim, tmp_path, str(tmp_path / "h.db"), days=4)
        handles = [World(WORLD).handle(i) for i in watch[:3]]
    store = HistoryStore(str(tmp_path / "h.db"))
    try:
        labels = plot_growth(store, handles, tmp_path / "g.png")
        two = plot_growth(store, handles[:2], tmp_path / "g2.png")
    finally:
        store.close()
    assert len(labels) == 3 and len(two) == 2
    counts = _series_pixels(tmp_path / "g.png")
    assert min(counts["C0"], counts["C1"], counts["C2"]) > 100 and counts["C3"] < 20
    counts2 = _series_pixels(tmp_path / "g2.png")
    assert min(counts2["C0"], counts2["C1"]) > 100 and counts2["C2"] < 20
