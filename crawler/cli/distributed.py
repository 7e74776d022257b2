"""The commands of PostgreSQL jobs (jobs.url): `work`, `jobs` and `export`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crawler.cli.common import check_ledger, open_reports, settings_from
from crawler.config import Settings, api_key
from crawler.errors import UsageError
from crawler.sinks.datafile import datafile_path
from crawler.sinks.datafile import require as require_format


def _jobs_url(settings: Settings, command: str) -> str:
    if not settings.jobs_url:
        raise UsageError(f"{command}: say where the jobs are: --jobs-url postgresql://... (or CRAWLER_JOBS_URL,"
                         " or jobs.url in config.toml)")
    return settings.jobs_url


# Settings flags `crawler work` takes (shared with the job commands) that a job's own options override.
_JOB_OPTION_FLAGS = (("--max-credits", "crawl.max_credits"), ("--max-pages", "crawl.max_pages"),
                     ("--page-size", "crawl.page_size"), ("--max-items", "crawl.max_items"),
                     ("--bom", "output.bom"), ("--raw", "output.raw"))


def cmd_work(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Work open PostgreSQL jobs."""
    from crawler.engine.metrics import RunTally
    from crawler.runs.distributed import work
    from crawler.runs.job_worker import SessionResult

    settings = settings_from(args)
    url = _jobs_url(settings, "work")
    key = api_key()
    check_ledger(settings, key)
    ignored = [flag for flag, dest in _JOB_OPTION_FLAGS if getattr(args, dest, None) is not None]
    if ignored:
        print(f"crawler: warning: work ignores {', '.join(ignored)}: each job is worked with the options its starter"
              " gave (caps, page size, output cells); set them on the job's starting command", file=sys.stderr)
    tally = SessionResult()
    with open_reports(settings, "work") as reports:
        code = asyncio.run(work(settings, api_key=key, url=url, job=args.job, until_idle=args.until_idle,
                                quiet=args.quiet, tally=tally))
        reports.finish(code, work_record(tally, code), RunTally(
            {"worked": tally.items}, requests_sent=tally.requests_sent, credits_billed=tally.credits_billed,
            responses=tally.responses, rate_limited=tally.rate_limited, rate_wait_seconds=tally.rate_wait_seconds))
    return code


def work_record(tally: Any, exit_code: int) -> dict[str, Any]:
    """`crawler work`'s summary JSON: what this worker did, summed over the jobs it worked."""
    return {"command": "work", "exit_code": exit_code, "items_worked": tally.items, "rows_written": tally.rows,
            "items_lost": tally.lost, "run_requests": tally.requests_sent, "run_credits_billed": tally.credits_billed,
            "rate_limited": tally.rate_limited, "retries": tally.retries, "rate_wait_seconds": tally.rate_wait_seconds,
            "responses": dict(tally.responses), "parallelism": tally.parallelism}


def cmd_jobs(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """List PostgreSQL jobs."""
    from crawler.runs.job_export import jobs_report

    settings = settings_from(args)
    print(asyncio.run(jobs_report(settings, url=_jobs_url(settings, "jobs"), as_json=args.json)))
    return 0


def cmd_export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Write a finished PostgreSQL job's output."""
    from crawler.runs.job_export import export_job

    settings = settings_from(args)
    require_format(settings.output_format)
    if not args.output.lower().endswith(".csv"):
        raise UsageError(f"--output {args.output}: the output must be a .csv file")
    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory: give a file name such as {out / 'export.csv'}")
    if out.exists() and not args.overwrite:  # never a file this tool did not write (a re-export too: say so)
        raise UsageError(f"--output {out} exists: choose another output, or add --overwrite to replace it")
    # The job's own output.bom/output.raw (its starter's) unless --bom/--raw are given here.
    n = asyncio.run(export_job(settings, url=_jobs_url(settings, "export"), jid=args.job, out=Path(args.output),
                               bom=getattr(args, "output.bom", None), raw=getattr(args, "output.raw", None)))
    also = datafile_path(out, settings.output_format) if settings.output_format != "csv" else None
    print(f"crawler: wrote {n:,} rows to {args.output}{f' and {also}' if also else ''}", file=sys.stderr)
    return 0
