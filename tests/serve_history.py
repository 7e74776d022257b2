"""A history built by the simulator and the real `ingest` over twelve dated days, with what the world says it holds.

Day 4 is never ingested (a gap for everyone); one user is left out of the watch list on days 7 and 8 (a
gap of their own); two users carry hostile nicknames (set in the simulator's world, so they come through
the API like any nickname). Renames are recorded from the world (the handle a user had on consecutive
ingested days) through the store's public `record_rename`. Every expected value comes from the world.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from crawler.history.serve import make_app
from crawler.history.store import HistoryStore
from crawler.runs.ingest import ingest
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import SimConfig, Simulator
from tests.conftest import KEY, fast_settings

PG_URL = os.environ.get("CRAWLER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
WORLD = WorldConfig(seed=21, users=3_000, rename_probability=0.08, private_fraction=0.1)
DAY0 = dt.date(2026, 1, 1)
DAYS = 12
SKIPPED = {4}  # nobody ingested
ABSENT = {7, 8}  # the gap user is not in the watch list
HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(2)>')
FIELDS = ("followers", "following", "videos", "hearts")


@dataclass
class Built:
    """The store and the world's account of it."""

    url: str
    watch: list[int]
    days: list[str] = field(default_factory=list)  # ingested days, oldest first
    truth: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)  # uid -> day -> field -> value
    renames: list[tuple[str, str, str, str]] = field(default_factory=list)  # (uid, old, new, day)
    hostile: dict[str, str] = field(default_factory=dict)  # uid -> nickname
    gap_user: str = ""
    nicknames: dict[str, str] = field(default_factory=dict)  # uid -> last nickname seen

    @property
    def end(self) -> str:
        return self.days[-1]

    def latest(self, uid: str) -> tuple[str, dict[str, object]]:
        """(day, values) of the user's newest snapshot."""
        day = max(self.truth[uid])
        return day, self.truth[uid][day]

    def gain(self, uid: str, n: int, what: str = "followers") -> int | None:
        """`history top --days n`'s definition, from the world: last minus first value in [end - n, end] (None with
        fewer than two snapshots there)."""
        start = (dt.date.fromisoformat(self.end) - dt.timedelta(days=n)).isoformat()
        days = sorted(d for d in self.truth[uid] if start <= d <= self.end)
        if len(days) < 2:
            return None
        a, b = self.truth[uid][days[0]][what], self.truth[uid][days[-1]][what]
        return None if a is None or b is None else int(b) - int(a)  # type: ignore[call-overload]

    def handle(self, uid: str) -> str:
        return str(self.latest(uid)[1]["handle"])


def _watch(world: World, n: int) -> list[int]:
    """The first ``n`` users with few posts (deleted ones skipped): in this world, some are renamed during the run."""
    future = World(world.config)
    future.advance(DAYS)
    picked = [i for i in range(world.config.users) if (u := world.user(i)) is not None and u.videos <= 60][:n]
    assert sum(future.renames(i) > 0 for i in picked) >= 3 and sum(future.renames(i) == 0 for i in picked) >= 4
    return picked


async def build(url: str, tmp: Path) -> Built:
    """Ingest DAYS dated days from the simulator into ``url``; record renames; return the world's account."""
    config = SimConfig(world=WORLD, rate_limit=1_000_000, burst_limit=1_000_000)
    async with Simulator(config) as sim:
        w = sim.world
        watch = _watch(w, 12)
        future = World(WORLD)
        future.advance(DAYS)
        steady = [i for i in watch if future.renames(i) == 0]
        gap_user, hostile = steady[0], steady[1:3]
        w.nicknames.update({i: HOSTILE[k] for k, i in enumerate(hostile)})
        w.advance(0)  # forget users looked up before the nicknames were set
        built = Built(url, watch, gap_user=w.user_id(gap_user),
                      hostile={w.user_id(i): HOSTILE[k] for k, i in enumerate(hostile)})
        settings = fast_settings(sim.url, data_dir=str(tmp / "data"), history_url=url)
        previous: dict[str, str] = {}
        for d in range(DAYS):
            if d in SKIPPED:
                sim.advance_day()
                continue
            day = (DAY0 + dt.timedelta(days=d)).isoformat()
            todays = [i for i in watch if not (i == gap_user and d in ABSENT)]
            # The watch list names users by their first handle: ingest follows them by id after a rename.
            (tmp / "watch.txt").write_text("\n".join(World(WORLD).handle(i) for i in todays) + "\n")
            result = await ingest(str(tmp / "watch.txt"), tmp / "out", settings, api_key=KEY, date=day,
                                  with_posts=True, install_signals=False)
            assert result.exit_code in (0, 3), result.outcomes  # 3: a private user has no posts walk
            built.days.append(day)
            for i in todays:
                u = w.user(i)
                assert u is not None
                built.truth.setdefault(u.user_id, {})[day] = {
                    "handle": u.handle, "followers": u.followers, "following": u.following, "videos": u.videos,
                    "hearts": u.hearts}
                built.nicknames[u.user_id] = u.nickname
                old = previous.get(u.user_id)
                if old is not None and old != u.handle:
                    built.renames.append((u.user_id, old, u.handle, day))
                previous[u.user_id] = u.handle
            sim.advance_day()
    store = HistoryStore(url)
    try:
        for uid, old, new, day in built.renames:
            store.record_rename(uid, old, new, dt.date.fromisoformat(day))
    finally:
        store.close()
    assert len({r[0] for r in built.renames}) >= 3, "the world should rename some watched users"
    return built


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A history URL in a private schema of the PostgreSQL server (dropped afterwards; never skipped)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.asynccontextmanager
async def served(url: str, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """The history page on a free loopback port; yields its base URL (no trailing slash)."""
    runner = web.AppRunner(make_app(url, host=host), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
