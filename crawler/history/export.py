"""`crawler history export`: every snapshot as one CSV, written atomically (the bulk load is the store's)."""

from __future__ import annotations

import csv
from pathlib import Path

from crawler.history.db import SNAPSHOT_COLUMNS
from crawler.history.queries import HistoryQueries


def export_csv(store: HistoryQueries, path: Path) -> int:
    """Write every snapshot to a CSV (atomically); return the row count."""
    from crawler.files import atomic_write
    from crawler.sinks.csv_sink import cell

    n = 0
    with atomic_write(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SNAPSHOT_COLUMNS)
        for row in store.snapshots():
            writer.writerow([cell(v) for v in row])
            n += 1
    return n
