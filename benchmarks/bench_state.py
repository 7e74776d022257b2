"""Issue 4: what the commit point costs. Posts rows per second of the normal crawl (state store, CSV fsynced
before every commit: `Crawl(durable=True)`) vs the same crawl without fsync (`durable=False`) vs the plain
script; same simulator (zero latency, limiter off), same input, same concurrency, interleaved repetitions.
"""

from __future__ import annotations

from pathlib import Path

from _common import FAST, Figure, Sim, main_for, show, spread, workdir, write_handles
from bench_pipeline import PARALLELISM, Measured, crawl_once, interleaved, plain_once

NAME = "state"


def durable(url: str, handles: Path, work: Path) -> Measured:
    """The normal crawl: fsync the CSV, then commit the state."""
    return crawl_once(url, handles, work, durable=True)


def no_fsync(url: str, handles: Path, work: Path) -> Measured:
    """The same crawl and state store, without fsync."""
    return crawl_once(url, handles, work, durable=False)


def run(quick: bool = False) -> list[Figure]:
    """Every figure of this benchmark."""
    n, reps = (200, 1) if quick else (1000, 5)
    print(f"[state] rows/s with and without durability: posts of {n:,} handles, limiter off, zero latency, "
          f"concurrency {PARALLELISM}, {reps} interleaved repetitions (in-process)", flush=True)
    with workdir("state") as work:
        handles = work / "handles.txt"
        write_handles(handles, n, users=10_000)
        with Sim(*FAST) as sim:
            runs = interleaved({"durable": durable, "no fsync": no_fsync, "plain": plain_once}, sim.url, handles,
                               work, reps)
    d, f, p = runs["durable"], runs["no fsync"], runs["plain"]
    vs_fsync = [1 - a.rows_per_s / b.rows_per_s for a, b in zip(d, f, strict=True)]
    vs_plain = [1 - a.rows_per_s / b.rows_per_s for a, b in zip(d, p, strict=True)]
    pct = "{:+.1%}"
    return [
        show(Figure(NAME, "rows/s, state store + fsync (normal)", spread([m.rows_per_s for m in d], "{:,.0f}"), "",
                    spread([m.rows_per_s for m in p], "{:,.0f}"))),
        show(Figure(NAME, "rows/s, state store, no fsync", spread([m.rows_per_s for m in f], "{:,.0f}"))),
        show(Figure(NAME, "overhead of durability (vs no fsync)", spread(vs_fsync, pct), "< 10%")),
        show(Figure(NAME, "overhead vs plain script (no state at all)", spread(vs_plain, pct), "< 10%")),
        show(Figure(NAME, "CPU s per 1,000 requests, normal", spread([m.cpu_per_1000 for m in d], "{:.3f}"), "",
                    spread([m.cpu_per_1000 for m in p], "{:.3f}"))),
        show(Figure(NAME, "CPU s per 1,000 requests, no fsync", spread([m.cpu_per_1000 for m in f], "{:.3f}"))),
        show(Figure(NAME, f"commit points (fsyncs) per run of {d[0].requests:,} requests",
                    spread([float(m.commits) for m in d], "{:,.0f}"))),
    ]


if __name__ == "__main__":
    main_for(run, __doc__)
