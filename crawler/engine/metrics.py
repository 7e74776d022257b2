"""What a scheduler reads after a run: the Prometheus textfile (`--metrics-file`) and the summary JSON
(`--summary-json`). Last stage of the flow, after `outcome`: the CLI wraps each job command and ingest in
`run_reports()`, which writes both at every end except a usage error (exit 2).

The metrics file is shared: one file may hold the series of several commands (label `command`). A run
rewrites only its own command's series, atomically (prometheus_client's `write_to_textfile`: a temporary
file renamed over the old one), under a lock so two commands ending together keep each other's series.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from crawler.engine.stats import Summary
from crawler.errors import CrawlerError, Interrupted, UsageError
from crawler.files import atomic_write, lock_file

log = logging.getLogger("crawler.engine.metrics")

SUCCESS_CODES = (0, 3)  # the job completed (3: some items failed, each one in the failures file)
SCHEMA_VERSION = 1  # of the summary JSON: a field renamed or changing type raises it; new fields do not

# Gauges of the last run: name -> (help, extra label); every series also has the label `command` (CONTRACT.md
# "Metrics"). Units in the names, `last_run` in those that hold one run's figures (they are not counters).
GAUGES: dict[str, tuple[str, str | None]] = {
    "crawler_last_success_timestamp_seconds": ("Unix time the last run that completed (exit 0 or 3) ended", None),
    "crawler_last_run_timestamp_seconds": ("Unix time the last run ended, however it ended", None),
    "crawler_last_run_exit_code": ("Exit code of the last run", None),
    "crawler_last_run_duration_seconds": ("Seconds the last run took", None),
    "crawler_last_run_items": ("Input items of the last run's job by status", "status"),
    "crawler_last_run_requests_sent": ("HTTP requests the last run sent, retries included", None),
    "crawler_last_run_credits_billed": ("Requests of the last run that got a billable answer", None),
    "crawler_last_run_responses": ("Requests of the last run by what they met", "outcome"),
    "crawler_last_run_rate_limited": ("Rate-limit answers (HTTP 429) the last run met", None),
    "crawler_last_run_rate_wait_seconds": ("Seconds the last run's requests waited for the key's rate budget", None),
}
# Counters summed over every run that wrote the file: sample name -> help (the family's name drops `_total`).
COUNTERS: dict[str, str] = {
    "crawler_requests_sent_total": "HTTP requests sent, retries included, by every run that wrote this file",
    "crawler_credits_billed_total": "Requests that got a billable answer, in every run that wrote this file",
}
SERIES: dict[str, tuple[str, str | None]] = GAUGES | {name: (text, None) for name, text in COUNTERS.items()}
LAST_SUCCESS = "crawler_last_success_timestamp_seconds"


@dataclass(frozen=True, slots=True)
class RunTally:
    """What one run spent and met: the figures of the `last_run` series (and what the counters add up)."""

    items: Mapping[str, int]  # input items by status (done, failed, pending; `work`: worked)
    requests_sent: int = 0
    credits_billed: int = 0
    responses: Mapping[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    rate_wait_seconds: float = 0.0

    @classmethod
    def of(cls, summaries: Sequence[Summary]) -> RunTally:
        """This run's figures, summed over the jobs it ran (ingest runs one or two)."""
        responses: dict[str, int] = {}
        for s in summaries:
            for kind, n in s.responses.items():
                responses[kind] = responses.get(kind, 0) + n
        return cls(items={"done": sum(s.items_done for s in summaries),
                          "failed": sum(s.items_failed for s in summaries),
                          "pending": sum(s.items_pending for s in summaries)},
                   requests_sent=sum(s.run_requests for s in summaries),
                   credits_billed=sum(s.run_credits_billed for s in summaries), responses=responses,
                   rate_limited=sum(s.rate_limited for s in summaries),
                   rate_wait_seconds=sum(s.rate_wait_seconds for s in summaries))


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """One run's values for the metrics file; `tally` is None when the run ended before it had one (an unexpected
    error): its `last_run` figures are then left out for the command and the counters keep their values."""

    command: str
    exit_code: int
    finished_at: float  # Unix time
    duration_seconds: float
    tally: RunTally | None = None
    completed: bool = True  # False: the run did no work (ingest found its out-dir held by a running ingest)

    @property
    def succeeded(self) -> bool:
        """The job completed (CONTRACT.md exit 0 or 3)."""
        return self.completed and self.exit_code in SUCCESS_CODES


Sample = tuple[str, dict[str, str], float]  # (series name, labels, value)


def read_metrics(path: Path) -> list[Sample]:
    """Our series in an existing metrics file ([] when there is none, or when it cannot be parsed); series of
    other names (an older version's) are dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        return [(s.name, dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text)
                for s in family.samples if s.name in SERIES and "command" in s.labels]
    except ValueError as exc:
        log.warning("the metrics file %s could not be parsed (%s): rewriting it with this run's series", path, exc)
        return []


def write_metrics(path: Path, run: RunMetrics) -> None:
    """Rewrite the metrics file atomically with this run's series; other commands' series, this command's counters
    (this run's figures added) and, after a run that did not complete, its last-success time are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(path.with_name(path.name + ".lock"), wait=True):  # held for a read and a rename: milliseconds
        old = read_metrics(path)
        kept = [(name, labels, value) for name, labels, value in old
                if labels["command"] != run.command or (name == LAST_SUCCESS and not run.succeeded)]
        totals = {name: value for name, labels, value in old if labels["command"] == run.command and name in COUNTERS}
        registry = CollectorRegistry()
        registry.register(_Families([*kept, *_samples(run, totals)]))
        write_to_textfile(str(path), registry)


class _Families:
    """A prometheus_client collector of the file's samples: a gauge or counter family per name, HELP and TYPE."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, (text, extra) in SERIES.items():
            labels = ["command"] if extra is None else ["command", extra]
            family = (CounterMetricFamily(name, text, labels=labels) if name in COUNTERS
                      else GaugeMetricFamily(name, text, labels=labels))
            for values, value in sorted({tuple(lb[k] for k in labels): v for n, lb, v in self.samples
                                         if n == name and all(k in lb for k in labels)}.items()):
                family.add_metric(list(values), value)
            families.append(family)
        yield from (f for f in families if f.samples)


def _samples(run: RunMetrics, totals: Mapping[str, float]) -> Iterator[Sample]:
    c = {"command": run.command}
    if run.succeeded:
        yield LAST_SUCCESS, c, run.finished_at
    yield "crawler_last_run_timestamp_seconds", c, run.finished_at
    yield "crawler_last_run_exit_code", c, float(run.exit_code)
    yield "crawler_last_run_duration_seconds", c, run.duration_seconds
    t = run.tally
    for name, this_run in (("crawler_requests_sent_total", t.requests_sent if t else 0),
                           ("crawler_credits_billed_total", t.credits_billed if t else 0)):
        yield name, c, totals.get(name, 0.0) + this_run
    if t is None:
        return
    for status, n in t.items.items():
        yield "crawler_last_run_items", c | {"status": status}, float(n)
    yield "crawler_last_run_requests_sent", c, float(t.requests_sent)
    yield "crawler_last_run_credits_billed", c, float(t.credits_billed)
    for kind, n in sorted(t.responses.items()):
        yield "crawler_last_run_responses", c | {"outcome": kind}, float(n)
    yield "crawler_last_run_rate_limited", c, float(t.rate_limited)
    yield "crawler_last_run_rate_wait_seconds", c, t.rate_wait_seconds


_ABSENT_WHEN_BLANK = ("output", "failures_file", "reason", "skipped_file")  # "" in a summary: null in the JSON
_PAIRS = ("failures", "skips")  # a download's (reason, count) pairs: an object in the JSON, as a job's failures are


def summary_record(summary: Any, exit_code: int) -> dict[str, Any]:
    """A summary's fields (a job's `Summary`, a download's) as JSON values, plus `exit_code`: numbers as numbers,
    absent values as null."""
    record = dataclasses.asdict(summary)
    for key in _ABSENT_WHEN_BLANK:
        if key in record:
            record[key] = record[key] or None
    for key in _PAIRS:
        if isinstance(record.get(key), (list, tuple)):
            record[key] = dict(record[key])
    record["notes"] = list(record.get("notes", ()))
    record["exit_code"] = exit_code
    return record


def ingest_record(result: Any) -> dict[str, Any]:
    """`{command, day, exit_code, days, held_by, parts}` of an `ingest.IngestResult` (its `day`, `outcomes` and
    `exit_code`): one part per job (profiles, then posts), each with that part's own requests and answers."""
    return {"command": "ingest", "day": result.day.isoformat(), "exit_code": result.exit_code,
            "days": [d.isoformat() for d in getattr(result, "days", ())],  # every day the run wrote to
            "held_by": getattr(result, "held_by", None),  # set when another ingest held the out-dir
            "private_skipped": getattr(result, "private", 0),  # private users whose posts were not walked
            "parts": [summary_record(o.summary, o.exit_code) for o in result.outcomes]}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically and durably: a temporary file beside it, renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


class RunReports:
    """The reports of one command run; `done()` gives its result, else the exception's exit code is written."""

    def __init__(self, command: str, *, metrics_file: str | None, summary_json: str | None) -> None:
        self.command = command
        self.metrics_file = Path(metrics_file) if metrics_file else None
        self.summary_json = Path(summary_json) if summary_json else None
        self.started = time.monotonic()
        self._written = False

    def done(self, exit_code: int, summaries: Sequence[Summary], record: Mapping[str, Any] | None = None, *,
             completed: bool = True) -> None:
        """Write both reports for a job run that ended with ``exit_code``; ``record`` replaces the summary JSON
        (ingest: `ingest_record`), else it is the one summary's record. A run that did no work
        (``completed=False``: ingest's out-dir held by a running ingest, exit 0) keeps the last-success time,
        so an alert on a stale last success still fires while a hung ingest holds the out-dir."""
        if record is None:
            record = (summary_record(summaries[0], exit_code) if len(summaries) == 1
                      else {"command": self.command, "exit_code": exit_code,
                            "parts": [summary_record(s, exit_code) for s in summaries]})
        self.finish(exit_code, record, RunTally.of(summaries), completed=completed)

    def finish(self, exit_code: int, record: Mapping[str, Any], tally: RunTally | None, *,
               completed: bool = True) -> None:
        """Write ``record`` as the summary JSON (with its `schema_version`) and the run's series."""
        self._written = True
        if self.summary_json is not None:
            self._try(write_json, self.summary_json, {"schema_version": SCHEMA_VERSION, **record})
        if self.metrics_file is not None:
            run = RunMetrics(self.command, exit_code, time.time(), time.monotonic() - self.started, tally,
                             completed=completed)
            self._try(write_metrics, self.metrics_file, run)

    def failed(self, exit_code: int, reason: str) -> None:
        """Write both reports for a run that ended by an exception, before any summary."""
        self.finish(exit_code, {"command": self.command, "status": "failed", "reason": reason,
                                "exit_code": exit_code, "rate_wait_seconds": 0.0}, None)

    def _try(self, write: Any, path: Path, value: Any) -> None:
        # A report that cannot be written must not change how the run ended: say so on one line.
        try:
            write(path, value)
        except OSError as exc:
            print(f"crawler: could not write {path}: {exc.strerror or exc}", file=sys.stderr)


def check_report_paths(metrics_file: str | None, summary_json: str | None, *, out_dir: str | None = None) -> None:
    """Both report paths must be in an existing directory, or in ``out_dir``, which the run makes (ingest's, on its
    first night); anything else is a usage error before any request."""
    made = Path(out_dir).absolute() if out_dir else None
    for flag, value in (("--metrics-file", metrics_file), ("--summary-json", summary_json)):
        parent = Path(value).parent if value else None
        if parent is not None and not parent.is_dir() and parent.absolute() != made:
            raise UsageError(f"{flag} {value}: the directory {parent} does not exist")


@contextlib.contextmanager
def run_reports(command: str, *, metrics_file: str | None, summary_json: str | None,
                out_dir: str | None = None) -> Iterator[RunReports]:
    """Wrap one command run: the metrics file and the summary JSON are written however it ends, except by a
    usage error (exit 2), which changes nothing."""
    check_report_paths(metrics_file, summary_json, out_dir=out_dir)
    reports = RunReports(command, metrics_file=metrics_file, summary_json=summary_json)
    try:
        yield reports
    except UsageError:
        raise
    except Interrupted as exc:
        if not reports._written:
            reports.failed(exc.code, str(exc))
        raise
    except CrawlerError as exc:
        if not reports._written:
            reports.failed(exc.exit_code, str(exc))
        raise
    except KeyboardInterrupt:
        if not reports._written:
            reports.failed(130, "interrupted")
        raise
    except Exception as exc:
        if not reports._written:
            reports.failed(1, f"unexpected error: {type(exc).__name__}")
        raise
