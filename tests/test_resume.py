"""Crash-safe resume: SIGKILL at every commit-path point and at seeded random points, then the same command.

The simulator runs in this process; the crawler runs as a real subprocess that is killed with
SIGKILL (through the test-only CRAWLER_TEST_KILL_AT hook) and re-run until it completes.
"""

from __future__ import annotations

import asyncio
import csv
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory

PARALLELISM = 4
FAULTS = frozenset({"5xx", "drop", "truncated", "malformed"})
WORLD = WorldConfig(seed=11, users=3_000, private_fraction=0.05)


async def crawler(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `python -m crawler ARGS`; return (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _env(sim: Simulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLER_")}
    env.update(TIKLIVE_API_KEY=KEY, TIKLIVE_BASE_URL=sim.url, **extra)
    return env


def _handles(world: World, n: int) -> list[str]:
    """n handles of existing users with small lists (so a crawl takes seconds), plus two bad lines."""
    out = []
    for h in world.sample_handles(400):
        i = world.index_by_handle(h)
        assert i is not None
        u = world.user(i)
        if u is not None and not u.private and u.videos <= 120 and u.followers <= 300:
            out.append(h)
        if len(out) == n:
            break
    return out


def expected(world: World, command: str, handles: list[str]) -> Counter[tuple[str, str]]:
    """(source_handle, key) of every row the command must produce, from the world itself."""
    rows: Counter[tuple[str, str]] = Counter()
    for h in handles:
        i = world.index_by_handle(h)
        assert i is not None
        if world.is_private(i):
            continue
        if command == "posts":
            rows.update((h, p.video_id) for p in world.posts(i))
        else:
            rows.update((h, world.user_id(f.user_index)) for f in world.followers(i))
    return rows


def written(path: Path) -> Counter[tuple[str, str]]:
    """(source_handle, key) of every row in a finished CSV."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        key = "video_id" if "video_id" in (reader.fieldnames or []) else "user_id"
        return Counter((r["source_handle"], r[key]) for r in reader)


def answered(sim: Simulator) -> int:
    """Requests that got a real answer (faults excluded, since a re-fetch draws its own faults)."""
    return sim.stats.requests - sum(sim.stats.faults.values())


async def _run_with_kills(
    simulator: SimFactory, tmp: Path, command: str, kills: list[tuple[str, int]]
) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]], int, int, int]:
    """Uninterrupted run, then a killed-and-resumed run; (want, got, kills done, baseline answered, answered)."""
    async with simulator(world=WORLD, fault_rate=0.08, faults=FAULTS, quirks=True, latency=(0.0, 0.01),
                         rate_limit=1_000_000, burst_limit=1_000_000) as sim:
        handles = _handles(sim.world, 48)
        (tmp / "in.txt").write_text("\n".join(handles + ["not a handle!"]) + "\n")
        common = [command, "in.txt", "--parallelism", str(PARALLELISM), "--data-dir", "data", "--retries", "15",
                  "--page-size", "10", "--config", "fast.toml"]
        (tmp / "fast.toml").write_text("[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\n")
        # Ids are learned once (a /userid/ lookup is not a page): both runs then pay only for pages.
        code, err = await crawler(["profiles", "in.txt", "-o", "ids.csv", "--data-dir", "data", "--config",
                                   "fast.toml"], _env(sim), tmp)
        assert code == 3, err
        before = answered(sim)
        code, err = await crawler([*common, "-o", "clean.csv"], _env(sim), tmp)
        assert code == 3, err  # the bad line is a failure
        baseline = answered(sim) - before
        want = expected(sim.world, command, handles)
        assert written(tmp / "clean.csv") == want

        before = answered(sim)
        done = 0
        for point, n in kills:
            code, err = await crawler([*common, "-o", "out.csv"], _env(sim, CRAWLER_TEST_KILL_AT=f"{point}:{n}"), tmp)
            if code == -signal.SIGKILL:
                done += 1
                assert not (tmp / "out.csv").exists()
            else:
                assert code == 3, err
                break
        if not (tmp / "out.csv").exists():
            code, err = await crawler([*common, "-o", "out.csv"], _env(sim), tmp)
            assert code == 3, err
        return want, written(tmp / "out.csv"), done, baseline, answered(sim) - before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["posts", "followers"])
async def test_kill_at_each_commit_point_then_resume_exactly(simulator: SimFactory, tmp_path: Path,
                                                             command: str) -> None:
    """SIGKILL after a fetch, before the fsync, after the fsync and inside the state commit: rows exactly once."""
    kills = [("fetched", 3), ("written", 4), ("fsynced", 3), ("committing", 5), ("fetched", 9), ("committing", 2)]
    want, got, done, baseline, spent = await _run_with_kills(simulator, tmp_path, command, kills)
    assert done == len(kills)
    assert got == want and max(got.values()) == 1
    assert spent <= baseline + PARALLELISM * done


@pytest.mark.slow
async def test_seeded_random_kill_sweep(simulator: SimFactory, tmp_path: Path) -> None:
    """Twenty-four kills at seeded random commit-path points across posts and followers crawls: exact rows."""
    rng = random.Random(20261125)
    points = ["fetched", "written", "fsynced", "committing"]
    total = 0
    for command in ("posts", "followers"):
        kills = [(rng.choice(points), rng.randint(1, 4)) for _ in range(12)]
        work = tmp_path / command
        work.mkdir()
        want, got, done, baseline, spent = await _run_with_kills(simulator, work, command, kills)
        assert got == want and max(got.values()) == 1
        assert spent <= baseline + PARALLELISM * done
        total += done
    assert total >= 20


@pytest.mark.slow
async def test_max_credits_holds_across_sigkills(simulator: SimFactory, tmp_path: Path) -> None:
    """Five SIGKILLs of a --max-credits 300 posts job, resumed each time: the simulator never counts more than
    300 requests, and the job does not stop for budget before it counted 300 - 5 x the lease (one per worker)."""
    async with simulator(world=WORLD, rate_limit=1_000_000, burst_limit=1_000_000, latency=(0.0, 0.005)) as sim:
        w = sim.world
        handles, pages = [], 0
        for h in w.sample_handles(2_000):
            i = w.index_by_handle(h)
            u = w.user(i) if i is not None else None
            if u is not None and not u.private and 60 <= u.videos <= 120:
                handles.append(h)
                pages += u.videos // 10
        assert pages > 400  # the job needs more than the budget
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n")
        args = ["posts", "in.txt", "-o", "out.csv", "--parallelism", str(PARALLELISM), "--data-dir", "data",
                "--page-size", "10", "--max-credits", "300", "--config", "fast.toml"]
        for point in ("fetched:15", "written:20", "fetched:30", "fsynced:25", "fetched:40"):
            code, err = await crawler(args, _env(sim, CRAWLER_TEST_KILL_AT=point), tmp_path)
            assert code == -signal.SIGKILL, err
            assert sim.stats.requests <= 300
        code, err = await crawler(args, _env(sim), tmp_path)
        assert code == 4, err
        assert 300 - 5 * PARALLELISM <= sim.stats.requests <= 300


def _comment_rows(path: Path) -> Counter[tuple[str, str]]:
    """(comment_id, parent_comment_id) of every row of a comments CSV."""
    with path.open(newline="", encoding="utf-8") as fh:
        return Counter((r["comment_id"], r["parent_comment_id"]) for r in csv.DictReader(fh))


@pytest.mark.slow
async def test_comments_with_replies_max_items_same_rows_uninterrupted_and_killed(simulator: SimFactory,
                                                                                 tmp_path: Path) -> None:
    """`comments --with-replies --max-items 100`: the first 100 comments and all their replies, exactly once,
    uninterrupted and when killed after the first page (and again mid reply walks) then resumed."""
    async with simulator(world=WORLD, rate_limit=1_000_000, burst_limit=1_000_000) as sim:
        w = sim.world
        video = "7000000000000000010"  # 122 comments; two of its first 100 have more than 50 replies
        comments = list(w.comments(video))[:100]
        want = Counter((c.comment_id, "") for c in comments)
        want.update((r.comment_id, c.comment_id) for c in comments for r in w.replies(video, c.comment_id))
        assert len(list(w.comments(video))) > 100 and sum(1 for c in comments if c.reply_total > 50) == 2
        (tmp_path / "in.txt").write_text(video + "\n")
        (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n")
        args = ["comments", "in.txt", "--with-replies", "--max-items", "100", "--parallelism", "2",
                "--data-dir", "data", "--config", "fast.toml"]
        code, err = await crawler([*args, "-o", "clean.csv"], _env(sim), tmp_path)
        assert code == 0, err
        assert _comment_rows(tmp_path / "clean.csv") == want
        for point in ("fetched:2", "fetched:4", "written:3", "committing:5"):
            code, err = await crawler([*args, "-o", "out.csv"], _env(sim, CRAWLER_TEST_KILL_AT=point), tmp_path)
            assert code == -signal.SIGKILL, err
        code, err = await crawler([*args, "-o", "out.csv"], _env(sim), tmp_path)
        assert code == 0, err
        assert _comment_rows(tmp_path / "out.csv") == want



def _asked(sim: Simulator, since: int) -> list[str]:
    """The query values of the API requests the simulator received after its `since`-th one, sorted."""
    return sorted(v for target in sim.stats.targets[since:] for vs in parse_qs(urlsplit(target).query).values()
                  for v in vs)


@pytest.mark.slow
async def test_kill_after_an_edited_input_is_merged_then_the_same_command_fetches_exactly_the_new_items(
        simulator: SimFactory, tmp_path: Path) -> None:
    """A finished job whose edited input was merged when the run was killed fetches exactly the new items next."""
    async with simulator(world=WORLD, record_arrivals=True) as sim:
        handles = _handles(sim.world, 8)
        (tmp_path / "in.txt").write_text("\n".join(handles[:5]) + "\n")
        (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n")
        args = ["profiles", "in.txt", "-o", "out.csv", "--data-dir", "data", "--config", "fast.toml"]
        code, err = await crawler(args, _env(sim), tmp_path)
        assert code == 0, err
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        code, err = await crawler(args, _env(sim, CRAWLER_TEST_KILL_AT="merged:1"), tmp_path)
        assert code == -signal.SIGKILL, err
        since = len(sim.stats.targets)
        code, err = await crawler(args, _env(sim), tmp_path)
        assert code == 0, err
        assert _asked(sim, since) == sorted(handles[5:])
        with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as fh:
            assert sorted(r["handle"] for r in csv.DictReader(fh)) == sorted(handles)


# --- job identity, locking, retry-failed, balance: in-process runs ---

from crawler.errors import UsageError  # noqa: E402
from crawler.runs.local import Crawl, JobOptions, job_lock, run_job  # noqa: E402
from tests.conftest import fast_settings  # noqa: E402


def _job(tmp: Path, command: str = "posts", out: str = "out.csv", **options: object) -> JobOptions:
    return JobOptions(command=command, input=str(tmp / "in.txt"), output=str(tmp / out), **options)  # type: ignore[arg-type]


async def test_changed_input_continues_changed_options_are_reported_and_restart_starts_over(
        simulator: SimFactory, tmp_path: Path) -> None:
    """A shorter input continues the job (nothing fetched, rows kept, said in the summary); a different option is
    refused with a hint; --restart runs it anew."""
    async with simulator(world=WORLD) as sim:
        handles = _handles(sim.world, 5)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        first = await run_job(Crawl(_job(tmp_path), settings, api_key=KEY), install_signals=False)
        assert first.exit_code == 0
        (tmp_path / "in.txt").write_text("\n".join(handles[:4]) + "\n")
        before = sim.stats.requests
        shorter = await run_job(Crawl(_job(tmp_path), settings, api_key=KEY), install_signals=False)
        assert shorter.exit_code == 0 and sim.stats.requests == before
        assert "0 new items added, 1 done items no longer in it" in shorter.summary.render()
        assert written(tmp_path / "out.csv") == expected(sim.world, "posts", handles)  # their rows stay
        with pytest.raises(UsageError, match=r"max_items.*--restart"):
            await run_job(Crawl(_job(tmp_path, max_items=3), settings, api_key=KEY), install_signals=False)
        again = await run_job(Crawl(_job(tmp_path), settings, api_key=KEY, restart=True), install_signals=False)
        assert again.exit_code == 0
        assert written(tmp_path / "out.csv") == expected(sim.world, "posts", handles[:4])


async def test_finished_job_rerun_spends_nothing(simulator: SimFactory, tmp_path: Path) -> None:
    """Re-running a completed job sends no request and says it is already complete."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(_handles(sim.world, 5)) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        await run_job(Crawl(_job(tmp_path), settings, api_key=KEY), install_signals=False)
        before = sim.stats.requests
        outcome = await run_job(Crawl(_job(tmp_path), settings, api_key=KEY), install_signals=False)
        assert sim.stats.requests == before
        assert outcome.summary.status == "already complete" and outcome.exit_code == 0


@pytest.mark.slow
async def test_a_second_process_on_the_same_job_is_refused(simulator: SimFactory, tmp_path: Path) -> None:
    """While one process holds the job's lock, another run of the same job exits 1 with a clear line."""
    async with simulator(world=WORLD) as sim:
        (tmp_path / "in.txt").write_text("\n".join(_handles(sim.world, 3)) + "\n")
        with job_lock(tmp_path / "out.csv"):
            code, err = await crawler(["posts", "in.txt", "-o", "out.csv"], _env(sim), tmp_path)
        assert code == 1
        assert "another crawler process is running" in err and "Traceback" not in err
        assert sim.stats.requests == 0
        code, err = await crawler(["posts", "in.txt", "-o", "out.csv", "--data-dir", "d"], _env(sim), tmp_path)
        assert code == 0, err  # the lock died with its holder


async def test_retry_failed_reruns_only_the_failed_items(simulator: SimFactory, tmp_path: Path) -> None:
    """Items that exhausted their retries are re-run by --retry-failed; done items cost nothing again."""
    async with simulator(world=WORLD) as healthy:
        handles = _handles(healthy.world, 6)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        settings = fast_settings(healthy.url, data_dir=str(tmp_path / "data"), retry_attempts=2)
        await run_job(Crawl(_job(tmp_path, "profiles", "ids.csv"), settings, api_key=KEY), install_signals=False)
    # Most answers fail and there is one try each: items fail while the API answers others (a run where
    # nothing answers is an outage, not item failures: see test_outage.py). One worker keeps it deterministic.
    async with simulator(world=WORLD, fault_rate=0.9, faults=frozenset({"5xx"})) as broken:
        settings = fast_settings(broken.url, data_dir=str(tmp_path / "data"), retry_attempts=1, parallelism=1)
        outcome = await run_job(Crawl(_job(tmp_path, page_size=30), settings, api_key=KEY), install_signals=False)
        assert outcome.exit_code == 3 and set(outcome.summary.failures) == {"retries_exhausted"}
        assert 0 < outcome.summary.items_failed < 6 and outcome.summary.items_done >= 1
    with (tmp_path / "out.failures.csv").open(newline="", encoding="utf-8") as fh:
        failed = [r["input"] for r in csv.DictReader(fh)]
    async with simulator(world=WORLD) as sim:
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"))
        outcome = await run_job(Crawl(_job(tmp_path, page_size=30), settings, api_key=KEY, retry_failed=True),
                                install_signals=False)
        assert outcome.exit_code == 0
        # Only the failed walks are paid for again (at most all their pages); the done ones cost nothing.
        w = sim.world
        pages = [max(1, -(-sum(1 for _ in w.posts(w.index_by_handle(h) or 0)) // 30)) for h in failed]
        assert sim.stats.requests <= sum(pages)
        assert written(tmp_path / "out.csv") == expected(sim.world, "posts", handles)
        assert not (tmp_path / "out.failures.csv").exists()


async def test_retry_failed_after_a_finished_run_keeps_its_rows_and_adds_nothing_twice(simulator: SimFactory,
                                                                                      tmp_path: Path) -> None:
    """A finished run with walks that failed mid-way: --retry-failed continues them into the same CSV, exactly."""
    async with simulator(world=WORLD) as healthy:
        handles = _handles(healthy.world, 16)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        settings = fast_settings(healthy.url, data_dir=str(tmp_path / "data"))
        await run_job(Crawl(_job(tmp_path, "profiles", "ids.csv"), settings, api_key=KEY), install_signals=False)
    async with simulator(world=WORLD, fault_rate=0.3, faults=frozenset({"5xx"})) as flaky:
        settings = fast_settings(flaky.url, data_dir=str(tmp_path / "data"), retry_attempts=1, page_size=10)
        first = await run_job(Crawl(_job(tmp_path, page_size=10), settings, api_key=KEY), install_signals=False)
        assert first.exit_code == 3 and first.summary.rows_total > 0
        partly = written(tmp_path / "out.csv")  # the finished (renamed) output, with some walks cut short
        assert 0 < sum(partly.values()) < sum(expected(flaky.world, "posts", handles).values())
    async with simulator(world=WORLD) as sim:
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), page_size=10)
        again = await run_job(Crawl(_job(tmp_path, page_size=10), settings, api_key=KEY, retry_failed=True),
                              install_signals=False)
        assert again.exit_code == 0
        got = written(tmp_path / "out.csv")
        assert got == expected(sim.world, "posts", handles) and max(got.values()) == 1


async def test_balance_exhausted_stops_resumably_then_resumes_after_topup(simulator: SimFactory,
                                                                         tmp_path: Path) -> None:
    """An empty balance ends the run with exit 4 keeping the rows; after a top-up the same job completes."""
    async with simulator(world=WORLD, keys={"small": 6}) as sim:
        handles = _handles(sim.world, 8)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), parallelism=2)
        outcome = await run_job(Crawl(_job(tmp_path), settings, api_key="small"), install_signals=False)
        assert outcome.exit_code == 4
        assert (tmp_path / "out.csv.part").exists() and not (tmp_path / "out.csv").exists()
        assert outcome.summary.credits_billed == 6
        sim.topup("small", 1_000)
        outcome = await run_job(Crawl(_job(tmp_path), settings, api_key="small"), install_signals=False)
        assert outcome.exit_code == 0
        assert written(tmp_path / "out.csv") == expected(sim.world, "posts", handles)
        assert outcome.summary.credits_billed == sim.stats.billed["small"]


@pytest.mark.slow
async def test_sigterm_stops_cleanly_and_the_same_command_resumes(simulator: SimFactory, tmp_path: Path) -> None:
    """SIGTERM mid-run exits 143 with the resume command; running it completes the job exactly."""
    async with simulator(world=WORLD, latency=(0.05, 0.05), rate_limit=1_000_000, burst_limit=1_000_000) as sim:
        handles = _handles(sim.world, 20)
        (tmp_path / "in.txt").write_text("\n".join(handles) + "\n")
        (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n")
        args = ["posts", "in.txt", "-o", "out.csv", "--parallelism", "2", "--data-dir", "d", "--config", "fast.toml"]
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=tmp_path,
                                                    env=_env(sim), stderr=asyncio.subprocess.PIPE)
        async def under_way() -> None:  # wait for the crawl to be under way (a condition, not a guess)
            while sim.stats.requests < 10:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(under_way(), timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        text = err.decode()
        assert proc.returncode == 143, text
        assert "resume with: crawler posts in.txt -o out.csv" in text and "Traceback" not in text
        code, err2 = await crawler(args, _env(sim), tmp_path)
        assert code == 0, err2
        assert written(tmp_path / "out.csv") == expected(sim.world, "posts", handles)


@pytest.mark.slow
async def test_status_shows_progress_failures_and_both_counters(simulator: SimFactory, tmp_path: Path) -> None:
    """`crawler status OUT.csv` prints items, both credit counters (as the simulator counted them) and failures
    by reason."""
    async with simulator(world=WORLD, fault_rate=0.1, faults=frozenset({"5xx"})) as sim:
        (tmp_path / "in.txt").write_text("\n".join(_handles(sim.world, 4) + ["bad handle!"]) + "\n")
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "data"), retry_attempts=10)
        await run_job(Crawl(_job(tmp_path), settings, api_key=KEY), install_signals=False)
        assert sim.stats.requests > sim.stats.billed[KEY]  # the 5xx answers: sent, not billed
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", "status", "out.csv",
                                                    cwd=tmp_path, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        text = out.decode()
        assert proc.returncode == 0
        assert f"requests_sent   {sim.stats.requests:,}" in text
        assert f"credits_billed  {sim.stats.billed[KEY]:,}" in text
        assert "4 done, 1 failed, 0 pending of 5" in text and "invalid_input: 1" in text
