"""`history`: the queries over the snapshot history (growth, top, as-of, days, export, plot, serve) and rebuild."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crawler.cli.common import settings_from
from crawler.engine.stats import silence
from crawler.errors import UsageError
from crawler.sinks.datafile import datafile_path
from crawler.sinks.datafile import require as require_format


def cmd_history(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Answer one history query."""
    from crawler.history.store import HistoryStore
    from crawler.runs.ingest import history_url

    settings = settings_from(args)
    if args.query == "export":
        require_format(settings.output_format)
        if args.output == "-" and settings.output_format != "csv":
            raise UsageError(f"history export -o -: --format {settings.output_format} needs a file (-o FILE.csv);"
                             " stdout takes the CSV only")
        if settings.output_format != "csv" and not args.output.lower().endswith(".csv"):
            raise UsageError(f"history export -o {args.output}: with --format {settings.output_format}, -o names the"
                             f" CSV (FILE.csv); FILE.{settings.output_format} is written beside it")
        args.data_format = settings.output_format
    url = history_url(settings)
    bounds = {"stall_limit": settings.retry_stall_limit, "connect_timeout": settings.connect_timeout}
    if not url.startswith(("postgresql://", "postgres://")) and not Path(url.removeprefix("sqlite:///")).is_file():
        # A query never creates a store: an empty one would only hide a wrong --data-dir or --history-url.
        raise UsageError(f"no history at {url.removeprefix('sqlite:///')}: run `crawler ingest` first, or point"
                         " --data-dir / --history-url at the store it wrote")
    if args.query == "serve":
        from crawler.history.serve import serve

        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port {args.port}: use a port from 0 to 65535")
        return asyncio.run(serve(url, args.host, args.port, **bounds))
    store = HistoryStore(url, **bounds)
    try:
        query = _QUERIES.get(args.query)
        if query is not None:
            query(store, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted; silent and 0, as Unix tools are
        silence(sys.stdout)
        return 0
    finally:
        store.close()
    return 0


def _growth(store: Any, args: argparse.Namespace) -> None:
    from crawler.history.queries import parse_day

    # Every query runs before the first line is printed: a failure prints its message, never a lone header.
    rows = store.growth(args.handle, args.since and parse_day(args.since, "--since"),
                        args.until and parse_day(args.until, "--until"))
    renamed = {r.day: r for r in store.renames(store.resolve(args.handle)[0])}
    print(f"{'day':<10}  {'followers':>12}  {'delta':>9}")
    for r in rows:
        delta = "" if r.delta is None else f"{r.delta:+,}"
        followers = "" if r.followers is None else f"{r.followers:,}"
        note = f"  renamed @{renamed[r.day].old} -> @{renamed[r.day].new}" if r.day in renamed else ""
        print(f"{r.day:<10}  {followers:>12}  {delta:>9}{note}")


def _top(store: Any, args: argparse.Namespace) -> None:
    top = store.top(args.by, args.days, args.limit)
    print(f"{'handle':<26}  {'start':>12}  {'end':>12}  {'gained':>10}")
    for t in top:
        # An unknown count (the API left it out) is a blank, not a 0, as on `history serve`'s page.
        start, end = ("" if v is None else f"{v:,}" for v in (t.start, t.end))
        gained = "" if t.gained is None else f"{t.gained:+,}"
        print(f"@{t.handle:<25}  {start:>12}  {end:>12}  {gained:>10}".rstrip())


def _as_of(store: Any, args: argparse.Namespace) -> None:
    import csv

    from crawler.history.queries import parse_day

    rows = store.as_of(parse_day(args.date, "as-of"))
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["handle", "user_id", "day", "followers", "following", "hearts", "videos"])
    for row in rows:
        out.writerow([row[3], row[0], row[1], row[4], row[5], row[6], row[7]])


def _days(store: Any, args: argparse.Namespace) -> None:
    days = store.days()
    print(f"{'day':<10}  {'snapshotted':>11}  {'missing':>7}  {'failed':>6}  {'credits':>8}  runs")
    for d in days:
        if d.gap:
            print(f"{d.day:<10}  {'':>11}  {'':>7}  {'':>6}  {'':>8}  gap: no run")
            continue
        missing = "" if d.missing is None else f"{d.missing:,}"
        runs = ", ".join(d.runs) or "no run recorded"
        notes = [" (--date: a backfill)" if d.by_date else ""]
        notes += [f"; renamed @{r.old} -> @{r.new}" for r in d.renames]
        print(f"{d.day:<10}  {d.snapshotted:>11,}  {missing:>7}  {d.failures:>6,}  {d.credits_billed:>8,}"
              f"  {runs}{''.join(notes)}")


def _export(store: Any, args: argparse.Namespace) -> None:
    from crawler.history.export import export_csv

    if args.output == "-":
        n = export_csv(store, None)
        print(f"crawler: wrote {n:,} snapshots to stdout", file=sys.stderr)
        return
    n = export_csv(store, Path(args.output), args.data_format)
    also = f" and {datafile_path(Path(args.output), args.data_format)}" if args.data_format != "csv" else ""
    print(f"crawler: wrote {n:,} snapshots to {args.output}{also}", file=sys.stderr)


def _plot(store: Any, args: argparse.Namespace) -> None:
    from crawler.history.plot import plot_growth
    from crawler.history.queries import parse_day

    known, unknown = [], []
    for handle in args.handles:
        try:
            store.resolve(handle)
            known.append(handle)
        except UsageError:
            unknown.append("@" + handle.strip().lstrip("@").lower())
    if not known:
        raise UsageError(f"plot: no history for {', '.join(unknown)} (run `crawler ingest` first, or check"
                         " the spelling)")
    if unknown:
        print(f"crawler: no history for {', '.join(unknown)}: drawing the others", file=sys.stderr)
    labels = plot_growth(store, known, Path(args.output), style=args.style,
                         since=args.since and parse_day(args.since, "--since"),
                         until=args.until and parse_day(args.until, "--until"))
    print(f"crawler: wrote {args.output} ({', '.join(labels)})", file=sys.stderr)


def _rebuild(store: Any, args: argparse.Namespace) -> None:
    from crawler.history.ready import rebuild_store

    n = rebuild_store(store)
    print(f"crawler: rebuilt the maintained data of {n:,} users from the snapshots", file=sys.stderr)


_QUERIES: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "growth": _growth, "top": _top, "as-of": _as_of, "days": _days, "export": _export, "plot": _plot,
    "rebuild": _rebuild,
}
