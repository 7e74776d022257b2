"""What a job's workers commit, whichever store holds the job: the local state file + CSV, or PostgreSQL.

Handlers (commands.py) yield Steps; `step_update` turns a Step into the item's progress, the one rule both
worker pools use (crawl.py: pages to the CSV sink and SQLite; work.py: pages to PostgreSQL).
"""

from __future__ import annotations

from crawler.job import Step
from crawler.state import ItemUpdate


def step_update(step: Step, seq: int, *, endpoint: str, max_pages: int | None) -> ItemUpdate:
    """The progress one Step makes for item `seq`.

    A reply walk's page leaves the item where it was; a pagination guard or the --max-pages cap ends the item
    as `pagination_guard` (its rows so far kept); the last page ends it done; any other page moves its cursor.
    """
    n = len(step.rows) if step.counted else 0
    if not step.counted:
        return ItemUpdate(seq, "done" if step.last else "pending", cursor=step.cursor)
    if step.guard is not None or step.capped:
        detail = step.guard or f"stopped at the --max-pages cap of {max_pages} pages; the list goes on"
        return ItemUpdate(seq, "failed", rows=n, pages=1, reason="pagination_guard", endpoint=endpoint, detail=detail)
    if step.last:
        return ItemUpdate(seq, "done", rows=n, pages=1)
    return ItemUpdate(seq, "pending", cursor=step.cursor, rows=n, pages=1)
