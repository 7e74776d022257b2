"""Issue 23, items 2, 4 and 6 (`--date`): ingest counts the private users whose posts it skips (`--include-private`
walks them), a gain over a window needs two snapshots in it, and a `--date` after today needs `--force-date`.
History-store tests run on SQLite and on the PostgreSQL server (never skipped); expected values come from the
simulator's world."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from crawler.cli import main
from crawler.history.store import HistoryStore
from crawler.runs.ingest import TEST_NOW_ENV
from crawler.sim.data import World
from crawler.sim.server import Simulator
from tests.conftest import SimFactory, fast_settings
from tests.serve_history import served
from tests.test_cli import FAST_TOML, crawler, environ, public_users
from tests.test_ingest import WORLD, day, rows, run, store_url, write_watch
from tests.test_serve import _get, _parse

__all__ = ["store_url"]  # the fixture (both stores), used by name


def _private_users(w: World, n: int) -> list[int]:
    """n private users of the world."""
    found = [i for i in range(w.config.users) if (u := w.user(i)) is not None and u.private][:n]
    assert len(found) == n, "too few private users in the test world"
    return found


def _walked(sim: Simulator) -> list[str]:
    """The user id of every `/user-posts/` request the simulator answered."""
    out = []
    for target in sim.stats.targets:
        parts = urlsplit(target)
        if parts.path.rstrip("/") == "/user-posts":
            out.extend(parse_qs(parts.query)["userid"])
    return out


@pytest.mark.slow
async def test_private_users_are_counted_not_walked_and_include_private_walks_them(simulator: SimFactory,
                                                                                    tmp_path: Path,
                                                                                    store_url: str) -> None:
    """A run with --posts sends no `/user-posts/` request for the world's private users and says how many it
    skipped (summary and summary JSON); --include-private walks them: each answers an error, a `private` row."""
    async with simulator(world=WORLD, record_arrivals=True) as sim:
        w = sim.world
        public, private = public_users(w, 3, max_videos=30), _private_users(w, 2)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in public + private])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        args = ["ingest", "watch.txt", "--out-dir", "out", "--posts", "--history-url", store_url]
        code, _, err = await crawler([*args[:4], "--include-private"], env, tmp_path)  # without --posts: no walk
        assert code == 2 and "add --posts" in err and len(err.strip().splitlines()) == 1, err
        assert sim.stats.requests == 0 and not (tmp_path / "out").exists()
        code, _, err = await crawler([*args, "--summary-json", "first.json"], env, tmp_path)
        assert code == 0, err
        assert set(_walked(sim)) == {w.user_id(i) for i in public}
        assert "2 private users: posts not walked (their lists answer an error); --include-private walks them" in err
        assert json.loads((tmp_path / "first.json").read_text())["private_skipped"] == 2

        before = len(_walked(sim))
        code, _, err = await crawler([*args, "--include-private", "--summary-json", "second.json"], env, tmp_path)
        assert code == 3, err  # their walks failed: the API answers a private account's list with an error
        assert sorted(_walked(sim)[before:]) == sorted(w.user_id(i) for i in private)  # the same night: only theirs
        failed = rows(tmp_path / "out" / f"posts-{day(0)}.failures.csv")
        assert sorted((f["input"], f["reason"]) for f in failed) == sorted((w.handle(i), "private") for i in private)
        assert json.loads((tmp_path / "second.json").read_text())["private_skipped"] == 0
        assert "private users: posts not walked" not in err

        # The next night, profiles first (no --posts), then --posts: the private users are counted again, not walked.
        env[TEST_NOW_ENV] = "2026-01-02T03:00:00"
        code, _, err = await crawler([a for a in args if a != "--posts"], env, tmp_path)
        assert code == 0, err
        before = len(_walked(sim))
        code, _, err = await crawler([*args, "--summary-json", "third.json"], env, tmp_path)
        assert code == 0, err
        assert set(_walked(sim)[before:]) <= {w.user_id(i) for i in public}
        assert json.loads((tmp_path / "third.json").read_text())["private_skipped"] == 2


async def test_a_missed_night_gives_no_one_day_gain_in_top_or_on_the_page(simulator: SimFactory, tmp_path: Path,
                                                                         store_url: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Nights 0 and 2 ingested, night 1 missed: over 1 day every user has a single snapshot, so `history top
    --days 1` lists no one and the page's 1-day cells are empty (not +0); over 7 days the gains are the world's."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 4, max_videos=30)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=store_url)
        followers: dict[str, list[int]] = {w.user_id(i): [] for i in watch}
        for d in (0, 2):
            result = await run(tmp_path, settings, d, with_posts=False)
            assert result.exit_code == 0, result.outcomes
            for i in watch:
                u = w.user(i)
                assert u is not None
                followers[u.user_id].append(u.followers)
            sim.advance_day(2)
    gained = {uid: b - a for uid, (a, b) in followers.items()}
    store = HistoryStore(store_url)
    try:
        assert store.top("followers-gained", days=1, limit=100) == []
        assert {t.user_id: t.gained for t in store.top("followers-gained", days=7, limit=100)} == gained
    finally:
        store.close()
    capsys.readouterr()
    assert main(["history", "top", "--days", "1", "--history-url", store_url]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []
    async with served(store_url) as base:
        page = {r[0]: r[4:] for r in _parse((await _get(base + "/"))[1])}
    assert page == {uid: (None, g, g) for uid, g in gained.items()}


@pytest.mark.slow
async def test_a_date_after_today_needs_force_date(simulator: SimFactory, tmp_path: Path) -> None:
    """`--date` a day after today (the run's clock, UTC) is exit 2 with one line naming today and --force-date,
    before any request or file; with --force-date the run records under that day."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in public_users(w, 2, max_videos=30)])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T23:30:00"}
        args = ["ingest", "watch.txt", "--out-dir", "out", "--history-url", str(tmp_path / "h.db"),
                "--date", "2026-01-02"]
        code, _, err = await crawler(args, env, tmp_path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "2026-01-01" in lines[0] and "--force-date" in lines[0], err
        assert sim.stats.requests == 0
        assert not (tmp_path / "out").exists() and not (tmp_path / "h.db").exists()
        code, _, err = await crawler([*args[:-2], "--date", "2026-01-01"], env, tmp_path)  # today is fine
        assert code == 0, err
        code, _, err = await crawler([*args, "--force-date"], env, tmp_path)
        assert code == 0, err
    store = HistoryStore(str(tmp_path / "h.db"))
    try:
        assert store.last_day() == dt.date(2026, 1, 2)
    finally:
        store.close()
