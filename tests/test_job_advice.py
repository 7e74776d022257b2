"""What a scheduled job command says and keeps when it ends: every printed command goes on from there, a retry
never takes the finished CSV away, and the progress line counts the whole job.

The simulator runs in this process; the crawler runs as a real subprocess wherever its printed line matters.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pytest

from crawler.jobs.prepare import JobOptions
from crawler.runs.local import Crawl, run_job
from crawler.sim.data import World, WorldConfig
from crawler.sim.server import Simulator
from tests.conftest import KEY, SimFactory, fast_settings

WORLD = WorldConfig(seed=11, users=1_200)
FAST_TOML = "[rate]\nenabled = false\n[retry]\nbase_delay = 0\nmax_delay = 0\nstall_limit = 5\n"
RUN = ["--config", "fast.toml", "--data-dir", "d", "--parallelism", "2"]


def handles(w: World, n: int) -> list[str]:
    """n handles of existing public users (one profile row, one credit each)."""
    found = [w.handle(i) for i in range(w.config.users) if not w.is_missing(i) and not w.is_private(i)]
    assert len(found) >= n
    return found[:n]


def environ(sim: Simulator, **extra: str) -> dict[str, str]:
    """A clean environment: no inherited crawler settings, the key and the simulator's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRAWLER_", "TIKLIVE_"))}
    env.update(TIKLIVE_API_KEY=KEY, TIKLIVE_BASE_URL=sim.url, **extra)
    return env


async def crawler(args: list[str], env: dict[str, str], cwd: Path, *, term_when: asyncio.Event | None = None
                  ) -> tuple[int, str]:
    """Run `python -m crawler ARGS` (SIGTERM once `term_when` is set); return (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    if term_when is not None:
        await asyncio.wait_for(term_when.wait(), 60)
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def last_line(err: str) -> str:
    """The one line a non-zero exit ends with; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("crawler: "), err
    return lines[-1]


def printed_command(line: str) -> list[str]:
    """The command at the end of an exit line (after ': crawler '), as arguments for `python -m crawler`."""
    found = re.search(r": crawler ([a-z].*)$", line)
    assert found, f"no command to run in: {line}"
    return shlex.split(found.group(1))


async def follow(sim: Simulator, tmp: Path, args: list[str], *, limit: int = 6, before_each: object = None
                 ) -> list[tuple[int, str]]:
    """Run ``args``, then each command its exit line prints, until exit 0: every step makes progress (the
    simulator saw new requests) or says something different. Returns (exit code, line) per run."""
    seen: list[tuple[int, str]] = []
    for _ in range(limit):
        before = sim.stats.requests
        code, err = await crawler(args, environ(sim), tmp)
        line = last_line(err) if code else ""
        if seen:
            progressed = sim.stats.requests > before
            assert progressed or (code, line) != seen[-1], f"{args} made no progress and said the same: {line}"
        seen.append((code, line))
        if code == 0:
            return seen
        args = printed_command(line)
    raise AssertionError(f"still not done after {limit} runs: {seen}")


@pytest.mark.slow
async def test_a_budget_stop_prints_a_command_that_raises_the_cap(simulator: SimFactory, tmp_path: Path) -> None:
    """After a --max-credits stop (given as a flag, or in config.toml) the printed command raises the cap, so each
    printed command sends new requests, and following them completes the job with one row per handle."""
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 25)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        (tmp_path / "fast.toml").write_text(FAST_TOML)
        runs = await follow(sim, tmp_path, ["profiles", "in.txt", "-o", "out.csv", "--max-credits", "10", *RUN])
        assert [c for c, _ in runs] == [4, 4, 0]
        assert "--max-credits 10 reached" in runs[0][1] and "--max-credits 20" in runs[0][1]
        assert sim.stats.requests == 25

        (tmp_path / "capped.toml").write_text(FAST_TOML + "[crawl]\nmax_credits = 10\n")
        before = sim.stats.requests
        runs = await follow(sim, tmp_path, ["profiles", "in.txt", "-o", "cfg.csv", "--config", "capped.toml",
                                            "--data-dir", "d"])
        assert [c for c, _ in runs] == [4, 4, 0] and sim.stats.requests - before == 25
        assert runs[0][1].endswith("--max-credits 20")  # the cap came from config.toml: the flag overrides it


@pytest.mark.slow
async def test_failed_items_print_a_retry_command_that_fetches_them(simulator: SimFactory, tmp_path: Path) -> None:
    """Exit 3 with items that ran out of retries prints `... --retry-failed`; run against a healthy API it fetches
    exactly the failed items and exits 0."""
    (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n[retry]\nattempts = 1\nbase_delay = 0\n"
                                        "max_delay = 0\nstall_limit = 5\n")
    async with simulator(world=WORLD, fault_rate=0.4, faults=frozenset({"5xx"})) as flaky:
        names = handles(flaky.world, 20)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d",
                "--parallelism", "1"]
        code, err = await crawler(args, environ(flaky), tmp_path)
        line = last_line(err)
        assert code == 3, err
    failed = int(re.search(r"crawler: (\d+) items failed", line).group(1))  # type: ignore[union-attr]
    assert 0 < failed < 20
    command = printed_command(line)
    assert command[-1] == "--retry-failed"
    async with simulator(world=WORLD) as sim:
        code, err = await crawler(command, environ(sim), tmp_path)
        assert code == 0, err
        assert sim.stats.requests == failed


@pytest.mark.slow
async def test_an_empty_balance_and_a_sigterm_print_commands_that_go_on(simulator: SimFactory,
                                                                         tmp_path: Path) -> None:
    """Exit 4 on an empty balance says to top up; after a top-up its command completes. A SIGTERM (exit 143)
    prints a command that resumes and completes."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD, keys={KEY: 6}) as sim:
        names = handles(sim.world, 15)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        code, err = await crawler(["profiles", "in.txt", "-o", "out.csv", *RUN], environ(sim), tmp_path)
        line = last_line(err)
        assert code == 4 and "top up" in line, err
        sim.topup(KEY, 100)
        before = sim.stats.requests
        code, err = await crawler(printed_command(line), environ(sim), tmp_path)
        assert code == 0 and sim.stats.requests > before, err

    async with simulator(world=WORLD, latency=(0.01, 0.02)) as sim:
        names = handles(sim.world, 300)
        (tmp_path / "many.txt").write_text("\n".join(names) + "\n")
        started = asyncio.Event()

        async def watch() -> None:
            while sim.stats.requests < 20:
                await asyncio.sleep(0.01)
            started.set()

        watcher = asyncio.create_task(watch())
        code, err = await crawler(["profiles", "many.txt", "-o", "many.csv", "--restart", *RUN], environ(sim),
                                  tmp_path, term_when=started)
        await watcher
        line = last_line(err)
        assert code == 143 and "resume with" in line, err
        command = printed_command(line)
        assert "--restart" not in command  # resuming must not start over
        before = sim.stats.requests
        code, err = await crawler(command, environ(sim), tmp_path)
        assert code == 0, err
        # Only what the stopped run had not committed: at most one answer per worker was in flight at the signal.
        assert 300 - before <= sim.stats.requests - before <= 300 - before + 2


@pytest.mark.slow
async def test_retry_failed_on_a_finished_job_keeps_the_csv_until_the_retry_completes(
        simulator: SimFactory, tmp_path: Path) -> None:
    """--retry-failed on a finished job killed mid-retry leaves OUT.csv exactly as it was (the complete previous
    deliverable); the resumed retry then replaces it with every row exactly once."""
    (tmp_path / "fast.toml").write_text("[rate]\nenabled = false\n[retry]\nattempts = 1\nbase_delay = 0\n"
                                        "max_delay = 0\nstall_limit = 5\n")
    args = ["profiles", "in.txt", "-o", "out.csv", "--config", "fast.toml", "--data-dir", "d", "--parallelism", "1"]
    async with simulator(world=WORLD, fault_rate=0.4, faults=frozenset({"5xx"})) as flaky:
        names = handles(flaky.world, 20)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        code, err = await crawler(args, environ(flaky), tmp_path)
        assert code == 3, err
    out = tmp_path / "out.csv"
    finished = out.read_bytes()
    with out.open(encoding="utf-8", newline="") as fh:
        assert 0 < len(list(csv.DictReader(fh))) < 20  # some rows, some failures
    async with simulator(world=WORLD) as sim:
        code, err = await crawler([*args, "--retry-failed"], environ(sim, CRAWLER_TEST_KILL_AT="fsynced:1"),
                                  tmp_path)
        assert code == -signal.SIGKILL, err
        assert sim.stats.requests >= 1
        assert out.read_bytes() == finished  # killed mid-retry: the deliverable is untouched
        code, err = await crawler(args, environ(sim), tmp_path)
        assert code == 0, err
    with out.open(encoding="utf-8", newline="") as fh:
        assert sorted(r["handle"] for r in csv.DictReader(fh)) == sorted(names)  # every handle exactly once


async def test_the_progress_line_after_a_resume_shows_job_totals(simulator: SimFactory, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Resumed after a budget stop, every progress line counts both requests_sent and credits_billed for the whole
    job (at least the first run's), never this run's beside the job's."""
    async with simulator(world=WORLD, latency=(0.005, 0.01)) as sim:
        names = handles(sim.world, 40)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        job = JobOptions(command="profiles", input=str(tmp_path / "in.txt"), output=str(tmp_path / "out.csv"))
        settings = fast_settings(sim.url, data_dir=str(tmp_path / "d"), parallelism=1, max_credits=15)
        first = await run_job(Crawl(job, settings, api_key=KEY), install_signals=False)
        assert first.exit_code == 4 and sim.stats.requests == 15 and sim.stats.billed[KEY] == 15
        capsys.readouterr()
        crawl = Crawl(job, settings.replace(max_credits=None), api_key=KEY, quiet=False, progress_interval=0.01)
        second = await run_job(crawl, install_signals=False)
        assert second.exit_code == 0 and sim.stats.requests == 40
    counts = [(int(a.replace(",", "")), int(b.replace(",", "")))
              for a, b in re.findall(r"· ([\d,]+) requests sent, ([\d,]+) billed", capsys.readouterr().err)]
    assert len(counts) >= 2
    assert all(15 <= sent <= 40 and 15 <= billed <= 40 for sent, billed in counts), counts


@pytest.mark.slow
async def test_a_budget_stop_with_automatic_parallelism_ends(simulator: SimFactory, tmp_path: Path) -> None:
    """With parallelism "auto", a worker that ends its item after a --max-credits stop starts no new worker and the
    run ends with exit 4 after exactly the budget (it once spun forever here: a subprocess, so a hang is bounded)."""
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    async with simulator(world=WORLD) as sim:
        names = handles(sim.world, 6)
        (tmp_path / "in.txt").write_text("\n".join(names) + "\n")
        run = ["--config", "fast.toml", "--data-dir", "d", "-q"]
        code, err = await crawler(["profiles", "in.txt", "-o", "p.csv", *run], environ(sim), tmp_path)
        assert code == 0, err
        code, err = await crawler(["posts", "in.txt", "-o", "posts.csv", "--max-credits", "3", *run], environ(sim),
                                  tmp_path)
        assert code == 4 and sim.stats.requests == 6 + 3, err
