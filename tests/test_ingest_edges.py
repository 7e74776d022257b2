"""Ingest edges found in review: dead-end walks, day files shorter than committed, one user under two names,
and `--restart` with a store shared beyond the watch list. Expected values come from the simulator's world."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crawler.errors import Interrupted
from crawler.runs.ingest import TEST_NOW_ENV, Ingest, ingest
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from crawler.stores.local import StateStore
from tests.conftest import KEY, SimFactory, fast_settings
from tests.test_cli import FAST_TOML, crawler, environ, public_users
from tests.test_ingest import day, night, posts_union, rows, run, snapshots, write_watch

WORLD = WorldConfig(seed=41, users=400, missing_fraction=0.0, private_fraction=0.0)


@contextlib.contextmanager
def pg_history() -> Iterator[tuple[str, Callable[[str], int]]]:
    """A private schema on the PostgreSQL server for a history store: its URL (the test's own view) and a count
    of a table's rows (0 before the store created it); dropped afterwards."""
    import uuid

    import psycopg

    from tests.test_ingest import PG_URL

    schema = f"t_{uuid.uuid4().hex[:12]}"
    direct = f"{PG_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def stored(table: str) -> int:
        with psycopg.connect(direct, autocommit=True) as conn:
            try:
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            except psycopg.errors.UndefinedTable:
                return 0
        return int(row[0]) if row else 0

    try:
        yield direct, stored
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_user_whose_list_ends_in_a_guard_still_gets_every_new_post(simulator: SimFactory,
                                                                             tmp_path: Path) -> None:
    """A posts list that ends the way the reference describes (an empty page claiming more, the cursor sent back)
    must not leave the walk stuck on that page: 15 nights later every post the world shows is in the day files."""
    world = WorldConfig(seed=41, users=400, missing_fraction=0.0, pathological_fraction=1.0, private_fraction=0.0)
    async with simulator(world=world) as sim:
        w = sim.world
        watch = public_users(w, 2, min_videos=40, max_videos=120)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"))
        await run(tmp_path, settings, 0)
        for d in range(1, 15):
            sim.advance_day()
            await run(tmp_path, settings, d)
        got = posts_union(tmp_path / "out")
        for i in watch:
            want = {p.video_id for p in w.posts(i)}
            assert want <= set(got), (w.pathology(i), len(want - set(got)))


async def test_a_day_file_shorter_than_committed_starts_again_never_padded(simulator: SimFactory,
                                                                            tmp_path: Path) -> None:
    """A deleted day file is written again with a header and the run's rows, never padded with zero bytes."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 3, min_videos=1, max_videos=40)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch[:2]])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"))
        await run(tmp_path, settings, 0, with_posts=False)
        f = tmp_path / "out" / f"profiles-{day(0)}.csv"
        f.unlink()
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        await run(tmp_path, settings, 0, with_posts=False)
        data = f.read_bytes()
        assert b"\x00" not in data
        lines = data.decode().splitlines()
        assert lines[0].startswith("user_id,")
        assert [line.split(",")[0] for line in lines[1:]] == [w.user_id(watch[2])]  # the run's one new user


async def test_one_user_under_two_names_is_fetched_once_a_day(simulator: SimFactory, tmp_path: Path) -> None:
    """`id:N` and the user's name on one list: one profile request a day once the name is bound (day 0 cannot
    know they are one user), none on a second run the same day."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        (i,) = public_users(w, 1, min_videos=1, max_videos=40)
        write_watch(tmp_path / "watch.txt", [f"id:{w.user_id(i)}", w.handle(i)])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"),
                                 parallelism=1)
        counts = []
        for d in range(3):
            for _ in range(2):  # two runs a day
                before = sim.stats.requests
                await run(tmp_path, settings, d, with_posts=False)
                counts.append(sim.stats.requests - before)
            sim.advance_day()
        assert counts == [2, 0, 1, 0, 1, 0]


async def test_restart_replaces_the_watch_lists_snapshots_only(simulator: SimFactory, tmp_path: Path) -> None:
    """`--restart` after a list edit refetches today's users and keeps the snapshot of a user no longer listed,
    and its row in profiles-DAY.csv (the file holds exactly the day's snapshots); the listed user's row is
    replaced, once."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        a, b = public_users(w, 2, min_videos=1, max_videos=40)
        url = str(tmp_path / "h.db")
        write_watch(tmp_path / "watch.txt", [w.handle(a), w.handle(b)])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        await run(tmp_path, settings, 0, with_posts=False)
        write_watch(tmp_path / "watch.txt", [w.handle(a)])
        sim.advance_day()  # a's counts move: the replaced row shows the new ones
        before = sim.stats.requests
        await run(tmp_path, settings, 0, with_posts=False, restart=True)
        assert sim.stats.requests - before == 1  # a refetched, b not asked
        snaps = snapshots(url)
        assert (w.user_id(a), day(0)) in snaps and (w.user_id(b), day(0)) in snaps
        day_file = rows(tmp_path / "out" / f"profiles-{day(0)}.csv")
        got = {r["user_id"]: int(r["followers"]) for r in day_file}
        assert len(day_file) == 2
        assert got == {u: f for (u, d), f in snaps.items() if d == day(0)}
        assert got[w.user_id(a)] == w.user(a).followers  # type: ignore[union-attr]


async def test_a_stop_requested_before_the_workers_start_ends_the_run(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM handled while the run still opens its rate ledger (an await, before any worker exists) ends the run
    with 143 and no request; it used to leave the feeder waiting for workers that had already returned."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 4, max_videos=40)
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"))
        (tmp_path / "out").mkdir()
        run = Ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY, date=None,
                     with_posts=True, restart=False, retry_failed=False, column=None, by_id=False, quiet=True,
                     clock=night(0))
        watch_list = StateStore(tmp_path / "watch.db")
        try:
            watch_list.add_items([(w.handle(i), w.handle(i), None, None) for i in watch])
            run.request_stop(Interrupted("stopped by SIGTERM", 143))  # what the signal handler does
            result = await asyncio.wait_for(run.run(watch_list), 30)
        finally:
            watch_list.close()
        assert result.exit_code == 143 and sim.stats.requests == 0


async def test_a_run_across_midnight_counts_what_failed_before_it(simulator: SimFactory, tmp_path: Path) -> None:
    """A user not found at 23:59:59 and the rest fetched after midnight: exit 3 with the failure in the summary, and
    every fetched user done (the outcome used to read the last day only: exit 0, one user left "pending")."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        watch = public_users(w, 4, max_videos=40)
        write_watch(tmp_path / "watch.txt", ["nosuchuserzz9"] + [w.handle(i) for i in watch])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=str(tmp_path / "h.db"),
                                 parallelism=1)
        calls = 0

        def clock() -> dt.datetime:  # midnight passes once the first profile (the unknown name) has failed
            nonlocal calls
            calls += 1
            base = dt.datetime(2026, 1, 1, 23, 59, 59, tzinfo=dt.UTC)
            return base if calls < 6 else base + dt.timedelta(seconds=2)

        result = await ingest(str(tmp_path / "watch.txt"), tmp_path / "out", settings, api_key=KEY,
                              install_signals=False, clock=clock, with_posts=False)
        failed = rows(tmp_path / "out" / f"profiles-{day(0)}.failures.csv")
        assert [(f["input"], f["reason"]) for f in failed] == [("nosuchuserzz9", "not_found")]
        fetched = sum(len(rows(tmp_path / "out" / f"profiles-{day(d)}.csv")) for d in (0, 1))
        assert fetched == len(watch) and sim.stats.requests == len(watch) + 1
        summary = result.outcomes[0].summary
        assert result.exit_code == 3
        assert summary.failures == {"not_found": 1}
        assert (summary.items_done, summary.items_pending) == (len(watch), 0)


async def test_two_out_dirs_at_one_path_sharing_a_store_keep_each_others_rows(simulator: SimFactory,
                                                                               tmp_path: Path) -> None:
    """Two hosts sharing one history store, each with its out-dir at the same path (one image, `/data/out`): each
    run keeps every row of its own day file (committed lengths are per out-dir, not per path)."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        a1, a2, a3, a4, b1 = public_users(w, 5, max_videos=40)
        url = str(tmp_path / "h.db")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        out = tmp_path / "out"
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in (a1, a2, a3)])
        await run(tmp_path, settings, 0, with_posts=False)  # host A
        out.rename(tmp_path / "host-a")
        write_watch(tmp_path / "watch.txt", [w.handle(b1)])
        await run(tmp_path, settings, 0, with_posts=False)  # host B: the same path, its own files
        out.rename(tmp_path / "host-b")
        (tmp_path / "host-a").rename(out)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in (a1, a2, a3, a4)])
        await run(tmp_path, settings, 0, with_posts=False)  # host A again, an edited list
        got = rows(out / f"profiles-{day(0)}.csv")
        assert [r["user_id"] for r in got] == [w.user_id(i) for i in (a1, a2, a3, a4)]
        assert [r["user_id"] for r in rows(tmp_path / "host-b" / f"profiles-{day(0)}.csv")] == [w.user_id(b1)]


async def test_lengths_an_earlier_version_kept_by_path_still_cut_an_uncommitted_tail(simulator: SimFactory,
                                                                                     tmp_path: Path) -> None:
    """A store whose committed lengths are keyed by the day file's path (before `DIR/.ingest-id`) still cuts a
    killed run's uncommitted tail off the file."""
    import sqlite3

    async with simulator(world=WORLD) as sim:
        w = sim.world
        a, b = public_users(w, 2, max_videos=40)
        url = str(tmp_path / "h.db")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        write_watch(tmp_path / "watch.txt", [w.handle(a)])
        await run(tmp_path, settings, 0, with_posts=False)
        out = tmp_path / "out"
        dir_id = (out / ".ingest-id").read_text().strip()
        with sqlite3.connect(url) as db:  # what the earlier version stored
            db.execute("UPDATE ingest_files SET path = ? || substr(path, ?)",
                       (str(out.resolve()), len(dir_id) + 1))
        (out / ".ingest-id").unlink()
        f = out / f"profiles-{day(0)}.csv"
        with f.open("a") as fh:
            fh.write("999,uncommitted,")  # a killed run's tail
        write_watch(tmp_path / "watch.txt", [w.handle(a), w.handle(b)])
        await run(tmp_path, settings, 0, with_posts=False)
        assert [r["user_id"] for r in rows(f)] == [w.user_id(a), w.user_id(b)]


@pytest.mark.slow
async def test_a_restart_killed_before_its_day_file_is_replaced_is_finished_by_the_next_run(simulator: SimFactory,
                                                                                           tmp_path: Path) -> None:
    """`ingest --restart` SIGKILLed after dropping the day's snapshots but before replacing the day file: the next
    run finishes the replacement, so the file holds each of the day's snapshots once, the kept user's row too."""
    async with simulator(world=WORLD) as sim:
        w = sim.world
        a, b = public_users(w, 2, min_videos=1, max_videos=40)
        url = str(tmp_path / "h.db")
        write_watch(tmp_path / "watch.txt", [w.handle(a), w.handle(b)])
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), history_url=url)
        await run(tmp_path, settings, 0, with_posts=False)
        write_watch(tmp_path / "watch.txt", [w.handle(a)])
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: night(0)().isoformat(), "CRAWLER_TEST_KILL_AT": "restarted:1"}
        code, _, err = await crawler(["ingest", "watch.txt", "--out-dir", "out", "--restart", "--config", "fast.toml",
                                      "--data-dir", "data", "--history-url", url, "-q"], env, tmp_path)
        assert code == -9, err  # killed at the point
        await run(tmp_path, settings, 0, with_posts=False)
        got = [r["user_id"] for r in rows(tmp_path / "out" / f"profiles-{day(0)}.csv")]
        assert sorted(got) == sorted([w.user_id(a), w.user_id(b)])
        assert sorted(got) == sorted(u for u, d in snapshots(url) if d == day(0))


def night_0_watch(sim: Simulator, cwd: Path) -> tuple[list[int], dict[str, str]]:
    """Twelve public users with 30-90 posts as `watch.txt` in ``cwd``, fast retries in its config.toml, and the
    environment of an ingest run at 03:00 on night 0."""
    watch = public_users(sim.world, 12, min_videos=30, max_videos=90)
    write_watch(cwd / "watch.txt", [sim.world.handle(i) for i in watch])
    (cwd / "config.toml").write_text(FAST_TOML)
    return watch, environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}


async def ingest_until_two_snapshots(url: str, env: dict[str, str], cwd: Path, stored: Callable[[str], int]
                                     ) -> tuple[list[str], asyncio.subprocess.Process]:
    """`crawler ingest watch.txt --posts` over the history at ``url``, running, once two snapshots are committed;
    its arguments and the process."""
    import sys

    from tests.test_cli import _wait_for

    args = ["ingest", "watch.txt", "--out-dir", "out", "--posts", "-q", "--history-url", url,
            "--page-size", "10", "--parallelism", "2"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await _wait_for(lambda: stored("snapshots") >= 2, proc, "two committed snapshots")
    return args, proc


def assert_day_0_complete(w: World, watch: list[int], out: Path, history: str) -> int:
    """Day 0 holds every watch-list user once (day file and store), and every post of theirs once; their count."""
    ids = sorted(w.user_id(i) for i in watch)
    assert sorted(r["user_id"] for r in rows(out / f"profiles-{day(0)}.csv")) == ids
    assert sorted(u for u, d in snapshots(history) if d == day(0)) == ids
    want = {p.video_id for i in watch for p in w.posts(i)}
    got = posts_union(out)
    assert set(got) == want and set(got.values()) == {1}
    return len(want)


@pytest.mark.slow
async def test_sigterm_while_the_postgresql_history_store_is_silent_stops_at_once_and_resumes_exactly(
        simulator: SimFactory, tmp_path: Path) -> None:
    """The history database stops answering mid-run (a proxy that keeps its connections open but forwards nothing):
    SIGTERM still ends ingest within 15 s with exit 143 and its resume line; once the database answers again, that
    command completes the day with every watch-list user snapshotted once and every post of theirs stored once."""
    import signal

    from tests.test_distributed import Proxy
    from tests.test_ingest import _printed_command

    with pg_history() as (direct, stored):  # direct: the test's own view, never through the proxy
        async with simulator(world=WORLD, latency=(0.05, 0.05)) as sim, Proxy() as proxy:
            w = sim.world
            watch, env = night_0_watch(sim, tmp_path)
            url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?{direct.rpartition('?')[2]}"  # the same schema
            _, proc = await ingest_until_two_snapshots(url, env, tmp_path, stored)
            proxy.freeze()
            await asyncio.wait_for(proxy.held_event.wait(), 30)  # a store call is on its way and goes unanswered
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            try:
                _, raw = await asyncio.wait_for(proc.communicate(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError("ingest did not end within 15 s of SIGTERM while the store was silent") from None
            err = raw.decode()
            assert proc.returncode == 143 and "Traceback" not in err, err
            line = err.strip().splitlines()[-1]
            assert "SIGTERM" in line and "the history store did not answer" in line, err
            again = _printed_command(line)
            assert again[0] == "ingest" and url in again
            proxy.thaw()
            code, _, err = await crawler(again, env, tmp_path)
            assert code == 0, err
        assert stored("posts") == assert_day_0_complete(w, watch, tmp_path / "out", direct)


@pytest.mark.slow
async def test_a_lost_postgresql_history_connection_is_retried_and_the_run_completes_once(
        simulator: SimFactory, tmp_path: Path) -> None:
    """The history database ends ingest's session mid-run (a server restart): ingest connects again and goes on, as
    the job store does, and exits 0 with every watch-list user fetched once and every snapshot and post stored once."""
    import uuid

    import psycopg

    from tests.test_ingest import PG_URL

    app = f"ingest_{uuid.uuid4().hex[:12]}"
    with pg_history() as (direct, stored):
        async with simulator(world=WORLD, latency=(0.05, 0.05)) as sim:
            w = sim.world
            watch, env = night_0_watch(sim, tmp_path)
            url = f"{direct}&application_name={app}"
            _, proc = await ingest_until_two_snapshots(url, env, tmp_path, stored)
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                ended = conn.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                     " WHERE application_name = %s) t", (app,)).fetchone()
            assert ended is not None and ended[0] >= 1
            _, raw = await asyncio.wait_for(proc.communicate(), 60)
            err = raw.decode()
            assert proc.returncode == 0 and "Traceback" not in err, err
            assert "history.url = " in err and "lost" in err and "retrying" in err, err  # one warning line, no stop
            assert sim.stats.by_endpoint["/userinfo-by-username"] == len(watch)
        assert_day_0_complete(w, watch, tmp_path / "out", direct)


@pytest.mark.slow
async def test_a_first_sigterm_lets_the_profiles_in_flight_be_answered_and_kept(simulator: SimFactory,
                                                                                 tmp_path: Path) -> None:
    """SIGTERM while four slow profile requests are out: they are paid for, so ingest waits for their answers and
    commits them (exit 143); the day file holds a row for every request the simulator saw, and the printed command
    then fetches only the others: each watch-list user once, no request twice."""
    import signal
    import sys

    from tests.test_cli import _wait_for
    from tests.test_ingest import _printed_command

    async with simulator(world=WORLD, latency=(1.0, 1.0)) as sim:
        w = sim.world
        watch = public_users(w, 12)
        write_watch(tmp_path / "watch.txt", [w.handle(i) for i in watch])
        (tmp_path / "config.toml").write_text(FAST_TOML)
        env = environ(sim) | {TEST_NOW_ENV: "2026-01-01T03:00:00"}
        args = ["ingest", "watch.txt", "--out-dir", "out", "--parallelism", "4"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await _wait_for(lambda: sim.stats.requests >= 6, proc, "a second round of requests out")
        proc.send_signal(signal.SIGTERM)
        _, raw = await asyncio.wait_for(proc.communicate(), 30)
        err = raw.decode()
        sent = sim.stats.requests
        assert proc.returncode == 143, err
        assert sent < len(watch)  # it stopped, not finished
        assert len(rows(tmp_path / "out" / f"profiles-{day(0)}.csv")) == sent  # every request out: answered, kept
        assert "requests already sent" in err
        code, _, err = await crawler(_printed_command(err.strip().splitlines()[-1]), env, tmp_path)
        assert code == 0, err
        assert sim.stats.requests == len(watch)  # the resume fetched only the users not kept
    assert sorted(r["user_id"] for r in rows(tmp_path / "out" / f"profiles-{day(0)}.csv")) == sorted(
        w.user_id(i) for i in watch)
