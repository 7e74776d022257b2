"""`crawler history export`: every snapshot as one CSV, written atomically (the bulk load is the store's), and
with --format FILE.parquet / FILE.jsonl from it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import IO

from crawler.history.db import SNAPSHOT_COLUMNS
from crawler.history.queries import HistoryQueries
from crawler.sinks.datafile import Kind, write_datafile

# The export's columns as data-file types (docs/columns.md): fetched_at is ISO-8601 text in the CSV.
SNAPSHOT_KINDS: dict[str, Kind] = {
    "user_id": "text", "day": "date", "fetched_at": "iso_time", "handle": "text", "followers": "int",
    "following": "int", "hearts": "int", "videos": "int", "likes": "int", "verified": "bool", "private": "bool"}


def export_csv(store: HistoryQueries, path: Path | None, fmt: str = "csv") -> int:
    """Write every snapshot to a CSV (atomically), then its ``fmt`` copy beside it; return the row count.
    ``path`` None: the CSV to stdout (``-o -``)."""
    from crawler.files import atomic_write

    if path is None:
        return _write(store, sys.stdout)
    with atomic_write(path) as fh:
        n = _write(store, fh)
    write_datafile(path, SNAPSHOT_KINDS, fmt)
    return n


def _write(store: HistoryQueries, fh: IO[str]) -> int:
    from crawler.sinks.csv_sink import cell

    n = 0
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(SNAPSHOT_COLUMNS)
    for row in store.snapshots():
        writer.writerow([cell(v) for v in row])
        n += 1
    return n
