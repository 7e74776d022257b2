"""What a job's workers share and commit, whichever store holds the job: the local state file + CSV, or PostgreSQL.

Handlers (commands.py) yield Steps; `step_update` turns a Step into the item's progress, the one rule both
worker pools use (crawl.py: pages to the CSV sink and SQLite; work.py: pages to PostgreSQL).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING

from crawler.api import records as ep
from crawler.jobs.prepare import JobOptions, Step, WorkItem
from crawler.stores.model import ItemUpdate
from crawler.stores.users import UserDirectory

if TYPE_CHECKING:
    from crawler.api.client import Client
    from crawler.api.pagesizes import PageSizes


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


class ItemWalker:
    """The part of `CrawlContext` both worker pools share: ids learned from profiles, a user's id, list walks.

    A pool sets `job`, `client`, `users` and `page_sizes`; `limits()` says the walks' page cap and size.
    """

    job: JobOptions
    client: Client
    users: UserDirectory
    page_sizes: PageSizes | None

    def limits(self) -> tuple[int | None, int | None]:
        """(--max-pages, page size) of the walks: the job's own options."""
        return self.job.max_pages, self.job.page_size

    def learn(self, profile: ep.Profile) -> None:
        """Remember a profile's id and counts in this host's data directory."""
        self.users.learn(profile.handle, profile.user_id, videos=profile.videos, followers=profile.followers,
                         following=profile.following, private=profile.private)

    async def resolve_user(self, item: WorkItem) -> str:
        """The user id of an item: given, known from the data directory, or one `/userid/` call."""
        if item.user_id:
            return item.user_id
        known = self.users.user_id(item.key)
        if known:
            return known
        uid = await self.client.user_id(item.key)
        self.users.learn(item.key, uid)
        return uid

    async def walk(self, kind: str, params: Mapping[str, str | int], item: WorkItem, *,
                   count_rows: bool = True) -> AsyncGenerator[Step, None]:
        """Walk a list from the item's committed cursor, one Step per page (--max-items only if `count_rows`)."""
        limit = self.job.max_items if count_rows else None
        remaining = None if limit is None else max(limit - item.rows, 0)
        cap, page_size = self.limits()
        pages_left = None if cap is None else max(cap - item.pages, 0)
        if remaining == 0 or pages_left == 0:
            yield Step([])
            return
        pages = self.client.pages(kind, params, source=item.source, cursor=item.cursor, page_size=page_size,
                                  max_pages=pages_left, max_items=remaining, sizes=self.page_sizes)
        async with aclosing(pages) as walk:
            async for page in walk:
                yield Step(page.items, page.next_cursor, page.last, page.stop, capped=page.capped)
