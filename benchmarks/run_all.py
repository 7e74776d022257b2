"""`make bench`: run every benchmark in sequence and print one table of their figures.

Figures only, never assertions on time: this machine is shared, so each figure sits beside a baseline
measured in the same run (the plain script or loop), with medians over repetitions where it is noisy.
`--quick` is a short smoke run that checks the scripts work (its figures use smaller scales).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import bench_client
import bench_csv
import bench_download
import bench_jobs
import bench_ledger
import bench_pipeline
import bench_state
from _common import ROOT, Figure, table


def history(quick: bool) -> list[Figure]:
    """Issue 5's bench_history.py (its own script; SQLite and PostgreSQL) as rows of the table, with issue 13's
    history page measured over the same stores (bench_serve.py)."""
    import bench_history

    handles, days = (1_000, 60) if quick else (10_000, 365)
    print(f"[history] bulk-load {handles * days:,} daily snapshots ({handles:,} handles x {days} days), then query",
          flush=True)
    figures = []
    for backend, r in bench_history.main(["--quick"] if quick else []).items():
        figures += [
            Figure("history", f"{backend}: bulk-load s, {handles * days:,} rows (vs bare insert)", f"{r['load_s']:.1f}",
                   "", f"{r['baseline_s']:.1f}"),
            Figure("history", f"{backend}: growth ms / top 7 d ms / top 30 d ms",
                   f"{r['growth_ms']:.1f} / {r['top7_ms']:.0f} / {r['top30_ms']:.0f}"),
            Figure("serve", f"{backend}: overview first page, median of 5 warm requests, ms",
                   f"{r['serve_overview_warm_s'] * 1000:.0f}", "< 1000",
                   f"top --days 7 --limit 50: {r['serve_top7_s'] * 1000:.0f}"),
            Figure("serve", f"{backend}: largest page KiB (overview, user, CSV, compare x10)",
                   f"{max(v for k, v in r.items() if k.startswith('serve_bytes:')) / 1024:.0f}", "< 2048"),
        ]
    return figures


def history_scale(quick: bool) -> list[Figure]:
    """Issue 22's bench_history_scale.py: 300k users x 30 days and 10k x 1,095 days on both stores."""
    import bench_history_scale

    print("[history-scale] bulk-load, rebuild, then pages, top, bytes per snapshot, ingest commit", flush=True)
    figures = []
    for name, r in bench_history_scale.main(["--quick"] if quick else []).items():
        backend, size = name.split()
        reads = {night: max(v for k, v in r.items() if not k.endswith(("_s", "_b", "_users"))
                            and not k.startswith(("plain", "user")) and k.endswith("mid-night") == night)
                 for night in (False, True)}
        figures += [
            Figure("history-scale", f"{backend} {size}: slowest of overview, sorted by gain 1/7/30, page 100,"
                   " top 7/30 (median of 5 warm), ms; the same mid-night",
                   f"{reads[False] * 1000:.0f}; {reads[True] * 1000:.0f}", "< 1000",
                   f"plain indexed page: {r['plain page'] * 1000:.1f}"),
            Figure("history-scale", f"{backend} {size}: user page, ms", f"{r['user page'] * 1000:.0f}", "< 100",
                   f"plain indexed user: {r['plain user'] * 1000:.1f}"),
            Figure("history-scale", f"{backend} {size}: bulk-load s (vs bare insert); bytes per snapshot",
                   f"{r['load_s']:.0f}; {r['total_b']:.0f}", "", f"{r['bare_s']:.0f}"),
            Figure("history-scale", f"{backend} {size}: ingest commit of 100 profiles, mean ms (vs the same users"
                   f" after one night; vs an empty store)", f"{r['commit_large_mean_s'] * 1000:.1f}",
                   "< 1.5x the first", f"{r['commit_first_mean_s'] * 1000:.1f}; {r['commit_empty_mean_s'] * 1000:.1f}"),
        ]
    return figures


BENCHMARKS: dict[str, Callable[[bool], list[Figure]]] = {
    "client": bench_client.run,
    "ledger": bench_ledger.run,
    "pipeline": bench_pipeline.run,
    "state": bench_state.run,
    "csv": bench_csv.run,
    "history": history,
    "history-scale": history_scale,
    "download": bench_download.run,
    "jobs": bench_jobs.run,
}


def _revision() -> str:
    """The commit measured (and whether crawler/ has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "crawler"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"
    return f"{head or 'an unknown commit'}{' + uncommitted crawler/ changes' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (under ~2 minutes)")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these (repeatable)")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    load = os.getloadavg()
    revision = _revision()
    print(f"benchmarks {'(quick) ' if args.quick else ''}{', '.join(names)} at {revision} on {os.cpu_count()} CPUs, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, Python {sys.version.split()[0]}", flush=True)
    figures: list[Figure] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        began = time.monotonic()
        try:
            figures += BENCHMARKS[name](args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            figures.append(Figure(name, "FAILED", f"{type(exc).__name__}: {exc}"[:80]))
        print(f"[{name}] {time.monotonic() - began:.0f} s\n", flush=True)
    print(f"figures ({'quick, smaller scales; ' if args.quick else ''}{time.monotonic() - started:.0f} s in all; "
          f"value = ours; baseline = the plain script or loop (bare insert for history), measured in the same run; "
          "ranges are median (min-max, n)):")
    print(table(figures))
    if _revision() != revision:
        print(f"note: the code changed during the run ({revision} -> {_revision()}); child processes may mix both")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
