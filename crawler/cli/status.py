"""`crawler status DIR`: a directory's jobs, a download job's (its state lives in DIR) or an ingest out-dir's."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from crawler.errors import UsageError
from crawler.stores.model import JobRecord, Progress

_DAY_FILE = re.compile(r"(profiles|posts)-(\d{4}-\d{2}-\d{2})\.csv")


def status_dir(directory: Path) -> int:
    """Print the download jobs in DIR and, for an ingest out-dir, its day files; UsageError if it holds neither."""
    from crawler.runs.download import download_jobs

    jobs = download_jobs(directory)
    for what, path in jobs.items():
        _download_status(directory, what, path)
    ingest = _ingest_status(directory)
    if not jobs and not ingest:
        raise UsageError(f"{directory} holds no download job (.crawler-download-*.state.db) and no ingest day files;"
                         " for a job with a CSV output give that file: crawler status OUT.csv")
    return 0


def _download_status(directory: Path, what: str, path: Path) -> None:
    from crawler.stores.local import StateStore

    store = StateStore(path)
    try:
        job = store.job()
        if job is None:
            return
        p = store.progress()
        fails = store.failure_counts()
    finally:
        store.close()
    print_job(f"download --what {what} -> {directory} ({'unfinished' if p.pending else 'complete'})", p, job, fails,
              directory / f"download-{what}.failures.csv")


def print_job(head: str, p: Progress, job: JobRecord, fails: dict[str, int], failures_file: Path,
              rows: int | None = None) -> None:
    """The lines `crawler status` prints of one job in its store: items, rows, both credit counters, failures."""
    print(f"job             {head}")
    print(f"items           {p.done:,} done, {p.failed:,} failed, {p.pending:,} pending of {p.total:,}")
    if rows is not None:
        print(f"rows            {rows:,}")
    print(f"requests_sent   {job.requests_sent:,}")
    print(f"credits_billed  {job.credits_billed:,}")
    print(f"runs            {job.runs}")
    if fails:
        print("failures        " + ", ".join(f"{k}: {v:,}" for k, v in sorted(fails.items()))
              + f" (see {failures_file})")


def _ingest_status(directory: Path) -> bool:
    """The out-dir's day files, first and last day; False if DIR is no ingest out-dir."""
    days: dict[str, set[dt.date]] = {"profiles": set(), "posts": set()}
    for path in directory.iterdir():
        m = _DAY_FILE.fullmatch(path.name)
        if m:
            days[m[1]].add(dt.date.fromisoformat(m[2]))
    if not days["profiles"] and not days["posts"] and not (directory / ".ingest-id").exists():
        return False
    print(f"ingest out-dir  {directory}")
    for kind, found in days.items():
        span = f" ({min(found)} .. {max(found)})" if found else ""
        print(f"{kind + ' files':<16}{len(found):,} days{span}")
    print("per day         crawler history days (users snapshotted, missing, credits, how the runs ended)")
    return True
