"""The maintained per-user data (history/ready.py) equals a recomputation from the snapshots, on SQLite and on the
PostgreSQL server (never skipped): random stores with gaps, renames, missing counts, backfills and restarts; the
rebuild; the migration of a store without it; and the overview and `top` that read it answer what they computed
from the snapshots before."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest

from crawler.api.records import Profile
from crawler.errors import UsageError
from crawler.history import pages, ready
from crawler.history.db import SCHEMA_VERSION, SNAPSHOT_COLUMNS
from crawler.history.paging import overview_page
from crawler.history.queries import HistoryQueries
from crawler.history.serve import _sort_key
from crawler.history.store import HistoryStore
from tests.test_cli import crawler, environ
from tests.test_history import history_url  # noqa: F401  (the fixture)

DAY0 = dt.date(2026, 3, 1)


def recompute(store: HistoryStore) -> dict[str, tuple[Any, ...]]:
    """Every user's maintained values (ready.COLUMNS order), from the snapshots, written out longhand."""
    by_user: dict[str, list[tuple[Any, ...]]] = {}
    for r in store.snapshots():  # SNAPSHOT_COLUMNS: user_id, day, fetched_at, handle, followers, following,
        by_user.setdefault(str(r[0]), []).append(r)  # hearts, videos, ...
    out: dict[str, tuple[Any, ...]] = {}
    for (user_id,) in store._rows("SELECT user_id FROM users"):
        snaps = sorted(by_user.get(str(user_id), []), key=lambda r: store._day(r[1]))
        if not snaps:
            out[str(user_id)] = (None,) * len(ready.COLUMNS)
            continue
        last = snaps[-1]
        end = dt.date.fromisoformat(store._day(last[1]))
        values: list[Any] = [store._day(snaps[0][1]), store._day(last[1]), last[4], last[5], last[7], last[6]]
        for n in ready.KEPT:
            before = [s for s in snaps[:-1] if dt.date.fromisoformat(store._day(s[1])) >= end - dt.timedelta(days=n)]
            if not before:
                values += [None, None, None]
            else:
                f = before[0][4]
                values += [store._day(before[0][1]), f, None if f is None or last[4] is None else last[4] - f]
        out[str(user_id)] = tuple(values)
    return out


def stored(store: HistoryStore) -> dict[str, tuple[Any, ...]]:
    """What the store keeps (days as text)."""
    dates = {"s_first", "s_last", *(f"d{n}" for n in ready.KEPT)}
    rows = store._rows(f"SELECT user_id, {', '.join(ready.COLUMNS)} FROM users")
    return {str(r[0]): tuple(store._day(v) if c in dates and v is not None else v
                             for c, v in zip(ready.COLUMNS, r[1:], strict=True)) for r in rows}


def assert_ready_matches(store: HistoryStore) -> None:
    """The maintained data equals its recomputation, and the overview and every kept `top` read from it equal the
    same query computed from the snapshots."""
    assert stored(store) == recompute(store)
    end = store.last_day()
    if end is None:
        return
    ready_rows = sorted(store.overview((1, 7, 30)), key=lambda r: r.user_id)
    computed = sorted(store._overview_computed((1, 7, 30), end), key=lambda r: r.user_id)
    assert ready_rows == computed
    n = len(computed)
    for sort in (*pages.SORTS, *(f"-{s}" for s in pages.SORTS)):  # every order of the page, pages of 7
        want = sorted(computed, key=_sort_key(sort), reverse=sort == "-handle")
        for offset in (0, 7, n // 2, n - 3):
            assert overview_page(store, sort, offset, 7) == (want[offset:offset + 7], n), (sort, offset)
    for days in ready.WINDOWS:
        for limit in (3, n + 1):
            assert store.top("followers-gained", days, limit) == store.top("followers-gained", days, limit,
                                                                            until=end), (days, limit)


def _profile(rng: random.Random, user: int, handle: str) -> Profile:
    def count() -> int | None:
        return None if rng.random() < 0.1 else rng.randrange(0, 5_000)

    return Profile(user_id=str(1000 + user), handle=handle, nickname=f"N{user}", sec_uid="", signature="",
                   followers=count(), following=count(), hearts=count(), videos=count(),
                   likes=None, verified=False, private=False)


def fill(store: HistoryStore, seed: int, *, users: int = 30, days: int = 45) -> None:
    """Random nights: gaps per user and whole skipped days, renames, missing counts, a few backfills written out
    of order, a night written twice and a restart of one day."""
    rng = random.Random(seed)
    handles = {u: f"user_{u}" for u in range(users)}
    order = list(range(days))
    late = rng.sample(order[:-5], 4)  # backfilled after the rest
    skipped = set(rng.sample(order, 3))
    for d in [x for x in order if x not in late] + late:
        if d in skipped:
            continue
        day = DAY0 + dt.timedelta(days=d)
        for u in range(users):
            if rng.random() < 0.25:
                continue
            if rng.random() < 0.05:
                old, handles[u] = handles[u], f"user_{u}_{d}"
                store.record_rename(str(1000 + u), old, handles[u], day)
            store.record_snapshot(day, _profile(rng, u, handles[u]))
            if rng.random() < 0.05:  # the same night again: the row is replaced
                store.record_snapshot(day, _profile(rng, u, handles[u]))
    gone = DAY0 + dt.timedelta(days=rng.choice(order))
    store.restart_day(gone, {}, [str(1000 + u) for u in range(0, users, 2)])
    if rng.random() < 0.5:  # the newest day forgotten for some: stragglers
        store.restart_day(DAY0 + dt.timedelta(days=days - 1), {}, [str(1000 + u) for u in range(1, users, 3)])


@pytest.mark.parametrize("seed", range(4))
def test_maintained_data_equals_a_recomputation(history_url: str, seed: int) -> None:  # noqa: F811
    store = HistoryStore(history_url)
    try:
        fill(store, seed)
        assert_ready_matches(store)
        rng = random.Random(seed)
        # mid-night: the next day of a few users only, most are the day before's stragglers (ready.LATE)
        for u in range(3):
            store.record_snapshot(DAY0 + dt.timedelta(days=45), _profile(rng, u, f"user_{u}"))
        assert store._rows("SELECT COUNT(*) FROM users WHERE s_last = ?", ((DAY0 + dt.timedelta(days=44)).isoformat(),)
                           )[0][0] > 10
        assert_ready_matches(store)
        # the newest day of a few users only, days later: older stragglers, looked up per user
        for u in range(3):
            store.record_snapshot(DAY0 + dt.timedelta(days=50), _profile(rng, u, f"user_{u}"))
        assert_ready_matches(store)
    finally:
        store.close()


def test_rebuild_restores_damaged_data(history_url: str) -> None:  # noqa: F811
    store = HistoryStore(history_url)
    try:
        fill(store, 11)
        want = stored(store)
        store._exec("UPDATE users SET g7 = 999, s_last = NULL, followers = -1")
        assert stored(store) != want
        assert ready.rebuild_store(store) == len(want)
        assert stored(store) == want
        assert_ready_matches(store)
    finally:
        store.close()


def test_migration_fills_a_store_without_it(history_url: str) -> None:  # noqa: F811
    store = HistoryStore(history_url)
    try:
        fill(store, 5)
        want = stored(store)
        for n in ready.WINDOWS:  # back to a version 3 store
            store._exec(f"DROP INDEX users_g{n}")
            store._exec(f"DROP INDEX users_g{n}_up")
        for name in ("users_followers", "users_followers_down", "users_handle", "users_late"):
            store._exec(f"DROP INDEX {name}")
        for c in ready.COLUMNS:
            store._exec(f"ALTER TABLE users DROP COLUMN {c}")
        store._exec("DELETE FROM schema_version WHERE version >= 4")
    finally:
        store.close()
    store = HistoryStore(history_url)
    try:
        assert stored(store) == want
        assert_ready_matches(store)
    finally:
        store.close()


def _table_sql(store: HistoryStore) -> str:
    return str(store._rows("SELECT sql FROM sqlite_schema WHERE name = 'snapshots'")[0][0])


def test_version_5_keeps_every_snapshot_in_one_btree(history_url: str) -> None:  # noqa: F811
    """A version 4 store (SQLite: the snapshots a rowid table beside its primary-key index) upgraded on opening:
    the snapshots a table without rowid, every row and the day index kept, the maintained data unchanged; a
    PostgreSQL store records version 5 and keeps its table."""
    store = HistoryStore(history_url)
    try:
        fill(store, 7)
        want_rows, want = sorted(store.snapshots(), key=repr), stored(store)
        if not store.postgres:
            assert "WITHOUT ROWID" in _table_sql(store)  # a new store is created at version 5
            cols = ", ".join(SNAPSHOT_COLUMNS)
            for sql in ("CREATE TABLE v4 (user_id TEXT NOT NULL, day TEXT NOT NULL, fetched_at TEXT NOT NULL,"
                        " handle TEXT NOT NULL, followers INTEGER, following INTEGER, hearts INTEGER, videos INTEGER,"
                        " likes INTEGER, verified INTEGER, private INTEGER, PRIMARY KEY (user_id, day))",
                        f"INSERT INTO v4 ({cols}) SELECT {cols} FROM snapshots ORDER BY day, user_id",
                        "DROP TABLE snapshots", "ALTER TABLE v4 RENAME TO snapshots",
                        "CREATE INDEX snapshots_day ON snapshots (day, user_id)"):
                store._exec(sql)
            assert "WITHOUT ROWID" not in _table_sql(store)
        store._exec("DELETE FROM schema_version WHERE version >= 5")
    finally:
        store.close()
    store = HistoryStore(history_url)
    try:
        assert store.version == 5 and store._rows("SELECT MAX(version) FROM schema_version")[0][0] == 5
        if not store.postgres:
            assert "WITHOUT ROWID" in _table_sql(store)
            plan = " ".join(str(r[-1]) for r in store._rows("EXPLAIN QUERY PLAN SELECT user_id FROM snapshots"
                                                            " WHERE day = '2026-03-02'"))
            assert "snapshots_day" in plan
        assert sorted(store.snapshots(), key=repr) == want_rows
        assert stored(store) == want
        assert_ready_matches(store)
    finally:
        store.close()


def test_a_version_4_store_is_read_without_the_columns_of_version_5(history_url: str) -> None:  # noqa: F811
    """A store no upgraded writer has opened yet (`history serve` opens it read-only, never migrating): the pages
    and `top` are computed from the snapshots, as before the kept data of version 5."""
    store = HistoryStore(history_url)
    try:
        fill(store, 11)
        store.record_snapshot(DAY0 + dt.timedelta(days=45), _profile(random.Random(11), 0, "user_0"))  # mid-night
        end = store.last_day()
        assert end is not None
        want_top = {n: store.top("followers-gained", n, 5, until=end) for n in ready.WINDOWS}
        store._exec("DROP INDEX users_late")
        for c in (f"{c}{n}" for n in sorted(set(ready.KEPT) - set(ready.WINDOWS)) for c in "dfg"):
            store._exec(f"ALTER TABLE users DROP COLUMN {c}")
        store._exec("DELETE FROM schema_version WHERE version >= 5")
    finally:
        store.close()
    old = HistoryQueries.open_readonly(history_url)
    try:
        assert old.version == 4
        assert overview_page(old, "-gain7", 0, 7) is None  # the page is computed (serve's other path)
        assert sorted(old.overview((1, 7, 30)), key=lambda r: r.user_id) == sorted(
            old._overview_computed((1, 7, 30), end), key=lambda r: r.user_id)
        assert {n: old.top("followers-gained", n, 5) for n in ready.WINDOWS} == want_top
    finally:
        old.close()


def test_a_writer_refuses_a_store_of_a_newer_schema(history_url: str) -> None:  # noqa: F811
    """An older crawler would leave a newer schema's kept data stale: it stops with one line instead."""
    HistoryStore(history_url).close()
    store = HistoryStore(history_url)
    try:
        store._exec("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    finally:
        store.close()
    with pytest.raises(UsageError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this crawler's"):
        HistoryStore(history_url)


def test_a_kept_last_day_gone_from_the_snapshots_is_looked_up_again(history_url: str) -> None:  # noqa: F811
    """A write takes the first and last day from the kept data; when the kept last day has no snapshot any more
    (deleted behind the store's back), it looks them up, and the kept data equals its recomputation."""
    store = HistoryStore(history_url)
    try:
        fill(store, 5)
        uid, last = store._rows("SELECT user_id, s_last FROM users WHERE s_first < s_last ORDER BY user_id")[0]
        store._exec("DELETE FROM snapshots WHERE user_id = ? AND day = ?", (uid, last))
        first = dt.date.fromisoformat(store._day(store._rows("SELECT s_first FROM users WHERE user_id = ?",
                                                             (uid,))[0][0]))
        handle = str(store._rows("SELECT handle FROM users WHERE user_id = ?", (uid,))[0][0])
        store.record_snapshot(first, _profile(random.Random(5), int(uid) - 1000, handle))  # the first day again
        assert stored(store)[uid] == recompute(store)[uid]
    finally:
        store.close()


@pytest.mark.slow
async def test_the_rebuild_command(history_url: str, tmp_path: Path) -> None:  # noqa: F811
    """`crawler history rebuild` recomputes the damaged data from the snapshots and says how many users."""
    store = HistoryStore(history_url)
    try:
        fill(store, 3)
        want = stored(store)
        store._exec("UPDATE users SET g30 = 7, s_last = NULL")
    finally:
        store.close()
    code, _, err = await crawler(["history", "rebuild", "--history-url", history_url], environ(None), tmp_path)
    assert code == 0, err
    assert f"rebuilt the maintained data of {len(want)} users" in err
    store = HistoryStore(history_url)
    try:
        assert stored(store) == want
    finally:
        store.close()
