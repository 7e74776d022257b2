"""Issue 8: the key's rate ledger (rate.shared off / local / Redis), each beside the others in one run.

1. Acquire overhead: median microseconds per `RateGate.acquire()` with limits no run reaches (so no wait),
   one caller, for each ledger; medians of repetitions. "off" (in-process) is the baseline.
2. Most starts per second one process can push through each ledger, 32 concurrent callers, no API limit.
3. Three crawler processes on one key at 200 per 60 s (200 per 10 s with --quick), each in its own working
   and data directory, against the simulator in its own process: the fraction of the budget served after
   the first window, 429s, and the most requests the simulator saw in any window; beside the same three
   processes with `--rate-shared off` (each pacing alone, as before the ledger).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from _common import (
    PYTHON,
    ROOT,
    Arrivals,
    Figure,
    Sim,
    child_env,
    main_for,
    sample_until,
    show,
    spread,
    workdir,
    write_handles,
)

from crawler.rate.ledger import FileLedger, MemoryLedger
from crawler.rate.pacing import Pace, RateGate
from crawler.rate.redis_ledger import RedisLedger
from crawler.rate.rules import Ledger

NAME = "ledger"
REDIS = "redis://127.0.0.1:6379/0"
NO_LIMIT = Pace(limit=1_000_000_000, window=1.0, max_per_second=1_000_000_000, margin=0.0)


def _ledger(kind: str, tmp: Path) -> Ledger:
    name = f"bench-{uuid.uuid4().hex}"
    if kind == "off":
        return MemoryLedger(name)
    if kind == "local":
        return FileLedger(name, directory=tmp)
    return RedisLedger(name, REDIS)


async def _overhead(kind: str, tmp: Path, n: int) -> float:
    """Median microseconds of one acquire, one caller."""
    async with RateGate(NO_LIMIT, ledger=_ledger(kind, tmp)) as gate:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            await gate.acquire()
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


async def _throughput(kind: str, tmp: Path, seconds: float) -> float:
    """Starts per second through one gate, 32 callers."""
    async with RateGate(NO_LIMIT, ledger=_ledger(kind, tmp)) as gate:
        count = 0
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await gate.acquire()
                count += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(32)))
        return count / (time.perf_counter() - began)


def ledgers(quick: bool) -> list[Figure]:
    """Acquire overhead and throughput per ledger."""
    reps, n, seconds = (3, 300, 1.0) if quick else (5, 2_000, 3.0)
    figures = []
    with workdir("ledger") as tmp:
        over = {k: [asyncio.run(_overhead(k, tmp, n)) for _ in range(reps)] for k in ("off", "local", "redis")}
        rate = {k: [asyncio.run(_throughput(k, tmp, seconds)) for _ in range(reps)] for k in ("off", "local", "redis")}
    base = f"{statistics.median(over['off']):.1f}"
    for kind in ("local", "redis"):
        figures.append(show(Figure(NAME, f"acquire overhead, median µs ({kind}; baseline off)",
                                   spread(over[kind], "{:.1f}"), "", base)))
    base = f"{statistics.median(rate['off']):,.0f}"
    for kind in ("local", "redis"):
        figures.append(show(Figure(NAME, f"starts/s through one process ({kind}; baseline off)",
                                   spread(rate[kind], "{:,.0f}"), "", base)))
    return figures


def _three(shared: str, limit: int, window: float, tmp: Path) -> tuple[float, int, int]:
    """Three crawler processes on one key: (fraction used after the first window, 429s, max in any window)."""
    with Sim("--rate-limit", str(limit), "--window", str(window), "--latency", "0.05,0.2", "--users", "10000") as sim:
        procs = []
        state = tmp / f"state-{shared}"
        for n in range(3):
            cwd = tmp / f"{shared}-p{n}"
            cwd.mkdir(parents=True)
            src = cwd / "handles.txt"
            write_handles(src, 2 * limit, users=10_000, start=2 * limit * n)
            cmd = [PYTHON, "-m", "crawler", "profiles", str(src), "-o", "out.csv", "--base-url", sim.url,
                   "--rate", str(limit), "--window", str(window), "--rate-shared", shared, "-q"]
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=child_env(XDG_STATE_HOME=str(state)),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        arrivals = Arrivals()
        try:
            deadline = time.monotonic() + 3 * window + 30
            first: list[float] = []

            def done() -> bool:
                if not first and (t := arrivals.first()) is not None:
                    first.append(t)
                return bool(first) and time.monotonic() > first[0] + 2 * window + 1

            sample_until(sim, arrivals, done, interval=0.05, deadline=deadline)
            stats = sim.stats()
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=30)
    return arrivals.fraction_used(limit, window, 1), int(stats["served_429"]), int(stats["max_in_window"])


def three_processes(quick: bool) -> list[Figure]:
    """The fleet utilisation with the local ledger, beside three processes pacing alone."""
    limit, window = (200, 10.0) if quick else (200, 60.0)
    with workdir("three") as tmp:
        ours = _three("local", limit, window, tmp)
        alone = _three("off", limit, window, tmp)
    scale = f" (3 processes, {limit}/{window:g} s)"
    return [
        show(Figure(NAME, "budget fraction used after 1st window" + scale, f"{ours[0]:.3f}", ">= 0.97",
                    f"{alone[0]:.3f} (each alone)")),
        show(Figure(NAME, "429s" + scale, str(ours[1]), "0", str(alone[1]))),
        show(Figure(NAME, "max requests in any window" + scale, str(ours[2]), f"<= {limit}", str(alone[2]))),
    ]


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    print(f"[ledger] from {ROOT}", flush=True)
    return ledgers(quick) + three_processes(quick)


if __name__ == "__main__":
    main_for(run, __doc__)
