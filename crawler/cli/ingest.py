"""`ingest`: one day of the watch list into the day files and the history store."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crawler.cli.common import check_ledger, open_reports, resume_hint, settings_from
from crawler.config import api_key
from crawler.errors import Interrupted, UsageError


def cmd_ingest(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) one day's ingest."""
    from crawler.engine.metrics import ingest_record
    from crawler.runs.ingest import ingest, override_day, utc_now

    override_day(args.date, today=utc_now().date(), force=args.force_date)  # a typo: exit 2 before anything else
    if args.include_private and not args.posts:
        raise UsageError("--include-private walks private users' posts: add --posts (or drop --include-private)")
    settings = settings_from(args)
    key = api_key()
    check_ledger(settings, key)
    url = settings.history_url or ""
    if url.startswith(("postgresql://", "postgres://")):  # unreachable: exit 2 before the out-dir is created
        from crawler.history.store import HistoryStore

        HistoryStore(url, stall_limit=settings.retry_stall_limit, connect_timeout=settings.connect_timeout).close()
    with open_reports(settings, "ingest", out_dir=args.out_dir) as reports:
        result = asyncio.run(ingest(args.input, Path(args.out_dir), settings, api_key=key, date=args.date,
                                    with_posts=args.posts, restart=args.restart, retry_failed=args.retry_failed,
                                    column=args.column, by_id=args.by_id, quiet=args.quiet,
                                    force_date=args.force_date, include_private=args.include_private))
        reports.done(result.exit_code, [o.summary for o in result.outcomes], ingest_record(result),
                     completed=result.held_by is None)
    if not args.quiet:
        for outcome in result.outcomes:
            print(outcome.summary.render(), file=sys.stderr)
    line = ingest_line(result, argv)
    if line:
        print(line, file=sys.stderr)
    return result.exit_code


def ingest_line(result: Any, argv: Sequence[str]) -> str:
    """The one line an ingest run ends with: why it stopped or what failed, and what to run next."""
    from crawler.errors import BalanceExhausted, BudgetExhausted
    from crawler.stores.model import RETRIABLE

    if result.held_by is not None:
        return (f"crawler: the out-dir is held by a running ingest ({result.held_by}); it covers today's users,"
                " so this run has nothing to do")
    err = result.error
    again = resume_hint(argv)
    if isinstance(err, BudgetExhausted):
        if not result.budget:
            return "crawler: --max-credits is 0, so nothing can be fetched: raise it (or drop it) and run again"
        return (f"crawler: {err}; each run has its own budget and goes on where this one stopped: {again}")
    if isinstance(err, BalanceExhausted):
        return f"crawler: {err}; top up the account, then go on with: {again}"
    if err is not None:
        resumable = isinstance(err, Interrupted) or getattr(err, "resumable", False)
        return f"crawler: {err}" + (f"; go on with: {again}" if resumable else "")
    failures: dict[str, int] = {}
    for o in result.outcomes:
        for reason, n in o.summary.failures.items():
            failures[reason] = failures.get(reason, 0) + n
    if not failures:
        return ""
    files = ", ".join(result.failures_files) or "the failures files"
    counts = ", ".join(f"{k}: {v:,}" for k, v in sorted(failures.items()))
    hints = [f"crawler: some items failed on {result.day.isoformat()} ({counts}); see {files}"]
    if failures.get("invalid_input"):
        hints.append("fix the invalid lines in the watch list")
    if failures.get("pagination_guard"):
        hints.append("walks a pagination guard ended go on in the next run")
    if failures.get("not_found") or failures.get("private"):
        hints.append("not_found users are tried again on the next day (--retry-failed=all tries them now)")
    if any(failures.get(r) for r in RETRIABLE):  # the command goes last, so the line ends with it
        hints.append(f"try them again today with: {again} --retry-failed")
    return "; ".join(hints)
