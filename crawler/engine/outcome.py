"""The outcome: how a run ended, as the end-of-run summary and CONTRACT.md's exit code.

Last stage of the flow: `crawl.py` hands its state store and counters to `outcome()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crawler.api.client import Client
from crawler.engine.stats import Summary
from crawler.errors import CrawlerError, run_exit_code
from crawler.jobs.prepare import JobOptions, failures_path
from crawler.sinks.csv_sink import part_path
from crawler.stores.local import StateStore


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended."""

    summary: Summary
    error: CrawlerError | None

    @property
    def exit_code(self) -> int:
        """CONTRACT.md's exit code."""
        return run_exit_code(self.error, failed=bool(self.summary.items_failed or self.summary.failures))


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the run itself knows beyond the state store, for the summary."""

    started: float  # time.monotonic() at the start
    parallelism: int
    max_pages: int | None
    input_change: tuple[int, int] | None = None
    capped: int = 0
    renamed: tuple[str, str] | None = None  # (the job's input file, this run's): another input file was given


def outcome(job: JobOptions, state: StateStore, client: Client | None, facts: RunFacts, *, status: str, rows: int,
            error: CrawlerError | None, reason: str = "") -> Outcome:
    """The summary of a run from the job's committed counters (what a resume starts from) and the client's."""
    record = state.job()
    assert record is not None
    progress = state.progress()
    c = client.counters if client is not None else None
    pace = client.pace if client is not None and client.pace.enabled else None
    fails = state.failure_counts()
    out = Path(job.output)
    summary = Summary(
        command=job.command,
        status=status,
        items_total=progress.total,
        items_done=progress.done,
        items_failed=sum(fails.values()),  # failed items and failed reply walks: the failures file's rows
        items_pending=progress.pending,
        rows_written=rows,
        rows_total=record.rows,
        requests_sent=record.requests_sent,
        credits_billed=record.credits_billed,
        run_requests=c.requests_sent if c else 0,
        rate_limited=c.rate_limited if c else 0,
        retries=c.retries if c else 0,
        elapsed=time.monotonic() - facts.started,
        parallelism=facts.parallelism,
        rate_used=pace.effective_rate if pace is not None else None,
        rate_window_seconds=pace.window if pace is not None else None,
        rate_wait_seconds=client.gate.wait_seconds if client is not None else 0.0,
        failures=fails,
        output=str(out if status != "stopped" else part_path(out)),
        failures_file=str(failures_path(out)) if fails else "",
        reason=reason or (str(error) if error else ""),
        notes=tuple(_notes(facts, client)),
        run_credits_billed=c.credits_billed if c else 0,
        responses=dict(c.responses) if c else {},
    )
    return Outcome(summary, error)


def _notes(facts: RunFacts, client: Client | None) -> Iterator[str]:
    if client is not None and client.unexpected.note():
        yield client.unexpected.note()
    if facts.renamed is not None:
        change = facts.input_change
        counts = (f" ({change[0]:,} new items added, {change[1]:,} done items no longer in it)"
                  if change is not None else "")
        yield f"another input file than the job's: {facts.renamed[0]} → {facts.renamed[1]}; its rows stay{counts}"
    elif facts.input_change is not None:
        added, gone = facts.input_change
        yield (f"the input was edited: {added:,} new items added, {gone:,} done items no longer in it"
               " (their rows stay)")
    if facts.capped:
        yield (f"{facts.capped:,} walks stopped at the --max-pages cap of {facts.max_pages} while their lists went"
               " on (pagination_guard rows in the failures file; their first pages are in the CSV)")
