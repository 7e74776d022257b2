"""The CSV sink: the job's single commit point, for the one group-commit writer (`engine.writer.GroupWriter`).

Workers hand over a page of rows to the writer and wait for its commit, so a slow disk slows the workers instead
of filling memory. The writer hands every batch waiting (a group commit) to `CsvSink.commit`, which writes the
rows, flushes and fsyncs the `.part` file (an `AppendOnlyFile`), and only then records the new length and the
items' progress in the state store. On resume the `.part` file is cut back to the committed length: no row
twice, none lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crawler import testing
from crawler.api.records import Record
from crawler.errors import UsageError
from crawler.files import AppendOnlyFile, ShortFile, atomic_write, copy_durably, replace_durably
from crawler.stores.local import StateStore
from crawler.stores.model import ItemUpdate, WalkUpdate

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_CHARS = frozenset("".join(FORMULA_START))


def _formula_like(text: str) -> bool:
    """Text the guard prefixes: it starts with a formula character, after any number of ' (so "'=x" becomes
    "''=x": the guard is one-to-one and `unguard` tells its ' from one the text had)."""
    return text.lstrip("'")[:1] in _FORMULA_CHARS


def unguard(text: str) -> str:
    """The text a guarded cell was made from: the one leading ' the formula guard added removed, nothing else."""
    return text[1:] if text[:1] == "'" and _formula_like(text) else text


def cell(value: Any, *, raw: bool = False) -> str:
    """One CSV cell: booleans as true/false, None empty, formula-like text neutralised with a leading '."""
    kind = type(value)  # exact types first: this runs for every cell of every row
    if kind is str:
        text: str = value
        if raw or not text:
            return text
        first = text[0]
        return "'" + text if first in _FORMULA_CHARS or (first == "'" and _formula_like(text)) else text
    if kind is int:
        return str(value)
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if isinstance(value, str):
        return cell(str(value), raw=raw)
    return str(value)


def part_path(out: Path) -> Path:
    """Where rows go until the job completes."""
    return out.with_name(out.name + ".part")


def csv_bytes(rows: Iterable[Sequence[str]]) -> bytes:
    """``rows`` as CSV lines (minimal quoting, ``\n`` line ends), UTF-8."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(rows)
    return text.getvalue().encode("utf-8")


@dataclass(slots=True)
class Batch:
    """Rows of one page (or one item) and the progress they complete."""

    rows: Sequence[Record]
    update: ItemUpdate | None = None
    keyed: bool = False  # rows of an offset-paginated walk: drop those the item already committed
    walks: Sequence[WalkUpdate] = ()  # reply walks this batch registers or advances


class CsvSink:
    """The single writer of one CSV (and of progress into the state store); `commit` is its group commit."""

    # The writer's batching window: a commit waits this long after the previous one, gathering every page that
    # arrives meanwhile (at most ~1/commit_interval fsyncs a second, however many workers).
    commit_interval = 0.01

    def __init__(
        self,
        out: Path,
        columns: Sequence[str],
        *,
        state: StateStore | None,
        counters: Callable[[], tuple[int, int]],
        bom: bool = False,
        raw: bool = False,
        durable: bool = True,
    ) -> None:
        self.out = out
        self.part = part_path(out)
        self.columns = list(columns)
        self._state = state
        self._counters = counters
        self._bom = bom
        self._raw = raw
        self._durable = durable
        self.rows_written = 0
        self.commits = 0
        self._file: AppendOnlyFile | None = None

    async def open(self, committed_length: int) -> None:
        """Open the `.part` file, cut back to the committed length (a crash may have left more)."""
        self.part.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = AppendOnlyFile.open(self.part, committed_length, durable=self._durable)
        except ShortFile as short:
            # The job was finalised and is being continued (--retry-failed, an edited input): carry on in a
            # copy of the finished file. OUT.csv stays the complete previous deliverable until finalize()
            # replaces it, however this run ends. Any other short `.part` is never padded: the job stops.
            if short.size is not None or not self.out.exists() or self.out.stat().st_size != committed_length:
                what = "is missing" if short.size is None else "is shorter than what the job committed"
                raise UsageError(
                    f"{self.part} {what} or {self.out} was changed since the job committed {committed_length:,}"
                    " bytes: add --restart to start the job over"
                ) from None
            copy_durably(self.out, self.part)
            self._file = AppendOnlyFile.open(self.part, committed_length, durable=self._durable)
        if self._file.length == 0:
            await self._commit([], head=("\ufeff".encode() if self._bom else b"") + csv_bytes([self.columns]))

    async def commit(self, group: list[Batch]) -> None:
        """One group commit: write the group's rows, fsync them, then record them in one state transaction."""
        seen: list[tuple[int, str]] = []
        for batch in group:
            if batch.keyed and batch.update is not None and batch.rows:
                self._drop_seen(batch, seen)
        rows = [row for batch in group for row in batch.rows]
        await self._commit([b.update for b in group if b.update is not None], seen,
                           [w for b in group for w in b.walks], rows=rows)
        self.rows_written += len(rows)

    def _drop_seen(self, batch: Batch, seen: list[tuple[int, str]]) -> None:
        """Keep the batch's rows its item has not committed (nor queued in this group); note their keys."""
        assert batch.update is not None and self._state is not None
        seq = batch.update.seq
        keys = [str(getattr(r, r.COLUMNS[0])) for r in batch.rows]
        new = self._state.unseen(seq, keys)
        new.difference_update(k for s, k in seen if s == seq)
        kept = []
        for record, key in zip(batch.rows, keys, strict=True):
            if key in new:
                new.discard(key)
                kept.append(record)
                seen.append((seq, key))
        dropped = len(batch.rows) - len(kept)
        if dropped and batch.update.rows:
            batch.update = replace(batch.update, rows=batch.update.rows - dropped)
        elif dropped and batch.walks:  # a reply page: its walk counts the rows
            first = batch.walks[0]
            batch.walks = [replace(first, rows=first.rows - dropped), *batch.walks[1:]]
        batch.rows = kept

    async def _commit(self, updates: Iterable[ItemUpdate], seen: Iterable[tuple[int, str]] = (),
                      walks: Iterable[WalkUpdate] = (), *, rows: Sequence[Record] = (), head: bytes = b"") -> None:
        assert self._file is not None
        # Formatting, the write and the fsync run in a worker thread: the event loop (the workers' requests)
        # never waits on the disk. Only this writer touches the file, one commit at a time.
        await asyncio.to_thread(self._write_through, rows, head)
        if self._state is not None:
            sent, billed = self._counters()
            self._state.commit(self._file.length, updates, sent, billed, seen, walks)
        self.commits += 1

    def _write_through(self, rows: Sequence[Record], head: bytes) -> None:
        """(In a worker thread.) Append ``head`` and ``rows`` as CSV, flush, then fsync: the rows are durable."""
        assert self._file is not None
        raw = self._raw
        data = head + csv_bytes([cell(v, raw=raw) for v in row.values()] for row in rows) if rows else head
        if data:
            self._file.append(data)
        self._file.flush()
        testing.reached("written")
        if self._durable:
            self._file.fsync()
        testing.reached("fsynced")

    async def checkpoint(self) -> None:
        """Commit the counters (and anything written) now, e.g. after the last batch of a stopped run."""
        if self._file is not None:
            await self._commit([])

    def close(self) -> None:
        """Close the file (idempotent); the `.part` stays until finalize()."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finalize(self) -> None:
        """The job is complete: rename `.part` to the output name, durably."""
        self.close()
        replace_durably(self.part, self.out)


def write_failures(path: Path, failures: Iterable[tuple[str, str, str, str]], *, raw: bool = False) -> int:
    """Write the failures file (input, endpoint, reason, detail) atomically; remove it when empty."""
    rows = iter(failures)
    first = next(rows, None)
    if first is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return 0
    count = 0
    with atomic_write(path) as fh:  # a full disk keeps no half-written copy
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["input", "endpoint", "reason", "detail"])
        for row in itertools.chain([first], rows):
            writer.writerow([cell(v, raw=raw) for v in row])
            count += 1
    return count
