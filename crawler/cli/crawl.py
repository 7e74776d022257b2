"""The job commands (profiles, posts, ... a crawl into one CSV) and a job's status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crawler.api.client import Counters
from crawler.cli.common import budget_line, check_ledger, open_reports, resume_hint, settings_from
from crawler.cli.get import fetch_regions
from crawler.config import Settings, api_key
from crawler.engine.outcome import Outcome
from crawler.errors import BudgetExhausted, Interrupted, UsageError
from crawler.jobs.commands import COMMANDS
from crawler.jobs.prepare import JobOptions, default_output, failures_path, finished, state_path
from crawler.runs.local import Crawl, run_job
from crawler.sinks.csv_sink import part_path
from crawler.sinks.datafile import datafile_path
from crawler.sinks.datafile import require as require_format

PUBLISH_TIME = (0, 1, 7, 30, 90, 180)
SORT_BY = {"relevance": 0, "likes": 1, "date": 2, "0": 0, "1": 1, "2": 2}


def cmd_job(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) one crawl job."""
    settings = settings_from(args)
    require_format(settings.output_format)  # parquet without pyarrow: exit 2 before anything is spent
    reports = open_reports(settings, args.command)
    key = api_key()
    check_ledger(settings, key)
    name = args.command
    search, lookup = _search_options(args, settings, key)
    job = JobOptions(
        command=name,
        input=args.input,
        output=args.output or default_output(name, args.input, COMMANDS[name].input_kind),
        column=getattr(args, "column", None),
        by_id=getattr(args, "by_id", False),
        with_replies=getattr(args, "with_replies", False),
        max_items=settings.max_items,
        max_pages=settings.max_pages,
        page_size=settings.page_size,
        **search,
    )
    if not job.output.lower().endswith(".csv"):
        raise UsageError(f"--output {job.output}: the output must be a .csv file")
    continue_job = getattr(args, "continue_job", False)
    if settings.jobs_url:
        from crawler.runs.distributed import start_job

        with reports as report:  # the job-level figures from PostgreSQL
            outcome = asyncio.run(start_job(job, settings, api_key=key, url=settings.jobs_url,
                                            restart=args.restart, retry_failed=args.retry_failed,
                                            overwrite=args.overwrite, quiet=args.quiet, earlier=lookup,
                                            continue_job=continue_job))
            report.done(outcome.exit_code, [outcome.summary])
    else:
        crawl = Crawl(job, settings, api_key=key, restart=args.restart, retry_failed=args.retry_failed,
                      continue_job=continue_job, overwrite=args.overwrite, quiet=args.quiet, earlier=lookup)
        with reports as report:
            outcome = asyncio.run(run_job(crawl))
            report.done(outcome.exit_code, [outcome.summary])
    _report(outcome, args.quiet, argv, max_credits=settings.max_credits, retry_failed=args.retry_failed)
    if not args.quiet and settings.output_format != "csv" and outcome.summary.status in ("completed",
                                                                                          "already complete"):
        print(f"crawler: {datafile_path(Path(job.output), settings.output_format)} holds the rows of {job.output}"
              " for programs (typed, no formula guard)", file=sys.stderr)
    return outcome.exit_code


def _search_options(args: argparse.Namespace, settings: Settings, key: Any
                    ) -> tuple[dict[str, Any], Counters | None]:
    """The job options of `search-videos`, and the counters of the region lookup made to check --region (None
    when the region list was cached): the job counts that request as its own, under --max-credits."""
    if args.command != "search-videos":
        return {}, None
    if args.publish_time not in PUBLISH_TIME:
        raise UsageError(f"--publish-time {args.publish_time}: use one of {', '.join(map(str, PUBLISH_TIME))}")
    sort = SORT_BY.get(str(args.sort_by).lower())
    if sort is None:
        raise UsageError(f"--sort-by {args.sort_by}: use relevance, likes or date")
    region = args.region.upper() if args.region else None
    lookup = None
    if region:
        found, lookup = fetch_regions(settings, key)
        if region not in {r[0] for r in found}:
            raise UsageError(f"--region {args.region}: not a region the API knows (see `crawler regions`)")
    return {"publish_time": args.publish_time, "sort_by": sort, "region": region}, lookup


def _report(outcome: Outcome, quiet: bool, argv: Sequence[str], *, max_credits: int | None = None,
            retry_failed: bool | str = False) -> None:
    """The summary, then one line saying why the run ended that way and the command that goes on.

    ``max_credits``: the job's cap (job commands only), so a budget stop prints a command with a higher one
    (the same command would stop again at once). ``retry_failed``: the flag given, so a retry that found nothing
    to retry says so.
    """
    if not quiet:
        print(outcome.summary.render(), file=sys.stderr)
    err = outcome.error
    if err is None:
        if retry_failed and outcome.summary.status == "already complete":
            print(_nothing_to_retry(outcome.summary.failures, retry_failed, argv), file=sys.stderr)
        elif outcome.summary.items_failed:
            print(f"crawler: {outcome.summary.items_failed:,} items failed; see {outcome.summary.failures_file}"
                  f"{_failure_hint(outcome.summary.failures, argv)}", file=sys.stderr)
        return
    if isinstance(err, BudgetExhausted) and max_credits is not None:
        print(budget_line(max_credits, outcome.summary.requests_sent, outcome.summary.credits_billed, argv),
              file=sys.stderr)
        return
    resumable = isinstance(err, Interrupted) or err.exit_code == 4 or getattr(err, "resumable", False)
    hint = f"; resume with: {resume_hint(argv)}" if resumable else ""
    print(f"crawler: {err}{hint}", file=sys.stderr)


def _failure_hint(failures: dict[str, int], argv: Sequence[str]) -> str:
    """What can be done about these failures, only what applies (a command to run comes last)."""
    from crawler.stores.model import RETRIABLE

    hints = []
    if failures.get("invalid_input"):
        hints.append("fix the invalid lines in the input and run the same command: only they are fetched")
    if any(failures.get(r) for r in RETRIABLE):
        hints.append(f"to try the {'/'.join(r for r in RETRIABLE if failures.get(r))} ones again: "
                     f"{resume_hint(argv, retry_failed=True)}")
    return f"; {'; '.join(hints)}" if hints else ""


def _nothing_to_retry(failures: dict[str, int], retry_failed: bool | str, argv: Sequence[str]) -> str:
    """--retry-failed on a complete job none of whose failures it retries: say so, and what would."""
    from crawler.stores.model import RETRIABLE_ALL

    counts = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(failures.items())) or "none"
    line = f"crawler: --retry-failed: nothing to retry (failures: {counts})"
    if retry_failed != "all" and any(failures.get(r) for r in RETRIABLE_ALL):
        again = resume_hint(argv, retry_failed=True).removesuffix(" --retry-failed") + " --retry-failed=all"
        return f"{line}; not_found and private are asked again only with --retry-failed=all: {again}"
    if failures.get("invalid_input"):
        return f"{line}; fix the invalid lines in the input and run the command without --retry-failed"
    return f"{line}; the job is complete"


def cmd_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Show a job's progress, failures and credits."""
    from crawler.stores.local import StateStore

    out = Path(args.output)
    if out.is_dir():  # a download job's (its state lives in DIR) or an ingest out-dir
        from crawler.cli.status import status_dir

        return status_dir(out)
    if out.name.lower().endswith(".csv.part"):  # the path a stopped run's summary printed
        out = out.with_name(out.name.removesuffix(".part"))
    path = state_path(out)
    if not path.is_file():
        raise UsageError(f"no job state for {out} (expected {path}); was the job started with -o {out}?")
    store = StateStore(path)
    try:
        job = store.job()
        if job is None:
            raise UsageError(f"{path} holds no job")
        p = store.progress()
        fails = store.failure_counts()
        complete = finished(store, out)
    finally:
        store.close()
    from crawler.cli.status import print_job

    where = out if complete else part_path(out)
    print_job(f"{job.command} -> {where} ({'complete' if complete else 'unfinished'})", p, job, fails,
              failures_path(out), rows=job.rows)
    return 0
