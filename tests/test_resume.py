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
        if u is not None and u.videos <= 120 and u.followers <= 300:
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
        handles = _handles(sim.world, 24)
        (tmp / "in.txt").write_text("\n".join(handles + ["not a handle!"]) + "\n")
        common = [command, "in.txt", "--parallelism", str(PARALLELISM), "--data-dir", "data", "--retries", "15",
                  "--config", "fast.toml"]
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


@pytest.mark.parametrize("command", ["posts", "followers"])
async def test_kill_at_each_commit_point_then_resume_exactly(simulator: SimFactory, tmp_path: Path,
                                                             command: str) -> None:
    """SIGKILL after a fetch, before the fsync, after the fsync and inside the state commit: rows exactly once."""
    kills = [("fetched", 3), ("written", 4), ("fsynced", 3), ("committing", 5), ("fetched", 9), ("committing", 2)]
    want, got, done, baseline, spent = await _run_with_kills(simulator, tmp_path, command, kills)
    assert done == len(kills)
    assert got == want and max(got.values()) == 1
    assert spent <= baseline + PARALLELISM * done


async def test_seeded_random_kill_sweep(simulator: SimFactory, tmp_path: Path) -> None:
    """Twenty-four kills at seeded random commit-path points across posts and followers crawls: exact rows."""
    rng = random.Random(20261125)
    points = ["fetched", "written", "fsynced", "committing"]
    total = 0
    for command in ("posts", "followers"):
        kills = [(rng.choice(points), rng.randint(1, 6)) for _ in range(12)]
        work = tmp_path / command
        work.mkdir()
        want, got, done, baseline, spent = await _run_with_kills(simulator, work, command, kills)
        assert got == want and max(got.values()) == 1
        assert spent <= baseline + PARALLELISM * done
        total += done
    assert total >= 20
