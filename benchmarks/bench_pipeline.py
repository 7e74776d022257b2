"""Issue 3: the `crawler posts` pipeline beside the plain script (benchmarks/plain.py), in the same run.

(a) Rate fidelity: the CLI in a child process against a scaled rolling window (200 per 10 s, latency
    150-600 ms) vs `asyncio.gather` + `AsyncLimiter(200, 10)` + aiohttp; arrivals sampled on the server.
(b) Peak RSS (the child's VmHWM; see _common.ChildRun) of `crawler posts` on a 10k- and a 1M-handle input,
    limiter off, each run stopped by SIGTERM at 30 s, vs the plain script that loads the whole list.
(c) CPU seconds of this process per 1,000 requests and posts rows per second into CSV, the pipeline run
    in-process (`Crawl`, limiter off, parallelism 32) vs the plain script at the same concurrency.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import plain
from _common import (
    BENCH,
    FAST,
    KEY,
    PYTHON,
    Arrivals,
    ChildRun,
    Figure,
    Sim,
    child_env,
    main_for,
    read_lines,
    run_child,
    show,
    spread,
    workdir,
    write_config,
    write_handles,
)

from crawler.config import Settings
from crawler.runs.local import Crawl, JobOptions, run_job

NAME = "pipeline"
PARALLELISM = 32


# --- (a) rate fidelity ---

def _fidelity_run(kind: str, sim: Sim, work: Path, handles: Path, limit: int, window: float,
                  windows: int) -> tuple[Arrivals, ChildRun]:
    out = work / kind
    out.mkdir()
    if kind == "crawler":
        cfg = write_config(out / "config.toml")
        cmd = [PYTHON, "-m", "crawler", "posts", str(handles), "-o", str(out / "posts.csv"), "--config", str(cfg),
               "--base-url", sim.url, "--rate", str(limit), "--window", str(window), "-q"]
    else:
        cmd = [PYTHON, str(BENCH / "plain.py"), "--url", sim.url, "--input", str(handles),
               "--out", str(out / "posts.csv"), "--rate", str(limit), "--window", str(window)]
    arrivals = Arrivals()
    span = window * (windows + 1) + 0.5

    def tick(elapsed: float) -> bool:
        arrivals.add(sim.stats(), time.monotonic())
        first = arrivals.first()
        return first is not None and time.monotonic() > first + span

    child = run_child(cmd, cwd=out, env=child_env(), cap=span + 60.0, tick=tick)
    return arrivals, child


def fidelity(quick: bool, work: Path) -> list[Figure]:
    """(a): fraction of the limit used after the first window, 429s, most requests in any window."""
    limit, window, windows = (100, 5.0, 1) if quick else (200, 10.0, 4)
    handles = work / "fidelity-handles.txt"
    write_handles(handles, 3000, users=10_000)
    print(f"[pipeline] (a) rate fidelity: {limit} per {window:g} s, latency 150-600 ms, "
          f"{windows} windows after the first; SIGTERM after that", flush=True)
    got: dict[str, tuple[float, int, int, ChildRun]] = {}
    for kind in ("crawler", "plain"):
        with Sim("--rate-limit", str(limit), "--window", str(window), "--latency", "0.15,0.6") as sim:
            arrivals, child = _fidelity_run(kind, sim, work, handles, limit, window, windows)
            stats = sim.stats()
        frac = arrivals.fraction_used(limit, window, windows)
        got[kind] = (frac, stats["served_429"], stats["max_in_window"], child)
        print(f"  {kind:7s}: fraction used {frac:.3f}, 429s {stats['served_429']}, max in any window "
              f"{stats['max_in_window']}, max in any second {stats['max_in_second']}, exit {child.code}", flush=True)
        if kind == "crawler" and child.code != 143:
            print(f"  crawler stderr tail: {child.stderr[-600:]}", flush=True)
    c, p = got["crawler"], got["plain"]
    scale = f" ({limit}/{window:g} s)"
    return [
        show(Figure(NAME, "(a) fraction of limit used after 1st window" + scale, f"{c[0]:.3f}", ">= 0.99",
                    f"{p[0]:.3f}")),
        show(Figure(NAME, "(a) 429s" + scale, str(c[1]), "0", str(p[1]))),
        show(Figure(NAME, "(a) most requests in any window" + scale, str(c[2]), f"<= {limit}", str(p[2]))),
        show(Figure(NAME, "(a) exit after SIGTERM (s to stop)", f"{c[3].code} ({c[3].stopped_after or 0:.2f} s)",
                    "143")),
    ]


# --- (b) peak RSS ---

def _rss_run(kind: str, sim: Sim, work: Path, handles: Path, cap: float) -> tuple[ChildRun, float | None]:
    out = work / f"rss-{kind}-{handles.stem}"
    out.mkdir()
    if kind == "crawler":
        cfg = write_config(out / "config.toml", rate_enabled=False, parallelism=PARALLELISM)
        cmd = [PYTHON, "-m", "crawler", "posts", str(handles), "-o", str(out / "posts.csv"), "--config", str(cfg),
               "--base-url", sim.url, "-q"]
    else:
        cmd = [PYTHON, str(BENCH / "plain.py"), "--url", sim.url, "--input", str(handles),
               "--out", str(out / "posts.csv"), "--concurrency", str(PARALLELISM)]
    base = sim.stats()["requests"]
    first: list[float] = []
    last_poll = [0.0]

    def tick(elapsed: float) -> bool:
        if not first and elapsed - last_poll[0] >= 0.1:  # when the first request arrived
            last_poll[0] = elapsed
            if sim.stats()["requests"] > base:
                first.append(elapsed)
        return False

    child = run_child(cmd, cwd=out, env=child_env(), cap=cap, tick=tick)
    return child, first[0] if first else None


def peak_rss(quick: bool, work: Path) -> list[Figure]:
    """(b): peak RSS on a small and a large input, limiter off, capped runs."""
    small_n, big_n, cap = (10_000, 100_000, 6.0) if quick else (10_000, 1_000_000, 30.0)
    users = 1_000_000
    big = work / "handles-big.txt"
    made = time.perf_counter()
    lines = write_handles(big, big_n, users=users)
    small = work / "handles-small.txt"
    with big.open(encoding="utf-8") as src, small.open("w", encoding="utf-8") as dst:
        dst.writelines(islice(src, small_n))
    print(f"[pipeline] (b) peak RSS: {small_n:,} and {lines:,} handles (world of {users:,} users; "
          f"{time.perf_counter() - made:.1f} s to generate), limiter off, parallelism {PARALLELISM}, "
          f"SIGTERM at {cap:g} s", flush=True)
    rss: dict[tuple[str, str], ChildRun] = {}
    firsts: dict[tuple[str, str], float | None] = {}
    with Sim(*FAST, "--users", str(users)) as sim:
        for kind in ("crawler", "plain"):
            for size, path in (("small", small), ("big", big)):
                child, first = _rss_run(kind, sim, work, path, cap)
                rss[kind, size] = child
                firsts[kind, size] = first
                print(f"  {kind:7s} {size:5s}: peak RSS {child.maxrss_mb:6.1f} MB, exit {child.code}, "
                      f"first request at {first if first is not None else float('nan'):.1f} s, stopped "
                      f"{child.stopped_after or 0:.2f} s after SIGTERM{' (SIGKILLed)' if child.killed else ''}",
                      flush=True)
    c_small, c_big = rss["crawler", "small"], rss["crawler", "big"]
    p_small, p_big = rss["plain", "small"], rss["plain", "big"]
    label = f"{big_n // 1000:,}k" if big_n < 1_000_000 else f"{big_n // 1_000_000}M"
    return [
        show(Figure(NAME, "(b) peak RSS MB, 10k handles", f"{c_small.maxrss_mb:.1f}", "", f"{p_small.maxrss_mb:.1f}")),
        show(Figure(NAME, f"(b) peak RSS MB, {label} handles", f"{c_big.maxrss_mb:.1f}", "< 100",
                    f"{p_big.maxrss_mb:.1f}")),
        show(Figure(NAME, f"(b) peak RSS ratio {label}/10k", f"{c_big.maxrss_mb / c_small.maxrss_mb:.2f}", "<= 1.2",
                    f"{p_big.maxrss_mb / p_small.maxrss_mb:.2f}")),
        show(Figure(NAME, f"(b) {label}: first request after (s; input read first)", _secs(firsts["crawler", "big"]),
                    "", _secs(firsts["plain", "big"]))),
        show(Figure(NAME, f"(b) exit codes 10k / {label}", f"{c_small.code} / {c_big.code}", "143 / 143",
                    f"{p_small.code} / {p_big.code}")),
    ]


def _secs(value: float | None) -> str:
    return "none in the cap" if value is None else f"{value:.1f}"


# --- (c) CPU and rows per second, in-process ---

@dataclass(frozen=True, slots=True)
class Measured:
    """One in-process run."""

    rows: int
    requests: int
    wall: float
    cpu: float
    code: int = 0
    commits: int = 0  # the sink's commit points (each one an fsync when durable)

    @property
    def rows_per_s(self) -> float:
        """Rows into the CSV per second of wall time."""
        return self.rows / self.wall

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds of this process per 1,000 requests."""
        return self.cpu / self.requests * 1000


def crawl_once(url: str, handles: Path, work: Path, *, durable: bool = True) -> Measured:
    """`crawler posts` in-process (Crawl + run_job), limiter off, fresh output and data directory."""
    settings = Settings(base_url=url, rate_enabled=False, parallelism=PARALLELISM, data_dir=str(work / "data"))
    job = JobOptions(command="posts", input=str(handles), output=str(work / "posts.csv"))
    crawl = Crawl(job, settings, api_key=KEY, durable=durable, quiet=True)
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = asyncio.run(run_job(crawl, install_signals=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    s = outcome.summary
    sink = getattr(crawl, "sink", None)
    return Measured(s.rows_written, s.run_requests, wall, cpu, outcome.exit_code, getattr(sink, "commits", 0))


def plain_once(url: str, handles: Path, work: Path) -> Measured:
    """The plain script in-process at the same concurrency, no limiter."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    names = read_lines(handles)
    result = asyncio.run(plain.crawl_posts(url, names, str(work / "posts.csv"), concurrency=PARALLELISM))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Measured(result.rows, result.requests, wall, cpu)


Runner = Callable[[str, Path, Path], Measured]


def interleaved(kinds: dict[str, Runner], url: str, handles: Path, work: Path, reps: int) -> dict[str, list[Measured]]:
    """Run each kind once per repetition, rotating the order; every run in its own directory."""
    runs: dict[str, list[Measured]] = {k: [] for k in kinds}
    names = list(kinds)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for kind in order:
            d = work / f"{kind}-{rep}"
            d.mkdir()
            m = kinds[kind](url, handles, d)
            runs[kind].append(m)
            print(f"  rep {rep + 1} {kind:12s}: {m.rows:,} rows, {m.requests:,} requests in {m.wall:.2f} s: "
                  f"{m.rows_per_s:,.0f} rows/s, {m.cpu_per_1000:.3f} CPU s / 1,000 requests"
                  + (f", {m.commits:,} commits" if m.commits else "") + (f", exit {m.code}" if m.code else ""),
                  flush=True)
    return runs


def throughput(quick: bool, work: Path) -> list[Figure]:
    """(c): CPU per 1,000 requests and rows/s as a ratio to the plain script."""
    n, reps = (200, 1) if quick else (1000, 5)
    handles = work / "throughput-handles.txt"
    write_handles(handles, n, users=10_000)
    print(f"[pipeline] (c) throughput: posts of {n:,} handles, limiter off, zero latency, concurrency "
          f"{PARALLELISM}, {reps} interleaved repetitions (in-process; CPU of this process)", flush=True)
    with Sim(*FAST) as sim:
        runs = interleaved({"crawler": crawl_once, "plain": plain_once}, sim.url, handles, work, reps)
    c, p = runs["crawler"], runs["plain"]
    ratio = [a.rows_per_s / b.rows_per_s for a, b in zip(c, p, strict=True)]
    cpu_ratio = [a.cpu_per_1000 / b.cpu_per_1000 for a, b in zip(c, p, strict=True)]
    return [
        show(Figure(NAME, "(c) CPU s per 1,000 requests (whole pipeline)",
                    spread([m.cpu_per_1000 for m in c], "{:.3f}"), "<= 0.25",
                    spread([m.cpu_per_1000 for m in p], "{:.3f}"))),
        show(Figure(NAME, "(c) CPU ratio crawler/plain", spread(cpu_ratio, "{:.2f}"))),
        show(Figure(NAME, "(c) posts rows/s into CSV", spread([m.rows_per_s for m in c], "{:,.0f}"), "",
                    spread([m.rows_per_s for m in p], "{:,.0f}"))),
        show(Figure(NAME, "(c) rows/s ratio crawler/plain", spread(ratio, "{:.2f}"), ">= 0.9")),
        show(Figure(NAME, "(c) rows per run", f"{c[0].rows:,}", "", f"{p[0].rows:,}")),
    ]


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    with workdir("pipeline") as work:
        return fidelity(quick, work) + peak_rss(quick, work) + throughput(quick, work)


if __name__ == "__main__":
    main_for(run, __doc__)
