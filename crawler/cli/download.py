"""`download`: media files of posts into a directory."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crawler.cli.common import budget_line, open_reports, resume_hint, settings_from
from crawler.config import api_key
from crawler.errors import BudgetExhausted, Interrupted

if TYPE_CHECKING:
    from crawler.api.client import Client
    from crawler.engine.metrics import RunTally


def cmd_download(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) a media download."""
    from crawler.engine.metrics import summary_record
    from crawler.runs.download import Download, DownloadOptions, run_download

    settings = settings_from(args)
    given = getattr(args, "crawl.parallelism", None) is not None
    if given and settings.parallelism is not None:
        settings = settings.replace(download_parallelism=settings.parallelism)  # --parallelism N: files in flight
    # A CSV input needs no key; ids and expired URLs do (then the API says so, or the item fails).
    key = api_key() if os.environ.get("TIKLIVE_API_KEY", "").strip() else None
    download = Download(DownloadOptions(args.input, args.output, args.what), settings, api_key=key,
                        restart=args.restart, retry_failed=args.retry_failed, quiet=args.quiet,
                        auto=given and settings.parallelism is None)  # --parallelism auto: for the API's requests
    with open_reports(settings, "download") as reports:
        outcome = asyncio.run(run_download(download))
        tally = download_tally(outcome.summary, getattr(download, "client", None))  # None: every URL from a CSV
        reports.finish(outcome.exit_code, summary_record(outcome.summary, outcome.exit_code) | {
            "command": "download", "run_requests": tally.requests_sent, "run_credits_billed": tally.credits_billed,
            "responses": dict(tally.responses), "rate_limited": tally.rate_limited,
            "rate_wait_seconds": tally.rate_wait_seconds}, tally)
    if not args.quiet:
        print(outcome.summary.render(), file=sys.stderr)
    err = outcome.error
    if err is None:
        for line in outcome.summary.skip_lines():  # a note, not a failure: the same line with -q
            print(f"crawler: {line} (listed in {outcome.summary.skipped_file})", file=sys.stderr)
        if outcome.summary.failed:
            print(f"crawler: {outcome.summary.failed:,} posts failed; see {outcome.summary.failures_file}"
                  f"{_retry_hint(dict(outcome.summary.failures), args.retry_failed, outcome.summary.status)}",
                  file=sys.stderr)
    elif isinstance(err, BudgetExhausted) and settings.max_credits is not None:  # the cap spans the job's runs
        print(budget_line(settings.max_credits, outcome.summary.requests_sent, outcome.summary.credits_billed,
                           argv), file=sys.stderr)
    else:
        resumable = isinstance(err, Interrupted) or err.exit_code == 4
        hint = f"; resume with: {resume_hint(argv)}" if resumable else ""
        print(f"crawler: {err}{hint}", file=sys.stderr)
    return outcome.exit_code


def download_tally(summary: Any, client: Client | None) -> RunTally:
    """A download's figures for the metrics file: posts by status, and this run's requests from its API client (none
    when every URL came from a CSV)."""
    from crawler.engine.metrics import RunTally

    items = {"done": summary.posts_done, "failed": summary.failed, "pending": summary.pending}
    if client is None:
        return RunTally(items)
    c = client.counters
    return RunTally(items, requests_sent=c.requests_sent, credits_billed=c.credits_billed, responses=dict(c.responses),
                    rate_limited=c.rate_limited, rate_wait_seconds=client.gate.wait_seconds)


def _retry_hint(failures: dict[str, int], retry_failed: bool, status: str) -> str:
    """What --retry-failed would do about these failures: try those whose reason can change, or nothing."""
    from crawler.stores.model import RETRIABLE

    if any(failures.get(r) for r in RETRIABLE):
        return " (re-run with --retry-failed to try them again)"
    if retry_failed and status == "already complete":
        return " (--retry-failed: nothing to retry; none of these reasons changes by asking again)"
    return ""
