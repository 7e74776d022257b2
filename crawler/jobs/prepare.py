"""The job: its options, its files beside the output, its lock, and creating or resuming it in the state store.

Sits between the input (`inputs.py`) and the run (`crawl.py`): `prepare()` decides whether a run is
new, a resume or has nothing to do, and reads the input into the state store once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from crawler import testing
from crawler.api import records as ep
from crawler.errors import JobLocked, UsageError
from crawler.files import lock_file
from crawler.jobs.inputs import InputEntry, input_items
from crawler.sinks.csv_sink import part_path
from crawler.stores.local import StateStore
from crawler.stores.model import RETRIABLE, RETRIABLE_ALL, WalkUpdate

if TYPE_CHECKING:
    from crawler.jobs.commands import CommandSpec

log = logging.getLogger("crawler.jobs.prepare")



@dataclass(frozen=True, slots=True)
class JobOptions:
    """Everything that defines a job's output (a change to any of these is a different job)."""

    command: str
    input: str  # a file, "-" for stdin, or the keyword of a search command
    output: str
    column: str | None = None
    by_id: bool = False
    with_replies: bool = False
    publish_time: int = 0
    sort_by: int = 0
    region: str | None = None
    max_items: int | None = None
    max_pages: int | None = None
    page_size: int | None = None


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One pending input item, with where its walk stopped last time."""

    seq: int
    key: str
    raw: str
    cursor: ep.Cursor | None
    rows: int
    pages: int = 0

    @property
    def user_id(self) -> str | None:
        """The numeric id of an `id:` item."""
        return self.key[3:] if self.key.startswith("id:") else None

    @property
    def source(self) -> str:
        """What the rows' source column says: the handle, or the numeric id."""
        return self.user_id or self.key


@dataclass(frozen=True, slots=True)
class Step:
    """Rows a handler produced and how far they take the item."""

    rows: Sequence[ep.Record]
    cursor: ep.Cursor | None = None  # the next cursor while the walk goes on
    last: bool = True
    guard: str | None = None  # a pagination guard ended the walk early
    capped: bool = False  # the --max-pages cap ended the walk while the list went on
    walks: Sequence[WalkUpdate] = ()  # reply walks registered or advanced by this page
    counted: bool = True  # False: the rows are a reply walk's, not the item's (--max-items, --max-pages)


class Prepared(enum.Enum):
    """What `prepare()` found."""

    NEW = "new"
    RESUME = "resume"
    COMPLETE = "complete"


# --- the files beside the output ---

def default_output(command: str, source: str, input_kind: str, *, today: date | None = None) -> str:
    """The output without -o, in the current directory: `LIST.COMMAND.csv` for the input file LIST.txt,
    `KEYWORD.COMMAND.csv` for a search, `stdin.COMMAND.DAY.csv` for stdin or a pipe (DAY in UTC: the same
    pipe that day resumes its job)."""
    if input_kind == "keyword":
        stem = re.sub(r"[^\w.-]+", "-", source.strip()).strip("-.")[:64] or "keyword"
    elif _unnamed(source):
        return f"stdin.{command}.{(today or datetime.now(UTC).date()).isoformat()}.csv"
    else:
        stem = Path(source).stem or "input"
    return f"{stem}.{command}.csv"


def input_name(job: JobOptions, spec: CommandSpec) -> str | None:
    """What the job remembers of its input: "-" for stdin, a file's absolute path, None for a keyword."""
    if spec.input_kind == "keyword":
        return None
    return "-" if job.input == "-" else os.path.abspath(job.input)


def _unnamed(source: str) -> bool:
    """stdin, or a pipe (`<(...)`): an input whose name says nothing about its items."""
    return source == "-" or (os.path.exists(source) and not os.path.isfile(source) and not os.path.isdir(source))


def _shown(name: str) -> str:
    """An input name as the user would type it here."""
    if name == "-":
        return "stdin"
    relative = os.path.relpath(name)
    return name if relative.startswith("..") else relative


def state_path(out: Path) -> Path:
    """The job's state file, next to the output."""
    return out.with_name(out.name + ".state.db")


def failures_path(out: Path) -> Path:
    """OUT.failures.csv for OUT.csv."""
    stem = out.name[:-4] if out.name.lower().endswith(".csv") else out.name
    return out.with_name(stem + ".failures.csv")


def lock_path(out: Path) -> Path:
    """The job's lock file, next to the output."""
    return out.with_name(out.name + ".lock")


def job_files(out: Path) -> list[Path]:
    """The files a run creates beside its output."""
    state = state_path(out)
    return [lock_path(out), state, state.with_name(state.name + "-wal"), state.with_name(state.name + "-shm"),
            part_path(out)]


def check_output(job: JobOptions, *, overwrite: bool = False) -> None:
    """Refuse an output that would destroy something: a path through a file, the input, a file not ours."""
    out = Path(job.output)
    check_output_path(job, overwrite=overwrite)
    if not out.exists() or overwrite:
        return
    if not state_path(out).exists():
        raise UsageError(f"--output {out} exists and was not written by crawler: choose another output, or add"
                         " --overwrite to replace it")


def check_output_path(job: JobOptions, *, overwrite: bool = False) -> None:
    """Refuse an output path through a file, a directory, or the input file (whoever wrote the output before)."""
    out = Path(job.output)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output {out}: {parent} is a file, not a directory; choose an output path"
                                 " in a directory")
            break
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory: give a file name such as {out / (job.command + '.csv')}")
    if not out.exists() or overwrite:
        return
    if _same_file(job.input, out):
        raise UsageError(f"--output {out} is the input file; it would be replaced by the results: write to"
                         " another file (or add --overwrite if you mean it)")


def _same_file(a: str, b: Path) -> bool:
    """True when both name one file (same device and inode); a keyword or stdin is no file."""
    try:
        return a != "-" and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """Hold the job's lock (dies with the process, so a killed run never blocks the next)."""
    path = lock_path(out)
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = stack.enter_context(lock_file(path))
        except OSError as exc:
            raise UsageError(f"cannot create files in {path.parent} for --output {out.name} ({exc.strerror}): choose"
                             " an output in a directory you can write to") from None
        if fd is None:
            raise JobLocked(f"another crawler process is running the job for {out}; wait for it or stop it")
        yield


# --- creating or resuming the job ---

@dataclass(slots=True)
class Preparation:
    """The result of `prepare()`: what to do, and how an edited input changed the job."""

    state: Prepared
    input_change: tuple[int, int] | None = None  # (items added, done items gone)
    nothing_to_retry: bool = False  # --retry-failed on a complete job whose failures are none it retries
    renamed: tuple[str, str] | None = None  # (the job's input, this one) when another input file was given


async def prepare(
    state: StateStore,
    job: JobOptions,
    spec: CommandSpec,
    *,
    restart: bool,
    retry_failed: bool | str,
    pause: Callable[[], Awaitable[None]],
    continue_job: bool = False,
) -> Preparation:
    """Create, resume or restart the job in the state store; `pause` lets signals in between input batches.

    Another input sharing under half its items with the job is refused (`another_input`) unless `continue_job`.
    """
    out = Path(job.output)
    name = input_name(job, spec)
    options = {k: v for k, v in asdict(job).items() if k not in ("input", "output")}
    existing = state.job()
    if existing is None and retry_failed and not restart:
        raise UsageError(f"--retry-failed: there is no job for {out} yet; run the command without"
                         " --retry-failed to start it")
    if existing is not None and existing.status == "ingesting":
        existing = None  # stopped while reading the input: nothing was spent, read it again from scratch
    if existing is not None and not restart:
        if existing.command != job.command or existing.options != options:
            changed = sorted(k for k in options if existing.options.get(k) != options[k])
            raise UsageError(
                f"{out} belongs to a job with other options ({', '.join(changed) or 'command'} changed):"
                " add --restart to start over, or write to another output"
            )
        # Read the input (once: it may be stdin) beside the job; an edited input continues the job.
        items, digest = input_items(job, spec)
        state.begin_incoming()
        await _ingest(items, state.add_incoming, pause)
        if existing.input_sha != digest() and spec.input_kind == "keyword":
            raise UsageError(f"{out} holds the results of another keyword: add --restart to start over,"
                             " or write to another output")
        renamed = another_input(out, state.input_name(), name, edited=existing.input_sha != digest(),
                                continue_job=continue_job, shared=state.incoming_shared)
        state.set_input_name(name)
        change = None
        if existing.input_sha != digest():
            change = state.merge_incoming(digest())
            log.info("the input changed: %d items added, %d done items no longer in it", *change)
            testing.reached("merged")
        retried = state.retry_failed(RETRIABLE_ALL if retry_failed == "all" else RETRIABLE) if retry_failed else 0
        if retry_failed:
            log.info("retrying %d failed items", retried)
        if not retried and change is None and finished(state, out):
            return Preparation(Prepared.COMPLETE, nothing_to_retry=bool(retry_failed), renamed=renamed)
        state.set_status("running")
        return Preparation(Prepared.RESUME, change, renamed=renamed)
    # A fresh job (or --restart): forget everything, ingest the input in one pass.
    part_path(out).unlink(missing_ok=True)
    state.create_job(job.command, "", options, str(out), name)
    items, digest = input_items(job, spec)
    await _ingest(items, state.add_items, pause)
    state.set_input_sha(digest())
    state.set_status("running")
    return Preparation(Prepared.NEW)


def another_input(out: Path, before: str | None, name: str | None, *, edited: bool, continue_job: bool,
                  shared: Callable[[], tuple[int, int]]) -> tuple[str, str] | None:
    """(the job's input, this one) when this run reads another input file (`name`, see `input_name`) than the job's
    (`before`); exit 2 (UsageError) when it, or stdin with other items (`edited`), shares fewer than half its items
    with the job, unless `continue_job`. `shared()`: (valid items of this input the job has, valid items in it),
    asked only then. The one rule for local and PostgreSQL jobs (`pg_items.create` calls it as its `check`)."""
    if name is None or before is None:
        return None  # a keyword (checked by its hash), or a job that did not record its input
    renamed = before != name and not (before != "-" and _same_file(name, Path(before)))
    old, new = _shown(before), _shown(name)
    if (renamed or (edited and _unnamed(name))) and not continue_job:
        common, total = shared()
        if 2 * common < total:
            whose = f"the job of {old}" if renamed else f"the job of another input from {old}"
            raise UsageError(f"{out} holds {whose}, and {new} shares {common:,} of its {total:,} items with it: add"
                             " --restart to start that output over, or --continue to add these items to the job"
                             " (its rows stay); or write to another output with -o")
    return (old, new) if renamed else None


def finished(state: StateStore, out: Path) -> bool:
    """The job is complete: no item pending and its output finalized (a job whose CSV was removed, or whose
    `.part` holds rows not yet renamed into place, runs again). Never decided from the status flag."""
    return state.complete() and out.exists() and not part_path(out).exists()


async def _ingest(items: Iterator[InputEntry], store: Callable[[list[InputEntry]], object],
                  pause: Callable[[], Awaitable[None]]) -> None:
    """Store the input items in batches, letting Ctrl-C / SIGTERM in between."""
    batch: list[InputEntry] = []
    for entry in items:
        batch.append(entry)
        if len(batch) >= 5000:
            store(batch)
            batch.clear()
            await pause()
    store(batch)
